"""The float16 entry points of the kernels (kernels/common.cuh: CNN_ENTRY_POINTS_FP16: float16
storage, float arithmetic, one rounding where a value is stored), run on the CPU by the g++
emulation (tests/emulation: cuda_shim.h's __half is g++'s _Float16, without arithmetic operators),
held bit for bit to the reference's float16 storage mode (functional/reference.py
float16_storage), on ordinary inputs and on inputs whose results overflow float16 (inf, as
__float2half_rn gives), with NaN propagating as in float32.

Every test has "emul" in its name (``pytest -k emul``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnn_gpu import cuda
from cnn_gpu.cuda import ops
from cnn_gpu.functional import reference as R
from cnn_gpu.functional.geometry import CropFlip, conv_geometry, pool_geometry

if os.name != "posix":
    pytest.skip("the CUDA emulation needs a POSIX system with g++", allow_module_level=True)

from helpers import F16_LAUNCH_IDS as LAUNCH_IDS
from helpers import F16_LAUNCHES as LAUNCHES
from helpers import emulated_kernels  # noqa: E402
from helpers import f16_data as data
from helpers import launch_kw as kw
from helpers import same_f16 as same

F16 = np.float16


@pytest.fixture(scope="module")
def emul():
    with emulated_kernels() as launcher:
        yield launcher


CONV = [(2, 3, 7, 6, (3, 2), (2, 1), (1, 0), (1, 2)), (2, 2, 9, 11, 3, 1, 1, 1), (1, 1, 5, 5, 3, 2, 2, 1)]


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("cm", [False, True], ids=["nchw", "cm"])
@pytest.mark.parametrize("case", CONV)
def test_emul_fp16_im2col_col2im(emul, case, cm, big, launch):
    """im2col_f16 copies the values (padding +0); col2im_f16 sums each input's taps in float in the
    reference's order and rounds once: a sum past 65504 is inf, as in the reference's mode."""
    N, C, H, W, k, s, p, d = case
    g = conv_geometry((N, C, H, W), 1, k, s, p, d)
    rng = np.random.default_rng(11)
    x = data(rng, (N, C, H, W), big)
    cols = ops.im2col(x, g, cm=cm, **kw(launch))
    want = R.float16_storage(R.im2col, x, g)  # (N, R, P)
    to_cm = lambda c: np.ascontiguousarray(c.transpose(1, 0, 2)).reshape(g.C * g.KH * g.KW, g.N * g.P)  # noqa: E731
    same(cols, to_cm(want) if cm else want, "im2col")
    dcols = data(rng, cols.shape, big)
    dx = ops.col2im(dcols, g, cm=cm, **kw(launch))
    nchw = np.ascontiguousarray(dcols.reshape(-1, g.N, g.P).transpose(1, 0, 2)) if cm else dcols
    same(dx, R.float16_storage(R.col2im, nchw, g), "col2im")
    if big:
        assert np.isinf(R.col2im(nchw.astype(np.float32), g).astype(np.float32)).sum() == 0  # float32 holds them
        assert np.isinf(dx).any(), "the overflow case should overflow float16"


EPI = [(1, 1, 1), (4, 7, 1), (2, 3, 25), (3, 16, 63)]


def _with_specials(a):
    a = a.copy()
    if a.size >= 5:
        a.flat[::5] = np.nan
        a.flat[1::7] = np.inf
        a.flat[2::9] = -np.inf
    return a


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("cm,relu,bias", [(0, 0, 1), (0, 1, 1), (1, 1, 1), (1, 0, 1), (1, 1, 0)])
@pytest.mark.parametrize("shape", EPI)
def test_emul_fp16_bias_act_forward(emul, shape, cm, relu, bias, big, launch):
    """y = act(src + b) in float, rounded once: 60000 + 30000 is inf, -inf through the ReLU is 0."""
    N, F_, P = shape
    rng = np.random.default_rng(5)
    z = _with_specials(data(rng, (N, F_, P), big))
    b = data(rng, (F_,), big) if bias else None

    def ref(z, b):
        v = z + b[:, None] if b is not None else z.copy()
        return np.maximum(v, 0) if relu else v

    want = R.float16_storage(ref, z, b)
    src = np.ascontiguousarray(z.transpose(1, 0, 2)).reshape(F_, N * P) if cm else z.copy()
    y = np.empty((N, F_, P), F16) if cm else src
    ops.bias_act_forward(src, y, b, N, F_, P, cm=cm, relu=relu, **kw(launch))
    same(y, want, "bias_act_forward")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("cm,relu,bias", [(0, 1, 1), (0, 0, 1), (1, 1, 1), (1, 0, 0), (1, 1, 0)])
@pytest.mark.parametrize("shape", EPI + [(9, 2, 1024)])
def test_emul_fp16_act_backward_bias_grad(emul, shape, cm, relu, bias, launch):
    """delta = dy * relu'(y) stored float16 (exact: a product by 0 or 1); db summed in float32 from
    the float16 deltas (segments and their sum: float32 arrays), close to the float64 sum; NaN stays."""
    N, F_, P = shape
    rng = np.random.default_rng(8)
    y = np.maximum(data(rng, (N, F_, P)), F16(0))
    dy = data(rng, (N, F_, P))
    if dy.size >= 6:
        dy.flat[::6] = np.nan
    delta = R.float16_storage(R.relu_backward, dy, y) if relu else dy
    dst = np.empty((F_, N * P) if cm else (N, F_, P), F16)
    db = ops.act_backward_bias_grad(dy, y, dst, N, F_, P, cm=cm, relu=relu, bias=bias, **kw(launch))
    same(dst, np.ascontiguousarray(delta.transpose(1, 0, 2)).reshape(F_, N * P) if cm else delta, "delta")
    if not bias:
        assert db is None
        return
    assert db.dtype == np.float32
    want = delta.astype(np.float64).sum(axis=(0, 2))
    scale = max(1.0, float(np.abs(np.nan_to_num(want)).max()))
    np.testing.assert_allclose(db, want, rtol=1e-5, atol=1e-5 * scale)  # (NaN where a delta is NaN)
    # float32 sums keep what float16 would not: 1e-4 added 20000 times is 2, in float16 it stalls
    small = np.full((1, 1, 20000), 1e-4, F16)
    db_small = ops.act_backward_bias_grad(small, small, np.empty_like(small), 1, 1, 20000, cm=True, relu=False, bias=True)
    assert abs(float(db_small[0]) - 20000 * float(F16(1e-4))) < 1e-3


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (2, 3, 17, 5)])
def test_emul_fp16_add_and_relu_backward(emul, shape, big, launch):
    """The residual sum (+ ReLU) rounds once (two values near 65504 sum to inf) and the ReLU's
    backward is the reference's product (NaN * 0 = NaN), in float16."""
    rng = np.random.default_rng(3)
    a, b, dy = (_with_specials(data(rng, shape, big)) for _ in range(3))
    for act in (None, "relu"):
        y, cache = ops.add_forward(a, b, act, **kw(launch))
        want, _ = R.float16_storage(R.add_forward, a, b, act)
        same(y, want, f"add ({act})")
    y = np.maximum(a, F16(0))
    with np.errstate(invalid="ignore"):  # (inf * 0 in the reference: NaN, as the kernel)
        want = R.float16_storage(R.relu_backward, dy, y)
    same(ops.relu_backward(dy, y, **kw(launch)), want, "relu_backward")


POOL = [(2, 3, 8, 8, 2, None, 0), (1, 2, 7, 9, 3, 2, 1), (2, 1, 6, 5, (3, 2), (1, 2), (1, 0))]


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("case", POOL)
def test_emul_fp16_pooling(emul, case, big, launch):
    """Max pooling: y and the argmax of the float32 reference on the same values (NaN wins, ties go
    to the first); its backward, the average pooling and its backward: float sums in the
    reference's order, one rounding (overlapping windows' sums of large values overflow to inf)."""
    N, C, H, W, k, st, pd = case
    g = pool_geometry((N, C, H, W), k, st, pd)
    rng = np.random.default_rng(21)
    x = _with_specials(data(rng, (N, C, H, W), big))
    y, cache = ops.max_pool2d_forward(x, g, **kw(launch))
    want, ref_cache = R.float16_storage(R.max_pool2d_forward, x, g)
    same(y, want, "max_pool2d_forward")
    np.testing.assert_array_equal(cache.argmax, ref_cache.argmax)
    dy = data(rng, y.shape, big)
    same(
        ops.max_pool2d_backward(dy, cache, **kw(launch)),
        R.float16_storage(R.max_pool2d_backward, dy, ref_cache),
        "max_pool2d_backward",
    )
    x = data(rng, (N, C, H, W), big)
    ya, acache = ops.avg_pool2d_forward(x, g, **kw(launch))
    same(ya, R.float16_storage(R.avg_pool2d_forward, x, g)[0], "avg_pool2d_forward")
    same(
        ops.avg_pool2d_backward(dy, acache, **kw(launch)),
        R.float16_storage(R.avg_pool2d_backward, dy, acache),
        "avg_pool2d_backward",
    )


def test_emul_fp16_overflow_matches_the_reference_exactly(emul):
    """The boundary: 65504 + 15 rounds back to 65504, + 16 is the tie that rounds to inf (ties to
    even, as __float2half_rn and NumPy's float16 cast), -(65504 + 16) is -inf."""
    a = np.array([65504, 65504, -65504, 1, np.nan], F16)
    b = np.array([15, 16, -16, 2**-24, 1], F16)
    y, _ = ops.add_forward(a, b)
    want, _ = R.float16_storage(R.add_forward, a, b)
    same(y, want, "add")
    assert y[0] == 65504 and y[1] == np.inf and y[2] == -np.inf and np.isnan(y[4])


def test_emul_fp16_kernels_without_a_float16_entry_point_refuse_it(emul):
    """Kernels not yet written for float16 storage refuse float16 arrays (one line naming the
    argument), rather than running them as something else."""
    x = np.zeros((1, 1, 4, 4), F16)
    with pytest.raises(TypeError, match=r"^x: expected a float32 or float64 array, got float16$"):
        ops.crop_flip(x, CropFlip(1, 1, 4, 4, 4, 4, 1, 1, 0, 1, 2, 0))  # (augmentation runs on the float32 batch)
    with pytest.raises(TypeError, match=r"^p: expected a float32 or float64 array, got float16$"):
        ops.sgd_update_(x.reshape(-1), x.reshape(-1), None, 0.1, 0.0, 0.0, False, True)  # (fp16: sgd_update_master_)
    with pytest.raises(TypeError, match=r"^x: expected a float32, float64 or float16 array, got int32$"):
        ops.im2col(x.astype(np.int32), conv_geometry(x.shape, 1, 2, 1, 0, 1))


def test_emul_fp16_entry_points_listed_and_compiled(emul):
    """list_kernels names the float16 entry points; the emulation compiles and exports each
    (the harness looks every listed name up); NVRTC gets -DCNN_FP16 with cuda_fp16.h's folder
    where that is found."""
    kernels = cuda.list_kernels()
    assert {"im2col_f16", "im2col_cm_f16", "col2im_f16", "col2im_cm_f16"} <= set(kernels["im2col"])
    assert {"bias_act_forward_f16", "act_backward_bias_grad_f16", "add_act_forward_f16", "relu_backward_f16"} <= set(
        kernels["epilogue"]
    )
    assert "sum_segments_f16" not in kernels["epilogue"]  # it sums float32 partial sums
    from helpers import load_harness  # noqa: PLC0415

    lib = load_harness().build("epilogue")
    assert lib.signature("bias_act_forward_f16")[:3] == ["h*", "h*", "h*"]
    assert lib.signature("act_backward_bias_grad_f16")[3] == "f*"  # the float32 partial sums
    folder, why = cuda.build.fp16_include_dir()
    opts = cuda.build.fp16_options()
    assert (opts == ("-DCNN_FP16", f"-I{folder}")) if folder else (opts == () and "cuda_fp16.h" in why)


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("N,K", [(1, 1), (5, 10), (3, 300)])
def test_emul_fp16_softmax_cross_entropy(emul, N, K, eps, launch):
    """float16 logits: the softmax, the per-sample losses and the batch loss in float32 (float32
    arrays), dlogits float16, within one float16 rounding of the float32 reference's (the block sums'
    order differs from NumPy's, as in float32); the loss scale multiplies dlogits exactly."""
    rng = np.random.default_rng(N * K)
    logits = (rng.standard_normal((N, K)) * 4).astype(F16)
    labels = rng.integers(0, K, N)
    loss, dlogits, per = ops.softmax_cross_entropy(logits, labels, eps, return_per_sample=True, **kw(launch))
    assert loss.dtype == per.dtype == np.float32 and dlogits.dtype == F16
    want_loss, want_d = R.float16_storage(R.softmax_cross_entropy, logits, labels, eps, keep_float32=(0,))
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    ulp = np.spacing(np.abs(want_d)).astype(np.float32)
    assert (np.abs(dlogits.astype(np.float32) - want_d.astype(np.float32)) <= ulp).all()
    scale = np.array([2.0**10], np.float32)
    _, scaled = ops.softmax_cross_entropy(logits, labels, eps, grad_scale=scale, **kw(launch))
    unscaled_f32 = R.softmax_cross_entropy(logits.astype(np.float32), labels, eps)[1]
    with np.errstate(over="ignore"):
        want_scaled = (unscaled_f32 * np.float32(2.0**10)).astype(F16)
    ulp = np.spacing(np.abs(want_scaled)).astype(np.float32)
    assert (np.abs(scaled.astype(np.float32) - want_scaled.astype(np.float32)) <= ulp).all()
    huge = np.array([2.0**30], np.float32)  # dlogits * 2**30 overflow float16: inf, which found_inf sees
    _, over = ops.softmax_cross_entropy(logits, labels, eps, grad_scale=huge)
    if K > 1:
        assert np.isinf(over).any()
        found = np.zeros(1, np.int32)
        ops.found_inf_(over.astype(np.float32).reshape(-1), found)
        assert found[0] == 1


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("p", [0.3, 0.5])
def test_emul_fp16_dropout(emul, p, big, launch):
    """The float32 draw of the counter-based key (the reference's mask), y = x * scale rounded once
    (60000 / 0.5 is inf), the stored mask the scale rounded to float16; the backward dy * mask."""
    rng = np.random.default_rng(2)
    x = data(rng, (4, 3, 7, 5), big)
    key = 0x1234_5678_9ABC_DEF0
    y, cache = ops.dropout_forward(x, p, True, key=key, **kw(launch))
    want_y, want_cache = R.float16_storage(R.dropout_forward, x, p, True, None, key)
    same(y, want_y, "y")
    same(cache.mask, want_cache.mask.astype(F16), "mask")
    dy = data(rng, x.shape)
    same(
        R.dropout_backward(dy, cache),
        R.float16_storage(R.dropout_backward, dy, want_cache._replace(mask=want_cache.mask.astype(F16))),
        "dx",
    )
