"""The im2col workspace: the limit setting, Workspace buffer reuse, and convolution in batch
chunks giving the results of one unchunked pass (forward and backward, float64, to 1e-12),
through the functional API, the Conv2d layer (with its kept workspace) and nn.Sequential's
channels-last fast path."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, conv2d_ref

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import nn, workspace
from cnn_gpu.backend import to_numpy

# N, C, H, W, F, kernel, stride, padding, dilation: stride 1 (dx as a transposed convolution),
# strided and over-padded (dx through col2im), dilated, 1x1
CASES = [
    (5, 3, 9, 8, 4, 3, 1, 1, 1),
    (4, 2, 10, 11, 3, (3, 2), 2, (1, 2), (1, 2)),
    (3, 2, 7, 7, 2, 5, 1, 2, 1),
    (6, 2, 8, 8, 3, 2, 2, 0, 1),
    (4, 2, 9, 9, 3, 3, 1, 3, 1),  # padding wider than the kernel: col2im path
    (3, 3, 11, 9, 2, 3, 1, 2, 2),
    (5, 4, 6, 6, 3, 1, 1, 0, 1),
]
IDS = [f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}f{c[4]}k{c[5]}s{c[6]}p{c[7]}d{c[8]}" for c in CASES]


def _run(xp, x, w, b, g, dy):
    y, cache = F.conv2d_forward(xp.asarray(x), xp.asarray(w), xp.asarray(b), **g)
    dx, dw, db = F.conv2d_backward(xp.asarray(dy), cache)
    return cache.aux.chunk, [to_numpy(a) for a in (y, dx, dw, db)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chunked_equals_unchunked(xp, rng, case):
    N, C, H, W, Fo, k, s, p, d = case
    k2 = k if isinstance(k, tuple) else (k, k)
    g = dict(stride=s, padding=p, dilation=d)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((Fo, C) + k2)
    b = rng.standard_normal(Fo)
    y_ref = conv2d_ref(x, w, b, **g)
    dy = rng.standard_normal(y_ref.shape)
    with workspace.use_workspace_limit(1024):
        n_full, full = _run(xp, x, w, b, g, dy)
    assert n_full == N
    assert_close(full[0], y_ref, 1e-12, "y")
    for limit_samples in (1, 2, N - 1):  # limits that fit 1, 2 and N-1 samples of columns
        per_sample = C * k2[0] * k2[1] * y_ref.shape[2] * y_ref.shape[3] * 8
        with workspace.use_workspace_limit(limit_samples * per_sample / 2**20):
            n, chunked = _run(xp, x, w, b, g, dy)
        assert n <= limit_samples < N  # (chunks may be smaller, to give every core a share)
        for got, ref, what in zip(chunked, full, ["y", "dx", "dw", "db"]):
            assert_close(got, ref, 1e-12, f"{what} in chunks of {n}")


def test_layer_and_sequential_chunked_equal_unchunked(xp, rng):
    """Conv2d layers keep their workspace between steps; nn.Sequential runs channels-last with
    fused ReLUs. Chunked or not, and step after step, the same numbers."""

    def build():
        g = dict(dtype=np.float64, generator=np.random.default_rng(3))
        with cnn_gpu.use_backend(xp.__name__):
            return nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1, **g),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1, **g),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(4, 3, 3, stride=2, **g),
                nn.Flatten(),
                nn.Linear(3 * 1 * 1, 5, **g),
            )

    x = xp.asarray(rng.standard_normal((6, 2, 6, 6)))
    dys = [xp.asarray(rng.standard_normal((6, 5))) for _ in range(2)]

    def steps(model):
        out = []
        for dy in dys:  # two steps: the second reuses the workspaces
            model.zero_grad()
            y = model(x)
            dx = model.backward(dy)
            out.append([to_numpy(y), to_numpy(dx)] + [to_numpy(p.grad).copy() for p in model.parameters()])
        return out

    ref = steps(build())
    with workspace.use_workspace_limit(1e-4):  # ~100 bytes: one sample per chunk
        chunked = steps(build())
    layerwise = []
    model = build()
    for dy in dys:  # the same layers called one by one (NCHW, no fusion)
        model.zero_grad()
        h = x
        for layer in model:
            h = layer(h)
        g = dy
        for layer in reversed(list(model)):
            g = layer.backward(g)
        layerwise.append([to_numpy(h), to_numpy(g)] + [to_numpy(p.grad).copy() for p in model.parameters()])
    for other, what in ((chunked, "chunked"), (layerwise, "layer by layer")):
        for step_ref, step in zip(ref, other):
            for a, c in zip(step_ref, step):
                assert_close(c, a, 1e-12, what)


def test_workspace_limit_setting():
    default = workspace.get_workspace_limit()
    assert default > 0
    with workspace.use_workspace_limit(8) as mb:
        assert mb == 8.0 and workspace.get_workspace_limit() == 8.0
        assert workspace.chunk_size(100, 1 << 20) == 8
        assert workspace.chunk_size(100, 1 << 30) == 1  # at least one sample
        assert workspace.chunk_size(4, 1 << 10) == 4  # everything fits
    assert workspace.get_workspace_limit() == default
    for bad in (0, -1, float("nan"), float("inf"), "8", True, None):
        with pytest.raises(ValueError, match="mb: expected a positive number of MiB"):
            cnn_gpu.set_workspace_limit(bad)


def test_set_workspace_limit_is_per_context():
    import contextvars

    def inner():
        cnn_gpu.set_workspace_limit(3)
        return workspace.get_workspace_limit()

    before = workspace.get_workspace_limit()
    assert contextvars.copy_context().run(inner) == 3.0
    assert workspace.get_workspace_limit() == before


def test_workspace_reuses_buffers():
    ws = workspace.Workspace()
    a = ws.get("cols", (4, 5), np.float32, np)
    assert ws.get("cols", (4, 5), np.float32, np) is a
    assert ws.get("cols", (4, 6), np.float32, np) is not a  # another shape: reallocated
    z = ws.get("pad", (3, 3), np.float64, np, zeros=True)
    assert not z.any()
    z[...] = 1
    assert ws.get("pad", (3, 3), np.float64, np, zeros=True) is z  # kept as left, not re-zeroed
    assert ws.nbytes == 4 * 6 * 4 + 9 * 8
    ws.clear()
    assert ws.nbytes == 0


def test_conv_layer_keeps_its_workspace(rng):
    conv = nn.Conv2d(3, 4, 3, padding=1, generator=0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y1 = conv(x).copy()
    dx1 = conv.backward(np.ones_like(y1)).copy()
    held = dict(conv._ws._buffers)
    assert held
    y2 = conv(x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, conv.backward(np.ones_like(y1)))
    assert all(conv._ws._buffers[k] is v for k, v in held.items())  # the same buffers, not new ones
    with pytest.raises(RuntimeError, match="before forward"):
        conv.backward(np.ones_like(y1))  # every backward needs its own forward


# --- spreading work over the cores (cpu/parallel.py) --------------------------------
def test_parallel_split_and_run():
    from cnn_gpu.cpu import parallel as _parallel

    assert _parallel.split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert _parallel.split(2, 4) == [(0, 1), (1, 2)]
    assert _parallel.split(0, 2) == []
    assert _parallel.run([lambda i=i: i * i for i in range(5)]) == [0, 1, 4, 9, 16]  # in order
    assert _parallel.over_range(0, lambda a, b: (a, b)) == [(0, 0)]
    parts = _parallel.over_range(7, lambda a, b: (a, b))
    assert parts[0][0] == 0 and parts[-1][1] == 7 and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))

    def boom():
        raise ZeroDivisionError("part 0")

    with pytest.raises(ZeroDivisionError, match="part 0"):
        _parallel.run([boom, lambda: 1])


def test_blas_thread_count_restored():
    pytest.importorskip("threadpoolctl")
    from cnn_gpu.cpu import parallel as _parallel

    limit = _parallel._blas_limit()  # NumPy's BLAS (libraries loaded later, e.g. torch's, are not touched)
    assert limit is not None and limit.libs

    def blas_threads():
        return [lc.get_num_threads() for lc in limit.libs]

    before = blas_threads()
    with _parallel.single_threaded_blas():
        assert all(n == 1 for n in blas_threads())
        with _parallel.single_threaded_blas():  # nested: still one thread, and restored only at the end
            pass
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before
    with pytest.raises(ValueError):
        with _parallel.single_threaded_blas():
            raise ValueError
    assert blas_threads() == before
