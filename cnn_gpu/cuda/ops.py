"""The CUDA engine: the ops on CuPy arrays, as launches of cnn_gpu's kernels (kernels/*.cu) and
cuBLAS matrix products.

Layout: activations are NCHW and C-contiguous everywhere, as the public API gives them. A
convolution's GEMMs run on the channel-major form (F, N*P) of its output (P = OH*OW):
    forward    cols (K, N*P) = im2col_cm(x)                  one kernel, from NCHW x
               y_cm (F, N*P) = W2 (F, K) @ cols              one cuBLAS GEMM
               y = act(y_cm + b), written NCHW               bias_act_forward (the epilogue)
    backward   delta_cm (F, N*P) = dy (* y > 0), db          act_backward_bias_grad (+ sum_segments for db)
               dW2 = delta_cm @ cols^T                       cuBLAS (cols^T: a transposed view)
               dcols = W2^T @ delta_cm;  dx = col2im_cm(dcols)
so no transpose or layout copy runs outside a kernel that does arithmetic anyway. A layer's
backward passes its Parameter.grad arrays (``accumulate_into``): the weight GEMMs then add into
them (cuBLAS beta = 1) and the kernels that sum db, dgamma and dbeta add their results there, so
accumulating the gradients costs no launch of its own. The im2col
columns live in the layer's Workspace (reused every step) and are kept for backward; a batch
whose columns exceed the workspace limit runs in chunks of samples.

Entry points: every kernel is ``<name>_f32`` / ``<name>_f64``, picked from the dtype; the kernels of
the layers (im2col, the epilogues but sum_segments, pooling, adaptive pooling, BatchNorm, depthwise
convolution, the activations, dropout, softmax cross-entropy) also ``<name>_f16``: float16 storage,
float arithmetic, float32 sums, statistics and parameter gradients (``_launch(..., fp16=True)``;
float16 training, docs/PRECISION.md); the optimizers' master-weight steps are float16 only.
Scalars go to the kernels as ``np.int32`` / ``np.int64`` / the array's float type, as their C
parameters say (CuPy would pass a plain Python int as 64 bits). Every launching function takes
``grid=`` / ``block=`` overrides (the tests use tiny grids so the grid-stride loops loop);
by default block = DEFAULT_BLOCK and grid = min(ceil(work / block), BLOCKS_PER_SM per SM).
The geometry comes from cnn_gpu.functional.geometry, computed and checked by the public API.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..backend import get_array_module
from ..functional import reference
from ..functional._dispatch import native
from ..functional.caches import (
    AdaptivePool2dCache,
    AddCache,
    AvgPool2dCache,
    BatchNormCache,
    Conv2dCache,
    DropoutCache,
    GeluCache,
    LinearCache,
    MaxPool2dCache,
)
from ..functional.geometry import ConvGeometry, PoolGeometry
from ..workspace import chunk_size, scratch
from .build import get_launcher
from .scalars import adam_scalars, kernel_args

NAME = "cuda"
#: activations a layer can run inside the layer before it (the epilogue kernels; see nn.Sequential)
FUSED_ACTIVATIONS = ("relu",)
DEFAULT_BLOCK = 256
MAX_BLOCK = 1024  # CUDA's limit, and the size of the kernels' shared reduction buffers
_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------ launching
def _suffix(name: str, a: Any, fp16: bool = False) -> str:
    """The entry point's suffix for array ``a``'s dtype: f32, f64, or (``fp16``: a kernel with a
    float16 entry point, kernels/common.cuh's CNN_ENTRY_POINTS_FP16) f16."""
    dt = getattr(a, "dtype", None)
    if dt == np.float32:
        return "f32"
    if dt == np.float64:
        return "f64"
    if fp16 and dt == np.float16:
        return "f16"
    kinds = "a float32, float64 or float16" if fp16 else "a float32 or float64"
    raise TypeError(f"{name}: expected {kinds} array, got {dt if dt is not None else type(a).__name__}")


def _acc(dtype) -> np.dtype:
    """The arithmetic (and sums') dtype of a kernel on ``dtype`` storage: float32 for float16
    (kernels/common.cuh's CNN_ACC), else the dtype itself."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def _i32(*values: int) -> tuple:
    out = []
    for v in values:
        v = int(v)
        if not -_INT32_MAX - 1 <= v <= _INT32_MAX:
            raise ValueError(f"size {v} does not fit the kernels' int32 parameters")
        out.append(np.int32(v))
    return tuple(out)


def _launch(
    file: str, kernel: str, a, work: int, args: tuple, grid=None, block=None, name: str = "x", fp16: bool = False
) -> None:
    """Launch ``kernel`` of kernels/<file>.cu (the entry point for the dtype of array ``a``, named
    ``name`` in errors; ``fp16``: the kernel has a float16 one too) over ``work`` items."""
    launcher = get_launcher()
    block = DEFAULT_BLOCK if block is None else int(block)
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block: expected 1..{MAX_BLOCK} threads, got {block}")
    if grid is None:
        grid = max(1, min(math.ceil(work / block), launcher.max_grid()))
    elif int(grid) < 1:
        raise ValueError(f"grid: expected at least 1 block, got {grid}")
    launcher.launch(file, f"{kernel}_{_suffix(name, a, fp16)}", int(grid), block, args)


def _empty(shape, dtype):
    """A fresh output array for a kernel to fill (the CPU emulation poisons it, to catch unwritten elements)."""
    return get_launcher().empty(tuple(int(s) for s in shape), np.dtype(dtype))


def _contiguous(name: str, a):
    """``a`` as the kernels need it, C-contiguous: itself, or (a user's strided view) a copy. The
    engine's own arrays always are, so a training step makes no such copy (the GPU budget counts)."""
    return a if a.flags.c_contiguous else get_array_module(a).ascontiguousarray(a)


def _writable(name: str, a):
    """An output a kernel writes in place: must be C-contiguous (a copy would lose the writes)."""
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name}: the CUDA engine writes C-contiguous arrays in place, got strides {a.strides} for shape {tuple(a.shape)}"
        )
    return a


def _checked_out(out, shape, dtype):
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {np.dtype(dtype)}, got {out.dtype}")
    return _writable("out", out)


def _geom_args(g: ConvGeometry) -> tuple:
    return _i32(g.N, g.C, g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.OH, g.OW)


# ------------------------------------------------------------------- segmented sums
#: A sum per channel (or per weight) over N*H*W values runs as a block per (row, segment of about
#: _SEGMENT values), up to _SEGMENT_BLOCKS blocks in all: a network's 6-64 channels then fill the
#: GPU (a block per channel would leave most of its 132 multiprocessors idle). The count depends on
#: the shape only, so the fixed-order sums (kernels/batchnorm.cu, epilogue.cu, depthwise.cu) give
#: the same bits on every GPU and for every grid.
_SEGMENT = 4096
_SEGMENT_BLOCKS = 2048


def _segments(rows: int, M: int, segments=None) -> int:
    """Segments for each of ``rows`` sums of M values: ``segments`` if given (tests), else about
    M / _SEGMENT, at most _SEGMENT_BLOCKS / rows, at least 1."""
    if segments is not None:
        if int(segments) < 1:
            raise ValueError(f"segments: expected at least 1, got {segments}")
        return int(segments)
    return max(1, min(-(-M // _SEGMENT), _SEGMENT_BLOCKS // max(1, rows)))


def _blocks_launch(
    file: str,
    kernel: str,
    a,
    blocks: int,
    args: tuple,
    grid,
    block,
    name: str = "x",
    default_block: int = DEFAULT_BLOCK,
    fp16: bool = False,
) -> None:
    """Launch a kernel that runs a thread block per item (grid-stride over ``blocks`` items)."""
    block = default_block if block is None else block
    _launch(file, kernel, a, blocks * int(block), args, grid, block, name, fp16)


def _sum_segments(part, out, rows: int, S: int, accumulate: bool, grid=None, block=None) -> None:
    """out[r] = the sum of part[r*S : r*S + S] in order (added to out with ``accumulate``), one
    thread per row: the second pass of a segmented sum (part from the first, S > 1)."""
    _launch("epilogue", "sum_segments", part, rows, (part, out, np.int64(rows), *_i32(S, accumulate)), grid, block, "part")


# ------------------------------------------------------------------- im2col / col2im
def im2col(x, g: ConvGeometry, *, cm=False, out=None, grid=None, block=None):
    """x (N, C, H, W) -> cols (N, C*KH*KW, P) (torch's unfold), or with ``cm`` the channel-major
    (C*KH*KW, N*P). ``out``: a C-contiguous array of that shape to write into."""
    shape = (g.C * g.KH * g.KW, g.N * g.P) if cm else (g.N, g.C * g.KH * g.KW, g.P)
    cols = _empty(shape, x.dtype) if out is None else _checked_out(out, shape, x.dtype)
    if cols.size:
        _launch(
            "im2col",
            "im2col_cm" if cm else "im2col",
            x,
            cols.size,
            (_contiguous("x", x), _writable("out", cols), *_geom_args(g)),
            grid,
            block,
            fp16=True,
        )
    return cols


def col2im(cols, g: ConvGeometry, *, cm=False, grid=None, block=None):
    """The adjoint of :func:`im2col`: cols -> dx (N, C, H, W), one thread per element of dx
    summing the columns that read it (a gather: no atomics)."""
    dx = _empty(g.x_shape, cols.dtype)
    if dx.size:
        _launch(
            "im2col",
            "col2im_cm" if cm else "col2im",
            cols,
            dx.size,
            (_contiguous("cols", cols), dx, *_geom_args(g)),
            grid,
            block,
            "cols",
            fp16=True,
        )
    return dx


# ------------------------------------------------------------------- the epilogues
def bias_act_forward(src, y, b, N, F, P, *, cm, relu, grid=None, block=None):
    """y (N, F, P) = act(src + b), src (F, N*P) with ``cm`` else (N, F, P) (then it may be y)."""
    src = _writable("src", src) if src is y else _contiguous("src", src)
    args = (src, _writable("y", y), src if b is None else _contiguous("b", b), *_i32(N, F, P, cm, b is not None, relu))
    if y.size:
        _launch("epilogue", "bias_act_forward", y, y.size, args, grid, block, "y", fp16=True)
    return y


def _check_act_backward(dy, y, dst, N, F, P, relu) -> None:
    n = N * F * P
    for name, a in (("dy", dy), ("dst", dst)) + ((("y", y),) if relu else ()):
        if a is None or a.size != n or a.dtype != dy.dtype:
            got = "None" if a is None else f"{a.size} {a.dtype} values"
            raise ValueError(f"{name}: expected N*F*P = {N}*{F}*{P} = {n} {dy.dtype} values, got {got}")


def act_backward_bias_grad(
    dy, y, dst, N, F, P, *, cm, relu, bias, db=None, accumulate=False, grid=None, block=None, segments=None
):
    """dst = dy (* (y > 0) with ``relu``) in the (F, N*P) form with ``cm``, else (N, F, P);
    returns db (F,) = the sums of dst over n and p when ``bias`` (into ``db`` if given; with
    ``accumulate`` added to what ``db`` holds), else None; float16 dy: db is float32. Without a bias one elementwise launch;
    with one, a block per (f, segment of its N*P values) and, with more than one segment
    (``segments``, else from the shape: :func:`_segments`), a second launch summing them in order."""
    _suffix("dy", dy, fp16=True)
    if bias:
        db = _empty((F,), _acc(dy.dtype)) if db is None else _checked_out(db, (F,), _acc(dy.dtype))
    elif db is not None:
        raise ValueError("db: a bias gradient needs bias=True")
    _check_act_backward(dy, y, dst, N, F, P, relu)
    dy = _contiguous("dy", dy)
    y, dst = _contiguous("y", y) if relu else dy, _writable("dst", dst)
    if not bias:
        if dy.size:
            part = _empty((1,), _acc(dy.dtype)) if dy.dtype == np.float16 else dy  # (part: not read)
            _launch(
                "epilogue",
                "act_backward_bias_grad",
                dy,
                dy.size,
                (dy, y, dst, part, *_i32(N, F, P, 1, cm, 0, relu, 0)),
                grid,
                block,
                "dy",
                fp16=True,
            )  # a thread per element
        return None
    S = _segments(F, N * P, segments)
    part = db if S == 1 else _empty((F * S,), _acc(dy.dtype))  # (F, S): each filter's segments' sums
    if F:
        _blocks_launch(
            "epilogue",
            "act_backward_bias_grad",
            dy,
            F * S,  # a block per (f, segment)
            (dy, y, dst, part, *_i32(N, F, P, S, cm, 1, relu, accumulate and S == 1)),
            grid,
            block,
            "dy",
            fp16=True,
        )
        if S > 1:
            _sum_segments(part, db, F, S, accumulate, grid, block)
    return db


# ------------------------------------------------------------------- residual sum, ReLU
def add_forward(a, b, activation=None, *, grid=None, block=None):
    """y = a + b, or relu(a + b), in one launch (a residual block's sum and its ReLU)."""
    a, b = _contiguous("a", a), _contiguous("b", b)
    relu = activation == "relu"
    y = _empty(a.shape, a.dtype)
    if y.size:
        _launch("epilogue", "add_act_forward", a, y.size, (a, b, y, np.int64(y.size), *_i32(relu)), grid, block, "a", fp16=True)
    return y, AddCache(tuple(y.shape), y.dtype, y if relu else None)


def relu_backward(dy, y, *, grid=None, block=None):
    """dx = dy * (y > 0) in one launch (the reference's is two: the mask, then the product)."""
    dy = _contiguous("dy", dy)
    dx = _empty(dy.shape, dy.dtype)
    if dx.size:
        _launch(
            "epilogue",
            "relu_backward",
            dy,
            dx.size,
            (dy, _contiguous("y", y), dx, np.int64(dx.size)),
            grid,
            block,
            "dy",
            fp16=True,
        )
    return dx


def add_backward(dy, cache, *, grid=None, block=None):
    return dy if cache.y is None else relu_backward(dy, cache.y, grid=grid, block=block)


# ------------------------------------------------------------------- convolution
class _Aux(NamedTuple):
    cols: Any  # the batch's channel-major columns (K, N*P), kept from forward, or None (chunked)
    chunk: int  # samples per chunk
    workspace: Any


def _w2(w, g):
    return w.reshape(g.F, g.K)  # (F, C*KH*KW): a view


def _rows(g: ConvGeometry) -> int:
    return g.G * g.K  # C*KH*KW: the rows of the channel-major columns (group gi's are rows gi*K ...)


def _forward_gemm(w, cols, out, g: ConvGeometry):
    """y_cm (F, n*P) = W2 @ cols into ``out``, through the launcher's GEMM (cnn_gpu's own cuBLAS
    handle on a GPU: capturable in a CUDA graph); with groups one GEMM per group (group gi's
    filters read its K rows of the columns; every operand a contiguous view)."""
    gemm = get_launcher().gemm
    if g.G == 1:
        gemm(_w2(w, g), cols, out)  # (F, K) @ (K, n*P)
        return out
    Fg = g.F // g.G
    w3, c3, o3 = w.reshape(g.G, Fg, g.K), cols.reshape(g.G, g.K, -1), out.reshape(g.G, Fg, -1)  # views
    for gi in range(g.G):
        gemm(w3[gi], c3[gi], o3[gi])  # (F/G, K) @ (K, n*P)
    return out


def _weight_grad_gemm(delta, cols, dw2, g: ConvGeometry, add: bool) -> None:
    """dW2 (F, K) = delta_cm @ cols^T per group, into ``dw2`` (added to it with ``add``: cuBLAS's
    beta = 1). With groups, one 2-D GEMM per group (a loop over groups, not channels; cuBLAS reads
    the columns transposed as they lie, where a batched matmul would copy their transpose)."""
    gemm, beta = get_launcher().gemm, 1.0 if add else 0.0
    if g.G == 1:
        gemm(delta, cols, dw2, transb=True, beta=beta)  # (F, n*P) @ (n*P, K)
        return
    Fg = g.F // g.G
    d3, c3 = delta.reshape(g.G, Fg, -1), cols.reshape(g.G, g.K, -1)  # (G, F/G, n*P), (G, K, n*P)
    o3 = dw2.reshape(g.G, Fg, g.K)  # (G, F/G, K): a view
    for gi in range(g.G):
        gemm(d3[gi], c3[gi], o3[gi], transb=True, beta=beta)


def _input_grad_gemm(w, delta, out, g: ConvGeometry):
    """dcols (C*KH*KW, n*P) = W2^T @ delta_cm into ``out`` per group (cuBLAS reads W2 transposed
    as it lies: no copy of the weights)."""
    gemm = get_launcher().gemm
    if g.G == 1:
        gemm(_w2(w, g), delta, out, transa=True)  # (F, K)^T @ (F, n*P)
        return out
    Fg = g.F // g.G
    w3, d3, o3 = w.reshape(g.G, Fg, g.K), delta.reshape(g.G, Fg, -1), out.reshape(g.G, g.K, -1)  # views
    for gi in range(g.G):
        gemm(w3[gi], d3[gi], o3[gi], transa=True)  # (F/G, K)^T @ (F/G, n*P)
    return out


def conv2d_forward(x, w, b, g, activation=None, workspace=None):
    """-> (y (N, F, OH, OW), cache): im2col_cm, one GEMM (one batched GEMM with groups), the
    epilogue; per chunk of samples when the columns exceed the workspace limit. Depthwise
    (groups = C): the direct kernels of depthwise.cu."""
    x_in, x = x, _contiguous("x", x)
    if _is_depthwise(g):
        y = depthwise_conv2d_forward(x, w, b, g, activation)
        x = x.copy() if x is x_in else x  # backward reads x: never the caller's memory, which it may reuse
        return y, Conv2dCache(NAME, g, x, w, b is not None, activation, y if activation else None, None)
    xp = get_array_module(x)
    R = _rows(g)
    nb = chunk_size(g.N, R * g.P * x.dtype.itemsize)
    y = xp.empty(g.y_shape, dtype=x.dtype)
    cols = None
    for n0 in range(0, g.N, nb):
        n = min(nb, g.N - n0)
        gc = g._replace(N=n)  # the chunk's geometry
        cols = im2col(x[n0 : n0 + n], gc, cm=True, out=scratch(workspace, "cols", (R, n * g.P), x.dtype, xp))
        y_cm = _forward_gemm(w, cols, scratch(workspace, "y_cm", (g.F, n * g.P), x.dtype, xp), g)  # (F, n*P)
        bias_act_forward(y_cm, y[n0 : n0 + n], b, n, g.F, g.P, cm=True, relu=activation == "relu")
    kept = cols if nb >= g.N else None
    if kept is None and x is x_in:  # backward rebuilds the columns from x: a copy, not the caller's memory
        x = x.copy()  # (only in chunked convolutions: the others keep their columns)
    return y, Conv2dCache(NAME, g, x, w, b is not None, activation, y if activation else None, _Aux(kept, nb, workspace))


def _grad_arrays(accumulate_into, shapes, dtype) -> tuple:
    """The arrays a backward writes its parameter gradients into: ``accumulate_into``'s (which
    must be C-contiguous: the kernels and GEMMs add in place), else fresh ones (None for a shape None)."""
    if accumulate_into is not None:
        return tuple(a if a is None else _writable("accumulate_into", a) for a in accumulate_into)
    return tuple(None if s is None else _empty(s, dtype) for s in shapes)


@native("accumulate_into")
def conv2d_backward(dy, cache, input_grad=True, accumulate_into=None):
    """-> (dx or None, dw, db or None), per chunk as the forward ran; the chunks' dw and db (and
    with ``accumulate_into`` the first chunk's too) are added in place by the GEMM and the kernels."""
    g, aux = cache.g, cache.aux
    if _is_depthwise(g):
        return depthwise_conv2d_backward(dy, cache, input_grad, accumulate_into=accumulate_into)
    xp = get_array_module(dy)
    dy = _contiguous("dy", dy)
    relu = cache.activation == "relu"
    R = _rows(g)
    dw, db = _grad_arrays(accumulate_into, (cache.w.shape, (g.F,) if cache.has_bias else None), _acc(dy.dtype))
    add = accumulate_into is not None
    dxs = []
    for n0 in range(0, g.N, aux.chunk):
        n = min(aux.chunk, g.N - n0)
        gc = g._replace(N=n)  # the chunk's geometry
        delta = scratch(aux.workspace, "delta_cm", (g.F, n * g.P), dy.dtype, xp)
        y = cache.y[n0 : n0 + n] if relu else None
        act_backward_bias_grad(
            dy[n0 : n0 + n], y, delta, n, g.F, g.P, cm=True, relu=relu, bias=cache.has_bias, db=db, accumulate=add
        )
        cols = (
            aux.cols
            if aux.cols is not None
            else im2col(cache.x[n0 : n0 + n], gc, cm=True, out=scratch(aux.workspace, "cols", (R, n * g.P), dy.dtype, xp))
        )
        _weight_grad_gemm(delta, cols, _w2(dw, g), g, add)  # (F, K)
        add = True  # the next chunks add to this one's
        if input_grad:
            dcols = _input_grad_gemm(cache.w, delta, scratch(aux.workspace, "dcols", (R, n * g.P), dy.dtype, xp), g)
            dxs.append(col2im(dcols, gc, cm=True))
    dx = None if not input_grad else dxs[0] if len(dxs) == 1 else xp.concatenate(dxs)
    return dx, dw, db


# ------------------------------------------------------------------- depthwise convolution
def _is_depthwise(g: ConvGeometry) -> bool:
    return g.G > 1 and g.G == g.C


def _dw_args(g: ConvGeometry) -> tuple:
    return _i32(g.N, g.C, g.H, g.W, g.F, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.OH, g.OW)


def _check_dtypes(dtype, why: str, arrays: dict) -> None:
    """TypeError naming the first of ``arrays`` ({name: array or None}) whose dtype is not ``dtype``."""
    for name, a in arrays.items():
        if a is not None and getattr(a, "dtype", None) != dtype:
            raise TypeError(f"{name}: expected {np.dtype(dtype)} ({why}), got {getattr(a, 'dtype', type(a).__name__)}")


def depthwise_conv2d_forward(x, w, b, g, activation=None, *, grid=None, block=None):
    """Depthwise convolution (groups = C, F = C*M) -> y (N, F, OH, OW): one direct kernel with the
    bias and the ReLU fused (no columns, no GEMM, no loop over channels). float16 x, w, b (float16
    training's weight copies): float sums, y rounded once to float16."""
    _suffix("x", x, fp16=True)
    _check_dtypes(x.dtype, "the dtype of x", {"w": w, "b": b})
    x = _contiguous("x", x)
    y = _empty(g.y_shape, x.dtype)
    if y.size:
        _launch(
            "depthwise",
            "depthwise_conv_forward",
            x,
            y.size,
            (
                x,
                _contiguous("w", w),
                x if b is None else _contiguous("b", b),
                y,
                *_dw_args(g),
                *_i32(b is not None, activation == "relu"),
            ),
            grid,
            block,
            fp16=True,
        )
    return y


def depthwise_conv2d_backward(dy, cache, input_grad=True, *, accumulate_into=None, grid=None, block=None, segments=None):
    """-> (dx or None, dw, db or None): delta and db from the epilogue kernel (when there is a ReLU
    or a bias; else delta = dy), dw by a block per (weight, segment of its N*OH*OW terms) and, with
    more than one segment (``segments``, else from the shape), a second launch summing them in
    order; dx by a gather. With ``accumulate_into`` dw and db are added into those arrays. float16
    dy (x, w, y float16 too): dx float16, dw and db float32 (sums in float32; accumulate_into: the
    float32 Parameter.grad arrays)."""
    g, relu = cache.g, cache.activation == "relu"
    _suffix("dy", dy, fp16=True)
    _check_dtypes(dy.dtype, "the dtype of dy", {"x": cache.x, "w": cache.w, "y": cache.y if relu else None})
    acc = _acc(dy.dtype)  # float16 dy: float32 dw, db
    names = ("accumulate_into[dw]", "accumulate_into[db]")
    _check_dtypes(acc, f"the gradients of {dy.dtype} dy", dict(zip(names, accumulate_into or ())))
    dy = _contiguous("dy", dy)
    dw, db = _grad_arrays(accumulate_into, (cache.w.shape, (g.F,) if cache.has_bias else None), acc)
    add = accumulate_into is not None
    delta = dy
    if relu or cache.has_bias:
        delta = _empty(g.y_shape, dy.dtype)
        act_backward_bias_grad(
            dy,
            cache.y,
            delta,
            g.N,
            g.F,
            g.P,
            cm=False,
            relu=relu,
            bias=cache.has_bias,
            db=db,
            accumulate=add,
            grid=grid,
            block=block,
            segments=segments,
        )
    _depthwise_weight_grad(delta, _contiguous("x", cache.x), dw, g, add, grid, block, segments)
    dx = None
    if input_grad:
        dx = _empty(g.x_shape, dy.dtype)
        args = (delta, cache.w, dx, *_dw_args(g))
        _launch("depthwise", "depthwise_conv_input_grad", dy, dx.size, args, grid, block, "dy", fp16=True)
    return dx, dw, db


def _depthwise_weight_grad(delta, x, dw, g: ConvGeometry, add: bool, grid, block, segments) -> None:
    """dw (F, 1, KH, KW) = (+=, with ``add``) the sums over n, oh, ow of delta * x's tap: R = F*KH*KW
    sums of N*OH*OW terms, cut into S segments (a block each), then the segments' sums in order
    (epilogue.cu's sum_segments). The sums (part, dw) are _acc(delta.dtype): float32 for float16."""
    R, acc = dw.size, _acc(delta.dtype)
    if acc != dw.dtype or not dw.flags.c_contiguous or R != g.F * g.KH * g.KW:
        raise ValueError(f"dw: expected a C-contiguous {acc} array of F*KH*KW = {g.F * g.KH * g.KW} values, got {R} {dw.dtype}")
    S = _segments(R, g.N * g.P, segments)
    part = dw if S == 1 else _empty((R * S,), acc)  # (R, S): each weight's segments' sums
    _blocks_launch(
        "depthwise",
        "depthwise_conv_weight_grad",
        delta,
        R * S,  # a block per (weight, segment)
        (delta, x, part, *_dw_args(g), *_i32(S, add and S == 1)),
        grid,
        block,
        "dy",
        fp16=True,
    )
    if S > 1:
        _sum_segments(part, dw, R, S, add, grid, block)  # (sum_segments_f32 for float16 delta)


# ------------------------------------------------------------------- pooling
def _pool_args(g: PoolGeometry) -> tuple:
    return _i32(g.N, g.C, g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.OH, g.OW)


def max_pool2d_forward(x, g, *, grid=None, block=None):
    """-> (y, cache with the int32 argmax h*W + w)."""
    y, argmax = _empty(g.y_shape, x.dtype), _empty(g.y_shape, np.int32)
    if y.size:
        _launch("pool", "max_pool2d_forward", x, y.size, (_contiguous("x", x), y, argmax, *_pool_args(g)), grid, block, fp16=True)
    return y, MaxPool2dCache(NAME, g, x.dtype, argmax, "flat")


def max_pool2d_backward(dy, cache, *, grid=None, block=None):
    """A gather: one thread per input element sums the outputs it won."""
    g = cache.g
    dx = _empty(g.x_shape, dy.dtype)
    if dx.size:
        _launch(
            "pool",
            "max_pool2d_backward",
            dy,
            dx.size,
            (_contiguous("dy", dy), _contiguous("argmax", cache.argmax), dx, *_pool_args(g)),
            grid,
            block,
            "dy",
            fp16=True,
        )
    return dx


def avg_pool2d_forward(x, g, *, grid=None, block=None):
    y = _empty(g.y_shape, x.dtype)
    if y.size:
        _launch("pool", "avg_pool2d_forward", x, y.size, (_contiguous("x", x), y, *_pool_args(g)), grid, block, fp16=True)
    return y, AvgPool2dCache(NAME, g, x.dtype)


def avg_pool2d_backward(dy, cache, *, grid=None, block=None):
    g = cache.g
    dx = _empty(g.x_shape, dy.dtype)
    if dx.size:
        _launch(
            "pool", "avg_pool2d_backward", dy, dx.size, (_contiguous("dy", dy), dx, *_pool_args(g)), grid, block, "dy", fp16=True
        )
    return dx


def adaptive_avg_pool2d_forward(x, output_size, *, grid=None, block=None):
    """torch's adaptive windows, one thread per output element averaging its window: one launch
    whatever the output size (the reference loops over the output cells). float16 x: float sums,
    y rounded once to float16."""
    _suffix("x", x, fp16=True)
    x = _contiguous("x", x)
    N, C, H, W = (int(s) for s in x.shape)
    OH, OW = output_size
    y = _empty((N, C, OH, OW), x.dtype)
    if y.size:
        _launch("pool", "adaptive_avg_pool2d_forward", x, y.size, (x, y, *_i32(N, C, H, W, OH, OW)), grid, block, fp16=True)
    return y, AdaptivePool2dCache(NAME, (N, C, H, W), x.dtype, (OH, OW))


def adaptive_avg_pool2d_backward(dy, cache, *, grid=None, block=None):
    """A gather: one thread per input element sums dy / |window| over the windows containing it
    (float16 dy: in float, dx rounded once to float16)."""
    _suffix("dy", dy, fp16=True)
    _check_dtypes(cache.dtype, "the dtype of the forward's x", {"dy": dy})
    N, C, H, W = cache.x_shape
    OH, OW = cache.output_size
    dx = _empty(cache.x_shape, dy.dtype)
    if dx.size:
        _launch(
            "pool",
            "adaptive_avg_pool2d_backward",
            dy,
            dx.size,
            (_contiguous("dy", dy), dx, *_i32(N, C, H, W, OH, OW)),
            grid,
            block,
            "dy",
            fp16=True,
        )
    return dx


# ------------------------------------------------------------------- batch normalisation
#: BatchNorm's blocks over (channel, segment): see _segments
_BN_BLOCK = 256
_bn_segments = _segments  # (channels, N*H*W, segments): benchmarks/bn_gpu.py reads it too


def _ncp(x) -> tuple:
    """(N, C, P) of x (N, C) or (N, C, H, W): P = H*W, or 1."""
    N, C = int(x.shape[0]), int(x.shape[1])
    return N, C, int(math.prod(x.shape[2:]))


def _bn_launch(kernel, a, C, S, args, grid, block, name="x"):
    _blocks_launch("batchnorm", kernel, a, C * S, args, grid, block, name, _BN_BLOCK, fp16=True)  # a block per (channel, segment)


def _bn_dtypes(dtype, named) -> None:
    """Each (name, array or None, wanted dtype) of ``named`` has the wanted dtype: x's ``dtype``
    (gamma, beta, dy), or the statistics' (_acc(dtype): float32 for float16 x; kernels/batchnorm.cu)."""
    for name, a, want in named:
        if a is not None and a.dtype != want:
            whose = "x's dtype" if want == dtype else f"the statistics' dtype for {np.dtype(dtype)} x"
            raise TypeError(f"{name}: expected a {np.dtype(want)} array ({whose}), got {a.dtype}")


@native("num_batches_tracked")
def batch_norm_forward(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    activation=None,
    *,
    num_batches_tracked=None,
    grid=None,
    block=None,
    segments=None,
):
    """With batch statistics three launches (the segments' sums, their squared deviations, then the
    statistics, the running statistics updated in place and y: relu(y) with ``activation="relu"``),
    with the running statistics one; see kernels/batchnorm.cu. ``num_batches_tracked`` (int64,
    0-d): incremented by the last launch when the running statistics are updated. float16 x (and
    gamma, beta): y float16, the statistics (mean, invstd, ``running_mean`` / ``running_var``) float32."""
    _suffix("x", x, fp16=True)
    x = _contiguous("x", x)  # (the cache keeps it: backward's kernels read it too)
    acc = _acc(x.dtype)
    _bn_dtypes(x.dtype, (("gamma", gamma, x.dtype), ("beta", beta, x.dtype)))
    _bn_dtypes(x.dtype, (("running_mean", running_mean, acc), ("running_var", running_var, acc)))
    N, C, P = _ncp(x)
    t, M = acc.type, N * P
    S = _bn_segments(C, M, segments)
    batch_stats = training or running_mean is None
    update = training and running_mean is not None
    count = update and num_batches_tracked is not None
    y, mean, invstd = _empty(x.shape, x.dtype), _empty((C,), acc), _empty((C,), acc)
    part_sum, part_sq = (_empty((C * S,), acc), _empty((C * S,), acc)) if batch_stats else (mean, invstd)
    args = (
        x,
        y,
        x if gamma is None else _contiguous("gamma", gamma),
        x if beta is None else _contiguous("beta", beta),
        part_sum,
        part_sq,
        mean if running_mean is None else _contiguous("running_mean", running_mean),
        invstd if running_var is None else _contiguous("running_var", running_var),
        mean,
        invstd,
        _writable("num_batches_tracked", num_batches_tracked) if count else _empty((1,), np.int64),
        *_i32(N, C, P, S, gamma is not None, beta is not None, batch_stats, update, count, activation == "relu"),
        t(1.0 - momentum),
        t(momentum),
        t(momentum * M / (M - 1) if M > 1 else 0.0),
        t(eps),
    )
    if x.size:
        if batch_stats:
            _bn_launch("batch_norm_sum", x, C, S, (x, part_sum, *_i32(N, C, P, S)), grid, block)
            _bn_launch("batch_norm_sq", x, C, S, (x, part_sum, part_sq, *_i32(N, C, P, S)), grid, block)
        _bn_launch("batch_norm_forward", x, C, S, args, grid, block)
    return y, BatchNormCache(
        NAME, x, gamma, mean, invstd, batch_stats, beta is not None, None, activation, y if activation else None
    )


@native("accumulate_into")
def batch_norm_backward(dy, cache, *, accumulate_into=None, grid=None, block=None, segments=None):
    """Two launches: the segments' sums of delta and delta*xhat (delta = dy, masked by y > 0 with the
    fused ReLU), then dbeta, dgamma (added into ``accumulate_into`` when given) and dx. float16 dy
    (x's dtype): dx float16, dgamma and dbeta float32 (float32 ``accumulate_into``: Parameter.grad)."""
    x = cache.x
    acc = _acc(x.dtype)
    _bn_dtypes(x.dtype, (("dy", dy, x.dtype),))
    if accumulate_into is not None:
        _bn_dtypes(x.dtype, tuple((f"accumulate_into[{n}]", a, acc) for n, a in zip(("dgamma", "dbeta"), accumulate_into)))
    N, C, P = _ncp(x)
    S = _bn_segments(C, N * P, segments)
    dx = _empty(x.shape, x.dtype)
    dgamma, dbeta = _grad_arrays(
        accumulate_into, ((C,) if cache.gamma is not None else None, (C,) if cache.has_beta else None), acc
    )
    part_dy, part_dyx = _empty((C * S,), acc), _empty((C * S,), acc)
    relu = cache.activation == "relu"
    dy, y = _contiguous("dy", dy), cache.y if relu else x
    sums = (dy, x, y, cache.mean, cache.invstd, part_dy, part_dyx, *_i32(N, C, P, S, relu))
    args = (
        dy,
        x,
        y,
        x if cache.gamma is None else cache.gamma,
        cache.mean,
        cache.invstd,
        part_dy,
        part_dyx,
        dx,
        part_dy if dgamma is None else dgamma,
        part_dy if dbeta is None else dbeta,
        *_i32(N, C, P, S, cache.gamma is not None, cache.has_beta, cache.batch_stats, relu, accumulate_into is not None),
    )
    if x.size:
        _bn_launch("batch_norm_backward_sums", dy, C, S, sums, grid, block, "dy")
        _bn_launch("batch_norm_backward", dy, C, S, args, grid, block, "dy")
    return dx, dgamma, dbeta


# ------------------------------------------------------------------- fully connected
def linear_forward(x, w, b, activation=None):
    """y = x @ w^T (one GEMM through the launcher; cuBLAS reads w transposed as it lies), then the
    bias and the ReLU in one epilogue."""
    x = _contiguous("x", x)
    y = _empty((x.shape[0], w.shape[0]), x.dtype)  # (N, out)
    get_launcher().gemm(x, _contiguous("w", w), y, transb=True)  # (N, in) @ (out, in)^T
    if b is not None or activation:
        bias_act_forward(y, y, b, y.shape[0], y.shape[1], 1, cm=False, relu=activation == "relu")
    return y, LinearCache(NAME, x, w, b is not None, activation, y if activation else None)


@native("accumulate_into")
def linear_backward(dy, cache, input_grad=True, accumulate_into=None):
    """delta = dy (* y > 0) and db in one kernel (with a ReLU or a bias; delta is then a copy of
    dy's N x out values without the ReLU; a batch of more than 4096 sums db in segments, then a
    second launch), then two cuBLAS GEMMs; with ``accumulate_into`` the kernels add db into it and
    dw's GEMM adds dw (beta = 1)."""
    xp = get_array_module(dy)
    add = accumulate_into is not None
    dw, db = _grad_arrays(accumulate_into, (cache.w.shape, None), _acc(dy.dtype))  # float16 dy: float32 dw, db
    relu = cache.activation == "relu"
    delta = dy = _contiguous("dy", dy)
    if relu or cache.has_bias:
        delta = xp.empty_like(dy)
        db = act_backward_bias_grad(
            dy, cache.y, delta, dy.shape[0], dy.shape[1], 1, cm=False, relu=relu, bias=cache.has_bias, db=db, accumulate=add
        )
    get_launcher().gemm(delta, _contiguous("x", cache.x), dw, transa=True, beta=1.0 if add else 0.0)  # (N, out)^T @ (N, in)
    dx = None
    if input_grad:
        dx = _empty((dy.shape[0], cache.w.shape[1]), dy.dtype)  # (N, in)
        get_launcher().gemm(delta, _contiguous("w", cache.w), dx)  # (N, out) @ (out, in)
    return dx, dw, db


@native("device_scalars")
def adam_update_master_(
    p,
    g,
    m,
    v,
    p16,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    scale,
    found,
    taken,
    *,
    device_scalars=None,
    grid=None,
    block=None,
) -> None:
    """Adam / AdamW on float32 master weights ``p`` from the scaled float32 gradient ``g`` (divided
    by scale[0]), writing their float16 copy ``p16``; nothing when found[0]; the bias corrections of
    step t = taken[0] + 1 formed on the device in double precision (kernels/optim.cu).
    ``device_scalars``: float64 (3,) whose first value is lr (the rest unread)."""
    for name, a, dt in (
        ("p", p, np.float32),
        ("g", g, np.float32),
        ("m", m, np.float32),
        ("v", v, np.float32),
        ("p16", p16, np.float16),
    ):
        if a.dtype != dt or a.size != p.size:
            raise ValueError(f"{name}: expected {p.size} {np.dtype(dt)} values (the master weights'), got {a.size} {a.dtype}")
    scalars = kernel_args("adam_update_", p, device_scalars)
    if p.size:
        _launch(
            "optim",
            "adam_update_master",
            p16,
            p.size,
            (
                p,
                g,
                _writable("m", m),
                _writable("v", v),
                _writable("p16", p16),
                np.int64(p.size),
                np.float64(lr),
                np.float64(beta1),
                np.float64(beta2),
                np.float32(eps),
                np.float64(weight_decay),
                np.int32(bool(decoupled)),
                _one("scale", scale, np.float32),
                _one("found", found, np.int32),
                _one("taken", taken, np.int32),
                *scalars,
            ),
            grid,
            block,
            "p16",
            fp16=True,
        )


# ------------------------------------------------------------------------------ dropout
@native("device_scalars")
def dropout_forward(x, p, training, rng=None, key=None, *, device_scalars=None, grid=None, block=None):
    """With a counter-based ``key``: one launch draws the mask and applies it (the reference's
    bits); with a Generator ``rng``: the reference. ``device_scalars``: an int64 device array (1,)
    holding the key's bits, read by the kernel instead of ``key`` (cuda/scalars.py)."""
    if (key is None and device_scalars is None) or not training or p == 0.0:
        return reference.dropout_forward(x, p, training, rng, key)
    x = _contiguous("x", x)
    T = _acc(x.dtype).type  # float16 x: p and the scale in float32
    scalars = kernel_args("dropout_forward", x, device_scalars)
    y, mask = _empty(x.shape, x.dtype), _empty(x.shape, x.dtype)
    if x.size:
        _launch(
            "dropout",
            "dropout_forward",
            x,
            x.size,
            (x, y, mask, np.int64(x.size), _as_int64(int(key or 0)), T(p), T(1.0 / (1.0 - p)), *scalars),
            grid,
            block,
            fp16=True,
        )
    return y, DropoutCache(mask)


# ------------------------------------------------------------------------------ loss
@native("label_check", "grad_scale")
def softmax_cross_entropy(
    logits, labels, label_smoothing=0.0, *, label_check=None, grid=None, block=None, return_per_sample=False, grad_scale=None
):
    """Mean softmax cross-entropy -> (loss 0-d array, dlogits (N, K) = (softmax - t) / N) for
    integer labels, t the one-hot smoothed by ``label_smoothing`` eps ((1 - eps) * onehot + eps/K),
    in two launches (per-sample loss + dlogits, then the batch mean on the device). A label
    outside [0, K) gives a NaN loss, and sets ``label_check`` (an int64 array, sticky) when given:
    the range check on the device, in the same launch. One-hot labels: the reference. float16
    logits: computed in float32, the loss (and per-sample losses) float32, dlogits float16.
    ``grad_scale``: a float32 device array (1,), the loss scale dlogits are multiplied by (float16
    training, cnn_gpu/precision.py LossScaler), read by the kernel (a CUDA graph replays it)."""
    if labels.dtype.kind not in "iu":
        return reference.softmax_cross_entropy(logits, labels, label_smoothing)
    _suffix("logits", logits, fp16=True)  # (a dtype without a kernel: TypeError)
    acc = _acc(logits.dtype)
    T = acc.type
    N, K = (int(s) for s in logits.shape)
    labels = labels.astype(np.int64, copy=False)  # int64 labels (NumPy's default) are passed as they are
    # (without label_check the kernel's flag pointer is labels itself, never written: check = 0)
    per_sample, dlogits, loss = _empty((N,), acc), _empty((N, K), logits.dtype), _empty((), acc)
    if grad_scale is not None and (tuple(grad_scale.shape) != (1,) or grad_scale.dtype != acc):
        raise ValueError(
            f"grad_scale: expected a {acc} array of shape (1,), got {grad_scale.dtype} of shape {tuple(grad_scale.shape)}"
        )
    if block is None:
        block = min(DEFAULT_BLOCK, max(32, 1 << (K - 1).bit_length()))  # one block per row
    inv_n = T(1.0 / N)
    on, off = (T(1), T(0)) if label_smoothing == 0 else (T(1.0 - label_smoothing), T(label_smoothing / K))
    _launch(
        "loss",
        "softmax_cross_entropy",
        logits,
        N * block,
        (
            _contiguous("logits", logits),
            _contiguous("labels", labels),
            per_sample,
            dlogits,
            labels if label_check is None else _writable("label_check", label_check),
            *_i32(N, K),
            inv_n,
            on,
            off,
            *_i32(label_check is not None),
            per_sample if grad_scale is None else grad_scale,
            *_i32(grad_scale is not None),
        ),
        grid,
        block,
        "logits",
        fp16=True,
    )
    _launch("loss", "scaled_sum", per_sample, block, (per_sample, loss, np.int64(N), inv_n), 1, block, "logits")
    return (loss, dlogits, per_sample) if return_per_sample else (loss, dlogits)


def epoch_sums(loss, logits, labels, loss_sum, correct, step_losses, counter, *, block=None) -> None:
    """Add one step to its epoch's sums on the device, in one launch (kernels/metrics.cu):
    ``loss_sum += loss * N``, ``correct += hits``, ``step_losses[counter] = loss``, ``counter += 1``.
    The sums are float64 / int64 0-d arrays (``step_losses`` float64 (S,), ``counter`` int64 0-d),
    written in place at fixed addresses: a CUDA graph replays this launch step after step."""
    N, K = (int(s) for s in logits.shape)
    if tuple(loss.shape) != () or loss.dtype != logits.dtype or tuple(labels.shape) != (N,):
        raise ValueError(
            f"loss, labels: expected a 0-d {logits.dtype} loss and ({N},) labels for logits of shape "
            f"({N}, {K}), got {loss.dtype} {tuple(loss.shape)} and {tuple(labels.shape)}"
        )
    for name, a, dtype in (
        ("loss_sum", loss_sum, np.float64),
        ("correct", correct, np.int64),
        ("counter", counter, np.int64),
        ("step_losses", step_losses, np.float64),
    ):
        if a.dtype != dtype or (name != "step_losses" and a.shape != ()):
            raise ValueError(
                f"{name}: expected a {np.dtype(dtype)} {'(S,)' if name == 'step_losses' else '0-d'} "
                f"array, got {a.dtype} of shape {tuple(a.shape)}"
            )
    if N == 0 or K == 0:
        raise ValueError(f"logits: expected at least one row and one class, got shape ({N}, {K})")
    labels = labels.astype(np.int64, copy=False)
    block = DEFAULT_BLOCK if block is None else block
    S = int(step_losses.shape[0])
    _launch(
        "metrics",
        "epoch_sums",
        logits,
        block,
        (
            loss,
            _contiguous("logits", logits),
            _contiguous("labels", labels),
            _writable("loss_sum", loss_sum),
            _writable("correct", correct),
            _writable("step_losses", step_losses),
            _writable("counter", counter),
            *_i32(N, K, S),
        ),
        1,
        block,
        "logits",
    )


# ------------------------------------------------------------------------- augmentation
def _as_int64(key: int) -> np.int64:
    """A 64-bit key's bits as the kernel's long long."""
    return np.int64(key - (1 << 64) if key >= 1 << 63 else key)


@native("device_scalars")
def crop_flip(x, a, *, device_scalars=None, grid=None, block=None):
    """Random crop + horizontal flip of a batch (a: functional.geometry.CropFlip) -> y (N, C, OH, OW):
    one gather kernel, the draws recomputed on the device from the keys (no upload).
    ``device_scalars``: an int64 device array (2,) = (crop_key, flip_key) bits, read instead of a's."""
    scalars = kernel_args("crop_flip", x, device_scalars)
    y = _empty(a.y_shape, x.dtype)
    if y.size:
        _launch(
            "augment",
            "crop_flip",
            x,
            y.size,
            (
                _contiguous("x", x),
                y,
                *_i32(a.N, a.C, a.H, a.W, a.OH, a.OW, a.PH, a.PW, a.reflect),
                _as_int64(a.crop_key),
                _as_int64(a.flip_key),
                np.int64(a.flip_threshold),
                *scalars,
            ),
            grid,
            block,
        )
    return y


# ------------------------------------------------------------------------- optimizers
@native("device_scalars")
def sgd_update_(p, g, buf, lr, momentum, weight_decay, nesterov, first_step, *, device_scalars=None, grid=None, block=None):
    """One SGD step in place over flat buffers, one launch (the reference's formulas).
    ``device_scalars``: a float64 device array (1,) = (lr,), read by the kernel instead of ``lr``."""
    T = p.dtype.type
    scalars = kernel_args("sgd_update_", p, device_scalars)
    if p.size:
        _launch(
            "optim",
            "sgd_update",
            p,
            p.size,
            (
                p,
                g,
                p if buf is None else buf,
                np.int64(p.size),
                T(lr),
                T(momentum),
                T(weight_decay),
                np.int32(bool(nesterov)),
                np.int32(bool(first_step)),
                *scalars,
            ),
            grid,
            block,
            "p",
        )


@native("device_scalars")
def adam_update_(
    p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bc1, bc2, *, device_scalars=None, grid=None, block=None
):
    """One Adam / AdamW step in place over flat buffers, one launch. The scalars the kernel needs
    (lr/bc1, 1 - lr*wd, 1 - beta) are formed here in double precision, as the reference does.
    ``device_scalars``: a float64 device array (3,) = adam_scalars(lr, weight_decay, bc1, bc2) =
    (step_size, bc2, decay), read by the kernel instead of the step's arguments."""
    T = p.dtype.type
    step_size, bc2, decay = adam_scalars(lr, weight_decay, bc1, bc2)
    scalars = kernel_args("adam_update_", p, device_scalars)
    if p.size:
        _launch(
            "optim",
            "adam_update",
            p,
            p.size,
            (
                p,
                g,
                m,
                v,
                np.int64(p.size),
                T(beta1),
                T(1.0 - beta1),
                T(beta2),
                T(1.0 - beta2),
                T(eps),
                T(weight_decay),
                np.int32(bool(decoupled)),
                T(decay),
                T(step_size),
                T(bc2),
                *scalars,
            ),
            grid,
            block,
            "p",
        )


# ------------------------------------------------------------------- loss scaling (float16)
def _one(name: str, a, dtype) -> Any:
    if tuple(a.shape) != (1,) or a.dtype != dtype:
        raise ValueError(f"{name}: expected a {np.dtype(dtype)} array of shape (1,), got {a.dtype} of shape {tuple(a.shape)}")
    return _writable(name, a)


def found_inf_(g, found, *, grid=None, block=None) -> None:
    """found[0] = 1 where a value of the flat gradient buffer ``g`` is inf or NaN (left as it is
    otherwise): one launch, kernels/scaler.cu. ``found``: int32 (1,), 0 before the step."""
    _one("found", found, np.int32)
    if g.size:
        _launch("scaler", "found_inf", g, g.size, (_contiguous("g", g), np.int64(g.size), found), grid, block, "g")


def loss_scale_update_(scale, tracker, found, taken, growth_factor, backoff_factor, growth_interval) -> None:
    """torch.amp.GradScaler's update of ``scale`` (float32 (1,)) and of the count of clean steps
    ``tracker`` (int32 (1,)) from ``found`` (int32 (1,)), which it resets to 0; ``taken`` (int32
    (1,)), the steps not skipped, + 1 when found is 0: one thread."""
    T = scale.dtype.type
    _one("scale", scale, np.float32)
    for name, a in (("tracker", tracker), ("found", found), ("taken", taken)):
        _one(name, a, np.int32)
    _launch(
        "scaler",
        "loss_scale_update",
        scale,
        1,
        (scale, tracker, found, taken, T(growth_factor), T(backoff_factor), *_i32(growth_interval)),
        1,
        32,
        "scale",
    )


@native("device_scalars")
def sgd_update_master_(
    p, g, buf, p16, lr, momentum, weight_decay, nesterov, scale, found, *, device_scalars=None, grid=None, block=None
) -> None:
    """SGD on float32 master weights ``p`` from the scaled float32 gradient ``g`` (divided by
    scale[0]), writing their float16 copy ``p16``; nothing at all when found[0] (one launch,
    kernels/optim.cu). ``buf``: the momentum buffer (zeros at first), None without momentum.
    ``device_scalars``: float64 (1,) = (lr,), as sgd_update_'s."""
    for name, a, dt in (("p", p, np.float32), ("g", g, np.float32), ("p16", p16, np.float16)) + (
        (("buf", buf, np.float32),) if buf is not None else ()
    ):
        if a.dtype != dt or a.size != p.size:
            raise ValueError(f"{name}: expected {p.size} {np.dtype(dt)} values (the master weights'), got {a.size} {a.dtype}")
    T = p.dtype.type
    scalars = kernel_args("sgd_update_", p, device_scalars)
    if p.size:
        _launch(
            "optim",
            "sgd_update_master",
            p16,
            p.size,
            (
                p,
                g,
                p if buf is None else buf,
                _writable("p16", p16),
                np.int64(p.size),
                T(lr),
                T(momentum),
                T(weight_decay),
                np.int32(bool(nesterov)),
                _one("scale", scale, np.float32),
                _one("found", found, np.int32),
                *scalars,
            ),
            grid,
            block,
            "p16",
            fp16=True,
        )


__all__ = [
    "NAME",
    "FUSED_ACTIVATIONS",
    "im2col",
    "col2im",
    "bias_act_forward",
    "act_backward_bias_grad",
    "add_forward",
    "add_backward",
    "relu_backward",
    "conv2d_forward",
    "conv2d_backward",
    "depthwise_conv2d_forward",
    "depthwise_conv2d_backward",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "adaptive_avg_pool2d_forward",
    "adaptive_avg_pool2d_backward",
    "linear_forward",
    "linear_backward",
    "found_inf_",
    "loss_scale_update_",
    "sgd_update_master_",
    "adam_update_master_",
    "dropout_forward",
    "softmax_cross_entropy",
    "epoch_sums",
    "crop_flip",
    "sgd_update_",
    "adam_update_",
]


# ------------------------------------------------------------- activations but ReLU (activation.cu)
# One launch per op (the reference on CuPy is several elementwise launches, and in float16 rounds
# every intermediate); float16 storage computes in float and rounds once (kernels/activation.cu).
# The caches are the reference's: (x, slope), y, y and GeluCache(x, approximate), so either engine's
# backward takes either's cache. Inputs are made contiguous (_contiguous: the engine's own arrays
# are; a user's strided view is copied); a backward's cached array must match dy's shape and dtype.
def _paired(name: str, a, dy):
    """The forward's ``a`` (x or y) for dy's backward: dy's shape and dtype, C-contiguous."""
    if tuple(a.shape) != tuple(dy.shape):
        raise ValueError(f"{name}: expected dy's shape {tuple(dy.shape)}, got {tuple(a.shape)}")
    if a.dtype != dy.dtype:
        raise TypeError(f"{name}: expected dy's dtype {dy.dtype}, got {a.dtype}")
    return _contiguous(name, a)


def leaky_relu_forward(x, negative_slope, *, grid=None, block=None):
    """y = x > 0 ? x : x * negative_slope (the slope in x's arithmetic type, as the reference's)."""
    x = _contiguous("x", x)
    y = _empty(x.shape, x.dtype)
    if y.size:
        args = (x, y, np.int64(y.size), _acc(x.dtype).type(negative_slope))
        _launch("activation", "leaky_relu_forward", x, y.size, args, grid, block, fp16=True)
    return y, (x, float(negative_slope))


def leaky_relu_backward(dy, cache, *, grid=None, block=None):
    """dx = x > 0 ? dy : dy * slope (``cache``: (x, slope), leaky_relu_forward's)."""
    x, slope = cache
    dy = _contiguous("dy", dy)
    x = _paired("x", x, dy)
    dx = _empty(dy.shape, dy.dtype)
    if dx.size:
        args = (dy, x, dx, np.int64(dx.size), _acc(dy.dtype).type(slope))
        _launch("activation", "leaky_relu_backward", dy, dx.size, args, grid, block, "dy", fp16=True)
    return dx


def _from_x(kernel: str, x, grid, block):
    """y = f(x), one launch of activation.cu's ``kernel`` (x, y, n); the cache is y."""
    x = _contiguous("x", x)
    y = _empty(x.shape, x.dtype)
    if y.size:
        _launch("activation", kernel, x, y.size, (x, y, np.int64(y.size)), grid, block, fp16=True)
    return y, y


def _from_y(kernel: str, dy, y, grid, block):
    """dx = dy * f'(x) written from y = f(x), one launch of activation.cu's ``kernel`` (dy, y, dx, n)."""
    dy = _contiguous("dy", dy)
    y = _paired("y", y, dy)
    dx = _empty(dy.shape, dy.dtype)
    if dx.size:
        _launch("activation", kernel, dy, dx.size, (dy, y, dx, np.int64(dx.size)), grid, block, "dy", fp16=True)
    return dx


def sigmoid_forward(x, *, grid=None, block=None):
    """y = 1 / (1 + exp(-x)) from exp(-|x|) (never overflows); the cache is y."""
    return _from_x("sigmoid_forward", x, grid, block)


def sigmoid_backward(dy, y, *, grid=None, block=None):
    """dx = dy * y * (1 - y) (``y``: sigmoid_forward's cache)."""
    return _from_y("sigmoid_backward", dy, y, grid, block)


def tanh_forward(x, *, grid=None, block=None):
    """y = tanh(x); the cache is y."""
    return _from_x("tanh_forward", x, grid, block)


def tanh_backward(dy, y, *, grid=None, block=None):
    """dx = dy * (1 - y * y) (``y``: tanh_forward's cache)."""
    return _from_y("tanh_backward", dy, y, grid, block)


def _approx_tanh(approximate: str) -> np.int32:
    """activation.cu's ``approx_tanh`` flag: 1 for the tanh form, 0 for the erf form ("none")."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    return np.int32(approximate == "tanh")


def gelu_forward(x, approximate, *, grid=None, block=None):
    """y = 0.5 x (1 + erf(x / sqrt 2)), or with ``approximate="tanh"`` 0.5 x (1 + tanh(sqrt(2/pi)
    (x + 0.044715 x^3))); the cache is GeluCache(x, approximate)."""
    x = _contiguous("x", x)
    y = _empty(x.shape, x.dtype)
    flag = _approx_tanh(approximate)
    if y.size:
        _launch("activation", "gelu_forward", x, y.size, (x, y, np.int64(y.size), flag), grid, block, fp16=True)
    return y, GeluCache(x, approximate)


def gelu_backward(dy, cache: GeluCache, *, grid=None, block=None):
    """dx = dy * GELU'(x), the form (erf or tanh) of the forward (``cache``: its GeluCache)."""
    dy = _contiguous("dy", dy)
    x = _paired("x", cache.x, dy)
    dx = _empty(dy.shape, dy.dtype)
    flag = _approx_tanh(cache.approximate)
    if dx.size:
        args = (dy, x, dx, np.int64(dx.size), flag)
        _launch("activation", "gelu_backward", dy, dx.size, args, grid, block, "dy", fp16=True)
    return dx


__all__ += [
    "leaky_relu_forward",
    "leaky_relu_backward",
    "sigmoid_forward",
    "sigmoid_backward",
    "tanh_forward",
    "tanh_backward",
    "gelu_forward",
    "gelu_backward",
]
