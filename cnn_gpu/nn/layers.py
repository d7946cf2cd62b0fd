"""Layers: thin wrappers that keep the functional cache and accumulate Parameter.grad."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import functional as F
from ..backend import current_xp, get_array_module, is_cupy_array
from ..functional import counter_rng
from ..functional._checks import FLOAT_DTYPES, describe, pair
from ..functional.activation import GELU_APPROXIMATIONS
from ..functional.loss import label_flag_message
from ..random import resolve_generator
from ..workspace import Workspace
from .module import LayerInputError, Module, Parameter


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
    return dt


def _positive_int(name: str, v: Any) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def kaiming_normal(shape: tuple, fan_in: int, generator=None, dtype=np.float32) -> Any:
    """He initialisation for ReLU nets: N(0, 2 / fan_in), drawn on the host, placed on the current backend."""
    gen = resolve_generator(generator)
    host = gen.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    return current_xp().asarray(host.astype(dtype))


def _not_run(layer: Module):
    return RuntimeError(f"{type(layer).__name__}.backward called before forward (no cache; every backward needs its own forward)")


def _grads(*params) -> tuple:
    """The arrays a backward adds the gradients of ``params`` into (None for an absent parameter)."""
    return tuple(None if p is None else p.grad for p in params)


class Conv2d(Module):
    """2-D convolution. Keeps a workspace (its column buffers, reused every step; see
    cnn_gpu.workspace). The cache holds the input, so it must not change between forward and
    backward, and may refer to the workspace, so a cache serves one backward: every backward
    needs its own forward. ``forward(x, activation="relu")`` returns relu(conv(x)) (how
    nn.Sequential fuses a following ReLU). ``groups``: the channels split into that many groups,
    each convolved with its own out_channels/groups filters; weight (out_channels,
    in_channels/groups, KH, KW); groups = in_channels is a depthwise convolution."""

    takes_activation = True

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias=True,
        dtype=np.float32,
        generator=None,
        groups=1,
    ):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.groups = _positive_int("groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups: expected a divisor of in_channels ({self.in_channels}) and out_channels "
                f"({self.out_channels}), got {groups}"
            )
        self.kernel_size = pair("kernel_size", kernel_size, minimum=1)
        self.stride = pair("stride", stride, minimum=1)
        self.padding = pair("padding", padding, minimum=0)
        self.dilation = pair("dilation", dilation, minimum=1)
        dt = _check_dtype(dtype)
        KH, KW = self.kernel_size
        cg = self.in_channels // self.groups  # channels per group
        fan_in = cg * KH * KW
        self.weight = Parameter(kaiming_normal((self.out_channels, cg, KH, KW), fan_in, generator, dt))
        self.bias = Parameter(current_xp().zeros((self.out_channels,), dtype=dt)) if bias else None
        self._cache = None
        self._ws = Workspace()

    def forward(self, x, activation=None):
        b = self.bias.data if self.bias is not None else None
        y, self._cache = F.conv2d_forward(
            x,
            self.weight.data,
            b,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            activation=activation,
            workspace=self._ws,
        )
        return y

    def backward(self, dy, input_grad=True):
        if self._cache is None:
            raise _not_run(self)
        cache, self._cache = self._cache, None  # one backward per forward (the cache may refer to the workspace)
        dx, _, _ = F.conv2d_backward(dy, cache, input_grad, accumulate_into=_grads(self.weight, self.bias))
        return dx

    def config(self) -> dict:
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=list(self.kernel_size),
            stride=list(self.stride),
            padding=list(self.padding),
            dilation=list(self.dilation),
            bias=self.bias is not None,
            **({"groups": self.groups} if self.groups != 1 else {}),
        )


class Linear(Module):
    """Fully connected: y = x @ weight^T + bias. ``forward(x, activation="relu")`` as in Conv2d."""

    takes_activation = True

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, generator=None):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        dt = _check_dtype(dtype)
        self.weight = Parameter(kaiming_normal((self.out_features, self.in_features), self.in_features, generator, dt))
        self.bias = Parameter(current_xp().zeros((self.out_features,), dtype=dt)) if bias else None
        self._cache = None

    def forward(self, x, activation=None):
        b = self.bias.data if self.bias is not None else None
        y, self._cache = F.linear_forward(x, self.weight.data, b, activation)
        return y

    def backward(self, dy, input_grad=True):
        if self._cache is None:
            raise _not_run(self)
        dx, _, _ = F.linear_backward(dy, self._cache, input_grad, accumulate_into=_grads(self.weight, self.bias))
        return dx

    def config(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None)


class _Pool(Module):
    _forward: Callable[..., Any] | None = None  # set by each subclass: F.<name>_forward / _backward
    _backward: Callable[..., Any] | None = None

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair("kernel_size", kernel_size, minimum=1)
        self.stride = pair("stride", self.kernel_size if stride is None else stride, minimum=1)
        self.padding = pair("padding", padding, minimum=0)
        self._cache = None

    def forward(self, x):
        y, self._cache = type(self)._forward(x, self.kernel_size, self.stride, self.padding)
        return y

    def backward(self, dy, input_grad=True):
        if self._cache is None:
            raise _not_run(self)
        return type(self)._backward(dy, self._cache) if input_grad else None

    def config(self) -> dict:
        return dict(kernel_size=list(self.kernel_size), stride=list(self.stride), padding=list(self.padding))


class MaxPool2d(_Pool):
    is_max_pool = True
    _forward = staticmethod(F.max_pool2d_forward)
    _backward = staticmethod(F.max_pool2d_backward)


class AvgPool2d(_Pool):
    _forward = staticmethod(F.avg_pool2d_forward)
    _backward = staticmethod(F.avg_pool2d_backward)


class _Activation(Module):
    _forward: Callable[..., Any] | None = None  # set by each subclass: F.<name>_forward / _backward
    _backward: Callable[..., Any] | None = None

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        y, self._cache = type(self)._forward(x)
        return y

    def backward(self, dy, input_grad=True):
        if self._cache is None:
            raise _not_run(self)
        return type(self)._backward(dy, self._cache) if input_grad else None

    def config(self) -> dict:
        return {}


class ReLU(_Activation):
    activation_name = "relu"  # nn.Sequential may run it inside the Conv2d / Linear before it
    commutes_with_max = True  # relu(max(a, b)) = max(relu(a), relu(b)), exactly
    _forward = staticmethod(F.relu_forward)
    _backward = staticmethod(F.relu_backward)


class Sigmoid(_Activation):
    _forward = staticmethod(F.sigmoid_forward)
    _backward = staticmethod(F.sigmoid_backward)


class Tanh(_Activation):
    _forward = staticmethod(F.tanh_forward)
    _backward = staticmethod(F.tanh_backward)


class Flatten(_Activation):
    _forward = staticmethod(F.flatten_forward)
    _backward = staticmethod(F.flatten_backward)


class GELU(_Activation):
    """GELU as torch: x * Phi(x), or its tanh approximation with ``approximate="tanh"``."""

    _backward = staticmethod(F.gelu_backward)

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"approximate: expected one of {GELU_APPROXIMATIONS}, got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        y, self._cache = F.gelu_forward(x, self.approximate)
        return y

    def config(self) -> dict:
        return dict(approximate=self.approximate)


class AdaptiveAvgPool2d(_Activation):
    """Average pooling to a fixed output size (torch's windows). ``AdaptiveAvgPool2d(1)`` followed
    by ``Flatten`` is global average pooling."""

    _backward = staticmethod(F.adaptive_avg_pool2d_backward)

    def __init__(self, output_size):
        super().__init__()
        self.output_size = pair("output_size", output_size, minimum=1)

    def forward(self, x):
        y, self._cache = F.adaptive_avg_pool2d_forward(x, self.output_size)
        return y

    def config(self) -> dict:
        return dict(output_size=list(self.output_size))


class _BatchNorm(Module):
    """Batch normalisation over the channels (axis 1), torch's semantics: in training mode the
    batch's statistics normalise and the running statistics (buffers ``running_mean``,
    ``running_var``, ``num_batches_tracked``) are updated; in eval mode the running statistics
    normalise. ``affine``: learn ``weight`` (gamma, ones) and ``bias`` (beta, zeros).
    ``track_running_stats=False``: no buffers, the batch's statistics in both modes.
    ``forward(x, activation="relu")`` returns relu(bn(x)) (how nn.Sequential fuses a following ReLU)."""

    _ndim = 4
    takes_activation = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, dtype=np.float32):
        super().__init__()
        self.num_features = _positive_int("num_features", num_features)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps: expected a positive float, got {eps!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        dt, xp, C = _check_dtype(dtype), current_xp(), self.num_features
        self.weight = Parameter(xp.ones((C,), dtype=dt)) if self.affine else None
        self.bias = Parameter(xp.zeros((C,), dtype=dt)) if self.affine else None
        tracked = self.track_running_stats
        self.register_buffer("running_mean", xp.zeros((C,), dtype=dt) if tracked else None)
        self.register_buffer("running_var", xp.ones((C,), dtype=dt) if tracked else None)
        self.register_buffer("num_batches_tracked", xp.zeros((), dtype=np.int64) if tracked else None)
        self._cache = None

    def forward(self, x, activation=None):
        if getattr(x, "ndim", None) != self._ndim:
            want = "(N, C)" if self._ndim == 2 else "(N, C, H, W)"
            raise ValueError(f"x: {type(self).__name__} expected a {self._ndim}-D {want} array, got {describe(x)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x: {type(self).__name__}({self.num_features}) expected {self.num_features} channels (axis 1), got {describe(x)}"
            )
        gamma = self.weight.data if self.affine else None
        beta = self.bias.data if self.affine else None
        y, self._cache = F.batch_norm_forward(
            x,
            gamma,
            beta,
            self.running_mean,
            self.running_var,
            self.training,
            self.momentum,
            self.eps,
            activation=activation,
            num_batches_tracked=self.num_batches_tracked,
        )  # counted in place
        return y

    def backward(self, dy, input_grad=True):
        if self._cache is None:
            raise _not_run(self)
        dx, _, _ = F.batch_norm_backward(dy, self._cache, accumulate_into=_grads(self.weight, self.bias))
        return dx if input_grad else None

    def config(self) -> dict:
        return dict(
            num_features=self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
        )


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) inputs, per channel over N, H and W."""

    _ndim = 4


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) inputs, per feature over the batch."""

    _ndim = 2


class Residual(Module):
    """y = body(x) + shortcut(x), or body(x) + x without a shortcut (a residual block).
    backward sends dy through both branches and adds the input gradients. Parameters are named
    ``body.*`` then ``shortcut.*``. ``forward(x, activation="relu")`` returns relu(y), the sum and
    the ReLU one op (F.add_forward; how nn.Sequential runs a ReLU after a Residual)."""

    takes_activation = True

    def __init__(self, body, shortcut=None):
        super().__init__()
        if not isinstance(body, Module):
            raise TypeError(f"body: expected a Module, got {type(body).__name__}")
        if shortcut is not None and not isinstance(shortcut, Module):
            raise TypeError(f"shortcut: expected a Module or None, got {type(shortcut).__name__}")
        self.body = body
        if shortcut is not None:
            self.shortcut = shortcut
        else:
            object.__setattr__(self, "shortcut", None)
        self._cache = None

    def forward(self, x, activation=None):
        branch = "body"
        try:
            y = self.body.forward(x)
            branch = "shortcut"
            s = self.shortcut.forward(x) if self.shortcut is not None else x
        except LayerInputError as exc:  # the path inside the block: body.0, shortcut.0, ...
            exc.path = f"{branch}.{exc.path}"
            exc.args = (exc.render(),)
            raise
        if tuple(y.shape) != tuple(s.shape):
            raise ValueError(
                f"Residual: the body's output {tuple(y.shape)} and the shortcut's "
                f"{tuple(s.shape)} differ; give a shortcut that maps x to the body's output shape"
            )
        out, self._cache = F.add_forward(y, s, activation)
        return out

    def backward(self, dy, input_grad=True):
        if self._cache is None:
            raise _not_run(self)
        dy = F.add_backward(dy, self._cache)  # the gradient of both addends
        dx = self.body.backward(dy, input_grad)
        ds = self.shortcut.backward(dy, input_grad) if self.shortcut is not None else dy
        return dx + ds if input_grad else None

    def config(self) -> dict:
        raise NotImplementedError("Residual is described by its children")


class LeakyReLU(_Activation):
    _backward = staticmethod(F.leaky_relu_backward)

    def __init__(self, negative_slope=0.01):
        super().__init__()
        if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
            raise TypeError(f"negative_slope: expected a float, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        y, self._cache = F.leaky_relu_forward(x, self.negative_slope)
        return y

    def config(self) -> dict:
        return dict(negative_slope=self.negative_slope)


class Dropout(Module):
    """Inverted dropout. The mask of call k is the counter-based draw of key (seed, k)
    (functional/counter_rng.py): the same masks on every engine, reproducible and resumable from
    (seed, calls), with no generator state. ``use_device_scalars()``: the key reaches the CUDA
    kernel through device memory (for CUDA graphs), the same masks."""

    def __init__(self, p=0.5, generator=None):
        super().__init__()
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.seed = int(resolve_generator(generator).integers(2**62))
        self.calls = 0
        self._cache = None
        self.device_scalars = self.staged = False
        self._key_scalars = None  # the key's device array (cuda/scalars.py), made at its first use

    def use_device_scalars(self, enabled: bool = True, *, staged: bool = False) -> Dropout:
        """From now on a training call on the CUDA engine uploads its key (one asynchronous 8-byte
        copy) to a device array the kernel reads, instead of passing it as a launch argument: a CUDA
        graph replaying the forward then draws each call's mask. NumPy arrays and the reference and
        CPU engines take the key as before. ``staged``: the call uploads nothing, and
        :meth:`stage_scalars` (before each call, outside the graph) uploads the coming call's key.
        Returns the layer."""
        self.device_scalars = bool(enabled)
        self.staged = self.device_scalars and bool(staged)
        return self

    def stage_scalars(self, xp) -> None:
        """Staged mode: upload the key of the coming training call (seed, calls) to the device
        array of ``xp`` (cupy) the kernel reads; one asynchronous copy, no host sync."""
        self._keys(xp).upload((counter_rng.key(self.seed, self.calls),))

    def _keys(self, xp):
        """The key's device array (cuda/scalars.py), made at its first use (the address then stays)."""
        from ..cuda.scalars import DeviceScalars  # noqa: PLC0415

        if self._key_scalars is None:
            self._key_scalars = DeviceScalars(xp, "dropout_forward")
        return self._key_scalars

    def forward(self, x):
        key = None
        if self.training and self.p > 0:
            key = counter_rng.key(self.seed, self.calls)
            self.calls += 1
        fn = self._device_kernel(x) if key is not None else None
        if fn is not None:
            scalars = self._key_scalars.array if self.staged else self._key_scalars.upload((key,))
            y, self._cache = fn(x, self.p, True, None, key, device_scalars=scalars)
        else:
            y, self._cache = F.dropout_forward(x, self.p, self.training, key=key)
        return y

    def _device_kernel(self, x):
        """The CUDA engine's dropout_forward for ``x`` (x checked, the key's device array made) in
        device-scalar mode; None where the key goes as an argument (F.dropout_forward)."""
        from ..cuda.scalars import takes_device_scalars  # noqa: PLC0415
        from ..functional import _checks, _dispatch  # noqa: PLC0415

        fn = _dispatch.impl("dropout_forward", x) if self.device_scalars else None
        if fn is None or not takes_device_scalars(fn, x):
            return None
        _checks.check_float("x", x)  # what F.dropout_forward checks
        if self.staged and self._key_scalars is None:
            raise RuntimeError("Dropout: staged device scalars: call stage_scalars() before the training call")
        self._keys(get_array_module(x))
        return fn

    def backward(self, dy, input_grad=True):
        if self._cache is None:
            raise _not_run(self)
        return F.dropout_backward(dy, self._cache) if input_grad else None

    def config(self) -> dict:
        return dict(p=self.p)


class CrossEntropyLoss(Module):
    """Softmax + mean cross-entropy. ``forward(logits, labels) -> loss`` (0-d array, stays on
    the device); ``backward(dloss=1) -> dlogits``. ``label_smoothing`` eps in [0, 1]: the target
    is (1 - eps) * onehot + eps / K, as torch.nn.CrossEntropyLoss(label_smoothing=eps).

    The labels' range check (``validate_range``): on NumPy arrays at once (a ValueError from
    forward); on CuPy arrays on the device, with no host sync: a label outside [0, K) makes its
    sample's loss NaN and sets a flag that :meth:`check_labels` reads (one host read, where your
    loop reads the loss anyway) and raises on. Probability (soft) targets (N, K) are checked the
    same way: entries >= 0, rows summing to 1 within F.loss.PROBABILITY_SUM_TOLERANCE (1e-3).
    ``validate_range=False``: no check at all."""

    def __init__(self, validate_range: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        self.validate_range = bool(validate_range)
        self.label_smoothing = F.check_label_smoothing(label_smoothing)
        self._dlogits = None
        self._flag, self._classes = None, None  # the device-side range flag (0-d int64), and K
        self.grad_scale = None  # float16 training's loss scale (a float32 device array (1,)): multiplies dlogits

    def forward(self, logits, labels):
        flag = self._device_flag(logits, labels) if self.validate_range else None
        scale = {} if self.grad_scale is None else {"grad_scale": self.grad_scale}
        loss, self._dlogits = F.softmax_cross_entropy(
            logits, labels, validate_range=self.validate_range, label_smoothing=self.label_smoothing, label_check=flag, **scale
        )
        return loss

    def _device_flag(self, logits, labels):
        """The labels' flag for CuPy logits (N, K) with integer labels or probability rows, made at
        the first such batch; None where the check runs on the host (NumPy, or arguments the public
        API will refuse)."""
        kind = getattr(getattr(labels, "dtype", None), "kind", "")
        if not (
            is_cupy_array(logits)
            and getattr(logits, "ndim", 0) == 2
            and (kind in ("i", "u") or (kind == "f" and getattr(labels, "ndim", 0) == 2))
        ):
            return None
        if self._flag is None:
            self._flag = get_array_module(logits).zeros((), dtype=np.int64)
        self._classes = int(logits.shape[1])
        return self._flag

    def check_labels(self) -> None:
        """Raise ValueError if a batch since the last call had a label outside [0, K), or a
        probability row with a negative entry or a sum off 1 (the check on the device, for CuPy
        arrays; one host read). Nothing to do for NumPy arrays (checked at once)."""
        if self._flag is None:
            return
        value = int(self._flag)
        if value:
            self._flag.fill(0)
            raise ValueError(label_flag_message(value, self._classes))

    def backward(self, dy=None, input_grad=True):
        if self._dlogits is None:
            raise _not_run(self)
        return self._dlogits if dy is None else self._dlogits * dy

    def config(self) -> dict:
        return {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
