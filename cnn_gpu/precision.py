"""The arithmetic precision of a training run: ``fit(..., precision=)`` and ``cnn-gpu train
--precision``.

    fp32   float32 everywhere, the reference's numbers (the default).
    tf32   as fp32, but the GEMMs run in cuBLAS's TF32 tensor-core math mode
           (CUBLAS_TF32_TENSOR_OP_MATH on cnn_gpu's own cuBLAS handle, cuda/cublas.py): their
           float32 inputs are rounded to 10 mantissa bits, the sums stay float32. Set for the run,
           restored after it. Every other kernel is unchanged.
    fp16   float16 activations and GEMM inputs with float32 arithmetic, float32 master weights
           and gradients, dynamic loss scaling on the device (:class:`LossScaler`,
           :class:`Float16Step`; docs/PRECISION.md). SGD, Adam and AdamW.

tf32 and fp16 are GPU modes: the CPU engine (NumPy arrays), and the reference engine on CuPy arrays,
compute in float32 only, so they refuse them rather than pretend (:func:`check`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "tf32", "fp16")
DEFAULT = "fp32"


def check(precision: Any, x: Any = None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` and the engine that runs ``x`` (an array of
    the run) can compute in it; ValueError in one line otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or x is None:
        return precision
    from .functional._dispatch import engine_name  # noqa: PLC0415

    eng = engine_name(x)
    if eng != "cuda":
        raise ValueError(
            f"precision: {precision!r} runs on the cuda engine (CuPy arrays on a GPU); the {eng} engine "
            f"computes in float32 only (use precision='fp32')"
        )
    if str(getattr(x, "dtype", "float32")) != "float32":
        raise ValueError(f"precision: {precision!r} applies to float32 models and data, got {x.dtype} arrays")
    return precision


@contextlib.contextmanager
def gemm_math(precision: str) -> Iterator[None]:
    """Inside the block the GEMMs of the current CuPy device run in ``precision``'s cuBLAS math mode
    (tf32: CUBLAS_TF32_TENSOR_OP_MATH on cnn_gpu's handle); the previous mode is restored after.
    fp32: nothing is touched (cuBLAS's default mode). Raises RuntimeError when the mode cannot be
    set (cnn_gpu's handle unavailable: CuPy's own cuBLAS wrappers would ignore it)."""
    if check(precision) != "tf32":
        yield
        return
    from .cuda import cublas  # noqa: PLC0415

    handle, why = cublas.get_handle()
    if handle is None:
        raise RuntimeError(f"precision: 'tf32' needs cnn_gpu's own cuBLAS handle to set TF32 math, and it is unavailable ({why})")
    previous = handle.set_math_mode(cublas.CUBLAS_TF32_TENSOR_OP_MATH)
    try:
        yield
    finally:
        if handle.ptr is not None:  # (not destroyed meanwhile: cublas.reset)
            handle.set_math_mode(previous)


# ------------------------------------------------------------------------------ float16 training
class LossScaler:
    """Dynamic loss scaling with its state on the device (no host sync), torch.amp.GradScaler's rule
    and defaults: the loss's gradient is multiplied by ``scale``; before the optimizer's update a
    launch per gradient buffer sets ``found`` where a value is not finite; the update kernel then
    divides the gradients by the scale, or skips the step; and ``update()`` halves the scale after an
    overflow, doubles it after ``growth_interval`` clean steps in a row (kernels/scaler.cu). The four
    one-element arrays (scale, clean steps, the flag, the steps taken) keep their addresses: a CUDA
    graph replays the launches. ``xp``: the arrays' module (cupy; NumPy with the CPU emulation of
    the kernels, in tests)."""

    def __init__(
        self,
        xp,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        for name, v, expected, ok in (
            ("init_scale", init_scale, "> 0", lambda v: v > 0),
            ("growth_factor", growth_factor, "> 1", lambda v: v > 1),
            ("backoff_factor", backoff_factor, "in (0, 1)", lambda v: 0 < v < 1),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name}: expected a finite number {expected}, got {v!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval: expected a positive int, got {growth_interval!r}")
        self.xp = xp
        self.growth_factor, self.backoff_factor, self.growth_interval = (
            float(growth_factor),
            float(backoff_factor),
            int(growth_interval),
        )
        self.scale = xp.full(1, init_scale, dtype=np.float32)
        self.tracker = xp.zeros(1, dtype=np.int32)  # clean steps in a row
        self.found = xp.zeros(1, dtype=np.int32)  # set by check(), reset by update()
        self.taken = xp.zeros(1, dtype=np.int32)  # the steps not skipped (Adam's t - 1 at the next update)

    def arrays(self) -> list:
        """The device arrays a step updates (what a CUDA graph's first-replay check restores)."""
        return [self.scale, self.tracker, self.found, self.taken]

    def check(self, grad) -> None:
        """found = 1 where the flat gradient buffer ``grad`` holds an inf or NaN (one launch)."""
        from .cuda import ops  # noqa: PLC0415

        ops.found_inf_(grad, self.found)

    def update(self) -> None:
        """The scale's update from this step's flag, which it resets (one launch)."""
        from .cuda import ops  # noqa: PLC0415

        ops.loss_scale_update_(
            self.scale, self.tracker, self.found, self.taken, self.growth_factor, self.backoff_factor, self.growth_interval
        )

    def state_dict(self) -> dict:
        """{"scale", "growth_tracker", "steps_taken", and the rule's settings}: reads the device (a
        checkpoint's one sync)."""
        from .backend import to_numpy  # noqa: PLC0415

        return {
            "scale": float(to_numpy(self.scale)[0]),
            "growth_tracker": int(to_numpy(self.tracker)[0]),
            "steps_taken": int(to_numpy(self.taken)[0]),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s values (a resume continues with the same scale, exactly)."""
        if not isinstance(state, dict) or not {"scale", "growth_tracker"} <= set(state):
            raise ValueError(f"state: expected a LossScaler state with 'scale' and 'growth_tracker', got {state!r}")
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.scale.fill(float(state["scale"]))
        self.tracker.fill(int(state["growth_tracker"]))
        self.taken.fill(int(state.get("steps_taken", 0)))
        self.found.fill(0)


#: the layers with float16 kernels (all of cnn_gpu.nn's; docs/PRECISION.md): a model of these trains in fp16
FLOAT16_LAYERS = (
    "Conv2d",
    "Linear",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "BatchNorm2d",
    "BatchNorm1d",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "GELU",
    "Flatten",
    "Dropout",
    "Residual",
    "Sequential",
)


def _check_layers(model) -> None:
    """ValueError naming the first layer that is not one of cnn_gpu's (:data:`FLOAT16_LAYERS`): a
    layer of the user's own may call ops whose kernels are float32 / float64 only (they would refuse
    float16 arrays mid-step), so fp16 refuses it before the first step. The model itself may be any
    container of them."""
    for name, m in model.named_modules():
        kind = type(m).__name__
        if m is not model and (kind not in FLOAT16_LAYERS or not type(m).__module__.startswith("cnn_gpu.")):
            raise ValueError(
                f"model: precision='fp16' runs cnn_gpu's layers ({', '.join(FLOAT16_LAYERS)}), whose float16 "
                f"kernels it knows; layer {name!r} is a {kind} (use precision='fp32' or 'tf32')"
            )


class Float16Step:
    """float16 training's step, ``step(x, y) -> (loss, logits)`` (float32 loss and logits): the
    model's forward and backward read float16 copies of its weights, the optimizer keeps the float32
    masters (the Parameter.data it packed, which the model shows at every other time: evaluation,
    saving, checkpoints), the gradients are float32, the loss is scaled on the device (LossScaler).

    Made once per fit: it adds a float16 copy of each optimizer group's flat buffer, whose views the
    parameters point at only inside :meth:`__call__` (a host-side swap), makes the optimizer's update
    write that copy and skip on overflow, and sets the loss's ``grad_scale``. :meth:`close` undoes it."""

    def __init__(self, model, optimizer, loss_fn, scaler: LossScaler | None = None):
        from .backend import get_array_module  # noqa: PLC0415

        inner = getattr(optimizer, "optimizer", optimizer)  # a DistributedOptimizer's wrapped one (the allreduce of
        # the float32 gradients stays the outer step's first act)
        if not getattr(inner, "float16_masters", False):  # SGD, Adam, AdamW (optim.py says so; no import: a cycle)
            raise ValueError(
                f"optimizer: precision='fp16' supports SGD, Adam and AdamW (float32 masters, skipped "
                f"steps); got {type(inner).__name__}"
            )
        if any(g.data.dtype != np.float32 for g in optimizer.groups):
            raise ValueError(
                "precision: 'fp16' trains float32 models (their float32 weights are the masters), got "
                + ", ".join(sorted({str(g.data.dtype) for g in optimizer.groups}))
            )
        _check_layers(model)
        self.model, self.optimizer, self.inner, self.loss_fn = model, optimizer, inner, loss_fn
        xp = get_array_module(optimizer.groups[0].data)
        self.scaler = scaler if scaler is not None else LossScaler(xp)
        if scaler is None and inner.loss_scaler_state is not None:  # a resumed run's scale, exactly
            self.scaler.load_state_dict(inner.loss_scaler_state)
        self.pairs = []  # (Parameter, its float16 view, its float32 master view)
        for g in optimizer.groups:
            g.half = g.data.astype(np.float16)  # what the update kernel writes from now on
            for p, (sl, shape) in zip(g.params, g.slices.values()):
                self.pairs.append((p, g.half[sl].reshape(shape), p.data))
        inner.scaler = self.scaler
        inner.float16_step = self  # cnn_gpu.train.train_step runs this step
        loss_fn.grad_scale = self.scaler.scale

    def __call__(self, xb, yb, max_label: int | None = None):
        self.optimizer.zero_grad()
        for p, half, _ in self.pairs:
            p.data = half
        try:
            logits = self.model.forward(xb.astype(np.float16))  # (one cast kernel: the data stay float32)
            if max_label is not None and max_label >= logits.shape[1]:
                raise ValueError(
                    f"labels: expected class indices in [0, {logits.shape[1] - 1}] for a model with "
                    f"{logits.shape[1]} outputs, got labels up to {max_label}"
                )
            loss = self.loss_fn.forward(logits, yb)  # float32; dlogits float16, times the scale
            self.model.backward(self.loss_fn.backward(), input_grad=False)  # float32 gradients, scaled
        finally:
            for p, _, master in self.pairs:
                p.data = master
        self.optimizer.step()  # found-inf check, unscaled master update + float16 copy (or none), scale update
        return loss, logits.astype(np.float32)

    def close(self) -> None:
        """Back to float32 training: the optimizer updates its masters only, the loss is not scaled."""
        for g in self.optimizer.groups:
            g.half = None
        self.inner.loss_scaler_state = self.scaler.state_dict()  # (one host read) for a checkpoint after fit
        self.inner.scaler = self.inner.float16_step = None
        self.loss_fn.grad_scale = None


__all__ = ["PRECISIONS", "DEFAULT", "check", "gemm_math", "LossScaler", "Float16Step"]
