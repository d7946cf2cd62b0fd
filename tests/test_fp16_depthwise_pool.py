"""The float16 entry points of depthwise convolution (kernels/depthwise.cu) and adaptive average
pooling (kernels/pool.cu), issue 24: float16 storage, float arithmetic, one rounding where a value
is stored; the depthwise weight and bias gradients float32 (they go into float32 Parameter.grad).

Run on the CPU by the g++ emulation (tests/emulation, compiled with -ffp-contract=off) through the
engine's launchers (cnn_gpu.cuda.ops), held to the reference's float16 storage mode
(functional/reference.py float16_storage): bit for bit where the kernel adds in the reference's
order, else within one float16 step (said why at each check), plus a test-local float32 oracle
that adds in the kernel's order (bit for bit), on ordinary inputs and inputs whose results
overflow float16, with the default launch and a tiny grid (the grid-stride loops loop).

Every test has "emul" in its name (``pytest -k emul``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnn_gpu import cuda
from cnn_gpu.cuda import ops
from cnn_gpu.functional import reference as R
from cnn_gpu.functional.caches import Conv2dCache
from cnn_gpu.functional.geometry import conv_geometry, tap_slices

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


def _steps(a):
    """float16 values as integers in their order: neighbours differ by 1, 65504 and inf too (+-0: 0)."""
    bits = a.view(np.uint16).astype(np.int64)
    mag = bits & 0x7FFF
    return np.where(bits & 0x8000, -mag, mag)


def within_one_step(got, want, what):
    """float16 arrays equal or neighbours (one float16 rounding apart: a float32 sum in another
    order can land on the other side of a rounding boundary, 65504 | inf included); NaN where NaN."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == F16 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN")
    gap = np.abs(_steps(got[~nan]) - _steps(want[~nan]))
    assert gap.size == 0 or gap.max() <= 1, f"{what}: {int(gap.max())} float16 steps apart"


def close32(got, want, what, rtol=1e-5):
    """float32 sums of the same exact terms in another order: a relative error of a few float32
    roundings (atol scaled by the data: terms cancel)."""
    assert got.dtype == np.float32, (what, got.dtype)
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


# ================================================================== depthwise convolution
# (x shape, filters per channel M, kernel, stride, padding, dilation)
DW = [
    ((2, 3, 7, 6), 1, 3, 1, 1, 1),
    ((2, 2, 9, 8), 2, (3, 2), (2, 1), (1, 0), (1, 2)),
    ((1, 4, 5, 6), 1, 3, 2, 2, 1),  # padding wider than half the kernel
    ((2, 2, 6, 5), 3, (2, 3), 1, (0, 1), (2, 1)),
]
DW_IDS = ["3x3", "M2-strided-dilated", "pad2", "M3"]


def dw_setup(case, seed, big_x=False):
    xs, M, k, s, p, d = case
    g = conv_geometry(xs, xs[1] * M, k, s, p, d, xs[1])
    rng = np.random.default_rng(seed)
    x = data(rng, xs, big_x)
    w, b = data(rng, (g.F, 1, g.KH, g.KW)), data(rng, (g.F,))
    return g, rng, x, w, b


def dw_forward_in_kernel_order(x, w, b, g, activation=None):
    """float32 y = act(sum over the taps kh, then kw, of x * w, + b): the kernel's order (a tap in
    the padding adds x = 0 * w, which leaves the float32 sum as it is)."""
    M = g.F // g.C
    xpad = np.pad(x, ((0, 0), (0, 0), (g.PH, g.PH), (g.PW, g.PW)))  # (N, C, H+2PH, W+2PW)
    xf = np.repeat(xpad, M, axis=1)  # (N, F, H+2PH, W+2PW): filter f reads channel f // M
    y = np.zeros(g.y_shape, np.float32)
    for kh, kw_, rows, cs in tap_slices(g):
        y += xf[:, :, rows, cs] * w[:, 0, kh, kw_].reshape(1, g.F, 1, 1)
    if b is not None:
        y += b.reshape(1, g.F, 1, 1)
    return np.maximum(y, 0) if activation == "relu" else y


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("relu,bias", [(0, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("case", DW, ids=DW_IDS)
def test_emul_fp16_depthwise_forward(emul, case, relu, bias, big, launch):
    """y: the taps' products summed in float (kh then kw), + b, the ReLU, one rounding: bit for bit
    the float32 sums in that order; within one float16 step of the reference, whose matmul (BLAS)
    adds the taps in an order of its own. x in +-60000: sums past 65504 are inf, as in the reference."""
    g, rng, x, w, b = dw_setup(case, 1, big_x=big)
    if not big:
        x.flat[5::41], x.flat[7::53] = np.nan, np.inf  # NaN and inf propagate as in float32
    b = b if bias else None
    act = "relu" if relu else None
    y = ops.depthwise_conv2d_forward(x, w, b, g, act, **kw(launch))
    same(y, R.float16_storage(dw_forward_in_kernel_order, x, w, b, g, act), "y (the kernel's order)")
    want, _ = R.float16_storage(R.conv2d_forward, x, w, b, g, act)
    within_one_step(y, want, "y (the reference)")
    if big:
        y32 = dw_forward_in_kernel_order(*(a if a is None else a.astype(np.float32) for a in (x, w, b)), g, act)
        assert np.isfinite(y32).all() and np.isinf(y).any() and np.isfinite(y).any()
        assert (np.isinf(y) == (np.abs(y32) >= 65520)).all()  # (65520: the tie that rounds to inf)


def dw_backward_case(case, relu, bias, big, seed=2):
    """float16 x, w, b, y, dy (dy in +-60000 with ``big``), the cuda engine's cache and the reference's."""
    g, rng, x, w, b = dw_setup(case, seed)
    b = b if bias else None
    act = "relu" if relu else None
    y = R.float16_storage(dw_forward_in_kernel_order, x, w, b, g, act)
    _, ref_cache = R.conv2d_forward(x.astype(np.float32), w.astype(np.float32), b, g, act)
    ref_cache = ref_cache._replace(x=x, w=w, y=y if relu else None)  # float16 arrays: float16_storage reads them
    cache = Conv2dCache("cuda", g, x, w, bias, act, y if relu else None, None)
    return g, x, w, data(rng, g.y_shape, big), cache, ref_cache


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("relu,bias", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("case", DW, ids=DW_IDS)
def test_emul_fp16_depthwise_backward(emul, case, relu, bias, big, launch):
    """delta = dy * relu'(y) (float16, exact); dx: float sums, one rounding, bit for bit the
    reference's with one filter per channel (its dcols = w^T delta is then one product each, and
    col2im adds the taps kh, kw from 0, as the kernel), within one float16 step with M > 1 (the
    reference adds the M filters' products first). dw, db float32: the same exact products (float16
    times float16 fits float32) summed in another order, rtol 1e-5; dy in +-60000: dx overflows to
    inf, dw and db stay finite (float16 gradients would not)."""
    g, x, w, dy, cache, ref_cache = dw_backward_case(case, relu, bias, big)
    dx, dw, db = ops.depthwise_conv2d_backward(dy, cache, **kw(launch))
    want = R.float16_storage(R.conv2d_backward, dy, ref_cache, keep_float32=(1, 2))
    (same if g.F == g.C else within_one_step)(dx, want[0], "dx")
    assert dw.dtype == np.float32 and dw.shape == w.shape
    close32(dw, want[1], "dw")
    close32(dw, R.conv2d_backward(dy.astype(np.float64), ref_cache._replace(x=x.astype(np.float64)))[1], "dw (float64)")
    if bias:
        assert db.dtype == np.float32 and db.shape == (g.F,)
        close32(db, want[2], "db")
    else:
        assert db is None
    if big:
        assert np.isinf(dx).any() and np.isfinite(dw).all() and np.abs(dw).max() > 65504
    # input_grad=False: no dx, the same dw and db bits (the same launches)
    dx2, dw2, db2 = ops.depthwise_conv2d_backward(dy, cache, input_grad=False, **kw(launch))
    assert dx2 is None and dw2.tobytes() == dw.tobytes() and (db2 is None or db2.tobytes() == db.tobytes())


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("case", DW[:2], ids=DW_IDS[:2])
def test_emul_fp16_depthwise_backward_accumulates_into_float32(emul, case, launch):
    """accumulate_into float32 Parameter.grad arrays: dw and db added into them in place (float32,
    the fresh gradients plus what they held); float16 arrays there are refused, naming them."""
    g, x, w, dy, cache, _ = dw_backward_case(case, True, True, False, seed=3)
    dx, dw, db = ops.depthwise_conv2d_backward(dy, cache, **kw(launch))
    rng = np.random.default_rng(4)
    acc = (rng.standard_normal(w.shape).astype(np.float32), rng.standard_normal(g.F).astype(np.float32))
    before = tuple(a.copy() for a in acc)
    dx2, dw2, db2 = ops.depthwise_conv2d_backward(dy, cache, accumulate_into=acc, **kw(launch))
    assert dw2 is acc[0] and db2 is acc[1]
    same(dx2, dx, "dx")
    close32(dw2, before[0].astype(np.float64) + dw, "dw added")
    close32(db2, before[1].astype(np.float64) + db, "db added")
    refused = r"^accumulate_into\[dw\]: expected float32 \(the gradients of float16 dy\), got float16$"
    with pytest.raises(TypeError, match=refused):
        ops.depthwise_conv2d_backward(dy, cache, accumulate_into=(w.copy(), acc[1]))


@pytest.mark.parametrize("segments", [1, 2, 3, 7])
@pytest.mark.parametrize("bias", [0, 1])
def test_emul_fp16_depthwise_weight_grad_segments(emul, segments, bias):
    """dw (and db) over S segments: the float16 kernels write float32 partial sums and epilogue.cu's
    sum_segments_f32 adds them (no float16 one); the same bits whatever the grid for a given S, close
    to the float64 sums; accumulate_into adds."""
    g, x, w, dy, cache, ref_cache = dw_backward_case(DW[1], True, bias, False, seed=5)
    want = R.conv2d_backward(dy.astype(np.float64), ref_cache._replace(x=x.astype(np.float64)), input_grad=False)
    runs = []
    for grid, block in ((1, 4), (3, 4), (None, 4), (2, 32)):
        start = len(emul.log)
        _, dw, db = ops.depthwise_conv2d_backward(dy, cache, False, grid=grid, block=block, segments=segments)
        names = [k for k, _, _ in emul.log[start:]]
        assert "depthwise_conv_weight_grad_f16" in names and names.count("sum_segments_f32") == (segments > 1) * (1 + bias)
        assert not any(n.startswith("sum_segments") and not n.endswith("_f32") for n in names), names
        close32(dw, want[1], "dw")
        if bias:
            close32(db, want[2], "db")
        runs.append((dw, db))
        if block == 32:
            continue
        for a, b in zip(runs[0], (dw, db)):
            assert a is None or a.tobytes() == b.tobytes(), f"S={segments}: another grid, other bits"
    acc = (np.ones(w.shape, np.float32), np.full(g.F, 2, np.float32) if bias else None)
    ops.depthwise_conv2d_backward(dy, cache, False, accumulate_into=acc, segments=segments)
    close32(acc[0], 1 + want[1], "dw added")
    if bias:
        close32(acc[1], 2 + want[2], "db added")


def test_emul_fp16_depthwise_weight_grad_keeps_small_terms(emul):
    """float32 sums: 1e-4 * 1 added 20000 times is 2 (a float16 running sum would stall at 0.25)."""
    g = conv_geometry((1, 2, 100, 200), 2, 1, 1, 0, 1, 2)
    x = np.ones(g.x_shape, F16)
    dy = np.full(g.y_shape, 1e-4, F16)
    cache = Conv2dCache("cuda", g, x, np.ones((2, 1, 1, 1), F16), False, None, None, None)
    for segments in (1, 5):
        _, dw, _ = ops.depthwise_conv2d_backward(dy, cache, False, segments=segments)
        np.testing.assert_allclose(dw.reshape(-1), 20000 * float(F16(1e-4)), rtol=1e-5)


def test_emul_fp16_depthwise_through_conv2d(emul):
    """ops.conv2d_forward / conv2d_backward route a float16 depthwise convolution to these kernels
    (no GEMM), the gradients into float32 Parameter.grad arrays."""
    g, x, w, dy, cache, _ = dw_backward_case(DW[0], True, True, False, seed=6)
    b = data(np.random.default_rng(7), (g.F,))
    start = len(emul.log)
    y, c = ops.conv2d_forward(x, w, b, g, "relu")
    assert y.dtype == F16 and [k for k, _, _ in emul.log[start:]] == ["depthwise_conv_forward_f16"]
    same(y, ops.depthwise_conv2d_forward(x, w, b, g, "relu"), "y")
    acc = (np.zeros(w.shape, np.float32), np.zeros(g.F, np.float32))
    dx, dw, db = ops.conv2d_backward(dy, c, accumulate_into=acc)
    want = ops.depthwise_conv2d_backward(dy, c)
    same(dx, want[0], "dx")
    assert dw is acc[0] and db is acc[1] and dw.tobytes() == want[1].tobytes() and db.tobytes() == want[2].tobytes()


# ================================================================== adaptive average pooling
ADAPTIVE = [
    ((2, 3, 8, 8), (4, 4)),  # windows of 2x2, no overlap
    ((2, 3, 7, 9), (3, 4)),  # overlapping windows
    ((1, 2, 5, 5), (7, 2)),  # more outputs than inputs: windows one row tall, shared
    ((2, 2, 6, 10), (1, 1)),  # global: rows of 10 (NumPy's sum unrolls by 8 there)
    ((1, 1, 20, 3), (3, 3)),
]


def adaptive_forward_in_kernel_order(x, output_size):
    """float32 y = (the window's sum, row-major from 0) / its size: the kernel's order."""
    N, C, H, W = x.shape
    OH, OW = output_size
    y = np.empty((N, C, OH, OW), np.float32)
    for i, (h0, h1) in enumerate(R.adaptive_windows(H, OH)):
        for j, (w0, w1) in enumerate(R.adaptive_windows(W, OW)):
            s = np.zeros((N, C), np.float32)
            for h in range(h0, h1):
                for w in range(w0, w1):
                    s += x[:, :, h, w]
            y[:, :, i, j] = s / np.float32((h1 - h0) * (w1 - w0))
    return y


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("case", ADAPTIVE, ids=lambda c: f"{c[0]}->{c[1]}")
def test_emul_fp16_adaptive_avg_pool2d(emul, case, big, launch):
    """Forward: the window's sum in float (row-major) divided by its size, one rounding: bit for bit
    the float32 sums in that order, within one float16 step of the reference (NumPy's mean adds in
    its own order); a sum past 65504 stays a float sum (the mean of values near 60000 is finite).
    Backward: dy * (1 / |window|) added in the reference's order (windows i, then j, from 0) in
    float, one rounding: the reference's bits; overlapping windows' large terms overflow to inf."""
    shape, out = case
    rng = np.random.default_rng(9)
    x = data(rng, shape, big)
    y, cache = ops.adaptive_avg_pool2d_forward(x, out, **kw(launch))
    assert y.dtype == F16 and cache.dtype == F16
    same(y, R.float16_storage(adaptive_forward_in_kernel_order, x, out), "y (the kernel's order)")
    within_one_step(y, R.float16_storage(R.adaptive_avg_pool2d_forward, x, out)[0], "y (the reference)")
    full = np.full(shape, 60000, F16)  # every window's sum overflows float16; its mean is 60000
    assert (ops.adaptive_avg_pool2d_forward(full, out, **kw(launch))[0] == 60000).all()
    if big:
        assert np.isfinite(y).all()
    for dy in (data(rng, y.shape, big), np.full(y.shape, 60000, F16)):
        dx = ops.adaptive_avg_pool2d_backward(dy, cache, **kw(launch))
        same(dx, R.float16_storage(R.adaptive_avg_pool2d_backward, dy, cache), "dx")
    if out[0] > shape[2]:  # (h, w) = (2, 2) is in 3 x 2 windows: 60000 * (1/6 + 1/3 + 1/6) * 2 = 80000
        assert np.isinf(dx).any() and np.isinf(dx[:, :, 2, 2]).all()


# ================================================================== arguments, entry points
def test_emul_fp16_depthwise_pool_refuse_mixed_dtypes(emul):
    """A float16 kernel reads every array as float16: another dtype beside it is a one-line
    TypeError naming the argument, before any launch."""
    g, x, w, dy, cache, _ = dw_backward_case(DW[0], True, True, False, seed=8)
    b = np.zeros(g.F, F16)
    with pytest.raises(TypeError, match=r"^w: expected float16 \(the dtype of x\), got float32$"):
        ops.depthwise_conv2d_forward(x, w.astype(np.float32), b, g)
    with pytest.raises(TypeError, match=r"^b: expected float16 \(the dtype of x\), got float32$"):
        ops.depthwise_conv2d_forward(x, w, b.astype(np.float32), g)
    with pytest.raises(TypeError, match=r"^x: expected a float32, float64 or float16 array, got int32$"):
        ops.depthwise_conv2d_forward(x.astype(np.int32), w, b, g)
    with pytest.raises(TypeError, match=r"^x: expected float32 \(the dtype of dy\), got float16$"):
        ops.depthwise_conv2d_backward(dy.astype(np.float32), cache)
    with pytest.raises(TypeError, match=r"^y: expected float16 \(the dtype of dy\), got float32$"):
        ops.depthwise_conv2d_backward(dy, cache._replace(y=cache.y.astype(np.float32)))
    y, pcache = ops.adaptive_avg_pool2d_forward(x, (2, 2))
    with pytest.raises(TypeError, match=r"^dy: expected float16 \(the dtype of the forward's x\), got float32$"):
        ops.adaptive_avg_pool2d_backward(y.astype(np.float32), pcache)
    with pytest.raises(TypeError, match=r"^x: expected a float32, float64 or float16 array, got int32$"):
        ops.adaptive_avg_pool2d_forward(x.astype(np.int32), (2, 2))


def test_emul_fp16_depthwise_pool_entry_points(emul):
    """list_kernels names the float16 entry points; the emulation exports them with float16 (h*)
    arrays and the weight gradient's float32 (f*) partial sums."""
    from helpers import load_harness  # noqa: PLC0415

    kernels = cuda.list_kernels()
    assert {f"depthwise_conv_{k}_f16" for k in ("forward", "input_grad", "weight_grad")} <= set(kernels["depthwise"])
    assert {"adaptive_avg_pool2d_forward_f16", "adaptive_avg_pool2d_backward_f16"} <= set(kernels["pool"])
    lib = load_harness().build("depthwise")
    assert lib.signature("depthwise_conv_forward_f16")[:4] == ["h*"] * 4
    assert lib.signature("depthwise_conv_input_grad_f16")[:3] == ["h*"] * 3
    assert lib.signature("depthwise_conv_weight_grad_f16")[:3] == ["h*", "h*", "f*"]
    assert lib.signature("depthwise_conv_weight_grad_f32")[:3] == ["f*"] * 3
    assert load_harness().build("pool").signature("adaptive_avg_pool2d_backward_f16")[:2] == ["h*", "h*"]


# ================================================================== the order of the float sums
TINY = 2.0**-14  # half a float32 step at 1024: 1024 + TINY is a tie, which keeps 1024; TINY + TINY is a step


def reversed_f32_sum(terms):
    """The float32 sum of ``terms`` added last to first (another order, to show the test can tell)."""
    acc = np.float32(0)
    for t in terms[::-1]:
        acc = np.float32(acc + np.float32(t))
    return acc


def test_emul_fp16_sums_in_the_kernels_order(emul):
    """Terms planted so that the order of the float32 sum decides the float16 result: 1024 first,
    then the TINY terms (each lost), then 0.5: 1024.5, a tie that rounds to 1024; two TINY terms
    added before 1024 lift the sum past the tie (1025: the reversed order, or kw or kh reversed).
    The depthwise dx and the adaptive pooling's dx add in the reference's order (its bits); the
    adaptive forward adds row-major (the oracle's bits), where NumPy's mean adds otherwise (one
    float16 step from it)."""
    # depthwise dx (3x3, padding 1, w = 1): dx[3, 3] adds dy[4, 4], dy[4, 3], ..., dy[2, 2] (taps kh, kw)
    g = conv_geometry((1, 1, 6, 6), 1, 3, 1, 1, 1, 1)
    dy = np.zeros(g.y_shape, F16)
    dy[0, 0, 2:5, 2:5] = TINY
    dy[0, 0, 4, 4], dy[0, 0, 2, 2] = 1024, 0.5
    w = np.ones((1, 1, 3, 3), F16)
    cache = Conv2dCache("cuda", g, np.zeros(g.x_shape, F16), w, False, None, None, None)
    dx, _, _ = ops.depthwise_conv2d_backward(dy, cache)
    _, ref_cache = R.conv2d_forward(np.zeros(g.x_shape, np.float32), w.astype(np.float32), None, g)
    same(dx, R.float16_storage(R.conv2d_backward, dy, ref_cache._replace(w=w))[0], "depthwise dx")
    assert dx[0, 0, 3, 3] == 1024 and F16(reversed_f32_sum([1024] + [TINY] * 7 + [0.5])) == 1025
    # adaptive backward 3x3 -> 5x5 (windows 1, 2, 1, 2, 1 wide): dx[1, 1] = sum over (i, j) in {1, 2, 3}^2
    # of dy[i, j] / |window (i, j)|, planted as 1024, the TINY terms, 0.5
    sizes = np.array([h1 - h0 for h0, h1 in R.adaptive_windows(3, 5)], np.float32)
    terms = np.zeros((5, 5), np.float32)
    terms[1:4, 1:4] = TINY
    terms[1, 1], terms[3, 3] = 1024, 0.5
    dy = (terms * np.outer(sizes, sizes)).astype(F16).reshape(1, 1, 5, 5)  # (exact: sizes 1 and 2)
    _, pcache = ops.adaptive_avg_pool2d_forward(np.zeros((1, 1, 3, 3), F16), (5, 5))
    dx = ops.adaptive_avg_pool2d_backward(dy, pcache)
    same(dx, R.float16_storage(R.adaptive_avg_pool2d_backward, dy, pcache), "adaptive dx")
    assert dx[0, 0, 1, 1] == 1024 and F16(reversed_f32_sum(list(terms[1:4, 1:4].reshape(-1)))) == 1025
    # adaptive forward, one 2x4 window (the division by 8 is exact): (1024 + lost terms + 0.5) / 8, a tie
    x = np.full((1, 1, 2, 4), TINY, F16)
    x[0, 0, 0, 0], x[0, 0, 1, 3] = 1024, 0.5
    y, _ = ops.adaptive_avg_pool2d_forward(x, (1, 1))
    same(y, R.float16_storage(adaptive_forward_in_kernel_order, x, (1, 1)), "adaptive y")
    assert y[0, 0, 0, 0] == 128 and F16(reversed_f32_sum(list(x.reshape(-1))) / np.float32(8)) == 128.125
    within_one_step(y, R.float16_storage(R.adaptive_avg_pool2d_forward, x, (1, 1))[0], "adaptive y (the reference)")
