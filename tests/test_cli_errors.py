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
    return subprocess.run([sys.executable, "-m", "cnn_gpu", *argv], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch digits run (its folder) and a model saved outside it."""
    base = tmp_path_factory.mktemp("run")
    cli.cmd_train(
        runs.TrainConfig(epochs=1, run_dir=str(base / "run"), progress="none", save=str(base / "m.npz")), out=lambda s: None
    )
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
        code, _, err = run_cli(
            capsys, "train", *QUICK, "--dataset", "mnist", "--data-dir", str(missing), "--run-dir", str(tmp_path / "run")
        )
    one_line_error(code, err, "could not download", "offline?", "--data-dir")
    assert not (tmp_path / "no").exists()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ run folders and --resume
@pytest.mark.parametrize("name", ["checkpoint.npz", "last.npz", "best.npz", "config.json", None])
def test_resume_accepts_a_file_in_the_run_folder(finished_run, capsys, name):
    """Any file of the run names the run; this one is finished, so the answer says how to extend it."""
    run, _ = finished_run
    target = run / name if name else run
    code, out, err = run_cli(capsys, "train", "--resume", str(target), "--progress", "none")
    one_line_error(code, err, f"{run} is finished (1 of 1 epoch)", f"cnn-gpu train --resume {run} --epochs N, with N > 1")
    assert out == []


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
    one_line_error(code, err, "is finished")  # opened (and cleaned) before the run is found finished
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
    r = subprocess_cli(
        "train", "--epochs", "1", "--progress", "plain", "--run-dir", str(tmp_path / "n"), env_extra={"CNN_GPU_BACKEND": "numpy"}
    )
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


@pytest.mark.parametrize(
    "argv,words",
    [
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
    ],
)
def test_training_flags_past_their_limits(capsys, tmp_path, argv, words):
    code, _, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r"), *argv)
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert all(w in err[-1] for w in words), err
    assert not (tmp_path / "r").exists()


def test_training_flags_at_their_limits(capsys, tmp_path):
    code, out, err = run_cli(
        capsys,
        "train",
        *QUICK,
        "--batch-size",
        "100000",
        "--val-fraction",
        "0.5",
        "--seed",
        str(2**63 - 1),
        "--workspace-mb",
        "0.001",
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert code == 0, err
    assert out[-1].startswith("test accuracy: ")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that makes the NaN
def test_a_non_finite_loss_exits_1(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *QUICK, "--lr", "1e300", "--run-dir", str(tmp_path / "r"))
    assert code == 1, err
    assert any("non-finite training loss" in line for line in err)


# ------------------------------------------------------------------ predict and evaluate
@pytest.mark.parametrize(
    "make,words",
    [
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
    ],
)
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
    for argv in (
        ["train", *QUICK, "--run-dir", str(tmp_path / "f" / "r")],
        ["evaluate", "--checkpoint", str(tmp_path / "f")],
        ["train", "--resume", str(tmp_path / "none")],
    ):
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
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
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


# ------------------------------------------------------------------ issue 22: one-line usage errors, --data flags
@pytest.mark.parametrize(
    "argv,words",
    [
        (["train", "--lr", "-0.1"], ["cnn-gpu train: error: argument --lr", "got -0.1"]),
        (["train", "--model", "resnet18"], ["argument --model", "'resnet18'", "lenet5"]),
        (["train", "--epochs", "0"], ["argument --epochs", "got 0"]),
        (["train", "--image-size", "0x8"], ["argument --image-size", "'0x8'"]),
        (["train", "--channels", "2"], ["argument --channels", "2"]),
        (["train", "--test-fraction", "1"], ["argument --test-fraction"]),
        (["predict", "--top-k", "0", "--checkpoint", "m.npz", "x.png"], ["cnn-gpu predict: error: argument --top-k"]),
        (["evaluate"], ["cnn-gpu evaluate: error:", "--checkpoint"]),
    ],
)
def test_usage_errors_are_one_line_with_a_pointer_to_help(capsys, tmp_path, argv, words):
    code, out, err = run_cli(capsys, *argv)
    one_line_error(code, err, *words)
    assert err[0].endswith("--help)") and not any("usage:" in line for line in err) and out == []


def test_an_unknown_command_is_one_line(capsys):
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and err == [
        "cnn-gpu: error: argument command: invalid choice: 'frobnicate' (choose from 'train', "
        "'evaluate', 'predict', 'plot', 'models', 'export', 'info') (see cnn-gpu --help)"
    ]


def test_data_with_dataset_and_image_flags_without_data(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path), "--dataset", "mnist", "--run-dir", str(tmp_path / "r"))
    one_line_error(code, err, "--data and --dataset")
    code, _, err = run_cli(capsys, "train", "--image-size", "16", "--run-dir", str(tmp_path / "r"))
    one_line_error(code, err, "--image-size and --channels", "--data")
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r"))
    one_line_error(code, err, "none", "no such file or folder")
    assert not (tmp_path / "r").exists()


def test_data_dir_with_the_bundled_digits_is_not_silently_ignored(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", *QUICK, "--data-dir", str(tmp_path / "my_images"), "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert err == [
        f"note: --data-dir {tmp_path / 'my_images'} is not used: the digits are bundled (--dataset mnist, "
        "fashion-mnist or cifar10 reads that folder; --data PATH trains on your own images)"
    ]


def test_export_refuses_a_folder_that_does_not_exist(finished_run, capsys, tmp_path):
    pytest.importorskip("onnx")
    _, model = finished_run
    code, _, err = run_cli(capsys, "export", str(model), str(tmp_path / "new" / "m.onnx"))
    one_line_error(code, err, "out:", str(tmp_path / "new"), "does not exist")
    assert not (tmp_path / "new").exists()


def test_resume_with_fewer_epochs_is_refused(finished_run, capsys):
    run, _ = finished_run
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2", "--seed", "3")
    one_line_error(code, err, "cnn-gpu train: error: --resume", "got --seed as well", "(see cnn-gpu train --help)")


# ------------------------------------------------------------------ model-level input errors name the layer
def test_a_wrong_image_size_names_the_layer_and_what_the_model_takes():
    model = cnn_gpu.models.lenet5()
    with pytest.raises(ValueError) as info:
        model(np.zeros((2, 1, 8, 8), np.float32))
    assert str(info.value) == "features.3 Conv2d: lenet5 takes (1, 28, 28) inputs, got (1, 8, 8)"
    with pytest.raises(ValueError, match=r"^classifier\.0 Linear: lenet5 takes \(1, 28, 28\) inputs, got \(1, 32, 32\)$"):
        model(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"^features\.0 Conv2d: lenet5 takes \(1, 28, 28\) inputs, got \(3, 28, 28\)$"):
        model(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"got an array of shape \(2, 28, 28\) \(expected a batch \(N, 1, 28, 28\)\)"):
        model(np.zeros((2, 28, 28), np.float32))
    resnet = cnn_gpu.models.resnet20()
    with pytest.raises(
        ValueError,
        match=r"^features\.0 Conv2d: resnet20 takes \(3, H, W\) inputs with H, W >= 8, "
        r"got \(1, 32, 32\)$",
    ):
        resnet(np.zeros((1, 1, 32, 32), np.float32))


def test_channels_last_input_gets_an_nhwc_hint():
    for model, x in (
        (cnn_gpu.models.lenet5(), np.zeros((2, 28, 28, 1), np.float32)),
        (cnn_gpu.models.resnet20(), np.zeros((2, 32, 32, 3), np.float32)),
    ):
        with pytest.raises(
            ValueError,
            match=r"the last axis looks like channels: this is NHWC, the model takes NCHW "
            r"\(x\.transpose\(0, 3, 1, 2\)\)$",
        ):
            model(x)
    with pytest.raises(ValueError) as info:  # NCHW of the wrong size: no hint
        cnn_gpu.models.lenet5()(np.zeros((2, 1, 8, 8), np.float32))
    assert "NHWC" not in str(info.value)


def test_a_dtype_mismatch_names_x_not_the_weights():
    model = cnn_gpu.models.lenet5()
    with pytest.raises(TypeError) as info:
        model(np.zeros((2, 1, 28, 28), np.float64))
    assert str(info.value) == (
        "x: expected float32 (the model's dtype), got float64 (at features.0 Conv2d); nothing is "
        "cast silently: convert with x.astype(np.float32)"
    )


def test_a_layer_inside_a_residual_block_and_a_model_of_your_own():
    from cnn_gpu import nn

    block = nn.Sequential(
        nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    )
    block(np.zeros((1, 3, 4, 4), np.float32))  # ran once on (3, 4, 4)
    assert block.last_input_shape == (3, 4, 4)
    with pytest.raises(ValueError) as info:
        block(np.zeros((1, 4, 4, 4), np.float32))
    text = str(info.value)
    assert text.startswith("0.body.0 Conv2d: w: expected 4 input channels") and "its last input was (3, 4, 4)" in text
    assert block.last_input_shape == (3, 4, 4)  # a failed forward records nothing
