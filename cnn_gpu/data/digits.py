"""The bundled default data: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes).

scikit-learn ships the images inside its wheel, so nothing is downloaded. The split into
train and test is stratified and fixed (seed 0): 20% of each class is held out.
"""

from __future__ import annotations

import numpy as np

DIGITS_MAX = 16  # pixel values are integers 0..16


def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """-> (x_train, y_train), (x_test, y_test): images (N, 1, 8, 8) uint8 in 0..16, labels int64."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a float in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits  # noqa: PLC0415 (heavy, lazily)
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits dataset needs scikit-learn (a cnn_gpu dependency): pip install scikit-learn") from exc
    bunch = _sk_load_digits()
    images = bunch.images.astype(np.uint8)[:, None, :, :]  # (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(test_fraction * idx.size))])
    test_mask = np.zeros(labels.size, dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    return (images[~test_mask], labels[~test_mask]), (images[test_mask], labels[test_mask])
