"""Parameter, Module and Sequential.

A Module owns Parameters, buffers and child Modules; names are derived from the tree
("features.0.weight"). Buffers (``register_buffer``) are state that is not trained: BatchNorm's
running statistics. They travel with the parameters through state_dict / load_state_dict,
cnn_gpu.save / load, checkpoints and ``.to()``, and optimizers never see them. Layers are thin
wrappers around the functional pairs: ``forward`` keeps the cache, ``backward`` uses it and
*adds* into each ``Parameter.grad`` (gradients accumulate until ``zero_grad()``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ..backend import backend_module, from_dlpack, get_array_module, is_dlpack_producer, on_same_backend, to_numpy
from ..functional import _dispatch
from ..functional._checks import FLOAT_DTYPES


def _state_array(name: str, src: Any, like: Any) -> Any:
    """A value of a state dict for load_state_dict: a NumPy or CuPy array as it is; any DLPack
    producer (a torch tensor, a JAX array, ...) read through DLPack onto ``like``'s backend, without
    a copy where the device allows and without a cast (the caller checks shape and dtype)."""
    if is_dlpack_producer(src):
        src = from_dlpack(src, get_array_module(like))
    if not hasattr(src, "shape") or not hasattr(src, "dtype"):
        raise TypeError(
            f"state[{name!r}]: expected an array (NumPy, CuPy or a DLPack producer such as a torch "
            f"tensor), got {type(src).__name__}"
        )
    return src


class _Slot:
    """What load_state_dict needs of a parameter or a buffer: its array, shape and dtype."""

    __slots__ = ("data",)

    def __init__(self, data: Any):
        self.data = data

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype


class Parameter(_Slot):
    """A trainable array ``data`` and its accumulated gradient ``grad`` (same shape, dtype, device).

    ``grad`` always exists and is updated in place, so optimizers may keep
    ``data`` and ``grad`` as views into one flat buffer.
    """

    __slots__ = ("grad",)

    def __init__(self, data: Any):
        if not hasattr(data, "dtype") or data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"data: expected a float32 or float64 array, got {type(data).__name__}")
        super().__init__(data)
        self.grad = get_array_module(data).zeros_like(data)

    def zero_grad(self) -> None:
        self.grad[...] = 0

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, backend={get_array_module(self.data).__name__})"


class Module:
    """Base class: ``forward(x)``, ``backward(dy, input_grad=True) -> dx``, parameters, modes, state.

    ``backward`` adds the gradients of the parameters into their ``Parameter.grad`` and returns
    dL/dx; with ``input_grad=False`` it may skip dx and return None (a training step needs no
    gradient for its data).

    What a layer declares for the engines' plans (see :func:`plan`): a layer that can apply an
    activation to its own output declares ``takes_activation = True`` and accepts
    ``forward(x, activation=name)`` (its backward then includes the activation's); an activation
    layer that can run that way names itself in ``activation_name``, and says
    ``commutes_with_max = True`` when f(max(a, b)) = max(f(a), f(b)) holds exactly, ties and
    gradients included (ReLU: exact, and equal only where its gradient is 0); a max pool says
    ``is_max_pool = True``.
    """

    takes_activation = False
    activation_name: str | None = None
    commutes_with_max = False
    is_max_pool = False
    # set in __init__ with object.__setattr__ (not through __setattr__'s registration)
    _parameters: OrderedDict[str, Parameter]
    _modules: OrderedDict[str, Module]
    _buffers: OrderedDict[str, Any]
    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_buffers", {}):
            if value is not None and not hasattr(value, "dtype"):
                raise TypeError(f"{name}: expected an array for the buffer, got {type(value).__name__}")
            self._buffers[name] = value
        elif isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # --- computation -------------------------------------------------------------
    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy, input_grad: bool = True):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- the tree ----------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, p in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), p
        for name, child in self._modules.items():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)

    def register_buffer(self, name: str, value: Any) -> None:
        """Keep array ``value`` (or None: absent) as state named ``name``: saved and loaded with the
        parameters, moved by ``.to()``, not trained. Assign ``self.name = array`` to replace it."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name: expected an identifier, got {name!r}")
        if name in self._parameters or name in self._modules:
            raise KeyError(f"name: {name!r} is already a parameter or a child module")
        if value is not None and not hasattr(value, "dtype"):
            raise TypeError(f"value: expected a NumPy or CuPy array or None, got {type(value).__name__}")
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """(name, array) of every buffer in the tree (buffers set to None are left out)."""
        for name, b in self._buffers.items():
            if b is not None:
                yield (f"{prefix}.{name}" if prefix else name), b
        for name, child in self._modules.items():
            yield from child.named_buffers(f"{prefix}.{name}" if prefix else name)

    def _named_state(self, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
        """(name, array, owner) of every parameter and buffer: per module its parameters, its
        buffers, then its children (torch's state_dict order). owner: the Parameter, or
        (module, buffer name)."""
        for name, p in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), p.data, p
        for name, b in self._buffers.items():
            if b is not None:
                yield (f"{prefix}.{name}" if prefix else name), b, (self, name)
        for name, child in self._modules.items():
            yield from child._named_state(f"{prefix}.{name}" if prefix else name)

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode: bool = True) -> Module:
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.parameters()))

    # --- state -------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, Any]:
        """Parameter and buffer name -> array (references, like PyTorch; copy before mutating)."""
        return OrderedDict((name, a) for name, a, _ in self._named_state())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters and buffers in place (shapes and dtypes must match exactly)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict of name -> array, got {type(state).__name__}")
        own = OrderedDict((name, _Slot(a)) for name, a, _ in self._named_state())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state: parameter and buffer names do not match the model: missing {missing}, unexpected {unexpected}"
            )
        present = [(name, p) for name, p in own.items() if name in state]
        arrays = {}  # NumPy/CuPy arrays, DLPack producers (torch tensors, ...) read through DLPack: _state_array
        for name, p in present:  # check everything first: a failed load changes nothing
            src = arrays[name] = _state_array(name, state[name], p.data)
            if tuple(src.shape) != p.shape:
                raise ValueError(f"state[{name!r}]: expected shape {p.shape}, got {tuple(src.shape)}")
            if np.dtype(src.dtype) != p.dtype:
                raise TypeError(f"state[{name!r}]: expected dtype {p.dtype}, got {src.dtype}")
        for name, p in present:
            p.data[...] = on_same_backend(arrays[name], p.data)

    def to(self, backend: str | None = None, dtype: Any = None) -> Module:
        """Move parameters to ``backend`` ("numpy"/"cupy"/"auto") and/or cast them to ``dtype``.

        Replaces the parameter arrays: create optimizers after calling this.
        """
        if dtype is not None and np.dtype(dtype) not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
        xp = backend_module(backend) if backend is not None else None
        for _, data, owner in list(self._named_state()):
            if xp is not None:
                data = xp.asarray(to_numpy(data)) if xp is np else xp.asarray(data)
            if dtype is not None and data.dtype.kind == "f":  # integer buffers (counters) keep their type
                data = data.astype(dtype)
            if isinstance(owner, Parameter):
                owner.data = data
                owner.grad = get_array_module(data).zeros_like(data)
            else:
                module, name = owner
                setattr(module, name, data)
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


class InputSpec(NamedTuple):
    """What a model takes: ``name`` (e.g. "lenet5"), one input's ``shape`` (C, H, W) and, for models
    that take any image size from a minimum (global average pooling), ``min_size``."""

    name: str
    shape: tuple
    min_size: int | None = None

    def describe(self) -> str:
        if self.min_size is None:
            return f"{self.name} takes {self.shape} inputs"
        return f"{self.name} takes ({self.shape[0]}, H, W) inputs with H, W >= {self.min_size}"


def _channels_last_hint(shape: tuple, channels: int | None) -> str:
    """A note for an NHWC batch given where NCHW is expected (its last axis looks like channels)."""
    if len(shape) != 4 or shape[-1] not in (1, 3, 4) or shape[1] == shape[-1]:
        return ""
    if channels is not None and (shape[-1] != channels or shape[1] == channels):
        return ""
    return "; the last axis looks like channels: this is NHWC, the model takes NCHW (x.transpose(0, 3, 1, 2))"


class LayerInputError(ValueError):
    """A model's forward failed on its input: the message names the layer (``path``, e.g.
    "features.0", and its type), what the model takes and what it was given, e.g.
    ``features.3 Conv2d: lenet5 takes (1, 28, 28) inputs, got (1, 8, 8)``. Each enclosing
    container prefixes its child's name (:meth:`within`)."""

    def __init__(
        self,
        path: str,
        layer: str,
        detail: str,
        x: Any,
        spec: InputSpec | None = None,
        last: tuple | None = None,
        dtype: Any = None,
    ):
        super().__init__(detail)
        self.path, self.layer, self.detail, self.dtype = path, layer, detail, dtype
        self.shape, self.x_dtype, self.spec, self.last = tuple(x.shape), np.dtype(x.dtype), spec, last
        self.args = (self.render(),)

    @classmethod
    def wrap(cls, exc: Exception, container: Module, step: Any, y: Any, x: Any) -> LayerInputError:
        """The error of ``step`` (run on ``y``) inside ``container`` (whose input was ``x``)."""
        module = getattr(step, "layer", step)  # a fused step: its layer
        name = next((n for n, m in container._modules.items() if m is module), "?")
        spec, last = getattr(container, "input_spec", None), getattr(container, "_last_input", None)
        if isinstance(exc, LayerInputError):
            return exc.within(name, x, spec, last)
        params = module.parameters()
        dtype = params[0].dtype if params and getattr(y, "dtype", None) is not None else None
        kind: type[LayerInputError]
        if dtype is not None and np.dtype(y.dtype) != dtype and np.dtype(y.dtype).kind == "f":
            kind = LayerDtypeError
        else:
            kind, dtype = cls, None
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise exc
        return kind(name, type(module).__name__, str(exc), x, spec, last, dtype)

    def within(self, name: str, x: Any, spec: InputSpec | None, last: tuple | None) -> LayerInputError:
        """The same error seen from the container that holds this layer as its child ``name``."""
        self.path = f"{name}.{self.path}"
        self.shape = tuple(x.shape)
        self.spec, self.last = spec or self.spec, last or self.last
        self.args = (self.render(),)
        return self

    def render(self) -> str:
        where = f"{self.path} {self.layer}"
        if self.dtype is not None:
            return (
                f"x: expected {self.dtype} (the model's dtype), got {self.x_dtype} (at {where}); nothing is cast "
                f"silently: convert with x.astype(np.{self.dtype})"
            )
        one = self.shape[1:]
        if self.spec is not None:
            got = (
                str(one)
                if len(self.shape) == len(self.spec.shape) + 1
                else f"an array of shape {self.shape} (expected a batch (N, {', '.join(map(str, self.spec.shape))}))"
            )
            text = f"{where}: {self.spec.describe()}, got {got}"
            if len(self.shape) == len(self.spec.shape) + 1 and one == tuple(self.spec.shape):
                text += f" ({self.detail})"  # the shape is right: the layer's own message says what is wrong
        else:
            text = f"{where}: {self.detail}; the model was given an array of shape {self.shape}"
            if self.last is not None and self.last != one:
                text += f" (its last input was {self.last})"
        channels = self.spec.shape[0] if self.spec is not None else (self.last[0] if self.last else None)
        return text + _channels_last_hint(self.shape, channels)


class LayerDtypeError(LayerInputError, TypeError):
    """A LayerInputError about the dtype of the input (also a TypeError, as the layers raise)."""


class _Fused:
    """A layer and the activation after it, run as one op (``layer.forward(x, activation=...)``)."""

    __slots__ = ("layer", "activation")

    def __init__(self, layer: Module, activation: str):
        self.layer, self.activation = layer, activation

    def forward(self, x):
        return self.layer.forward(x, activation=self.activation)

    def backward(self, dy, input_grad: bool = True):
        return self.layer.backward(dy, input_grad)

    def parameters(self) -> list:
        return self.layer.parameters()


def plan(layers: list, engine) -> list:
    """The steps that run ``layers`` on ``engine``, from what the layers declare:

    * with the engine's ``POOL_BEFORE_ACTIVATION``, an activation that commutes with max followed
      by a max pool runs after it (max(f(a), f(b)) = f(max(a, b)): the same numbers, and the
      activation's forward and backward touch the pooled, smaller array);
    * a layer declaring ``takes_activation`` followed by an activation in the engine's
      ``FUSED_ACTIVATIONS`` becomes one step, the activation its epilogue;
    * every other layer is a step of its own.
    """
    layers = list(layers)
    if getattr(engine, "POOL_BEFORE_ACTIVATION", False):
        for i in range(len(layers) - 1):
            if layers[i].commutes_with_max and layers[i + 1].is_max_pool:
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
    fusable = getattr(engine, "FUSED_ACTIVATIONS", ())
    steps, i = [], 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if layer.takes_activation and nxt is not None and nxt.activation_name in fusable:
            steps.append(_Fused(layer, nxt.activation_name))
            i += 2
        else:
            steps.append(layer)
            i += 1
    return steps


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``Sequential(a, b, c)`` names the children "0", "1", "2";
    ``Sequential(OrderedDict(features=..., classifier=...))`` uses the given names.

    The engine of the input decides what runs as one step (:func:`plan`): the CPU and CUDA
    engines run a ReLU inside the Conv2d or Linear before it, as that layer's epilogue, and
    the CPU engine runs a ReLU that precedes a max pool after the pool; the reference runs
    every layer as it comes. The numbers are the same either way.

    ``backward(dy, input_grad=False)`` returns None and skips what only the gradient of the
    input needs: the first step with parameters computes its parameters' gradients only, and
    the steps before it do not run.
    """

    # set with object.__setattr__: the last forward's plan, its input shape, a zoo model's InputSpec
    _steps: list | None
    _last_input: tuple | None
    input_spec: InputSpec | None

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
        object.__setattr__(self, "_steps", None)
        object.__setattr__(self, "_last_input", None)
        object.__setattr__(self, "input_spec", None)  # a zoo model's InputSpec (models.py), for error messages

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int | str) -> Module:
        if isinstance(i, str):
            return self._modules[i]
        return list(self._modules.values())[i]

    def forward(self, x):
        steps = plan(list(self), _dispatch.engine(x))
        object.__setattr__(self, "_steps", steps)
        y = x
        try:
            for step in steps:
                y = step.forward(y)
        except (ValueError, TypeError) as exc:  # say which layer, and what the model takes (no cost otherwise)
            raise LayerInputError.wrap(exc, self, step, y, x) from None
        object.__setattr__(self, "_last_input", tuple(x.shape[1:]))  # what cnn_gpu.save records; no sync
        return y

    @property
    def last_input_shape(self) -> tuple | None:
        """The shape of one input (without the batch) of the last successful forward, else of the
        model it was loaded from (cnn_gpu.load), else None."""
        return self._last_input

    def backward(self, dy, input_grad: bool = True):
        steps = self._steps if self._steps is not None else list(self)  # no forward yet: the layers raise
        first = 0  # the earliest step that must run
        if not input_grad:
            first = next((k for k, st in enumerate(steps) if st.parameters()), len(steps))
        for k in range(len(steps) - 1, first - 1, -1):
            dy = steps[k].backward(dy, input_grad or k > first)
        return dy if input_grad else None

    def config(self) -> dict:
        raise NotImplementedError("Sequential is described by its children")
