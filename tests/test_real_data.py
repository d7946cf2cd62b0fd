"""The real Fashion-MNIST files, where a machine has them: Debian's (and Ubuntu's) package
dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist (.ci/run's stage 2
installs it when the package archive is reachable); $CNN_GPU_REAL_DATA may name another data
root. Without them these tests skip and say so.

They check the loader on the real bytes (the registry's checksums of Debian's copies, IDX
parsing) against facts published with the dataset, and that the CLI's recipe learns it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data import load_fashion_mnist

ROOT = Path(os.environ.get("CNN_GPU_REAL_DATA", "/usr/share/datasets"))
pytestmark = pytest.mark.skipif(
    not (ROOT / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not on this machine ({ROOT}/fashion-mnist: install Debian's dataset-fashion-mnist "
    "or set CNN_GPU_REAL_DATA)",
)


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist(ROOT, download=False)


def test_the_real_fashion_mnist_files_load_and_match_the_published_facts(fashion):
    (x, y), (xt, yt) = fashion
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(y[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])  # the first training labels
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 6000))  # balanced: 6,000 per class
    np.testing.assert_array_equal(np.bincount(yt), np.full(10, 1000))
    pixels = x.astype(np.float64) / 255
    assert abs(pixels.mean() - 0.2860) < 5e-5 and abs(pixels.std() - 0.3530) < 5e-5


def test_the_fashion_mnist_recipe_learns_the_real_data_in_one_epoch(tmp_path):
    """`cnn-gpu train --dataset fashion-mnist` for one epoch of the recipe (its schedule squeezed into
    that epoch): the real test split, not a synthetic one (the full recipe: README, measured)."""
    run = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnn_gpu",
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(ROOT),
            "--epochs",
            "1",
            "--run-dir",
            str(run),
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    acc = last["test_accuracy"]
    assert 0.84 < acc < 1.0, last
