"""The CUDA kernels, run on the CPU (g++ + tests/emulation), against the reference engine.

Every test here has "emul" in its name (``pytest -k emul``). The kernels are compiled by
g++ with tests/emulation/cuda_shim.h and driven through the real launching functions of
the CUDA engine (``cnn_gpu.cuda.ops``, with ``use_launcher``), so their shapes, argument order
and scalar types are exercised too; the emulator checks every argument against the kernel's C
signature, guards every array against out-of-bounds writes, poisons outputs with NaN,
and runs every launch in forward and reverse block/thread order requiring identical bits.

References: the reference engine (``cnn_gpu.functional.reference``; the kernels follow its
operation order, so most comparisons are bitwise), plus small naive references written here
from the definitions (an independent oracle), plus PyTorch when it is installed.
tests/test_engines.py holds the CUDA engine's ops (GEMMs included) to the reference as a whole.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("cnn_gpu") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cnn_gpu  # noqa: E402
from cnn_gpu import cuda  # noqa: E402
from cnn_gpu.cuda import ops  # noqa: E402
from cnn_gpu.functional import reference as R  # noqa: E402
from cnn_gpu.functional.caches import MaxPool2dCache  # noqa: E402
from cnn_gpu.functional.geometry import conv_geometry, pool_geometry  # noqa: E402

if os.name != "posix":  # ucontext fibers
    pytest.skip("the CUDA emulation needs a POSIX system with g++", allow_module_level=True)

_spec = importlib.util.spec_from_file_location(
    "cnn_gpu_emulation_harness", Path(__file__).resolve().parent / "emulation" / "harness.py"
)
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

DTYPES = [np.float32, np.float64]
# (grid, block): None = the wrappers' default; tiny grids make every thread loop (grid-stride)
LAUNCHES = [None, (1, 32), (3, 32)]
LAUNCH_IDS = ["default", "g1b32", "g3b32"]


@pytest.fixture(scope="module")
def emul():
    """Route cnn_gpu.cuda's launches to the CPU emulator for the whole module."""
    launcher = harness.EmulationLauncher(check_order=True, grid_cap=8)
    with cuda.use_launcher(launcher):
        yield launcher


def launch_kw(launch):
    return {} if launch is None else {"grid": launch[0], "block": launch[1]}


# the engine's launching functions, with the public API's (kernel_size, stride, padding, dilation)
def k_im2col(x, k, s=1, p=0, d=1, **kw):
    return ops.im2col(x, conv_geometry(x.shape, 1, k, s, p, d), **kw)


def k_col2im(cols, x_shape, k, s=1, p=0, d=1, **kw):
    return ops.col2im(cols, conv_geometry(x_shape, 1, k, s, p, d), **kw)


def k_max_pool(x, k, s=None, p=0, **kw):
    y, cache = ops.max_pool2d_forward(x, pool_geometry(x.shape, k, s, p), **kw)
    return y, cache.argmax


def k_max_pool_backward(dy, argmax, x_shape, k, s=None, p=0, **kw):
    g = pool_geometry(x_shape, k, s, p)
    return ops.max_pool2d_backward(dy, MaxPool2dCache("cuda", g, dy.dtype, argmax, "flat"), **kw)


def k_avg_pool(x, k, s=None, p=0, **kw):
    return ops.avg_pool2d_forward(x, pool_geometry(x.shape, k, s, p), **kw)[0]


def k_avg_pool_backward(dy, x_shape, k, s=None, p=0, **kw):
    g = pool_geometry(x_shape, k, s, p)
    return ops.avg_pool2d_backward(dy, R.avg_pool2d_forward(np.zeros(x_shape, dy.dtype), g)[1], **kw)


# the reference engine with the same argument order
def r_im2col(x, k, s=1, p=0, d=1):
    return R.im2col(x, conv_geometry(x.shape, 1, k, s, p, d))


def r_col2im(cols, x_shape, k, s=1, p=0, d=1):
    return R.col2im(cols, conv_geometry(x_shape, 1, k, s, p, d))


def r_max_pool(x, k, s=None, p=0):
    return R.max_pool2d_forward(x, pool_geometry(x.shape, k, s, p))


def r_avg_pool(x, k, s=None, p=0):
    return R.avg_pool2d_forward(x, pool_geometry(x.shape, k, s, p))


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from the test's parameters (stable across runs, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def close(a, b, dtype, what=""):
    """float64: 1e-12 relative; float32: rtol 1e-5, atol 1e-6 (scaled by the data)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    if np.dtype(dtype) == np.float64:
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * scale, err_msg=what)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, err_msg=what)


def exact(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    np.testing.assert_array_equal(a, b, err_msg=what)


# ----------------------------------------------------------------- geometry cases
# conv: (N, C, H, W, kernel, stride, padding, dilation)
CONV_CASES = [
    (2, 3, 7, 6, (3, 2), (2, 1), (1, 0), (1, 2)),
    (1, 1, 5, 5, 1, 1, 0, 1),
    (2, 2, 9, 11, 3, 3, 2, 2),
    (3, 2, 8, 8, (2, 3), (1, 3), (0, 2), (2, 1)),
    (1, 3, 6, 13, (5, 1), (2, 2), (2, 0), (1, 1)),
    (2, 1, 10, 7, (3, 3), (3, 2), (1, 1), (2, 2)),
    (1, 2, 4, 4, 4, 1, 0, 1),
    (1, 1, 3, 3, 3, 2, 2, 1),
    (2, 4, 12, 12, 3, 1, 1, 1),
    (1, 1, 1, 1, 1, 1, 0, 1),
    (1, 2, 5, 9, (2, 2), (3, 3), (1, 2), (2, 2)),
    (2, 1, 16, 3, (4, 3), (2, 1), (0, 1), (3, 1)),
]


def _random_conv_cases(n, seed=2024):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        N, C = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        H, W = int(rng.integers(1, 14)), int(rng.integers(1, 14))
        k = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        p = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        d = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        if H + 2 * p[0] < d[0] * (k[0] - 1) + 1 or W + 2 * p[1] < d[1] * (k[1] - 1) + 1:
            continue
        out.append((N, C, H, W, k, s, p, d))
    return out


CONV_CASES += _random_conv_cases(12)

# pooling: (N, C, H, W, kernel, stride, padding) with 2*padding <= kernel
POOL_CASES = [
    (2, 3, 8, 8, 2, 2, 0),
    (1, 2, 7, 9, 3, 2, 1),
    (2, 1, 5, 6, (3, 2), (1, 2), (1, 1)),
    (1, 3, 10, 7, 3, 1, 1),
    (2, 2, 9, 9, (2, 4), (3, 1), (1, 2)),
    (1, 1, 4, 4, 4, 4, 2),
    (1, 1, 1, 1, 1, 1, 0),
    (3, 2, 6, 5, (1, 3), (1, 3), (0, 1)),
    (1, 2, 11, 13, 5, 3, 2),
    (2, 2, 6, 6, 3, 3, 0),
]


def _random_pool_cases(n, seed=77):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        N, C = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        H, W = int(rng.integers(1, 13)), int(rng.integers(1, 13))
        k = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        p = (int(rng.integers(0, k[0] // 2 + 1)), int(rng.integers(0, k[1] // 2 + 1)))
        if k[0] > H + 2 * p[0] or k[1] > W + 2 * p[1]:
            continue
        out.append((N, C, H, W, k, s, p))
    return out


POOL_CASES += _random_pool_cases(10)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_out(H, W, k, s, p, d):
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = map(_pair, (k, s, p, d))
    return (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1, (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1


def pool_out(H, W, k, s, p):
    (KH, KW), (SH, SW), (PH, PW) = map(_pair, (k, s, p))
    return (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1


# ----------------------------------------------------------------- naive references
def naive_im2col(x, k, s, p, d):
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = map(_pair, (k, s, p, d))
    OH, OW = conv_out(H, W, k, s, p, d)
    cols = np.zeros((N, C, KH, KW, OH, OW), dtype=x.dtype)
    for kh in range(KH):
        for kw in range(KW):
            for oh in range(OH):
                h = oh * SH - PH + kh * DH
                if not 0 <= h < H:
                    continue
                for ow in range(OW):
                    w = ow * SW - PW + kw * DW
                    if 0 <= w < W:
                        cols[:, :, kh, kw, oh, ow] = x[:, :, h, w]
    return cols.reshape(N, C * KH * KW, OH * OW)


def naive_col2im(cols, x_shape, k, s, p, d):
    N, C, H, W = x_shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = map(_pair, (k, s, p, d))
    OH, OW = conv_out(H, W, k, s, p, d)
    c6 = cols.reshape(N, C, KH, KW, OH, OW)
    dx = np.zeros(x_shape, dtype=cols.dtype)
    for kh in range(KH):
        for kw in range(KW):
            for oh in range(OH):
                h = oh * SH - PH + kh * DH
                if not 0 <= h < H:
                    continue
                for ow in range(OW):
                    w = ow * SW - PW + kw * DW
                    if 0 <= w < W:
                        dx[:, :, h, w] += c6[:, :, kh, kw, oh, ow]
    return dx


def naive_max_pool(x, k, s, p):
    """y and argmax by scanning each window's real taps row-major; NaN wins, first max wins."""
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW) = map(_pair, (k, s, p))
    OH, OW = pool_out(H, W, k, s, p)
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    arg = np.empty((N, C, OH, OW), dtype=np.int32)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    best, bi = None, None
                    for kh in range(KH):
                        for kw in range(KW):
                            h, w = oh * SH - PH + kh, ow * SW - PW + kw
                            if 0 <= h < H and 0 <= w < W:
                                v = x[n, c, h, w]
                                if best is None or (not math.isnan(best) and (math.isnan(v) or v > best)):
                                    best, bi = v, h * W + w
                    y[n, c, oh, ow], arg[n, c, oh, ow] = best, bi
    return y, arg


def naive_avg_pool(x, k, s, p):
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW) = map(_pair, (k, s, p))
    xp = np.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=np.float64)
    xp[:, :, PH : PH + H, PW : PW + W] = x
    OH, OW = pool_out(H, W, k, s, p)
    y = np.empty((N, C, OH, OW))
    for oh in range(OH):
        for ow in range(OW):
            y[:, :, oh, ow] = xp[:, :, oh * SH : oh * SH + KH, ow * SW : ow * SW + KW].sum(axis=(2, 3)) / (KH * KW)
    return y


# =================================================================== im2col / col2im
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_emul_im2col(emul, case, dtype, launch):
    N, C, H, W, k, s, p, d = case
    x = rng_for("im2col", case).standard_normal((N, C, H, W)).astype(dtype)
    cols = k_im2col(x, k, s, p, d, **launch_kw(launch))
    assert cols.dtype == dtype and cols.flags.c_contiguous
    exact(cols, r_im2col(x, k, s, p, d), "vs cnn_gpu.functional.im2col")
    exact(cols, naive_im2col(x, k, s, p, d), "vs naive im2col")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_emul_col2im(emul, case, dtype, launch):
    N, C, H, W, k, s, p, d = case
    KH, KW = _pair(k)
    OH, OW = conv_out(H, W, k, s, p, d)
    cols = rng_for("col2im", case).standard_normal((N, C * KH * KW, OH * OW)).astype(dtype)
    dx = k_col2im(cols, (N, C, H, W), k, s, p, d, **launch_kw(launch))
    assert dx.shape == (N, C, H, W) and dx.dtype == dtype
    # same summation order (kh, then kw, from zero) as the NumPy scatter: bitwise equal
    exact(dx, r_col2im(cols, (N, C, H, W), k, s, p, d), "vs cnn_gpu.functional.col2im")
    close(dx, naive_col2im(cols, (N, C, H, W), k, s, p, d), dtype, "vs naive col2im")


@pytest.mark.parametrize("case", CONV_CASES)
def test_emul_col2im_is_adjoint_of_im2col(emul, case):
    """<im2col(x), c> == <x, col2im(c)> -- an oracle independent of any reference code."""
    N, C, H, W, k, s, p, d = case
    rng = rng_for("adjoint", case)
    x = rng.standard_normal((N, C, H, W))
    cols = k_im2col(x, k, s, p, d)
    c = rng.standard_normal(cols.shape)
    lhs = float(np.sum(cols * c))
    rhs = float(np.sum(x * k_col2im(c, x.shape, k, s, p, d)))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("case", CONV_CASES[:12])
def test_emul_im2col_col2im_torch_oracle(emul, case):
    torch = pytest.importorskip("torch")
    N, C, H, W, k, s, p, d = case
    x = rng_for("torch-unfold", case).standard_normal((N, C, H, W))
    ref = torch.nn.functional.unfold(torch.from_numpy(x), k, dilation=d, padding=p, stride=s).numpy()
    exact(k_im2col(x, k, s, p, d), ref, "vs torch unfold")
    cols = rng_for("torch-fold", case).standard_normal(ref.shape)
    ref_dx = torch.nn.functional.fold(torch.from_numpy(cols), (H, W), k, dilation=d, padding=p, stride=s).numpy()
    close(k_col2im(cols, x.shape, k, s, p, d), ref_dx, np.float64, "vs torch fold")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_emul_channel_major_im2col_col2im(emul, case, dtype, launch):
    """im2col_cm / col2im_cm: x (N, C, H, W), cols (C*KH*KW, N*OH*OW) == the NCHW columns transposed."""
    N, C, H, W, k, s, p, d = case
    KH, KW = _pair(k)
    OH, OW = conv_out(H, W, k, s, p, d)
    R_, P = C * KH * KW, OH * OW
    rng = rng_for("cm", case)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    cols = k_im2col(x, k, s, p, d, cm=True, **launch_kw(launch))
    exact(cols, r_im2col(x, k, s, p, d).transpose(1, 0, 2).reshape(R_, N * P), "im2col_cm")
    dcols = rng.standard_normal((R_, N * P)).astype(dtype)
    dx = k_col2im(dcols, x.shape, k, s, p, d, cm=True, **launch_kw(launch))
    ref_dx = r_col2im(np.ascontiguousarray(dcols.reshape(R_, N, P).transpose(1, 0, 2)), (N, C, H, W), k, s, p, d)
    exact(dx, ref_dx, "col2im_cm")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_emul_im2col_out(emul, dtype):
    rng = rng_for("out", dtype)
    x = rng.standard_normal((2, 3, 8, 7)).astype(dtype)
    out = np.empty((2, 27, 56), dtype)
    assert k_im2col(x, 3, 1, 1, out=out) is out
    exact(out, r_im2col(x, 3, 1, 1))
    with pytest.raises(ValueError, match="out: expected shape"):
        k_im2col(x, 3, 1, 1, out=np.empty((2, 27, 55), dtype))
    with pytest.raises(TypeError, match="out: expected dtype"):
        k_im2col(x, 3, 1, 1, out=np.empty((2, 27, 56), np.float16))
    with pytest.raises(ValueError, match="out: the CUDA engine writes C-contiguous arrays in place"):
        k_im2col(x, 3, 1, 1, out=np.empty((2, 56, 27), dtype).transpose(0, 2, 1))


def test_emul_im2col_noncontiguous_input(emul):
    """A user's strided view is made contiguous for the kernel (the GPU budget counts such copies:
    the engine's own arrays never need one)."""
    x = rng_for("nc").standard_normal((5, 3, 9, 8))[:, ::2, :, ::-1]  # a strided view
    exact(k_im2col(x, 3, 2, 1, 1), r_im2col(np.ascontiguousarray(x), 3, 2, 1, 1))


# ============================================================================ pooling
def _pool_input(kind, shape, dtype, rng):
    if kind == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "ties":  # few distinct values: many tied maxima, first one must win
        return rng.integers(-2, 2, size=shape).astype(dtype)
    if kind == "nan":
        x = rng.integers(-3, 3, size=shape).astype(dtype)
        x[rng.random(shape) < 0.15] = np.nan
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "ties", "nan"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_emul_max_pool2d_forward(emul, case, dtype, launch, kind):
    N, C, H, W, k, s, p = case
    x = _pool_input(kind, (N, C, H, W), dtype, rng_for("maxpool", case, kind))
    y, arg = k_max_pool(x, k, s, p, **launch_kw(launch))
    assert y.dtype == dtype and arg.dtype == np.int32
    ref_y, cache = r_max_pool(x, k, s, p)
    exact(y, ref_y, "y vs cnn_gpu.functional")  # assert_array_equal treats NaN == NaN
    exact(arg, cache.argmax, "argmax vs cnn_gpu.functional")
    ny, narg = naive_max_pool(x, k, s, p)
    exact(y, ny, "y vs naive")
    exact(arg, narg, "argmax vs naive")


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_emul_max_pool2d_backward(emul, case, dtype, launch, kind):
    N, C, H, W, k, s, p = case
    rng = rng_for("maxpool-bwd", case, kind)
    x = _pool_input(kind, (N, C, H, W), dtype, rng)
    ref_y, cache = r_max_pool(x, k, s, p)
    dy = rng.standard_normal(ref_y.shape).astype(dtype)
    dx = k_max_pool_backward(dy, cache.argmax, x.shape, k, s, p, **launch_kw(launch))
    # ascending (oh, ow) accumulation in double, like numpy.bincount: bitwise equal
    exact(dx, R.max_pool2d_backward(dy, cache), "vs cnn_gpu.functional")
    naive = np.zeros(N * C * H * W)
    flat = (np.arange(N * C)[:, None] * H * W + cache.argmax.reshape(N * C, -1)).ravel()
    np.add.at(naive, flat, dy.astype(np.float64).ravel())
    close(dx, naive.reshape(x.shape), dtype, "vs naive scatter")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_emul_avg_pool2d_forward(emul, case, dtype, launch):
    N, C, H, W, k, s, p = case
    x = rng_for("avgpool", case).standard_normal((N, C, H, W)).astype(dtype)
    y = k_avg_pool(x, k, s, p, **launch_kw(launch))
    ref, _ = r_avg_pool(x, k, s, p)
    exact(y, ref, "vs cnn_gpu.functional (same operation order)")
    close(y, naive_avg_pool(x, k, s, p), dtype, "vs naive")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_emul_avg_pool2d_backward(emul, case, dtype, launch):
    N, C, H, W, k, s, p = case
    rng = rng_for("avgpool-bwd", case)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    ref_y, cache = r_avg_pool(x, k, s, p)
    dy = rng.standard_normal(ref_y.shape).astype(dtype)
    dx = k_avg_pool_backward(dy, x.shape, k, s, p, **launch_kw(launch))
    exact(dx, R.avg_pool2d_backward(dy, cache), "vs cnn_gpu.functional (same operation order)")
    # adjoint of the forward: <avg(x), dy> == <x, avg_backward(dy)>
    lhs = float(np.sum(naive_avg_pool(x.astype(np.float64), k, s, p) * dy))
    rhs = float(np.sum(x.astype(np.float64) * dx.astype(np.float64)))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert abs(lhs - rhs) <= tol * max(1.0, float(np.sum(np.abs(dy))))


@pytest.mark.parametrize("case", POOL_CASES)
def test_emul_pool_torch_oracle(emul, case):
    torch = pytest.importorskip("torch")
    N, C, H, W, k, s, p = case
    x = rng_for("torch-pool", case).standard_normal((N, C, H, W))
    tx = torch.from_numpy(x)
    ty, tidx = torch.nn.functional.max_pool2d(tx, k, s, p, return_indices=True)
    y, arg = k_max_pool(x, k, s, p)
    exact(y, ty.numpy(), "max y vs torch")
    exact(arg, tidx.numpy().astype(np.int32), "argmax vs torch")
    ta = torch.nn.functional.avg_pool2d(tx, k, s, p, count_include_pad=True)
    close(k_avg_pool(x, k, s, p), ta.numpy(), np.float64, "avg vs torch")


ADAPTIVE_CASES = [
    ((2, 3, 8, 8), (1, 1)),
    ((2, 3, 7, 5), (3, 2)),
    ((1, 2, 5, 7), (3, 4)),
    ((1, 2, 3, 3), (4, 5)),
    ((3, 1, 9, 6), (9, 6)),
]


def naive_adaptive_pool(x, out):
    """Loops over every output cell and input position, from torch's window rule."""
    N, C, H, W = x.shape
    OH, OW = out
    y = np.zeros((N, C, OH, OW))
    for i in range(OH):
        for j in range(OW):
            h0, h1, w0, w1 = (i * H) // OH, -(-((i + 1) * H) // OH), (j * W) // OW, -(-((j + 1) * W) // OW)
            for n in range(N):
                for c in range(C):
                    y[n, c, i, j] = sum(float(x[n, c, h, w]) for h in range(h0, h1) for w in range(w0, w1)) / (
                        (h1 - h0) * (w1 - w0)
                    )
    return y


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=lambda c: f"{c[0]}->{c[1]}")
def test_emul_adaptive_avg_pool2d(emul, case, dtype, launch):
    """Forward: the naive loops and the reference (to rounding: the reference's mean sums in its
    own order); backward: the reference's bits (the same products, added in its order), and the
    adjoint of the forward (sum(dy * y(x)) = sum(dx * x))."""
    shape, out = case
    rng = rng_for("adaptive", case, dtype)
    x = rng.standard_normal(shape).astype(dtype)
    y, cache = ops.adaptive_avg_pool2d_forward(x, out, **launch_kw(launch))
    y_ref, cache_ref = R.adaptive_avg_pool2d_forward(x, out)
    close(y, y_ref, dtype, "y")
    close(y, naive_adaptive_pool(x, out), dtype, "y (naive)")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = ops.adaptive_avg_pool2d_backward(dy, cache, **launch_kw(launch))
    exact(dx, R.adaptive_avg_pool2d_backward(dy, cache_ref), "dx")
    lhs, rhs = (
        float((dy.astype(np.float64) * naive_adaptive_pool(x.astype(np.float64), out)).sum()),
        float((dx.astype(np.float64) * x).sum()),
    )
    close(lhs, rhs, dtype, "adjoint")


def test_emul_max_pool_stride_defaults_to_kernel(emul):
    x = rng_for("stride-default").standard_normal((2, 2, 6, 6))
    y, arg = k_max_pool(x, 2)
    ref, cache = r_max_pool(x, 2)
    exact(y, ref)
    exact(arg, cache.argmax)


# ========================================================================= epilogues
# (N, F, P): P = 1 is a fully connected layer's output, P > 1 a convolution's
EPI_SHAPES = [(1, 1, 1), (4, 7, 1), (2, 3, 25), (3, 16, 63), (5, 2, 1), (2, 33, 3), (64, 10, 1)]


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cm,relu,bias", [(0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0), (1, 0, 0)])
@pytest.mark.parametrize("shape", EPI_SHAPES)
def test_emul_bias_act_forward(emul, shape, cm, relu, bias, dtype, launch):
    N, F_, P = shape
    rng = rng_for("bias-act", shape, cm)
    z = rng.standard_normal((N, F_, P)).astype(dtype)  # what the GEMM computed, NCHW-ordered
    if z.size >= 4:
        z.flat[::4] = np.nan  # NaN propagates, like np.maximum
    b = rng.standard_normal(F_).astype(dtype) if bias else None
    ref = z + b[:, None] if bias else z.copy()
    if relu:
        ref = np.maximum(ref, 0)
    src = np.ascontiguousarray(z.transpose(1, 0, 2)).reshape(F_, N * P) if cm else z.copy()
    y = src if not cm else np.empty((N, F_, P), dtype)  # in place without cm
    assert ops.bias_act_forward(src, y, b, N, F_, P, cm=cm, relu=relu, **launch_kw(launch)) is y
    exact(y, ref, "bias_act_forward")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cm,relu,bias", [(0, 1, 1), (0, 1, 0), (0, 0, 1), (0, 0, 0), (1, 1, 1), (1, 0, 1), (1, 1, 0), (1, 0, 0)])
@pytest.mark.parametrize("shape", EPI_SHAPES)
def test_emul_act_backward_bias_grad(emul, shape, cm, relu, bias, dtype, launch):
    N, F_, P = shape
    rng = rng_for("act-bwd", shape, cm)
    y, _ = R.relu_forward(rng.standard_normal((N, F_, P)).astype(dtype))
    dy = rng.standard_normal((N, F_, P)).astype(dtype)
    if dy.size >= 6:
        dy.flat[::6] = np.nan  # a NaN in dy stays NaN, as in the reference's product
    delta = R.relu_backward(dy, y) if relu else dy
    dst = np.empty((F_, N * P) if cm else (N, F_, P), dtype)
    db = ops.act_backward_bias_grad(dy, y, dst, N, F_, P, cm=cm, relu=relu, bias=bias, **launch_kw(launch))
    want = np.ascontiguousarray(delta.transpose(1, 0, 2)).reshape(F_, N * P) if cm else delta
    exact(dst, want, "delta")
    if bias:
        close(db, delta.astype(np.float64).sum(axis=(0, 2)), dtype, "db")
    else:
        assert db is None


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("cm", [0, 1])
def test_emul_bias_grad_into_a_given_array(emul, cm, launch):
    """db= writes the sums into that array; with accumulate they are added to what it holds."""
    N, F_, P = 3, 5, 7
    rng = rng_for("act-bwd-acc", cm)
    dy = rng.standard_normal((N, F_, P))
    dst = np.empty((F_, N * P) if cm else (N, F_, P))
    db0 = rng.standard_normal(F_)
    for accumulate in (False, True):
        db = db0.copy()
        out = ops.act_backward_bias_grad(
            dy, None, dst, N, F_, P, cm=cm, relu=False, bias=True, db=db, accumulate=accumulate, **launch_kw(launch)
        )
        assert out is db
        close(db, dy.sum(axis=(0, 2)) + (db0 if accumulate else 0), np.float64, f"db, accumulate={accumulate}")
    with pytest.raises(ValueError, match="db: a bias gradient needs bias=True"):
        ops.act_backward_bias_grad(dy, None, dst, N, F_, P, cm=cm, relu=False, bias=False, db=db0.copy())


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (2, 3, 17, 5)])
def test_emul_add_act_forward_and_relu_backward(emul, shape, dtype, launch):
    """The residual sum (+ ReLU) and the ReLU's backward, one launch each: the reference's bits;
    NaN propagates (max(NaN, 0) = NaN, NaN * 0 = NaN as in the reference's product)."""
    rng = rng_for("add-act", shape, dtype)
    a, b, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    if a.size >= 4:
        a.flat[::4] = np.nan
        dy.flat[1::4] = np.nan
    for act in (None, "relu"):
        y, cache = ops.add_forward(a, b, act, **launch_kw(launch))
        y_ref, cache_ref = R.add_forward(a, b, act)
        exact(y, y_ref, f"y ({act})")
        exact(ops.add_backward(dy, cache, **launch_kw(launch)), R.add_backward(dy, cache_ref), f"delta ({act})")
    y, _ = R.relu_forward(a)
    exact(ops.relu_backward(dy, y, **launch_kw(launch)), R.relu_backward(dy, y), "relu_backward")


def test_emul_bias_grad_is_deterministic_per_launch_config(emul):
    dy = rng_for("det").standard_normal((64, 8, 100)).astype(np.float32)
    dst = np.empty((8, 6400), np.float32)
    a = ops.act_backward_bias_grad(dy, None, dst, 64, 8, 100, cm=True, relu=False, bias=True)
    b = ops.act_backward_bias_grad(dy, None, dst, 64, 8, 100, cm=True, relu=False, bias=True)
    exact(a, b, "same launch configuration: identical bits")


def same_bits(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{what}: different bits"


def launched(emul, start):
    """The kernels launched since emul.log[start], without their _f32/_f64 suffix."""
    return [k.rsplit("_f", 1)[0] for k, _, _ in emul.log[start:]]


# (N, F, P): N*P = 21 values per filter (segments of 11, 7, 6, 3 and empty ones), P = 7 crossed by a
# block of 4 threads in steps of (0, 4) and (1, 1); a fully connected layer's P = 1
SEG_SHAPES = [(3, 5, 7), (13, 3, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cm,relu", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("segments", [1, 2, 3, 4, 7, 25])
@pytest.mark.parametrize("shape", SEG_SHAPES)
def test_emul_bias_grad_segments(emul, shape, segments, cm, relu, dtype):
    """db over S segments of each filter's N*P values (S > 1: a second launch adds the S sums):
    the reference's sums, set or added (accumulate); delta exact; for a given S the same bits
    whatever the grid, and with S = 1 a single launch."""
    N, F_, P = shape
    rng = rng_for("bias-seg", shape, segments, cm, relu, dtype)
    y, _ = R.relu_forward(rng.standard_normal((N, F_, P)).astype(dtype))
    dy = rng.standard_normal((N, F_, P)).astype(dtype)
    delta = R.relu_backward(dy, y) if relu else dy
    want_dst = np.ascontiguousarray(delta.transpose(1, 0, 2)).reshape(F_, N * P) if cm else delta
    db0 = rng.standard_normal(F_).astype(dtype)
    for accumulate in (False, True):
        results = []
        for grid, block in ((1, 4), (3, 4), (None, 4), (2, 32)):
            dst, db = np.empty(want_dst.shape, dtype), db0.copy()
            start = len(emul.log)
            out = ops.act_backward_bias_grad(
                dy,
                y if relu else None,
                dst,
                N,
                F_,
                P,
                cm=cm,
                relu=relu,
                bias=True,
                db=db,
                accumulate=accumulate,
                grid=grid,
                block=block,
                segments=segments,
            )
            assert out is db
            assert launched(emul, start) == ["act_backward_bias_grad"] + (["sum_segments"] if segments > 1 else [])
            exact(dst, want_dst, "delta")
            close(db, delta.astype(np.float64).sum(axis=(0, 2)) + (db0 if accumulate else 0), dtype, "db")
            results.append((block, db))
        for (block_a, a), (block_b, b) in zip(results, results[1:]):
            if block_a == block_b:
                same_bits(a, b, f"db, S={segments}, accumulate={accumulate}: another grid")


@pytest.mark.parametrize("cm,relu", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_emul_delta_without_bias_is_one_elementwise_launch(emul, cm, relu):
    """Without a bias: delta alone, one thread per element (the launch covers every element, not a
    block per filter), segments not used."""
    N, F_, P = 3, 5, 7
    rng = rng_for("delta-only", cm, relu)
    y, _ = R.relu_forward(rng.standard_normal((N, F_, P)))
    dy = rng.standard_normal((N, F_, P))
    want = R.relu_backward(dy, y) if relu else dy
    want = np.ascontiguousarray(want.transpose(1, 0, 2)).reshape(F_, N * P) if cm else want
    for grid, block in ((None, None), (1, 32), (2, 8)):
        dst = np.empty(want.shape)
        start = len(emul.log)
        assert (
            ops.act_backward_bias_grad(dy, y, dst, N, F_, P, cm=cm, relu=relu, bias=False, grid=grid, block=block, segments=3)
            is None
        )
        ((kernel, g, b),) = emul.log[start:]
        assert kernel.startswith("act_backward_bias_grad") and (grid, block) in ((None, None), (g, b))
        if grid is None:
            assert (g, b) == (min(math.ceil(dy.size / 256), emul.max_grid()), 256)
        exact(dst, want, "delta")


def test_emul_bias_grad_checks_its_arguments(emul):
    dy = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"dst: expected N\*F\*P = 2\*3\*4 = 24 float64 values, got 20 float64"):
        ops.act_backward_bias_grad(dy, None, np.zeros((4, 5)), 2, 3, 4, cm=True, relu=False, bias=True)
    with pytest.raises(ValueError, match="y: expected .* got None"):
        ops.act_backward_bias_grad(dy, None, np.zeros((3, 8)), 2, 3, 4, cm=True, relu=True, bias=True)
    with pytest.raises(ValueError, match="dst: expected .* float64 values, got 24 float32"):
        ops.act_backward_bias_grad(dy, None, np.zeros((3, 8), np.float32), 2, 3, 4, cm=True, relu=False, bias=False)
    with pytest.raises(ValueError, match="segments: expected at least 1, got 0"):
        ops.act_backward_bias_grad(dy, None, np.zeros((3, 8)), 2, 3, 4, cm=True, relu=False, bias=True, segments=0)


def test_segment_counts_depend_on_the_shape_only():
    """A batch of 128 32x32 maps: 32 segments of 4096 values for 16, 32 or 64 filters (512, 1024, 2048
    blocks); at most 2048 blocks; small sums keep one block (one launch) per row."""
    assert [ops._segments(F_, 128 * 32 * 32) for F_ in (6, 16, 32, 64, 128)] == [32, 32, 32, 32, 16]
    assert ops._segments(6, 128 * 28 * 28) == 25 and ops._segments(16, 128 * 10 * 10) == 4  # lenet5
    assert ops._segments(10, 128) == 1 and ops._segments(4096, 10**6) == 1 and ops._segments(0, 0) == 1
    assert ops._segments(32 * 9, 128 * 32 * 32) == 7 and ops._segments(128 * 9, 128 * 8 * 8) == 1  # depthwise 3x3


# (x shape, filters per channel M, kernel, stride, padding, dilation): N*OH*OW = 2*5*4 = 40 and 1*3*3 = 9
DW_SEG_CASES = [((2, 3, 5, 4), 1, 3, 1, 1, 1), ((1, 2, 6, 5), 2, (3, 2), (2, 2), (1, 0), (1, 2))]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("relu,bias", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("segments", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("case", DW_SEG_CASES, ids=["3x3", "3x2-strided"])
def test_emul_depthwise_weight_grad_segments(emul, case, segments, relu, bias, dtype):
    """Depthwise dw (and db) over S segments of each weight's N*OH*OW terms: the reference's, set or
    added (accumulate_into), the same bits whatever the grid for a given S; S = 1: one launch for dw."""
    xs, M, k, s, p, d = case
    rng = rng_for("dw-seg", case, segments, relu, bias, dtype)
    x = rng.standard_normal(xs).astype(dtype)
    g = conv_geometry(xs, xs[1] * M, k, s, p, d, xs[1])
    w = rng.standard_normal((g.F, 1, g.KH, g.KW)).astype(dtype)
    b = rng.standard_normal(g.F).astype(dtype) if bias else None
    act = "relu" if relu else None
    y, cache_ref = R.conv2d_forward(x, w, b, g, act)
    dy = rng.standard_normal(y.shape).astype(dtype)
    _, dw_ref, db_ref = R.conv2d_backward(dy, cache_ref, input_grad=False)
    cache = cache_ref._replace(engine="cuda", aux=None)
    w0, b0 = rng.standard_normal(w.shape).astype(dtype), rng.standard_normal(g.F).astype(dtype)
    for accumulate in (False, True):
        runs = []
        for grid, block in ((1, 4), (3, 4), (None, 4)):
            acc = (w0.copy(), b0.copy() if bias else None) if accumulate else None
            start = len(emul.log)
            _, dw, db = ops.depthwise_conv2d_backward(
                dy, cache, False, accumulate_into=acc, grid=grid, block=block, segments=segments
            )
            assert launched(emul, start).count("sum_segments") == (segments > 1) * (1 + bias)
            close(dw, dw_ref + (w0 if accumulate else 0), dtype, "dw")
            if bias:
                close(db, db_ref + (b0 if accumulate else 0), dtype, "db")
            else:
                assert db is None
            runs.append((dw, db))
        for (dw_a, db_a), (dw_b, db_b) in zip(runs, runs[1:]):
            same_bits(dw_a, dw_b, f"dw, S={segments}: another grid")
            if bias:
                same_bits(db_a, db_b, f"db, S={segments}: another grid")


# ============================================================================== loss
SCE_CASES = [(1, 1), (1, 10), (4, 10), (7, 3), (33, 100), (5, 1000), (64, 10), (3, 257)]


@pytest.mark.parametrize("launch", LAUNCHES + [(2, 64)], ids=LAUNCH_IDS + ["g2b64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", SCE_CASES)
def test_emul_softmax_cross_entropy(emul, case, dtype, launch):
    N, K = case
    rng = rng_for("sce", case)
    logits = (3 * rng.standard_normal((N, K))).astype(dtype)
    labels = rng.integers(0, K, size=N)  # int64: the wrapper converts
    loss, dlogits = ops.softmax_cross_entropy(logits, labels, **launch_kw(launch))
    assert loss.shape == () and loss.dtype == dtype and dlogits.dtype == dtype
    ref_loss, ref_d = R.softmax_cross_entropy(logits, labels)
    close(loss, ref_loss, dtype, "loss vs cnn_gpu.functional")
    close(dlogits, ref_d, dtype, "dlogits vs cnn_gpu.functional")
    # naive float64 reference from the definition
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    naive_loss = -np.mean(np.log(p[np.arange(N), labels]))
    onehot = np.eye(K)[labels]
    close(loss, naive_loss, dtype, "loss vs naive")
    close(dlogits, (p - onehot) / N, dtype, "dlogits vs naive")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
def test_emul_softmax_cross_entropy_sets_the_label_flag_on_the_device(emul, launch):
    """A label outside [0, K) sets label_check to 1 in the loss kernel itself (and NaNs its row);
    in-range labels leave it as it was: the flag is sticky until the host resets it."""
    rng = rng_for("sce-flag")
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    good = rng.integers(0, 5, size=6)
    flag = np.zeros((), np.int64)
    _, d = ops.softmax_cross_entropy(logits, good, label_check=flag, **launch_kw(launch))
    assert int(flag) == 0 and np.all(np.isfinite(d))
    for bad_label in (5, -1, 2**40):
        flag[...] = 0
        bad = good.copy()
        bad[3] = bad_label
        loss, d = ops.softmax_cross_entropy(logits, bad, label_check=flag, **launch_kw(launch))
        assert int(flag) == 1 and np.isnan(loss) and np.isnan(d[3]).all()
        close(np.delete(d, 3, axis=0), np.delete(R.softmax_cross_entropy(logits, good)[1], 3, axis=0), np.float32)
        ops.softmax_cross_entropy(logits, good, label_check=flag, **launch_kw(launch))
        assert int(flag) == 1  # sticky


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_emul_softmax_cross_entropy_large_logits(emul, dtype):
    rng = rng_for("sce-large")
    logits = (1e4 * rng.standard_normal((16, 12))).astype(dtype)
    logits[0] = 1e4  # all tied
    labels = rng.integers(0, 12, size=16).astype(np.int32)
    loss, d = ops.softmax_cross_entropy(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    ref_loss, ref_d = R.softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6 if dtype == np.float32 else 1e-12)
    close(d, ref_d, dtype)
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-6)


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("case", [(1, 1), (4, 10), (33, 100), (3, 257)])
def test_emul_softmax_cross_entropy_label_smoothing(emul, case, eps, dtype, launch):
    N, K = case
    rng = rng_for("sce-smooth", case)
    logits = (3 * rng.standard_normal((N, K))).astype(dtype)
    labels = rng.integers(0, K, size=N)
    loss, dlogits, per = ops.softmax_cross_entropy(logits, labels, eps, return_per_sample=True, **launch_kw(launch))
    assert loss.dtype == dtype and dlogits.dtype == dtype
    ref_loss, ref_d = R.softmax_cross_entropy(logits, labels, eps)
    close(loss, ref_loss, dtype, "loss vs cnn_gpu.functional")
    close(dlogits, ref_d, dtype, "dlogits vs cnn_gpu.functional")
    # naive float64 reference, one sample and one class at a time: t = (1 - eps) onehot + eps / K
    z = logits.astype(np.float64)
    for n in range(N):
        lse = math.log(sum(math.exp(v) for v in z[n]))
        t = [(1 - eps) * (k == labels[n]) + eps / K for k in range(K)]
        close(per[n], -sum(t[k] * (z[n, k] - lse) for k in range(K)), dtype, "per-sample loss vs naive")
        close(dlogits[n], (np.exp(z[n] - lse) - np.array(t)) / N, dtype, "dlogits vs naive")


def test_emul_softmax_cross_entropy_per_sample_and_bad_label(emul):
    logits = rng_for("sce-bad").standard_normal((4, 5))
    labels = np.array([0, 4, 5, -1], dtype=np.int32)  # the last two are out of range
    loss, d, per = ops.softmax_cross_entropy(logits, labels, return_per_sample=True)
    assert np.isnan(loss)
    assert np.all(np.isfinite(per[:2])) and np.all(np.isnan(per[2:]))
    assert np.all(np.isfinite(d[:2])) and np.all(np.isnan(d[2:]))
    ref, _ = R.softmax_cross_entropy(logits[:2], labels[:2])
    close(per[:2].mean(), ref, np.float64)
    # int64 labels reach the kernel whole: 2**32 + 1 is out of range, not label 1 after a wrap-around
    wide = np.array([0, 2**32 + 1, 4, 1], dtype=np.int64)
    _, d, per = ops.softmax_cross_entropy(logits, wide, return_per_sample=True)
    assert np.isnan(per[1]) and np.all(np.isnan(d[1])) and np.isfinite(per[[0, 2, 3]]).all()


# ======================================================================== optimizers
OPT_SIZES = [1, 37, 1000]


def _opt_state(n, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(3)]


def naive_sgd(p, g, buf, lr, mu, wd, nesterov, first):
    t = p.dtype.type
    d = g + t(wd) * p if wd != 0 else g
    if mu != 0:
        buf = d.copy() if first else t(mu) * buf + d
        d = d + t(mu) * buf if nesterov else buf
    return p - t(lr) * d, buf


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", OPT_SIZES)
@pytest.mark.parametrize("mu,wd,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, True), (0.5, 1e-3, False)])
def test_emul_sgd_update(emul, n, dtype, launch, mu, wd, nesterov):
    p, g, _ = _opt_state(n, dtype, n)
    buf = np.zeros(n, dtype) if mu != 0 else None
    ref_p, ref_buf = p.copy(), None if buf is None else buf.copy()
    for step in range(3):
        g = np.random.default_rng(step).standard_normal(n).astype(dtype)
        ops.sgd_update_(p, g, buf, 0.1, mu, wd, nesterov, step == 0, **launch_kw(launch))
        ref_p, ref_buf = naive_sgd(ref_p, g, ref_buf, 0.1, mu, wd, nesterov, step == 0)
        exact(p, ref_p, f"p after step {step}")
        if buf is not None:
            exact(buf, ref_buf, f"buf after step {step}")


def naive_adam(p, g, m, v, lr, b1, b2, eps, wd, decoupled, t):
    """The NumPy path's formula and operation order, with scalars rounded from double."""
    T = p.dtype.type
    if wd != 0:
        if decoupled:
            p = p * T(1.0 - lr * wd)
        else:
            g = g + T(wd) * p
    m = T(b1) * m + T(1.0 - b1) * g
    v = T(b2) * v + T(1.0 - b2) * (g * g)
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    p = p - T(lr / bc1) * m / (np.sqrt(v / T(bc2)) + T(eps))
    return p, m, v


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", OPT_SIZES)
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (1e-2, False), (1e-2, True)])
def test_emul_adam_update(emul, n, dtype, launch, wd, decoupled):
    p, _, _ = _opt_state(n, dtype, n + 1)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    rp, rm, rv = p.copy(), m.copy(), v.copy()
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    for t in range(1, 4):
        g = np.random.default_rng(t).standard_normal(n).astype(dtype)
        ops.adam_update_(p, g, m, v, lr, b1, b2, eps, wd, decoupled, 1 - b1**t, 1 - b2**t, **launch_kw(launch))
        rp, rm, rv = naive_adam(rp, g, rm, rv, lr, b1, b2, eps, wd, decoupled, t)
        exact(m, rm, f"m at step {t}")
        exact(v, rv, f"v at step {t}")
        exact(p, rp, f"p at step {t}")


def _make_params(dtype, seed):
    from cnn_gpu.nn.module import Parameter

    rng = np.random.default_rng(seed)
    params = []
    for i, shape in enumerate([(4, 3, 3, 3), (4,), (10, 36), (10,)]):
        prm = Parameter(rng.standard_normal(shape).astype(dtype))
        params.append((f"p{i}", prm))
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "opt,kwargs",
    [
        ("SGD", dict(lr=0.1)),
        ("SGD", dict(lr=0.1, momentum=0.9)),
        ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)),
        ("Adam", dict(lr=1e-2)),
        ("Adam", dict(lr=1e-2, weight_decay=1e-2)),
        ("AdamW", dict(lr=1e-2, weight_decay=1e-1)),
    ],
)
def test_emul_fused_update_matches_cnn_gpu_optim(emul, opt, kwargs, dtype):
    """The fused kernels against cnn_gpu.optim's NumPy update on the same flat buffers."""
    optim = pytest.importorskip("cnn_gpu.optim")
    params = _make_params(dtype, 5)
    o = getattr(optim, opt)(params, **kwargs)
    (group,) = o.groups
    p = group.data.copy()
    state = {}
    for t in range(1, 4):
        g = np.random.default_rng(10 + t).standard_normal(p.size).astype(dtype)
        group.grad[...] = g
        o.step()  # the NumPy path (these are NumPy arrays)
        if opt == "SGD":
            mu = kwargs.get("momentum", 0.0)
            if mu and "buf" not in state:
                state["buf"] = np.zeros_like(p)
            ops.sgd_update_(
                p, g, state.get("buf"), kwargs["lr"], mu, kwargs.get("weight_decay", 0.0), kwargs.get("nesterov", False), t == 1
            )
        else:
            if "m" not in state:
                state["m"], state["v"] = np.zeros_like(p), np.zeros_like(p)
            b1, b2 = o.betas
            ops.adam_update_(
                p, g, state["m"], state["v"], o.lr, b1, b2, o.eps, o.weight_decay, opt == "AdamW", 1 - b1**t, 1 - b2**t
            )
        # same formulas, operation order and scalar rounding as the NumPy path: bitwise equal
        exact(p, group.data, f"{opt} params after step {t}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("opt", ["sgd", "sgd_nesterov", "adam", "adamw"])
def test_emul_fused_update_torch_oracle(emul, opt, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(99)
    p = rng.standard_normal(300).astype(dtype)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    if opt.startswith("sgd"):
        nest = opt == "sgd_nesterov"
        topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, nesterov=nest, weight_decay=1e-2)
        buf = np.zeros_like(p)
    else:
        cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
        topt = cls([tp], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, foreach=False)
        m, v = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, 6):
        g = rng.standard_normal(300).astype(dtype)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        if opt.startswith("sgd"):
            ops.sgd_update_(p, g, buf, 0.1, 0.9, 1e-2, opt == "sgd_nesterov", t == 1)
        else:
            ops.adam_update_(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 1e-2, opt == "adamw", 1 - 0.9**t, 1 - 0.999**t)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p, tp.detach().numpy(), **tol)


# ===================================================================== wrappers & harness
def test_emul_grid_stride_loops_are_exercised(emul):
    """With grid=1, block=32 every kernel family runs with fewer threads than work items."""
    x = rng_for("gs").standard_normal((2, 3, 9, 9))
    cols = k_im2col(x, 3)
    emul.log.clear()
    k_im2col(x, 3, 1, 1, 1, grid=1, block=32)
    k_col2im(cols, x.shape, 3, grid=1, block=32)
    k_max_pool(x, 2, grid=1, block=32)
    ops.bias_act_forward(x, x, None, 2, 3, 81, cm=False, relu=True, grid=1, block=32)
    ops.act_backward_bias_grad(x, x, np.empty_like(x), 2, 3, 81, cm=False, relu=True, bias=True, grid=1, block=32)
    ops.softmax_cross_entropy(x.reshape(6, -1), np.zeros(6, np.int32), grid=1, block=32)
    ops.sgd_update_(x.reshape(-1).copy(), x.reshape(-1), None, 0.1, 0.0, 0.0, False, True, grid=1, block=32)
    for kernel, grid, block in emul.log:
        if not kernel.startswith("scaled_sum"):  # the loss's second launch is always one block
            assert grid == 1 and block == 32, kernel
    assert len(emul.log) >= 8


def test_emul_default_launch_configuration(emul):
    emul.log.clear()
    x = np.zeros((4, 8, 32, 32), np.float32)  # 32768 elements, 4096 per filter: one segment
    ops.bias_act_forward(x, x, None, 4, 8, 1024, cm=False, relu=True)
    ops.act_backward_bias_grad(x, x, np.empty_like(x), 4, 8, 1024, cm=False, relu=True, bias=True)
    (k1, g1, b1), (k2, g2, b2) = emul.log
    assert (g1, b1) == (min(math.ceil(x.size / 256), emul.max_grid()), 256)
    assert (g2, b2) == (min(8, emul.max_grid()), 256)  # one block per filter
    emul.log.clear()
    x = np.zeros((9, 2, 32, 32), np.float32)  # 9216 values per filter: 3 segments
    ops.act_backward_bias_grad(x, x, np.empty_like(x), 9, 2, 1024, cm=True, relu=False, bias=True)
    assert emul.log == [("act_backward_bias_grad_f32", min(2 * 3, emul.max_grid()), 256), ("sum_segments_f32", 1, 256)]


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, np.complex64])
def test_emul_wrappers_reject_other_dtypes(emul, dtype):
    """float16 only where a kernel has a float16 entry point (tests/test_fp16_kernels.py)."""
    x = np.zeros((1, 1, 4, 4), dtype)
    if dtype != np.float16:
        with pytest.raises(TypeError, match="x: expected a float32, float64 or float16 array"):
            k_im2col(x, 2)
        with pytest.raises(TypeError, match="dy: expected a float32, float64 or float16 array"):
            ops.act_backward_bias_grad(x, x, x, 1, 1, 16, cm=False, relu=True, bias=False)
        with pytest.raises(TypeError, match="x: expected a float32, float64 or float16 array"):
            k_max_pool(x, 2)
        with pytest.raises(TypeError, match="logits: expected a float32, float64 or float16 array"):
            ops.softmax_cross_entropy(x.reshape(4, 4), np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="p: expected a float32 or float64"):
        ops.sgd_update_(x.reshape(-1), x.reshape(-1), None, 0.1, 0.0, 0.0, False, True)


def test_emul_wrappers_reject_bad_arguments(emul):
    with pytest.raises(ValueError, match="y: the CUDA engine writes C-contiguous arrays in place"):
        y = np.zeros((2, 3, 8), np.float32)
        ops.bias_act_forward(y[:, :, ::2], y[:, :, ::2], None, 2, 3, 4, cm=False, relu=True)
    with pytest.raises(ValueError, match="block: expected"):
        ops.bias_act_forward(np.zeros(3), np.zeros(3), None, 1, 3, 1, cm=False, relu=True, block=2048)
    with pytest.raises(ValueError, match="grid: expected at least 1"):
        ops.bias_act_forward(np.zeros(3), np.zeros(3), None, 1, 3, 1, cm=False, relu=True, grid=0)
    with pytest.raises(ValueError, match="does not fit the kernels' int32"):
        ops._i32(2**31)


def test_emul_empty_batch_launches_nothing(emul):
    emul.log.clear()
    x = np.zeros((0, 3, 5, 5))
    assert k_im2col(x, 3).shape == (0, 27, 9)
    assert k_max_pool(x, 2)[0].shape == (0, 3, 2, 2)
    assert emul.log == []


def test_emul_every_wrapper_kernel_exists():
    """Every kernel the CUDA engine launches is an entry point of its file (f32 and f64), and every
    entry point is launched by the engine (or, the probe, by the availability check): no kernel is dead."""
    src = Path(ops.__file__).read_text()
    kernels = cuda.list_kernels()
    assert kernels.pop("probe") == ["cnn_probe"] and 'get_function("probe", "cnn_probe")' in Path(cuda.build.__file__).read_text()
    used = set(re.findall(r'_launch\(\s*"(\w+)",\s*"(\w+)"', src))
    used |= {("im2col", k) for k in ("im2col", "im2col_cm", "col2im", "col2im_cm")}  # chosen by a flag
    used |= {("batchnorm", k) for k in re.findall(r'_bn_launch\(\s*"(\w+)"', src)}  # kernels/batchnorm.cu's launcher
    used |= {("activation", k) for k in re.findall(r'_from_[xy]\(\s*"(\w+)"', src)}  # activation.cu's y = f(x) ones
    f16_only = {("optim", "sgd_update_master"), ("optim", "adam_update_master")}  # float16 training's master-
    # weight steps: float32 masters only
    for fname, stem in used:
        if (fname, stem) in f16_only:
            assert kernels[fname].count(f"{stem}_f16") == 1 and f"{stem}_f32" not in kernels[fname], (fname, stem)
            continue
        assert f"{stem}_f32" in kernels[fname] and f"{stem}_f64" in kernels[fname], (fname, stem)
    defined = {(fname, nm.rsplit("_", 1)[0]) for fname, names in kernels.items() for nm in names}
    assert defined == used, f"kernels nothing launches: {sorted(defined - used)}"
    for fname, names in kernels.items():
        assert names, fname
        for nm in names:
            base, sfx = nm.rsplit("_", 1)
            assert sfx in ("f32", "f64", "f16"), nm
            assert (fname, base) in f16_only or (f"{base}_f32" in names and f"{base}_f64" in names), nm


def test_emul_kernel_dir_lookup(tmp_path, monkeypatch):
    assert (cuda.kernel_dir() / "common.cuh").is_file()
    with cnn_gpu.config.override(kernels_dir=str(tmp_path)):  # what CNN_GPU_KERNELS_DIR sets
        with pytest.raises(FileNotFoundError, match="CNN_GPU_KERNELS_DIR"):
            cuda.kernel_dir()
        (tmp_path / "common.cuh").write_text("// empty\n")
        (tmp_path / "demo.cu").write_text('#include "common.cuh"\nCNN_ENTRY_POINTS(demo, P, A)\n')
        assert cuda.kernel_dir() == tmp_path
        assert cuda.list_kernels() == {"demo": ["demo_f32", "demo_f64"]}
        src = cuda.expanded_source("demo")
    assert "// empty" in src and "#include" not in src and '#line 2 "demo.cu"' in src


def test_emul_expanded_source_inlines_common_header():
    src = cuda.expanded_source("im2col")
    assert "CNN_GPU_COMMON_CUH" in src and '#include "common.cuh"' not in src


# -- the emulator catches the bugs it is meant to catch (tests/emulation/selftest.cu) --
@pytest.fixture(scope="module")
def selftest():
    return harness.build("selftest", Path(harness.__file__).parent)


def test_emul_harness_block_reduction_good(selftest):
    launcher = harness.EmulationLauncher()
    for block in (1, 7, 32, 100, 256):
        x = np.arange(1, 301, dtype=np.float32)
        out = np.zeros(1, np.float32)
        launcher.launch_with(selftest, "good_block_sum", 1, block, (x, out, np.int32(300)))
        assert out[0] == 45150.0


def test_emul_harness_detects_missing_barrier(selftest):
    x = np.arange(1, 65, dtype=np.float32)
    with pytest.raises(harness.EmulationError, match="differs between forward and reverse"):
        harness.EmulationLauncher().launch_with(selftest, "racy_block_sum", 1, 64, (x, np.zeros(1, np.float32), np.int32(64)))


def test_emul_harness_detects_divergent_barrier(selftest):
    with pytest.raises(harness.EmulationError, match="divergent __syncthreads"):
        harness.EmulationLauncher().launch_with(selftest, "divergent_barrier", 1, 8, (np.zeros(8, np.float32),))


def test_emul_harness_detects_out_of_bounds_write(selftest):
    with pytest.raises(harness.EmulationError, match="out-of-bounds write"):
        harness.EmulationLauncher().launch_with(selftest, "oob_write", 2, 32, (np.zeros(100, np.float32), np.int64(100)))


def test_emul_harness_detects_write_race(selftest):
    with pytest.raises(harness.EmulationError, match="differs between forward and reverse"):
        harness.EmulationLauncher().launch_with(selftest, "write_race", 2, 32, (np.zeros(50, np.float32), np.int64(50)))


def test_emul_harness_poisons_unwritten_outputs(selftest):
    launcher = harness.EmulationLauncher()
    out = launcher.empty((10,), np.float32)
    launcher.launch_with(selftest, "partial_write", 1, 32, (out, np.int64(10)))
    assert np.all(out[:9] == 1) and np.isnan(out[9])


def test_emul_harness_checks_scalar_types(selftest):
    launcher = harness.EmulationLauncher()
    out = np.zeros(10, np.float32)
    with pytest.raises(harness.EmulationError, match="must be passed as int64"):
        launcher.launch_with(selftest, "partial_write", 1, 32, (out, 10))  # a Python int
    with pytest.raises(harness.EmulationError, match="must be passed as int64"):
        launcher.launch_with(selftest, "partial_write", 1, 32, (out, np.int32(10)))
    with pytest.raises(harness.EmulationError, match="must be an array of float32"):
        launcher.launch_with(selftest, "partial_write", 1, 32, (out.astype(np.float64), np.int64(10)))
    with pytest.raises(harness.EmulationError, match="takes 2 arguments"):
        launcher.launch_with(selftest, "partial_write", 1, 32, (out,))


# ============================================== the emulation against a real GPU (if any)
def _gpu_available() -> bool:
    from cnn_gpu.backend import cupy_available  # noqa: PLC0415

    return cupy_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_emul_matches_the_gpu(dtype):
    """The same wrappers on the GPU and in the emulator, with identical launch configurations.

    With --fmad=false the GPU rounds like the CPU, so everything but exp/log is bitwise equal.
    """
    import cupy  # noqa: PLC0415

    rng = rng_for("gpu", dtype)
    x = rng.standard_normal((3, 4, 11, 10)).astype(dtype)
    dy_pool = rng.standard_normal((3, 4, 5, 5)).astype(dtype)
    cols = rng.standard_normal((3, 4 * 3 * 2, 6 * 10)).astype(dtype)
    logits = (5 * rng.standard_normal((37, 10))).astype(dtype)
    labels = rng.integers(0, 10, 37).astype(np.int32)
    flat = [rng.standard_normal(999).astype(dtype) for _ in range(4)]

    def run(to):
        out = {}
        out["im2col"] = k_im2col(to(x), (3, 2), (2, 1), (1, 1), (1, 2))
        out["col2im"] = k_col2im(to(cols), x.shape, (3, 2), (2, 1), (1, 1), (1, 2))
        out["im2col_cm"] = k_im2col(to(x), (3, 2), (2, 1), (1, 1), (1, 2), cm=True)
        out["col2im_cm"] = k_col2im(out["im2col_cm"], x.shape, (3, 2), (2, 1), (1, 1), (1, 2), cm=True)
        out["max"], out["argmax"] = k_max_pool(to(x), 3, 2, 1)
        out["max_bwd"] = k_max_pool_backward(to(dy_pool), out["argmax"], x.shape, 3, 2, 1)
        out["avg"] = k_avg_pool(to(x), 3, 2, 1)
        out["avg_bwd"] = k_avg_pool_backward(to(dy_pool), x.shape, 3, 2, 1)
        y = to(x.copy())
        out["bias_relu"] = ops.bias_act_forward(y, y, to(flat[0][:4].copy()), 3, 4, 110, cm=False, relu=True)
        out["dst"] = to(np.empty((4, 330), dtype))
        out["db"] = ops.act_backward_bias_grad(to(x), y, out["dst"], 3, 4, 110, cm=True, relu=True, bias=True)
        out["dst3"] = to(np.empty((4, 330), dtype))
        out["db3"] = ops.act_backward_bias_grad(to(x), y, out["dst3"], 3, 4, 110, cm=True, relu=True, bias=True, segments=3)
        out["loss"], out["dlogits"] = ops.softmax_cross_entropy(to(logits), to(labels))
        p, g, m, v = (to(a.copy()) for a in flat)
        ops.adam_update_(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 1e-2, True, 0.1, 0.001)
        out["adam_p"], out["adam_m"], out["adam_v"] = p, m, v
        p, buf = to(flat[0].copy()), to(flat[1].copy())
        ops.sgd_update_(p, g, buf, 0.1, 0.9, 1e-3, True, False)
        out["sgd_p"], out["sgd_buf"] = p, buf
        return out

    with cuda.use_launcher(cuda.build.CupyLauncher()):
        gpu = {k: cupy.asnumpy(v) for k, v in run(cupy.asarray).items()}
    # the emulator with the GPU's default grid cap gives the same launch configurations
    with cuda.use_launcher(harness.EmulationLauncher(grid_cap=cuda.build.CupyLauncher().max_grid())):
        cpu = run(np.asarray)
    for k in gpu:
        if k in ("loss", "dlogits"):
            close(gpu[k], cpu[k], dtype, k)
        else:
            exact(gpu[k], cpu[k], k)


# ----------------------------------------------------------------- batch normalisation (batchnorm.cu)
# (shape, training, affine, running statistics)
BN_KERNEL_CASES = [
    ((5, 3, 4, 3), True, True, True),
    ((7, 4), True, True, True),
    ((3, 2, 5, 5), False, True, True),
    ((2, 5, 3, 1), True, False, False),
    ((4, 3), False, False, True),
    ((2, 3, 23, 7), True, True, True),
]


def naive_batch_norm(x, gamma, beta, mean=None, var=None, eps=1e-5):
    """Per channel, from the definition with Python floats: y = gamma (x - mean) / sqrt(var + eps) + beta."""
    C = x.shape[1]
    y = np.empty(x.shape)
    for c in range(C):
        vals = [float(v) for v in np.take(x, c, axis=1).ravel()]
        m = sum(vals) / len(vals) if mean is None else float(mean[c])
        v = sum((a - m) ** 2 for a in vals) / len(vals) if var is None else float(var[c])
        gc, bc = (float(gamma[c]), float(beta[c])) if gamma is not None else (1.0, 0.0)
        y[:, c] = gc * (np.take(x, c, axis=1).astype(np.float64) - m) / math.sqrt(v + eps) + bc
    return y


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", BN_KERNEL_CASES, ids=lambda c: f"{c[0]}-{int(c[1])}{int(c[2])}{int(c[3])}")
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("segments", [None, 3], ids=["S-auto", "S3"])
def test_emul_batch_norm(emul, case, dtype, launch, relu, segments):
    shape, training, affine, running = case
    act = "relu" if relu else None
    launch = dict(launch_kw(launch), segments=segments)
    C = shape[1]
    rng = rng_for("bn", case, dtype)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    gamma, beta = (rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)) if affine else (None, None)
    rm0, rv0 = rng.standard_normal(C).astype(dtype), (rng.random(C) + 0.5).astype(dtype)
    rm, rv = (rm0.copy(), rv0.copy()) if running else (None, None)
    rm_ref, rv_ref = (rm0.copy(), rv0.copy()) if running else (None, None)
    y, cache = ops.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.25, 1e-5, act, **launch)
    y_ref, cache_ref = R.batch_norm_forward(x, gamma, beta, rm_ref, rv_ref, training, 0.25, 1e-5, act)
    close(y, y_ref, dtype, "y")
    stats = (None, None) if training or not running else (rm0, rv0)
    naive = naive_batch_norm(x, gamma, beta, *stats)
    close(y, np.maximum(naive, 0) if relu else naive, dtype, "y (naive)")
    if running:
        close(rm, rm_ref, dtype, "running_mean")
        close(rv, rv_ref, dtype, "running_var")
    else:
        assert rm is None
    dy = rng.standard_normal(shape).astype(dtype)
    got = ops.batch_norm_backward(dy, cache, **launch)
    want = R.batch_norm_backward(dy, cache_ref)
    for g, r, what in zip(got, want, ("dx", "dgamma", "dbeta")):
        if r is None:
            assert g is None, what
        else:
            assert g.dtype == np.dtype(dtype), what
            close(g, r, dtype, what)


def test_emul_batch_norm_torch_oracle(emul):
    torch = pytest.importorskip("torch")
    rng = rng_for("bn-torch")
    x, dy = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    gamma, beta, rm, rv = rng.standard_normal(3), rng.standard_normal(3), np.zeros(3), np.ones(3)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tg, tb, training=True, momentum=0.1, eps=1e-5)
    ty.backward(torch.tensor(dy))
    y, cache = ops.batch_norm_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5, grid=2, block=32)
    dx, dg, db = ops.batch_norm_backward(dy, cache, grid=2, block=32)
    for got, want, what in [
        (y, ty, "y"),
        (rm, trm, "rm"),
        (rv, trv, "rv"),
        (dx, tx.grad, "dx"),
        (dg, tg.grad, "dg"),
        (db, tb.grad, "db"),
    ]:
        close(got, want.detach().numpy(), np.float64, what)


@pytest.mark.parametrize("segments", [1, 2, 7, 40])
def test_emul_batch_norm_segments(emul, segments):
    """Each channel's values cut into S segments (more segments than values too: empty ones add 0),
    any grid: the reference's values; a block of 32 threads walks the (n, p) pairs of 5x3 maps
    (P = 15: each step crosses rows)."""
    rng = rng_for("bn-seg", segments)
    x, dy = rng.standard_normal((3, 4, 5, 3)) * 3 + 2, rng.standard_normal((3, 4, 5, 3))
    gamma, beta, rm, rv = rng.standard_normal(4), rng.standard_normal(4), np.zeros(4), np.ones(4)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    for grid in (1, 5):
        y, cache = ops.batch_norm_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5, "relu", grid=grid, block=32, segments=segments)
        y_ref, c_ref = R.batch_norm_forward(x, gamma, beta, rm_ref, rv_ref, True, 0.1, 1e-5, "relu")
        close(y, y_ref, np.float64, "y")
        close(rm, rm_ref, np.float64, "running_mean")
        close(rv, rv_ref, np.float64, "running_var")
        got = ops.batch_norm_backward(dy, cache, grid=grid, block=32, segments=segments)
        for g, r, what in zip(got, R.batch_norm_backward(dy, c_ref), ("dx", "dgamma", "dbeta")):
            close(g, r, np.float64, what)


@pytest.mark.parametrize("segments", [1, 7])
def test_emul_batch_norm_accumulates_and_counts(emul, segments):
    """num_batches_tracked += 1 in the forward's last launch (one block of any grid); dgamma and
    dbeta added into given arrays (adjacent views of one buffer) by the backward's."""
    rng = rng_for("bn-acc", segments)
    x, dy = rng.standard_normal((3, 4, 5, 3)), rng.standard_normal((3, 4, 5, 3))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    _, c_ref = R.batch_norm_forward(x, gamma, beta, None, None, True, 0.1, 1e-5, "relu")
    _, dg_ref, db_ref = R.batch_norm_backward(dy, c_ref)
    count = np.array(41, np.int64)
    for grid in (1, 5):
        flat = np.arange(8.0)
        rm, rv = np.zeros(4), np.ones(4)
        y, cache = ops.batch_norm_forward(
            x, gamma, beta, rm, rv, True, 0.1, 1e-5, "relu", num_batches_tracked=count, grid=grid, block=32, segments=segments
        )
        ops.batch_norm_forward(
            x, gamma, beta, rm, rv, False, 0.1, 1e-5, num_batches_tracked=count, grid=grid, block=32, segments=segments
        )  # eval: not counted
        _, dg, db = ops.batch_norm_backward(
            dy, cache, accumulate_into=(flat[:4], flat[4:]), grid=grid, block=32, segments=segments
        )
        close(flat, np.arange(8.0) + np.concatenate([dg_ref, db_ref]), np.float64, f"dgamma, dbeta (grid {grid})")
    assert int(count) == 43


def test_batch_norm_segment_count_depends_on_the_shape_only():
    """About 4096 values a block, at most 2048 blocks (resnet20 at batch 128: 32 segments of its 16
    channels, 8 of the 64), 1 for small inputs; a bad count is an error that names it."""
    assert ops._bn_segments(16, 128 * 32 * 32, None) == 32
    assert ops._bn_segments(64, 128 * 8 * 8, None) == 2
    assert ops._bn_segments(512, 10**7, None) == 4 and ops._bn_segments(3, 10, None) == 1
    assert ops._bn_segments(4000, 10**6, None) == 1 and ops._bn_segments(4, 9, 5) == 5
    with pytest.raises(ValueError, match="segments: expected at least 1, got 0"):
        ops._bn_segments(4, 9, 0)


def test_emul_batch_norm_is_bitwise_reproducible(emul):
    """Two runs with the same launch configuration give identical bits (the emulator also reruns
    every launch in reverse block and thread order and requires the same bits)."""
    rng = rng_for("bn-repro")
    x, dy = rng.standard_normal((8, 4, 6, 6)).astype(np.float32), rng.standard_normal((8, 4, 6, 6)).astype(np.float32)
    runs = []
    for _ in range(2):
        y, cache = ops.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, grid=3, block=64, segments=5)
        runs.append((y, *ops.batch_norm_backward(dy, cache, grid=3, block=64, segments=5)[:1]))
    for a, b in zip(*runs):
        exact(a, b, "rerun")


# ------------------------------------------------------------------------------ metric sums
@pytest.mark.parametrize("launch", [None, (1, 32), (1, 64)], ids=["default", "g1b32", "g1b64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("N, K", [(1, 1), (7, 3), (130, 10)])
def test_emul_epoch_sums(emul, N, K, dtype, launch):
    """kernels/metrics.cu adds a step into its epoch's sums exactly as cnn_gpu.train.Meter does on
    NumPy (the loss times N in the data's type, NumPy's argmax: first maximum, first NaN), and
    writes the step's loss at the step number kept on the device."""
    rng = rng_for("epoch-sums", N, K)
    logits = rng.integers(-2, 3, size=(N, K)).astype(dtype)  # small integers: many ties
    if N > 1 and K > 1:
        logits[1, K - 1] = np.nan  # NumPy's argmax: the first NaN
    labels = rng.integers(0, K, size=N)
    loss = np.asarray(rng.standard_normal(), dtype=dtype)
    sums = [np.full((), 1.25), np.full((), 3, np.int64), np.zeros(4), np.full((), 2, np.int64)]
    for _ in range(2, 6):  # steps 2..5: the counter runs past the 4 slots: those steps write no slot
        ops.epoch_sums(loss, logits, labels, *sums, **({} if launch is None else {"block": launch[1]}))
    hits = int((logits.argmax(axis=1) == labels).sum())
    assert sums[0] == 1.25 + 4 * np.float64(loss * N) and sums[0].dtype == np.float64
    assert int(sums[1]) == 3 + 4 * hits and int(sums[3]) == 6
    np.testing.assert_array_equal(sums[2], [0, 0, np.float64(loss), np.float64(loss)])


def test_emul_epoch_sums_checks_its_arguments(emul):
    logits, labels, loss = np.zeros((3, 2), np.float32), np.zeros(3, np.int64), np.zeros((), np.float32)
    good = [np.zeros(()), np.zeros((), np.int64), np.zeros(2), np.zeros((), np.int64)]
    start = len(emul.log)
    with pytest.raises(ValueError, match="correct: expected a int64 0-d array, got float64"):
        ops.epoch_sums(loss, logits, labels, good[0], np.zeros(()), *good[2:])
    with pytest.raises(ValueError, match="loss, labels: expected a 0-d float32 loss"):
        ops.epoch_sums(loss.astype(np.float64), logits, labels, *good)
    with pytest.raises(ValueError, match=r"expected a 0-d float32 loss and \(3,\) labels"):
        ops.epoch_sums(loss, logits, labels[:2], *good)
    assert emul.log[start:] == []  # refused before any launch
