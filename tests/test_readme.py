"""Every ```python block of the README runs as written: in order, in one namespace, in a temporary
folder, on a machine without a GPU (blocks that need one guard themselves, e.g. with
``cnn_gpu.cupy_available()``). A block added later is held to the same rule."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_the_extractor_finds_blocks():
    sample = "x\n```python\na = 1\n```\ntext\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(sample) == [(3, "a = 1\n"), (10, "b = a + 1\n")]


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 8, "the README's examples were not found"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    import cnn_gpu

    cnn_gpu.manual_seed(0)
    with cnn_gpu.use_backend("numpy"):
        for line, code in blocks:
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as exc:  # noqa: BLE001 - report which block failed
                pytest.fail(f"README.md block at line {line} failed: {type(exc).__name__}: {exc}\n{code}")
