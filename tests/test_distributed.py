"""cnn_gpu.distributed: the size-1 communicator, the sharded loader, DistributedOptimizer, the NCCL
call sequence (against a fake of cupy.cuda.nccl, which needs libnccl; also through the CuPy stand-in), and
2 ranks under mpiexec on the CPU (skipped without mpi4py / mpiexec)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import distributed, nn, optim
from cnn_gpu.data.loader import DataLoader

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


class FakeRanks(distributed.Communicator):
    """Rank ``rank`` of ``size`` without MPI: records the collectives, reduces nothing."""

    def __init__(self, rank=0, size=2):
        self.rank, self.size, self.calls = rank, size, []

    def allreduce_(self, array, op="sum"):
        super().allreduce_(array, op)
        self.calls.append(("allreduce_", array.size, op))
        return array


# --- the size-1 communicator ------------------------------------------------------------
def test_init_alone_is_a_size_one_communicator_that_changes_nothing():
    comm = distributed.init()
    assert (comm.rank, comm.size, comm.local_rank, comm.is_lead) == (0, 1, 0, True)
    assert distributed.init() is comm
    a = np.arange(6, dtype=np.float32)
    assert comm.allreduce_(a, op="mean") is a and np.array_equal(a, np.arange(6)) and a.dtype == np.float32
    assert comm.broadcast_(a) is a and comm.sum_host([2, 3.5]) == [2.0, 3.5] and comm.any(True) and not comm.any(False)
    comm.barrier()


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda c: c.allreduce_(np.zeros((3, 4))[:, 0]), ValueError, "C-contiguous"),
        (lambda c: c.allreduce_([1.0]), TypeError, "NumPy or CuPy array"),
        (lambda c: c.allreduce_(np.zeros(2), op="max"), ValueError, "op: expected"),
        (lambda c: c.allreduce_(np.zeros(2, np.int64), op="mean"), TypeError, "floating-point"),
        (lambda c: c.broadcast_(np.zeros(2), root=1), ValueError, r"root: expected a rank in \[0, 0\]"),
    ],
)
def test_communicator_rejects_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call(distributed.init())


def test_launched_size_reads_the_launchers_variables():
    assert distributed.launched_size({}) == 1
    assert distributed.launched_size({"PMI_SIZE": "4"}) == 4
    assert distributed.launched_size({"OMPI_COMM_WORLD_SIZE": "8"}) == 8


# --- the sharded loader ------------------------------------------------------------------------
@pytest.mark.parametrize("n, batch, size", [(25, 10, 2), (23, 8, 3), (9, 4, 4), (12, 4, 2)])
def test_sharded_loader_splits_every_global_batch_into_disjoint_shards(n, batch, size):
    x, y = np.arange(n, dtype=np.float64).reshape(n, 1), np.arange(n)
    whole = list(DataLoader(x, y, batch, shuffle=True, seed=5).epoch(2))
    shards = [
        list(distributed.ShardedLoader(x, y, batch, FakeRanks(r, size), shuffle=True, seed=5).epoch(2)) for r in range(size)
    ]
    kept = [b for b in whole if len(b[1]) >= size]  # a last batch with fewer examples than ranks is dropped
    assert all(len(s) == len(kept) for s in shards)
    for k, (_, yb) in enumerate(kept):
        parts = [s[k][1] for s in shards]
        assert np.array_equal(np.concatenate(parts), yb)  # rank order, contiguous, nothing twice or lost
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1


def test_sharded_loader_weight_and_checks():
    x, y = np.zeros((25, 1)), np.zeros(25, dtype=np.int64)
    loader = distributed.ShardedLoader(x, y, 10, FakeRanks(1, 2))
    weights = []
    for _ in loader.epoch(0):
        weights.append(loader.weight)
    assert len(loader) == 3 and weights == [1.0, 1.0, 3 * 2 / 5]  # last batch of 5: rank 1 holds 3
    with pytest.raises(ValueError, match="at least one example per rank"):
        distributed.ShardedLoader(x, y, 1, FakeRanks(0, 2))
    with pytest.raises(TypeError, match="comm"):
        distributed.ShardedLoader(x, y, 4, "comm")


# --- DistributedOptimizer --------------------------------------------------------------------------
def _model():
    cnn_gpu.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def test_distributed_optimizer_makes_one_allreduce_per_flat_buffer_then_the_same_update():
    model, twin = _model(), _model()
    comm = FakeRanks(0, 2)
    opt = distributed.DistributedOptimizer(optim.SGD(model, 0.1, momentum=0.9), comm)
    ref = optim.SGD(twin, 0.1, momentum=0.9)
    sched, ref_sched = optim.StepLR(opt, step_size=1, gamma=0.5), optim.StepLR(ref, step_size=1, gamma=0.5)
    rng = np.random.default_rng(1)
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in model.parameters()]
        opt.zero_grad(), ref.zero_grad()
        for p, q, g in zip(model.parameters(), twin.parameters(), grads):
            p.grad += g
            q.grad += g
        opt.step(), ref.step()
        sched.step(), ref_sched.step()
    n = model.num_parameters()
    assert comm.calls == [("allreduce_", n, "mean")] * 3  # one call per step over the whole flat buffer
    for p, q in zip(model.parameters(), twin.parameters()):
        assert np.array_equal(p.data, q.data)
    assert opt.lr == ref.lr == 0.1 * 0.5**3 and opt.step_count == 3 and opt.momentum == 0.9
    sd = opt.state_dict()
    assert sd["type"] == "SGD" and sd["step"] == 3
    fresh = optim.SGD(_model(), 0.1, momentum=0.9)
    fresh.load_state_dict(sd)  # a checkpoint of the wrapped optimizer loads into a plain one
    opt.load_state_dict(ref.state_dict())


def test_distributed_optimizer_scales_an_uneven_shard_and_skips_alone():
    model = _model()
    loader = type("L", (), {"weight": 0.5})()
    comm = FakeRanks(0, 2)
    opt = distributed.DistributedOptimizer(optim.SGD(model, 0.0), comm, loader)
    for p in model.parameters():
        p.grad[...] = 2.0
    opt.step()
    assert all(np.all(p.grad == 1.0) for p in model.parameters())  # scaled by the weight (FakeRanks reduces nothing)
    alone = distributed.DistributedOptimizer(optim.SGD(_model(), 0.1), distributed.init())
    alone.step()  # size 1: no collective at all
    with pytest.raises(TypeError, match="optimizer"):
        distributed.DistributedOptimizer(opt, comm)
    with pytest.raises(TypeError, match="comm"):
        distributed.DistributedOptimizer(optim.SGD(_model(), 0.1), None)


def test_positions_and_resume_checks():
    pos = cnn_gpu.train.Position(epoch=1, step=3, loss_sum=2.5, correct=4, seen=8)
    assert distributed.resumed_position(pos, FakeRanks(0, 2)) == pos
    other = distributed.resumed_position(pos, FakeRanks(1, 2))
    assert (other.loss_sum, other.correct, other.seen, other.step) == (0.0, 0, 0, 3)
    distributed.check_resume(None, distributed.init(), "run")
    with pytest.raises(ValueError, match="trained on 2 rank"):
        distributed.check_resume(2, distributed.init(), "run")


def test_dropout_seeds_differ_by_rank_but_not_on_rank_zero():
    def seeds(rank):
        cnn_gpu.manual_seed(0)
        m = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.2))
        distributed.decorrelate_dropout(m, FakeRanks(rank, 3))
        return [d.seed for _, d in m.named_modules() if isinstance(d, nn.Dropout)]

    s0, s1, s2 = seeds(0), seeds(1), seeds(2)
    assert len(s0) == 2 and len({*s0, *s1, *s2}) == 6


# --- NCCL: the call sequence, against a fake cupy.cuda.nccl ------------------------------------------
UID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
UID = bytes(range(UID_BYTES))


class FakeNccl:
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT32, NCCL_INT64 = 6, 7, 8, 2, 4
    NCCL_SUM, NCCL_AVG = 0, 4

    def __init__(self, log):
        self.log = log
        outer = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
                if not isinstance(uid, bytes) or len(uid) != UID_BYTES:  # CuPy 14: bytes commId, 128 of them
                    raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got {type(uid).__name__})")
                outer.log.append(("NcclCommunicator", ndev, uid, rank))

            def allReduce(self, send, recv, count, dtype, op, stream):
                outer.log.append(("allReduce", send, recv, count, dtype, op, stream))

            def bcast(self, buf, count, dtype, root, stream):
                outer.log.append(("bcast", buf, count, dtype, root, stream))

            def abort(self):
                outer.log.append(("abort",))

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        self.log.append(("get_unique_id",))
        return UID  # CuPy 14: bytes (a tuple of ints before)


class FakeCuda:
    """get_current_stream and Event, as cupy.cuda has them; events stay pending when told."""

    def __init__(self, log, pending=False):
        self.log, self.pending = log, pending
        self.stream = type("Stream", (), {"ptr": 0xABC})()

    def get_current_stream(self):
        return self.stream

    def Event(self, block, disable_timing):
        log, pending = self.log, self.pending

        class Event:
            done = not pending

            def record(self, stream):
                log.append(("record", stream.ptr))

        return Event()


class FakeMPIRanks(distributed.MPICommunicator):
    """Rank ``rank`` of ``size``, all on one machine ("node0"); the other ranks' GPUs, as gathered
    before NCCL starts, are ``peers`` (default: a GPU of their own each)."""

    def __init__(self, rank, size, timeout_s=5.0, peers=None):
        self.rank, self.size, self.local_rank, self.local_size, self.timeout_s = rank, size, rank, size, timeout_s
        self.sent, self.aborted, self.host, self._nccl = [], None, "node0", None
        self.peers = [("node0", f"peer GPU {r}") for r in range(size)] if peers is None else list(peers)

    def allgather_object(self, obj):
        return [obj if r == self.rank else p for r, p in enumerate(self.peers)]

    def broadcast_object(self, obj, root=0):
        self.sent.append(obj)
        return UID  # what rank 0 sent

    def abort(self, code, message):
        self.aborted = (code, message)
        raise SystemExit(code)


class FakeDeviceArray:
    def __init__(self, n, dtype):
        self.size, self.dtype = n, np.dtype(dtype)
        self.data = type("Mem", (), {"ptr": 0x1000})()


@pytest.mark.parametrize("rank", [0, 1])
def test_nccl_channel_call_sequence(rank):
    log = []
    comm = FakeMPIRanks(rank, 2)
    ch = distributed.NcclChannel(comm, FakeNccl(log), FakeCuda(log))
    assert log[: 2 - rank] == ([("get_unique_id",)] if rank == 0 else []) + [("NcclCommunicator", 2, UID, rank)]
    assert comm.sent == [UID if rank == 0 else None]  # the unique id goes out from rank 0, over MPI
    log.clear()
    a = FakeDeviceArray(10, np.float32)
    ch.allreduce_(a, "mean")
    ch.allreduce_(FakeDeviceArray(4, np.float64), "sum")
    ch.broadcast_(FakeDeviceArray(3, np.int64), 0)
    assert log == [
        ("allReduce", 0x1000, 0x1000, 10, FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_AVG, 0xABC),
        ("record", 0xABC),
        ("allReduce", 0x1000, 0x1000, 4, FakeNccl.NCCL_FLOAT64, FakeNccl.NCCL_SUM, 0xABC),
        ("record", 0xABC),
        ("bcast", 0x1000, 3, FakeNccl.NCCL_INT64, 0, 0xABC),
        ("record", 0xABC),
    ]
    with pytest.raises(TypeError, match="NCCL collectives take"):
        ch.allreduce_(FakeDeviceArray(3, np.complex64), "sum")


def test_mpi_communicator_sends_cupy_arrays_through_nccl():
    log = []
    comm = FakeMPIRanks(1, 2)
    comm._nccl = distributed.NcclChannel(comm, FakeNccl(log), FakeCuda(log))
    DeviceArray = type("ndarray", (FakeDeviceArray,), {"__module__": "cupy._core.core"})  # is_cupy_array: True
    a = DeviceArray(8, np.float32)
    a.flags = type("Flags", (), {"c_contiguous": True})()
    log.clear()
    assert comm.allreduce_(a, op="mean") is a and comm.broadcast_(a, root=0) is a
    assert [e[0] for e in log] == ["allReduce", "record", "bcast", "record"]
    assert log[0][5] == FakeNccl.NCCL_AVG  # the mean in one NCCL call, no extra scaling kernel


def test_nccl_channel_aborts_when_the_previous_collective_never_completes():
    log = []
    comm = FakeMPIRanks(0, 2, timeout_s=0.2)
    ch = distributed.NcclChannel(comm, FakeNccl(log), FakeCuda(log, pending=True))
    ch.allreduce_(FakeDeviceArray(5, np.float32), "sum")  # its event never completes
    t0 = time.monotonic()
    with pytest.raises(SystemExit):
        ch.allreduce_(FakeDeviceArray(5, np.float32), "sum")
    assert time.monotonic() - t0 < 5 and ("abort",) in log and "did not complete within 0.2 s" in comm.aborted[1]


# --- 2 ranks under mpiexec -------------------------------------------------------------------------
def _mpiexec() -> str:
    pytest.importorskip("mpi4py", reason="the [mpi] extra (mpi4py) is not installed")
    exe = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no mpiexec (pip install mpich, or a system MPI)")
    return exe


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.setdefault("CNN_GPU_THREADS", "1")
    return env


def _run(args, cwd, timeout=120, **extra):
    return subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, *args],
        cwd=cwd,
        env=_env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("script", ["comm_ops.py", "equivalence.py"])
def test_two_ranks(script, tmp_path):
    res = _run([str(SCRIPTS / script)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rank 0 ok" in res.stdout and "rank 1 ok" in res.stdout


def test_cli_on_two_ranks_trains_and_only_rank_zero_prints_and_writes(tmp_path):
    res = _run(["-m", "cnn_gpu", "train", "--epochs", "1", "--progress", "plain"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.count("epoch 1/1") == 1 and out.count("test accuracy:") == 1 and out.count("run folder:") == 1, out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 created no folder of its own
    files = sorted(p.name for p in runs[0].iterdir())
    assert {"config.json", "metrics.jsonl", "checkpoint.npz", "last.npz", "best.npz"} <= set(files), files
    assert json.loads((runs[0] / "config.json").read_text())["ranks"] == 2
    (row,) = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert row["test_accuracy"] > 0.5 and row["test_loss"] < 2.3, row  # it trained (10 classes: chance 0.1, ln 10)
    printed = float(out.split("test accuracy:")[1].split("%")[0])
    assert abs(printed - 100 * row["test_accuracy"]) < 0.01
    # --resume wants the same number of ranks
    alone = subprocess.run(
        [sys.executable, "-m", "cnn_gpu", "train", "--resume", str(runs[0])],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode != 0 and "trained on 2 rank(s)" in alone.stderr, alone.stderr


def test_ctrl_c_stops_every_rank_at_the_same_step_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            _mpiexec(),
            "-n",
            "2",
            sys.executable,
            "-m",
            "cnn_gpu",
            "train",
            "--epochs",
            "4",
            "--progress",
            "plain",
            "--run-dir",
            str(run_dir),
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/4"):
                break
        proc.send_signal(signal.SIGINT)  # mpiexec forwards it to every rank
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "checkpoint saved" in err, err
    res = _run(["-m", "cnn_gpu", "train", "--resume", str(run_dir), "--progress", "plain"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and res.stdout.count("test accuracy:") == 1


@pytest.mark.parametrize(
    "how, expect",
    [
        ("raise", "rank 1 of 2 failed: RuntimeError: injected failure"),
        ("kill", ""),  # the launcher ends the job when a rank's process dies
        ("hang", "did not complete within 10 s"),  # the collective's deadline (CNN_GPU_TIMEOUT_S) ends it
    ],
)
def test_a_failing_rank_ends_every_rank_in_bounded_time(how, expect, tmp_path):
    t0 = time.monotonic()
    res = _run(
        [str(SCRIPTS / "failing_rank.py"), how, str(tmp_path / "run")], tmp_path, timeout=90, CNN_GPU_TIMEOUT_S="10"
    )  # not less: a loaded CI machine may take seconds to start a rank
    seconds = time.monotonic() - t0
    assert res.returncode != 0 and "training finished" not in res.stdout
    assert f"rank 1: failing ({how})" in res.stdout and expect in res.stderr, res.stdout + res.stderr
    assert seconds < 60, seconds


# --- NCCL on the CuPy path, through the CuPy stand-in ------------------------------------------------
def test_standin_distributed_step_is_one_nccl_allreduce_of_the_flat_gradient(standin):
    """A data-parallel training step on CuPy arrays (the stand-in's, with its cupy.cuda streams,
    events and NCCL, typed as CuPy 14's): the communicator is made on first use from a bytes unique
    id, then exactly one allReduce per step, in place on
    the optimizer's flat float32 gradient buffer, with NCCL's AVG op, on the current stream, an
    event recorded after it, and no host sync in the step."""
    from standin import counting  # noqa: PLC0415

    from cnn_gpu import models  # noqa: PLC0415
    from cnn_gpu.train import train_step  # noqa: PLC0415

    comm = FakeMPIRanks(0, 2)
    log = standin.cuda.nccl.log
    rng = np.random.default_rng(0)
    x = standin.asarray(rng.standard_normal((4, 1, 28, 28)).astype(np.float32))
    y = standin.asarray(rng.integers(0, 10, 4))
    with cnn_gpu.use_backend("cupy"):
        model = models.lenet5()
        opt = distributed.DistributedOptimizer(optim.SGD(model, 0.1, momentum=0.9), comm)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        log.clear()
        train_step(model, loss_fn, opt, x, y)
        assert log[:2] == [("get_unique_id",), ("NcclCommunicator", 2, 0)] and comm.device == 0
        log.clear()
        with counting() as c:
            train_step(model, loss_fn, opt, x, y)
    (group,) = opt.optimizer.groups
    assert isinstance(group.grad, standin.ndarray) and group.grad.dtype == np.float32
    stream = standin.cuda.get_current_stream().ptr
    nccl = standin.cuda.nccl
    assert log == [
        ("allReduce", group.grad.data.ptr, group.grad.data.ptr, model.num_parameters(), nccl.NCCL_FLOAT32, nccl.NCCL_AVG, stream)
    ]
    assert comm._nccl.last_event.recorded_on == stream  # what the next collective checks (done)
    assert c.total_syncs == 0, c.syncs


# --- one GPU per rank, selected before anything touches a GPU (the stand-in sees any GPU count) ------
@pytest.mark.parametrize("visible", [1, 2, 8])
@pytest.mark.parametrize("local_size", [2, 3, 4, 8])
def test_standin_each_rank_takes_gpu_local_rank_modulo_the_gpus_it_sees(standin, visible, local_size):
    """Every rank sees every GPU of the machine: rank r takes GPU r (NCCL's one GPU per rank is
    refused with a message naming two ranks when there are more ranks than GPUs). Each rank sees
    GPUs of its own (per-rank CUDA_VISIBLE_DEVICES, Slurm --gpus-per-task): each takes one of its
    own, whatever their count; select_device raised when a rank saw fewer GPUs than local ranks."""
    from standin import devices  # noqa: PLC0415

    def run(visible_of_rank):
        taken = []
        for r in range(local_size):
            with devices.visible(*visible_of_rank(r)) as m:
                comm = FakeMPIRanks(r, local_size)
                index = comm.select_device()
                assert index == r % visible and comm.device == index and not comm.device_error
                assert m.trace == [("select", visible_of_rank(r)[index])]  # cudaSetDevice, nothing else yet
                taken.append(("node0", standin.cuda.Device(index).pci_bus_id))
        return taken

    shared = run(lambda r: range(visible))
    if local_size <= visible:
        distributed.check_one_gpu_per_rank(shared)
        assert len(set(shared)) == local_size
    else:
        with pytest.raises(distributed.DistributedError, match=f"ranks 0 and {visible} on node0 both use GPU"):
            distributed.check_one_gpu_per_rank(shared)
    own = run(lambda r: range(r * visible, (r + 1) * visible))
    distributed.check_one_gpu_per_rank(own)
    assert len(set(own)) == local_size


def test_check_one_gpu_per_rank_reports_a_rank_without_its_gpu_on_every_rank():
    entries = [("a", "0000:18:00.0"), "rank 1 (local rank 1 of 2) could not select GPU 1", ("a", "0000:19:00.0")]
    with pytest.raises(distributed.DistributedError, match="rank 1 .* could not select GPU 1"):
        distributed.check_one_gpu_per_rank(entries)
    distributed.check_one_gpu_per_rank([("a", "0000:18:00.0"), ("b", "0000:18:00.0")])  # two machines: fine


def test_standin_a_rank_whose_gpu_is_refused_says_so_when_a_gpu_is_needed(standin, monkeypatch):
    """cudaSetDevice failing (a GPU in exclusive-process mode held by another process) is kept, not
    raised at init (a CPU run needs no GPU), and raised by require_device and before NCCL starts."""
    from standin import devices  # noqa: PLC0415

    def refuse(self):
        raise devices.CUDARuntimeError("cudaErrorDevicesUnavailable: CUDA-capable device(s) is/are busy or unavailable")

    monkeypatch.setattr(type(standin.cuda.Device()), "use", refuse)
    with devices.visible(0, 1):
        comm = FakeMPIRanks(1, 2)
        assert comm.select_device() is None and "could not select GPU 1 of the 2 it sees" in comm.device_error
        with pytest.raises(distributed.DistributedError, match="cudaErrorDevicesUnavailable"):
            comm.require_device()
        with pytest.raises(distributed.DistributedError, match="rank 1 .*could not select GPU 1"):
            comm.nccl()
    with devices.visible() as m:  # no GPU at all: a CPU rank, nothing touched, no error
        comm = FakeMPIRanks(0, 2)
        assert comm.select_device() is None and comm.device_error == "" and m.trace == []


class _FakeWorld:
    """mpi4py's COMM_WORLD for one rank of ``size`` as MPICommunicator's constructor uses it."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind, key):
        return self

    def Free(self):
        pass


def _fake_mpi(monkeypatch, rank, size):
    mpi = types.SimpleNamespace(COMM_WORLD=_FakeWorld(rank, size), COMM_TYPE_SHARED=1, Get_processor_name=lambda: "node0")
    monkeypatch.setattr(distributed, "_current", [])
    monkeypatch.setattr(distributed, "launched_size", lambda environ=None: size)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))


def test_standin_init_selects_the_gpu_before_the_probe_and_the_model(standin, monkeypatch):
    """The README's script: init(), then the backend check's probe kernel, then the model. Every
    one of them lands on GPU local_rank (rank 2 of 4 here): GPU 0 is never touched."""
    from standin import devices  # noqa: PLC0415

    from cnn_gpu import backend, models  # noqa: PLC0415

    _fake_mpi(monkeypatch, 2, 4)
    with devices.visible(0, 1, 2, 3) as m:
        comm = distributed.init()
        assert comm.size == 4 and comm.device == 2 and m.trace == [("select", 2)]
        backend._cupy_status.cache_clear()
        assert backend.backend_module("cupy") is standin  # the probe: an allocation, then a launch
        with cnn_gpu.use_backend("cupy"):
            models.lenet5()
    assert [w for w, _ in m.trace[:3]] == ["select", "alloc", "launch"], m.trace
    assert {gpu for _, gpu in m.trace} == {2}, m.trace


@pytest.mark.parametrize("how", ["gpu=False", "CNN_GPU_BACKEND=numpy"])
def test_standin_init_for_a_cpu_run_touches_no_gpu(standin, monkeypatch, how):
    from standin import devices  # noqa: PLC0415

    _fake_mpi(monkeypatch, 1, 2)
    with devices.visible(0, 1) as m:
        if how == "gpu=False":
            comm = distributed.init(gpu=False)
        else:
            monkeypatch.setattr(cnn_gpu.config, "_env_given", [frozenset({"backend"})])  # as if set
            with cnn_gpu.config.override(backend="numpy"):
                comm = distributed.init()
        assert comm.device is None and m.trace == []
        assert distributed.init() is comm and m.trace == []  # a later init() keeps the first decision
        assert distributed.init(gpu=True).device == 1 and m.trace == [("select", 1)]


class _Done:
    def Test(self):
        return True


class _FakeWorldOps(_FakeWorld):
    """A world whose other ranks hold what this one holds: collectives complete at once and leave
    the values as they are (enough to follow one rank through a whole run)."""

    from_root: list = []  # what rank 0 broadcasts, in order (this rank's own value when empty)

    def bcast(self, obj, root=0):
        return self.from_root.pop(0) if self.rank != root and self.from_root else obj

    def Abort(self, code):
        raise SystemExit(code)

    def allgather(self, obj):
        return [obj if r == self.rank else ("node0", f"peer GPU {r}") for r in range(self.size)]

    def Iallreduce(self, sendbuf, recvbuf, op=None):
        return _Done()

    def Ibcast(self, buf, root=0):
        return _Done()

    def Ibarrier(self):
        return _Done()


def test_standin_train_run_on_rank_1_of_2_selects_its_gpu_first(standin, monkeypatch, tmp_path):
    """cnn-gpu train under mpiexec (rank 1 of 2, CuPy): its GPU is selected before the backend
    check's probe kernel and before the model; GPU 0 is never touched; the gradients go through
    the stand-in's NCCL."""
    from standin import devices  # noqa: PLC0415

    from cnn_gpu import backend, runs  # noqa: PLC0415

    _fake_mpi(monkeypatch, 1, 2)
    mpi = sys.modules["mpi4py"].MPI
    mpi.COMM_WORLD, mpi.IN_PLACE, mpi.SUM = _FakeWorldOps(1, 2), object(), "sum"
    mpi.COMM_WORLD.from_root = [str(tmp_path / "run"), UID]  # rank 0 names the run folder, then NCCL's unique id
    standin.cuda.nccl.log.clear()
    cfg = runs.TrainConfig(
        dataset="digits",
        epochs=1,
        batch_size=256,
        backend="cupy",
        run_dir=str(tmp_path / "run"),
        progress="none",
        quiet=True,
        data_dir=str(tmp_path / "data"),
    )
    with devices.visible(0, 1) as m:
        backend._cupy_status.cache_clear()
        runs.train_run(cfg, out=lambda line: None)
    assert m.trace[0] == ("select", 1) and {gpu for _, gpu in m.trace} == {1}, m.trace[:5]
    assert ("NcclCommunicator", 2, 1) in standin.cuda.nccl.log
    assert sum(e[0] == "allReduce" for e in standin.cuda.nccl.log) >= 1


def test_standin_a_data_parallel_step_captures_its_allreduce_inside_the_cuda_graph(standin):
    """With the training step as a CUDA graph (cuda/graph.py), the gradient allreduce is recorded
    into the graph (NCCL supports capture): each replay runs it, the host issues no NCCL call and
    no sync, and the weights equal eager data-parallel steps' (the stand-in's NCCL: every rank
    holds the same values)."""
    from standin import counting  # noqa: PLC0415

    from cnn_gpu import models  # noqa: PLC0415
    from cnn_gpu.cuda.graph import training_graph  # noqa: PLC0415
    from cnn_gpu.train import train_step  # noqa: PLC0415

    rng = np.random.default_rng(0)
    batches = [
        (standin.asarray(rng.standard_normal((4, 1, 28, 28)).astype(np.float32)), standin.asarray(rng.integers(0, 10, 4)))
        for _ in range(4)
    ]

    def setup():
        with cnn_gpu.use_backend("cupy"):
            cnn_gpu.manual_seed(0)
            model = models.lenet5()
            opt = distributed.DistributedOptimizer(optim.SGD(model, 0.1, momentum=0.9), FakeMPIRanks(0, 2))
        return model, opt, nn.CrossEntropyLoss(validate_range=False)

    model_e, opt_e, loss_e = setup()
    for x, y in batches:
        train_step(model_e, loss_e, opt_e, x, y)
    model_g, opt_g, loss_g = setup()
    lines = []
    graphed = training_graph(model_g, opt_g, lambda x, y: train_step(model_g, loss_g, opt_g, x, y), say=lines.append)
    for x, y in batches[:3]:
        graphed(x, y)
    log = standin.cuda.nccl.log
    log.clear()
    with counting() as c:
        graphed(*batches[3])
    assert lines == [] and graphed.graph is not None
    assert log == [] and c.total_syncs == 0  # the host made no NCCL call: the replay did
    assert c.launches == {"copy": 2, "graph": 1} and c.graph_kernels["nccl"] == 1  # one allreduce inside
    for (name, p), (_, q) in zip(model_g.named_parameters(), model_e.named_parameters()):
        np.testing.assert_array_equal(p.data.get(), q.data.get(), err_msg=name)
