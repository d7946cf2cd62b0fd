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


@pytest.mark.parametrize("call, err, match", [
    (lambda c: c.allreduce_(np.zeros((3, 4))[:, 0]), ValueError, "C-contiguous"),
    (lambda c: c.allreduce_([1.0]), TypeError, "NumPy or CuPy array"),
    (lambda c: c.allreduce_(np.zeros(2), op="max"), ValueError, "op: expected"),
    (lambda c: c.allreduce_(np.zeros(2, np.int64), op="mean"), TypeError, "floating-point"),
    (lambda c: c.broadcast_(np.zeros(2), root=1), ValueError, r"root: expected a rank in \[0, 0\]"),
])
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
    shards = [list(distributed.ShardedLoader(x, y, batch, FakeRanks(r, size), shuffle=True, seed=5).epoch(2))
              for r in range(size)]
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
    assert opt.lr == ref.lr == 0.1 * 0.5 ** 3 and opt.step_count == 3 and opt.momentum == 0.9
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
class FakeNccl:
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT32, NCCL_INT64 = 6, 7, 8, 2, 4
    NCCL_SUM, NCCL_AVG = 0, 4

    def __init__(self, log):
        self.log = log
        outer = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
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
        return (1, 2, 3)


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
    def __init__(self, rank, size, timeout_s=5.0):
        self.rank, self.size, self.local_rank, self.local_size, self.timeout_s = rank, size, rank, size, timeout_s
        self.sent, self.aborted = [], None

    def broadcast_object(self, obj, root=0):
        self.sent.append(obj)
        return (1, 2, 3)  # what rank 0 sent

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
    assert log[: 2 - rank] == ([("get_unique_id",)] if rank == 0 else []) + [("NcclCommunicator", 2, (1, 2, 3), rank)]
    assert comm.sent == [(1, 2, 3) if rank == 0 else None]  # the unique id goes out from rank 0, over MPI
    log.clear()
    a = FakeDeviceArray(10, np.float32)
    ch.allreduce_(a, "mean")
    ch.allreduce_(FakeDeviceArray(4, np.float64), "sum")
    ch.broadcast_(FakeDeviceArray(3, np.int64), 0)
    assert log == [("allReduce", 0x1000, 0x1000, 10, FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_AVG, 0xABC), ("record", 0xABC),
                   ("allReduce", 0x1000, 0x1000, 4, FakeNccl.NCCL_FLOAT64, FakeNccl.NCCL_SUM, 0xABC), ("record", 0xABC),
                   ("bcast", 0x1000, 3, FakeNccl.NCCL_INT64, 0, 0xABC), ("record", 0xABC)]
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
    return subprocess.run([_mpiexec(), "-n", "2", sys.executable, *args], cwd=cwd, env=_env(**extra),
                          capture_output=True, text=True, timeout=timeout)


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
    alone = subprocess.run([sys.executable, "-m", "cnn_gpu", "train", "--resume", str(runs[0])], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "trained on 2 rank(s)" in alone.stderr, alone.stderr


def test_ctrl_c_stops_every_rank_at_the_same_step_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, "-m", "cnn_gpu", "train", "--epochs", "4",
                             "--progress", "plain", "--run-dir", str(run_dir)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


@pytest.mark.parametrize("how, expect", [
    ("raise", "rank 1 of 2 failed: RuntimeError: injected failure"),
    ("kill", ""),  # the launcher ends the job when a rank's process dies
    ("hang", "did not complete within 10 s"),  # the collective's deadline (CNN_GPU_TIMEOUT_S) ends it
])
def test_a_failing_rank_ends_every_rank_in_bounded_time(how, expect, tmp_path):
    t0 = time.monotonic()
    res = _run([str(SCRIPTS / "failing_rank.py"), how, str(tmp_path / "run")], tmp_path, timeout=90,
               CNN_GPU_TIMEOUT_S="10")  # not less: a loaded CI machine may take seconds to start a rank
    seconds = time.monotonic() - t0
    assert res.returncode != 0 and "training finished" not in res.stdout
    assert f"rank 1: failing ({how})" in res.stdout and expect in res.stderr, res.stdout + res.stderr
    assert seconds < 60, seconds


# --- NCCL on the CuPy path, through the CuPy stand-in ------------------------------------------------
def test_standin_distributed_step_is_one_nccl_allreduce_of_the_flat_gradient(standin):
    """A data-parallel training step on CuPy arrays (the stand-in's, with its cupy.cuda streams and
    events; NCCL itself faked, as it needs libnccl): exactly one allReduce per step, in place on
    the optimizer's flat float32 gradient buffer, with NCCL's AVG op, on the current stream, an
    event recorded after it, and no host sync in the step."""
    from standin import counting  # noqa: PLC0415

    from cnn_gpu import models  # noqa: PLC0415
    from cnn_gpu.train import train_step  # noqa: PLC0415

    log = []
    comm = FakeMPIRanks(0, 2)
    comm._nccl = distributed.NcclChannel(comm, FakeNccl(log), standin.cuda)
    rng = np.random.default_rng(0)
    x = standin.asarray(rng.standard_normal((4, 1, 28, 28)).astype(np.float32))
    y = standin.asarray(rng.integers(0, 10, 4))
    with cnn_gpu.use_backend("cupy"):
        model = models.lenet5()
        opt = distributed.DistributedOptimizer(optim.SGD(model, 0.1, momentum=0.9), comm)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        train_step(model, loss_fn, opt, x, y)
        log.clear()
        with counting() as c:
            train_step(model, loss_fn, opt, x, y)
    (group,) = opt.optimizer.groups
    assert isinstance(group.grad, standin.ndarray) and group.grad.dtype == np.float32
    stream = standin.cuda.get_current_stream().ptr
    assert log == [("allReduce", group.grad.data.ptr, group.grad.data.ptr, model.num_parameters(),
                    FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_AVG, stream)]
    assert comm._nccl.last_event.recorded_on == stream  # what the next collective checks (done)
    assert c.total_syncs == 0, c.syncs
