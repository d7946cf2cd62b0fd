"""Every op on every engine against the reference (functional/reference.py).

The engines: ``reference`` itself (through the public API), ``cpu`` (cnn_gpu/cpu: channels-last,
chunked, threaded) and ``cuda`` (cnn_gpu/cuda: kernels + GEMMs), the last on NumPy arrays with its
kernels compiled by g++ and run on the CPU (tests/emulation; its test ids contain "emul"). Each
test runs an op with the engine forced (cnn_gpu.config engine=...) and again on the reference,
on the same inputs, and compares: float64 to 1e-12, float32 to 1e-5 (relative to the largest
value), argmax indices exactly. Then whole models: Sequential's fusion plans, forward, backward
and every parameter gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DTYPES, ENGINES, assert_close, force_engine

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import models, nn, optim
from cnn_gpu.backend import to_numpy


@pytest.fixture(params=ENGINES)
def engine(request):
    """The engine under test, forced for the test's ops."""
    yield from force_engine(request)


def on_reference(fn, *args, **kwargs):
    with cnn_gpu.config.override(engine="reference"):
        return fn(*args, **kwargs)


def tol(dtype) -> float:
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-5


def same(got, want, dtype, what):
    if want is None:
        assert got is None, what
        return
    got, want = to_numpy(got), to_numpy(want)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    assert_close(got, want, tol(dtype), what)


def data(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ======================================================================== convolution
# N, C, H, W, F, kernel, stride, padding, dilation
CONV_CASES = [
    (3, 1, 12, 12, 6, 5, 1, 2, 1),  # lenet's first layer: K-major columns on the CPU
    (2, 6, 9, 9, 4, 3, 1, 1, 1),  # the transposed backward on the CPU
    (2, 3, 10, 11, 5, (3, 2), (2, 1), (1, 0), (1, 2)),  # strided, dilated: col2im
    (4, 2, 7, 7, 3, 1, 1, 0, 1),
    (1, 4, 6, 5, 2, 3, 2, 2, 1),  # padding wider than half the kernel
    (2, 8, 5, 5, 3, 5, 1, 0, 1),  # the kernel covers the input
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(True, None), (True, "relu"), (False, "relu"), (False, None)])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(engine, rng, case, bias, activation, dtype):
    N, C, H, W, Fo, k, s, p, d = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x, w = data(rng, (N, C, H, W), dtype), data(rng, (Fo, C, kh, kw), dtype)
    b = data(rng, (Fo,), dtype) if bias else None
    y, cache = F.conv2d_forward(x, w, b, s, p, d, activation=activation)
    assert cache.engine == engine
    y_ref, cache_ref = on_reference(F.conv2d_forward, x, w, b, s, p, d, activation=activation)
    same(y, y_ref, dtype, "y")
    dy = data(rng, y_ref.shape, dtype)
    got = F.conv2d_backward(dy, cache)
    want = on_reference(F.conv2d_backward, dy, cache_ref)
    for g, r, what in zip(got, want, ("dx", "dw", "db")):
        same(g, r, dtype, what)
    y, cache = F.conv2d_forward(x, w, b, s, p, d, activation=activation)
    none, dw, db = F.conv2d_backward(dy, cache, input_grad=False)  # the first layer of a training step
    assert none is None
    same(dw, want[1], dtype, "dw without dx")
    same(db, want[2], dtype, "db without dx")


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_conv2d_in_chunks_with_a_workspace(engine, rng, case):
    """A workspace limit that fits one or two samples' columns: the batch runs in chunks, twice
    through the same Workspace (its buffers reused), with the numbers of one pass."""
    N, C, H, W, Fo, k, s, p, d = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x, w, b = data(rng, (N, C, H, W), np.float64), data(rng, (Fo, C, kh, kw), np.float64), data(rng, (Fo,), np.float64)
    y_ref, cache = on_reference(F.conv2d_forward, x, w, b, s, p, d, activation="relu")
    dy = data(rng, y_ref.shape, np.float64)
    want = on_reference(F.conv2d_backward, dy, cache)
    ws = cnn_gpu.Workspace()
    per_sample = C * kh * kw * y_ref.shape[2] * y_ref.shape[3] * 8
    for samples in (1, 2):
        with cnn_gpu.use_workspace_limit(samples * per_sample / 2**20):
            y, cache = F.conv2d_forward(x, w, b, s, p, d, activation="relu", workspace=ws)
            got = F.conv2d_backward(dy, cache)
        same(y, y_ref, np.float64, f"y in chunks of {samples}")
        for g, r, what in zip(got, want, ("dx", "dw", "db")):
            same(g, r, np.float64, f"{what} in chunks of {samples}")


# N, C, H, W, F, kernel, stride, padding, dilation, groups
GROUPED_CASES = [
    (2, 8, 7, 7, 6, 3, 1, 1, 1, 2),  # general groups: batched GEMMs on the CUDA engine, per group on the CPU's
    (2, 12, 8, 7, 9, (3, 2), (2, 1), (1, 0), (1, 2), 3),  # strided, dilated
    (2, 4, 7, 7, 6, 3, 1, 1, 1, 2),  # 2 channels per group: the reference on the cpu engine
    (2, 6, 5, 6, 6, 3, 2, 0, 1, 3),  # the same, strided
    (3, 4, 6, 6, 4, 3, 1, 1, 1, 4),  # depthwise: direct kernels
    (2, 3, 9, 8, 6, 3, 2, 1, 1, 3),  # depthwise, 2 filters per channel, strided
    (2, 5, 7, 9, 5, (2, 3), (1, 2), (2, 1), (2, 1), 5),  # depthwise, dilated, wide padding
    (1, 3, 4, 4, 3, 5, 1, 2, 1, 3),  # depthwise, the kernel wider than the input (padded)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(True, None), (True, "relu"), (False, None)])
@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_conv2d(engine, rng, case, bias, activation, dtype):
    N, C, H, W, Fo, k, s, p, d, G = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x, w = data(rng, (N, C, H, W), dtype), data(rng, (Fo, C // G, kh, kw), dtype)
    b = data(rng, (Fo,), dtype) if bias else None
    y, cache = F.conv2d_forward(x, w, b, s, p, d, G, activation=activation)
    narrow = G < C and C // G < cnn_gpu.cpu.conv.GROUPED_MIN_CHANNELS  # the cpu engine runs those on the reference
    assert cache.engine == ("reference" if engine == "cpu" and narrow else engine)
    y_ref, cache_ref = on_reference(F.conv2d_forward, x, w, b, s, p, d, G, activation=activation)
    same(y, y_ref, dtype, "y")
    dy = data(rng, y_ref.shape, dtype)
    want = on_reference(F.conv2d_backward, dy, cache_ref)
    for g, r, what in zip(F.conv2d_backward(dy, cache), want, ("dx", "dw", "db")):
        same(g, r, dtype, what)
    y, cache = F.conv2d_forward(x, w, b, s, p, d, G, activation=activation)
    none, dw, db = F.conv2d_backward(dy, cache, input_grad=False)
    assert none is None
    same(dw, want[1], dtype, "dw without dx")
    same(db, want[2], dtype, "db without dx")


@pytest.mark.parametrize("G,activation", [(1, "relu"), (4, None)], ids=["dense", "depthwise-no-bias-no-relu"])
def test_conv2d_of_strided_views(engine, rng, G, activation):
    """x and dy given as strided views (every other column of a wider array) give the results of
    their contiguous copies on every engine (the CUDA engine copies them before its kernels)."""
    x_wide = data(rng, (3, 4, 6, 12), np.float64)
    x, w = x_wide[..., ::2], data(rng, (4, 4 // G, 3, 3), np.float64)
    assert not x.flags.c_contiguous
    y_ref, cache_ref = on_reference(F.conv2d_forward, np.ascontiguousarray(x), w, None, 1, 1, 1, G, activation=activation)
    dy = data(rng, y_ref.shape[:3] + (2 * y_ref.shape[3],), np.float64)[..., ::2]
    want = on_reference(F.conv2d_backward, np.ascontiguousarray(dy), cache_ref)
    y, cache = F.conv2d_forward(x, w, None, 1, 1, 1, G, activation=activation)
    same(y, y_ref, np.float64, "y of a strided x")
    for g, r, what in zip(F.conv2d_backward(dy, cache), want, ("dx", "dw", "db")):
        same(g, r, np.float64, f"{what} of a strided dy")


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_of_strided_views(engine, rng, affine):
    x = data(rng, (4, 3, 5, 12), np.float64)[..., ::2]
    dy = data(rng, (4, 3, 5, 12), np.float64)[..., ::2]
    gamma, beta = (data(rng, (3,), np.float64), data(rng, (3,), np.float64)) if affine else (None, None)
    stats = [np.zeros(3), np.ones(3)]
    ref_stats = [np.zeros(3), np.ones(3)]
    y, cache = F.batch_norm_forward(x, gamma, beta, *stats, True, 0.1, 1e-5, activation="relu")
    y_ref, cache_ref = on_reference(
        F.batch_norm_forward, np.ascontiguousarray(x), gamma, beta, *ref_stats, True, 0.1, 1e-5, activation="relu"
    )
    same(y, y_ref, np.float64, "y of a strided x")
    same(stats[0], ref_stats[0], np.float64, "running_mean")
    got, want = F.batch_norm_backward(dy, cache), on_reference(F.batch_norm_backward, np.ascontiguousarray(dy), cache_ref)
    for g, r, what in zip(got, want, ("dx", "dgamma", "dbeta")):
        same(g, r, np.float64, f"{what} of a strided dy")


def test_grouped_conv2d_in_chunks_with_a_workspace(engine, rng):
    N, C, H, W, Fo, k, s, p, d, G = GROUPED_CASES[1]
    x, w, b = data(rng, (N, C, H, W), np.float64), data(rng, (Fo, C // G, *k), np.float64), data(rng, (Fo,), np.float64)
    y_ref, cache = on_reference(F.conv2d_forward, x, w, b, s, p, d, G, activation="relu")
    dy = data(rng, y_ref.shape, np.float64)
    want = on_reference(F.conv2d_backward, dy, cache)
    ws = cnn_gpu.Workspace()
    with cnn_gpu.use_workspace_limit(C * k[0] * k[1] * y_ref.shape[2] * y_ref.shape[3] * 8 / 2**20):  # one sample
        for _ in range(2):
            y, cache = F.conv2d_forward(x, w, b, s, p, d, G, activation="relu", workspace=ws)
            got = F.conv2d_backward(dy, cache)
            same(y, y_ref, np.float64, "y in chunks")
            for g, r, what in zip(got, want, ("dx", "dw", "db")):
                same(g, r, np.float64, f"{what} in chunks")


@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col_col2im(engine, rng, dtype):
    x = data(rng, (2, 3, 9, 8), dtype)
    cols = F.im2col(x, (3, 2), (2, 1), (1, 1), (1, 2))
    same(cols, on_reference(F.im2col, x, (3, 2), (2, 1), (1, 1), (1, 2)), dtype, "im2col")
    c = data(rng, cols.shape, dtype)
    same(
        F.col2im(c, x.shape, (3, 2), (2, 1), (1, 1), (1, 2)),
        on_reference(F.col2im, c, x.shape, (3, 2), (2, 1), (1, 1), (1, 2)),
        dtype,
        "col2im",
    )


# ======================================================================== pooling
# N, C, H, W, kernel, stride, padding
POOL_CASES = [
    (2, 3, 8, 8, 2, None, 0),
    (2, 2, 9, 7, 3, 2, 1),
    (1, 3, 6, 6, (2, 3), (1, 2), (1, 1)),
    (3, 2, 5, 5, 3, 1, 1),
    (2, 4, 7, 9, 2, 3, 0),
]


def _pool_input(kind, shape, dtype, rng):
    if kind == "ties":  # few distinct values: tied maxima, the first must win
        return rng.integers(-2, 2, size=shape).astype(dtype)
    x = rng.standard_normal(shape).astype(dtype)
    if kind == "nan":
        x[rng.random(shape) < 0.1] = np.nan
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "nan"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d(engine, rng, case, kind, dtype):
    N, C, H, W, k, s, p = case
    x = _pool_input(kind, (N, C, H, W), dtype, rng)
    y, cache = F.max_pool2d_forward(x, k, s, p)
    y_ref, cache_ref = on_reference(F.max_pool2d_forward, x, k, s, p)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_ref))  # a maximum is exact (NaN == NaN here)
    np.testing.assert_array_equal(to_numpy(cache.argmax), to_numpy(cache_ref.argmax))
    if kind != "nan":
        dy = data(rng, y_ref.shape, dtype)
        same(F.max_pool2d_backward(dy, cache), on_reference(F.max_pool2d_backward, dy, cache_ref), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_avg_pool2d(engine, rng, case, dtype):
    N, C, H, W, k, s, p = case
    x = data(rng, (N, C, H, W), dtype)
    y, cache = F.avg_pool2d_forward(x, k, s, p)
    y_ref, cache_ref = on_reference(F.avg_pool2d_forward, x, k, s, p)
    same(y, y_ref, dtype, "y")
    dy = data(rng, y_ref.shape, dtype)
    same(F.avg_pool2d_backward(dy, cache), on_reference(F.avg_pool2d_backward, dy, cache_ref), dtype, "dx")


# ======================================================================== linear, activations, loss
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(True, None), (True, "relu"), (False, "relu"), (False, None)])
def test_linear(engine, rng, bias, activation, dtype):
    x, w = data(rng, (7, 13), dtype), data(rng, (5, 13), dtype)
    b = data(rng, (5,), dtype) if bias else None
    y, cache = F.linear_forward(x, w, b, activation)
    y_ref, cache_ref = on_reference(F.linear_forward, x, w, b, activation)
    same(y, y_ref, dtype, "y")
    dy = data(rng, y_ref.shape, dtype)
    for g, r, what in zip(F.linear_backward(dy, cache), on_reference(F.linear_backward, dy, cache_ref), ("dx", "dw", "db")):
        same(g, r, dtype, what)
    assert F.linear_backward(dy, cache, input_grad=False)[0] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["relu", "leaky_relu", "sigmoid", "tanh", "flatten", "gelu"])
def test_activations(engine, rng, op, dtype):
    fwd, bwd = getattr(F, f"{op}_forward"), getattr(F, f"{op}_backward")
    x = data(rng, (3, 4, 5, 2), dtype)
    y, cache = fwd(x)
    y_ref, cache_ref = on_reference(fwd, x)
    same(y, y_ref, dtype, "y")
    dy = data(rng, y_ref.shape, dtype)
    same(bwd(dy, cache), on_reference(bwd, dy, cache_ref), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(engine, rng, approximate, dtype):
    x = data(rng, (3, 4, 5, 2), dtype)
    y, cache = F.gelu_forward(x, approximate)
    y_ref, cache_ref = on_reference(F.gelu_forward, x, approximate)
    same(y, y_ref, dtype, "y")
    dy = data(rng, y_ref.shape, dtype)
    same(F.gelu_backward(dy, cache), on_reference(F.gelu_backward, dy, cache_ref), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out", [((2, 3, 7, 5), (3, 2)), ((3, 4, 4, 4), 1), ((1, 2, 3, 3), (4, 5))])
def test_adaptive_avg_pool2d(engine, rng, shape, out, dtype):
    x = data(rng, shape, dtype)
    y, cache = F.adaptive_avg_pool2d_forward(x, out)
    y_ref, cache_ref = on_reference(F.adaptive_avg_pool2d_forward, x, out)
    same(y, y_ref, dtype, "y")
    dy = data(rng, y_ref.shape, dtype)
    same(F.adaptive_avg_pool2d_backward(dy, cache), on_reference(F.adaptive_avg_pool2d_backward, dy, cache_ref), dtype, "dx")


# (shape, training, affine, running statistics)
BN_CASES = [
    ((6, 5), True, True, True),
    ((4, 3, 5, 4), True, True, True),
    ((4, 3, 5, 4), False, True, True),
    ((3, 2, 3, 3), True, False, False),
    ((3, 2, 3, 3), False, False, False),
    ((2, 3, 17, 9), True, True, True),
    ((5, 4), False, True, True),
    ((4, 16, 33, 33), True, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", BN_CASES, ids=lambda c: f"{c[0]}-{'train' if c[1] else 'eval'}{'-affine' if c[2] else ''}{'-running' if c[3] else ''}"
)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_batch_norm(engine, rng, case, activation, dtype):
    shape, training, affine, running = case
    C = shape[1]
    x = data(rng, shape, dtype) * dtype(2) + dtype(1)
    gamma, beta = (data(rng, (C,), dtype), data(rng, (C,), dtype)) if affine else (None, None)
    rm0, rv0 = data(rng, (C,), dtype), (rng.random(C) + 0.5).astype(dtype)

    def stats():
        return (rm0.copy(), rv0.copy()) if running else (None, None)

    rm, rv = stats()
    y, cache = F.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.2, 1e-4, activation=activation)
    assert cache.engine == engine
    rm_ref, rv_ref = stats()
    y_ref, cache_ref = on_reference(
        F.batch_norm_forward, x, gamma, beta, rm_ref, rv_ref, training, 0.2, 1e-4, activation=activation
    )
    same(y, y_ref, dtype, "y")
    same(rm, rm_ref, dtype, "running_mean")
    same(rv, rv_ref, dtype, "running_var")
    dy = data(rng, shape, dtype)
    got, want = F.batch_norm_backward(dy, cache), on_reference(F.batch_norm_backward, dy, cache_ref)
    for g, r, what in zip(got, want, ("dx", "dgamma", "dbeta")):
        same(g, r, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_softmax_and_the_loss(engine, rng, dtype):
    x = data(rng, (6, 10), dtype)
    y, cache = F.dropout_forward(x, 0.3, True, np.random.default_rng(4))
    y_ref, cache_ref = on_reference(F.dropout_forward, x, 0.3, True, np.random.default_rng(4))
    same(y, y_ref, dtype, "dropout")
    same(F.dropout_backward(x, cache), on_reference(F.dropout_backward, x, cache_ref), dtype, "dropout dx")
    # counter-based masks (nn.Dropout's): the same bits on every engine (the CUDA kernel draws them)
    y, cache = F.dropout_forward(x, 0.3, True, key=2**63 + 12345)
    y_ref, cache_ref = on_reference(F.dropout_forward, x, 0.3, True, key=2**63 + 12345)
    np.testing.assert_array_equal(to_numpy(cache.mask), to_numpy(cache_ref.mask))
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_ref))
    assert 0.5 < float((to_numpy(cache.mask) > 0).mean()) < 0.9
    same(F.softmax(x), on_reference(F.softmax, x), dtype, "softmax")
    same(F.log_softmax(x), on_reference(F.log_softmax, x), dtype, "log_softmax")
    for labels in (rng.integers(0, 10, 6), np.eye(10, dtype=dtype)[rng.integers(0, 10, 6)]):
        for eps in (0.0, 0.1, 1.0):
            loss, d = F.softmax_cross_entropy(x, labels, label_smoothing=eps)
            loss_ref, d_ref = on_reference(F.softmax_cross_entropy, x, labels, label_smoothing=eps)
            same(loss, loss_ref, dtype, f"loss eps={eps}")
            same(d, d_ref, dtype, f"dlogits eps={eps}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: optim.SGD(ps, 0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        lambda ps: optim.SGD(ps, 0.1),
        lambda ps: optim.Adam(ps, 1e-2, weight_decay=1e-3),
        lambda ps: optim.AdamW(ps, 1e-2),
    ],
    ids=["sgd-nesterov", "sgd", "adam", "adamw"],
)
def test_optimizer_updates(engine, rng, make, dtype):
    """Three steps over the optimizer's flat buffers (one fused launch per step on the GPU)."""

    def run():
        params = [
            nn.Parameter(np.random.default_rng(i).standard_normal(s).astype(dtype))
            for i, s in enumerate([(4, 3, 3, 3), (4,), (10, 36)])
        ]
        opt = make(params)
        for t in range(3):
            for i, p in enumerate(params):
                p.grad[...] = np.random.default_rng(10 * t + i).standard_normal(p.shape)
            opt.step()
        return [p.data.copy() for p in params]

    for got, want in zip(run(), on_reference(run)):
        same(got, want, dtype, "parameters after 3 steps")


# ======================================================================== whole models
def _every_layer_net(dtype):
    g = dict(dtype=dtype, generator=np.random.default_rng(2))
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, **g),
        nn.ReLU(),
        nn.Conv2d(3, 8, 3, padding=1, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False, **g),
        nn.LeakyReLU(0.1),
        nn.Conv2d(8, 6, 3, stride=2, **g),
        nn.ReLU(),
        nn.MaxPool2d(3, 1, 1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6, 8, **g),
        nn.ReLU(),
        nn.Dropout(0.25, generator=g["generator"]),
        nn.Linear(8, 5, **g),
        nn.Sigmoid(),
        nn.Linear(5, 4, **g),
    )


def _separable_net(dtype):
    """Depthwise-separable and grouped convolutions with fused ReLUs (every grouped path of each engine)."""
    g = dict(dtype=dtype, generator=cnn_gpu.random.resolve_generator(3))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, **g),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, **g),
        nn.ReLU(),  # depthwise
        nn.Conv2d(8, 8, 1, groups=2, bias=False, **g),
        nn.ReLU(),  # 4 channels per group
        nn.Conv2d(8, 16, 3, stride=2, groups=8, **g),  # depthwise, 2 filters per channel
        nn.Conv2d(16, 8, 3, groups=8, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 2 channels per group
        nn.Flatten(),
        nn.Linear(8, 4, **g),
    )


MODELS = [
    pytest.param(lambda dtype: models.lenet5(dtype=dtype, generator=0), (3, 1, 28, 28), id="lenet5"),
    pytest.param(_separable_net, (2, 3, 12, 12), id="separable"),
    pytest.param(lambda dtype: models.vgg_small(dtype=dtype, generator=0), (2, 3, 32, 32), id="vgg_small"),
    pytest.param(_every_layer_net, (3, 2, 11, 11), id="every-layer"),
    pytest.param(lambda dtype: models.resnet(8, dtype=dtype, generator=0), (3, 3, 8, 8), id="resnet8"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make,shape", MODELS)
def test_models(engine, rng, make, shape, dtype):
    """Sequential's plan on each engine (fused ReLUs, a ReLU moved behind a max pool on the CPU)
    gives the reference's output, input gradient and parameter gradients; so does a training
    step without the input gradient."""
    x = data(rng, shape, dtype)

    def run():
        model = make(dtype)
        y = model(x)
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
        dx = model.backward(dy)
        out = [y, dx] + [p.grad.copy() for p in model.parameters()]
        model.zero_grad()
        model(x)
        assert model.backward(dy, input_grad=False) is None
        return out + [p.grad.copy() for p in model.parameters()]

    got, want = run(), on_reference(run)
    for i, (g, r) in enumerate(zip(got, want)):
        same(g, r, dtype, f"output {i} (y, dx, then the gradients twice)")


# ============================================================ gradients added in place, counters
ACC_CONV_CASES = [  # N, C, H, W, F, kernel, groups
    (2, 3, 7, 6, 4, 3, 1),  # one GEMM (cuBLAS beta = 1 on the CUDA engine)
    (2, 8, 6, 6, 6, 3, 2),  # a GEMM per group into row blocks of dw
    (2, 4, 6, 5, 8, 3, 4),  # depthwise: the weight-gradient kernel adds
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(True, "relu"), (False, None)])
@pytest.mark.parametrize("case", ACC_CONV_CASES)
def test_conv2d_backward_accumulates_into_given_arrays(engine, rng, case, bias, activation, dtype):
    """accumulate_into=(dw0, db0): the returned dw and db are those very arrays, holding their old
    values plus the reference's gradients; dx is unchanged; over two backwards the sums add up."""
    N, C, H, W, Fo, k, G = case
    x, w = data(rng, (N, C, H, W), dtype), data(rng, (Fo, C // G, k, k), dtype)
    b = data(rng, (Fo,), dtype) if bias else None
    y_ref, c_ref = on_reference(F.conv2d_forward, x, w, b, 1, 1, 1, G, activation=activation)
    dy = data(rng, y_ref.shape, dtype)
    dx_ref, dw_ref, db_ref = on_reference(F.conv2d_backward, dy, c_ref)
    dw0, db0 = data(rng, w.shape, dtype), (data(rng, (Fo,), dtype) if bias else None)
    acc = (dw0.copy(), None if db0 is None else db0.copy())
    for rounds in (1, 2):
        _, cache = F.conv2d_forward(x, w, b, 1, 1, 1, G, activation=activation)
        dx, dw, db = F.conv2d_backward(dy, cache, accumulate_into=acc)
        assert dw is acc[0] and db is acc[1]
        same(dx, dx_ref, dtype, "dx")
        same(dw, dw0 + rounds * dw_ref, dtype, f"dw after {rounds}")
        if bias:
            same(db, db0 + rounds * db_ref, dtype, f"db after {rounds}")


def test_conv2d_backward_accumulates_over_chunks(engine, rng):
    """In chunks (a workspace limit of one sample's columns) the chunks' gradients and the given
    arrays' values add up to the reference's sum."""
    x, w, b = data(rng, (3, 2, 6, 6), np.float64), data(rng, (4, 2, 3, 3), np.float64), data(rng, (4,), np.float64)
    y_ref, c_ref = on_reference(F.conv2d_forward, x, w, b, 1, 1)
    dy = data(rng, y_ref.shape, np.float64)
    _, dw_ref, db_ref = on_reference(F.conv2d_backward, dy, c_ref)
    acc = (np.ones_like(w), np.full(4, 2.0))
    with cnn_gpu.use_workspace_limit(2 * 9 * 36 * 8 / 2**20):
        _, cache = F.conv2d_forward(x, w, b, 1, 1, workspace=cnn_gpu.Workspace())
        F.conv2d_backward(dy, cache, input_grad=False, accumulate_into=acc)
    same(acc[0], 1 + dw_ref, np.float64, "dw")
    same(acc[1], 2 + db_ref, np.float64, "db")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(True, "relu"), (True, None), (False, "relu")])
def test_linear_backward_accumulates_into_given_arrays(engine, rng, bias, activation, dtype):
    x, w = data(rng, (5, 7), dtype), data(rng, (3, 7), dtype)
    b = data(rng, (3,), dtype) if bias else None
    _, c_ref = on_reference(F.linear_forward, x, w, b, activation)
    dy = data(rng, (5, 3), dtype)
    dx_ref, dw_ref, db_ref = on_reference(F.linear_backward, dy, c_ref)
    dw0, db0 = data(rng, w.shape, dtype), (data(rng, (3,), dtype) if bias else None)
    acc = (dw0.copy(), None if db0 is None else db0.copy())
    _, cache = F.linear_forward(x, w, b, activation)
    dx, dw, db = F.linear_backward(dy, cache, accumulate_into=acc)
    assert dw is acc[0] and db is acc[1]
    same(dx, dx_ref, dtype, "dx")
    same(dw, dw0 + dw_ref, dtype, "dw")
    if bias:
        same(db, db0 + db_ref, dtype, "db")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_batch_norm_backward_accumulates_and_counts_batches(engine, rng, affine, activation, dtype):
    """accumulate_into=(dgamma0, dbeta0) adds into them (both views of one flat buffer, as an
    optimizer keeps Parameter.grad); num_batches_tracked counts the training batches that update
    the running statistics, not the evaluation ones."""
    shape, C = (4, 3, 5, 5), 3
    x = data(rng, shape, dtype)
    gamma, beta = (data(rng, (C,), dtype), data(rng, (C,), dtype)) if affine else (None, None)
    _, c_ref = on_reference(F.batch_norm_forward, x, gamma, beta, None, None, True, activation=activation)
    dy = data(rng, shape, dtype)
    dx_ref, dg_ref, db_ref = on_reference(F.batch_norm_backward, dy, c_ref)
    rm, rv, count = np.zeros(C, dtype), np.ones(C, dtype), np.zeros((), np.int64)
    flat = data(rng, (2 * C,), dtype)
    flat0 = flat.copy()
    acc = (flat[:C], flat[C:]) if affine else (None, None)
    _, cache = F.batch_norm_forward(x, gamma, beta, rm, rv, True, activation=activation, num_batches_tracked=count)
    assert int(count) == 1
    dx, dg, db = F.batch_norm_backward(dy, cache, accumulate_into=acc)
    same(dx, dx_ref, dtype, "dx")
    if affine:
        assert dg is acc[0] and db is acc[1]
        same(flat, np.concatenate([flat0[:C] + dg_ref, flat0[C:] + db_ref]), dtype, "dgamma, dbeta")
    else:
        assert dg is None and db is None
    F.batch_norm_forward(x, gamma, beta, rm, rv, True, num_batches_tracked=count)
    F.batch_norm_forward(x, gamma, beta, rm, rv, False, num_batches_tracked=count)  # eval: not counted
    F.batch_norm_forward(x, gamma, beta, None, None, True, num_batches_tracked=count)  # no running stats
    assert int(count) == 2 and count.dtype == np.int64 and count.shape == ()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_add(engine, rng, activation, dtype):
    a, b = data(rng, (3, 4, 5, 2), dtype), data(rng, (3, 4, 5, 2), dtype)
    y, cache = F.add_forward(a, b, activation)
    y_ref, c_ref = on_reference(F.add_forward, a, b, activation)
    same(y, y_ref, dtype, "y")
    same(y, np.maximum(a + b, 0) if activation else a + b, dtype, "y (NumPy)")
    dy = data(rng, y.shape, dtype)
    got, want = F.add_backward(dy, cache), on_reference(F.add_backward, dy, c_ref)
    same(got, want, dtype, "delta")
    same(got, dy * (a + b > 0) if activation else dy, dtype, "delta (NumPy)")
