"""A step of GPU work as one CUDA graph: captured once, then replayed with one launch per call.

    graphed = StepGraph(step, name="train step", state=lambda: params_and_buffers)
    out = graphed(x, y)     # call 1: x, y copied into static inputs, one eager step, then capture
    out = graphed(x2, y2)   # later calls: copy into the static inputs, one graph launch

``step(*inputs) -> outputs`` runs on CuPy arrays and must be *capturable*: no host read, no
upload and no CuPy cuBLAS call inside it (cnn_gpu's GEMMs go through its own cuBLAS handle,
cuda/cublas.py), and everything that changes from call to call reaches it through device memory:
the static inputs this class copies each call's arrays into, and whatever ``stage()`` (run before
every call, outside the graph) writes into device buffers. A Python scalar given to a kernel at
capture is frozen into the graph. Host-side state that ``step`` changes (an optimizer's step
count, a Dropout's call count) would change once at capture and never at replay: ``host_state``
(a pair of callables, save -> token and restore(token)) puts it back after the capture, and
``after_replay()`` advances it as an eager call would have.

How (CuPy 14, cupy/cuda/stream.pyx and graph.pyx): the step is captured on a stream of its own,
made with ``non_blocking=True`` (work other code issues on the legacy stream then neither
joins nor invalidates the capture), after one eager step on that same stream (kernels compiled,
cuBLAS's workspace for that stream bound, every lazy allocation done). Allocations made during
the capture come from a memory pool private to the graph (``cupy.cuda.using_allocator``), so no
one else is handed those addresses while the graph lives. Calls run in the caller's stream order:
the capture stream waits for the caller's stream before each replay, and the caller's stream
waits for the replay (events, no host sync).

Safe when nobody watches: a capture that fails (a layer that reads the device, an op CuPy refuses
during capture, a CUDA error) makes every later call run eagerly, with one line saying why; the
first replay is checked once against an eager step from the same starting state (``state()``:
the arrays the step updates, snapshotted and restored), and if parameters or outputs differ by
more than float32 round-off the graph is dropped, with one line saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_RTOL, _ATOL = 1e-5, 1e-6  # "float32 round-off": relative to each array's largest magnitude


class StepGraph:
    """``step`` captured as a CUDA graph for inputs of the shapes and dtypes of the first call's
    (other shapes, e.g. a last partial batch, run eagerly). See the module docstring."""

    def __init__(
        self,
        step: Callable[..., Any],
        *,
        name: str = "step",
        stage: Callable[[], None] | None = None,
        state: Callable[[], Sequence[Any]] | None = None,
        host_state: tuple | None = None,
        after_replay: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        check: bool = True,
        say: Callable[[str], None] = print,
    ):
        if not callable(step):
            raise TypeError(f"step: expected a callable, got {type(step).__name__}")
        self.step, self.name, self.stage, self.state, self.host_state = step, name, stage, state, host_state
        self.after_replay, self.on_close = after_replay, on_close
        self.check, self.say = bool(check), say
        # the captured cupy.cuda.Graph, its capture stream and memory pool (None before the capture)
        self.graph: Any = None
        self.stream: Any = None
        self.pool: Any = None
        self.inputs: tuple = ()  # the static input buffers the graph reads
        self.outputs: Any = None  # what the captured step returned (rewritten by each replay)
        self.disabled = ""  # why the graph is off ("" while it may be used)
        self.replays = 0

    # ------------------------------------------------------------------ calls
    def __call__(self, *args):
        if self.stage is not None:
            self.stage()
        if self.disabled or (self.graph is not None and not self._fits(args)):
            return self.step(*args)
        if self.graph is None:
            return self._first(args)
        self._copy_in(args)
        if self.replays == 0 and self.check:
            return self._checked_replay()
        return self._replay()

    def _fits(self, args) -> bool:
        return len(args) == len(self.inputs) and all(
            tuple(a.shape) == tuple(s.shape) and a.dtype == s.dtype for a, s in zip(args, self.inputs)
        )

    def _first(self, args):
        """Call 1: the real step for these inputs, eagerly on the capture stream, then the capture."""
        cupy = _cupy()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.inputs = tuple(cupy.empty_like(a) for a in args)  # the static inputs (default pool)
        self._copy_in(args)
        self._join(cupy.cuda.get_current_stream(), self.stream)
        with self.stream:
            out = self.step(*self.inputs)
        self._join(self.stream, cupy.cuda.get_current_stream())
        self._capture()
        return out

    def _capture(self) -> None:
        cupy = _cupy()
        saved = self.host_state[0]() if self.host_state is not None else None
        self.pool = cupy.cuda.MemoryPool()
        try:
            with self.stream, cupy.cuda.using_allocator(self.pool.malloc):
                self.stream.begin_capture()
                try:
                    self.outputs = self.step(*self.inputs)
                finally:
                    graph = self.stream.end_capture()  # raises when the capture was invalidated
            self.graph = graph
        except Exception as exc:  # noqa: BLE001  (any failure: run eagerly from now on, say why)
            self._drop(f"capture failed ({type(exc).__name__}: {_first_line(exc)})")
        finally:
            if self.host_state is not None:
                self.host_state[1](saved)

    def _replay(self):
        cupy = _cupy()
        caller = cupy.cuda.get_current_stream()
        self._join(caller, self.stream)
        self.graph.launch(stream=self.stream)
        self._join(self.stream, caller)
        self.replays += 1
        if self.after_replay is not None:
            self.after_replay()
        return self.outputs

    def _checked_replay(self):
        """The first replay, compared once with an eager step from the same starting state (one
        host read, once per graph); on a mismatch the eager result stands and the graph is dropped."""
        cupy = _cupy()
        arrays = list(self.state()) if self.state is not None else []
        before = [a.copy() for a in arrays]
        host = self.host_state[0]() if self.host_state is not None else None
        out_graph = _copies(self._replay())
        after_graph = [a.copy() for a in arrays]
        for a, b in zip(arrays, before):
            a[...] = b
        if self.host_state is not None:
            self.host_state[1](host)  # the eager step starts where the replay started
        out_eager = self.step(*self.inputs)
        pairs = list(zip(_flat(out_graph), _flat(out_eager))) + list(zip(after_graph, arrays))
        bad = _first_mismatch(cupy, pairs)
        if bad:
            self._drop(f"its first replay differs from an eager step ({bad})")
            return out_eager
        return self.outputs

    def close(self) -> None:
        """Drop the graph and its buffers and run ``on_close`` (what the step's owners need to work
        eagerly again, e.g. leave staged device-scalar mode); later calls run eagerly."""
        self.graph = self.pool = self.outputs = None
        self.inputs = ()
        self.disabled = self.disabled or "closed"
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    # ------------------------------------------------------------------ helpers
    def _copy_in(self, args) -> None:
        for static, a in zip(self.inputs, args):
            static[...] = a  # a device-to-device copy, in stream order

    @staticmethod
    def _join(first, then) -> None:
        """Work issued next on stream ``then`` waits for what ``first`` has queued (no host wait)."""
        if first is then or getattr(first, "ptr", None) == getattr(then, "ptr", None):
            return
        event = _cupy().cuda.Event(block=False, disable_timing=True)
        event.record(first)
        then.wait_event(event)

    def _drop(self, why: str) -> None:
        self.disabled = why
        self.graph = None
        self.say(f"cuda graph: {self.name}: {why}; running it eagerly from now on")


def _cupy():
    import cupy  # noqa: PLC0415  (only for CuPy arrays)

    return cupy


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _flat(out) -> list:
    if out is None:
        return []
    return [a for a in (out if isinstance(out, (tuple, list)) else (out,)) if hasattr(a, "dtype")]


def _copies(out):
    return [a.copy() for a in _flat(out)]


def _first_mismatch(cupy, pairs) -> str:
    """'' when every pair agrees to float32 round-off (exactly, for integers; NaN where NaN), else
    what differs first. One host read for all the pairs (more only to describe a mismatch)."""
    oks = []
    for i, (a, b) in enumerate(pairs):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"array {i}: {a.dtype}{tuple(a.shape)} against {b.dtype}{tuple(b.shape)}"
        oks.append(_agree(cupy, a, b))
    if not oks:
        return ""
    agree = cupy.stack(oks).get()  # the one host read of the check
    for i, ok in enumerate(agree):
        if not ok:
            a, b = pairs[i]
            if a.dtype.kind not in "fc":
                return f"array {i}: integer values differ"
            err = float(cupy.nanmax(cupy.abs(a - b)))
            return f"array {i}: max difference {err:.3g} at scale {float(cupy.nanmax(cupy.abs(b))):.3g}"
    return ""


def _agree(cupy, a, b):
    """A 0-d device bool: ``a`` equals ``b`` (integers), or is within float32 round-off of it,
    |a - b| <= 1e-6 * max(1, max|b|) + 1e-5 * |b|, NaN where ``b`` is NaN (no host read)."""
    if not b.size:
        return cupy.ones((), dtype=bool)
    if a.dtype.kind not in "fc":
        return (a == b).all()
    finite = cupy.where(cupy.isfinite(b), cupy.abs(b), 0)
    scale = cupy.maximum(finite.max(), 1)
    close = cupy.abs(a - b) <= _ATOL * scale + _RTOL * cupy.abs(b)
    return (close | (cupy.isnan(a) & cupy.isnan(b)) | (a == b)).all()


def training_graph(
    model,
    optimizer,
    step: Callable[..., Any],
    *,
    check: bool = True,
    say: Callable[[str], None] = print,
    extra_state: Callable[[], Sequence[Any]] | None = None,
) -> StepGraph:
    """The training step of ``fit``, ``step(x, y) -> (loss, logits)`` (zero_grad, forward, loss,
    backward, the optimizer's update: cnn_gpu.train.train_step on ``model`` and ``optimizer``), as a
    StepGraph. What changes per step reaches
    the graph through device memory: the optimizer's scalars (lr from any schedule; Adam's bias
    corrections) and every Dropout's key are staged before each call (cuda/scalars.py: one async
    copy each from pinned memory), and the host counters (the optimizer's step count, the
    Dropouts' call counts) advance after each replay as an eager step would advance them.
    ``extra_state()``: further device arrays ``step`` updates (fit's metric sums), restored with
    the parameters and buffers before the first replay's check runs the eager step."""
    from ..nn.layers import Dropout  # noqa: PLC0415

    cupy = _cupy()
    dropouts = [m for _, m in model.named_modules() if isinstance(m, Dropout)]
    modes = [(optimizer, optimizer.device_scalars, optimizer.staged)] + [(d, d.device_scalars, d.staged) for d in dropouts]
    optimizer.use_device_scalars(staged=True)
    for d in dropouts:
        d.use_device_scalars(staged=True)

    def on_close():  # back to the modes they had: an eager step after the fit stages nothing
        for owner, enabled, staged in modes:
            owner.use_device_scalars(enabled, staged=staged)

    drawing = [d for d in dropouts if d.training and d.p > 0]  # those that draw a mask each step

    def stage():
        optimizer.stage_scalars()
        for d in drawing:
            d.stage_scalars(cupy)

    def state():
        arrays = [a for g in optimizer.groups for a in (g.data, *g.state.values())]
        arrays += [g.half for g in optimizer.groups if g.half is not None]  # float16 training's weight copies
        arrays += optimizer.scaler.arrays() if optimizer.scaler is not None else []  # and its loss scale
        return arrays + [b for _, b in model.named_buffers()] + (list(extra_state()) if extra_state else [])

    def save():
        return optimizer.step_count, [d.calls for d in dropouts]

    def restore(saved):
        optimizer.step_count, calls = saved[0], saved[1]
        for d, c in zip(dropouts, calls):
            d.calls = c

    def advance():
        optimizer.step_count += 1
        for d in drawing:
            d.calls += 1

    return StepGraph(
        step,
        name="training step",
        stage=stage,
        state=state,
        host_state=(save, restore),
        after_replay=advance,
        on_close=on_close,
        check=check,
        say=say,
    )


def graphs_usable() -> str:
    """'' when CuPy can capture CUDA graphs here, else why not (one line)."""
    try:
        cupy = _cupy()
    except ImportError as exc:
        return f"CuPy is not importable ({exc})"
    stream_type = getattr(cupy.cuda, "Stream", None)
    if stream_type is None or not hasattr(stream_type, "begin_capture"):
        return "this CuPy has no stream capture (cupy.cuda.Stream.begin_capture)"
    return ""


__all__ = ["StepGraph", "training_graph", "graphs_usable"]
