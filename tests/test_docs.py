"""The documentation site (mkdocs.yml, docs/): the API reference covers every public name, every page
is in the navigation, the settings table is the config module's, and ``mkdocs build --strict`` passes
(where MkDocs is installed: the ``docs`` extra, which CI's stage 2 installs).

A module is public unless INTERNAL says why not (or its name starts with an underscore); a public
module has a ``::: module`` line in a page of docs/reference/, and each name it exports (its
``__all__``, or the functions and classes it defines where it has none) gets an entry in the built
site, either under the module or where the object is defined."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Modules that are not part of the reference, and why. A new module must be added to a reference
# page or here (test_every_module_is_public_or_said_to_be_internal).
INTERNAL = {
    "cnn_gpu.__main__": "`python -m cnn_gpu`: runs cnn_gpu.cli.main",
    "cnn_gpu.archive": "the defensive .npz reader behind cnn_gpu.load and load_checkpoint",
    "cnn_gpu.cpu.adaptive_pool": "the CPU engine's parts: cnn_gpu.cpu exports its ops",
    "cnn_gpu.cpu.augment": "the CPU engine's parts",
    "cnn_gpu.cpu.conv": "the CPU engine's parts",
    "cnn_gpu.cpu.depthwise": "the CPU engine's parts",
    "cnn_gpu.cpu.elementwise": "the CPU engine's parts",
    "cnn_gpu.cpu.layout": "the CPU engine's parts",
    "cnn_gpu.cpu.linear": "the CPU engine's parts",
    "cnn_gpu.cpu.norm": "the CPU engine's parts",
    "cnn_gpu.cpu.parallel": "the CPU engine's parts",
    "cnn_gpu.cpu.pool": "the CPU engine's parts",
    "cnn_gpu.cuda.ops": "the CUDA engine's op functions, called by the dispatch (cnn_gpu.functional)",
    "cnn_gpu.data.digits": "re-exported by cnn_gpu.data",
    "cnn_gpu.data.loader": "re-exported by cnn_gpu.data",
    "cnn_gpu.functional.activation": "re-exported by cnn_gpu.functional",
    "cnn_gpu.functional.caches": "re-exported by cnn_gpu.functional",
    "cnn_gpu.functional.conv": "re-exported by cnn_gpu.functional",
    "cnn_gpu.functional.counter_rng": "the counter-based random bits behind Dropout, shuffling and augmentation",
    "cnn_gpu.functional.geometry": "shape arithmetic shared by the ops",
    "cnn_gpu.functional.linear": "re-exported by cnn_gpu.functional",
    "cnn_gpu.functional.loss": "re-exported by cnn_gpu.functional",
    "cnn_gpu.functional.norm": "re-exported by cnn_gpu.functional",
    "cnn_gpu.functional.pool": "re-exported by cnn_gpu.functional",
    "cnn_gpu.nn.layers": "re-exported by cnn_gpu.nn",
    "cnn_gpu.nn.module": "re-exported by cnn_gpu.nn",
}


def package_modules() -> list[str]:
    """Every module of the cnn_gpu source tree, by file (nothing is imported)."""
    names = []
    for path in sorted((ROOT / "cnn_gpu").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def public_modules() -> list[str]:
    return [
        m for m in package_modules() if m not in INTERNAL and not any(p.startswith("_") and p != "__init__" for p in m.split("."))
    ]


def reference_directives() -> dict[str, str]:
    """module or object -> the reference page whose ``::: name`` line documents it."""
    found = {}
    for page in sorted((DOCS / "reference").glob("*.md")):
        for name in re.findall(r"^::: ([\w.]+)[ \t]*$", page.read_text(encoding="utf-8"), flags=re.M):
            found[name] = page.name
    return found


def exported_names(module_name: str) -> list[str]:
    """The module's ``__all__``, or (where it has none) the public functions and classes it defines."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module_name
    ]


def entry_ids(module_name: str, name: str) -> set[str]:
    """The anchors under which the site may document ``module_name.name``: there, or where it is defined."""
    obj = getattr(importlib.import_module(module_name), name)
    ids = {f"{module_name}.{name}"}
    if inspect.ismodule(obj):
        ids.add(obj.__name__)
    elif (inspect.isfunction(obj) or inspect.isclass(obj)) and not obj.__module__.startswith("_"):
        ids.add(f"{obj.__module__}.{obj.__qualname__}")
    return ids


def nav_pages() -> list[str]:
    """The pages named in mkdocs.yml's nav (relative to docs/)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    return re.findall(r"^\s*-\s+(?:[^\n]*?:\s+)?([\w./-]+\.md)\s*$", text, flags=re.M)


# --- without MkDocs: the sources of the site ---------------------------------------------------


def test_every_module_is_public_or_said_to_be_internal():
    modules = package_modules()
    assert "cnn_gpu.nn" in modules and "cnn_gpu.functional.reference" in modules, modules[:5]
    stale = sorted(set(INTERNAL) - set(modules))
    assert not stale, f"INTERNAL names modules that no longer exist: {stale}"


def test_every_public_module_has_a_reference_page():
    directives = reference_directives()
    missing = [m for m in public_modules() if m not in directives]
    assert not missing, f"add a '::: module' line to a page of docs/reference/ (or the module to INTERNAL): {missing}"
    unknown = [d for d in directives if d.split(".")[0] != "cnn_gpu"]
    assert not unknown, unknown


def test_every_page_is_in_the_navigation():
    pages = nav_pages()
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(pages)) == on_disk, (
        f"not in mkdocs.yml's nav: {sorted(set(on_disk) - set(pages))}; "
        f"in the nav but not on disk: {sorted(set(pages) - set(on_disk))}"
    )
    assert len(pages) == len(set(pages)), "a page is in the nav twice"


def test_the_settings_table_is_the_config_modules():
    """docs/engines.md's table has one row per CNN_GPU_* variable of cnn_gpu.config, with its field."""
    from cnn_gpu import config

    text = (DOCS / "engines.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(CNN_GPU_\w+)` \| `(\w+)`", text, flags=re.M))
    assert rows == {var: field for field, var in config.ENV.items()}


def test_the_snippets_exist():
    """docs/contributing.md and docs/changelog.md include the files at the top of the checkout."""
    for page in ("contributing.md", "changelog.md"):
        (target,) = re.findall(r'^--8<-- "([^"]+)"$', (DOCS / page).read_text(encoding="utf-8"), flags=re.M)
        assert (ROOT / target).is_file(), f"{page} includes {target}, which is missing"


# --- with MkDocs: the built site ---------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built by ``mkdocs build --strict`` (a warning, such as a broken link or an object
    mkdocstrings cannot find, fails the build): its anchor ids."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    ids = set()
    for page in out.rglob("*.html"):
        ids |= set(re.findall(r'\bid="([^"]+)"', page.read_text(encoding="utf-8")))
    return ids


def test_mkdocs_build_strict_passes(site):
    assert "cnn_gpu.nn.Conv2d" in site and "cnn_gpu.train.fit" in site


@pytest.mark.parametrize("module_name", public_modules())
def test_the_reference_lists_every_exported_name(site, module_name):
    names = exported_names(module_name)
    missing = [n for n in names if not entry_ids(module_name, n) & site]
    assert not missing, f"{module_name}: no entry in the API reference for {missing}"


# --- the README and the install lines ----------------------------------------------------------


def _extras() -> set[str]:
    """The extras pyproject.toml defines (its [project.optional-dependencies] table)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", table, flags=re.M))


def test_every_extra_is_installed_the_same_way_everywhere():
    """README.md, CONTRIBUTING.md and the guides install an extra only as ``pip install -e ".[NAME]"``
    (from a checkout), and name only extras that exist."""
    from helpers import doc_pages  # noqa: PLC0415

    extras = _extras()
    assert {"test", "cuda12", "cuda13", "docs", "dev"} <= extras, extras
    for page in [*doc_pages(), ROOT / "CONTRIBUTING.md"]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"cnn_gpu\[", text), f'{page.name}: install extras as pip install -e ".[NAME]"'
        for group in re.findall(r'"\.\[([\w,-]+)\]"', text):
            unknown = set(group.split(",")) - extras - {"NAME"}  # NAME: the placeholder in the text
            assert not unknown, f"{page.name}: no such extra {sorted(unknown)} (pyproject.toml has {sorted(extras)})"


def test_the_readme_is_short_and_links_into_the_guides():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, f"README.md: {len(readme.splitlines())} lines; the details belong in docs/"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
    assert "docs/getting-started.md" in readme and "docs/DATA.md" in readme


def test_the_readme_quickstart_is_what_ci_stage_1_runs():
    """The Quickstart's two commands, unchanged, are the ones .ci/run's stage 1 runs in a bare venv."""
    from helpers import doc_section  # noqa: PLC0415

    (block,) = re.findall(r"```bash\n(.*?)```", doc_section("Quickstart"), flags=re.S)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands[-2:] == ['pip install -e ".[test]" && cnn-gpu train', "python -m pytest"], commands
    assert commands[0].startswith("python3 -m venv"), commands  # the virtual environment first
    stage1 = (ROOT / ".ci" / "run").read_text(encoding="utf-8").split("=== stage 1", 1)[1].split("=== stage 2", 1)[0]
    assert [c for c in commands[-2:] if c in stage1.splitlines()] == commands[-2:], stage1
