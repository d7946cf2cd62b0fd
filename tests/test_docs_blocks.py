"""Every ```python block of the README and of the documentation pages (docs/**/*.md) runs as written:
a page's blocks in order, in one namespace, in a temporary folder, on NumPy, on a machine without a
GPU. Blocks that need an optional package guard themselves (``try: import torch ...``) and blocks
that need a GPU check ``cnn_gpu.cupy_available()``. A block that cannot run here at all (it needs
mpiexec, several machines, a download) says so on the line before its fence::

    <!-- not-run: needs mpiexec -->
    ```python
    ...
    ```

and is then only compiled (its syntax checked). A block added later is held to the same rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import doc_pages

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:^<!-- not-run: (?P<why>[^\n]*?) -->[ \t]*\n)?^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(first line number, code, why it is not run or None) of each ```python block."""
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("why")) for m in FENCE.finditer(text)]


def test_the_extractor_finds_blocks():
    sample = "x\n```python\na = 1\n```\ntext\n```bash\nls\n```\n<!-- not-run: needs mpiexec -->\n```python\nb = a + 1\n```\n"
    assert python_blocks(sample) == [(3, "a = 1\n", None), (11, "b = a + 1\n", "needs mpiexec")]


def test_the_pages_have_examples():
    """The glob finds the guides, and most of them show code (a renamed folder would otherwise make
    the test below pass on nothing)."""
    with_code = [p.name for p in doc_pages() if python_blocks(p.read_text(encoding="utf-8"))]
    assert "README.md" in with_code and len(with_code) >= 10, with_code


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch, capsys):
    import cnn_gpu
    from cnn_gpu.onnx import CONVERTERS

    # a page may register converters (docs/interop.md's Swish): gone again after the page
    monkeypatch.setattr("cnn_gpu.onnx.CONVERTERS", dict(CONVERTERS))
    name = str(page.relative_to(ROOT))
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    cnn_gpu.manual_seed(0)
    with cnn_gpu.use_backend("numpy"):
        for line, code, why in blocks:
            compiled = compile(code, f"{name}:{line}", "exec")
            if why is not None:
                assert why.strip(), f"{name}:{line}: a not-run block must say why"
                continue
            try:
                exec(compiled, namespace)  # noqa: S102
            except Exception as exc:  # noqa: BLE001 - report which block failed
                pytest.fail(f"{name}: the block at line {line} failed: {type(exc).__name__}: {exc}\n{code}")
