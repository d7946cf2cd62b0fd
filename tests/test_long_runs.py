"""Long runs on shared machines (issue 23, second part): a scheduler's SIGTERM / SIGUSR1, the GPU
running out of memory, a full disk, a second run started into the same folder, and a diverging run."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import callbacks, cli, runs
from cnn_gpu.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
CFG = dict(epochs=2, seed=3, quiet=True)  # the bundled digits: 1295 training images, 41 steps of 32 per epoch


def _weights(path):
    return {k: v.copy() for k, v in cnn_gpu.load(path).state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _env(**extra) -> dict:
    """The environment of a subprocess: this checkout first; the same thread count as this process
    (the CPU engine's sums are split by thread: a bitwise comparison needs the same count)."""
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        CNN_GPU_THREADS=str(cnn_gpu.config.get().threads or os.cpu_count()),
        **extra,
    )


# A `cnn-gpu train` whose process sends itself ``signal`` at (epoch, step): a real signal, delivered
# mid-epoch at a known step (the scheduler's own timing is not reproducible).
_SIGNALLED = textwrap.dedent("""
    import os, signal, sys
    from cnn_gpu import cli, runs
    from cnn_gpu.callbacks import LambdaCallback
    sig, at, times = getattr(signal, sys.argv[1]), (int(sys.argv[2]), int(sys.argv[3])), int(sys.argv[4])

    def on_step(epoch, step):
        if (epoch, step) == at:
            for _ in range(times):
                os.kill(os.getpid(), sig)

    def train_run(cfg, out=print, *, resume=None, callbacks=(), _train_run=runs.train_run):
        return _train_run(cfg, out, resume=resume, callbacks=[*callbacks, LambdaCallback(on_step=on_step)])

    runs.train_run = train_run
    sys.exit(cli.main(sys.argv[5:]))
""")


def _signalled_run(sig: str, at: tuple, argv: list, times: int = 1):
    return subprocess.run(
        [sys.executable, "-c", _SIGNALLED, sig, *map(str, at), str(times), *map(str, argv)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigterm_mid_epoch_checkpoints_exits_75_and_the_requeued_run_resumes_bitwise(tmp_path, capsys):
    """A scheduler's SIGTERM (twice: its warning and its end) in a subprocess mid-epoch: a checkpoint
    at the next step boundary, exit code 75 (EX_TEMPFAIL: requeue); the job resumed with --resume
    ends with the weights and metrics of an uninterrupted run, bitwise."""
    straight = tmp_path / "straight"
    cli.cmd_train(runs.TrainConfig(run_dir=str(straight), **CFG), out=lambda s: None)
    run = tmp_path / "run"
    argv = ["train", "--epochs", 2, "--seed", 3, "--quiet", "--run-dir", run]
    res = _signalled_run("SIGTERM", (1, 7), argv, times=2)
    assert res.returncode == runs.EXIT_REQUEUE == 75, res.stderr
    assert "SIGTERM: stopping after the current step and saving a checkpoint; then exit code 75" in res.stderr
    assert res.stderr.count("SIGTERM: stopping") == 1  # the second SIGTERM changed nothing
    assert (
        f"stopped by SIGTERM during epoch 1 after step 7 of 41; checkpoint saved to {run / 'checkpoint.npz'}" in res.stderr
        and f"resume with: cnn-gpu train --resume {run}" in res.stderr
    )
    assert load_checkpoint(run / "checkpoint.npz").position.step == 7
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    _assert_same_weights(_weights(straight / "last.npz"), _weights(run / "last.npz"))
    a, b = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, run))
    keys = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


@pytest.mark.parametrize("sig, code", [("SIGUSR1", 75), ("SIGINT", 130)])
def test_sigusr1_requeues_and_ctrl_c_keeps_its_own_code(tmp_path, sig, code):
    """In-process: SIGUSR1 (Slurm's warning before a job's time ends) as SIGTERM: exit code 75;
    Ctrl-C: 130, as before. Both save the checkpoint at the step they arrived in."""
    run = tmp_path / "run"

    def on_step(epoch, step):
        if (epoch, step) == (2, 3):
            os.kill(os.getpid(), getattr(signal, sig))

    with pytest.raises(runs.RunStopped) as info:
        cli.cmd_train(
            runs.TrainConfig(run_dir=str(run), **CFG), out=lambda s: None, callbacks=[callbacks.LambdaCallback(on_step=on_step)]
        )
    assert info.value.exit_code == code
    assert str(info.value).startswith("stopped by SIGUSR1 during epoch 2" if code == 75 else "interrupted during epoch 2")
    pos = load_checkpoint(run / "checkpoint.npz").position
    assert (pos.epoch, pos.step) == (1, 3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_the_stop_handler_repeated_sigterm_is_ignored_and_ctrl_c_after_it_aborts():
    """The handler itself: the first SIGTERM requests the stop and names it; a second SIGTERM or a
    SIGUSR1 changes nothing (a scheduler's warning, then its end); Ctrl-C after it aborts (raises)."""
    stop, said = callbacks.StopRequest(), []
    with runs._sigint_requests_stop(stop, said.append):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == "SIGTERM" and len(said) == 1
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):  # the handler runs between bytecodes
                pass
        except KeyboardInterrupt:
            pytest.fail("a repeated SIGTERM or a SIGUSR1 after it aborted the run (no checkpoint)")
        assert stop.signal == "SIGTERM" and len(said) == 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert runs._stop_code(stop) == ("stopped by SIGTERM", 75)
    assert runs._stop_code(callbacks.StopRequest()) == ("interrupted", 130)


def _mpiexec() -> str:
    import shutil

    pytest.importorskip("mpi4py", reason="the [mpi] extra (mpi4py) is not installed")
    exe = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no mpiexec (pip install mpich, or a system MPI)")
    return exe


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_exit_75(tmp_path):
    """Under mpiexec -n 2, only rank 1 gets SIGTERM (at step 3 of epoch 1): both ranks stop after
    the same step (the per-step vote), both exit 75 (one vote on the code, at the stop)."""
    run = tmp_path / "run"
    env = dict(_env(CNN_GPU_TIMEOUT_S="30"), CNN_GPU_THREADS="1")
    res = subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, str(SCRIPTS / "signalled_rank.py"), str(run)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 75, out
    found = sorted(re.findall(r"rank (\d): step (\d+) code (\d+)", res.stdout))  # (the ranks' lines may interleave)
    assert [r for r, _, _ in found] == ["0", "1"], out
    (_, step0, code0), (_, step1, code1) = found
    assert step0 == step1 and code0 == code1 == "75", found  # the same last step, the same code
    pos = load_checkpoint(run / "checkpoint.npz").position
    assert pos.epoch == 0 and pos.step == int(step0) >= 3, (found, pos)


# ============================================================ one live run per folder
QUICK = ["--epochs", "1", "--quiet"]


def _write_lock(run: Path, pid: int, host: str | None = None):
    import socket

    run.mkdir(parents=True, exist_ok=True)
    (run / runs.LOCK_FILE).write_text(
        json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "2026-01-01T00:00:00"})
    )


def _main(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_folder_in_use_by_a_live_process_is_refused_naming_it(tmp_path, capsys, live_pid):
    import socket

    run = tmp_path / "run"
    _write_lock(run, live_pid)
    rc, _, err = _main(capsys, "train", *QUICK, "--run-dir", run)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"run_dir: {run} is in use by process {live_pid} on {socket.gethostname()} (since 2026-01-01T00:00:00)" in err
    assert json.loads((run / runs.LOCK_FILE).read_text())["pid"] == live_pid  # left alone
    assert sorted(p.name for p in run.iterdir()) == [runs.LOCK_FILE]  # nothing written
    # a finished run's folder, now being resumed by the live process: --resume is refused as well
    done = tmp_path / "done"
    assert _main(capsys, "train", *QUICK, "--run-dir", done)[0] == 0
    assert not (done / runs.LOCK_FILE).exists()  # released at the end of the run
    _write_lock(done, live_pid)
    before = (done / "checkpoint.npz").read_bytes()
    rc, _, err = _main(capsys, "train", "--resume", done, "--quiet")
    assert rc == 2 and f"is in use by process {live_pid}" in err, err
    assert (done / "checkpoint.npz").read_bytes() == before
    _write_lock(done, 1, host="another-host")  # another host: its liveness is unknown, so it counts as live
    rc, _, err = _main(capsys, "train", "--resume", done, "--quiet")
    assert rc == 2 and "in use by process 1 on another-host" in err and f"delete {done / runs.LOCK_FILE}" in err


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys, dead_pid):
    run = tmp_path / "run"
    _write_lock(run, dead_pid)
    held = []

    def on_step(epoch, step):
        if step == 1:
            held.append(json.loads((run / runs.LOCK_FILE).read_text()))

    cli.cmd_train(
        runs.TrainConfig(run_dir=str(run), epochs=1, quiet=True),
        out=lambda s: None,
        callbacks=[callbacks.LambdaCallback(on_step=on_step)],
    )
    err = capsys.readouterr().err
    assert f"note: {run}: taking over the lock left by process {dead_pid}" in err and "which no longer runs" in err
    assert held and held[0]["pid"] == os.getpid()  # held during the run
    assert not (run / runs.LOCK_FILE).exists()  # and released after it
    (run / runs.LOCK_FILE).write_text("")  # a writer that died between creating and writing it
    os.utime(run / runs.LOCK_FILE, (0, 0))  # long ago: stale
    rc, _, err = _main(capsys, "train", "--resume", run, "--epochs", 2, "--quiet")
    assert rc == 0 and "taking over the lock left by another process (its lock is unreadable)" in err, err
    (run / runs.LOCK_FILE).write_text("{")  # just now: being written by someone
    rc, _, err = _main(capsys, "train", "--resume", run, "--epochs", 3, "--quiet")
    assert rc == 2 and "is in use by another process (its lock is unreadable) (since 0 s ago, unreadable)" in err, err


def test_the_lock_is_released_when_a_run_fails(tmp_path, capsys, monkeypatch):
    from cnn_gpu import io as cnn_io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cnn_io.os, "fsync", full)
    rc, _, err = _main(capsys, "train", *QUICK, "--run-dir", tmp_path / "run")
    assert rc != 0 and "No space left on device" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == []


# ============================================================ a full disk
class _FullDisk:
    """Files opened by cnn_gpu.io.atomic_write for a name in ``names`` refuse writes (ENOSPC) once
    ``full`` is set, after ``after`` bytes: a disk that fills up in the middle of a file."""

    def __init__(self, monkeypatch, names, after=1000):
        from cnn_gpu import io as cnn_io

        self.names, self.after, self.full, self.refused, self.paths = names, after, False, [], {}
        real_mkstemp, real_fdopen = cnn_io.tempfile.mkstemp, cnn_io.os.fdopen

        def mkstemp(*a, **kw):
            fd, path = real_mkstemp(*a, **kw)
            self.paths[fd] = path
            return fd, path

        def fdopen(fd, *a, **kw):
            f = real_fdopen(fd, *a, **kw)
            name = os.path.basename(self.paths.pop(fd, "")).split(".")[1:3]  # .NAME.npz.XXXX.tmp
            if self.full and ".".join(name) in self.names:
                self._limit(f, ".".join(name))
            return f

        monkeypatch.setattr(cnn_io.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(cnn_io.os, "fdopen", fdopen)

    def _limit(self, f, name):
        write, budget = f.write, [self.after]

        def limited(data):
            if len(data) > budget[0]:
                self.refused.append(name)
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= len(data)
            return write(data)

        f.write = limited


@pytest.mark.parametrize("name", ["checkpoint.npz", "last.npz"])
def test_a_full_disk_while_a_run_file_is_written_keeps_the_last_checkpoint(tmp_path, monkeypatch, name):
    """The disk fills up while epoch 2's checkpoint (or model file) is written: one error line
    naming the file and saying what is kept, exit 1; epoch 1's checkpoint is intact and loadable,
    no partial or temporary file is left, and the run resumes from it once there is space."""
    disk = _FullDisk(monkeypatch, {name})
    run = tmp_path / "run"

    def fill_up(stats):
        disk.full = stats.epoch >= 1

    with pytest.raises(runs.RunStopped) as info:
        cli.cmd_train(
            runs.TrainConfig(run_dir=str(run), **dict(CFG, epochs=3)),
            out=lambda s: None,
            callbacks=[callbacks.LambdaCallback(on_epoch_end=fill_up)],
        )
    assert disk.refused == [name]
    msg = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in msg
    assert msg == (
        f"{run / name}: no space left on device while writing it (nothing partial was left); the last good "
        f"checkpoint (end of epoch 1) is kept in {run / 'checkpoint.npz'}; free some space, then resume "
        f"with: cnn-gpu train --resume {run}"
    )
    assert load_checkpoint(run / "checkpoint.npz").position.epoch == 1
    assert cnn_gpu.load(run / "last.npz") is not None
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    disk.full = False
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    assert load_checkpoint(run / "checkpoint.npz").position.epoch == 3


def test_a_full_disk_for_cnn_gpu_save_is_one_error_and_the_old_file_stays(tmp_path, monkeypatch):
    from cnn_gpu import nn

    path = tmp_path / "model.npz"
    cnn_gpu.save(nn.Linear(2, 3), path)
    before = path.read_bytes()
    disk = _FullDisk(monkeypatch, {"model.npz"}, after=10)
    disk.full = True
    with pytest.raises(OSError) as info:
        cnn_gpu.save(nn.Linear(20, 30), path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert cli.describe_error(info.value) == f"{path}: No space left on device"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


# ============================================================ GPU memory (through the stand-in)
def test_standin_reports_any_device_memory_and_raises_cupys_out_of_memory_error(standin):
    """devices.device_memory(n): Device.mem_info, runtime.memGetInfo and totalGlobalMem report n,
    free shrinks with live buffers and grows when they are freed; an allocation past it raises
    cupy.cuda.memory.OutOfMemoryError with CuPy's message, and allocates nothing."""
    from standin import devices

    mib = 2**20
    with devices.device_memory(4 * mib) as m:
        dev = standin.cuda.Device()
        assert dev.mem_info == (4 * mib, 4 * mib) == standin.cuda.runtime.memGetInfo()
        assert standin.cuda.runtime.getDeviceProperties(0)["totalGlobalMem"] == 4 * mib
        a = standin.zeros(mib // 4 + 1, dtype=np.float32)  # 1 MiB + 4 bytes: charged as 1 MiB + 512
        assert dev.mem_info == (3 * mib - 512, 4 * mib)
        with pytest.raises(
            standin.cuda.memory.OutOfMemoryError,
            match=r"^Out of memory allocating 3,145,728 bytes \(allocated so far: 1,049,088 bytes\)\.$",
        ):
            standin.empty(3 * mib, dtype=np.uint8)
        assert isinstance(standin.cuda.memory.OutOfMemoryError(1, 2), MemoryError)
        assert dev.mem_info[0] == 3 * mib - 512  # the failed allocation took nothing
        del a
        assert dev.mem_info == (4 * mib, 4 * mib) and m.peak == mib + 512
    assert m.memory is None and m.in_use == 0  # the machine as it was
    assert standin.cuda.Device().mem_info[1] == 80 * 2**30  # untracked again outside the block


def _digits_data():
    cfg = runs.TrainConfig(model="lenet_digits", batch_size="auto").resolved()
    return cfg, runs._load_data(cfg, None)


def _trial_peak(standin, cfg, data, b):
    """The device memory a trial step at batch b peaks at (null compute: allocations only)."""
    from standin import devices, null_compute

    with devices.device_memory(2**40) as m, null_compute():
        runs._trial_step(cfg, data, standin, runs._resident_bytes(data, standin))(b)
        return m.peak


def test_batch_size_auto_finds_the_largest_power_of_two_that_fits(standin):
    """On a GPU of a size between what a step at batch 128 and one at 256 need (measured: the
    stand-in's allocations, no arithmetic), auto tries 1024, 512, 256 (each out of memory) and
    picks 128; the note names the device and its memory. On the CPU, auto is the recipe's size."""
    from standin import devices, null_compute

    cfg, data = _digits_data()
    with cnn_gpu.use_backend("cupy"):
        _trial_peak(standin, cfg, data, 8)  # warm-up: one-time allocations (kernels, handles) made outside
        p128, p256 = (_trial_peak(standin, cfg, data, b) for b in (128, 256))
        assert p128 < p256
        tried, said = [], []
        real = runs._trial_step

        def counted(*a):
            trial = real(*a)
            return lambda b: (tried.append(b), trial(b))[1]

        runs._trial_step = counted
        try:
            with devices.device_memory((p128 + p256) // 2), null_compute():
                got = runs._auto_batch_size(cfg, data, said.append)
        finally:
            runs._trial_step = real
    assert got.batch_size == 128 and tried == [1024, 512, 256, 128]
    assert said == [
        f"--batch-size auto: 128, the largest power of two (tried from 1024 down) whose training step fits GPU 0 "
        f"(cnn_gpu CuPy stand-in (emulated sm_90)) ({(p128 + p256) // 2 / 2**20:.1f} MiB)"
    ]
    said.clear()
    assert runs._auto_batch_size(cfg, data, said.append).batch_size == runs.RECIPES["digits"]["batch_size"]
    assert said == ["--batch-size auto: 32 (the recipe's; the search for the largest batch that fits is for GPUs)"]
    with devices.device_memory(2**20), cnn_gpu.use_backend("cupy"), null_compute():  # not even one image
        with pytest.raises(
            ValueError,
            match="batch_size: auto found no batch size that fits: a training step of "
            "lenet_digits with one image does not fit GPU 0",
        ):
            runs._auto_batch_size(cfg, data, said.append)


def test_batch_size_auto_on_the_command_line_and_in_train_config(tmp_path, capsys):
    rc, out, err = _main(
        capsys, "train", "--batch-size", "auto", "--epochs", 1, "--run-dir", tmp_path / "r", "--progress", "plain"
    )
    assert rc == 0, err
    assert "--batch-size auto: 32 (the recipe's" in out and "batch 32" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["batch_size"] == 32
    for bad in ("0", "-3", "big", "1.5"):
        with pytest.raises(SystemExit):
            cli.main(["train", "--batch-size", bad])
        assert "--batch-size: expected a positive integer or auto" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size: expected a positive int or 'auto', got 'max'"):
        runs.TrainConfig(batch_size="max").resolved()


def test_gpu_out_of_memory_during_training_names_model_batch_memory_and_a_size_that_fits(standin, tmp_path):
    """Training at batch 64 on a GPU that holds a step at 32 but not at 64: one error (exit 1)
    naming the model, its parameters, the batch size, the device and its memory, CuPy's message,
    and batch size 32, found by trial next to the run's own model and data."""
    from standin import devices

    cfg, data = _digits_data()
    with cnn_gpu.use_backend("cupy"):
        _trial_peak(standin, cfg, data, 8)
        p32, p64 = (_trial_peak(standin, cfg, data, b) for b in (32, 64))
    memory = (p32 + p64) // 2
    with devices.device_memory(memory), pytest.raises(runs.RunStopped) as info:
        runs.train_run(
            runs.TrainConfig(
                model="lenet_digits",
                batch_size=64,
                epochs=1,
                backend="cupy",
                quiet=True,
                cuda_graph="off",
                run_dir=str(tmp_path / "run"),
            ),
            out=lambda s: None,
        )
    msg = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in msg
    assert msg.startswith(
        f"GPU out of memory training lenet_digits (62,250 parameters) with batch size 64 on GPU 0 "
        f"(cnn_gpu CuPy stand-in (emulated sm_90)), {memory / 2**20:.1f} MiB ("
    )
    assert "CuPy: Out of memory allocating" in msg
    assert "batch size 32 fits: train with --batch-size 32 (or --batch-size auto)" in msg
    assert msg.endswith("no checkpoint was written (no epoch completed)")


# ============================================================ a run that does not learn is named
def _stats(epoch, loss, acc):
    from cnn_gpu.train import EpochStats

    return EpochStats(epoch=epoch, train_loss=loss, train_accuracy=acc, lr=0.1, images_per_s=1.0, seconds=1.0)


@pytest.mark.parametrize(
    "losses, accs, reason",
    [
        ([2.3, 2.3, 2.4], [0.5, 0.6, 0.7], "the training loss (2.4) has not gone below its first epoch's (2.3) in 2 more epochs"),
        ([9.0, 3.0, 2.3], [0.11, 0.10, 0.149], "the training accuracy (14.9%) has stayed at chance (1 in 10) for 3 epochs"),
        ([9.0, 3.0, 2.3], [0.11, 0.10, 0.151], None),  # over 1.5 x chance in one of the last 3 epochs: learning
        ([2.3, 2.29, 2.4], [0.5, 0.6, 0.7], None),  # once below the first epoch's loss
    ],
)
def test_divergence_is_named_after_three_epochs_once(losses, accs, reason):
    said = []
    cb = runs.WarnIfNotLearning(10, 0.5, warn=said.append)
    for e, (loss, acc) in enumerate(zip(losses, accs), 1):
        cb.on_epoch_end(None, _stats(e, loss, acc))
        if e < runs.DIVERGENCE_EPOCHS:
            assert said == []  # not before three epochs
    want = (
        []
        if reason is None
        else [f"warning: the run does not seem to learn: {reason}; try a lower learning rate, e.g. --lr 0.05 (this run's is 0.5)"]
    )
    assert said == want
    for e in range(4, 7):  # one line per run, however long it goes on
        cb.on_epoch_end(None, _stats(e, losses[-1], accs[-1]))
    assert said == want


def test_a_resumed_run_counts_the_epochs_before_it():
    said = []
    rows = [{"train_loss": 2.3, "train_accuracy": 0.1}, {"train_loss": 2.4, "train_accuracy": 0.1}]
    cb = runs.WarnIfNotLearning(10, 1.0, rows, warn=said.append)
    cb.on_epoch_end(None, _stats(3, 2.35, 0.1))
    assert len(said) == 1 and "has not gone below its first epoch's (2.3)" in said[0]


def test_lr_100_is_named_and_a_sound_run_is_not(tmp_path, capsys):
    """`cnn-gpu train --lr 100` runs to chance accuracy: one warning line suggesting a lower rate
    (exit 0 still: the run did what it was told); the recipe's run gets no warning."""
    rc, out, err = _main(capsys, "train", "--lr", 100, "--epochs", 3, "--run-dir", tmp_path / "bad", "--quiet")
    assert rc == 0, err
    (line,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert line.startswith("warning: the run does not seem to learn: the training accuracy (")
    assert line.endswith(
        "%) has stayed at chance (1 in 10) for 3 epochs; try a lower learning rate, e.g. --lr 10 (this run's is 100)"
    ), line
    rc, out, err = _main(capsys, "train", "--epochs", 3, "--run-dir", tmp_path / "good", "--quiet")
    assert rc == 0 and "warning" not in err, err
