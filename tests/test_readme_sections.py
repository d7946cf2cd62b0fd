"""The README's code blocks run as written (on NumPy, without a GPU), section by section."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["Grouped and depthwise convolution", "Label smoothing", "Data augmentation on the device"]


def section(title: str) -> str:
    text = README.read_text()
    m = re.search(rf"^(#+) {re.escape(title)}\n", text, re.M)
    assert m, f"README has no section {title!r}"
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_section_code_runs(title, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", section(title), re.S)
    assert blocks, f"{title}: no python code block"
    monkeypatch.chdir(tmp_path)  # files a block writes land here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"README: {title}", "exec"), namespace)  # noqa: S102
