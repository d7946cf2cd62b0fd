"""CUDA streams, stream capture and CUDA graphs in the stand-in, as CuPy 14 and CUDA have them.

Streams (cupy/cuda/stream.pyx). ``Stream(null=False, non_blocking=False, ptds=False,
priority=None)``: ``Stream.null`` is the legacy default stream (``ptr`` 0), ``Stream.ptds`` the
per-thread one (``ptr`` 2, cudaStreamPerThread); any other stream gets a nonzero handle.
``with stream:`` makes it the current stream of its device (``get_current_stream()``), nested,
restored on exit; ``use()`` sets it without the stack. A stream made on another device than the
current one refuses both with CuPy's RuntimeError. Work runs at once on every stream (the
stand-in's device is the host), so streams only matter for capture.

Capture (cudaStreamBeginCapture / cudaStreamEndCapture). ``begin_capture(mode=None)`` (CuPy's
default: cudaStreamCaptureModeRelaxed; the other modes are not modelled) refuses the legacy
stream as CuPy does (``RuntimeError('cannot capture on the default (legacy) stream')``). While a
stream captures, work issued on it is RECORDED, NOT RUN: our kernels, CuPy's elementwise,
reduction, copy and fill kernels, device-to-device copies, NCCL collectives, event records and
host functions. ``end_capture()`` returns a ``cupy.cuda.graph.Graph``; ``Graph.launch(stream)``
replays the recorded work in order, with the recorded arguments on the same buffers: a host
scalar passed at capture is frozen; an array created during capture keeps its address, is
poisoned at capture (NaN; ints ``INT_POISON``, as the emulator's; bools True) so a read of a
capture-time value shows, and is rewritten by each replay (:func:`launch`).

What refuses during capture, as CuPy 14 and CUDA do:

* a host<->device transfer on the capturing stream (``a.get()``, ``float(a)``, ``a.item()``,
  ``bool(a)``, printing, boolean-mask indexing, ``cupy.asarray(host)``, ``a.set(host)``):
  CuPy's own check in cupy/cuda/memory.pyx (``MemoryPointer.copy_to_host_async`` /
  ``copy_from_host_async``) raises ``RuntimeError('the current stream is capturing, so D2H
  transfers are disallowed')`` (H2D likewise) BEFORE any CUDA call, so the capture stays valid;
* cuBLAS with the capturing stream current (``cupy.cublas.gemm``, ``cupy.matmul``/``dot`` on
  float arrays): cupy_backends/cuda/libs/cublas.pyx ``setStream`` raises
  ``NotImplementedError('calling cuBLAS API during stream capture is currently unsupported')``,
  also before any CUDA call;
* a CUDA synchronization that covers the capture (``Stream.synchronize()``/``done`` of the
  capturing stream, ``Device.synchronize()``, ``Event.synchronize()``/``done`` of an event
  recorded in the capture): CUDA refuses it with cudaErrorStreamCaptureUnsupported and
  INVALIDATES the capture (CUDA Programming Guide, "Prohibited and Unhandled Operations"); then
  more work on the stream fails with cudaErrorStreamCaptureInvalidated, CuPy's capture checks
  raise ``RuntimeError('the stream was capturing, but an error has invalidated the capture
  sequence')`` (runtime.pyx ``streamIsCapturing``) and ``end_capture()`` fails with
  cudaErrorStreamCaptureInvalidated (ending the capture);
* work on the legacy stream (``ptr`` 0) while a stream created without ``non_blocking=True``
  captures: cudaErrorStreamCaptureImplicit (the legacy stream would depend on the capture), and
  the capture is invalidated. With a ``non_blocking=True`` capture stream such work runs at once,
  outside the graph.

Allocations are allowed during capture (relaxed mode; cupy/cuda/memory.py pools:
tests/standin/memory.py) and are listed per graph (:func:`allocations`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import devices
from . import null as null_mode  # the null-compute switch (not Stream.null)
from .counters import current

CAPTURE_MODE_GLOBAL, CAPTURE_MODE_THREAD_LOCAL, CAPTURE_MODE_RELAXED = 0, 1, 2  # cupy.cuda.runtime's values
STREAM_LEGACY, STREAM_PER_THREAD = 1, 2  # cudaStreamLegacy, cudaStreamPerThread (cupy.cuda.runtime)
INT_POISON = -0x2BADBAD  # what tests/emulation/harness.py's EmulationLauncher.empty puts in int arrays

D2H = "the current stream is capturing, so D2H transfers are disallowed"  # cupy/cuda/memory.pyx
H2D = "the current stream is capturing, so H2D transfers are disallowed"  # cupy/cuda/memory.pyx
INVALIDATED = "the stream was capturing, but an error has invalidated the capture sequence"  # runtime.pyx
CUBLAS = "calling cuBLAS API during stream capture is currently unsupported"  # libs/cublas.pyx setStream
LEGACY = "cannot capture on the default (legacy) stream"  # cupy/cuda/stream.pyx begin_capture
NO_GRAPH = "currently this class cannot be initiated by the user and must be created via stream capture"

_CUDA_ERRORS = {  # cudaGetErrorName -> (status, cudaGetErrorString)
    "cudaErrorInvalidValue": (1, "invalid argument"),
    "cudaErrorIllegalState": (401, "the operation cannot be performed in the present state"),
    "cudaErrorStreamCaptureUnsupported": (900, "operation not permitted when stream is capturing"),
    "cudaErrorStreamCaptureInvalidated": (901, "operation failed due to a previous error during capture"),
    "cudaErrorStreamCaptureImplicit": (906, "operation would make the legacy stream depend on a capturing blocking stream"),
}


def cuda_error(name: str) -> devices.CUDARuntimeError:
    """CuPy's CUDARuntimeError for CUDA error ``name``: "name: description", with ``.status``."""
    status, text = _CUDA_ERRORS[name]
    err = devices.CUDARuntimeError(f"{name}: {text}")
    err.status = status
    return err


def _gap(message: str) -> Exception:
    from .array import StandinGap  # noqa: PLC0415  (array imports this module)

    return StandinGap(message)


# ------------------------------------------------------------------ the capture state
class _Node(NamedTuple):
    kind: str  # "kernel", "elementwise", "copy", "fill", "nccl", ..., "event", "host", "graph"
    name: str | None  # our kernel's name
    run: Callable[[], Any] | None  # None: nothing to do on the device (a view, a no-op collective)
    inside: collections.Counter  # the launches this node stands for (kind -> count)


class _Capture:
    """One capture sequence: its stream, the nodes recorded so far, why it was invalidated."""

    def __init__(self, stream: Stream, mode: int):
        self.stream, self.mode, self.device = stream, mode, devices.machine().current
        self.nodes: list[_Node] = []
        self.allocations: list[tuple[int, Any]] = []  # (bytes, the MemoryPool or None)
        self.invalid: str | None = None
        self.ended = False

    def record(self, kind: str, name: str | None, run, launches: int = 1) -> None:
        inside = collections.Counter({kind: launches}) if launches else collections.Counter()
        self.nodes.append(_Node(kind, name, run, inside))
        current().captured.update(inside)

    def invalidate(self, why: str) -> None:
        if self.invalid is None:
            self.invalid = why


_captures: dict[int, _Capture] = {}  # stream ptr -> its capture (active or invalidated) until end_capture


class _Local(threading.local):
    """CuPy's current streams are per thread and per device (stream.pyx _ThreadLocal)."""

    def __init__(self):
        self.current: dict[int, Stream] = {}
        self.stacks: dict[int, list[Stream]] = {}
        self.entered: list[int] = []  # the device of each `with stream:` block, innermost last


_tls = _Local()
_handles = itertools.count(1)
_by_ptr: weakref.WeakValueDictionary[int, Stream] = weakref.WeakValueDictionary()


def reset() -> None:
    """Forget every capture and this thread's current streams (the stand-in's activation does)."""
    _captures.clear()
    _tls.current.clear()
    _tls.stacks.clear()
    _tls.entered.clear()


# ------------------------------------------------------------------ streams
def _device_of(stream: Stream) -> int:
    """CuPy's check_stream_device_match: the stream's device must be the current one."""
    cur = devices.machine().current
    if stream.device_id not in (-1, cur):
        raise RuntimeError(
            f"The device that the stream is created on ({stream.device_id}) does not match with the current device ({cur})"
        )
    return cur


def _stack(device: int) -> list:
    return _tls.stacks.setdefault(device, [Stream.null])


class Stream:
    """cupy.cuda.Stream (the methods of CuPy 14's _BaseStream and Stream; see the module docstring)."""

    __module__ = "cupy.cuda.stream"
    null: Stream
    ptds: Stream

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        if null:
            self.ptr, self.device_id = 0, -1
        elif ptds:
            self.ptr, self.device_id = STREAM_PER_THREAD, -1
        else:
            self.ptr, self.device_id = 0x7E5700000000 + 0x200 * next(_handles), devices.machine().current
            _by_ptr[self.ptr] = self
        self._non_blocking = bool(non_blocking) and not (null or ptds)  # cudaStreamNonBlocking
        self._priority = 0 if priority is None or null or ptds else int(priority)
        self._graph_host_funcargs = None

    def __eq__(self, other):
        return isinstance(other, Stream) and self.ptr == other.ptr

    def __hash__(self):
        return self.ptr

    def __repr__(self):
        return f"<{type(self).__name__} {self.ptr} (device {self.device_id})>"

    def __getattr__(self, name):
        from . import surface  # noqa: PLC0415

        if not name.startswith("_") and surface.has("cupy.cuda.Stream", name):
            raise _gap(f"cupy.cuda.Stream.{name} exists in CuPy but the stand-in does not simulate it")
        raise AttributeError(f"'Stream' object has no attribute {name!r}")

    # -------------------------------------------------------- current stream
    def __enter__(self):
        device = _device_of(self)
        _stack(device).append(self)
        _tls.entered.append(device)
        _tls.current[device] = self
        return self

    def __exit__(self, *args):
        device = _tls.entered.pop()
        stack = _stack(device)
        stack.pop()
        _tls.current[device] = stack[-1]

    def use(self):
        _tls.current[_device_of(self)] = self
        return self

    # -------------------------------------------------------- state
    @property
    def is_non_blocking(self):
        return self._non_blocking

    @property
    def priority(self):
        return self._priority

    @property
    def done(self):
        """cudaStreamQuery: the stand-in's work is always done; illegal on a capturing stream."""
        refuse_stream_sync(self)
        return True

    def synchronize(self):
        """cudaStreamSynchronize (a host sync); illegal on a capturing stream."""
        refuse_stream_sync(self)
        current().sync("Stream.synchronize")

    def record(self, event=None):
        if event is None:
            from .module import Event  # noqa: PLC0415

            event = Event()
        event.record(self)
        return event

    def wait_event(self, event):
        """cudaStreamWaitEvent: work is in order already; a wait on an event recorded by another
        stream's live capture would join that capture (a fork/join capture: not modelled)."""
        cap = getattr(event, "_capture", None)
        if cap is not None and not cap.ended and cap is not _captures.get(self.ptr):
            raise _gap(
                "a stream waiting on an event recorded in another stream's capture (a multi-stream capture) is not modelled"
            )

    def launch_host_func(self, callback, arg):
        """cudaLaunchHostFunc: ``callback(arg)`` once the stream's work is done (at once here); during
        capture, a host node that each replay runs (CuPy keeps (callback, arg) on the Graph)."""
        cap = target(self)
        if cap is None:
            callback(arg)
            return
        cap.record("host", None, lambda: callback(arg), launches=0)
        self._graph_host_funcargs.append((callback, arg))

    # -------------------------------------------------------- capture
    def begin_capture(self, mode=None):
        """cudaStreamBeginCapture, CuPy's way: the legacy stream is refused, the mode defaults to
        relaxed (so the memory pool may grow, i.e. cudaMalloc, during capture)."""
        if self.ptr in (0, STREAM_LEGACY):
            raise RuntimeError(LEGACY)
        mode = CAPTURE_MODE_RELAXED if mode is None else mode
        if mode not in (CAPTURE_MODE_GLOBAL, CAPTURE_MODE_THREAD_LOCAL, CAPTURE_MODE_RELAXED):
            raise cuda_error("cudaErrorInvalidValue")
        if mode != CAPTURE_MODE_RELAXED:
            raise _gap("only cudaStreamCaptureModeRelaxed (CuPy's default) is modelled")
        if self.ptr in _captures:
            raise cuda_error("cudaErrorIllegalState")  # already capturing
        _device_of(self)
        _captures[self.ptr] = _Capture(self, mode)
        self._graph_host_funcargs = []

    def end_capture(self):
        """cudaStreamEndCapture: the captured Graph; an invalidated capture ends with
        cudaErrorStreamCaptureInvalidated and no graph; a stream not capturing: cudaErrorIllegalState."""
        host_funcargs, self._graph_host_funcargs = self._graph_host_funcargs, None
        cap = _captures.pop(self.ptr, None)
        if cap is None:
            raise cuda_error("cudaErrorIllegalState")
        cap.ended = True
        if cap.invalid is not None:
            raise cuda_error("cudaErrorStreamCaptureInvalidated")
        return Graph._of(cap, host_funcargs)

    def is_capturing(self):
        """runtime.streamIsCapturing, as CuPy surfaces it (see :func:`query`)."""
        return query(self) is not None


Stream.null = Stream(null=True)
Stream.ptds = Stream(ptds=True)


def get_current_stream(device_id=-1):
    """cupy.cuda.get_current_stream: this thread's current stream of the device (default: the
    current device); the null stream until a ``with stream:`` or ``stream.use()``."""
    device = devices.machine().current if device_id in (None, -1) else int(device_id)
    return _tls.current.get(device, Stream.null)


def _resolve(stream) -> Stream | None:
    """``stream`` as a Stream: None is the current one, an int a handle (NCCL takes ``stream.ptr``);
    None for a handle the stand-in did not make."""
    if stream is None:
        return get_current_stream()
    if isinstance(stream, (int, np.integer)):
        return Stream.null if int(stream) == 0 else _by_ptr.get(int(stream))
    return stream


def _blocking_captures() -> list[_Capture]:
    """Live captures on this device's streams that synchronize with the legacy stream."""
    device = devices.machine().current
    return [c for c in _captures.values() if not c.stream._non_blocking and c.device == device]


# ------------------------------------------------------------------ what CUDA and CuPy refuse
def query(stream=None) -> _Capture | None:
    """cudaStreamIsCapturing as CuPy's runtime.streamIsCapturing surfaces it: the live capture of
    ``stream`` (default: the current stream) or None; an invalidated capture raises CuPy's
    RuntimeError; the legacy stream while a blocking stream captures raises
    cudaErrorStreamCaptureImplicit (documented not to invalidate the capture)."""
    if not _captures:
        return None
    s = _resolve(stream)
    if s is None:
        return None
    if s.ptr == 0:
        if _blocking_captures():
            raise cuda_error("cudaErrorStreamCaptureImplicit")
        return None
    cap = _captures.get(s.ptr)
    if cap is not None and cap.invalid is not None:
        raise RuntimeError(INVALIDATED)
    return cap


def target(stream=None) -> _Capture | None:
    """Where work issued on ``stream`` (a launch, an async copy or memset, an event record) goes:
    the stream's live capture, or None (it runs now). Work on an invalidated capture fails with
    cudaErrorStreamCaptureInvalidated; work on the legacy stream while a blocking stream captures
    fails with cudaErrorStreamCaptureImplicit and invalidates that capture."""
    if not _captures:
        return None
    s = _resolve(stream)
    if s is None:
        return None
    if s.ptr == 0:
        blocking = _blocking_captures()
        for c in blocking:
            c.invalidate("the legacy stream was used while it captured")
        if blocking:
            raise cuda_error("cudaErrorStreamCaptureImplicit")
        return None
    cap = _captures.get(s.ptr)
    if cap is not None and cap.invalid is not None:
        raise cuda_error("cudaErrorStreamCaptureInvalidated")
    return cap


def refuse_transfer(direction: str, stream=None) -> None:
    """CuPy's check before a host<->device copy on ``stream`` (default: the current one):
    MemoryPointer.copy_to_host_async ("D2H") / copy_from_host_async ("H2D") raise RuntimeError
    while it captures, before any CUDA call (the capture stays valid)."""
    if query(stream) is not None:
        raise RuntimeError(D2H if direction == "D2H" else H2D)


def refuse_cublas(dtype) -> None:
    """cuBLAS takes the current stream (cublas.pyx setStream), which refuses a capturing one.
    CuPy's matmul of integer arrays is its own kernel, not cuBLAS: not modelled under capture."""
    if query() is None:
        return
    if np.dtype(dtype).char in "efdFD":
        raise NotImplementedError(CUBLAS)
    raise _gap(f"a {np.dtype(dtype)} matmul during capture (CuPy's own kernel, not cuBLAS) is not modelled")


def refuse_stream_sync(stream) -> None:
    """cudaStreamSynchronize / cudaStreamQuery of ``stream``: refused on a capturing stream
    (cudaErrorStreamCaptureUnsupported, the capture invalidated; on an invalidated one,
    cudaErrorStreamCaptureInvalidated); the legacy stream while a blocking stream captures:
    cudaErrorStreamCaptureImplicit, invalidating it."""
    if not _captures:
        return
    if stream.ptr == 0:
        target(stream)
        return
    cap = _captures.get(stream.ptr)
    if cap is not None:
        already = cap.invalid is not None
        cap.invalidate("the capturing stream was synchronized or queried")
        raise cuda_error("cudaErrorStreamCaptureInvalidated" if already else "cudaErrorStreamCaptureUnsupported")


def refuse_device_sync() -> None:
    """cudaDeviceSynchronize while a stream of the device captures: cudaErrorStreamCaptureUnsupported,
    every such capture invalidated ("a broader handle which encompasses an active stream capture")."""
    device = devices.machine().current
    caps = [c for c in _captures.values() if c.device == device]
    for c in caps:
        c.invalidate("the device was synchronized")
    if caps:
        raise cuda_error("cudaErrorStreamCaptureUnsupported")


def refuse_event_query(cap: _Capture | None) -> None:
    """cudaEventQuery / cudaEventSynchronize / cudaEventElapsedTime of an event recorded in a live
    capture ("a captured event"): cudaErrorStreamCaptureUnsupported, the capture invalidated."""
    if cap is not None and not cap.ended:
        cap.invalidate("an event recorded in the capture was queried or synchronized")
        raise cuda_error("cudaErrorStreamCaptureUnsupported")


# ------------------------------------------------------------------ recording work
def poison(a: np.ndarray) -> np.ndarray:
    """Fill ``a`` with what marks a value nobody wrote: NaN, INT_POISON, True."""
    kind = a.dtype.kind
    if kind in "fc":
        a.fill(np.nan)
    elif kind in "iu":
        a.fill(np.array(INT_POISON, dtype=np.int64).astype(a.dtype))
    elif kind == "b":
        a.fill(True)
    return a


def capturing_here() -> _Capture | None:
    """The live capture of the current stream, if any (no error: for allocations, not work)."""
    if not _captures:
        return None
    cap = _captures.get(get_current_stream().ptr)
    return cap if cap is not None and cap.invalid is None else None


def fresh(a: np.ndarray) -> np.ndarray:
    """A newly allocated, unwritten buffer (``cupy.empty``): poisoned when made during capture."""
    return poison(a) if capturing_here() is not None else a


def note_allocation(nbytes: int, pool) -> None:
    """Count an allocation (its MemoryPool, or None) against the current stream's capture."""
    cap = capturing_here()
    if cap is not None:
        cap.allocations.append((int(nbytes), pool))


def _arrays(*trees) -> list[np.ndarray]:
    """The NumPy arrays among arguments (one level of lists, tuples and dict values)."""
    out = []
    for t in trees:
        for v in t.values() if isinstance(t, dict) else t:
            if isinstance(v, np.ndarray):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                out.extend(x for x in v if isinstance(x, np.ndarray))
    return out


def _is_view(result, inputs) -> bool:
    if isinstance(result, (tuple, list)):
        return bool(result) and all(_is_view(r, inputs) for r in result)
    return isinstance(result, np.ndarray) and result.base is not None and any(np.may_share_memory(result, x) for x in inputs)


def _blank(result):
    """A poisoned buffer shaped and typed as ``result`` (an array, a NumPy scalar, or a tuple)."""
    if isinstance(result, tuple):
        return tuple(_blank(r) for r in result)
    return poison(np.empty_like(np.asarray(result)))


def _store(out, value) -> None:
    if isinstance(out, tuple):
        for o, v in zip(out, value):
            o[...] = v
    else:
        out[...] = value


def launch(
    kind: str,
    fn: Callable[[], Any],
    *,
    inplace: bool = False,
    kernel: str | None = None,
    stream=None,
    inputs=(),
    probe: Callable[[], Any] | None = None,
    check: Callable[[], None] | None = None,
    meta: Callable[[], Any] | None = None,
):
    """Issue work of ``kind`` on ``stream`` (default: the current stream). Outside capture: count
    the launch and return ``fn()`` (under tests/standin/null.py's null compute: nothing for
    ``inplace`` work, ``meta()``, an unwritten result of ``fn``'s shape and dtype, for new arrays).
    Under capture nothing runs and nothing is written:

    * ``inplace`` (``fn`` writes existing buffers: ``out=``, ``a[k] = v``, ``fill``, a kernel): the
      node ``fn`` is recorded; returns None;
    * else ``fn`` computes a new array: it (or ``probe``, where values decide whether it can run:
      an index array) is evaluated now, on whatever the buffers hold, only for its shape and
      dtype; a poisoned buffer of that shape is returned and a node that recomputes ``fn`` into
      it is recorded. A result that is a view of ``inputs`` is no work: returned, node empty.

    ``check`` (an argument check the device would do at launch) runs before recording."""
    cap = target(stream) if _captures else None
    if cap is None:
        current().launch(kind, kernel)
        return null_mode.issued(kind, fn, inplace, meta, inputs) if null_mode.active() else fn()
    if check is not None:
        check()
    if inplace:
        cap.record(kind, kernel, fn)
        return None
    with np.errstate(all="ignore"):
        shaped = (meta if meta is not None and null_mode.active() else probe or fn)()
    if probe is None and _is_view(shaped, inputs):
        cap.record(kind, kernel, None)
        return shaped
    if not isinstance(shaped, (np.ndarray, np.generic, tuple)):
        return shaped  # host metadata (an int, a shape): no device work
    out = _blank(shaped)
    cap.record(kind, kernel, lambda: _store(out, fn()))
    return out


def stream_is_capturing(stream):
    """cupy.cuda.runtime.streamIsCapturing(stream ptr): see :func:`query`."""
    return query(int(stream)) is not None


# ------------------------------------------------------------------ graphs
_BOOKKEEPING = ("event", "host", "graph")  # nodes a replay runs under null compute (a child graph filters its own)


class Graph:
    """cupy.cuda.graph.Graph: made only by ``Stream.end_capture()``; ``launch(stream=None)``
    replays the recorded work on the given or the current stream (cudaGraphLaunch: one host
    launch, its nodes counted inside); ``upload`` (cudaGraphUpload) prepares it (nothing to do)."""

    __module__ = "cupy.cuda.graph"

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(NO_GRAPH)  # cupy/cuda/graph.pyx

    @classmethod
    def _of(cls, cap: _Capture, host_funcargs) -> Graph:
        g = object.__new__(cls)
        g.graph, g.graphExec = 0, 0x6A0000000000 + 0x100 * next(_handles)  # the instantiated exec's handle
        g.host_funcargs = host_funcargs
        g._nodes, g._allocations = tuple(cap.nodes), tuple(cap.allocations)
        g._inside = sum((n.inside for n in g._nodes), collections.Counter())
        return g

    def _run(self) -> None:
        skip = null_mode.active()  # null compute (tests/standin/null.py): only event and host nodes run
        for node in self._nodes:
            if node.run is not None and (not skip or node.kind in _BOOKKEEPING):
                node.run()

    def launch(self, stream=None):
        cap = target(stream)
        if cap is not None:  # a graph launched into a capture: a child-graph node
            cap.nodes.append(_Node("graph", None, self._run, self._inside))
            current().captured.update(self._inside)
            return
        current().graph_launch(self._inside)
        self._run()

    def upload(self, stream=None):
        target(stream)

    def debug_dot_str(self, flags=0):
        """cudaGraphDebugDotPrint's DOT text, in outline: one node per recorded piece of work."""
        lines = ["digraph cudaGraph {"]
        for i, n in enumerate(self._nodes):
            lines.append(f'  n{i} [label="{n.kind}{": " + n.name if n.name else ""}"];')
            if i:
                lines.append(f"  n{i - 1} -> n{i};")
        return "\n".join(lines + ["}"])


# ------------------------------------------------------------------ for tests (not CuPy's API)
def nodes(g: Graph) -> list[tuple[str, str | None]]:
    """The recorded work of graph ``g``, in order: (kind, our kernel's name or None)."""
    return [(n.kind, n.name) for n in g._nodes]


def allocations(g: Graph) -> list[tuple[int, Any]]:
    """The allocations made on the stream while ``g`` was captured: (bytes, MemoryPool or None)."""
    return list(g._allocations)


def kernels_inside(g: Graph) -> collections.Counter:
    """What one launch of ``g`` runs: kind -> count (what ``Counters.graph_kernels`` adds per launch)."""
    return collections.Counter(g._inside)


__all__ = [
    "Stream",
    "Graph",
    "get_current_stream",
    "launch",
    "query",
    "target",
    "refuse_transfer",
    "refuse_cublas",
    "refuse_stream_sync",
    "refuse_device_sync",
    "refuse_event_query",
    "fresh",
    "poison",
    "note_allocation",
    "nodes",
    "allocations",
    "kernels_inside",
    "stream_is_capturing",
    "cuda_error",
    "reset",
    "INT_POISON",
    "D2H",
    "H2D",
    "INVALIDATED",
    "CUBLAS",
    "LEGACY",
]
