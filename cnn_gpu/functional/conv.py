"""2-D convolution through im2col + matrix multiplies, forward and backward.

Notation (used throughout this module and the kernels):
    N   batch size            C   input channels        H, W    input height, width
    F   filters (out chans)   KH, KW  kernel size       SH, SW  stride
    PH, PW  zero padding      DH, DW  dilation          OH, OW  output height, width
    OH = (H + 2*PH - DH*(KH-1) - 1) // SH + 1, OW likewise;  P = OH*OW;  K = C*KH*KW;
    T = KH*KW (taps);  n: the samples of one chunk of the batch.
    x (N, C, H, W), w (F, C, KH, KW), b (F,), y (N, F, OH, OW).
    cols (N, K, P): column p = oh*OW + ow holds the receptive field of output (oh, ow),
    row k = (c*KH + kh)*KW + kw (the layout of torch.nn.functional.unfold; im2col/col2im).

The fast path (conv2d_forward_cl / conv2d_backward_cl) works channels-last: x and y are
(N, C, H, W)-shaped views of NHWC memory (functional/_layout.py), x_nhwc = x.transpose(0,
2, 3, 1), so that one GEMM lands y in its layout. Row m = n*P + oh*OW + ow of the columns
A (n*P, K) is the receptive field of output (n, oh, ow), in one of two orders:
    row-major  A stored (n*P, K), k = (kh*KW + kw)*C + c: gathers runs of KW*C floats
    K-major    A stored (K, n*P), k = (c*KH + kh)*KW + kw: gathers runs of OW floats
(whichever runs are longer: K-major for few channels); W2 (F, K) is w in the same order.
With a bias, A has a last column of ones and W2 the column b.

Forward:   y2 = A @ W2^T (+ b)                         (n*P, K) @ (K, F) -> y_nhwc rows
Backward (delta = dL/dy, delta2 its (n*P, F) NHWC rows), per chunk, one of:
  transposed (stride 1): dx is the convolution of delta, padded by Q = D*(K-1) - P, with
    the flipped kernel W2t[c, (kh'*KW + kw')*F + f] = w[f, c, KH-1-kh', KW-1-kw'], so the
    row-major columns of delta, dycols (n*H*W, T*F), give both gradients:
        dx2 = dycols @ W2t^T    dW2t = dycols^T @ x2      x2 = x_nhwc as (n*H*W, C)
  otherwise (strided, over-padded, or when delta's columns would be much larger):
        dW2^T = A^T @ delta2 (with the ones column: db)   dT = delta2 @ W3 (T, n*P, C)
    and col2im of the tap-major dT (each tap adds whole OW*C runs); W3[t] = w[:, :, kh, kw].
  db without a ones column: the column sums of delta2.

The batch is processed in chunks whose columns fit the CPU's cache and never exceed the
workspace limit (cnn_gpu.set_workspace_limit): a chunk's gather, GEMMs and col2im run on
cached data; backward rebuilds a chunk's columns from the kept input unless forward kept
them (small ones only). On NumPy the chunks are spread over the cores (_parallel.py).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

from ..backend import get_array_module
from ..workspace import chunk_size, keep_bytes, workspace_limit_bytes
from . import _dispatch, _parallel
from ._checks import check_float, check_same_dtype, check_shape, describe, pair, same_xp
from ._layout import to_channels_last, to_contiguous
from ._window import clipped_taps, crop2d, out_size, pad2d, tap_slices


def _geometry(x_shape, kernel_size, stride, padding, dilation, what="x"):
    KH, KW = pair("kernel_size", kernel_size, minimum=1)
    stride = pair("stride", stride, minimum=1)
    padding = pair("padding", padding, minimum=0)
    dilation = pair("dilation", dilation, minimum=1)
    N, C, H, W = x_shape
    (SH, SW), (PH, PW), (DH, DW) = stride, padding, dilation
    eff_h, eff_w = DH * (KH - 1) + 1, DW * (KW - 1) + 1
    if eff_h > H + 2 * PH or eff_w > W + 2 * PW:
        raise ValueError(
            f"kernel_size: the (dilated) kernel {eff_h}x{eff_w} must fit the padded input "
            f"{H + 2 * PH}x{W + 2 * PW} ({what} {H}x{W}, padding {PH},{PW}), got kernel {KH}x{KW}, dilation {DH},{DW}"
        )
    OH, OW = out_size(H, KH, SH, PH, DH), out_size(W, KW, SW, PW, DW)
    return (KH, KW), stride, padding, dilation, (OH, OW)


def _windows(xp, xpad, kernel_size, out_hw, stride, dilation):
    """The sliding-window view of a padded 4-D array (A, B, Hp, Wp) of any strides:
    (A, B, KH, KW, OH, OW), element [a, b, kh, kw, oh, ow] = xpad[a, b, oh*SH + kh*DH, ow*SW + kw*DW].
    A view (no copy); copying it out is im2col."""
    (KH, KW), (OH, OW), (SH, SW), (DH, DW) = kernel_size, out_hw, stride, dilation
    A, B = xpad.shape[:2]
    sA, sB, sH, sW = xpad.strides
    return xp.lib.stride_tricks.as_strided(
        xpad, (A, B, KH, KW, OH, OW), (sA, sB, sH * DH, sW * DW, sH * SH, sW * SW))  # (A, B, KH, KW, OH, OW)


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW); zero padding."""
    check_float("x", x, ndim=4)
    (KH, KW), stride, padding, dilation, (OH, OW) = _geometry(x.shape, kernel_size, stride, padding, dilation)
    k = _dispatch.kernels(x)
    if k is not None:
        return k.im2col(x, (KH, KW), stride, padding, dilation)
    xp = get_array_module(x)
    N, C = x.shape[:2]
    xpad = pad2d(xp, x, padding)  # (N, C, H+2PH, W+2PW)
    cols = xp.empty((N, C, KH, KW, OH, OW), dtype=x.dtype)
    xp.copyto(cols, _windows(xp, xpad, (KH, KW), (OH, OW), stride, dilation))  # one strided gather
    return cols.reshape(N, C * KH * KW, OH * OW)  # (N, C*KH*KW, OH*OW)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, dilation=1):
    """The adjoint of :func:`im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W), summing overlaps."""
    check_float("cols", cols, ndim=3)
    if len(tuple(x_shape)) != 4:
        raise ValueError(f"x_shape: expected (N, C, H, W), got {tuple(x_shape)!r}")
    N, C, H, W = (int(s) for s in x_shape)
    (KH, KW), stride, padding, dilation, (OH, OW) = _geometry((N, C, H, W), kernel_size, stride, padding, dilation, "x_shape")
    check_shape("cols", cols, (N, C * KH * KW, OH * OW))
    k = _dispatch.kernels(cols)
    if k is not None:
        return k.col2im(cols, (N, C, H, W), (KH, KW), stride, padding, dilation)
    xp = get_array_module(cols)
    PH, PW = padding
    dxpad = xp.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=cols.dtype)
    cols6 = cols.reshape(N, C, KH, KW, OH, OW)  # (N, C, KH, KW, OH, OW)
    for kh, kw, rows, cs in tap_slices(KH, KW, OH, OW, stride, dilation):
        dxpad[:, :, rows, cs] += cols6[:, :, kh, kw]
    return xp.ascontiguousarray(crop2d(dxpad, padding, H, W))  # (N, C, H, W)


# --------------------------------------------------------------------------- channels-last core
class _Geom(NamedTuple):
    kernel_size: tuple  # (KH, KW)
    stride: tuple
    padding: tuple
    dilation: tuple
    out_hw: tuple  # (OH, OW)


def _transposed_geometry(g: _Geom, H: int, W: int):
    """For a stride-1 convolution, dx is itself a convolution: of dy, zero-padded by
    Q = D*(K-1) - P, with the flipped kernel at the same dilation, giving H x W. Its geometry,
    or None when that does not hold (stride > 1, or Q < 0: padding wider than the kernel)."""
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = g.kernel_size, g.stride, g.padding, g.dilation
    QH, QW = DH * (KH - 1) - PH, DW * (KW - 1) - PW
    if (SH, SW) != (1, 1) or QH < 0 or QW < 0:
        return None
    return _Geom((KH, KW), (1, 1), (QH, QW), (DH, DW), (H, W))


class _Plan(NamedTuple):
    """How one convolution runs; a function of the shapes and the geometry only."""

    g: _Geom
    gt: Any  # the transposed geometry (see _transposed_geometry), or None
    kmajor: bool  # the input's columns K-major, else row-major (see conv2d_forward_cl)
    transposed: bool  # backward with input_grad takes the transposed path


# The transposed path's columns (H*W x KH*KW*F) may be this much larger than the input's
# (OH*OW x KH*KW*C) and still win: measured, it avoids rebuilding the input's columns and col2im.
_TRANSPOSED_MAX_RATIO = 1.5


def _plan(x_shape, w_shape, g: _Geom) -> _Plan:
    _, C, H, W = x_shape
    F, _, KH, KW = w_shape
    (OH, OW), (SW, DW) = g.out_hw, (g.stride[1], g.dilation[1])
    gt = _transposed_geometry(g, H, W)
    # the gather's contiguous runs: row-major copies KW*C floats at a time (C when dilated),
    # K-major OW (1 when strided); the longer runs copy faster
    kmajor = (OW if SW == 1 else 1) > (KW * C if DW == 1 else C)
    transposed = gt is not None and H * W * F <= _TRANSPOSED_MAX_RATIO * OH * OW * C
    return _Plan(g, gt, kmajor, transposed)


def _w2(xp, w, kmajor):
    """w (F, C, KH, KW) as the (F, K) matrix whose columns match the columns' order."""
    F = w.shape[0]
    if kmajor:
        return w.reshape(F, -1)  # (F, C*KH*KW), k = (c*KH + kh)*KW + kw
    return xp.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(F, -1)  # (F, KH*KW*C), k = (kh*KW + kw)*C + c


def _dw_from_w2(xp, dw2, w_shape, kmajor):
    """The inverse of _w2 for a gradient: (F, K) -> (F, C, KH, KW)."""
    F, C, KH, KW = w_shape
    if kmajor:
        return dw2.reshape(F, C, KH, KW)
    return xp.ascontiguousarray(dw2.reshape(F, KH, KW, C).transpose(0, 3, 1, 2))  # (F, C, KH, KW)


def _view(xp, a, shape):
    """a reshaped to ``shape`` as a view (the columns are written through it): a reshape that
    would need a copy is an error here, not a silent loss of the writes."""
    v = a.reshape(shape)
    if v.size and not xp.may_share_memory(v, a):
        raise AssertionError(f"internal: reshaping {a.shape} (strides {a.strides}) to {shape} copies")
    return v


def _padded(xp, x4, spatial_last, padding, ws, shape, name):
    """A zero-bordered copy of x4 (4-D, any strides) in a buffer of ``shape`` (the workspace's,
    kept for the largest chunk, or a fresh one), of which a smaller chunk uses the leading
    part. The spatial axes are 1, 2 (x4 (n, H, W, C)) or, with ``spatial_last``, 2, 3 (x4 (C, n,
    H, W)). A kept buffer's border is zeroed once, when allocated: only its interior is written."""
    PH, PW = padding
    buf = xp.zeros(shape, dtype=x4.dtype) if ws is None else ws.get(name, shape, x4.dtype, xp, zeros=True)
    if spatial_last:
        C, n, H, W = x4.shape
        buf = buf[:, :n]  # (C, n, H+2PH, W+2PW)
        buf[:, :, PH : PH + H, PW : PW + W] = x4
    else:
        n, H, W, C = x4.shape
        buf = buf[:n]  # (n, H+2PH, W+2PW, C)
        buf[:, PH : PH + H, PW : PW + W, :] = x4
    return buf


def _im2col_rows(x_nhwc, g: _Geom, out, ws=None, nb=None, name="xpad"):
    """x_nhwc (n, H, W, C), any strides -> out (n*OH*OW, KH*KW*C), row-major columns:
    out[(n*OH + oh)*OW + ow, (kh*KW + kw)*C + c] = x_padded[n, oh*SH + kh*DH, ow*SW + kw*DW, c].
    ``ws``, ``nb``, ``name``: the workspace, the chunk size and the name its padded copy is kept for."""
    n, H, W, C = x_nhwc.shape
    (KH, KW), (OH, OW), (PH, PW) = g.kernel_size, g.out_hw, g.padding
    xp = get_array_module(x_nhwc)
    k = _dispatch.kernels(x_nhwc)
    if k is not None:
        # The NCHW kernel, then a transpose; an NHWC kernel writing these columns would skip it.
        cols = k.im2col(x_nhwc.transpose(0, 3, 1, 2), g.kernel_size, g.stride, g.padding, g.dilation)  # (n, K, P)
        cols5 = cols.reshape(n, C, KH, KW, OH * OW)  # (n, C, KH, KW, P)
        _view(xp, out, (n, OH * OW, KH, KW, C))[...] = cols5.transpose(0, 4, 2, 3, 1)  # (n, P, KH, KW, C)
        return out
    xpad = x_nhwc
    if PH or PW:
        xpad = _padded(xp, x_nhwc, False, g.padding, ws, (nb or n, H + 2 * PH, W + 2 * PW, C), name)  # (n, Hp, Wp, C)
    (SH, SW), (DH, DW) = g.stride, g.dilation
    sN, sH, sW, sC = xpad.strides
    win = xp.lib.stride_tricks.as_strided(
        xpad, (n, OH, OW, KH, KW, C), (sN, sH * SH, sW * SW, sH * DH, sW * DW, sC))  # (n, OH, OW, KH, KW, C), a view
    xp.copyto(_view(xp, out, (n, OH, OW, KH, KW, C)), win)  # one strided gather
    return out


def _im2col_kmajor(x_nhwc, g: _Geom, out, ws=None, nb=None, name="xpad_cf"):
    """x_nhwc (n, H, W, C), any strides -> out (C*KH*KW, n*OH*OW) (any row stride), K-major columns:
    out[(c*KH + kh)*KW + kw, (n*OH + oh)*OW + ow] = x_padded[n, oh*SH + kh*DH, ow*SW + kw*DW, c]."""
    n, H, W, C = x_nhwc.shape
    (KH, KW), (OH, OW), (PH, PW) = g.kernel_size, g.out_hw, g.padding
    xp = get_array_module(x_nhwc)
    k = _dispatch.kernels(x_nhwc)
    if k is not None:
        # The NCHW kernel, then a transpose; a kernel writing K-major columns would skip it.
        cols = k.im2col(x_nhwc.transpose(0, 3, 1, 2), g.kernel_size, g.stride, g.padding, g.dilation)  # (n, K, P)
        _view(xp, out, (C * KH * KW, n, OH * OW))[...] = cols.transpose(1, 0, 2)  # (K, n, P)
        return out
    x_cf = x_nhwc.transpose(3, 0, 1, 2)  # (C, n, H, W) view
    xpad = _padded(xp, x_cf, True, g.padding, ws, (C, nb or n, H + 2 * PH, W + 2 * PW), name)  # (C, n, Hp, Wp)
    (SH, SW), (DH, DW) = g.stride, g.dilation
    sC, sN, sH, sW = xpad.strides
    win = xp.lib.stride_tricks.as_strided(
        xpad, (C, KH, KW, n, OH, OW), (sC, sH * DH, sW * DW, sN, sH * SH, sW * SW))  # (C, KH, KW, n, OH, OW), a view
    xp.copyto(_view(xp, out, (C, KH, KW, n, OH, OW)), win)  # one strided gather, runs of OW
    return out


def _col2im_taps_into(dT, dx_nhwc, g: _Geom):
    """dx_nhwc (n, H, W, C) (garbage on entry) = col2im of the tap-major column gradient
    dT (KH*KW, n*OH*OW, C): tap t = kh*KW + kw of output (n, oh, ow) adds into dx at
    (n, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW). Tap-major, each tap adds whole (OW*C)-runs.
    The first tap that covers all of dx (stride-1 "same" convolutions have one) is assigned,
    the others added; without one dx is zeroed first."""
    n, H, W, C = dx_nhwc.shape
    (KH, KW), (OH, OW) = g.kernel_size, g.out_hw
    xp = get_array_module(dT)
    k = _dispatch.kernels(dT)
    if k is not None:
        # A transpose, then the NCHW kernel; a kernel reading tap-major columns would skip it.
        d = dT.reshape(KH * KW, n, OH * OW, C).transpose(1, 3, 0, 2)  # (n, C, KH*KW, P)
        dx = k.col2im(xp.ascontiguousarray(d).reshape(n, C * KH * KW, OH * OW), (n, C, H, W),
                      g.kernel_size, g.stride, g.padding, g.dilation)  # (n, C, H, W)
        dx_nhwc[...] = dx.transpose(0, 2, 3, 1)  # (n, H, W, C)
        return
    d5 = dT.reshape(KH * KW, n, OH, OW, C)  # (KH*KW, n, OH, OW, C)
    taps = list(clipped_taps(KH, KW, OH, OW, H, W, g.stride, g.padding, g.dilation))
    whole = slice(0, H, 1), slice(0, W, 1)
    first = next((t for t in taps if (t[4], t[5]) == whole), None)
    if first is None:
        dx_nhwc[...] = 0
    else:
        kh, kw, orows, ocols = first[:4]
        dx_nhwc[...] = d5[kh * KW + kw, :, orows, ocols, :]
    for t in taps:
        if t is not first:
            kh, kw, orows, ocols, irows, icols = t
            dx_nhwc[:, irows, icols, :] += d5[kh * KW + kw, :, orows, ocols, :]  # (n, rows, cols, C)


class Conv2dCache(NamedTuple):
    """What conv2d_backward needs: the input (channels-last; backward may rebuild its columns
    from it, so it must not change between forward and backward), the weights, and the
    input's columns when the forward kept them."""

    x: Any  # (N, C, H, W) channels-last
    cols: Any  # the input's columns, (N*OH*OW, K [+1 with a bias]) (a transposed view when K-major), or None
    w: Any  # (F, C, KH, KW)
    has_bias: bool
    stride: tuple
    padding: tuple
    dilation: tuple
    chunk: int  # samples per forward chunk

    @property
    def x_shape(self) -> tuple:
        return tuple(self.x.shape)


def _buffer(xp, ws, shape, dtype, name):
    """A (rows, K) / (K, rows) scratch matrix: the workspace's ``name`` or a fresh one."""
    return xp.empty(shape, dtype=dtype) if ws is None else ws.get(name, shape, dtype, xp)


def _chunk_cols(xp, x_nhwc, n0, n1, P, K1, plan: _Plan, g, ws, nb, full, names):
    """The input's columns for samples n0:n1 as an (n*P, K1) matrix: built into ``full``
    (all of the batch's columns, kept) at rows n0*P:n1*P, or into a chunk buffer. With
    K1 = K + 1 the last column is all ones (the bias's column, see conv2d_forward_cl)."""
    C = x_nhwc.shape[3]
    K = C * g.kernel_size[0] * g.kernel_size[1]
    rows = (n1 - n0) * P
    if plan.kmajor:
        if full is not None:
            buf = full[:, n0 * P : n1 * P]  # (K1, n*P), rows N*P apart
        else:
            buf = _buffer(xp, ws, (K1, nb * P), x_nhwc.dtype, names[0])[:, :rows]  # (K1, n*P)
        _im2col_kmajor(x_nhwc[n0:n1], g, buf[:K], ws, nb, names[1] + "_cf")
        if K1 > K:
            buf[K] = 1
        return buf.T  # (n*P, K1) view
    if full is not None:
        buf = full[n0 * P : n1 * P]  # (n*P, K1)
    else:
        buf = _buffer(xp, ws, (nb * P * K1,), x_nhwc.dtype, names[0])[: rows * K1].reshape(rows, K1)  # contiguous prefix
    _im2col_rows(x_nhwc[n0:n1], g, buf[:, :K], ws, nb, names[1])  # rows K1 apart
    if K1 > K:
        buf[:, K] = 1
    return buf


# OpenBLAS computes a^T b with a small (K, F) result over many rows far below speed (measured:
# 26 x 6 over 50k rows 2x slower than the same summed over blocks of 1k rows), so such products
# are summed over blocks of _TN_BLOCK rows, one batched GEMM.
_TN_BLOCK = 1024
_TN_SMALL = 1024


def _gemm_tn(xp, a, b, out):
    """out (K, F) = a^T @ b for a (rows, K) and b (rows, F), any strides."""
    rows, K = a.shape
    F = b.shape[1]
    B = rows // _TN_BLOCK
    if K * F > _TN_SMALL or B < 2:
        return xp.matmul(a.T, b, out=out)
    head = B * _TN_BLOCK
    a3 = a[:head].reshape(B, _TN_BLOCK, K).transpose(0, 2, 1)  # (B, K, R)
    b3 = b[:head].reshape(B, _TN_BLOCK, F)  # (B, R, F)
    xp.matmul(a3, b3).sum(axis=0, out=out)  # (B, K, F) summed over the blocks
    if head < rows:
        out += xp.matmul(a[head:].T, b[head:])
    return out


# Below this many bytes of columns a convolution runs as one chunk on the calling thread.
_PARALLEL_MIN_BYTES = 1 << 18


def _chunking(xp, N, per_sample):
    """(samples per chunk, worker threads): chunks that fit the cache and the workspace limit,
    as many as a multiple of the workers (see _parallel) when the work is worth spreading."""
    nb = chunk_size(N, per_sample, xp)
    n_chunks = -(-N // nb)
    T = _parallel.workers(xp, max(n_chunks, N if N * per_sample >= _PARALLEL_MIN_BYTES else 1))
    if T > 1:
        n_chunks = -(-max(n_chunks, T) // T) * T
        nb = -(-N // n_chunks)
    return nb, T


def _worker_chunks(N, nb, T, w):
    """The chunks (n0, n1) of worker w: every T-th chunk of nb samples, from the w-th."""
    for n0 in range(w * nb, N, T * nb):
        yield n0, min(N, n0 + nb)


def conv2d_forward_cl(x, w, b, stride=1, padding=0, dilation=1, ws=None, relu=False, keep_cols=None):
    """Channels-last core: x (N, C, H, W) channels-last -> (y (N, F, OH, OW) channels-last, cache).

    Per chunk of samples: the input's columns A (n*P, K) (row-major or K-major, see the module
    notes), y2 = A @ W2^T + b (max(., 0) with ``relu``) straight into y's NHWC rows; with a
    bias A has a column of ones and W2 the column b, so the bias is added inside the GEMM
    (and its gradient comes out of dW's GEMM). When backward will use them and they are
    small, the columns of the whole batch are kept for it. On NumPy the chunks are spread
    over the cores (functional/_parallel.py).

    ``ws``: a cnn_gpu.workspace.Workspace for the scratch buffers (the cache may refer to
    them: valid until the next call with the same workspace). ``keep_cols``: keep the columns
    (if they fit the limit) or not; None: when backward will use them and they are small.
    Inputs are not validated here.
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    (_, _), stride, padding, dilation, (OH, OW) = _geometry((N, C, H, W), (KH, KW), stride, padding, dilation)
    plan = _plan(x.shape, w.shape, _Geom((KH, KW), stride, padding, dilation, (OH, OW)))
    K, P = C * KH * KW, OH * OW
    K1 = K + (b is not None)  # with a bias, a column of ones: b rides in the GEMM
    per_sample = P * K1 * x.dtype.itemsize
    nb, T = _chunking(xp, N, per_sample)
    # Keep the batch's columns for backward when it uses them and, on the CPU, they are small
    # enough to stay in the cache (measured: writing larger ones out to memory and reading them
    # back costs more than rebuilding them chunk by chunk).
    keep = keep_cols if keep_cols is not None else (not plan.transposed and N * per_sample <= keep_bytes(xp))
    full = None
    if keep and N * per_sample <= workspace_limit_bytes():
        full = _buffer(xp, ws, (K1, N * P) if plan.kmajor else (N * P, K1), x.dtype, "cols_all")
    x_nhwc = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    w2 = _w2(xp, w, plan.kmajor)  # (F, K)
    if b is not None:
        w2 = xp.concatenate([w2, b[:, None]], axis=1)  # (F, K+1) = [W2 | b]
    y_nhwc = xp.empty((N, OH, OW, F), dtype=x.dtype)
    y2 = y_nhwc.reshape(N * P, F)  # (N*P, F)

    def work(t):  # worker t's chunks; its own scratch buffers
        names = (f"cols{t}", f"xpad{t}")
        for n0, n1 in _worker_chunks(N, nb, T, t):
            a = _chunk_cols(xp, x_nhwc, n0, n1, P, K1, plan, plan.g, ws, nb, full, names)  # (n*P, K1)
            yc = y2[n0 * P : n1 * P]  # (n*P, F), contiguous
            xp.matmul(a, w2.T, out=yc)  # A @ W2^T + b
            if relu:
                xp.maximum(yc, 0, out=yc)

    _parallel.run(xp, [functools.partial(work, t) for t in range(T)])
    cols = None if full is None else (full.T if plan.kmajor else full)  # (N*P, K1)
    cache = Conv2dCache(x, cols, w, b is not None, stride, padding, dilation, nb)
    return y_nhwc.transpose(0, 3, 1, 2), cache  # (N, F, OH, OW) view of NHWC memory


def conv2d_backward_cl(dy, cache: Conv2dCache, ws=None, input_grad=True, relu_input=False):
    """Channels-last core: dy (N, F, OH, OW) channels-last -> (dx (N, C, H, W) channels-last, dw, db).

    Transposed path (stride 1, dy's columns not much larger than the input's): dx is the
    convolution of dy, padded by Q = D*(K-1) - P, with the flipped kernel, so per chunk one
    row-major im2col of dy, dycols (n*H*W, KH*KW*F), serves both gradients:
        dx2   = dycols @ W2t^T       (n*H*W, KH*KW*F) @ (KH*KW*F, C), straight into dx's rows
        dW2t  = dycols^T @ x2        (KH*KW*F, n*H*W) @ (n*H*W, C); x2 = x_nhwc as (n*H*W, C)
    with W2t[c, (kh'*KW + kw')*F + f] = w[f, c, KH-1-kh', KW-1-kw'].
    Otherwise the input's columns A (kept by forward, or rebuilt per chunk):
        dW2^T += A^T @ delta2        (K, n*P) @ (n*P, F); with a bias A's ones column gives db
        dT    = delta2 @ W3          (KH*KW, n*P, C): the column gradient tap-major, then col2im
    ``input_grad=False`` skips dx (returned as None) and uses the smaller of the two column
    matrices for dW. ``relu_input=True``: x is a ReLU's output, and dx comes back through that
    ReLU's backward, dx * (x > 0), applied per chunk while it is in the cache. On NumPy the
    chunks are spread over the cores; each worker sums its chunks' dW and db, and the
    workers' sums are added in order.
    """
    x, cols, w, has_bias, stride, padding, dilation, _ = cache
    xp = get_array_module(dy)
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    plan = _plan(x.shape, w.shape, _Geom((KH, KW), stride, padding, dilation, (OH, OW)))
    K, P, Kt, HW, T = C * KH * KW, OH * OW, F * KH * KW, H * W, KH * KW
    if input_grad:
        transposed = plan.transposed
    else:
        transposed = plan.gt is not None and cols is None and HW * Kt < P * K
    nb, workers = _chunking(xp, N, (HW * Kt if transposed else P * max(K, T * C)) * dy.dtype.itemsize)
    x_nhwc = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    dy_nhwc = dy.transpose(0, 2, 3, 1)  # (N, OH, OW, F)
    dy2 = dy_nhwc.reshape(N * P, F)  # (N*P, F), a view of the NHWC memory
    ones = xp.ones((nb * P,), dtype=dy.dtype) if has_bias and transposed else None
    dx_nhwc = xp.empty((N, H, W, C), dtype=dy.dtype) if input_grad else None
    if transposed:
        w2t = xp.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)).reshape(C, Kt)  # (C, KH*KW*F)
        x2 = x_nhwc.reshape(N * HW, C)  # (N*H*W, C)
        dx2 = None if dx_nhwc is None else dx_nhwc.reshape(N * HW, C)  # (N*H*W, C)
        dw_shape = (Kt, C)
    else:
        w3 = xp.ascontiguousarray(w.transpose(2, 3, 0, 1)).reshape(T, F, C)  # (KH*KW, F, C)
        dw_shape = (K + has_bias, F)  # dW2^T: rows in the input columns' order; db is the ones' row

    def work(t):  # worker t's chunks, its own scratch buffers and partial sums
        dw2 = xp.zeros(dw_shape, dtype=dy.dtype)
        part = xp.empty(dw_shape, dtype=dy.dtype)
        db = xp.zeros((F,), dtype=dy.dtype) if has_bias and transposed else None
        for n0, n1 in _worker_chunks(N, nb, workers, t):
            dyc = dy2[n0 * P : n1 * P]  # (n*P, F)
            if transposed:
                if has_bias:
                    db += xp.matmul(ones[: (n1 - n0) * P], dyc)  # (F,): the column sums, as a GEMV
                rows = (n1 - n0) * HW
                dycols = _buffer(xp, ws, (nb * HW * Kt,), dy.dtype, f"dycols{t}")[: rows * Kt].reshape(rows, Kt)
                _im2col_rows(dy_nhwc[n0:n1], plan.gt, dycols, ws, nb, f"dypad{t}")  # (n*H*W, Kt)
                xp.matmul(dycols.T, x2[n0 * HW : n1 * HW], out=part)  # (Kt, n*H*W) @ (n*H*W, C)
                dw2 += part
                if dx2 is not None:
                    dxc = dx2[n0 * HW : n1 * HW]  # (n*H*W, C)
                    xp.matmul(dycols, w2t.T, out=dxc)  # (n*H*W, Kt) @ (Kt, C)
                    if relu_input:
                        xp.multiply(dxc, x2[n0 * HW : n1 * HW] > 0, out=dxc)
                continue
            if cols is not None:  # the forward's columns
                a = cols[n0 * P : n1 * P]  # (n*P, K1)
            else:
                a = _chunk_cols(xp, x_nhwc, n0, n1, P, K + has_bias, plan, plan.g, ws, nb, None,
                                (f"bcols{t}", f"bxpad{t}"))
            _gemm_tn(xp, a, dyc, part)  # (K1, n*P) @ (n*P, F): dW2^T and, last, db
            dw2 += part
            if input_grad:
                rows = (n1 - n0) * P
                dT = _buffer(xp, ws, (T * nb * P * C,), dy.dtype, f"dT{t}")[: T * rows * C].reshape(T, rows, C)
                xp.matmul(dyc, w3, out=dT)  # (n*P, F) @ (T, F, C) -> (T, n*P, C)
                _col2im_taps_into(dT, dx_nhwc[n0:n1], plan.g)
                if relu_input:
                    xp.multiply(dx_nhwc[n0:n1], x_nhwc[n0:n1] > 0, out=dx_nhwc[n0:n1])
        return dw2, db

    sums = _parallel.run(xp, [functools.partial(work, t) for t in range(workers)])
    dw2, db = sums[0]
    for dw_t, db_t in sums[1:]:  # in worker order: reproducible
        dw2 += dw_t
        if has_bias and transposed:
            db += db_t
    if not transposed:
        if has_bias:
            db = dw2[K].copy()  # (F,)
        dw2 = dw2[:K].T  # (F, K)
    if transposed:
        dw = xp.ascontiguousarray(dw2.reshape(KH, KW, F, C)[::-1, ::-1].transpose(2, 3, 0, 1))  # (F, C, KH, KW)
    else:
        dw = _dw_from_w2(xp, dw2, w.shape, plan.kmajor)
    dx = None if dx_nhwc is None else dx_nhwc.transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory
    return dx, dw, db


def check_conv_inputs(x, w, b):
    """The checks of conv2d_forward."""
    check_float("x", x, ndim=4)
    check_float("w", w, ndim=4)
    same_xp("w", w, "x", x)
    check_same_dtype("w", w, "x", x)
    C = x.shape[1]
    F, Cw = w.shape[:2]
    if Cw != C:
        raise ValueError(f"w: expected {C} input channels (x has shape {tuple(x.shape)}), got {describe(w)}")
    if b is not None:
        check_float("b", b, ndim=1)
        same_xp("b", b, "x", x)
        check_same_dtype("b", b, "x", x)
        check_shape("b", b, (F,))


def check_conv_dy(dy, cache: Conv2dCache):
    """dy must be a float array of the forward input's dtype and the forward output's shape."""
    N, F = cache.x.shape[0], cache.w.shape[0]
    KH, KW = cache.w.shape[2:]
    _, _, _, _, (OH, OW) = _geometry(cache.x.shape, (KH, KW), cache.stride, cache.padding, cache.dilation)
    check_float("dy", dy, ndim=4)
    check_same_dtype("dy", dy, "the forward input", cache.w)
    check_shape("dy", dy, (N, F, OH, OW))


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1):
    """y = conv(x, w) + b. x (N, C, H, W), w (F, C, KH, KW), b (F,) or None -> (y, cache)."""
    check_conv_inputs(x, w, b)
    xp = get_array_module(x)
    # the cache keeps a channels-last copy of x: the fast layout, and safe from later changes to x
    y, cache = conv2d_forward_cl(to_channels_last(xp, x, copy=True), w, b, stride, padding, dilation, keep_cols=True)
    return to_contiguous(xp, y), cache  # (N, F, OH, OW)


def conv2d_backward(dy, cache: Conv2dCache):
    """dy (N, F, OH, OW) -> (dx, dw, db); db is None when the forward had no bias."""
    check_conv_dy(dy, cache)
    xp = get_array_module(dy)
    dx, dw, db = conv2d_backward_cl(to_channels_last(xp, dy), cache)
    return to_contiguous(xp, dx), dw, db  # dx (N, C, H, W)
