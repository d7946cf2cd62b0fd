"""The CPU engine's convolution: channels-last, in cache-sized chunks, spread over the cores.

The math is the reference's (functional/reference.py: im2col, one GEMM, col2im); this file
arranges it for a CPU. x and y are (N, C, H, W)-shaped views of NHWC memory (cpu/layout.py),
x_nhwc = x.transpose(0, 2, 3, 1), so that one GEMM lands y in its layout. Row
m = n*P + oh*OW + ow of the columns A (n*P, K) is the receptive field of output (n, oh, ow),
in one of two orders:
    row-major  A stored (n*P, K), k = (kh*KW + kw)*C + c: gathers runs of KW*C floats
    K-major    A stored (K, n*P), k = (c*KH + kh)*KW + kw: gathers runs of OW floats
(whichever runs are longer: K-major for few channels); W2 (F, K) is w in the same order.
With a bias, A has a last column of ones and W2 the column b: the bias rides in the GEMM.

Forward:   y2 = A @ W2^T (+ b)                         (n*P, K) @ (K, F) -> y_nhwc rows
           (max(y2, 0) in place with activation="relu", while the chunk is in the cache)
Backward (delta = dL/dy, times y > 0 after a relu; delta2 its (n*P, F) NHWC rows), per chunk:
  transposed (stride 1): dx is the convolution of delta, padded by Q = D*(K-1) - P, with
    the flipped kernel W2t[c, (kh'*KW + kw')*F + f] = w[f, c, KH-1-kh', KW-1-kw'], so the
    row-major columns of delta, dycols (n*H*W, T*F), give both gradients:
        dx2 = dycols @ W2t^T    dW2t = dycols^T @ x2      x2 = x_nhwc as (n*H*W, C)
  otherwise (strided, over-padded, or when delta's columns would be much larger):
        dW2^T = A^T @ delta2 (with the ones column: db)   dT = delta2 @ W3 (T, n*P, C)
    and col2im of the tap-major dT (each tap adds whole OW*C runs); W3[t] = w[:, :, kh, kw].

The batch is processed in chunks whose columns fit the CPU's cache (CHUNK_BYTES) and the
workspace limit: a chunk's gather, GEMMs and col2im run on cached data; backward rebuilds a
chunk's columns from the kept input unless forward kept them (small ones only, KEEP_BYTES).
The chunks are spread over the cores (cpu/parallel.py); partial sums are added in worker
order, so results are reproducible.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from ..functional import reference
from ..functional.caches import Conv2dCache
from ..functional.geometry import ConvGeometry, clipped_taps
from ..workspace import chunk_size, scratch, workspace_limit_bytes
from . import depthwise, parallel
from .layout import to_channels_last

_MIB = 1 << 20
CHUNK_BYTES = 8 * _MIB  # a chunk's columns: about the size of the cache (measured: docs/BENCHMARKS.md)
KEEP_BYTES = 32 * _MIB  # forward keeps the batch's columns for backward up to this size
# The transposed path's columns (H*W x KH*KW*F) may be this much larger than the input's
# (OH*OW x KH*KW*C) and still win: measured, it avoids rebuilding the input's columns and col2im.
_TRANSPOSED_MAX_RATIO = 1.5
_PARALLEL_MIN_BYTES = 1 << 18  # below this many bytes of columns: one chunk, on the calling thread
# Grouped convolutions with at least this many channels per group run group by group on the dense
# path below; depthwise ones on cpu/depthwise.py; the rest on the reference. Measured (README,
# "Grouped convolution", benchmarks/grouped_conv.py): 64 channels 16x16, batch 32, 3x3: 4-30x
# faster than the reference for 4-32 channels per group, slower for 2.
GROUPED_MIN_CHANNELS = 4


class _Plan(NamedTuple):
    """How one convolution runs; a function of the geometry only."""

    g: ConvGeometry
    gt: ConvGeometry | None  # the transposed geometry (see _transposed_geometry), or None
    kmajor: bool  # the input's columns K-major, else row-major
    transposed: bool  # backward with input_grad takes the transposed path


def _transposed_geometry(g: ConvGeometry) -> ConvGeometry | None:
    """For a stride-1 convolution, dx is itself a convolution: of dy, zero-padded by
    Q = D*(K-1) - P, with the flipped kernel at the same dilation, giving H x W. Its geometry,
    or None when that does not hold (stride > 1, or Q < 0: padding wider than the kernel)."""
    QH, QW = g.DH * (g.KH - 1) - g.PH, g.DW * (g.KW - 1) - g.PW
    if (g.SH, g.SW) != (1, 1) or QH < 0 or QW < 0:
        return None
    return ConvGeometry(g.N, g.F, g.OH, g.OW, g.C, g.KH, g.KW, 1, 1, QH, QW, g.DH, g.DW, g.H, g.W)


def _plan(g: ConvGeometry) -> _Plan:
    gt = _transposed_geometry(g)
    # the gather's contiguous runs: row-major copies KW*C floats at a time (C when dilated),
    # K-major OW (1 when strided); the longer runs copy faster
    kmajor = (g.OW if g.SW == 1 else 1) > (g.KW * g.C if g.DW == 1 else g.C)
    transposed = gt is not None and g.H * g.W * g.F <= _TRANSPOSED_MAX_RATIO * g.P * g.C
    return _Plan(g, gt, kmajor, transposed)


def _w2(w, kmajor):
    """w (F, C, KH, KW) as the (F, K) matrix whose columns match the columns' order."""
    F = w.shape[0]
    if kmajor:
        return w.reshape(F, -1)  # (F, C*KH*KW), k = (c*KH + kh)*KW + kw
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(F, -1)  # (F, KH*KW*C), k = (kh*KW + kw)*C + c


def _dw_from_w2(dw2, w_shape, kmajor):
    """The inverse of _w2 for a gradient: (F, K) -> (F, C, KH, KW)."""
    F, C, KH, KW = w_shape
    if kmajor:
        return dw2.reshape(F, C, KH, KW)
    return np.ascontiguousarray(dw2.reshape(F, KH, KW, C).transpose(0, 3, 1, 2))  # (F, C, KH, KW)


def _view(a, shape):
    """a reshaped to ``shape`` as a view (the columns are written through it): a reshape that
    would need a copy is an error here, not a silent loss of the writes."""
    v = a.reshape(shape)
    if v.size and not np.may_share_memory(v, a):
        raise AssertionError(f"internal: reshaping {a.shape} (strides {a.strides}) to {shape} copies")
    return v


def _padded(x4, spatial_last, g, ws, shape, name):
    """A zero-bordered copy of x4 (4-D, any strides) in a buffer of ``shape`` (the workspace's,
    kept for the largest chunk, or a fresh one), of which a smaller chunk uses the leading
    part. The spatial axes are 1, 2 (x4 (n, H, W, C)) or, with ``spatial_last``, 2, 3 (x4 (C, n,
    H, W)). A kept buffer's border is zeroed once, when allocated: only its interior is written."""
    PH, PW = g.PH, g.PW
    buf = scratch(ws, name, shape, x4.dtype, np, zeros=True)
    if spatial_last:
        C, n, H, W = x4.shape
        buf = buf[:, :n]  # (C, n, H+2PH, W+2PW)
        buf[:, :, PH : PH + H, PW : PW + W] = x4
    else:
        n, H, W, C = x4.shape
        buf = buf[:n]  # (n, H+2PH, W+2PW, C)
        buf[:, PH : PH + H, PW : PW + W, :] = x4
    return buf


def _im2col_rows(x_nhwc, g, out, ws=None, nb=None, name="xpad"):
    """x_nhwc (n, H, W, C), any strides -> out (n*OH*OW, KH*KW*C), row-major columns:
    out[(n*OH + oh)*OW + ow, (kh*KW + kw)*C + c] = x_padded[n, oh*SH + kh*DH, ow*SW + kw*DW, c].
    ``ws``, ``nb``, ``name``: the workspace, the chunk size and the name its padded copy is kept for."""
    n, H, W, C = x_nhwc.shape
    xpad = x_nhwc
    if g.PH or g.PW:
        xpad = _padded(x_nhwc, False, g, ws, (nb or n, H + 2 * g.PH, W + 2 * g.PW, C), name)  # (n, Hp, Wp, C)
    sN, sH, sW, sC = xpad.strides
    win = np.lib.stride_tricks.as_strided(
        xpad, (n, g.OH, g.OW, g.KH, g.KW, C), (sN, sH * g.SH, sW * g.SW, sH * g.DH, sW * g.DW, sC)
    )  # a view
    np.copyto(_view(out, (n, g.OH, g.OW, g.KH, g.KW, C)), win)  # one strided gather
    return out


def _im2col_kmajor(x_nhwc, g, out, ws=None, nb=None, name="xpad_cf"):
    """x_nhwc (n, H, W, C), any strides -> out (C*KH*KW, n*OH*OW) (any row stride), K-major columns:
    out[(c*KH + kh)*KW + kw, (n*OH + oh)*OW + ow] = x_padded[n, oh*SH + kh*DH, ow*SW + kw*DW, c]."""
    n, H, W, C = x_nhwc.shape
    x_cf = x_nhwc.transpose(3, 0, 1, 2)  # (C, n, H, W) view
    xpad = _padded(x_cf, True, g, ws, (C, nb or n, H + 2 * g.PH, W + 2 * g.PW), name)  # (C, n, Hp, Wp)
    sC, sN, sH, sW = xpad.strides
    win = np.lib.stride_tricks.as_strided(
        xpad, (C, g.KH, g.KW, n, g.OH, g.OW), (sC, sH * g.DH, sW * g.DW, sN, sH * g.SH, sW * g.SW)
    )  # a view
    np.copyto(_view(out, (C, g.KH, g.KW, n, g.OH, g.OW)), win)  # one strided gather, runs of OW
    return out


def _col2im_taps_into(dT, dx_nhwc, g):
    """dx_nhwc (n, H, W, C) (garbage on entry) = col2im of the tap-major column gradient
    dT (KH*KW, n*OH*OW, C): tap t = kh*KW + kw of output (n, oh, ow) adds into dx at
    (n, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW). Tap-major, each tap adds whole (OW*C)-runs.
    The first tap that covers all of dx (stride-1 "same" convolutions have one) is assigned,
    the others added; without one dx is zeroed first."""
    n, H, W, C = dx_nhwc.shape
    d5 = dT.reshape(g.T, n, g.OH, g.OW, C)  # (KH*KW, n, OH, OW, C)
    taps = list(clipped_taps(g))
    whole = slice(0, H, 1), slice(0, W, 1)
    first = next((t for t in taps if (t[4], t[5]) == whole), None)
    if first is None:
        dx_nhwc[...] = 0
    else:
        kh, kw, orows, ocols = first[:4]
        dx_nhwc[...] = d5[kh * g.KW + kw, :, orows, ocols, :]
    for t in taps:
        if t is not first:
            kh, kw, orows, ocols, irows, icols = t
            dx_nhwc[:, irows, icols, :] += d5[kh * g.KW + kw, :, orows, ocols, :]  # (n, rows, cols, C)


def _chunk_cols(x_nhwc, n0, n1, K1, plan: _Plan, ws, nb, full, names):
    """The input's columns for samples n0:n1 as an (n*P, K1) matrix: built into ``full``
    (all of the batch's columns, kept) at rows n0*P:n1*P, or into a chunk buffer. With
    K1 = K + 1 the last column is all ones (the bias's column)."""
    g = plan.g
    K, P, rows = g.K, g.P, (n1 - n0) * g.P
    if plan.kmajor:
        if full is not None:
            buf = full[:, n0 * P : n1 * P]  # (K1, n*P), rows N*P apart
        else:
            buf = scratch(ws, names[0], (K1, nb * P), x_nhwc.dtype, np)[:, :rows]  # (K1, n*P)
        _im2col_kmajor(x_nhwc[n0:n1], g, buf[:K], ws, nb, names[1] + "_cf")
        if K1 > K:
            buf[K] = 1
        return buf.T  # (n*P, K1) view
    if full is not None:
        buf = full[n0 * P : n1 * P]  # (n*P, K1)
    else:
        buf = scratch(ws, names[0], (nb * P * K1,), x_nhwc.dtype, np)[: rows * K1].reshape(rows, K1)
    _im2col_rows(x_nhwc[n0:n1], g, buf[:, :K], ws, nb, names[1])  # rows K1 apart
    if K1 > K:
        buf[:, K] = 1
    return buf


# OpenBLAS computes a^T b with a small (K, F) result over many rows far below speed (measured:
# 26 x 6 over 50k rows 2x slower than the same summed over blocks of 1k rows), so such products
# are summed over blocks of _TN_BLOCK rows, one batched GEMM.
_TN_BLOCK = 1024
_TN_SMALL = 1024


def _gemm_tn(a, b, out):
    """out (K, F) = a^T @ b for a (rows, K) and b (rows, F), any strides."""
    rows, K = a.shape
    F = b.shape[1]
    B = rows // _TN_BLOCK
    if K * F > _TN_SMALL or B < 2:
        return np.matmul(a.T, b, out=out)
    head = B * _TN_BLOCK
    a3 = a[:head].reshape(B, _TN_BLOCK, K).transpose(0, 2, 1)  # (B, K, R)
    b3 = b[:head].reshape(B, _TN_BLOCK, F)  # (B, R, F)
    np.matmul(a3, b3).sum(axis=0, out=out)  # (B, K, F) summed over the blocks
    if head < rows:
        out += np.matmul(a[head:].T, b[head:])
    return out


def _chunking(N, per_sample):
    """(samples per chunk, worker threads): chunks that fit the cache and the workspace limit,
    as many as a multiple of the workers when the work is worth spreading."""
    nb = chunk_size(N, per_sample, CHUNK_BYTES)
    n_chunks = -(-N // nb)
    T = parallel.workers(max(n_chunks, N if N * per_sample >= _PARALLEL_MIN_BYTES else 1))
    if T > 1:
        n_chunks = -(-max(n_chunks, T) // T) * T
        nb = -(-N // n_chunks)
    return nb, T


def _worker_chunks(N, nb, T, w):
    """The chunks (n0, n1) of worker w: every T-th chunk of nb samples, from the w-th."""
    for n0 in range(w * nb, N, T * nb):
        yield n0, min(N, n0 + nb)


class _Aux(NamedTuple):
    """The CPU engine's part of a Conv2dCache."""

    cols: Any  # the input's columns, (N*P, K [+1 with a bias]) (a transposed view when K-major), or None
    chunk: int  # samples per forward chunk
    workspace: Any  # the forward's Workspace (backward takes its scratch buffers from it), or None


def conv2d_forward(x, w, b, g, activation=None, workspace=None):
    """x (N, C, H, W), any layout -> (y (N, F, OH, OW) channels-last, cache).

    Per chunk of samples: the input's columns A, y2 = A @ W2^T + b straight into y's NHWC rows
    (max(., 0) in place with ``activation="relu"``). When backward will use them and they are
    small, the columns of the whole batch are kept for it. ``workspace``: a cnn_gpu.Workspace
    for the scratch buffers (the cache may refer to it: valid until the next call with it).
    """
    if g.G != 1:  # grouped convolutions: depthwise, group by group, or the reference for narrow groups
        if g.G == g.C:
            return depthwise.conv2d_forward(x, w, b, g, activation)
        if g.C // g.G < GROUPED_MIN_CHANNELS:
            return reference.conv2d_forward(x, w, b, g, activation)
        return _grouped_forward(x, w, b, g, activation)
    x_in, x = x, to_channels_last(x)
    plan = _plan(g)
    K1 = g.K + (b is not None)  # with a bias, a column of ones: b rides in the GEMM
    per_sample = g.P * K1 * x.dtype.itemsize
    nb, T = _chunking(g.N, per_sample)
    # Keep the batch's columns for backward when it uses them and they are small enough to stay
    # in the cache (measured: writing larger ones out and reading them back costs more than
    # rebuilding them chunk by chunk).
    keep = not plan.transposed and g.N * per_sample <= min(KEEP_BYTES, workspace_limit_bytes())
    full = scratch(workspace, "cols_all", (K1, g.N * g.P) if plan.kmajor else (g.N * g.P, K1), x.dtype, np) if keep else None
    if full is None and x is x_in:  # backward reads x (its columns rebuilt, or the transposed path): own it,
        x = to_channels_last(x, copy=True)  # so that the caller may reuse its array (the others are copies)
    x_nhwc = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    w2 = _w2(w, plan.kmajor)  # (F, K)
    if b is not None:
        w2 = np.concatenate([w2, b[:, None]], axis=1)  # (F, K+1) = [W2 | b]
    y_nhwc = np.empty((g.N, g.OH, g.OW, g.F), dtype=x.dtype)
    y2 = y_nhwc.reshape(g.N * g.P, g.F)  # (N*P, F)

    def work(t):  # worker t's chunks; its own scratch buffers
        for n0, n1 in _worker_chunks(g.N, nb, T, t):
            a = _chunk_cols(x_nhwc, n0, n1, K1, plan, workspace, nb, full, (f"cols{t}", f"xpad{t}"))  # (n*P, K1)
            yc = y2[n0 * g.P : n1 * g.P]  # (n*P, F), contiguous
            np.matmul(a, w2.T, out=yc)  # A @ W2^T + b
            if activation == "relu":
                np.maximum(yc, 0, out=yc)

    parallel.run([functools.partial(work, t) for t in range(T)])
    cols = None if full is None else (full.T if plan.kmajor else full)  # (N*P, K1)
    y = y_nhwc.transpose(0, 3, 1, 2)  # (N, F, OH, OW) view of NHWC memory
    aux = _Aux(cols, nb, workspace)
    return y, Conv2dCache("cpu", g, x, w, b is not None, activation, y if activation else None, aux)


class _Backward(NamedTuple):
    """What the backward workers share."""

    plan: _Plan
    x_nhwc: Any  # (N, H, W, C)
    dy_nhwc: Any  # (N, OH, OW, F): delta (the mask of a relu is applied per chunk)
    y2: Any  # the relu's output rows (N*P, F), or None
    w_mat: Any  # w2t (C, KH*KW*F) on the transposed path, else w3 (KH*KW, F, C)
    dx_nhwc: Any  # (N, H, W, C) or None
    cols: Any  # the forward's kept columns, or None
    has_bias: bool
    ws: Any
    nb: int
    workers: int


def _delta_rows(s: _Backward, n0, n1, t):
    """delta for samples n0:n1 as (n*P, F) rows: dy's, times y > 0 after a relu (into scratch)."""
    g = s.plan.g
    dyc = s.dy_nhwc[n0:n1].reshape((n1 - n0) * g.P, g.F)  # (n*P, F)
    if s.y2 is None:
        return dyc
    out = scratch(s.ws, f"delta{t}", (s.nb * g.P * g.F,), dyc.dtype, np)[: dyc.size].reshape(dyc.shape)
    return np.multiply(dyc, s.y2[n0 * g.P : n1 * g.P] > 0, out=out)


def _transposed_worker(s: _Backward, t: int):
    """Worker t on the transposed path: returns its sums (dW2t (KH*KW*F, C), db (F,) or None)."""
    g, gt = s.plan.g, s.plan.gt
    HW, Kt = g.H * g.W, g.F * g.T
    dw2, part = np.zeros((Kt, g.C), dtype=s.dy_nhwc.dtype), np.empty((Kt, g.C), dtype=s.dy_nhwc.dtype)
    db = np.zeros((g.F,), dtype=s.dy_nhwc.dtype) if s.has_bias else None
    ones = np.ones((s.nb * g.P,), dtype=s.dy_nhwc.dtype) if s.has_bias else None
    x2 = s.x_nhwc.reshape(g.N * HW, g.C)  # (N*H*W, C)
    for n0, n1 in _worker_chunks(g.N, s.nb, s.workers, t):
        delta = _delta_rows(s, n0, n1, t)  # (n*P, F)
        if db is not None and ones is not None:  # (has_bias)
            db += np.matmul(ones[: delta.shape[0]], delta)  # the column sums, as a GEMV
        rows = (n1 - n0) * HW
        dycols = scratch(s.ws, f"dycols{t}", (s.nb * HW * Kt,), delta.dtype, np)[: rows * Kt].reshape(rows, Kt)
        _im2col_rows(delta.reshape(n1 - n0, g.OH, g.OW, g.F), gt, dycols, s.ws, s.nb, f"dypad{t}")  # (n*H*W, Kt)
        np.matmul(dycols.T, x2[n0 * HW : n1 * HW], out=part)  # (Kt, n*H*W) @ (n*H*W, C)
        dw2 += part
        if s.dx_nhwc is not None:
            dxc = s.dx_nhwc.reshape(g.N * HW, g.C)[n0 * HW : n1 * HW]  # (n*H*W, C)
            np.matmul(dycols, s.w_mat.T, out=dxc)  # (n*H*W, Kt) @ (Kt, C)
    return dw2, db


def _columns_worker(s: _Backward, t: int):
    """Worker t on the columns path: returns its sum dW2^T (K [+1: db], F)."""
    g = s.plan.g
    K1 = g.K + s.has_bias
    dw2, part = np.zeros((K1, g.F), dtype=s.dy_nhwc.dtype), np.empty((K1, g.F), dtype=s.dy_nhwc.dtype)
    for n0, n1 in _worker_chunks(g.N, s.nb, s.workers, t):
        delta = _delta_rows(s, n0, n1, t)  # (n*P, F)
        if s.cols is not None:  # the forward's columns
            a = s.cols[n0 * g.P : n1 * g.P]  # (n*P, K1)
        else:
            a = _chunk_cols(s.x_nhwc, n0, n1, K1, s.plan, s.ws, s.nb, None, (f"bcols{t}", f"bxpad{t}"))
        _gemm_tn(a, delta, part)  # (K1, n*P) @ (n*P, F): dW2^T and, last, db
        dw2 += part
        if s.dx_nhwc is not None:
            rows = (n1 - n0) * g.P
            dT = scratch(s.ws, f"dT{t}", (g.T * s.nb * g.P * g.C,), delta.dtype, np)[: g.T * rows * g.C]
            dT = dT.reshape(g.T, rows, g.C)
            np.matmul(delta, s.w_mat, out=dT)  # (n*P, F) @ (T, F, C) -> (T, n*P, C)
            _col2im_taps_into(dT, s.dx_nhwc[n0:n1], g)
    return dw2, None


def conv2d_backward(dy, cache, input_grad=True):
    """dy (N, F, OH, OW), any layout -> (dx (N, C, H, W) channels-last or None, dw, db).

    The transposed path when stride 1 and dy's columns are not much larger than the input's,
    else the input's columns (kept by forward, or rebuilt per chunk); ``input_grad=False``
    skips dx and takes the smaller of the two column matrices for dW. Each worker sums its
    chunks' dW and db; the workers' sums are added in order.
    """
    if isinstance(cache.aux, _GroupedAux):
        return _grouped_backward(dy, cache, input_grad)
    if isinstance(cache.aux, depthwise.DepthwiseAux):
        return depthwise.conv2d_backward(dy, cache, input_grad)
    g, w = cache.g, cache.w
    plan = _plan(g)
    cols = cache.aux.cols
    Kt = g.F * g.T
    transposed = plan.transposed if input_grad else (plan.gt is not None and cols is None and g.H * g.W * Kt < g.P * g.K)
    per_sample = (g.H * g.W * Kt if transposed else g.P * max(g.K, g.T * g.C)) * dy.dtype.itemsize
    nb, workers = _chunking(g.N, per_sample)
    if transposed:
        w_mat = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)).reshape(g.C, Kt)  # (C, KH*KW*F)
    else:
        w_mat = np.ascontiguousarray(w.transpose(2, 3, 0, 1)).reshape(g.T, g.F, g.C)  # (KH*KW, F, C)
    y2 = None if cache.activation != "relu" else cache.y.transpose(0, 2, 3, 1).reshape(g.N * g.P, g.F)
    s = _Backward(
        plan,
        cache.x.transpose(0, 2, 3, 1),
        to_channels_last(dy).transpose(0, 2, 3, 1),
        y2,
        w_mat,
        np.empty((g.N, g.H, g.W, g.C), dtype=dy.dtype) if input_grad else None,
        cols,
        cache.has_bias,
        cache.aux.workspace,
        nb,
        workers,
    )
    worker = _transposed_worker if transposed else _columns_worker
    sums = parallel.run([functools.partial(worker, s, t) for t in range(workers)])
    dw2, db = sums[0]
    for dw_t, db_t in sums[1:]:  # in worker order: reproducible
        dw2 += dw_t
        if db is not None:
            db += db_t
    if transposed:
        dw = np.ascontiguousarray(dw2.reshape(g.KH, g.KW, g.F, g.C)[::-1, ::-1].transpose(2, 3, 0, 1))  # (F, C, KH, KW)
    else:
        db = dw2[g.K].copy() if cache.has_bias else None  # (F,): the ones column's row
        dw = _dw_from_w2(dw2[: g.K].T, w.shape, plan.kmajor)
    dx = None if s.dx_nhwc is None else s.dx_nhwc.transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory
    return dx, dw, db


# ------------------------------------------------------------------ grouped convolution
class _GroupedAux(NamedTuple):
    """A grouped Conv2dCache's part: each group's dense cache, in group order."""

    caches: tuple


def _grouped_forward(x, w, b, g: ConvGeometry, activation):
    """Group gi's channels gi*C/G ... convolved with its F/G filters by the dense path (a loop over
    the groups, each a convolution of C/G channels), written into one channels-last y."""
    Cg, Fg = g.C // g.G, g.F // g.G
    sub = g._replace(C=Cg, F=Fg, G=1)
    y = np.empty((g.N, g.OH, g.OW, g.F), dtype=x.dtype).transpose(0, 3, 1, 2)  # (N, F, OH, OW) of NHWC memory
    caches = []
    for gi in range(g.G):
        f = slice(gi * Fg, (gi + 1) * Fg)
        yg, cache = conv2d_forward(x[:, gi * Cg : (gi + 1) * Cg], w[f], None if b is None else b[f], sub, activation)
        y[:, f] = yg
        caches.append(cache)
    return y, Conv2dCache("cpu", g, x, w, b is not None, activation, y if activation else None, _GroupedAux(tuple(caches)))


def _grouped_backward(dy, cache, input_grad):
    """Each group's backward on its slice of dy; dx (channels-last), dw and db assembled in order."""
    g = cache.g
    Cg, Fg = g.C // g.G, g.F // g.G
    dx = np.empty((g.N, g.H, g.W, g.C), dtype=dy.dtype).transpose(0, 3, 1, 2) if input_grad else None
    dws, dbs = [], []
    for gi, sub in enumerate(cache.aux.caches):
        dxg, dwg, dbg = conv2d_backward(dy[:, gi * Fg : (gi + 1) * Fg], sub, input_grad)
        if input_grad:
            dx[:, gi * Cg : (gi + 1) * Cg] = dxg
        dws.append(dwg)
        dbs.append(dbg)
    return dx, np.concatenate(dws), np.concatenate(dbs) if cache.has_bias else None
