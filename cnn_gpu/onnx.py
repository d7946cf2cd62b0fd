"""Export a model to ONNX, for deployment with ONNX Runtime or anything else that reads ONNX.

``cnn_gpu.onnx.export(model, "model.onnx", input_shape=(1, 1, 28, 28))`` writes a graph with:

- eval-mode semantics whatever the model's mode (Dropout is the identity, BatchNorm uses its
  running statistics);
- a dynamic batch dimension (the graph's input is ``input`` of shape ``[batch, C, H, W]``, its
  output ``output`` of shape ``[batch, ...]``); the other dimensions are those of ``input_shape``;
- the parameters as initializers under their cnn_gpu names (``features.0.weight``), in the
  model's dtype;
- ``onnx.checker`` (with shape inference) passed before the file is written (atomically).

The graph is built with the ``onnx`` package (the ``onnx`` extra: ``pip install -e ".[onnx]"``), imported only
when a graph is built, so this module imports without it.

Each layer type has one converter, registered by the layer's class name
(:func:`register_converter`); a layer without one raises :class:`ExportError` naming the
layer's path in the model and its type. A converter is ``fn(layer, ctx, x, shape) -> (y,
shape)``: it adds nodes to ``ctx`` (an :class:`_Graph`) that turn the tensor named ``x`` of
shape ``shape`` (the batch dimension included, as given in ``input_shape``) into a tensor it
returns with its shape. Converters read layers by their attribute names (``weight``,
``running_mean``, ``kernel_size``, ...), so layers that keep the torch-like names export
without further work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .backend import to_numpy
from .functional.geometry import out_size
from .io import atomic_write
from .nn import Module, Parameter
from .serialization import model_dtype

DEFAULT_OPSET = 17
MIN_OPSET = 13  # every op used here has its current form by 13 (Gemm's optional C since 11)
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "output", "batch"


class ExportError(TypeError):
    """A model, or one of its layers, cannot be written as ONNX."""


def _require_onnx():
    try:
        import onnx  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise ImportError(
            "ONNX export needs the onnx package, which is not installed: "
            "pip install -e '.[onnx]' in a checkout of cnn_gpu (or pip install onnx onnxruntime)"
        ) from None
    return onnx


class _Graph:
    """The nodes and initializers of the graph being built, with unique names."""

    def __init__(self, onnx, dtype: np.dtype, opset: int):
        self.onnx, self.dtype, self.opset = onnx, np.dtype(dtype), opset
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = {INPUT_NAME}
        self.path = ""  # the path of the layer being converted (names its nodes)

    def fresh(self, base: str) -> str:
        base = base or "t"
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        """An initializer holding ``value`` (a host copy, in ``dtype`` or the graph's dtype)."""
        arr = np.ascontiguousarray(to_numpy(value), dtype=self.dtype if dtype is None else dtype)
        name = self.fresh(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def scalar(self, tag: str, value: float) -> str:
        return self.const(f"{self.path}.{tag}" if self.path else tag, np.asarray(value))

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(f"{self.path}/{op}" if self.path else op)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


Converter = Callable[[Any, _Graph, str, tuple], tuple[str, tuple]]
CONVERTERS: dict[str, Converter] = {}


def register_converter(*type_names: str):
    """Decorator: ``@register_converter("MyLayer")`` makes ``fn(layer, ctx, x, shape)`` export
    layers whose class is named ``MyLayer``."""

    def add(fn: Converter) -> Converter:
        for name in type_names:
            CONVERTERS[name] = fn
        return fn

    return add


def _array(v: Any) -> np.ndarray:
    """The host array of a Parameter or a buffer (an array, or an object holding one in ``.data``)."""
    if isinstance(v, Parameter) or not (hasattr(v, "__array_interface__") or hasattr(v, "__dlpack__")):
        v = getattr(v, "data", v)
    return to_numpy(v)


def _param(layer, name: str):
    """The array of parameter/buffer ``name`` of ``layer``, or None when the layer has none."""
    v = getattr(layer, name, None)
    return None if v is None else _array(v)


def _const_of(ctx: _Graph, layer, name: str) -> str:
    """The layer's parameter or buffer ``name`` as an initializer (in the graph's dtype, never cast)."""
    arr = _param(layer, name)
    if arr is None or arr.dtype != ctx.dtype:
        got = "none" if arr is None else str(arr.dtype)
        raise ExportError(
            f"layer {ctx.path!r} ({type(layer).__name__}): expected {name} as a {ctx.dtype} array (the model's dtype), got {got}"
        )
    return ctx.const(f"{ctx.path}.{name}" if ctx.path else name, arr)


def _convert(layer, ctx: _Graph, x: str, shape: tuple, path: str) -> tuple[str, tuple]:
    kind = type(layer).__name__
    fn = CONVERTERS.get(kind)
    if fn is None:
        where = f"layer {path!r}" if path else "the model"
        raise ExportError(
            f"{where} ({kind}) cannot be exported to ONNX: no converter is registered for the type "
            f"{kind!r}; known: {sorted(CONVERTERS)}. Register one with "
            "@cnn_gpu.onnx.register_converter"
        )
    outer, ctx.path = ctx.path, path
    try:
        return fn(layer, ctx, x, shape)
    finally:
        ctx.path = outer


def convert_child(parent_path: str, name: str, layer, ctx: _Graph, x: str, shape: tuple) -> tuple[str, tuple]:
    """Convert a child module (for converters of containers): its path is ``parent.name``."""
    return _convert(layer, ctx, x, shape, f"{parent_path}.{name}" if parent_path else name)


# --- the layers -----------------------------------------------------------------------------------


@register_converter("Sequential")
def _sequential(layer, ctx, x, shape):
    path = ctx.path
    for name, child in layer.named_children():
        x, shape = convert_child(path, name, child, ctx, x, shape)
    return x, shape


def _expect_rank(layer, shape: tuple, rank: int, ctx: _Graph) -> None:
    if len(shape) != rank:
        raise ExportError(
            f"layer {ctx.path!r} ({type(layer).__name__}): expected a {rank}-D input, got shape "
            f"{tuple(shape)} (does input_shape start with the batch size, like (1, C, H, W)?)"
        )


def _window_out(layer, ctx: _Graph, shape: tuple, k: tuple, s: tuple, p: tuple, d: tuple = (1, 1)) -> tuple:
    """(OH, OW) of a window op on an input of ``shape``, or an ExportError when the window does not fit."""
    OH, OW = out_size(shape[2], k[0], s[0], p[0], d[0]), out_size(shape[3], k[1], s[1], p[1], d[1])
    if OH < 1 or OW < 1:
        raise ExportError(
            f"layer {ctx.path!r} ({type(layer).__name__}): its {k[0]}x{k[1]} window does not fit the "
            f"input of shape {tuple(shape)} (padding {tuple(p)}); check input_shape"
        )
    return OH, OW


@register_converter("Conv2d")
def _conv2d(layer, ctx, x, shape):
    _expect_rank(layer, shape, 4, ctx)
    N = shape[0]
    (KH, KW), (SH, SW), (PH, PW) = layer.kernel_size, layer.stride, layer.padding
    DH, DW = getattr(layer, "dilation", (1, 1))
    inputs = [x, _const_of(ctx, layer, "weight")]
    if getattr(layer, "bias", None) is not None:
        inputs.append(_const_of(ctx, layer, "bias"))
    y = ctx.node(
        "Conv",
        inputs,
        kernel_shape=[KH, KW],
        strides=[SH, SW],
        pads=[PH, PW, PH, PW],
        dilations=[DH, DW],
        group=int(getattr(layer, "groups", 1)),
    )
    return y, (N, layer.out_channels) + _window_out(layer, ctx, shape, (KH, KW), (SH, SW), (PH, PW), (DH, DW))


@register_converter("Linear")
def _linear(layer, ctx, x, shape):
    _expect_rank(layer, shape, 2, ctx)
    if shape[1] != layer.in_features:
        raise ExportError(
            f"layer {ctx.path!r} (Linear): expected {layer.in_features} input features, got shape "
            f"{tuple(shape)}; check input_shape"
        )
    inputs = [x, _const_of(ctx, layer, "weight")]  # weight (out, in): y = x @ weight^T + bias
    if getattr(layer, "bias", None) is not None:
        inputs.append(_const_of(ctx, layer, "bias"))
    return ctx.node("Gemm", inputs, transB=1), (shape[0], layer.out_features)


def _pool(op: str, **extra):
    def convert(layer, ctx, x, shape):
        _expect_rank(layer, shape, 4, ctx)
        N, C = shape[:2]
        (KH, KW), (SH, SW), (PH, PW) = layer.kernel_size, layer.stride, layer.padding
        y = ctx.node(op, [x], kernel_shape=[KH, KW], strides=[SH, SW], pads=[PH, PW, PH, PW], **extra)
        return y, (N, C) + _window_out(layer, ctx, shape, (KH, KW), (SH, SW), (PH, PW))

    return convert


register_converter("MaxPool2d")(_pool("MaxPool"))
register_converter("AvgPool2d")(_pool("AveragePool", count_include_pad=1))  # padding counts as zeros


def _unary(op: str):
    def convert(layer, ctx, x, shape):
        return ctx.node(op, [x]), shape

    return convert


register_converter("ReLU")(_unary("Relu"))
register_converter("Sigmoid")(_unary("Sigmoid"))
register_converter("Tanh")(_unary("Tanh"))
register_converter("Dropout")(_unary("Identity"))  # eval mode: the identity


@register_converter("LeakyReLU")
def _leaky_relu(layer, ctx, x, shape):
    return ctx.node("LeakyRelu", [x], alpha=float(layer.negative_slope)), shape


@register_converter("Flatten")
def _flatten(layer, ctx, x, shape):
    return ctx.node("Flatten", [x], axis=1), (shape[0], int(np.prod(shape[1:], dtype=np.int64)))


@register_converter("GELU")
def _gelu(layer, ctx, x, shape):
    """0.5 x (1 + erf(x / sqrt 2)), or with approximate="tanh" 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    (elementary ops, so any opset >= 13 and any runtime runs it)."""
    approximate = getattr(layer, "approximate", "none")
    if approximate == "none":
        inner = ctx.node("Erf", [ctx.node("Mul", [x, ctx.scalar("inv_sqrt2", 1 / math.sqrt(2.0))])])
    elif approximate == "tanh":
        cube = ctx.node("Mul", [ctx.node("Mul", [x, x]), x])
        poly = ctx.node("Add", [x, ctx.node("Mul", [cube, ctx.scalar("c", 0.044715)])])
        inner = ctx.node("Tanh", [ctx.node("Mul", [poly, ctx.scalar("sqrt_2_over_pi", math.sqrt(2.0 / math.pi))])])
    else:
        raise ExportError(f"layer {ctx.path!r} (GELU): expected approximate 'none' or 'tanh', got {approximate!r}")
    half_x = ctx.node("Mul", [x, ctx.scalar("half", 0.5)])
    return ctx.node("Mul", [half_x, ctx.node("Add", [inner, ctx.scalar("one", 1.0)])]), shape


@register_converter("BatchNorm2d", "BatchNorm1d")
def _batch_norm(layer, ctx, x, shape):
    """Eval mode: (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel (axis 1)."""
    C = int(layer.num_features)
    if len(shape) < 2 or shape[1] != C:
        raise ExportError(
            f"layer {ctx.path!r} ({type(layer).__name__}): expected an input with {C} channels "
            f"on axis 1, got shape {tuple(shape)}"
        )
    scale = _param(layer, "weight")
    bias = _param(layer, "bias")
    inputs = [
        x,
        ctx.const(f"{ctx.path}.weight", scale if scale is not None else np.ones(C)),
        ctx.const(f"{ctx.path}.bias", bias if bias is not None else np.zeros(C)),
        _const_of(ctx, layer, "running_mean"),
        _const_of(ctx, layer, "running_var"),
    ]
    return ctx.node("BatchNormalization", inputs, epsilon=float(layer.eps)), shape


def _adaptive_window(layer, ctx, size: int, out: int, axis: str) -> int:
    if out < 1 or size % out:
        raise ExportError(
            f"layer {ctx.path!r} ({type(layer).__name__}): output_size {out} along {axis} is not "
            f"expressible as one ONNX pooling window for an input of size {size} (ONNX needs the "
            "input size to be a multiple of the output size); export with another input_shape"
        )
    return size // out


@register_converter("AdaptiveAvgPool2d")
def _adaptive_avg_pool(layer, ctx, x, shape):
    _expect_rank(layer, shape, 4, ctx)
    N, C, H, W = shape
    out = layer.output_size
    OH, OW = (out, out) if isinstance(out, (int, np.integer)) or out is None else tuple(out)
    OH, OW = (H if OH is None else int(OH)), (W if OW is None else int(OW))
    if (OH, OW) == (1, 1):
        return ctx.node("GlobalAveragePool", [x]), (N, C, 1, 1)
    KH = _adaptive_window(layer, ctx, H, OH, "height")
    KW = _adaptive_window(layer, ctx, W, OW, "width")
    return ctx.node("AveragePool", [x], kernel_shape=[KH, KW], strides=[KH, KW]), (N, C, OH, OW)


@register_converter("Residual")
def _residual(layer, ctx, x, shape):
    """body(x) + shortcut(x) (the shortcut is the identity when the layer has none), then the
    layer's ``activation`` where it has one ("relu")."""
    path = ctx.path
    y, yshape = convert_child(path, "body", layer.body, ctx, x, shape)
    shortcut = getattr(layer, "shortcut", None)
    s, sshape = (x, shape) if shortcut is None else convert_child(path, "shortcut", shortcut, ctx, x, shape)
    if tuple(yshape) != tuple(sshape):
        raise ExportError(f"layer {path!r} (Residual): the body gives shape {tuple(yshape)} but the shortcut {tuple(sshape)}")
    y = ctx.node("Add", [y, s])
    activation = getattr(layer, "activation", None)
    if activation is None:
        return y, yshape
    if activation != "relu":
        raise ExportError(f"layer {path!r} (Residual): expected activation None or 'relu', got {activation!r}")
    return ctx.node("Relu", [y]), yshape


# --- the model ------------------------------------------------------------------------------------


def _check_input_shape(input_shape: Any) -> tuple:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if (
        shape is None
        or len(shape) < 2
        or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise ValueError(
            f"input_shape: expected the input's shape with the batch first, like (1, C, H, W), as "
            f"positive ints, got {input_shape!r}"
        )
    return tuple(int(d) for d in shape)


def _check_opset(opset: Any, onnx) -> int:
    latest = onnx.defs.onnx_opset_version()
    if opset is None:
        return min(DEFAULT_OPSET, latest)
    if not isinstance(opset, (int, np.integer)) or isinstance(opset, bool) or not MIN_OPSET <= opset <= latest:
        raise ValueError(f"opset: expected an int from {MIN_OPSET} to {latest} (this onnx package), got {opset!r}")
    return int(opset)


def _value_info(onnx, name: str, dtype: np.dtype, shape: tuple):
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    return onnx.helper.make_tensor_value_info(name, elem, [BATCH_DIM] + list(shape[1:]))


def to_onnx(model, input_shape, opset: int | None = None):
    """The ``onnx.ModelProto`` of ``model`` for inputs of ``input_shape`` (batch first; the batch
    dimension is dynamic in the graph), checked by ``onnx.checker`` (see the module docstring)."""
    from . import __version__  # noqa: PLC0415 (the package's version, set after its imports)

    onnx = _require_onnx()
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a cnn_gpu.nn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    dtype = model_dtype(model)
    ctx = _Graph(onnx, dtype, _check_opset(opset, onnx))
    y, out_shape = _convert(model, ctx, INPUT_NAME, shape, "")
    ctx.nodes.append(onnx.helper.make_node("Identity", [y], [OUTPUT_NAME], name=OUTPUT_NAME))
    graph = onnx.helper.make_graph(
        ctx.nodes,
        type(model).__name__,
        [_value_info(onnx, INPUT_NAME, dtype, shape)],
        [_value_info(onnx, OUTPUT_NAME, dtype, out_shape)],
        initializer=ctx.initializers,
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", ctx.opset)], producer_name="cnn_gpu", producer_version=__version__
    )
    proto.ir_version = min(proto.ir_version, _max_ir_version(onnx, ctx.opset))
    onnx.checker.check_model(proto, full_check=True)  # also runs shape inference against the declared shapes
    return proto


def _max_ir_version(onnx, opset: int) -> int:
    """The IR version that goes with ``opset`` (so older runtimes read the file)."""
    for _release, ir, op, *_ in onnx.helper.VERSION_TABLE:
        if op == opset:
            return ir
    return onnx.IR_VERSION


def export(model, path: str | os.PathLike, input_shape, opset: int | None = None):
    """Write ``model`` as ONNX to ``path`` (atomically) for inputs of ``input_shape`` = (N, C, H, W)
    (N is dynamic in the file); -> the ``onnx.ModelProto``. See the module docstring."""
    proto = to_onnx(model, input_shape, opset)
    with atomic_write(path) as f:
        f.write(proto.SerializeToString())
    return proto


__all__ = ["export", "to_onnx", "register_converter", "convert_child", "ExportError", "CONVERTERS", "DEFAULT_OPSET"]
