"""Parameter, Module and Sequential.

A Module owns Parameters and child Modules; names are derived from the tree
("features.0.weight"). Layers are thin wrappers around the functional pairs:
``forward`` keeps the cache, ``backward`` uses it and *adds* into each
``Parameter.grad`` (gradients accumulate until ``zero_grad()``).
"""
from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from ..backend import backend_module, get_array_module, on_same_backend, to_numpy
from ..functional._checks import FLOAT_DTYPES
from ..functional._parallel import single_threaded_blas


class Parameter:
    """A trainable array ``data`` and its accumulated gradient ``grad`` (same shape, dtype, device).

    ``grad`` always exists and is updated in place, so optimizers may keep
    ``data`` and ``grad`` as views into one flat buffer.
    """

    __slots__ = ("data", "grad")

    def __init__(self, data: Any):
        if not hasattr(data, "dtype") or data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"data: expected a float32 or float64 array, got {type(data).__name__}")
        self.data = data
        self.grad = get_array_module(data).zeros_like(data)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    def zero_grad(self) -> None:
        self.grad[...] = 0

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, backend={get_array_module(self.data).__name__})"


class Module:
    """Base class: ``forward(x)``, ``backward(dy) -> dx``, parameters, modes and state."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # --- computation -------------------------------------------------------------
    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- the tree ----------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self._modules.items()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, p in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), p
        for name, child in self._modules.items():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode: bool = True) -> "Module":
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.parameters()))

    # --- state -------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, Any]":
        """Parameter name -> array (references, like PyTorch; copy before mutating)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters in place (shapes and dtypes must match exactly)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict of name -> array, got {type(state).__name__}")
        own = OrderedDict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state: parameter names do not match the model: missing {missing}, unexpected {unexpected}")
        present = [(name, p) for name, p in own.items() if name in state]
        for name, p in present:  # check everything first: a failed load changes nothing
            src = state[name]
            if tuple(src.shape) != p.shape:
                raise ValueError(f"state[{name!r}]: expected shape {p.shape}, got {tuple(src.shape)}")
            if np.dtype(src.dtype) != p.dtype:
                raise TypeError(f"state[{name!r}]: expected dtype {p.dtype}, got {src.dtype}")
        for name, p in present:
            p.data[...] = on_same_backend(state[name], p.data)

    def to(self, backend: str | None = None, dtype: Any = None) -> "Module":
        """Move parameters to ``backend`` ("numpy"/"cupy"/"auto") and/or cast them to ``dtype``.

        Replaces the parameter arrays: create optimizers after calling this.
        """
        if dtype is not None and np.dtype(dtype) not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
        xp = backend_module(backend) if backend is not None else None
        for _, p in self.named_parameters():
            data = p.data
            if xp is not None:
                data = xp.asarray(to_numpy(data)) if xp is np else xp.asarray(data)
            if dtype is not None:
                data = data.astype(dtype)
            p.data = data
            p.grad = get_array_module(data).zeros_like(data)
        return self

    # --- description -------------------------------------------------------------
    def config(self) -> dict:
        """The constructor arguments that rebuild this module (see cnn_gpu.serialization)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its architecture")

    def extra_repr(self) -> str:
        try:
            return ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        except NotImplementedError:
            return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)


class _Step(NamedTuple):
    """One backward step of Sequential: ``fn(dy) -> dx``; ``owner``: the layer with parameters
    whose gradients it computes, else None; ``input_grad``: whether fn takes ``input_grad=``."""

    fn: Callable
    owner: Any = None
    input_grad: bool = False


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``Sequential(a, b, c)`` names the children "0", "1", "2";
    ``Sequential(OrderedDict(features=..., classifier=...))`` uses the given names.

    ``backward(dy, input_grad=False)`` returns None and skips what only the gradient of the
    input needs: the first layer with parameters computes its parameters' gradients only,
    and the layers before it do not run (a training step needs no gradient for its data).

    The fast path: a run of Conv2d, MaxPool2d, AvgPool2d, ReLU, LeakyReLU, Sigmoid and Tanh
    layers that starts with a Conv2d runs channels-last (NHWC memory, NCHW shapes; see
    functional/_layout.py), where every convolution is a GEMM whose result is already the
    next layer's input layout; only the run's ends convert. Inside a run
      * a ReLU right after a Conv2d is applied in place on the convolution's output (the
        ReLU keeps that output as its cache, as its own forward would);
      * a ReLU's backward works in place on the gradient (a scratch array of the run), or,
        before a Conv2d, inside that convolution's backward, chunk by chunk;
      * ReLU then MaxPool2d: backward masks the pool's gradient (OH x OW) by pool output > 0
        instead of masking the ReLU's (H x W): the same numbers (see MaxPool2d.backward_after_relu).
    The results are those of running the layers one by one. Pair each backward with this
    Sequential's forward, not with a layer's own (the layers' caches are channels-last).
    """

    def __init__(self, *layers: Any):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (dict, OrderedDict)):
            items = list(layers[0].items())
        else:
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in items:
            if not isinstance(layer, Module):
                raise TypeError(f"layers[{name!r}]: expected a Module, got {type(layer).__name__}")
            if not name.isidentifier() and not name.isdigit():
                raise ValueError(f"layers: expected names that are identifiers or digits, got {name!r}")
            setattr(self, name, layer)
        object.__setattr__(self, "_trace", None)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int | str) -> Module:
        if isinstance(i, str):
            return self._modules[i]
        return list(self._modules.values())[i]

    def forward(self, x):
        from .layers import CHANNELS_LAST_SAFE, Conv2d  # noqa: PLC0415  (layers imports this module)

        layers = list(self._modules.values())
        trace: list[_Step] = []  # the backward steps, run in reverse
        i = 0
        with single_threaded_blas(get_array_module(x)):  # the ops spread their own work (functional/_parallel.py)
            while i < len(layers):
                if isinstance(layers[i], Conv2d):
                    j = i + 1
                    while j < len(layers) and (isinstance(layers[j], Conv2d) or type(layers[j]) in CHANNELS_LAST_SAFE):
                        j += 1
                    x = _forward_channels_last(layers[i:j], x, trace)
                    i = j
                else:
                    x = layers[i].forward(x)
                    trace.append(_step(layers[i]))
                    i += 1
        object.__setattr__(self, "_trace", trace)
        return x

    def backward(self, dy, input_grad: bool = True):
        trace = self._trace
        if trace is None:  # no forward yet: the layers raise
            trace = [_step(layer) for layer in self._modules.values()]
        first = 0  # the earliest step that must run
        if not input_grad:
            first = next((k for k, st in enumerate(trace) if st.owner is not None), len(trace))
        with single_threaded_blas(get_array_module(dy)):
            for k in range(len(trace) - 1, first - 1, -1):
                st = trace[k]
                skip_dx = k == first and not input_grad and st.input_grad
                dy = st.fn(dy, input_grad=False) if skip_dx else st.fn(dy)
        return dy if input_grad else None

    def config(self) -> dict:
        raise NotImplementedError("Sequential is described by its children")


def _step(layer: Module) -> _Step:
    """The backward step of ``layer``: its ``backward``."""
    return _Step(layer.backward, layer if layer.parameters() else None, _takes_input_grad(type(layer)))


@functools.lru_cache(maxsize=None)
def _takes_input_grad(cls: type) -> bool:
    """Whether cls.backward accepts ``input_grad=`` (Sequential, Conv2d, Linear; a user's
    layer may not: its input gradient is then computed and dropped)."""
    try:
        return "input_grad" in inspect.signature(cls.backward).parameters
    except (TypeError, ValueError):
        return False


def _forward_channels_last(run: list, x, trace: list):
    """Forward through ``run`` (a Conv2d, then Conv2d and channels-last-safe layers) on
    channels-last arrays, appending the backward steps to ``trace``. Returns a contiguous array."""
    from ..functional._layout import to_channels_last, to_contiguous  # noqa: PLC0415
    from .layers import Conv2d, MaxPool2d, ReLU  # noqa: PLC0415

    trace.append(_Step(lambda d: to_contiguous(get_array_module(d), d)))  # backward leaves the run contiguous
    h = x
    k = 0
    while k < len(run):
        layer = run[k]
        nxt = run[k + 1] if k + 1 < len(run) else None
        if isinstance(layer, Conv2d):
            fuse = type(nxt) is ReLU
            backward = layer.backward_cl
            if k > 0 and type(run[k - 1]) is ReLU and trace[-1].fn == run[k - 1].backward_:
                trace.pop()  # the ReLU's backward is folded into this convolution's, per chunk
                backward = functools.partial(layer.backward_cl, relu_input=True)
            h = layer.forward_cl(h, relu=fuse)  # (N, F, OH, OW) channels-last
            trace.append(_Step(backward, layer, True))
            if fuse:
                object.__setattr__(nxt, "_cache", h)  # the ReLU's output, as its forward keeps it
                trace.append(_Step(nxt.backward_))
                k += 1
        elif type(layer) is MaxPool2d and k > 0 and type(run[k - 1]) is ReLU and trace[-1].fn == run[k - 1].backward_:
            h = layer.forward(h)
            trace.pop()  # the ReLU's backward is folded into the pool's
            trace.append(_Step(functools.partial(layer.backward_after_relu, y=h)))
        elif type(layer) is ReLU:
            h = layer.forward(h)
            trace.append(_Step(layer.backward_))  # the gradient inside a run is a scratch array
        else:
            h = layer.forward(h)
            trace.append(_step(layer))
        k += 1
    # backward enters the run with a channels-last copy: a scratch array, never the caller's
    trace.append(_Step(lambda d: to_channels_last(get_array_module(d), d, copy=True)))
    return to_contiguous(get_array_module(h), h)  # (N, C, H, W)
