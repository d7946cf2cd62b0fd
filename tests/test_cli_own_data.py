"""Your own data through the command line (issue 22): `train --data` on each layout, the model files
it writes (classes, input shape, normalisation), `evaluate --data`, `predict` with class names and
a CSV for a folder, models saved by the library, resume-extend, and the final test-accuracy line.
Tiny data (8x8 images, a few dozen of them), one or two epochs: each test takes seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import cli, models, nn
from cnn_gpu.checkpoint import load_checkpoint
from cnn_gpu.data import normalize, read_image
from cnn_gpu.train import predict_proba

CLASSES = ("circle", "cross", "square")  # sorted: the folder names are the classes, in this order


def run_cli(capsys, *argv):
    """(exit status, stdout lines, stderr lines) of cli.main in this process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def one_line_error(code, err, *words):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("cnn-gpu ") and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err


def image(k: int, rng, size=(8, 8), rgb=False) -> np.ndarray:
    """Class k's picture: a bright band in row block k on a dark background, with noise (learnable)."""
    a = rng.integers(0, 60, size=size + ((3,) if rgb else ()), dtype=np.uint8)
    rows = slice(k * size[0] // 3, (k + 1) * size[0] // 3)
    a[rows] = 200
    return a


def write_folder(root: Path, per_class=8, size=(8, 8), rgb=False, seed=0, classes=CLASSES) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(image(k % 3, rng, size, rgb)).save(root / name / f"{name}{i}.png")
    return root


def accuracy(line: str) -> float:
    assert line.startswith("test accuracy: "), line
    return float(line.split()[2].rstrip("%"))


def metadata(path: Path) -> dict:
    return json.loads(np.load(path)["__cnn_gpu__"].tobytes())["metadata"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A one-epoch run on a folder of class folders (3 classes x 8 grey 8x8 PNGs), and its output."""
    base = tmp_path_factory.mktemp("own")
    data = write_folder(base / "shapes")
    lines = []
    cli.cmd_train(
        cli.TrainConfig(
            data=str(data),
            epochs=1,
            test_fraction=0.25,
            run_dir=str(base / "run"),
            data_dir=str(base / "cache"),
            progress="plain",
        ),
        out=lines.append,
    )
    return base, data, base / "run", lines


# ------------------------------------------------------------------ the layouts
def test_class_folders_train_with_the_default_model_and_record_the_data(folder_run, capsys):
    base, data, run, lines = folder_run
    assert any(line.startswith("model: lenet_digits, the default for 8x8 images") for line in lines), lines
    assert any(f"on {data} (3 classes, 1x8x8) (15 train / 3 val / 6 test)" in line for line in lines), lines
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert (cfg["data"], cfg["dataset"], cfg["test_fraction"], cfg["model"]) == (str(data), None, 0.25, "lenet_digits")
    assert cfg["image_size"] is None and cfg["channels"] is None
    meta = metadata(run / "last.npz")
    assert meta["classes"] == list(CLASSES) and meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 3
    assert len(meta["mean"]) == 1 and meta["scale"] == 255.0 and meta["dataset"] == str(data)
    # the final line names the model it measured, and evaluate on that file agrees, with or without --data
    assert lines[-1].endswith(f"(the last epoch's model, {run / 'last.npz'})")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert accuracy(lines[-1]) == round(100 * row["test_accuracy"], 2)
    for extra in ([], ["--data", data]):  # the run's --data-dir (its decode cache) is the default
        code, out, err = run_cli(capsys, "evaluate", "--checkpoint", run / "last.npz", *extra)
        assert code == 0, err
        assert accuracy(out[-1]) == accuracy(lines[-1]) and "6 test images" in out[-1], out


def test_train_and_test_folders_with_image_size_and_channels(tmp_path, capsys):
    data = tmp_path / "photos"
    write_folder(data / "train", per_class=6, size=(12, 10), rgb=True)
    write_folder(data / "test", per_class=2, size=(12, 10), rgb=True, seed=1)
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        data,
        "--image-size",
        "8",
        "--channels",
        "1",
        "--epochs",
        "1",
        "--val-fraction",
        "0",
        "--run-dir",
        tmp_path / "run",
        "--data-dir",
        tmp_path / "cache",
        "--progress",
        "plain",
    )
    assert code == 0, err
    assert any("(18 train / 6 test)" in line for line in out), out  # the test/ folder is the test split
    assert any("no validation split, so no best.npz" in line for line in out), out
    assert not (tmp_path / "run" / "best.npz").exists()  # best is never chosen on the test set
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert cfg["image_size"] == [8, 8] and cfg["channels"] == 1
    assert metadata(tmp_path / "run" / "last.npz")["input_shape"] == [1, 8, 8]
    # the run folder means last.npz when there is no best.npz; the data is re-opened as training opened it
    code, ev, err = run_cli(capsys, "evaluate", "--checkpoint", tmp_path / "run", "--data-dir", tmp_path / "cache")
    assert code == 0, err
    assert accuracy(ev[-1]) == accuracy(out[-1])


def test_npz_in_nhwc_with_class_names(tmp_path, capsys):
    rng = np.random.default_rng(3)
    y = np.arange(40) % 3
    x = np.stack([image(int(k), rng) for k in y])[..., None]  # (40, 8, 8, 1): NHWC
    np.savez(tmp_path / "arrays.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:], classes=np.array(CLASSES))
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        tmp_path / "arrays.npz",
        "--epochs",
        "2",
        "--run-dir",
        tmp_path / "run",
        "--progress",
        "none",
        "--test-fraction",
        "0.3",
    )
    assert code == 0, err
    assert err == [
        f"cnn-gpu train: note: --test-fraction is not used: {tmp_path / 'arrays.npz'} has its own test split (x_test, y_test)"
    ]  # said, not silently ignored
    meta = metadata(tmp_path / "run" / "last.npz")
    assert meta["classes"] == list(CLASSES) and meta["input_shape"] == [1, 8, 8] and meta["model"] == "lenet_digits"
    code, ev, err = run_cli(capsys, "evaluate", "--checkpoint", tmp_path / "run" / "last.npz")
    assert code == 0, err
    assert accuracy(ev[-1]) == accuracy(out[-1]) and "10 test images" in ev[-1]


def test_a_size_no_model_takes_asks_for_image_size(tmp_path, capsys):
    write_folder(tmp_path / "tiny", per_class=3, size=(6, 6))
    code, _, err = run_cli(
        capsys,
        "train",
        "--data",
        tmp_path / "tiny",
        "--epochs",
        "1",
        "--run-dir",
        tmp_path / "r",
        "--data-dir",
        tmp_path / "cache",
    )
    one_line_error(code, err, "6x6", "--image-size")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ predict
def test_predict_prints_class_names_with_probabilities(folder_run, capsys):
    _, data, run, _ = folder_run
    files = [data / "circle" / "circle0.png", data / "square" / "square1.png"]
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run / "last.npz", *files, "--top-k", "2")
    assert code == 0, err
    model = cnn_gpu.load(run / "last.npz")
    meta = metadata(run / "last.npz")
    x = normalize(np.stack([read_image(f, (8, 8), 1) for f in files]), meta["mean"], meta["std"], 255.0)
    probs = predict_proba(model, x)
    for line, f, row in zip(out, files, probs):
        top = np.argsort(-row, kind="stable")[:2]
        assert line == (
            f"{f}: class {CLASSES[top[0]]}  ({CLASSES[top[0]]}: {row[top[0]]:.3f}, {CLASSES[top[1]]}: {row[top[1]]:.3f})"
        )
    code, out3, err = run_cli(capsys, "predict", "--checkpoint", run / "last.npz", files[0], "--top", "3")  # the old flag
    assert code == 0, err
    assert out3[0].count(": 0.") + out3[0].count(": 1.") == 3 and all(c in out3[0] for c in CLASSES)


def test_predict_on_a_folder_writes_a_csv(folder_run, tmp_path, capsys, monkeypatch):
    _, data, run, _ = folder_run
    target = tmp_path / "preds.csv"
    code, out, err = run_cli(
        capsys, "predict", "--checkpoint", run / "last.npz", data, "--out", target, "--top-k", "2", "--batch-size", "5"
    )  # several batches
    assert code == 0, err
    assert out[-1].startswith(f"wrote {target}: 24 images; predicted ")
    with target.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class", "probability", "class_2", "probability_2"]
    files = sorted(data.rglob("*.png"))
    assert [r[0] for r in rows[1:]] == [str(f) for f in files]
    meta = metadata(run / "last.npz")
    x = normalize(np.stack([read_image(f, (8, 8), 1) for f in files]), meta["mean"], meta["std"], 255.0)
    probs = predict_proba(cnn_gpu.load(run / "last.npz"), x)
    for r, row in zip(rows[1:], probs):  # batches of 5 against one of 24: float32 rounding may differ
        top = np.argsort(-row, kind="stable")[:2]
        assert [r[1], r[3]] == [CLASSES[top[0]], CLASSES[top[1]]]
        assert [float(r[2]), float(r[4])] == pytest.approx([row[top[0]], row[top[1]]], abs=2e-6)
    # the default file, in the current folder; no temporary file is left beside it
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run, data / "cross")
    assert code == 0, err
    assert out[-1].startswith("wrote predictions.csv: 8 images")
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 9  # the header and 8 rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "preds.csv"]


def test_predict_errors_are_one_line(folder_run, tmp_path, capsys):
    _, data, run, _ = folder_run
    code, _, err = run_cli(capsys, "predict", "--checkpoint", run, data, "--out", tmp_path / "no" / "p.csv")
    one_line_error(code, err, "--out", str(tmp_path / "no"), "does not exist")
    assert not (tmp_path / "no").exists()
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "predict", "--checkpoint", run, tmp_path / "empty")
    one_line_error(code, err, "empty", "expected images")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code, _, err = run_cli(capsys, "predict", "--checkpoint", run, tmp_path / "bad.png")
    one_line_error(code, err, "bad.png")


# ------------------------------------------------------------------ evaluate on other data
def test_evaluate_refuses_other_classes(folder_run, tmp_path, capsys):
    base, _, run, _ = folder_run
    write_folder(tmp_path / "animals", per_class=4, classes=("cat", "dog", "eel"))
    code, _, err = run_cli(
        capsys, "evaluate", "--checkpoint", run, "--data", tmp_path / "animals", "--data-dir", tmp_path / "cache"
    )
    one_line_error(code, err, "animals", "[circle, cross, square]", "[cat, dog, eel]")
    write_folder(tmp_path / "two", per_class=4, classes=("circle", "cross"))
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", run, "--data", tmp_path / "two", "--data-dir", tmp_path / "cache")
    one_line_error(code, err, "two", "[circle, cross]")
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", run, "--data", tmp_path / "two", "--dataset", "digits")
    one_line_error(code, err, "--data and --dataset")


def test_evaluate_resizes_other_images_to_the_model(folder_run, tmp_path, capsys):
    """Other images of the same classes, larger and in colour, are made to fit the model's 1x8x8."""
    _, _, run, _ = folder_run
    write_folder(tmp_path / "big", per_class=4, size=(16, 16), rgb=True, seed=5)
    code, out, err = run_cli(
        capsys, "evaluate", "--checkpoint", run, "--data", tmp_path / "big", "--data-dir", tmp_path / "cache"
    )
    assert code == 0, err
    assert "of " + str(tmp_path / "big") in out[-1] and 0.0 <= accuracy(out[-1]) <= 100.0


# ------------------------------------------------------------------ models saved by the library
def test_a_library_model_works_with_predict_evaluate_and_export(folder_run, tmp_path, capsys):
    base, data, _, _ = folder_run
    cnn_gpu.manual_seed(0)
    ds = cnn_gpu.data.ImageFolder(data, test_fraction=0.25, cache_dir=base / "cache")
    mean, std = cnn_gpu.data.channel_stats(ds.x_train, ds.scale)
    model = models.get_model("lenet_digits", in_channels=1, num_classes=3)
    model.eval().forward(normalize(ds.x_train[:2], mean, std, ds.scale))  # any forward records the input shape
    path = tmp_path / "mine.npz"
    cnn_gpu.save(model, path, classes=ds.classes, metadata={"mean": mean, "std": std, "scale": ds.scale})
    meta = metadata(path)
    assert meta["input_shape"] == [1, 8, 8] and meta["classes"] == list(CLASSES) and meta["num_classes"] == 3
    assert meta["model"] == "lenet_digits" and meta["mean"] == pytest.approx(list(mean))
    code, out, err = run_cli(capsys, "predict", "--checkpoint", path, data / "cross" / "cross0.png")
    assert code == 0 and out[0].split(": class ")[1].split()[0] in CLASSES, err
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", path, "--data", data, "--data-dir", base / "cache")
    assert code == 0 and "test images of" in out[-1], err
    pytest.importorskip("onnx")
    code, out, err = run_cli(capsys, "export", path, tmp_path / "mine.onnx")
    assert code == 0 and "input [batch, 1, 8, 8]" in out[-1], err
    # loaded and saved again, it keeps what it knew; the classes must fit the outputs
    again = cnn_gpu.load(path)
    assert again.last_input_shape == (1, 8, 8)
    cnn_gpu.save(again, tmp_path / "again.npz")
    assert metadata(tmp_path / "again.npz")["input_shape"] == [1, 8, 8]
    with pytest.raises(ValueError, match="classes: expected 3 names"):
        cnn_gpu.save(model, tmp_path / "x.npz", classes=["a", "b"])


def test_a_model_that_never_ran_records_no_shape_and_export_says_what_to_pass(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))  # not a zoo model, no forward
    cnn_gpu.save(model, tmp_path / "m.npz")
    assert "input_shape" not in metadata(tmp_path / "m.npz") and cnn_gpu.load(tmp_path / "m.npz").last_input_shape is None
    code, _, err = run_cli(capsys, "export", tmp_path / "m.npz", tmp_path / "m.onnx")
    one_line_error(code, err, "--input-shape")


# ------------------------------------------------------------------ resume: finished runs, extending
def test_a_finished_run_says_how_to_extend_and_refuses_fewer_epochs(folder_run, capsys):
    _, _, run, _ = folder_run
    code, out, err = run_cli(capsys, "train", "--resume", run / "checkpoint.npz")
    one_line_error(code, err, f"{run} is finished (1 of 1 epoch)", f"cnn-gpu train --resume {run} --epochs N, with N > 1")
    assert out == []
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", "1")
    one_line_error(code, err, "is finished")


def _digits(tmp_path, capsys, name, *argv):
    """cnn-gpu train on the digits into tmp_path/name (a new run), or continuing it (argv has --resume)."""
    where = () if "--resume" in argv else ("--run-dir", tmp_path / name)
    code, out, err = run_cli(capsys, "train", *where, "--progress", "plain", *argv)
    assert code == 0, err
    return out


def _weights(path):
    return cnn_gpu.load(path).state_dict()


def test_extending_without_a_schedule_equals_the_longer_run_bitwise(tmp_path, capsys):
    flags = ("--schedule", "none", "--seed", "4")
    _digits(tmp_path, capsys, "straight", "--epochs", "2", *flags)
    _digits(tmp_path, capsys, "short", "--epochs", "1", *flags)
    out = _digits(tmp_path, capsys, "short", "--resume", tmp_path / "short", "--epochs", "2")  # run dir via --resume
    assert any(f"extending {tmp_path / 'short'} from 1 to 2 epochs" in line for line in out), out
    a, b = _weights(tmp_path / "straight" / "last.npz"), _weights(tmp_path / "short" / "last.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    doc = json.loads((tmp_path / "short" / "config.json").read_text())
    assert doc["config"]["epochs"] == 2 and doc["resumed"][-1]["extended"] == {"from_epochs": 1, "to_epochs": 2}
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "short")  # now finished at 2
    one_line_error(code, err, "is finished (2 of 2 epochs)", "N > 2")


def test_extending_a_one_cycle_run_restarts_the_schedule_over_the_added_epochs(tmp_path, capsys):
    _digits(tmp_path, capsys, "run", "--epochs", "1")
    out = _digits(tmp_path, capsys, "run", "--resume", tmp_path / "run", "--epochs", "3")
    assert any("the onecycle schedule starts again over the added epochs" in line for line in out), out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    steps = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["steps_per_epoch"]
    assert ckpt.config["schedule_start"] == 1 and ckpt.header["schedule"]["last_step"] == 2 * steps
    # the first run ended its cycle at the floor; the extension's cycle peaked mid-way and ends at the floor again
    assert rows[0]["lr"] == pytest.approx(rows[2]["lr"]) and rows[1]["lr"] > 100 * rows[0]["lr"]


def test_an_interrupted_extension_resumes_exactly(tmp_path, capsys):
    from cnn_gpu import callbacks, runs

    _digits(tmp_path, capsys, "straight", "--epochs", "1", "--seed", "5")
    _digits(tmp_path, capsys, "straight", "--resume", tmp_path / "straight", "--epochs", "2")
    _digits(tmp_path, capsys, "cut", "--epochs", "1", "--seed", "5")

    def stop(epoch, step):
        if (epoch, step) == (2, 9):
            raise KeyboardInterrupt

    cfg = runs.TrainConfig(epochs=2, progress="none")
    with pytest.raises(runs.RunStopped):
        cli.cmd_train(cfg, out=lambda s: None, resume=str(tmp_path / "cut"), callbacks=[callbacks.LambdaCallback(on_step=stop)])
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.npz").config["schedule_start"] == 1
    _digits(tmp_path, capsys, "cut", "--resume", tmp_path / "cut")
    a, b = _weights(tmp_path / "straight" / "last.npz"), _weights(tmp_path / "cut" / "last.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_extending_an_unfinished_run_is_refused(tmp_path, capsys):
    from cnn_gpu import callbacks, runs

    def stop(epoch, step):
        if (epoch, step) == (1, 5):
            raise KeyboardInterrupt

    with pytest.raises(runs.RunStopped):
        cli.cmd_train(
            runs.TrainConfig(epochs=1, run_dir=str(tmp_path / "run"), progress="none"),
            out=lambda s: None,
            callbacks=[callbacks.LambdaCallback(on_step=stop)],
        )
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--epochs", "3")
    one_line_error(code, err, "stopped in epoch 1 of 1", "finish it first")


def test_best_is_chosen_on_the_validation_split(tmp_path, capsys):
    out = _digits(tmp_path, capsys, "run", "--epochs", "2")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert ckpt.extra["best"]["metric"] == "val_accuracy"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    assert metadata(tmp_path / "run" / "best.npz")["epoch"] == best["epoch"]
    assert any(
        f"best val accuracy {100 * best['val_accuracy']:.2f}% (epoch {best['epoch']}: best.npz)" in line for line in out
    ), out


def test_a_data_run_resumes_on_the_same_data_from_another_folder(tmp_path, capsys, monkeypatch):
    data = write_folder(tmp_path / "shapes", per_class=8)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        capsys, "train", "--data", "shapes", "--epochs", "1", "--run-dir", "run", "--data-dir", "cache", "--progress", "none"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["data"] == str(data)  # absolute
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--epochs", "2", "--progress", "plain")
    assert code == 0, err
    assert any("read from the decode cache" in line for line in out), out  # the same images, not decoded again
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
