"""The command line at and past its limits: every user error is one line on stderr naming the
argument or file, with the documented exit status (0 done, 1 training failed, 2 usage or input
error, 130 interrupted), never a traceback; nothing is left half-written."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import cli, io, runs

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--epochs", "1", "--progress", "none"]


def run_cli(capsys, *argv):
    """(exit status, stdout lines, stderr lines) of cli.main in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def one_line_error(code, err, *words):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("cnn-gpu "), err
    assert "Traceback" not in err[0]
    for w in words:
        assert w in err[0], err


def subprocess_cli(*argv, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_GPU_")}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "cnn_gpu", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch digits run (its folder) and a model saved outside it."""
    base = tmp_path_factory.mktemp("run")
    cli.cmd_train(runs.TrainConfig(epochs=1, run_dir=str(base / "run"), progress="none", save=str(base / "m.npz")),
                  out=lambda s: None)
    return base / "run", base / "m.npz"


# ------------------------------------------------------------------ file system faults
def test_run_dir_below_a_regular_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run_cli(capsys, "train", *QUICK, "--run-dir", str(tmp_path / "file.txt" / "run"))
    one_line_error(code, err, "file.txt")
    code, _, err = run_cli(capsys, "train", *QUICK, "--run-dir", str(tmp_path / "file.txt"))
    one_line_error(code, err, "run_dir: expected a folder", "file.txt")


def test_unwritable_folder(tmp_path, capsys, monkeypatch):
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(io.tempfile, "mkstemp", denied)  # as root, chmod cannot make a folder read-only
    code, _, err = run_cli(capsys, "train", *QUICK, "--run-dir", str(tmp_path / "run"))
    one_line_error(code, err, "Permission denied", str(tmp_path / "run"))


def test_full_disk_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    code, _, err = run_cli(capsys, "train", *QUICK, "--run-dir", str(tmp_path / "run"))
    one_line_error(code, err, "config.json: No space left on device")
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no config.json, no .tmp file


def test_missing_offline_data_is_one_line_and_creates_no_folder(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "data"
    with cnn_gpu.config.override(mirror="http://127.0.0.1:9/"):  # nothing listens on port 9
        code, _, err = run_cli(capsys, "train", *QUICK, "--dataset", "mnist", "--data-dir", str(missing),
                               "--run-dir", str(tmp_path / "run"))
    one_line_error(code, err, "could not download", "offline?", "--data-dir")
    assert not (tmp_path / "no").exists()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ run folders and --resume
@pytest.mark.parametrize("name", ["checkpoint.npz", "last.npz", "best.npz", "config.json", None])
def test_resume_accepts_a_file_in_the_run_folder(finished_run, capsys, name):
    run, _ = finished_run
    target = run / name if name else run
    code, out, err = run_cli(capsys, "train", "--resume", str(target), "--progress", "none")
    assert code == 0, err
    assert out[-1].startswith("test accuracy: ")


def test_resume_of_a_model_file_outside_a_run_says_what_to_pass(finished_run, capsys, tmp_path):
    _, model = finished_run
    code, _, err = run_cli(capsys, "train", "--resume", str(model))
    one_line_error(code, err, "expected a run folder", "m.npz", "cnn-gpu evaluate")
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "nope" / "checkpoint.npz"))
    one_line_error(code, err, "does not exist", "nope")


def test_a_run_folder_holding_only_config_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "train", "--resume", str(run))
    one_line_error(code, err, "checkpoint.npz", "stopped before its first epoch ended", f"--run-dir {run}")
    code, out, err = run_cli(capsys, "train", *QUICK, "--run-dir", str(run))
    assert code == 0, err
    assert (run / "checkpoint.npz").is_file() and (run / "metrics.jsonl").is_file()
    code, _, err = run_cli(capsys, "train", *QUICK, "--run-dir", str(run))  # now it holds a run
    one_line_error(code, err, "already holds a run", f"--resume {run}")


def test_orphan_temporary_files_are_removed_when_a_run_folder_is_opened(finished_run, tmp_path, capsys):
    run, _ = finished_run
    orphans = [run / ".checkpoint.npz.k1ll3d.tmp", run / ".metrics.jsonl.x9.tmp", run / ".best.npz.a.tmp"]
    mine = run / ".my-notes.tmp"
    for p in orphans + [mine]:
        p.write_bytes(b"partial")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--progress", "none")
    assert code == 0, err
    assert not any(p.exists() for p in orphans)
    assert mine.exists()  # not a leftover of cnn_gpu's writes: kept
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".config.json.zz.tmp").write_text("{")
    assert runs.RunDir.create("digits", "lenet_digits", fresh).clean_orphans() == []
    assert not (fresh / ".config.json.zz.tmp").exists()


def test_a_write_killed_midway_leaves_the_previous_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_write(path) as f:
            f.write(b"new, half")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ------------------------------------------------------------------ backend and help
def test_default_backend_is_auto_and_the_first_line_says_which(tmp_path):
    if cnn_gpu.cupy_available():
        pytest.skip("with a GPU, auto picks it: covered by the gpu tests")
    r = subprocess_cli("train", "--epochs", "1", "--progress", "plain", "--run-dir", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("backend: numpy on CPU") and "(auto: no usable GPU" in first, first
    assert '"backend": "auto"' in (tmp_path / "a" / "config.json").read_text()


def test_cnn_gpu_backend_is_honoured(tmp_path):
    r = subprocess_cli("train", "--epochs", "1", "--progress", "plain", "--run-dir", str(tmp_path / "n"),
                       env_extra={"CNN_GPU_BACKEND": "numpy"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("backend: numpy on CPU") and "auto" not in r.stdout.splitlines()[0]
    if not cnn_gpu.cupy_available():
        r = subprocess_cli("train", *QUICK, "--run-dir", str(tmp_path / "c"), env_extra={"CNN_GPU_BACKEND": "cupy"})
        assert r.returncode == 2 and "Traceback" not in r.stderr and "cupy" in r.stderr.lower(), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess_cli("train", *QUICK, env_extra={"CNN_GPU_BACKEND": "tpu"})
    assert r.returncode == 2 and "CNN_GPU_BACKEND" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "DEFAULT_LIMIT_MB" not in text and "cnn_gpu.workspace" not in text
    assert "else 1024" in text and "default: 0" in text and "digits 20" in text and "else auto" in text


@pytest.mark.parametrize("argv,words", [
    (["--epochs", "0"], ["--epochs", "0"]),
    (["--epochs", "1.5"], ["--epochs", "1.5"]),
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "0"], ["--lr"]),
    (["--weight-decay", "-1"], ["--weight-decay"]),
    (["--weight-decay", "inf"], ["--weight-decay"]),
    (["--workspace-mb", "0"], ["--workspace-mb"]),
    (["--seed", str(2**63)], ["--seed"]),
    (["--warmup", "1"], ["--warmup"]),
    (["--backend", "tpu"], ["--backend"]),
    (["--dataset", "imagenet"], ["--dataset"]),
])
def test_training_flags_past_their_limits(capsys, tmp_path, argv, words):
    code, _, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r"), *argv)
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert all(w in err[-1] for w in words), err
    assert not (tmp_path / "r").exists()


def test_training_flags_at_their_limits(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", *QUICK, "--batch-size", "100000", "--val-fraction", "0.5",
                             "--seed", str(2**63 - 1), "--workspace-mb", "0.001", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert out[-1].startswith("test accuracy: ")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that makes the NaN
def test_a_non_finite_loss_exits_1(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *QUICK, "--lr", "1e300", "--run-dir", str(tmp_path / "r"))
    assert code == 1, err
    assert any("non-finite training loss" in line for line in err)


# ------------------------------------------------------------------ predict and evaluate
@pytest.mark.parametrize("make,words", [
    (lambda: np.full((1, 8, 8), np.nan), ["finite", "NaN"]),
    (lambda: np.full((1, 8, 8), np.inf), ["finite"]),
    (lambda: np.zeros((1, 8, 8), np.complex64), ["dtype complex64"]),
    (lambda: np.array([[1, 2]], dtype=object), ["object"]),
    (lambda: np.zeros((1, 8, 8), "U3"), ["dtype <U3"]),
    (lambda: np.zeros((1, 8, 8), bool), ["dtype bool"]),
    (lambda: np.zeros((3, 8, 8)), ["shape (1, 8, 8) or (N, 1, 8, 8)", "(3, 8, 8)"]),
    (lambda: np.zeros((0, 1, 8, 8)), ["N >= 1"]),
    (lambda: np.full((1, 8, 8), 255.0), ["[0, 16]", "255"]),
    (lambda: np.full((1, 8, 8), -1.0), ["[0, 16]"]),
])
def test_predict_refuses_bad_npy_input(finished_run, tmp_path, capsys, make, words):
    _, model = finished_run
    path = tmp_path / "x.npy"
    np.save(path, make(), allow_pickle=True)
    code, _, err = run_cli(capsys, "predict", "--checkpoint", str(model), str(path))
    one_line_error(code, err, "x.npy", *words)


def test_predict_accepts_the_documented_range(finished_run, tmp_path, capsys):
    _, model = finished_run
    for dtype in (np.uint8, np.float32, np.float64, np.int64):
        np.save(tmp_path / "x.npy", np.full((2, 1, 8, 8), 16, dtype))
        code, out, err = run_cli(capsys, "predict", "--checkpoint", str(model), str(tmp_path / "x.npy"))
        assert code == 0, err
        assert len([line for line in out if "class" in line]) == 2


@pytest.mark.parametrize("what", ["missing", "text", "folder-without-models", "truncated"])
def test_evaluate_and_predict_name_a_bad_checkpoint(tmp_path, capsys, finished_run, what):
    _, model = finished_run
    target = tmp_path / "bad.npz"
    if what == "text":
        target.write_text("not a model")
    elif what == "folder-without-models":
        target = tmp_path / "empty_run"
        target.mkdir()
        (target / "config.json").write_text("{}")
    elif what == "truncated":
        target.write_bytes(model.read_bytes()[:200])
    for cmd in (["evaluate", "--checkpoint", str(target)], ["predict", "--checkpoint", str(target), "x.npy"]):
        code, _, err = run_cli(capsys, *cmd)
        one_line_error(code, err, target.name)


def test_predict_missing_input_file(finished_run, tmp_path, capsys):
    _, model = finished_run
    code, _, err = run_cli(capsys, "predict", "--checkpoint", str(model), str(tmp_path / "gone.npy"))
    one_line_error(code, err, "gone.npy")


def test_no_traceback_from_a_subprocess_for_user_errors(tmp_path):
    (tmp_path / "f").write_text("x")
    for argv in (["train", *QUICK, "--run-dir", str(tmp_path / "f" / "r")],
                 ["evaluate", "--checkpoint", str(tmp_path / "f")],
                 ["train", "--resume", str(tmp_path / "none")]):
        r = subprocess_cli(*argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


KILLED_WRITER = """
import sys, numpy as np
import cnn_gpu
from cnn_gpu import nn
cnn_gpu.manual_seed(0)
model = nn.Sequential(nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))   # ~8 MB of float32
print("ready", flush=True)
for i in range(10**6):
    model[0].weight.data[...] = i % 7                  # a different file each time
    cnn_gpu.save(model, sys.argv[1])
"""


def kill_mid_write(target: Path) -> list[Path]:
    """Start a process that rewrites ``target`` (a model file) in a loop; SIGKILL it while a write is
    under way, after one completed; -> the temporary files left behind (empty if the write won the race)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while not (target.exists() and list(target.parent.glob(f".{target.name}.*.tmp"))) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return list(target.parent.glob(f".{target.name}.*.tmp"))


def test_a_write_killed_by_sigkill_leaves_a_whole_file_and_the_orphan_is_cleaned(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = run / "last.npz"
    for _ in range(5):  # the kill may land just after a write finished: try again
        orphans = kill_mid_write(target)
        if orphans:
            break
    assert target.exists() and orphans, "the writer was never caught mid-write"
    model = cnn_gpu.load(target)  # the last completed write, whole
    w = model[0].weight.data
    assert w.shape == (2000, 1000) and np.all(w == w.flat[0])
    removed = runs.RunDir(run).clean_orphans()
    assert sorted(removed) == sorted(orphans)
    assert [p.name for p in run.iterdir()] == ["last.npz"]
