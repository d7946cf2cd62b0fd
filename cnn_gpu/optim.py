"""Optimizers (SGD with momentum/Nesterov, Adam, AdamW) and learning-rate schedules.

On construction an optimizer packs its parameters: all parameters of one backend and
dtype are copied into one flat buffer, and each ``Parameter.data`` / ``.grad``
becomes a view into it. One update then touches every parameter in a single pass
(one fused CUDA kernel launch on the GPU, a handful of NumPy expressions on the CPU).
Create the optimizer after ``model.to(...)``, which replaces the parameter arrays.

State is keyed by parameter *name* (``features.0.weight``), not by ``id()``.
Update rules follow PyTorch's (the math: functional/reference.py, sgd_update_ / adam_update_;
on the GPU one fused kernel launch per group):
    SGD    g = grad + wd*p;  buf = g (first step) or mu*buf + g;  g = g + mu*buf (Nesterov) or buf;  p -= lr*g
    Adam   g = grad + wd*p;  m = b1*m + (1-b1) g;  v = b2*v + (1-b2) g^2;  p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)
    AdamW  as Adam with g = grad, after the decoupled decay p *= 1 - lr*wd

``use_device_scalars()``: each step's scalars (lr; Adam's step_size = lr/bc1, bc2, decay = 1 - lr*wd)
reach the CUDA kernel through a small device array per group, uploaded by ``step()`` with one
asynchronous copy (cnn_gpu/cuda/scalars.py), not as launch arguments, so a CUDA graph that replays
the step sees each step's values; the same bits either way.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import get_array_module, on_same_backend, to_numpy
from .cuda.scalars import DeviceScalars, adam_scalars, takes_device_scalars
from .functional import _dispatch
from .nn.module import Module, Parameter

if TYPE_CHECKING:  # (precision imports this module)
    from .precision import Float16Step, LossScaler


def _named(params: Any) -> list[tuple[str, Parameter]]:
    if isinstance(params, Module):
        items = list(params.named_parameters())
    else:
        items = []
        for i, entry in enumerate(list(params)):
            if isinstance(entry, Parameter):
                items.append((f"param{i}", entry))
            elif isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Parameter):
                items.append((str(entry[0]), entry[1]))
            else:
                raise TypeError(f"params: expected Parameters or (name, Parameter) pairs, got {type(entry).__name__} at {i}")
    if not items:
        raise ValueError("params: expected at least one parameter, got none")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"params: parameter names must be unique, got {names}")
    if len({id(p) for _, p in items}) != len(items):
        raise ValueError("params: the same Parameter was given twice")
    return items


class _Group:
    """Parameters of one backend and dtype, packed into flat ``data`` and ``grad`` buffers."""

    def __init__(self, items: list[tuple[str, Parameter]]):
        self.names = [n for n, _ in items]
        first = items[0][1].data
        xp = get_array_module(first)
        sizes = [int(np.prod(p.shape)) for _, p in items]
        total = int(sum(sizes))
        self.data = xp.empty(total, dtype=first.dtype)
        self.grad = xp.empty(total, dtype=first.dtype)
        self.slices: OrderedDict[str, tuple[slice, tuple]] = OrderedDict()
        off = 0
        for (name, p), n in zip(items, sizes):
            sl = slice(off, off + n)
            self.data[sl] = p.data.reshape(-1)
            self.grad[sl] = p.grad.reshape(-1)
            p.data = self.data[sl].reshape(p.shape)  # views into the flat buffers
            p.grad = self.grad[sl].reshape(p.shape)
            self.slices[name] = (sl, p.shape)
            off += n
        self.params = [p for _, p in items]
        self.views = [p.data for p in self.params]
        self.state: dict[str, Any] = {}
        self.scalars: DeviceScalars | None = None  # the update kernel's per-step scalars (device-scalar mode)
        self.half = None  # float16 training: the float16 copy of ``data`` the update also writes (precision.py)

    def zeros(self):
        return get_array_module(self.data).zeros_like(self.data)

    def check_views(self) -> None:
        """Raise if a parameter array was replaced (e.g. by model.to()) after packing."""
        for name, p, view in zip(self.names, self.params, self.views):
            if p.data is not view:
                raise RuntimeError(
                    f"parameter {name!r} was replaced after the optimizer was created (model.to()?); "
                    "create the optimizer after moving or casting the model"
                )


class Optimizer:
    """The base of the optimizers: the parameters (a model or its named parameters) packed into one flat
    buffer per (backend, dtype) group, each Parameter's data and grad becoming views of it; ``step()``
    updates every parameter with one update per group, ``zero_grad()`` clears the gradients, and
    ``state_dict()`` / ``load_state_dict()`` carry the state keyed by parameter name. Create it after
    ``model.to(...)``."""

    _state_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, lr: float):
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
            raise ValueError(f"lr: expected a non-negative float, got {lr!r}")
        self.lr = float(lr)
        items = _named(params)
        groups: OrderedDict[tuple, list] = OrderedDict()
        for name, p in items:
            key = (get_array_module(p.data).__name__, str(p.dtype))
            groups.setdefault(key, []).append((name, p))
        self.groups = [_Group(g) for g in groups.values()]
        self.step_count = 0
        self.device_scalars = self.staged = False
        self.scaler: LossScaler | None = None  # float16 training's LossScaler (cnn_gpu/precision.py): checks, unscales, may skip
        self.float16_step: Float16Step | None = None  # float16 training's step (precision.Float16Step), which train_step runs
        self.loss_scaler_state: dict | None = None  # the scaler's state when none is attached (checkpoints)

    _op = ""  # the engine op of the update (its device scalars' layout: cuda/scalars.py)

    def use_device_scalars(self, enabled: bool = True, *, staged: bool = False) -> Optimizer:
        """From now on ``step()`` uploads the step's scalars (lr; Adam's step_size, bc2, decay, in
        double precision) to a device array per group, one asynchronous copy each, and the CUDA
        update kernel reads them there instead of from its launch arguments (a CUDA graph replaying
        the step then sees each step's values). Same bits as without; on NumPy arrays and the
        reference and CPU engines nothing changes. ``staged``: ``step()`` uploads nothing, and
        :meth:`stage_scalars` (called before each step, outside the graph) uploads the coming
        step's values. Returns the optimizer."""
        self.device_scalars = bool(enabled)
        self.staged = self.device_scalars and bool(staged)
        return self

    def _step_values(self, t: int) -> tuple:  # pragma: no cover - abstract
        """The update kernel's per-step scalars for step number ``t`` (from 1) at the current lr."""
        raise NotImplementedError

    def stage_scalars(self) -> None:
        """Staged mode: upload the coming step's values (step step_count + 1 at the current lr) for
        every group the CUDA engine updates; one asynchronous copy per group, no host sync."""
        values = self._step_values(self.step_count + 1)
        for g in self.groups:
            if takes_device_scalars(_dispatch.impl(self._op, g.data), g.data):
                (g.scalars or self._group_scalars(g)).upload(values)  # (no extra call per step)

    def _group_scalars(self, g: _Group) -> DeviceScalars:
        """Group ``g``'s device scalars, made at their first use (the address then stays)."""
        if g.scalars is None:
            g.scalars = DeviceScalars(get_array_module(g.data), self._op)
        return g.scalars

    def _scalars_kw(self, g: _Group, fn) -> dict:
        """``{"device_scalars": array}`` (this step's values uploaded, or staged before) for engine
        function ``fn``, or {} where the values go as launch arguments (eager mode, NumPy arrays,
        other engines)."""
        if not (self.device_scalars and takes_device_scalars(fn, g.data)):
            return {}
        if self.staged:
            if g.scalars is None:
                raise RuntimeError(f"{type(self).__name__}: staged device scalars: call stage_scalars() before step()")
            return {"device_scalars": g.scalars.array}
        return {"device_scalars": self._group_scalars(g).upload(self._step_values(self.step_count))}

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad[...] = 0

    def step(self) -> None:
        """One update of every group. With a loss scaler (float16 training, cnn_gpu/precision.py):
        first its found-inf check over every gradient buffer, then the updates (which unscale the
        gradients, or do nothing when one was not finite), then its scale's update; all on the device."""
        self.step_count += 1
        for g in self.groups:
            g.check_views()
        if self.scaler is not None:
            for g in self.groups:
                self.scaler.check(g.grad)
        for g in self.groups:
            self._update(g)
        if self.scaler is not None:
            self.scaler.update()

    def _update(self, g: _Group) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        return {"lr": self.lr}

    # --- state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"step": t, "hyper": {...}, "state": {param name: {buffer name: NumPy array}}, "loss_scaler": the
        LossScaler's state of float16 training (cnn_gpu/precision.py; a host read), or None}."""
        state: dict[str, dict] = {}
        for g in self.groups:
            for key, buf in g.state.items():
                for name, (sl, shape) in g.slices.items():
                    # a copy: on NumPy to_numpy() would return a view that later steps mutate
                    state.setdefault(name, {})[key] = np.array(to_numpy(buf[sl]), copy=True).reshape(shape)
        scaler = self.scaler.state_dict() if self.scaler is not None else self.loss_scaler_state
        return {
            "type": type(self).__name__,
            "step": self.step_count,
            "hyper": self.hyperparameters(),
            "state": state,
            "loss_scaler": scaler,
        }

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or sd.get("type") != type(self).__name__:
            got = sd.get("type") if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"state_dict: expected the state of a {type(self).__name__} optimizer, got {got!r}")
        names = {n for g in self.groups for n in g.names}
        unknown = set(sd["state"]) - names
        if unknown:
            raise KeyError(f"state_dict: state for unknown parameters {sorted(unknown)}")
        for key, value in sd["hyper"].items():
            setattr(self, key, tuple(value) if isinstance(value, list) else value)
        self.step_count = int(sd["step"])
        self.loss_scaler_state = sd.get("loss_scaler")  # float16 training's scale: its next fit starts from it
        if self.scaler is not None and self.loss_scaler_state is not None:
            self.scaler.load_state_dict(self.loss_scaler_state)
        for g in self.groups:
            g.state = {}
            for key in self._state_keys:
                present = [n for n in g.names if key in sd["state"].get(n, {})]
                if not present:
                    continue
                if len(present) != len(g.names):
                    raise KeyError(f"state_dict: {key!r} is missing for {sorted(set(g.names) - set(present))}")
                buf = g.zeros()
                for name, (sl, shape) in g.slices.items():
                    src = sd["state"][name][key]
                    if tuple(src.shape) != tuple(shape):
                        raise ValueError(f"state_dict[{name!r}][{key!r}]: expected shape {shape}, got {tuple(src.shape)}")
                    buf[sl] = on_same_backend(np.asarray(src, dtype=buf.dtype).reshape(-1), buf)
                g.state[key] = buf


def _check_float(name: str, v: Any, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v and (v < hi if hi_open else v <= hi)):
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name}: expected a float in {bound}, got {v!r}")
    return float(v)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (``nesterov=True``: Nesterov's) and L2 weight
    decay added to the gradient: torch.optim.SGD's update (state: ``momentum_buffer``)."""

    _state_keys = ("momentum_buffer",)
    float16_masters = True  # its update kernel keeps float32 masters for float16 training (precision.py)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum = _check_float("momentum", momentum, 0.0, 1.0, hi_open=True)
        self.weight_decay = _check_float("weight_decay", weight_decay)
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov: expected momentum > 0 with nesterov=True, got momentum=0")
        self.nesterov = bool(nesterov)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def _update(self, g: _Group) -> None:
        first = "momentum_buffer" not in g.state
        if self.momentum != 0 and first:
            g.state["momentum_buffer"] = g.zeros()
        if g.half is not None:  # float16 training: float32 masters, the float16 copy, the loss scale
            from .cuda import ops  # noqa: PLC0415  (the cuda engine's float16 path only)

            fn = ops.sgd_update_master_
            fn(
                g.data,
                g.grad,
                g.state.get("momentum_buffer"),
                g.half,
                self.lr,
                self.momentum,
                self.weight_decay,
                self.nesterov,
                self.scaler.scale,
                self.scaler.found,
                **self._scalars_kw(g, fn),
            )
            return
        fn = _dispatch.impl("sgd_update_", g.data)
        fn(
            g.data,
            g.grad,
            g.state.get("momentum_buffer"),
            self.lr,
            self.momentum,
            self.weight_decay,
            self.nesterov,
            first,
            **self._scalars_kw(g, fn),
        )

    _op = "sgd_update_"

    def _step_values(self, t: int) -> tuple:
        return (self.lr,)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` is L2, added to the gradient:
    torch.optim.Adam's update (state: ``exp_avg``, ``exp_avg_sq``)."""

    _state_keys = ("exp_avg", "exp_avg_sq")
    _decoupled = False
    float16_masters = True  # its update kernel keeps float32 masters for float16 training (precision.py)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        self.betas = (_check_float("betas[0]", betas[0], 0.0, 1.0, True), _check_float("betas[1]", betas[1], 0.0, 1.0, True))
        self.eps = _check_float("eps", eps)
        self.weight_decay = _check_float("weight_decay", weight_decay)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def _update(self, g: _Group) -> None:
        if "exp_avg" not in g.state:
            g.state["exp_avg"], g.state["exp_avg_sq"] = g.zeros(), g.zeros()
        m, v = g.state["exp_avg"], g.state["exp_avg_sq"]
        b1, b2 = self.betas
        if g.half is not None:  # float16 training: masters, the float16 copy; t = the steps not skipped (device)
            from .cuda import ops  # noqa: PLC0415  (the cuda engine's float16 path only)

            fn, sc = ops.adam_update_master_, self.scaler
            fn(
                g.data,
                g.grad,
                m,
                v,
                g.half,
                self.lr,
                b1,
                b2,
                self.eps,
                self.weight_decay,
                self._decoupled,
                sc.scale,
                sc.found,
                sc.taken,
                **self._scalars_kw(g, fn),
            )
            return
        bc1, bc2 = self._bias_corrections(self.step_count)
        fn = _dispatch.impl("adam_update_", g.data)
        fn(
            g.data,
            g.grad,
            m,
            v,
            self.lr,
            b1,
            b2,
            self.eps,
            self.weight_decay,
            self._decoupled,
            bc1,
            bc2,
            **self._scalars_kw(g, fn),
        )

    _op = "adam_update_"

    def _bias_corrections(self, t: int) -> tuple[float, float]:
        """(1 - beta1^t, 1 - beta2^t) of step ``t`` (from 1), in double precision."""
        b1, b2 = self.betas
        return 1.0 - b1**t, 1.0 - b2**t

    def _step_values(self, t: int) -> tuple:
        if self.scaler is not None:  # float16 training: the kernel forms the rest from the steps taken
            return (self.lr, 0.0, 0.0)
        return adam_scalars(self.lr, self.weight_decay, *self._bias_corrections(t))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): the weights shrink by lr * weight_decay
    each step, apart from the gradient's moments: torch.optim.AdamW's update."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


# --- learning-rate schedules ---------------------------------------------------------
class LRSchedule:
    """Sets ``optimizer.lr`` from a pure function of the number of ``step()`` calls."""

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a cnn_gpu.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> float:
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "last_step": self.last_step, "base_lr": self.base_lr}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state_dict: expected the state of a {type(self).__name__} schedule, got {sd.get('type')!r}")
        self.last_step, self.base_lr = int(sd["last_step"]), float(sd["base_lr"])
        self.optimizer.lr = self.lr_at(self.last_step)


class StepLR(LRSchedule):
    """lr = base_lr * gamma ** (step // step_size)."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        if not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size: expected a positive int, got {step_size!r}")
        self.step_size, self.gamma = step_size, _check_float("gamma", gamma)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.step_size)


class CosineLR(LRSchedule):
    """Linear warm-up over the first ``warmup_steps`` (lr = base_lr * (step + 1) / warmup_steps), then
    cosine decay from base_lr to ``min_lr`` at ``total_steps``."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps: expected an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, _check_float("min_lr", min_lr)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        t = min(step - self.warmup_steps, self.total_steps - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))


class OneCycleLR(LRSchedule):
    """One-cycle policy (Smith & Topin): cosine rise from max_lr/div_factor to max_lr over
    pct_start of the steps, then cosine fall to max_lr/(div_factor*final_div_factor)."""

    def __init__(
        self,
        optimizer,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ):
        if not isinstance(total_steps, int) or total_steps < 2:
            raise ValueError(f"total_steps: expected an int >= 2, got {total_steps!r}")
        self.max_lr = _check_float("max_lr", max_lr)
        self.total_steps = total_steps
        self.pct_start = _check_float("pct_start", pct_start, 0.0, 1.0)
        self.initial_lr = self.max_lr / _check_float("div_factor", div_factor, 1e-12)
        self.final_lr = self.initial_lr / _check_float("final_div_factor", final_div_factor, 1e-12)
        super().__init__(optimizer)

    @staticmethod
    def _cos(start: float, end: float, t: float) -> float:
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))

    def lr_at(self, step: int) -> float:
        up = max(1, int(round(self.pct_start * (self.total_steps - 1))))
        step = min(step, self.total_steps - 1)
        if step <= up:
            return self._cos(self.initial_lr, self.max_lr, step / up)
        return self._cos(self.max_lr, self.final_lr, (step - up) / max(1, self.total_steps - 1 - up))


SCHEDULES = {"step": StepLR, "cosine": CosineLR, "onecycle": OneCycleLR}

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LRSchedule", "StepLR", "CosineLR", "OneCycleLR", "OPTIMIZERS", "SCHEDULES"]
