"""Training runs from the command line: the run folder, reproducibility, resume, Ctrl-C,
non-finite losses, plots, predict on images, the model zoo, other datasets."""

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import callbacks, cli, optim, runs
from cnn_gpu.checkpoint import load_checkpoint
from cnn_gpu.data import get_dataset

ROOT = Path(__file__).resolve().parents[1]


def main(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def accuracy(line: str) -> float:
    """The percentage of a ``test accuracy: NN.NN% (...)`` line."""
    assert line.startswith("test accuracy: "), line
    return float(line.split()[2].rstrip("%"))


def weights(path):
    return {k: v.copy() for k, v in cnn_gpu.load(path).state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_run_folder_holds_config_metrics_plot_and_models(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = main(capsys, "train", "--epochs", "3", "--val-fraction", "0.2", "--seed", "1", "--run-dir", run)
    assert rc == 0, err
    last_line = out.strip().splitlines()[-1]
    assert last_line == f"test accuracy: {accuracy(last_line):.2f}% (the last epoch's model, {run / 'last.npz'})"

    doc = json.loads((run / "config.json").read_text())
    cfg = doc["config"]
    assert (cfg["dataset"], cfg["model"], cfg["epochs"], cfg["seed"], cfg["val_fraction"]) == (
        "digits",
        "lenet_digits",
        3,
        1,
        0.2,
    )
    assert cfg["lr"] == runs.RECIPES["digits"]["lr"] and cfg["optimizer"] == "adam" and doc["seed"] == 1
    env = doc["environment"]
    assert env["cnn_gpu"] == cnn_gpu.__version__ and env["numpy"] == np.__version__ and env["backend"] == "numpy"
    assert env["python"] and env["device"].startswith("CPU")
    assert doc["data"]["val"] > 0 and doc["data"]["train"] + doc["data"]["val"] == 1438

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in (
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "test_loss",
            "test_accuracy",
            "lr",
            "images_per_s",
            "seconds",
            "time",
        ):
            assert r[key] is not None, key
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert accuracy(last_line) == round(100 * rows[-1]["test_accuracy"], 2)

    # best.npz is the epoch with the best validation accuracy; both load with cnn_gpu.load
    best_epoch = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))["epoch"]
    header = json.loads(np.load(run / "best.npz")["__cnn_gpu__"].tobytes())
    assert header["metadata"]["epoch"] == best_epoch
    assert json.loads(np.load(run / "last.npz")["__cnn_gpu__"].tobytes())["metadata"]["epoch"] == 3
    ckpt = load_checkpoint(run / "checkpoint.npz")
    assert ckpt.position.epoch == 3 and ckpt.extra["best"]["epoch"] == best_epoch
    assert_same_weights(weights(run / "last.npz"), ckpt.model_state())

    # evaluate reproduces the final line from last.npz, the checkpoint, or the run folder (best.npz)
    for target, want in ((run / "last.npz", rows[-1]), (run / "checkpoint.npz", rows[-1]), (run, rows[best_epoch - 1])):
        rc, out, err = main(capsys, "evaluate", "--checkpoint", target)
        assert rc == 0, err
        assert accuracy(out.strip().splitlines()[-1]) == round(100 * want["test_accuracy"], 2)

    if _has("matplotlib"):
        png = run / "curves.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png.unlink()
        rc, out, err = main(capsys, "plot", run)
        assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_same_seed_same_weights_bitwise(tmp_path, capsys):
    for name in ("a", "b"):
        rc, _, err = main(capsys, "train", "--epochs", "2", "--seed", "7", "--run-dir", tmp_path / name, "--quiet")
        assert rc == 0, err
    assert_same_weights(weights(tmp_path / "a" / "last.npz"), weights(tmp_path / "b" / "last.npz"))
    rc, _, _ = main(capsys, "train", "--epochs", "2", "--seed", "8", "--run-dir", tmp_path / "c", "--quiet")
    other = weights(tmp_path / "c" / "last.npz")
    assert not np.array_equal(other["features.0.weight"], weights(tmp_path / "a" / "last.npz")["features.0.weight"])


@pytest.mark.parametrize("stop_at", [(2, 7), (1, 41)], ids=["mid-epoch", "epoch-end"])
def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, capsys, stop_at):
    cfg = dict(epochs=3, seed=2, val_fraction=0.1, quiet=True)
    straight = tmp_path / "straight"
    cli.cmd_train(runs.TrainConfig(run_dir=str(straight), **cfg), out=lambda s: None)

    run = tmp_path / "interrupted"

    def on_step(epoch, step):
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt  # what Ctrl-C amounts to: a stop at the next consistent point

    with pytest.raises(runs.RunStopped) as info:
        cli.cmd_train(
            runs.TrainConfig(run_dir=str(run), **cfg), out=lambda s: None, callbacks=[callbacks.LambdaCallback(on_step=on_step)]
        )
    assert info.value.exit_code == 130
    assert f"resume with: cnn-gpu train --resume {run}" in str(info.value)
    pos = load_checkpoint(run / "checkpoint.npz").position
    steps = 41  # 1295 training digits in batches of 32
    if stop_at[1] < steps:
        assert (pos.epoch, pos.step) == (stop_at[0] - 1, stop_at[1])
        assert f"during epoch {stop_at[0]} after step {stop_at[1]} of {steps}" in str(info.value)
    else:
        assert (pos.epoch, pos.step) == (stop_at[0], 0)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == pos.epoch

    # resume from the command line (other settings come from the run)
    rc, out, err = main(capsys, "train", "--resume", run, "--progress", "plain")
    assert rc == 0, err
    assert f"resuming {run} at epoch {pos.epoch + 1}" in out
    assert_same_weights(weights(straight / "last.npz"), weights(run / "last.npz"))
    assert_same_weights(weights(straight / "best.npz"), weights(run / "best.npz"))
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_accuracy", "lr")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert accuracy(out.strip().splitlines()[-1]) == round(100 * a[-1]["test_accuracy"], 2)
    assert json.loads((run / "config.json").read_text())["resumed"][0]["epoch"] == pos.epoch


def test_resume_keeps_the_runs_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(capsys, "train", "--epochs", "1", "--run-dir", run, "--quiet")[0] == 0
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--resume", str(run), "--lr", "0.1", "--epochs", "5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--lr" in err and "--epochs, --lr" not in err  # --epochs extends a finished run
    # a finished run: nothing to resume; the message says how to extend it (tests/test_cli_own_data.py)
    rc, out, err = main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 2 and "is finished (1 of 1 epoch)" in err and f"--resume {run} --epochs N" in err, err
    # a folder that holds a run is not overwritten by a new one
    rc, _, err = main(capsys, "train", "--epochs", "1", "--run-dir", run)
    assert rc == 2 and "--resume" in err and str(run) in err
    rc, _, err = main(capsys, "train", "--resume", tmp_path / "nope")
    assert rc == 2 and "nope" in err


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnn_gpu", "train", "--epochs", "200", "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():  # wait for the first epoch to finish
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Ctrl-C: stopping after the current step" in err
    assert f"resume with: cnn-gpu train --resume {run}" in err
    ckpt = load_checkpoint(run / "checkpoint.npz")
    pos = ckpt.position
    assert pos.epoch >= 1 and (pos.epoch, pos.step) != (200, 0)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == pos.epoch  # metrics of complete epochs only
    assert "test accuracy" not in out


class _BlowUp(optim.LRSchedule):
    """The recipe's rate for the first epoch, then one that overflows the weights."""

    def __init__(self, optimizer, steps_per_epoch):
        self.steps_per_epoch = steps_per_epoch
        super().__init__(optimizer)

    def lr_at(self, step):
        return 1e-3 if step < self.steps_per_epoch + 5 else 1e30


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runs, "make_schedule", lambda cfg, opt, steps: _BlowUp(opt, steps))
    run = tmp_path / "run"
    rc, out, err = main(capsys, "train", "--epochs", "4", "--run-dir", run)
    assert rc == 1
    assert "non-finite training loss" in err and "at epoch 2, step " in err
    step = int(err.split("at epoch 2, step ")[1].split()[0])
    assert 6 <= step <= 45  # the rate goes up for the 6th step of epoch 2: the loss fails there or soon after
    assert f"the last good checkpoint (end of epoch 1) is kept in {run / 'checkpoint.npz'}" in err
    ckpt = load_checkpoint(run / "checkpoint.npz")
    assert ckpt.position.epoch == 1
    assert all(np.isfinite(v).all() for v in ckpt.model_state().values())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert "test accuracy" not in out


def test_training_works_without_matplotlib_and_plot_says_what_is_missing(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    run = tmp_path / "run"
    rc, out, err = main(capsys, "train", "--epochs", "1", "--run-dir", run)
    assert rc == 0, err
    assert "matplotlib" in out and "training goes on" in out
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")
    assert not (run / "curves.png").exists() and (run / "last.npz").exists()
    rc, out, err = main(capsys, "plot", run)
    assert rc == 2 and "needs matplotlib" in err and "pip install" in err
    rc, out, err = main(capsys, "plot", tmp_path / "missing")
    assert rc == 2 and "metrics.jsonl" in err


def test_quiet_prints_only_the_result_and_the_bar_shows_loss_and_speed(tmp_path, capsys, monkeypatch):
    rc, out, _ = main(capsys, "train", "--epochs", "1", "--run-dir", tmp_path / "q", "--quiet")
    assert rc == 0 and len(out.strip().splitlines()) == 1 and out.startswith("test accuracy: ")
    rc, out, _ = main(capsys, "train", "--epochs", "2", "--run-dir", tmp_path / "p", "--progress", "plain")
    assert rc == 0 and sum(line.startswith("epoch ") for line in out.splitlines()) == 2
    pytest.importorskip("tqdm")
    monkeypatch.setattr(callbacks, "REFRESH_S", 0.0)  # refresh the bar's numbers at every step
    rc, out, _ = main(capsys, "train", "--epochs", "1", "--run-dir", tmp_path / "b", "--progress", "bar")
    assert rc == 0
    assert "epoch 1/1" in out and "img/s" in out and "loss" in out and "step" in out
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")


def test_predict_reads_pngs_converted_to_the_models_input(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    run = tmp_path / "run"
    assert main(capsys, "train", "--epochs", "4", "--run-dir", run, "--quiet")[0] == 0
    ds = get_dataset("digits")
    pixels = np.round(ds.x_test[:12, 0].astype(np.float64) * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
    files = []
    for i, img in enumerate(pixels):
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(img, mode="L").save(files[-1])
    # an RGB image four times the size: converted to one channel and shrunk back to 8x8
    rgb = tmp_path / "big_rgb.png"
    Image.fromarray(pixels[0], mode="L").resize((32, 32), Image.NEAREST).convert("RGB").save(rgb)
    rc, out, err = main(capsys, "predict", "--checkpoint", run, *files, rgb, "--top", "2")
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if " class " in ln]
    assert [ln.split(":")[0] for ln in lines] == [str(f) for f in files + [rgb]]
    classes = [int(ln.split(" class ")[1].split()[0]) for ln in lines]
    for ln in lines:  # "file: class c  (c: p, d: q)" with the two top probabilities, sorted
        probs = [float(part.split(": ")[1]) for part in ln.split("(")[1].rstrip(")").split(", ")]
        assert len(probs) == 2 and probs[0] >= probs[1] and 0 <= sum(probs) <= 1.0001
    # the same classes as the library gives for those pixels, scaled and normalised as in training
    model, meta = cli._load_checkpoint(str(run))
    from cnn_gpu.data import normalize

    x = normalize(pixels[:, None].astype(np.float64) * 16 / 255, meta["mean"], meta["std"], meta["scale"])
    assert classes[:12] == list(model.eval()(x).argmax(axis=1))
    assert classes[12] == classes[0]  # the enlarged RGB copy of digit 0 reads the same
    assert sum(c == y for c, y in zip(classes, ds.y_test[:12])) >= 9  # and the model has learnt something
    rc, _, err = main(capsys, "predict", "--checkpoint", run, tmp_path / "missing.png")
    assert rc == 2 and "missing.png" in err
    (tmp_path / "text.png").write_text("not an image")
    rc, _, err = main(capsys, "predict", "--checkpoint", run, tmp_path / "text.png")
    assert rc == 2 and "text.png: not a readable image" in err


def test_models_lists_the_zoo_with_shapes(capsys):
    rc, out, _ = main(capsys, "models")
    assert rc == 0
    assert "lenet5: input 1x28x28, 61,706 parameters" in out
    assert "vgg_small: input 3x32x32" in out and "lenet_digits: input 1x8x8" in out
    rc, out, _ = main(capsys, "models", "lenet5")
    assert rc == 0 and "vgg_small" not in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[2:]}
    assert list(rows) == [f"features.{i}" for i in range(6)] + ["flatten"] + [f"classifier.{i}" for i in range(5)]
    # (output shape, parameters) of each layer, as computed by hand for LeNet-5
    assert [tuple(r[-2:]) for r in rows.values()] == [
        ("6x28x28", "156"),
        ("6x28x28", "0"),
        ("6x14x14", "0"),
        ("16x10x10", "2,416"),
        ("16x10x10", "0"),
        ("16x5x5", "0"),
        ("400", "0"),
        ("120", "48,120"),
        ("120", "0"),
        ("84", "10,164"),
        ("84", "0"),
        ("10", "850"),
    ]
    assert rows["features.0"][1:6] == ["Conv2d", "1->6", "5x5", "pad", "2"]
    rc, _, err = main(capsys, "models", "resnet")
    assert rc == 2 and "resnet" in err
    rc, out, _ = main(capsys, "models", "resnet20")
    assert rc == 0 and "resnet20: input 3x32x32 (any size from 8x8), 272,474 parameters" in out


def test_resnet20_trains_on_any_image_size_from_8x8(tmp_path, capsys, monkeypatch):
    """Global average pooling makes resnet20 size-agnostic: the 8x8 digits train (stages 8 -> 4 -> 2);
    the fixed-size models still refuse other sizes, and resnet20 refuses images below 8x8."""
    from cnn_gpu import models

    rc, out, err = main(
        capsys,
        "train",
        "--dataset",
        "digits",
        "--model",
        "resnet20",
        "--epochs",
        "1",
        "--run-dir",
        tmp_path / "r",
        "--progress",
        "none",
    )
    assert rc == 0, err
    assert accuracy(out.strip().splitlines()[-1]) > 50.0  # ~90% after one epoch
    assert models.accepts_size("resnet20", (28, 28)) and not models.accepts_size("resnet20", (7, 9))
    assert models.accepts_size("lenet5", (28, 28)) and not models.accepts_size("lenet5", (32, 32))
    monkeypatch.setitem(models.ANY_SIZE_FROM, "resnet20", 9)
    rc, _, err = main(capsys, "train", "--dataset", "digits", "--model", "resnet20", "--run-dir", tmp_path / "x")
    assert rc == 2 and "resnet20 expects at least 9x9 inputs, but dataset digits has 8x8 images" in err


def _write_fake_mnist(folder: Path, n_train: int, n_test: int) -> None:
    """The digits, upscaled to 28x28 and written as uncompressed IDX files (MNIST's layout)."""
    ds = get_dataset("digits")

    def big(x):
        up = np.kron(x[:, 0].astype(np.float64) * 255 / 16, np.ones((3, 3)))  # 24x24
        return np.pad(np.round(up), ((0, 0), (2, 2), (2, 2))).astype(np.uint8)

    parts = {"train": (big(ds.x_train[:n_train]), ds.y_train[:n_train]), "t10k": (big(ds.x_test[:n_test]), ds.y_test[:n_test])}
    folder.mkdir()
    for prefix, (x, y) in parts.items():
        (folder / f"{prefix}-images.idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes())
        (folder / f"{prefix}-labels.idx1-ubyte").write_bytes(struct.pack(">II", 0x801, len(y)) + y.astype(np.uint8).tobytes())


def test_mnist_from_data_dir_with_its_recipe(tmp_path, capsys, monkeypatch):
    """--dataset mnist --data-dir: MNIST-shaped files (upscaled digits) train with the MNIST recipe."""
    from cnn_gpu.data import datasets

    monkeypatch.setitem(datasets.REGISTRY, "mnist", dataclasses.replace(datasets.REGISTRY["mnist"], n_train=1400, n_test=350))
    data = tmp_path / "data"
    _write_fake_mnist(data, 1400, 350)
    run = tmp_path / "run"
    # the recipe, with 5 epochs: its 3 epochs are 1,407 steps on real MNIST, but only 33 here
    rc, out, err = main(
        capsys, "train", "--dataset", "mnist", "--data-dir", data, "--run-dir", run, "--progress", "plain", "--epochs", "5"
    )
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert {k: cfg[k] for k in runs.RECIPES["mnist"] if k != "epochs"} == {
        k: v for k, v in runs.RECIPES["mnist"].items() if k != "epochs"
    }
    assert "training lenet5" in out and "(1260 train / 140 val / 350 test)" in out
    acc = accuracy(out.strip().splitlines()[-1])
    assert acc >= 85.0  # 90-95% over seeds 0-4 (chance: 10%)
    rc, out, err = main(
        capsys, "train", "--dataset", "mnist", "--data-dir", data, "--model", "vgg_small", "--run-dir", tmp_path / "x"
    )
    assert rc == 2 and "vgg_small expects 32x32" in err


def test_bad_training_flags_name_the_argument(tmp_path, capsys):
    for argv, words in (
        (["--val-fraction", "1"], ["--val-fraction", "expected a fraction in [0, 1)", "got 1"]),
        (["--warmup", "x"], ["--warmup", "'x'"]),
        (["--seed", "-1"], ["--seed", "non-negative", "-1"]),
        (["--momentum", "1.5"], ["--momentum", "1.5"]),
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(["train", "--run-dir", str(tmp_path / "r"), *argv])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    with pytest.raises(ValueError, match="nesterov: expected True or False, got 'yes'"):
        runs.TrainConfig(nesterov="yes").resolved()
    assert not (tmp_path / "r").exists()  # nothing was written


def test_importing_cnn_gpu_stays_light():
    code = (
        "import sys, cnn_gpu, cnn_gpu.cli, cnn_gpu.runs, cnn_gpu.checkpoint, cnn_gpu.train; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'PIL', 'sklearn', 'tqdm')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
