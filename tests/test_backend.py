"""cnn_gpu.backend: choosing a backend (use_backend / set_backend / CNN_GPU_BACKEND),
the CuPy-unavailable error, and the array helpers."""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import backend, nn
from cnn_gpu.backend import cupy_available

REPO = Path(__file__).resolve().parents[1]
no_gpu_only = pytest.mark.skipif(cupy_available(), reason="checks the error raised when no GPU is usable")


def isolated(fn, *args):
    """Run fn in a copy of the current context: set_backend inside cannot leak into other tests."""
    return contextvars.copy_context().run(fn, *args)


def test_use_backend_numpy_creates_numpy_arrays():
    with cnn_gpu.use_backend("numpy") as xp:
        assert xp is np
        assert cnn_gpu.current_backend() == "numpy"
        layer = nn.Linear(3, 2, generator=0)
    assert type(layer.weight.data) is np.ndarray and type(layer.bias.data) is np.ndarray


def test_use_backend_auto():
    with cnn_gpu.use_backend("auto") as mod:
        expected = "cupy" if cupy_available() else "numpy"
        assert cnn_gpu.current_backend() == expected and mod.__name__ == expected


def test_use_backend_nests_and_restores(xp):
    def body():
        cnn_gpu.set_backend("numpy")
        with cnn_gpu.use_backend(xp.__name__):
            assert cnn_gpu.current_backend() == xp.__name__
            with cnn_gpu.use_backend("numpy"):
                assert cnn_gpu.current_backend() == "numpy"
            assert cnn_gpu.current_backend() == xp.__name__
        return cnn_gpu.current_backend()

    assert isolated(body) == "numpy"


def test_use_backend_restores_after_an_exception():
    def body():
        cnn_gpu.set_backend("numpy")
        with pytest.raises(KeyError):
            with cnn_gpu.use_backend("auto"):
                raise KeyError("boom")
        return cnn_gpu.current_backend()

    assert isolated(body) == "numpy"


def test_set_backend_is_per_context():
    def body():
        cnn_gpu.set_backend(" NumPy ")  # case and whitespace are forgiven
        return cnn_gpu.current_backend()

    assert isolated(body) == "numpy"


@pytest.mark.parametrize("name", ["tpu", "", "numpyy"])
def test_unknown_backend_raises_value_error(name):
    for fn in (cnn_gpu.set_backend, lambda n: cnn_gpu.use_backend(n).__enter__(), backend.backend_module):
        with pytest.raises(ValueError, match=rf"backend: expected one of \('numpy', 'cupy', 'auto'\), got '{name}'"):
            isolated(fn, name)


def test_backend_name_must_be_a_string():
    with pytest.raises(TypeError, match="backend: expected one of .* as a str, got int 3"):
        cnn_gpu.set_backend(3)


@no_gpu_only
def test_cupy_without_gpu_raises_backend_unavailable():
    for fn in (cnn_gpu.set_backend, lambda n: cnn_gpu.use_backend(n).__enter__()):
        with pytest.raises(cnn_gpu.BackendUnavailableError, match="backend 'cupy' was requested but cannot run: CuPy") as info:
            isolated(fn, "cupy")
        assert isinstance(info.value, RuntimeError)
        assert len(str(info.value)) > 60  # says why (not importable / no device), not just "failed"
    assert issubclass(cnn_gpu.BackendUnavailableError, RuntimeError)
    assert isolated(lambda: (cnn_gpu.set_backend("auto"), cnn_gpu.current_backend())[1]) == "numpy"


def test_get_array_module(xp):
    assert cnn_gpu.get_array_module(np.zeros(2)) is np
    assert cnn_gpu.get_array_module(np.zeros(2), 3.0, [1]) is np
    assert cnn_gpu.get_array_module() is np
    assert cnn_gpu.get_array_module(np.zeros(1), xp.zeros(1)) is xp  # any CuPy array makes it CuPy


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint8])
def test_to_numpy_and_asarray_keep_dtype(xp, dtype):
    a = xp.asarray(np.arange(6, dtype=dtype).reshape(2, 3))
    h = cnn_gpu.to_numpy(a)
    assert type(h) is np.ndarray and h.dtype == dtype
    np.testing.assert_array_equal(h, np.arange(6).reshape(2, 3))
    with cnn_gpu.use_backend(xp.__name__):
        b = cnn_gpu.asarray(h)
        assert type(b) is type(a) and b.dtype == dtype
        c = cnn_gpu.asarray(a, dtype=np.float64)
        assert c.dtype == np.float64
    with cnn_gpu.use_backend("numpy"):
        d = cnn_gpu.asarray(a)  # moved to the host
        assert type(d) is np.ndarray and d.dtype == dtype
    assert cnn_gpu.to_numpy([1.5, 2.5]).dtype == np.float64


def test_module_to_backend(xp, rng):
    model = nn.Sequential(nn.Linear(4, 3, generator=0))
    host = cnn_gpu.to_numpy(model[0].weight.data).copy()
    model.to(xp.__name__)
    assert type(model[0].weight.data) is type(xp.zeros(1)) and type(model[0].weight.grad) is type(xp.zeros(1))
    np.testing.assert_array_equal(cnn_gpu.to_numpy(model[0].weight.data), host)
    model.to("numpy")
    assert type(model[0].weight.data) is np.ndarray


def _run_child(env_value, code):
    env = {k: v for k, v in os.environ.items() if k != "CNN_GPU_BACKEND"}
    if env_value is not None:
        env["CNN_GPU_BACKEND"] = env_value
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_default_backend_in_subprocess():
    code = (
        "import cnn_gpu, numpy as np; from cnn_gpu import nn; "
        "print(cnn_gpu.current_backend(), type(nn.Linear(2, 2, generator=0).weight.data).__module__.split('.')[0])"
    )
    expected_auto = "cupy cupy" if cupy_available() else "numpy numpy"
    for value, expected in [(None, "numpy numpy"), ("", "numpy numpy"), ("numpy", "numpy numpy"), ("auto", expected_auto)]:
        out = _run_child(value, code)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == expected.split(), (value, out.stdout)


def test_env_bad_backend_in_subprocess():
    out = _run_child("tpu", "import cnn_gpu; cnn_gpu.current_backend()")
    assert out.returncode != 0
    assert "ValueError: CNN_GPU_BACKEND: expected one of ('numpy', 'cupy', 'auto'), got 'tpu'" in out.stderr
    if not cupy_available():
        out = _run_child("cupy", "import cnn_gpu; cnn_gpu.current_backend()")
        assert out.returncode != 0 and "BackendUnavailableError: backend 'cupy' was requested but cannot run" in out.stderr
