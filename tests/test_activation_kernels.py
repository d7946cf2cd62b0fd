"""kernels/activation.cu: LeakyReLU, Sigmoid, Tanh and GELU (exact and tanh forms), forward and
backward in one launch each, run on the CPU by the g++ emulation (tests/emulation), against the
reference (functional/reference.py):

* float32 / float64: the kernels compute the reference's formulas in its order, so they agree with
  it to the math library's rounding: bit for bit where no library function is called (LeakyReLU,
  the Sigmoid and Tanh backward from the cached y); elsewhere within a few ulp of the terms that
  the formula adds (glibc's expf / tanhf / erff here, CUDA's on a GPU, NumPy's SIMD exp / tanh and
  SciPy's erf in the reference each round differently in the last bit; GELU's 1 + erf(..) and
  1 + tanh(..) cancel for negative x, so the bound scales with |x|, not with the small result);
* float16 storage: held to ``reference.float16_storage(op)`` (float arithmetic, one rounding
  where stored): bit for bit without a library call, else within one float16 rounding plus the
  float32 difference above (the reference's float32 value and ours may straddle a float16
  rounding boundary), on ordinary inputs and on inputs whose results overflow float16;
* NaN / inf inputs, the default launch and a tiny grid (the grid-stride loops loop), strided
  inputs, one-line errors, and a finite-difference gradient check of each layer through the CUDA
  engine in float64.

Every test has "emul" in its name (``pytest -k emul``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

import numpy as np
import pytest

from cnn_gpu import cuda, nn
from cnn_gpu.cuda import ops
from cnn_gpu.functional import reference as R
from cnn_gpu.functional.caches import GeluCache

if os.name != "posix":
    pytest.skip("the CUDA emulation needs a POSIX system with g++", allow_module_level=True)

from helpers import F16_LAUNCH_IDS as LAUNCH_IDS  # noqa: E402
from helpers import F16_LAUNCHES as LAUNCHES  # noqa: E402
from helpers import emulated_kernels  # noqa: E402
from helpers import launch_kw as kw  # noqa: E402

F16 = np.float16
# name -> (the op's name in ops / reference, its extra forward arguments)
OPS = {
    "leaky": ("leaky_relu", (0.01,)),
    "leaky_steep": ("leaky_relu", (2.0,)),  # a slope > 1: x * slope may overflow float16
    "sigmoid": ("sigmoid", ()),
    "tanh": ("tanh", ()),
    "gelu": ("gelu", ("none",)),
    "gelu_tanh": ("gelu", ("tanh",)),
}
EXACT = {"leaky", "leaky_steep"}  # no math library call in forward or backward: bit for bit
EXACT_BACKWARD = EXACT | {"sigmoid", "tanh"}  # the backward is arithmetic on the cached y


@pytest.fixture  # per test: the stand-in tests below must not run under this launcher
def emul():
    with emulated_kernels() as launcher:
        yield launcher


def forward(op, x, **launch):
    name, extra = OPS[op]
    return getattr(ops, f"{name}_forward")(x, *extra, **launch)


def backward(op, dy, cache, **launch):
    return getattr(ops, f"{OPS[op][0]}_backward")(dy, cache, **launch)


def ref_forward(op, x):
    name, extra = OPS[op]
    with np.errstate(all="ignore"):  # NumPy warns of the NaN and inf inputs
        return getattr(R, f"{name}_forward")(x, *extra)


def ref_backward(op, dy, cache):
    with np.errstate(all="ignore"):
        return getattr(R, f"{OPS[op][0]}_backward")(dy, cache)


def scales(op, x, dy=None):
    """The magnitude of the terms the formula adds before it rounds (of y, or with ``dy`` of dx):
    a library function's last-bit difference is relative to these, not to a result they cancel to."""
    a = np.abs(x.astype(np.float64))
    if dy is None:  # GELU: 0.5 x (1 + ..), the sum cancelling for negative x; sigmoid, tanh: <= 1
        return np.ones_like(a) if op in ("sigmoid", "tanh") else a
    with np.errstate(over="ignore", invalid="ignore"):  # GELU's f'(x): 0.5 (1 + ..) + x (..)
        inner = 1 + a + (a * (1 + 3 * 0.044715 * a * a) if op == "gelu_tanh" else 0)
        return np.abs(dy.astype(np.float64)) * inner


def within(got, want, tol, what):
    """NaN where ``want`` is NaN, the same infinities, finite values within ``tol`` (elementwise)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    assert (np.isnan(got) == np.isnan(want)).all(), f"{what}: NaN at {np.flatnonzero(np.isnan(got) != np.isnan(want))[:5]}"
    fin = np.isfinite(want)
    assert (got[~fin & ~np.isnan(want)] == want[~fin & ~np.isnan(want)]).all(), f"{what}: infinities differ"
    err = np.abs(got[fin].astype(np.float64) - want[fin].astype(np.float64))
    bad = np.flatnonzero(~(err <= np.broadcast_to(tol, want.shape)[fin]))
    assert bad.size == 0, f"{what}: {bad.size} values off, e.g. got {got[fin][bad[:3]]} want {want[fin][bad[:3]]}"


def same(got, want, what):
    """Bit for bit (NaN where NaN; +0 and -0 told apart)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    ok = np.array_equal(got, want, equal_nan=True) and (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all()
    assert ok, f"{what}: {np.flatnonzero(~((got == want) | (np.isnan(got) & np.isnan(want))))[:5]}"


def with_specials(a):
    """NaN, +-inf, +-0 and large values sprinkled over ``a`` (a copy)."""
    a = a.copy()
    big = 60000.0 if a.dtype == F16 else 1e4
    for start, v in enumerate([np.nan, np.inf, -np.inf, 0.0, -0.0, big, -big, 30.0, -30.0, -100.0]):
        a.flat[start::23] = v
    return a


def data(rng, shape, dtype, big=False):
    v = rng.uniform(-60000.0, 60000.0, shape) if big else rng.standard_normal(shape) * 3
    return v.astype(dtype)


# ============================================================================ float32 / float64
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_emul_activation_matches_the_reference(emul, dtype, op, launch):
    """Forward and backward (the backward fed the kernel's own cache, also given to the reference's
    backward) vs the reference: bit for bit without a library call, else within 4 ulp of the
    formula's terms (see the module's docstring)."""
    rng = np.random.default_rng(len(op))
    x = with_specials(data(rng, (3, 5, 47), dtype))
    dy = with_specials(data(rng, x.shape, dtype)[::-1].copy())
    y, cache = forward(op, x, **kw(launch))
    want, ref_cache = ref_forward(op, x)
    assert type(cache) is type(ref_cache) and y.flags.c_contiguous
    dx = backward(op, dy, cache, **kw(launch))
    want_dx = ref_backward(op, dy, cache)
    eps, tiny = np.finfo(dtype).eps, 4 * np.finfo(dtype).smallest_subnormal
    if op in EXACT:
        same(y, want, "forward")
    else:
        within(y, want, 4 * eps * scales(op, x) + tiny, "forward")
    if op in EXACT_BACKWARD:
        same(dx, want_dx, "backward")
    else:
        within(dx, want_dx, 4 * eps * scales(op, x, dy) + tiny, "backward")
    assert np.isnan(y).any() and np.isnan(dx).any()  # the specials went through


@contextlib.contextmanager
def libm_functions(monkeypatch):
    """The reference's exp, tanh and erf replaced by the C library's (expf / exp, tanhf / tanh,
    erff / erf by dtype): the functions the emulated kernels call. With them the reference's
    formulas give the kernels' bits exactly, so any difference is in the order of operations."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))

    def wrap(f32, f64):
        fns = {}
        for dt, name, ctype in ((np.float32, f32, ctypes.c_float), (np.float64, f64, ctypes.c_double)):
            fn = getattr(libm, name)
            fn.restype, fn.argtypes = ctype, [ctype]
            fns[np.dtype(dt)] = np.frompyfunc(fn, 1, 1)
        return lambda a: fns[np.asarray(a).dtype](a).astype(np.asarray(a).dtype)

    with monkeypatch.context() as m:
        m.setattr(R, "_erf", wrap("erff", "erf"))
        m.setattr(np, "exp", wrap("expf", "exp"))
        m.setattr(np, "tanh", wrap("tanhf", "tanh"))
        yield


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, F16], ids=["f32", "f64", "f16"])
def test_emul_activation_order_is_the_reference_s(emul, monkeypatch, dtype, op):
    """Given the same exp / tanh / erf values (the C library's, as the emulated kernels call them),
    the reference's formulas give the kernels' results bit for bit, in every dtype (float16: in
    float16_storage's mode): the kernels add and multiply in the reference's order."""
    rng = np.random.default_rng(2 + len(op))
    x = with_specials(data(rng, (5, 61), dtype))
    dy = with_specials(data(rng, x.shape, dtype)[::-1].copy())
    y, cache = forward(op, x)
    dx = backward(op, dy, cache)
    with libm_functions(monkeypatch):
        if dtype == F16:
            want, _ = R.float16_storage(ref_forward, op, x)
            want_dx = R.float16_storage(ref_backward, op, dy, cache)
        else:
            want, _ = ref_forward(op, x)
            want_dx = ref_backward(op, dy, cache)
    same(y, want, "forward")
    same(dx, want_dx, "backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_emul_activation_saturation_and_specials(emul, dtype):
    """Known values where the functions saturate or meet inf / NaN: sigmoid never overflows
    (exp(-|x|)), tanh is exactly +-1 far out and its gradient 0 there, GELU(inf) = inf and
    GELU(-inf) = -inf * 0 = NaN as in the reference; a NaN gradient stays NaN."""
    x = np.array([np.nan, np.inf, -np.inf, 1000.0, -1000.0, -100.0, 40.0, 0.0, -0.0], dtype)
    s, _ = ops.sigmoid_forward(x)
    same(s[:5], np.array([np.nan, 1, 0, 1, 0], dtype), "sigmoid")
    assert 0 < s[5] < 1e-43 and s[6] == 1 and s[7] == 0.5 == s[8]  # sigmoid(-100) is subnormal in float32
    t, t_cache = ops.tanh_forward(x)
    same(t, np.array([np.nan, 1, -1, 1, -1, -1, 1, 0.0, -0.0], dtype), "tanh")
    dt = ops.tanh_backward(np.array([1, 1, 1, 1, 1, np.nan, 2, 2, 3], dtype), t_cache)
    same(dt, np.array([np.nan, 0, 0, 0, 0, np.nan, 0, 2, 3], dtype), "tanh'")
    for approximate in ("none", "tanh"):
        g, g_cache = ops.gelu_forward(x, approximate)
        same(g[:5], np.array([np.nan, np.inf, np.nan, 1000, -0.0], dtype), f"gelu {approximate}")
        same(g, ref_forward("gelu" if approximate == "none" else "gelu_tanh", x)[0], f"gelu {approximate} vs the reference")
        dg = ops.gelu_backward(np.ones_like(x), g_cache)
        same(dg[[0, 3, 4, 6]], np.array([np.nan, 1, 0, 1], dtype), f"gelu' {approximate}")
    lk, lk_cache = ops.leaky_relu_forward(x, 0.5)
    same(lk, np.array([np.nan, np.inf, -np.inf, 1000, -500, -50, 40, 0.0, -0.0], dtype), "leaky")
    same(ops.leaky_relu_backward(np.full_like(x, 2), lk_cache), np.array([1, 2, 1, 2, 1, 1, 2, 1, 1], dtype), "leaky'")


# ============================================================================ float16 storage
def _up_to_one_rounding(got, want, extra, what):
    """float16 ``got`` within one float16 rounding of ``want`` (+ ``extra``, the float32 terms' last-
    bit differences that can move the value across a rounding boundary; tiny next to a float16 ulp
    except where GELU's sum cancels)."""
    with np.errstate(invalid="ignore"):  # (of NaN and inf, which within() compares exactly)
        ulp = np.spacing(np.abs(want).astype(F16)).astype(np.float64)
    within(got, want, ulp + extra, what)


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("big", [False, True], ids=["normal", "overflow"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_emul_fp16_activation_matches_float16_storage(emul, op, big, launch):
    """float16 storage: read into float, computed in float, rounded once (as float16_storage). With
    ``big``: x in +-60000 (leaky_steep's 2x overflows to inf) and dy in +-65000 with x in +-2
    (GELU's slope, up to 1.13 there, overflows dx); inf, as __float2half_rn, where the float32 value is
    beyond 65504."""
    rng = np.random.default_rng(7 + len(op))
    x = with_specials(data(rng, (4, 3, 53), F16, big))
    y, cache = forward(op, x, **kw(launch))
    assert y.dtype == F16
    want, _ = R.float16_storage(ref_forward, op, x)
    if op in EXACT:
        same(y, want, "forward")
    else:
        _up_to_one_rounding(y, want, 4 * 2.0**-24 * scales(op, x), "forward")
    # the backward: with big, x where GELU's slope exceeds 1 and dy up to 65000 (finite)
    xb = with_specials(rng.uniform(-2.0, 2.0, x.shape).astype(F16)) if big else x
    _, cache = forward(op, xb, **kw(launch))
    dy = with_specials((rng.uniform(-65000.0, 65000.0, x.shape) if big else rng.standard_normal(x.shape)).astype(F16))
    dx = backward(op, dy, cache, **kw(launch))
    want_dx = R.float16_storage(ref_backward, op, dy, cache)
    if op in EXACT_BACKWARD:
        same(dx, want_dx, "backward")
    else:
        _up_to_one_rounding(dx, want_dx, 4 * 2.0**-24 * scales(op, xb, dy), "backward")
    if big and op == "leaky_steep":
        assert np.isinf(y[np.isfinite(x)]).any(), "the overflow case should overflow float16"
    if big and op.startswith("gelu"):
        assert np.isinf(dx[np.isfinite(dy) & np.isfinite(xb)]).any(), "the overflow case should overflow float16"


# ============================================================================ launching, errors
def test_emul_activation_strided_input_is_copied(emul):
    """A user's strided view is made contiguous for the kernel (as every launcher of the engine
    does); the result is the contiguous input's, and the cache holds the contiguous copy."""
    base = np.random.default_rng(3).standard_normal((4, 6, 10))
    x = base[:, ::2, ::-1]
    for op in OPS:
        y, cache = forward(op, x)
        same(y, forward(op, np.ascontiguousarray(x))[0], op)
        dy = base[::-1, 1::2, :]
        same(backward(op, dy, cache), backward(op, np.ascontiguousarray(dy), cache), f"{op} backward")


def test_emul_activation_launch_errors_name_the_argument(emul):
    x = np.zeros((2, 3), np.float32)
    for op in OPS:
        with pytest.raises(TypeError, match=r"^x: expected a float32, float64 or float16 array, got int32$"):
            forward(op, x.astype(np.int32))
        _, cache = forward(op, x)
        with pytest.raises(TypeError, match=r"^dy: expected a float32, float64 or float16 array, got int64$"):
            backward(op, x.astype(np.int64), _as(cache, np.int64))
        with pytest.raises(TypeError, match=r"^[xy]: expected dy's dtype float64, got float32$"):
            backward(op, x.astype(np.float64), cache)
        with pytest.raises(ValueError, match=r"^[xy]: expected dy's shape \(3, 2\), got \(2, 3\)$"):
            backward(op, x.reshape(3, 2), cache)
    with pytest.raises(ValueError, match=r"^approximate: expected 'none' or 'tanh', got 'erf'$"):
        ops.gelu_forward(x, "erf")
    with pytest.raises(ValueError, match="block: expected"):
        ops.tanh_forward(x, block=2048)


def _as(cache, dtype):
    """A cache (y, (x, slope) or GeluCache) with its array cast to ``dtype``."""
    if isinstance(cache, GeluCache):
        return cache._replace(x=cache.x.astype(dtype))
    return (cache[0].astype(dtype), cache[1]) if isinstance(cache, tuple) else cache.astype(dtype)


def test_emul_activation_entry_points_listed(emul):
    """activation.cu's kernels are listed (f32, f64, f16 each), and the emulation exports each."""
    names = set(cuda.list_kernels()["activation"])
    stems = [f"{op}_{d}" for op in ("leaky_relu", "sigmoid", "tanh", "gelu") for d in ("forward", "backward")]
    assert names == {f"{s}_{t}" for s in stems for t in ("f32", "f64", "f16")}
    from helpers import load_harness  # noqa: PLC0415

    assert load_harness().build("activation").signature("gelu_backward_f16") == ["h*", "h*", "h*", "q", "i"]


# ============================================================================ the layers, on the CUDA engine
LAYERS = {
    "leaky": lambda: nn.LeakyReLU(0.01),  # the names and arguments of OPS
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_emul_activation_layer_gradcheck_on_the_cuda_engine(cuda_emulation, layer):
    """Each layer's forward and backward in float64 through the CUDA engine (engine="cuda", the
    kernels emulated): the backward matches central finite differences, and the launches were
    activation.cu's."""
    from helpers import gradcheck  # noqa: PLC0415

    m = LAYERS[layer]()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5)) * 2
    x[np.abs(x) < 0.05] = 0.3  # away from LeakyReLU's kink
    gradcheck(lambda a: (m.forward(a), None), lambda dy, _: m.backward(dy), [x], tol=1e-7)
    stem = "leaky_relu" if layer == "leaky" else layer.split("_")[0]
    used = {k for k, _, _ in cuda_emulation.log}
    assert {f"{stem}_forward_f64", f"{stem}_backward_f64"} <= used, sorted(used)


@pytest.mark.parametrize("dtype", [np.float32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_emul_standin_activation_is_one_kernel_each_way(standin, layer, dtype):
    """On CuPy (the stand-in: the kernels compiled through its NVRTC and run by the emulation) each
    layer is one launch of its kernel forward and one backward, no elementwise launch (the reference
    on CuPy is several, rounding to float16 after each), and gives the NumPy engine's numbers."""
    from standin import counting  # noqa: PLC0415

    cp = standin
    x = (np.random.default_rng(4).standard_normal((2, 3, 5, 7)) * 3).astype(dtype)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(dtype)
    m = LAYERS[layer]()
    gx, gdy = cp.asarray(x), cp.asarray(dy)
    with counting() as c:
        y = m(gx)
        dx = m.backward(gdy)
    stem = "leaky_relu" if layer == "leaky" else layer.split("_")[0]
    sfx = "f16" if dtype == F16 else "f32"
    assert c.kernels == {f"{stem}_forward_{sfx}": 1, f"{stem}_backward_{sfx}": 1}, c.kernels
    assert c.launches["kernel"] == 2 and c.launches.get("elementwise", 0) == 0, c.launches
    assert c.total_syncs == 0 and c.layout_copies == 0
    y, dx = cp.asnumpy(y), cp.asnumpy(dx)
    if dtype == F16:  # float16 storage: computed in float, rounded once (the reference on CuPy rounds after each op)
        want_y, cache = R.float16_storage(ref_forward, layer, x)
        want_dx = R.float16_storage(ref_backward, layer, dy, cache)
        _up_to_one_rounding(y, want_y, 4 * 2.0**-24 * scales(layer, x), "forward")
        _up_to_one_rounding(dx, want_dx, 4 * 2.0**-24 * scales(layer, x, dy), "backward")
    else:
        want_y, cache = ref_forward(layer, x)
        eps, tiny = np.finfo(dtype).eps, 4 * np.finfo(dtype).smallest_subnormal
        within(y, want_y, 4 * eps * scales(layer, x) + tiny, "forward")
        within(dx, ref_backward(layer, dy, cache), 4 * eps * scales(layer, x, dy) + tiny, "backward")
