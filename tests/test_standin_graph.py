"""Streams, stream capture and CUDA graphs in the CuPy stand-in (tests/standin/graph.py) and its
memory pools (tests/standin/memory.py), checked against what CuPy 14 and CUDA do: capture records
work without running it, Graph.launch replays it on the same buffers, and what CuPy or CUDA
refuses during capture refuses here with their errors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

standin = pytest.importorskip("standin", reason="tests/standin needs the cupy package installed")
from standin import counting, surface  # noqa: E402
from standin import graph as sgraph  # noqa: E402
from standin import memory as smemory  # noqa: E402
from standin.array import StandinGap  # noqa: E402
from standin.devices import CUDARuntimeError  # noqa: E402

F32 = np.float32


def _capture(cp, stream, body):
    """``body()`` captured on ``stream`` (made current): (the Graph, what body returned)."""
    with stream:
        stream.begin_capture()
        out = body()
        return stream.end_capture(), out


def _dev(cp, values, dtype=F32):
    return cp.asarray(np.asarray(values, dtype=dtype))


# ======================================================================== the API, as CuPy has it
@pytest.mark.parametrize(
    "cls, path",
    [(sgraph.Stream, "cupy.cuda.Stream"), (sgraph.Graph, "cupy.cuda.graph.Graph"), (smemory.MemoryPool, "cupy.cuda.MemoryPool")],
)
def test_standin_graph_classes_have_cupys_names_and_parameters(cls, path):
    """Every public method of the stand-in's Stream, Graph and MemoryPool exists in the installed
    CuPy and takes the same parameters (names, in order)."""
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__enter__", "__exit__"):
            continue
        assert surface.has(path, name), f"{path}.{name}: the installed CuPy lacks it"
        if not inspect.isfunction(member) or (name == "__init__" and cls is not sgraph.Stream):
            continue  # a property, or a constructor CuPy's compiled class does not describe
        real = surface.signature(path, name)
        ours = list(inspect.signature(member).parameters)
        assert real is not None and ours == list(real.parameters), f"{path}.{name}{real} vs ours {ours}"


def test_standin_graph_streams_and_the_current_stream(standin):
    cp = standin
    null = cp.cuda.get_current_stream()
    assert null is cp.cuda.Stream.null and null.ptr == 0 and cp.cuda.Stream.ptds.ptr == 2
    s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(priority=-1)
    assert s1.ptr and s2.ptr and s1.ptr != s2.ptr and s1 != s2 and s1.is_non_blocking and not s2.is_non_blocking
    assert s2.priority == -1 and s1.device_id == 0 and cp.cuda.Stream(null=True) == null
    with s1:
        assert cp.cuda.get_current_stream() is s1
        with s2:
            assert cp.cuda.get_current_stream() is s2
        assert cp.cuda.get_current_stream() is s1
    assert cp.cuda.get_current_stream() is null
    s2.use()
    assert cp.cuda.get_current_stream() is s2
    null.use()
    assert not s1.is_capturing() and s1.done
    with pytest.raises(StandinGap, match="add_callback"):
        s1.add_callback(print, None)  # CuPy has it, the stand-in does not simulate it


def test_standin_graph_a_stream_belongs_to_its_device(standin):
    cp = standin
    from standin import devices  # noqa: PLC0415

    with devices.visible(0, 1):
        s = cp.cuda.Stream()
        with cp.cuda.Device(1):
            with pytest.raises(RuntimeError, match=r"created on \(0\) does not match with the current device \(1\)"):
                with s:
                    pass
            assert cp.cuda.get_current_stream().ptr == 0


# ======================================================================== capture and replay
def test_standin_graph_replay_recomputes_elementwise_and_kernel_work_from_new_inputs(standin):
    """Captured, the work runs at no point of the capture; each launch replays it on the same
    buffers: new values written into the static inputs (a device copy, outside capture) give
    what the eager ops give on them."""
    cp = standin
    from cnn_gpu.cuda import ops  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x, dy = _dev(cp, rng.standard_normal(64)), _dev(cp, rng.standard_normal(64))

    def step():
        y = cp.tanh(x * 2 - 0.5)
        dx = ops.relu_backward(dy, y)  # our kernel, writing a buffer made during capture
        return y, dx, (dx * dx).sum()

    stream = cp.cuda.Stream(non_blocking=True)
    g, (y, dx, loss) = _capture(cp, stream, step)
    assert [k for k, _ in sgraph.nodes(g)].count("kernel") == 1
    for _ in range(3):
        new_x, new_dy = rng.standard_normal(64).astype(F32), rng.standard_normal(64).astype(F32)
        x[...], dy[...] = cp.asarray(new_x), cp.asarray(new_dy)
        g.launch(stream)
        stream.synchronize()
        eager_y = np.tanh(new_x * 2 - F32(0.5))
        eager_dx = new_dy * (eager_y > 0)
        np.testing.assert_array_equal(y.get(), eager_y)
        np.testing.assert_array_equal(dx.get(), eager_dx)
        assert float(loss) == pytest.approx(float((eager_dx * eager_dx).sum()), rel=1e-6)


def test_standin_graph_capture_writes_nothing_and_new_arrays_are_poisoned(standin):
    """At capture nothing runs: in-place work (out=, +=, a[k] = v, fill, a kernel writing its
    arguments) leaves memory as it was; an array made during capture holds poison (NaN, the int
    poison) until the first launch, so a read of a capture-time value shows."""
    cp = standin
    from cnn_gpu.cuda import build  # noqa: PLC0415

    a, b = _dev(cp, [1, 2, 3, 4]), _dev(cp, [10, 20, 30, 40])
    probe_out = cp.zeros(8, dtype=np.int64)
    stream = cp.cuda.Stream(non_blocking=True)

    def body():
        a[...] += 1
        cp.multiply(a, 2, out=b)
        b[1:3] = a[:2]
        idx = a.argmax()
        a.fill(9)
        build.get_function("probe", "cnn_probe")((1,), (8,), (probe_out, np.int64(8)))
        return cp.zeros(4, F32), idx, cp.empty((2,), np.int32), b + a

    g, (zeros, idx, empty, total) = _capture(cp, stream, body)
    np.testing.assert_array_equal(a.get(), [1, 2, 3, 4])
    np.testing.assert_array_equal(b.get(), [10, 20, 30, 40])
    np.testing.assert_array_equal(probe_out.get(), np.zeros(8))
    assert np.isnan(zeros.get()).all() and np.isnan(total.get()).all()
    assert int(idx) == sgraph.INT_POISON and (empty.get() == sgraph.INT_POISON).all()
    g.launch(stream)
    np.testing.assert_array_equal(a.get(), [9, 9, 9, 9])
    np.testing.assert_array_equal(b.get(), [4, 2, 3, 10])  # b = 2 * (a + 1), then b[1:3] = (a + 1)[:2]
    np.testing.assert_array_equal(probe_out.get(), 3 * np.arange(8) + 1)
    np.testing.assert_array_equal(zeros.get(), 0)
    np.testing.assert_array_equal(total.get(), [13, 11, 12, 19])
    assert int(idx) == 3  # argmax of a + 1 = [2, 3, 4, 5], as the replay computed it


def test_standin_graph_host_scalars_are_frozen_at_capture(standin):
    """A Python scalar passed during capture is baked into the graph: replays ignore later
    changes of the variable; a device scalar (an array) is read at each replay."""
    cp = standin
    w, grad = _dev(cp, [1.0, 1.0]), _dev(cp, [1.0, 2.0])
    lr_host, lr_dev = 0.5, _dev(cp, 0.25)
    stream = cp.cuda.Stream(non_blocking=True)

    def body():
        w[...] -= lr_host * grad
        w[...] -= lr_dev * grad

    g, _ = _capture(cp, stream, body)
    lr_host = 100.0  # noqa: F841  (what a replay must not see)
    lr_dev[...] = cp.asarray(np.float32(0.0))
    g.launch(stream)
    np.testing.assert_allclose(w.get(), [0.5, 0.0])
    g.launch(stream)
    np.testing.assert_allclose(w.get(), [0.0, -1.0])


def test_standin_graph_gather_by_indices_made_during_capture(standin):
    """Index arrays computed during capture hold poison at capture: the gather still gets its
    shape, and the replay gathers by the replayed indices."""
    cp = standin
    logits = _dev(cp, np.zeros((4, 3)))
    stream = cp.cuda.Stream(non_blocking=True)
    g, picked = _capture(cp, stream, lambda: logits[cp.arange(4), logits.argmax(axis=1)])
    logits[...] = _dev(cp, [[0, 5, 1], [7, 0, 0], [0, 1, 9], [2, 0, 1]])
    g.launch(stream)
    np.testing.assert_array_equal(picked.get(), [5, 7, 9, 2])


def test_standin_graph_random_draws_are_redrawn_by_each_replay(standin):
    """cupy.random.Generator keeps its state on the device: a captured draw is a kernel that
    advances it, so each replay draws new numbers into the same buffer."""
    cp = standin
    rng = cp.random.default_rng(0)
    stream = cp.cuda.Stream(non_blocking=True)
    g, u = _capture(cp, stream, lambda: rng.random((16,), dtype=F32))
    assert np.isnan(u.get()).all() and sgraph.kernels_inside(g) == {"curand": 1}
    g.launch(stream)
    first = u.get()
    g.launch(stream)
    assert ((first >= 0) & (first < 1)).all() and not np.array_equal(first, u.get())


def test_standin_graph_launch_on_any_stream_and_counts_one_launch_with_its_kernels(standin):
    """A graph launches on the given stream, else the current one; each launch is one host launch
    (kind "graph") that runs K launches inside (``graph_kernels``), counted apart, and capture
    itself launches nothing: K is what the eager work launches."""
    cp = standin
    x = _dev(cp, np.arange(6))

    def step():
        y = x * 2 + 1
        y[...] = cp.maximum(y, 3)
        return y.sum()

    with counting() as eager:
        step()
    stream = cp.cuda.Stream(non_blocking=True)
    with counting() as at_capture:
        g, total = _capture(cp, stream, step)
    assert at_capture.total_launches == 0 and at_capture.captured == eager.launches
    assert sgraph.kernels_inside(g) == eager.launches
    other = cp.cuda.Stream()
    with counting() as c:
        g.launch(other)
        with other:
            g.launch()
        g.upload()
    assert c.launches == {"graph": 2} and c.total_launches == 2 and c.total_syncs == 0
    assert c.total_graph_kernels == 2 * eager.total_launches and c.kernels == {}
    assert float(total) == 3 + 3 + 5 + 7 + 9 + 11  # max(2x + 1, 3) summed over x = 0..5


def test_standin_graph_records_nccl_collectives_events_and_host_functions(standin):
    """NCCL collectives, event records and host functions on the capturing stream are graph
    nodes: called once at capture (NCCL logs the call), run at each replay."""
    cp = standin
    nccl = cp.cuda.nccl
    comm = nccl.NcclCommunicator(2, nccl.get_unique_id(), 0)
    grad = _dev(cp, [1.0, 2.0])
    start, end = cp.cuda.Event(), cp.cuda.Event()
    calls = []
    stream = cp.cuda.Stream(non_blocking=True)
    nccl.log.clear()

    def body():
        start.record()
        comm.allReduce(grad.data.ptr, grad.data.ptr, grad.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
        stream.launch_host_func(calls.append, "replayed")
        end.record(stream)

    g, _ = _capture(cp, stream, body)
    assert [e[0] for e in nccl.log] == ["allReduce"] and grad.get().tolist() == [1.0, 2.0] and calls == []
    assert start.recorded_on == stream.ptr and g.host_funcargs == [(calls.append, "replayed")]
    assert [k for k, _ in sgraph.nodes(g)] == ["event", "nccl", "host", "event"]
    assert sgraph.kernels_inside(g) == {"nccl": 1}
    for _ in range(2):
        g.launch(stream)
    assert grad.get().tolist() == [4.0, 8.0] and calls == ["replayed", "replayed"]
    assert start.done and cp.cuda.get_elapsed_time(start, end) >= 0
    assert len(nccl.log) == 1  # a replay is not an API call


# ======================================================================== what capture refuses
def test_standin_graph_capture_on_the_legacy_stream_fails(standin):
    cp = standin
    for s in (cp.cuda.Stream.null, cp.cuda.Stream(null=True), cp.cuda.get_current_stream()):
        with pytest.raises(RuntimeError, match=r"cannot capture on the default \(legacy\) stream"):
            s.begin_capture()
    assert not cp.cuda.Stream.null.is_capturing()


def test_standin_graph_capture_protocol_errors(standin):
    cp = standin
    s = cp.cuda.Stream(non_blocking=True)
    with pytest.raises(CUDARuntimeError, match="cudaErrorIllegalState"):
        s.end_capture()  # not capturing
    s.begin_capture()
    with pytest.raises(CUDARuntimeError, match="cudaErrorIllegalState"):
        s.begin_capture()  # already capturing
    assert s.is_capturing() and cp.cuda.runtime.streamIsCapturing(s.ptr)
    g = s.end_capture()
    assert isinstance(g, cp.cuda.graph.Graph) and sgraph.nodes(g) == [] and not s.is_capturing()
    with pytest.raises(NotImplementedError, match="must be created via stream capture"):
        cp.cuda.graph.Graph()
    with pytest.raises(StandinGap, match="Relaxed"):
        s.begin_capture(cp.cuda.runtime.streamCaptureModeGlobal)


def test_standin_graph_messages_are_cupys():
    """The texts CuPy 14 raises (cupy/cuda/memory.pyx, cupy_backends/cuda/libs/cublas.pyx,
    cupy/cuda/stream.pyx, cupy_backends/cuda/api/runtime.pyx), word for word."""
    assert sgraph.D2H == "the current stream is capturing, so D2H transfers are disallowed"
    assert sgraph.H2D == "the current stream is capturing, so H2D transfers are disallowed"
    assert sgraph.CUBLAS == "calling cuBLAS API during stream capture is currently unsupported"
    assert sgraph.LEGACY == "cannot capture on the default (legacy) stream"
    assert sgraph.INVALIDATED == "the stream was capturing, but an error has invalidated the capture sequence"


def test_standin_graph_transfers_refuse_with_cupys_messages_and_leave_the_capture_valid(standin):
    """CuPy checks the stream before each host<->device copy (memory.pyx) and raises
    RuntimeError before calling CUDA, so the capture goes on and ends with a graph. No sync or
    upload is counted: none happened."""
    cp = standin
    a, host = _dev(cp, [1.0, 0.0, 2.0]), np.ones(3, F32)
    d2h = [
        lambda: float(a.sum()),
        a.get,
        lambda: a[0].item(),
        lambda: bool(a[0]),
        lambda: int(a[0]),
        a.tolist,
        lambda: repr(a),
        lambda: a[a > 0],
        lambda: cp.asnumpy(a),
        lambda: cp.nonzero(a),
    ]
    h2d = [
        lambda: cp.asarray(host),
        lambda: a.set(host),
        lambda: a.__setitem__(slice(None), host),
        lambda: a[np.array([0, 1])],
        lambda: cp.asarray(0.5),
    ]
    stream = cp.cuda.Stream(non_blocking=True)
    with counting() as c, stream:
        stream.begin_capture()
        for fn in d2h:
            with pytest.raises(RuntimeError, match=f"^{sgraph.D2H}$"):
                fn()
        for fn in h2d:
            with pytest.raises(RuntimeError, match=f"^{sgraph.H2D}$"):
                fn()
        b = a * 3
        g = stream.end_capture()
    assert c.total_syncs == 0 and c.uploads == 0
    g.launch(stream)
    assert b.get().tolist() == [3.0, 0.0, 6.0]
    assert a.get(stream=cp.cuda.Stream.null).tolist() == [1.0, 0.0, 2.0]  # no capture, no refusal


def test_standin_graph_cublas_refuses_during_capture(standin):
    """CuPy's cuBLAS wrappers put the handle on the current stream first (cublas.pyx setStream),
    which refuses a capturing one: cupy.cublas.gemm, cupy.matmul, cupy.dot and @ on float arrays."""
    cp = standin
    a, b = _dev(cp, np.eye(2)), _dev(cp, np.ones((2, 2)))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for fn in (
            lambda: cp.cublas.gemm("N", "N", a, b),
            lambda: cp.matmul(a, b),
            lambda: cp.dot(a, b),
            lambda: a @ b,
            lambda: a.dot(b),
        ):
            with pytest.raises(NotImplementedError, match="^calling cuBLAS API during stream capture is currently unsupported$"):
                fn()
        g = stream.end_capture()
    assert sgraph.nodes(g) == []
    assert (a @ b).get().tolist() == [[1, 1], [1, 1]]  # outside capture: runs


def test_standin_graph_records_gemms_of_cnn_gpus_own_cublas_handle(standin):
    """cuBLAS itself can be captured: a GEMM through cnn_gpu's ctypes handle (the stand-in's fake
    libcublas) on the capturing stream is recorded, beta and alpha by value, and runs per replay."""
    cp = standin
    from cnn_gpu.cuda import cublas  # noqa: PLC0415

    handle, why = cublas.get_handle()
    assert handle is not None, why
    a, b, out = _dev(cp, [[1, 2], [3, 4]]), _dev(cp, np.eye(2)), _dev(cp, np.zeros((2, 2)))
    stream = cp.cuda.Stream(non_blocking=True)
    g, _ = _capture(cp, stream, lambda: handle.gemm(a, b, out, beta=1.0))
    assert out.get().tolist() == [[0, 0], [0, 0]] and sgraph.kernels_inside(g) == {"cublas": 1}
    g.launch(stream)
    g.launch(stream)
    assert out.get().tolist() == [[2, 4], [6, 8]]  # out += a @ b, twice


@pytest.mark.parametrize("sync", ["device", "runtime", "stream", "stream.done", "event", "event.done"])
def test_standin_graph_a_sync_invalidates_the_capture(standin, sync):
    """A CUDA synchronization covering the capture is refused (cudaErrorStreamCaptureUnsupported)
    and invalidates it: later work on the stream fails (cudaErrorStreamCaptureInvalidated), CuPy's
    own checks raise its RuntimeError, and end_capture fails, taking the stream out of capture."""
    cp = standin
    a = _dev(cp, [1.0, 2.0])
    stream = cp.cuda.Stream(non_blocking=True)
    event = cp.cuda.Event()
    do = {
        "device": lambda: cp.cuda.Device().synchronize(),
        "runtime": cp.cuda.runtime.deviceSynchronize,
        "stream": stream.synchronize,
        "stream.done": lambda: stream.done,
        "event": event.synchronize,
        "event.done": lambda: event.done,
    }[sync]
    with counting() as c, stream:
        stream.begin_capture()
        event.record()
        with pytest.raises(
            CUDARuntimeError, match="^cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing$"
        ):
            do()
        with pytest.raises(
            CUDARuntimeError, match="^cudaErrorStreamCaptureInvalidated: operation failed due to a previous error during capture$"
        ):
            a + 1
        with pytest.raises(RuntimeError, match="^the stream was capturing, but an error has invalidated the capture sequence$"):
            a.get()
        with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated") as err:
            stream.end_capture()
        assert err.value.status == 901
        assert not stream.is_capturing()
        assert (a + 1).get().tolist() == [2.0, 3.0]  # the stream works again, eagerly
    assert c.total_syncs == 1  # the last get


def test_standin_graph_blocking_capture_stream_and_the_legacy_stream(standin):
    """Work on the legacy stream while a stream created without non_blocking=True captures fails
    (cudaErrorStreamCaptureImplicit) and invalidates the capture; with non_blocking=True it runs
    at once, outside the graph."""
    cp = standin
    a = _dev(cp, [1.0])
    blocking = cp.cuda.Stream()
    blocking.begin_capture()  # not current: the work below is on the legacy stream
    with pytest.raises(
        CUDARuntimeError,
        match="^cudaErrorStreamCaptureImplicit: operation would make the legacy stream depend on a capturing blocking stream$",
    ):
        a * 2
    with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated"):
        blocking.end_capture()
    free = cp.cuda.Stream(non_blocking=True)
    free.begin_capture()
    b = a * 2  # the legacy stream: runs now
    g = free.end_capture()
    assert b.get().tolist() == [2.0] and sgraph.nodes(g) == []


# ======================================================================== memory pools
def test_standin_graph_buffers_come_from_the_private_pool_and_keep_their_addresses(standin):
    """Allocations inside ``using_allocator(pool.malloc)`` are charged to that pool (CuPy calls
    the allocator for each array), capture included; a replay allocates nothing and writes the
    same addresses."""
    cp = standin
    x = _dev(cp, np.arange(100))
    assert smemory.pool_of(x) is None  # the default allocator
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc):
        assert cp.cuda.get_allocator() == pool.malloc
        with pytest.raises(ValueError, match="inside `using_allocator`"):
            cp.cuda.set_allocator(pool.malloc)
        g, (y, z) = _capture(cp, stream, lambda: (x * 2, (x + 1).sum()))
    assert smemory.pool_of(y) is pool and smemory.pool_of(z) is pool and smemory.pool_of(y[10:]) is pool
    allocs = sgraph.allocations(g)
    assert len(allocs) == 3 and all(p is pool for _, p in allocs)  # x * 2, x + 1, the sum
    assert pool.used_bytes() == pool.total_bytes() == 3 * 512 and pool.n_free_blocks() == 0
    addresses = (y.data.ptr, z.data.ptr)
    with counting() as c:
        for _ in range(3):
            g.launch(stream)
    assert c.allocations == 0 and (y.data.ptr, z.data.ptr) == addresses
    assert y.get().tolist() == list(range(0, 200, 2)) and float(z) == 5050


def test_standin_graph_memory_pool_blocks(standin):
    """MemoryPool as memory.pyx: requests rounded to 512 bytes, freed blocks kept for reuse
    (split when larger), released by free_all_blocks; a limit refuses with CuPy's error."""
    cp = standin
    pool = cp.cuda.MemoryPool()
    p = pool.malloc(1000)
    assert p.ptr and p.mem.size == 1024 and pool.used_bytes() == 1024 and pool.total_bytes() == 1024
    del p
    assert pool.used_bytes() == 0 and pool.free_bytes() == 1024 and pool.n_free_blocks() == 1
    with cp.cuda.using_allocator(pool.malloc):
        a = cp.zeros(100, F32)  # 400 bytes: one 512-byte piece of the free block
    assert pool.total_bytes() == 1024 and pool.used_bytes() == 512 and smemory.pool_of(a) is pool
    del a
    pool.free_all_blocks()
    assert pool.total_bytes() == pool.used_bytes() == 0 and pool.n_free_blocks() == 0
    pool.set_limit(size=1024)
    keep = pool.malloc(1024)
    with pytest.raises(MemoryError, match=r"Out of memory allocating 512 bytes .*limit set to: 1,024 bytes"):
        pool.malloc(1)
    assert pool.get_limit() == 1024 and keep.mem.size == 1024
    with cp.cuda.using_allocator():  # None: the raw allocator, no pool
        assert smemory.pool_of(cp.ones(3)) is None
