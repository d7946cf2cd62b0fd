"""cnn_gpu.config: every CNN_GPU_* variable read once, checked with messages that name it, and
overridable for a block (this thread / task only)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import config


def test_from_environment_reads_every_variable():
    env = {
        "CNN_GPU_BACKEND": "auto",
        "CNN_GPU_ENGINE": "Reference",
        "CNN_GPU_THREADS": "3",
        "CNN_GPU_WORKSPACE_MB": "16.5",
        "CNN_GPU_KERNELS_DIR": "/k",
        "CNN_GPU_DATA": "/d",
        "CNN_GPU_MIRROR": "http://m",
        "CNN_GPU_TIMEOUT_S": "30",
        "CNN_GPU_MMAP_MB": "0",
        "CNN_GPU_DEVICE_DATA": "0.25",
        "UNRELATED": "x",
    }
    cfg = config.from_environment(env)
    assert cfg == config.Config("auto", "reference", 3, 16.5, "/k", "/d", "http://m", 30.0, 0.0, 0.25)
    assert config.from_environment({"CNN_GPU_THREADS": ""}) == config.Config()  # empty: the default
    assert set(config.ENV.values()) == {k for k in env if k.startswith("CNN_GPU_")}


@pytest.mark.parametrize(
    "var,value,expected",
    [
        ("CNN_GPU_ENGINE", "gpu", "CNN_GPU_ENGINE: expected one of"),
        ("CNN_GPU_THREADS", "two", "CNN_GPU_THREADS: expected a positive int, got 'two'"),
        ("CNN_GPU_THREADS", "0", "CNN_GPU_THREADS: expected a positive int"),
        ("CNN_GPU_WORKSPACE_MB", "-1", "CNN_GPU_WORKSPACE_MB: expected a positive number of MiB"),
        ("CNN_GPU_WORKSPACE_MB", "nan", "CNN_GPU_WORKSPACE_MB: expected a positive number of MiB"),
        ("CNN_GPU_BACKEND", "tpu", "CNN_GPU_BACKEND: expected one of"),
        ("CNN_GPU_TIMEOUT_S", "0", "CNN_GPU_TIMEOUT_S: expected a positive number of seconds, got '0'"),
        ("CNN_GPU_TIMEOUT_S", "soon", "CNN_GPU_TIMEOUT_S: expected a positive number of seconds"),
        ("CNN_GPU_MMAP_MB", "-1", "CNN_GPU_MMAP_MB: expected a non-negative number of MiB, got '-1'"),
        ("CNN_GPU_DEVICE_DATA", "1.5", "CNN_GPU_DEVICE_DATA: expected a fraction in \\[0, 1\\], got '1.5'"),
    ],
)
def test_bad_variables_name_themselves(var, value, expected):
    with pytest.raises(ValueError, match=expected):
        config.from_environment({var: value})


def test_override_is_scoped_and_checked():
    before = config.get()
    with config.override(engine="reference", threads=1) as cfg:
        assert cfg.engine == "reference" and config.get().threads == 1
        with config.override(engine="cpu"):
            assert config.get().engine == "cpu" and config.get().threads == 1
        assert config.get().engine == "reference"
    assert config.get() == before
    with pytest.raises(ValueError, match="engine: expected one of"):
        with config.override(engine="tpu"):
            pass
    with pytest.raises(AttributeError, match="no setting 'speed'"):
        with config.override(speed=2):
            pass
    assert config.get() == before


def test_update_is_per_thread():
    seen = []

    def other():
        config.update(engine="reference")
        seen.append(config.get().engine)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == ["reference"] and config.get().engine == "auto"


def test_the_engine_setting_picks_the_engine(rng):
    x = rng.standard_normal((2, 1, 6, 6))
    w = rng.standard_normal((3, 1, 3, 3))
    assert cnn_gpu.functional.conv2d_forward(x, w)[1].engine == "cpu"
    with config.override(engine="reference"):
        assert cnn_gpu.functional.conv2d_forward(x, w)[1].engine == "reference"
    assert cnn_gpu.functional.conv2d_forward(np.zeros((0, 1, 6, 6)), w)[1].engine == "reference"  # an empty batch


def test_the_environment_reaches_the_library():
    code = (
        "import cnn_gpu, numpy as np; from cnn_gpu import config, functional as F; "
        "print(config.get().engine, config.get().workspace_mb, cnn_gpu.get_workspace_limit(), "
        "F.conv2d_forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)))[1].engine)"
    )
    env = {"CNN_GPU_ENGINE": "reference", "CNN_GPU_WORKSPACE_MB": "12", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "12.0", "12.0", "reference"]
