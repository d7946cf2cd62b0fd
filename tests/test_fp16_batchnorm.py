"""BatchNorm's float16 entry points (kernels/batchnorm.cu, CNN_ENTRY_POINTS_FP16), run on the CPU by
the g++ emulation: x, y, dy, dx, gamma and beta float16; the statistics (the segments' sums, mean,
invstd, the running statistics, updated in place) and dgamma / dbeta float32, as the float32
Parameter.grad of float16 training. Held to the reference's float16 storage mode
(functional/reference.py float16_storage: float16 arrays read into float32, computed in float32,
y and dx rounded once to float16; the float32 running statistics it updates in place, the float32
statistics in its cache and, with ``keep_float32``, dgamma / dbeta stay float32):

* bit for bit where the kernel computes in the reference's order from the same float32 values:
  fixed statistics (eval: mean and var are the running statistics), and batch statistics of
  inputs whose float32 sums are exact (small integers, 16 or 64 values a channel: every sum and
  square exact, so the kernel's tree order and NumPy's pairwise order agree);
* else within one float16 ulp (y, dx): the kernel sums each channel in a fixed tree order
  (segments, then a block tree), NumPy pairwise, so the float32 mean, invstd and the backward's
  sums differ in their last bits, and a float32 value this close to a float16 rounding boundary
  may round to the neighbouring float16; the float32 statistics and dgamma / dbeta agree within
  1e-5 of the sums' magnitude (the two summation orders' error bound, with room).

Normal inputs and inputs whose y and dx overflow float16 (inf, as __float2half_rn gives) while the
float32 statistics stay finite (x near 30000: its sums would overflow float16 too); 4-D (N, C, H, W)
and 2-D (N, C) inputs; default launch and a tiny grid (grid=2, block=32); segments auto and 3.

Every test has "emul" in its name (``pytest -k emul``)."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from cnn_gpu import cuda
from cnn_gpu.cuda import ops
from cnn_gpu.functional import reference as R

if os.name != "posix":
    pytest.skip("the CUDA emulation needs a POSIX system with g++", allow_module_level=True)

from helpers import emulated_kernels  # noqa: E402
from helpers import same_f16 as same

F16, F32 = np.float16, np.float32
LAUNCHES = [None, (2, 32)]  # the default grid, and a tiny one (the grid-stride loops loop)
LAUNCH_IDS = ["default", "g2b32"]
MOMENTUM, EPS = 0.25, 1e-5


@pytest.fixture(scope="module")
def emul():
    with emulated_kernels() as launcher:
        yield launcher


def kw(launch, segments=None):
    out = {} if launch is None else {"grid": launch[0], "block": launch[1]}
    return out if segments is None else dict(out, segments=segments)


def within_ulp(got, want, what, slack=0.0):
    """float16 arrays within one float16 ulp of ``want`` (its spacing: 65504's is inf, so a value
    the float32 noise pushes past 65504 may be inf); inf where ``want`` is inf, of its sign.
    ``slack`` (float64, broadcast): what the two float32 summation orders may add where the value
    is a small difference of large terms (1e-5 of the terms: under 1e-3 of an ulp elsewhere)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == F16 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=what)
    g, w = got[~inf].astype(np.float64), want[~inf].astype(np.float64)
    ulp = np.spacing(np.abs(want[~inf])).astype(np.float64) + np.broadcast_to(slack, want.shape)[~inf]
    bad = ~(np.abs(g - w) <= ulp)
    assert not bad.any(), f"{what}: {bad.sum()} values more than one float16 ulp apart, e.g. {g[bad][:3]} vs {w[bad][:3]}"


def close_sums(got, want, scale, what):
    """float32 per-channel results within 1e-5 of ``scale`` (the channel's sum of magnitudes)."""
    assert got.dtype == want.dtype == F32, (what, got.dtype, want.dtype)
    assert np.isfinite(got).all(), what
    assert (np.abs(got.astype(np.float64) - want) <= 1e-5 * scale + 1e-30).all(), (what, got, want)


def channel_sum(a):
    """(C,) float64 sums over every axis but 1."""
    a = np.asarray(a, np.float64)
    return a.sum(axis=(0,) + tuple(range(2, a.ndim)))


def inputs(rng, shape, big, affine):
    """x, dy (float16), gamma, beta (float16 or None): normal, or (``big``) x = 30000 + a few
    hundred (its float16 sums would overflow; float32's hold them), dy up to +-60000, gamma and
    beta 30000-60000 of one sign per channel, so y (xhat gamma + beta, |xhat| up to 1.7) and dx overflow float16."""
    C = shape[1]
    if big:
        x = 30000 + rng.uniform(-300, 300, shape)
        sign = rng.choice([-1.0, 1.0], C)
        dy, gamma, beta = rng.uniform(-6e4, 6e4, shape), sign * rng.uniform(3e4, 6e4, C), sign * rng.uniform(3e4, 6e4, C)
    else:
        x = rng.standard_normal(shape) * 2 + 1
        dy, gamma, beta = rng.standard_normal(shape), rng.standard_normal(C), rng.standard_normal(C)
    gamma, beta = (gamma.astype(F16), beta.astype(F16)) if affine else (None, None)
    return x.astype(F16), dy.astype(F16), gamma, beta


def running(rng, C, big):
    """float32 running statistics; (``big``) a mean near x's and a variance small enough that the
    fixed-statistics y and dx overflow float16."""
    if big:
        return (30000 + rng.uniform(-50, 50, C)).astype(F32), rng.uniform(1e-6, 1e-5, C).astype(F32)
    return rng.standard_normal(C).astype(F32), (rng.random(C) + 0.5).astype(F32)


def seeded(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def pc(v, x):
    """(C,) -> broadcastable against x along axis 1."""
    return np.asarray(v).reshape((1, -1) + (1,) * (x.ndim - 2))


def normalise(x, mean, invstd, gamma, beta, relu):
    """The reference's y from given float32 statistics (reference.batch_norm_forward's lines after
    the statistics, in its order), in float16 storage: the kernel's y, bit for bit, from its own
    mean and invstd."""

    def f(x, gamma, beta):
        y = (x - pc(mean, x)) * pc(invstd, x)
        if gamma is not None:
            y *= pc(gamma, x)
        if beta is not None:
            y += pc(beta, x)
        return np.maximum(y, 0) if relu else y

    return R.float16_storage(f, x, gamma, beta)


def check_forward(y, cache, want, ref_cache, x, gamma, beta, relu):
    """y float16, mean and invstd float32, held to the reference (module docstring)."""
    assert y.dtype == F16 and cache.mean.dtype == cache.invstd.dtype == F32 and cache.x is not None
    if not cache.batch_stats:  # fixed statistics: the reference's values and order
        same(y, want, "y")
        assert cache.mean.tobytes() == ref_cache.mean.tobytes() and cache.invstd.tobytes() == ref_cache.invstd.tobytes()
        return
    M = x.size // x.shape[1]
    close_sums(cache.mean, ref_cache.mean, channel_sum(np.abs(x)) / M, "mean")
    close_sums(cache.invstd, ref_cache.invstd, ref_cache.invstd, "invstd")
    same(y, normalise(x, cache.mean, cache.invstd, gamma, beta, relu), "y from the kernel's statistics")
    xhat = (x.astype(np.float64) - pc(ref_cache.mean, x)) * pc(ref_cache.invstd, x)
    terms = np.abs(xhat) * (1.0 if gamma is None else np.abs(pc(gamma, x).astype(np.float64)))
    within_ulp(y, want, "y", 1e-5 * (terms + (0.0 if beta is None else np.abs(pc(beta, x).astype(np.float64)))))


def check_backward(got, want, dy, cache):
    """dx float16 (bit for bit with fixed statistics, else one ulp: the sums' order), dgamma and
    dbeta float32 within 1e-5 of their sums of magnitudes."""
    (dx, dg, db), (wdx, wdg, wdb) = got, want
    x = cache.x.astype(np.float64)
    delta = dy.astype(np.float64) * (cache.y > 0) if cache.activation == "relu" else dy.astype(np.float64)
    xhat = (x - pc(cache.mean, x)) * pc(cache.invstd, x)
    for g, w, terms, what in ((dg, wdg, delta * xhat, "dgamma"), (db, wdb, delta, "dbeta")):
        if w is None:
            assert g is None, what
        else:
            close_sums(g, w, channel_sum(np.abs(terms)), what)
    if not cache.batch_stats:
        same(dx, wdx, "dx")
        return
    gj = delta if cache.gamma is None else delta * pc(cache.gamma, x).astype(np.float64)
    M = x.size // x.shape[1]
    sums = (pc(channel_sum(np.abs(gj)), x) + np.abs(xhat) * pc(channel_sum(np.abs(gj * xhat)), x)) / M
    within_ulp(dx, wdx, "dx", 1e-5 * (np.abs(gj) + sums) * pc(cache.invstd, x))


SHAPES = [(4, 3, 5, 6), (9, 4), (2, 3, 23, 7)]  # 4-D, 2-D, and 5x... maps of P = 161 (a step crosses rows)
MODES = ["train", "eval", "batch"]  # batch statistics + running update; fixed statistics; batch, no running


@pytest.mark.parametrize("segments", [None, 3], ids=["S-auto", "S3"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emul_fp16_batch_norm(emul, shape, mode, affine, relu, big, launch, segments):
    """Forward (y, the statistics, the running statistics and num_batches_tracked) and backward (dx,
    dgamma, dbeta) of float16 x against the reference's float16 storage mode (module docstring);
    the backward's reference gets the kernel's cache (its float16 y: the ReLU's mask is the stored y's)."""
    rng = seeded("bn16", shape, mode, affine, relu, big)
    x, dy, gamma, beta = inputs(rng, shape, big, affine)
    rm, rv = running(rng, shape[1], big) if mode != "batch" else (None, None)
    rm_ref, rv_ref = (None, None) if rm is None else (rm.copy(), rv.copy())
    training, act, count = mode == "train", "relu" if relu else None, np.array(5, np.int64)
    y, cache = ops.batch_norm_forward(
        x, gamma, beta, rm, rv, training, MOMENTUM, EPS, act, num_batches_tracked=count, **kw(launch, segments)
    )
    want, ref_cache = R.float16_storage(R.batch_norm_forward, x, gamma, beta, rm_ref, rv_ref, training, MOMENTUM, EPS, act)
    check_forward(y, cache, want, ref_cache, x, gamma, beta, relu)
    assert int(count) == (6 if training else 5)
    if rm is not None:
        assert rm.dtype == rv.dtype == F32 and np.isfinite(rm).all() and np.isfinite(rv).all()
        close_sums(rm, rm_ref, np.abs(rm_ref) + channel_sum(np.abs(x)) / (x.size // shape[1]), "running_mean")
        close_sums(rv, rv_ref, rv_ref, "running_var")
    got = ops.batch_norm_backward(dy, cache, **kw(launch, segments))
    with np.errstate(over="ignore"):
        want_b = R.float16_storage(R.batch_norm_backward, dy, cache, keep_float32=(1, 2))
    check_backward(got, want_b, dy, cache)
    if big and (affine or mode == "eval"):  # float16 overflows, the float32 statistics do not
        assert np.isinf(y).any() and np.isinf(got[0]).any()
        assert np.isfinite(cache.mean).all() and np.isfinite(cache.invstd).all()


@pytest.mark.parametrize("segments", [None, 3], ids=["S-auto", "S3"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("shape", [(4, 2, 4, 4), (16, 3)], ids=["4x2x4x4", "16x3"])
def test_emul_fp16_batch_norm_exact_sums_bit_for_bit(emul, shape, relu, launch, segments):
    """Batch statistics of small integers, M = 64 or 16 values a channel: every float32 sum (x, its
    squared deviations from the mean k/M, dy) is exact in any order, so the kernel's tree sums are
    NumPy's: mean, invstd, the running statistics, y and dbeta bit for bit; dx within one ulp and
    dgamma close (their sums of dy * xhat round)."""
    rng = seeded("bn16-exact", shape, relu)
    C = shape[1]
    x, dy = rng.integers(-4, 5, shape).astype(F16), rng.integers(-8, 9, shape).astype(F16)
    gamma, beta = rng.standard_normal(C).astype(F16), rng.standard_normal(C).astype(F16)
    rm, rv = running(rng, C, False)
    rm_ref, rv_ref, count = rm.copy(), rv.copy(), np.array(0, np.int64)
    act = "relu" if relu else None
    y, cache = ops.batch_norm_forward(
        x, gamma, beta, rm, rv, True, 0.1, EPS, act, num_batches_tracked=count, **kw(launch, segments)
    )
    want, ref_cache = R.float16_storage(R.batch_norm_forward, x, gamma, beta, rm_ref, rv_ref, True, 0.1, EPS, act)
    same(y, want, "y")
    for got, ref, what in (
        (cache.mean, ref_cache.mean, "mean"),
        (cache.invstd, ref_cache.invstd, "invstd"),
        (rm, rm_ref, "rm"),
        (rv, rv_ref, "rv"),
    ):
        assert got.dtype == F32 and got.tobytes() == ref.tobytes(), what
    assert int(count) == 1
    got = ops.batch_norm_backward(dy, cache, **kw(launch, segments))
    want_b = R.float16_storage(R.batch_norm_backward, dy, cache, keep_float32=(1, 2))
    assert got[2].dtype == F32 and got[2].tobytes() == want_b[2].tobytes(), "dbeta"
    check_backward(got, want_b, dy, cache)


@pytest.mark.parametrize("segments", [1, 7])
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
def test_emul_fp16_batch_norm_accumulates_and_counts(emul, launch, segments):
    """dgamma and dbeta added into float32 arrays (adjacent views of one buffer, as Parameter.grad
    of float16 training): the float32 sum of what was there and the kernel's own dgamma, dbeta, bit
    for bit; gamma without beta (accumulate_into (dgamma, None)); num_batches_tracked counts the
    training forward only."""
    rng = seeded("bn16-acc", launch, segments)
    x, dy, gamma, beta = inputs(rng, (3, 4, 5, 3), False, True)
    count, flat = np.array(41, np.int64), rng.standard_normal(8).astype(F32)
    rm, rv = running(rng, 4, False)
    y, cache = ops.batch_norm_forward(
        x, gamma, beta, rm, rv, True, 0.1, EPS, "relu", num_batches_tracked=count, **kw(launch, segments)
    )
    ops.batch_norm_forward(x, gamma, beta, rm, rv, False, 0.1, EPS, num_batches_tracked=count, **kw(launch, segments))
    assert int(count) == 42
    dx0, dg0, db0 = ops.batch_norm_backward(dy, cache, **kw(launch, segments))
    start = flat.copy()
    dx, dg, db = ops.batch_norm_backward(dy, cache, accumulate_into=(flat[:4], flat[4:]), **kw(launch, segments))
    assert np.shares_memory(dg, flat) and np.shares_memory(db, flat)
    assert flat.tobytes() == (start + np.concatenate([dg0, db0])).tobytes()
    same(dx, dx0, "dx (accumulate changes only dgamma, dbeta)")
    _, c2 = ops.batch_norm_forward(x, gamma, None, None, None, True, 0.1, EPS, **kw(launch, segments))
    acc = flat[:4].copy()
    _, dg2, db2 = ops.batch_norm_backward(dy, c2, accumulate_into=(acc, None), **kw(launch, segments))
    want = R.float16_storage(R.batch_norm_backward, dy, c2, keep_float32=(1, 2))
    assert db2 is None and want[2] is None
    close_sums(acc - flat[:4], want[1], channel_sum(np.abs(dy)) * 2, "dgamma (no beta)")


def test_emul_fp16_batch_norm_refuses_bad_dtypes(emul):
    """One line naming the argument: gamma, beta and dy of x's dtype; the running statistics and
    accumulate_into float32 for float16 x; a dtype without a kernel."""
    x, v16, v32 = np.ones((2, 3, 2, 2), F16), np.ones(3, F16), np.ones(3, F32)
    with pytest.raises(TypeError, match=r"^gamma: expected a float16 array \(x's dtype\), got float32$"):
        ops.batch_norm_forward(x, v32, None, None, None, True, 0.1, EPS)
    with pytest.raises(
        TypeError, match=r"^running_var: expected a float32 array \(the statistics' dtype for float16 x\), got float16$"
    ):
        ops.batch_norm_forward(x, None, None, v32.copy(), v16.copy(), True, 0.1, EPS)
    with pytest.raises(TypeError, match=r"^x: expected a float32, float64 or float16 array, got int32$"):
        ops.batch_norm_forward(x.astype(np.int32), None, None, None, None, True, 0.1, EPS)
    _, cache = ops.batch_norm_forward(x, v16, v16, None, None, True, 0.1, EPS)
    with pytest.raises(TypeError, match=r"^dy: expected a float16 array \(x's dtype\), got float32$"):
        ops.batch_norm_backward(x.astype(F32), cache)
    with pytest.raises(
        TypeError,
        match=r"^accumulate_into\[dbeta\]: expected a float32 array \(the statistics' dtype for float16 x\), got float16$",
    ):
        ops.batch_norm_backward(x, cache, accumulate_into=(v32.copy(), v16.copy()))
    with pytest.raises(TypeError, match=r"^running_mean: expected a float64 array \(x's dtype\), got float32$"):
        ops.batch_norm_forward(x.astype(np.float64), None, None, v32.copy(), v32.copy(), True, 0.1, EPS)


def test_emul_fp16_batch_norm_entry_points(emul):
    """Every BatchNorm kernel has a float16 entry point: float16 x, y, dy, dx, gamma, beta ("h*"),
    float32 partial sums, statistics, running statistics, dgamma, dbeta ("f*") and scalars ("f")."""
    names = ("batch_norm_sum", "batch_norm_sq", "batch_norm_forward", "batch_norm_backward_sums", "batch_norm_backward")
    assert {f"{n}_f16" for n in names} <= set(cuda.list_kernels()["batchnorm"])
    from helpers import load_harness  # noqa: PLC0415

    lib = load_harness().build("batchnorm")
    assert lib.signature("batch_norm_sum_f16")[:2] == ["h*", "f*"]
    fwd = lib.signature("batch_norm_forward_f16")
    assert fwd[:4] == ["h*"] * 4 and fwd[4:10] == ["f*"] * 6 and fwd[10] == "q*" and fwd[-4:] == ["f"] * 4
    assert lib.signature("batch_norm_backward_sums_f16")[:7] == ["h*"] * 3 + ["f*"] * 4
    assert lib.signature("batch_norm_backward_f16")[:11] == ["h*"] * 4 + ["f*"] * 4 + ["h*"] + ["f*"] * 2
    assert lib.signature("batch_norm_forward_f32")[:10] == ["f*"] * 10  # unchanged: float32 throughout
