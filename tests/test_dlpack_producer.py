"""cnn_gpu reads any DLPack producer, not only torch: an object that offers nothing but
``__dlpack__`` and ``__dlpack_device__`` (as a JAX array or another framework's tensor does)
is read without a copy. Runs without torch."""

from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import nn
from cnn_gpu.backend import is_dlpack_producer


class Producer:
    """Only the DLPack protocol (no __array__, no shape or dtype): memory owned by ``self.base``."""

    def __init__(self, base: np.ndarray):
        self.base = base

    def __dlpack__(self, **kwargs):
        return self.base.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.base.__dlpack_device__()


def test_a_bare_dlpack_producer_is_read_in_place():
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = Producer(base)
    assert is_dlpack_producer(p) and not is_dlpack_producer(base)
    for a in (cnn_gpu.asarray(p), cnn_gpu.to_numpy(p), cnn_gpu.from_dlpack(p)):
        assert a.shape == (2, 3) and a.dtype == np.float32
        a[1, 2] = -1.0  # write through cnn_gpu's array, read in the producer's memory
        assert base[1, 2] == -1.0
        base[1, 2] = 5.0
        assert a[1, 2] == 5.0


def test_load_state_dict_from_bare_producers_checks_dtype_and_shape():
    model = nn.Sequential(nn.Linear(3, 2, generator=np.random.default_rng(0)))
    w = np.full((2, 3), 0.5, dtype=np.float32)
    model.load_state_dict({"0.weight": Producer(w), "0.bias": Producer(np.zeros(2, np.float32))})
    np.testing.assert_array_equal(model[0].weight.data, w)
    assert not np.shares_memory(model[0].weight.data, w)  # loaded by copying into the parameter
    with pytest.raises(TypeError, match=r"state\['0.bias'\]: expected dtype float32, got float64"):
        model.load_state_dict({"0.weight": Producer(w), "0.bias": Producer(np.zeros(2))})
    with pytest.raises(ValueError, match=r"state\['0.weight'\]: expected shape \(2, 3\), got \(3, 2\)"):
        model.load_state_dict({"0.weight": Producer(w.T.copy()), "0.bias": Producer(np.zeros(2, np.float32))})
