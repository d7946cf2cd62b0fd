"""Sections of the documentation that say what the code does: their code runs as written (on NumPy,
without a GPU), and the recipe table of the command-line guide is runs.RECIPES. The sections moved
from the README into the guides (docs/); ``helpers.doc_section`` finds a section in whichever page
holds it."""

from __future__ import annotations

import re

import pytest
from helpers import doc_section

SECTIONS = ["Grouped and depthwise convolution", "Label smoothing", "Data augmentation on the device"]


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_section_code_runs(title, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", doc_section(title), re.S)
    assert blocks, f"{title}: no python code block"
    monkeypatch.chdir(tmp_path)  # files a block writes land here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs: {title}", "exec"), namespace)  # noqa: S102


def test_readme_recipe_table_is_the_recipes():
    """Each dataset's row of the recipe table (docs/cli.md, "Recipes") says what runs.RECIPES holds
    (model, epochs, batch, optimizer, weight decay, augmentation, smoothing, peak lr, schedule and
    warm-up)."""
    from cnn_gpu import runs

    rows = {}
    for line in doc_section("Recipes").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in runs.RECIPES:
            rows[cells[0]] = cells
    assert set(rows) == set(runs.RECIPES), f"recipe rows: {sorted(rows)}"
    for name, (_, model, epochs, batch, optimizer, lr, schedule) in rows.items():
        r = {**runs.RECIPE_DEFAULTS, **runs.RECIPES[name]}
        assert (model, int(epochs), int(batch), float(lr)) == (f"`{r['model']}`", r["epochs"], r["batch_size"], r["lr"])
        assert schedule == f"{'one-cycle' if r['schedule'] == 'onecycle' else r['schedule']} ({r['warmup']:.0%})", name
        assert optimizer.lower().startswith(r["optimizer"].lower()), name
        assert ("Nesterov" in optimizer) == r["nesterov"], name
        for what, key in (("weight decay", "weight_decay"), ("label smoothing", "label_smoothing")):
            m = re.search(rf"{what} ([0-9.e-]+)", optimizer)
            assert (float(m.group(1)) if m else 0.0) == r[key], f"{name}: {what}"
        said = {
            "crop-flip": "random crop" in optimizer and "flip" in optimizer,
            "flip": "flip" in optimizer and "random crop" not in optimizer,
            "crop": "random crop" in optimizer and "flip" not in optimizer,
            "none": "crop" not in optimizer and "flip" not in optimizer,
        }
        assert said[r["augment"]], f"{name}: augment {r['augment']!r} not said in {optimizer!r}"
