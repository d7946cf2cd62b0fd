"""Data-parallel training over processes, GPUs and machines, on MPI (mpi4py) and NCCL (CuPy).

Every rank holds the whole model and trains on its shard of each global batch; after backward the
gradients are averaged over the ranks with ONE allreduce per flat gradient buffer (the optimizer
packs each backend/dtype group into one, see cnn_gpu.optim), then each rank runs the same update,
so the weights stay identical without ever being sent again::

    comm = cnn_gpu.distributed.init()             # under mpiexec: MPI; alone: size 1, does nothing
    model = ...; broadcast_parameters(model, comm)
    opt = DistributedOptimizer(SGD(model, 0.1), comm)
    loader = ShardedLoader(x, y, 256, comm, shuffle=True, seed=0)   # 256: the global batch

Engines: NumPy arrays travel through MPI (mpi4py, non-blocking calls polled against a deadline,
``CNN_GPU_TIMEOUT_S``, after which every rank is aborted with a message); CuPy arrays through NCCL
(``cupy.cuda.nccl``: the unique id is broadcast over MPI, each rank uses GPU ``local_rank``,
collectives run on the current stream). Host scalars (metrics, the stop vote) go through MPI.

Rules: BatchNorm statistics stay per rank (each normalises its own shard; running statistics
are not averaged); a final global batch smaller than the number of ranks is dropped so that no
rank gets an empty batch. See docs/DISTRIBUTED.md for the cost model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import config
from .backend import is_cupy_array
from .callbacks import Evaluate, StopRequest
from .data.loader import DataLoader
from .optim import Optimizer
from .train import Callback, Position, evaluate

# Variables the common launchers set in every rank: MPICH/Hydra (PMI_*), Open MPI, PMIx, MVAPICH.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_OPS = ("sum", "mean")


class DistributedError(RuntimeError):
    """A data-parallel setup that cannot work (mpi4py missing under mpiexec, too few GPUs, ...)."""


def launched_size(environ: Mapping[str, str] | None = None) -> int:
    """How many ranks the launcher started (1 without one), from its environment variables."""
    env = os.environ if environ is None else environ
    for var in _LAUNCHER_SIZE_VARS:
        text = env.get(var)
        if text and text.strip().isdigit():
            return int(text)
    return 1


def _check_array(array: Any, what: str) -> None:
    if not (isinstance(array, np.ndarray) or is_cupy_array(array)):
        raise TypeError(f"{what}: expected a NumPy or CuPy array, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ValueError(
            f"{what}: expected a C-contiguous array (the collective works in place), got one with strides {array.strides}"
        )


def _check_op(array: Any, op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"op: expected one of {_OPS}, got {op!r}")
    if op == "mean" and array.dtype.kind != "f":
        raise TypeError(f"array: op='mean' expects a floating-point array, got dtype {array.dtype}")


class Communicator:
    """One process: ``rank`` 0 of ``size`` 1. Every collective is the identity (after checking its
    arguments), so a script written for several ranks runs unchanged alone."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_lead(self) -> bool:
        return self.rank == 0

    def allreduce_(self, array: Any, op: str = "sum") -> Any:
        """Reduce ``array`` over the ranks in place ("sum" or "mean"); -> the array."""
        _check_array(array, "array")
        _check_op(array, op)
        return array

    def broadcast_(self, array: Any, root: int = 0) -> Any:
        """Overwrite ``array`` on every rank with root's; -> the array."""
        _check_array(array, "array")
        self._check_root(root)
        return array

    def barrier(self, timeout_s: float | None = None) -> None:
        """Wait until every rank is here (at most ``timeout_s``, default CNN_GPU_TIMEOUT_S)."""

    def sum_host(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks of a few host numbers (metrics, votes)."""
        return [float(v) for v in values]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on one of them."""
        return self.sum_host([1.0 if flag else 0.0])[0] > 0

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        self._check_root(root)
        return obj

    def abort(self, code: int, message: str) -> None:
        """End this process with ``message`` on stderr (every rank, under MPI)."""
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)

    device: int | None = None  # the CuPy device this rank uses (None: CPU only, or alone)
    device_error: str = ""  # why selecting this rank's GPU failed ("" when it did not)

    def select_device(self) -> int | None:
        """Alone: nothing (CuPy's current device, GPU 0 of those visible). Under several ranks:
        make GPU ``local_rank % visible GPUs`` current; -> its index, or None without a GPU."""
        return None

    def require_device(self) -> None:
        """Raise DistributedError when this rank's GPU could not be selected (at init)."""
        if self.device_error:
            raise DistributedError(self.device_error)

    def _check_root(self, root: int) -> None:
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root: expected a rank in [0, {self.size - 1}], got {root!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


def _wait(request: Any, comm: MPICommunicator, what: str, timeout_s: float | None = None) -> None:
    """Poll a non-blocking MPI request until it completes; past the deadline (``timeout_s``, by
    default CNN_GPU_TIMEOUT_S), abort every rank."""
    timeout_s = comm.timeout_s if timeout_s is None else timeout_s
    start, pause = time.monotonic(), 0.0
    while not request.Test():
        waited = time.monotonic() - start
        if waited < 2e-4:
            continue  # spin: a collective between healthy ranks usually completes here
        if waited < 5e-3:
            time.sleep(0)  # yield the core (the peer may share it) but come back at once
        else:  # a long wait (a slow peer, or a dead one): sleep up to 1 ms between polls
            pause = min(1e-3, max(pause * 2, 2e-5))
            time.sleep(pause)
        if waited > timeout_s:
            comm.abort(
                1,
                f"cnn_gpu.distributed: rank {comm.rank} of {comm.size}: {what} did not complete within "
                f"{timeout_s:g} s (CNN_GPU_TIMEOUT_S); another rank died or hangs; aborting every rank",
            )


class MPICommunicator(Communicator):
    """Ranks started by mpiexec/mpirun: MPI (mpi4py) for NumPy arrays and host values, NCCL for CuPy arrays."""

    def __init__(self, MPI: Any, comm: Any = None, timeout_s: float | None = None):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)  # the ranks on this machine
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.timeout_s = config.get().timeout_s if timeout_s is None else float(timeout_s)
        self.host = MPI.Get_processor_name()
        self._nccl: NcclChannel | None = None

    def allreduce_(self, array: Any, op: str = "sum") -> Any:
        _check_array(array, "array")
        _check_op(array, op)
        if is_cupy_array(array):
            return self.nccl().allreduce_(array, op)
        _wait(
            self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM),
            self,
            f"allreduce of {array.size} {array.dtype} values",
        )
        if op == "mean":
            array *= array.dtype.type(1.0 / self.size)
        return array

    def broadcast_(self, array: Any, root: int = 0) -> Any:
        _check_array(array, "array")
        self._check_root(root)
        if is_cupy_array(array):
            return self.nccl().broadcast_(array, root)
        _wait(self.comm.Ibcast(array, root=root), self, f"broadcast of {array.size} {array.dtype} values")
        return array

    def barrier(self, timeout_s: float | None = None) -> None:
        _wait(self.comm.Ibarrier(), self, "barrier", timeout_s)

    def sum_host(self, values: list[float]) -> list[float]:
        buf = np.asarray(values, dtype=np.float64)
        _wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), self, "allreduce of host values")
        return [float(v) for v in buf]

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        self._check_root(root)
        return self.comm.bcast(obj, root=root)  # startup only (blocking: mpi4py's object ibcast needs a size)

    def abort(self, code: int, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        time.sleep(0.3)  # let the launcher forward the message before MPI_Abort tears the job down
        self.comm.Abort(int(code))

    def select_device(self) -> int | None:
        """Make this rank's GPU the current CuPy device (cudaSetDevice), before anything touches a
        GPU: GPU ``local_rank % visible`` of those this rank sees (device_for). -> its index, or None
        when CuPy sees no GPU (a CPU run). A failure (a GPU in exclusive-process mode taken by
        another rank, say) is kept in ``device_error`` and raised when a GPU is needed."""
        if self.device is not None or self.device_error:
            return self.device
        count = visible_gpus()
        if not count:
            return None
        try:
            import cupy  # noqa: PLC0415  (visible_gpus imported it)

            device = device_for(self.local_rank, count)
            cupy.cuda.Device(device).use()
        except Exception as exc:  # cudaErrorDevicesUnavailable, ...
            self.device_error = (
                f"rank {self.rank} (local rank {self.local_rank} of {self.local_size}) could not "
                f"select GPU {self.local_rank % count} of the {count} it sees "
                f"({type(exc).__name__}: {exc})"
            )
            return None
        self.device = device
        return device

    def _gpu_of_every_rank(self) -> None:
        """Before the NCCL communicator: every rank's GPU as (host, PCI bus id), or why it has none,
        gathered (so every rank raises the same error instead of some waiting in NCCL's init)."""
        import cupy  # noqa: PLC0415

        mine: str | tuple[Any, Any]  # why this rank has no GPU, or (host, the GPU's PCI bus id)
        if self.select_device() is None:
            mine = self.device_error or f"rank {self.rank}: CuPy arrays need a GPU on every rank; CuPy sees none"
        else:
            mine = (self.host, cupy.cuda.Device(self.device).pci_bus_id)
        check_one_gpu_per_rank(self.allgather_object(mine))

    def allgather_object(self, obj: Any) -> list:
        return self.comm.allgather(obj)  # startup only (blocking)

    def nccl(self) -> NcclChannel:
        """The NCCL communicator, created on first use (collectively: every rank's first CuPy collective)."""
        if self._nccl is None:
            import cupy  # noqa: PLC0415
            from cupy.cuda import nccl  # noqa: PLC0415

            if not getattr(nccl, "available", True):
                raise DistributedError(
                    "CuPy arrays need NCCL, which CuPy could not load: pip install -e '.[cuda12-mpi]' "
                    "(or '.[cuda13-mpi]'; NCCL alone: nvidia-nccl-cu12 / nvidia-nccl-cu13)"
                )
            self._gpu_of_every_rank()
            self._nccl = NcclChannel(self, nccl, cupy.cuda)
        return self._nccl


class NcclChannel:
    """NCCL collectives on CuPy arrays, in place, on the current stream (no host sync).

    Before each collective the previous one's completion event is checked (a query, not a wait);
    only when it is still running is it polled against the deadline, so a dead peer ends every
    rank (ncclCommAbort, then MPI_Abort) instead of hanging the stream. The host may thus run at
    most one collective ahead of the device."""

    def __init__(self, comm: MPICommunicator, nccl: Any, cuda: Any):
        self.owner, self.nccl, self.cuda = comm, nccl, cuda
        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.broadcast_object(uid, root=0)  # the NCCL unique id travels over MPI
        self.comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        self.types = {
            np.dtype(np.float16): nccl.NCCL_FLOAT16,
            np.dtype(np.float32): nccl.NCCL_FLOAT32,
            np.dtype(np.float64): nccl.NCCL_FLOAT64,
            np.dtype(np.int32): nccl.NCCL_INT32,
            np.dtype(np.int64): nccl.NCCL_INT64,
        }
        self.last_event: Any = None  # the cupy.cuda.Event after the last collective

    def _dtype(self, array: Any) -> int:
        if np.dtype(array.dtype) not in self.types:
            raise TypeError(f"array: NCCL collectives take {sorted(str(t) for t in self.types)}, got {array.dtype}")
        return self.types[np.dtype(array.dtype)]

    def _before(self, what: str) -> Any:
        stream = self.cuda.get_current_stream()
        if _capturing(stream):  # inside a CUDA graph being captured: the collective becomes a graph node;
            return stream  # querying an event there would invalidate the capture (see _capturing)
        event = self.last_event
        if event is not None and not event.done:
            deadline = time.monotonic() + self.owner.timeout_s
            while not event.done:
                if time.monotonic() > deadline:
                    self.comm.abort()
                    self.owner.abort(
                        1,
                        f"cnn_gpu.distributed: rank {self.owner.rank}: the NCCL collective before "
                        f"{what} did not complete within {self.owner.timeout_s:g} s; aborting every rank",
                    )
                time.sleep(1e-4)
        return self.cuda.get_current_stream()

    def _after(self, stream: Any) -> None:
        if _capturing(stream):
            return
        self.last_event = self.cuda.Event(block=False, disable_timing=True)
        self.last_event.record(stream)

    def allreduce_(self, array: Any, op: str) -> Any:
        dtype = self._dtype(array)
        stream = self._before(f"an allreduce of {array.size} {array.dtype} values")
        nccl_op = self.nccl.NCCL_AVG if op == "mean" else self.nccl.NCCL_SUM
        self.comm.allReduce(array.data.ptr, array.data.ptr, array.size, dtype, nccl_op, stream.ptr)
        self._after(stream)
        return array

    def broadcast_(self, array: Any, root: int) -> Any:
        dtype = self._dtype(array)
        stream = self._before(f"a broadcast of {array.size} {array.dtype} values")
        self.comm.bcast(array.data.ptr, array.size, dtype, root, stream.ptr)
        self._after(stream)
        return array


def _capturing(stream: Any) -> bool:
    """Whether ``stream`` is capturing a CUDA graph (cuda/graph.py): then a collective is recorded
    into the graph (NCCL supports stream capture) and replayed with it, and its completion is not
    watched from the host (an event queried or recorded during the capture would belong to it)."""
    is_capturing = getattr(stream, "is_capturing", None)
    return bool(is_capturing()) if callable(is_capturing) else False


_current: list[Communicator] = []


def init(gpu: bool | None = None) -> Communicator:
    """The communicator of this process (created once): MPI when a launcher started several ranks,
    else a size-1 communicator that does nothing.

    Under several ranks it also selects this rank's GPU (``select_device``: GPU ``local_rank %
    visible``) before it returns, so the model a script builds next is allocated there, and the
    NCCL communicator finds its buffers on its own GPU. ``gpu``: True or None (the default) select
    a GPU when CuPy sees one, unless CNN_GPU_BACKEND=numpy is set; False never touches a GPU (a CPU
    run). Only the first call creates the communicator and decides; a later call selects the GPU
    only when it passes ``gpu=True``."""
    first = not _current
    if first:
        size = launched_size()
        if size <= 1:
            _current.append(Communicator())
        else:
            try:
                from mpi4py import MPI  # noqa: PLC0415  (initialises MPI)
            except ImportError:
                raise DistributedError(
                    f"started as one of {size} ranks, but mpi4py is not installed: pip install -e '.[mpi]' from a checkout"
                ) from None
            _current.append(MPICommunicator(MPI))
    comm = _current[0]
    cpu_only = "backend" in config.given_by_environment() and config.get().backend == "numpy"
    if gpu or (first and gpu is None and not cpu_only):
        comm.select_device()
    return comm


def visible_gpus() -> int:
    """How many GPUs CuPy sees here (0 without CuPy, a driver or a device); touches no GPU
    (cudaGetDeviceCount creates no context)."""
    try:
        import cupy  # noqa: PLC0415

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, or CUDARuntimeError without a driver
        return 0


def device_for(local_rank: int, visible: int) -> int:
    """The GPU (an index among those visible to the rank) that local rank ``local_rank`` uses:
    ``local_rank % visible``. Every rank sees every GPU of its machine: rank r takes GPU r. Each
    rank sees one GPU of its own (per-rank CUDA_VISIBLE_DEVICES, Slurm --gpus-per-task=1,
    Kubernetes): each takes the one it sees. More ranks than GPUs share one, which NCCL refuses
    (check_one_gpu_per_rank says so before the first GPU collective)."""
    if visible < 1:
        raise DistributedError(f"a GPU was asked for, but CuPy sees none (local rank {local_rank})")
    return local_rank % visible


def check_one_gpu_per_rank(entries: list) -> None:
    """``entries[rank]`` = (host, PCI bus id) of each rank's GPU, or a text saying why the rank has
    none: raise DistributedError with the first such text, or naming the first two ranks that share
    a GPU (NCCL needs one GPU per rank)."""
    for text in entries:
        if isinstance(text, str):
            raise DistributedError(text)
    seen: dict = {}
    for rank, key in enumerate(entries):
        if tuple(key) in seen:
            host, bus = key
            raise DistributedError(
                f"NCCL needs one GPU per rank: ranks {seen[tuple(key)]} and {rank} on {host} both use GPU {bus} "
                "(a rank takes GPU local_rank % the GPUs it sees); start at most one rank per GPU, or give each "
                "rank its own GPU (CUDA_VISIBLE_DEVICES)"
            )
        seen[tuple(key)] = rank


def broadcast_parameters(model: Any, comm: Communicator, root: int = 0) -> None:
    """Give every rank root's parameters (and buffers, where the model has them)."""
    for _, p in model.named_parameters():
        comm.broadcast_(p.data, root)
    named_buffers = getattr(model, "named_buffers", None)
    for _, buf in named_buffers() if named_buffers is not None else ():
        comm.broadcast_(buf, root)


class DistributedOptimizer(Optimizer):
    """``optimizer`` with its gradients averaged over the ranks before each update: one allreduce
    per flat gradient buffer (one per backend/dtype group, usually one in all), then the wrapped
    update. Everything else (lr, zero_grad, state_dict, schedules) is the wrapped optimizer's, so
    checkpoints are interchangeable with single-process ones.

    ``loader`` (a ShardedLoader) lets uneven shards count right: a rank holding n_r of a global
    batch of N scales its mean gradient by n_r * size / N first (1 when the shards are equal)."""

    def __init__(self, optimizer: Optimizer, comm: Communicator, loader: Any = None):  # noqa: D107
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, DistributedOptimizer):
            raise TypeError(
                f"optimizer: expected a cnn_gpu.optim.Optimizer (not already distributed), got {type(optimizer).__name__}"
            )
        if not isinstance(comm, Communicator):
            raise TypeError(f"comm: expected a cnn_gpu.distributed communicator (init()), got {type(comm).__name__}")
        self.optimizer, self.comm, self.loader = optimizer, comm, loader  # (no repacking: the wrapped one's groups)

    groups = property(lambda self: self.optimizer.groups)
    lr = property(lambda self: self.optimizer.lr, lambda self, v: setattr(self.optimizer, "lr", v))
    step_count = property(lambda self: self.optimizer.step_count, lambda self, v: setattr(self.optimizer, "step_count", v))

    def __getattr__(self, name: str) -> Any:  # momentum, betas, ... of the wrapped optimizer
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def allreduce_grads(self) -> None:
        if self.comm.size == 1:
            return
        weight = getattr(self.loader, "weight", 1.0)
        for g in self.optimizer.groups:  # (the wrapped step checks the groups' views)
            if weight != 1.0:
                g.grad *= g.grad.dtype.type(weight)
            self.comm.allreduce_(g.grad, op="mean")

    def step(self) -> None:
        self.allreduce_grads()
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    device_scalars = property(lambda self: self.optimizer.device_scalars)
    staged = property(lambda self: self.optimizer.staged)

    def use_device_scalars(self, enabled: bool = True, *, staged: bool = False) -> DistributedOptimizer:
        self.optimizer.use_device_scalars(enabled, staged=staged)
        return self

    def stage_scalars(self) -> None:
        self.optimizer.stage_scalars()

    def hyperparameters(self) -> dict:
        return self.optimizer.hyperparameters()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous part of n items; the parts differ by at most one item."""
    return rank * n // size, (rank + 1) * n // size


class ShardedLoader(DataLoader):
    """A DataLoader whose ``batch_size`` is the GLOBAL batch: every rank draws the same order from
    (seed, epoch), cuts the same global batches, and yields its contiguous part of each. ``len``
    counts global batches (the same on every rank, so positions and schedules agree). A final
    batch with fewer examples than ranks is dropped. ``weight`` is n_rank * size / n_global of the
    batch yielded last (see DistributedOptimizer)."""

    def __init__(
        self,
        x: Any,
        y: Any,
        batch_size: int,
        comm: Communicator,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: Any = None,
    ):
        super().__init__(x, y, batch_size, shuffle, drop_last, seed, transform)
        if not isinstance(comm, Communicator):
            raise TypeError(f"comm: expected a cnn_gpu.distributed communicator (init()), got {type(comm).__name__}")
        if self.batch_size < comm.size:
            raise ValueError(
                f"batch_size: expected at least one example per rank ({comm.size} ranks), got a global batch of {self.batch_size}"
            )
        self.comm, self.weight = comm, 1.0

    def __len__(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest >= self.comm.size and not self.drop_last else 0)

    def _batches(self, idx, start: int) -> Iterator[tuple[Any, Any]]:
        n, b, size = self.num_examples, self.batch_size, self.comm.size
        for k in range(start, len(self)):
            first = k * b
            count = min(b, n - first)  # this global batch: examples [first, first + count) of the order
            lo, hi = shard_bounds(count, self.comm.rank, size)
            self.weight = (hi - lo) * size / count
            if idx is None:
                yield self.x[first + lo : first + hi], self.y[first + lo : first + hi]
            else:
                sel = idx[first + lo : first + hi]
                yield self.x[sel], self.y[sel]


class CollectiveStop(StopRequest):
    """A stop request every rank obeys at the same step: ``request()`` (a signal handler) only
    records it; after each step the ranks vote (one small host allreduce) and stop together."""

    def __init__(self, comm: Communicator):
        super().__init__()
        self.comm = comm

    def request(self) -> None:
        self.requested = True  # not loop.stop: the ranks must agree on the step first

    def on_train_begin(self, loop) -> None:
        self.loop = loop
        loop.stop = self.comm.any(self.requested or loop.stop)

    def on_step(self, loop) -> None:
        loop.stop = self.comm.any(self.requested or loop.stop)


class GlobalMetrics(Callback):
    """The epoch's training loss, accuracy and images/s over all ranks (one host allreduce per
    epoch); put it before the callbacks that report or save the stats."""

    def __init__(self, comm: Communicator):
        self.comm = comm

    def on_epoch_end(self, loop, stats) -> None:
        seen = loop.meter.seen
        loss_sum, hits, total = self.comm.sum_host([stats.train_loss * seen, stats.train_accuracy * seen, seen])
        total = max(total, 1.0)
        stats.train_loss, stats.train_accuracy = loss_sum / total, round(hits) / total
        stats.images_per_s *= total / max(seen, 1)


class ShardedEvaluate(Evaluate):
    """Evaluate: each rank scores its contiguous part of ``data``; the loss sums and the correct
    counts are summed over the ranks (one host allreduce)."""

    def __init__(self, data: tuple, comm: Communicator, split: str = "test", batch_size: int = 512):
        super().__init__(data, split, batch_size)
        self.comm = comm

    def on_epoch_end(self, loop, stats) -> None:
        x, y = self.data
        lo, hi = shard_bounds(int(x.shape[0]), self.comm.rank, self.comm.size)
        loss = acc = 0.0
        if hi > lo:
            loss, acc = evaluate(loop.model, x[lo:hi], y[lo:hi], batch_size=self.batch_size)
        loss_sum, hits, n = self.comm.sum_host([loss * (hi - lo), acc * (hi - lo), hi - lo])
        setattr(stats, f"{self.split}_loss", loss_sum / max(n, 1.0))
        setattr(stats, f"{self.split}_accuracy", round(hits) / max(n, 1.0))


class _LeadOnly:
    """A callback (or writer) that does nothing on this rank: hooks and methods become no-ops,
    attributes (paths, messages) read through."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        return (lambda *args, **kwargs: None) if callable(value) else value


def lead_only(obj: Any, comm: Communicator) -> Any:
    """``obj`` on rank 0; on the other ranks a stand-in whose methods do nothing."""
    return obj if comm.rank == 0 else _LeadOnly(obj)


def global_position(position: Position, comm: Communicator) -> Position:
    """An interrupted epoch's partial sums over all ranks (what rank 0 saves in the checkpoint)."""
    loss_sum, correct, seen = comm.sum_host([position.loss_sum, position.correct, position.seen])
    return dataclasses.replace(position, loss_sum=loss_sum, correct=int(round(correct)), seen=int(round(seen)))


def resumed_position(position: Position, comm: Communicator) -> Position:
    """The saved (global) partial sums stay on rank 0; the other ranks start their sums at zero."""
    if comm.rank == 0:
        return position
    return dataclasses.replace(position, loss_sum=0.0, correct=0, seen=0)


@contextlib.contextmanager
def rank_zero_first(comm: Communicator) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download into a shared folder), then the others. Rank 0
    failing ends them all (fail_together), so their wait has no deadline of its own."""
    if comm.rank != 0:
        comm.barrier(math.inf)
    yield
    if comm.rank == 0:
        comm.barrier(math.inf)


def decorrelate_dropout(model: Any, comm: Communicator) -> None:
    """Rank r > 0 draws other dropout masks than rank 0 (the same seed would repeat rank 0's masks
    on each rank's shard): its Dropout seeds become rank 0's plus r times an odd constant. Call it
    after loading a checkpoint (which holds rank 0's seeds)."""
    if comm.rank == 0:
        return
    for _, m in model.named_modules():
        if type(m).__name__ == "Dropout" and isinstance(getattr(m, "seed", None), int):
            m.seed = (m.seed + comm.rank * 0x9E3779B97F4A7C15) % (2**62)


def check_resume(saved_ranks: int | None, comm: Communicator, where: str) -> None:
    """--resume continues with the number of ranks the run was trained with."""
    saved = 1 if saved_ranks is None else int(saved_ranks)
    if saved != comm.size:
        raise ValueError(
            f"resume: {where} was trained on {saved} rank(s); continue it with the same number "
            f"(mpiexec -n {saved} ...), got {comm.size}"
        )


@contextlib.contextmanager
def fail_together(comm: Communicator, what: str = "cnn-gpu") -> Iterator[None]:
    """Under several ranks, an error on one rank ends all of them (MPI_Abort) with its message,
    instead of leaving the others waiting in a collective. Exceptions marked ``collective``
    (raised on every rank at the same point, e.g. an agreed stop) pass through."""
    try:
        yield
    except BaseException as exc:
        if comm.size == 1 or getattr(exc, "collective", False) or isinstance(exc, SystemExit):
            raise
        text = str(exc) or type(exc).__name__
        comm.abort(
            getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 1),
            f"{what}: rank {comm.rank} of {comm.size} failed: {type(exc).__name__}: {text}; aborting every rank",
        )
        raise


__all__ = [
    "init",
    "visible_gpus",
    "device_for",
    "check_one_gpu_per_rank",
    "Communicator",
    "MPICommunicator",
    "NcclChannel",
    "DistributedError",
    "DistributedOptimizer",
    "ShardedLoader",
    "CollectiveStop",
    "GlobalMetrics",
    "ShardedEvaluate",
    "broadcast_parameters",
    "launched_size",
    "shard_bounds",
    "lead_only",
    "global_position",
    "resumed_position",
    "fail_together",
    "decorrelate_dropout",
    "check_resume",
    "rank_zero_first",
]
