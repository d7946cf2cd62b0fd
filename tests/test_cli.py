"""The command line end to end, and the training loop."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import cli, models, nn, optim
from cnn_gpu.data import DataLoader, get_dataset
from cnn_gpu.train import evaluate, fit

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "cnn_gpu", *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_train_one_epoch_save_evaluate_predict(tmp_path):
    model_path = tmp_path / "digits.npz"
    r = _run("train", "--epochs", "1", "--seed", "3", "--save", str(model_path), "--run-dir", str(tmp_path / "run"))
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy: ") and last.endswith(f"(the last epoch's model, {tmp_path / 'run' / 'last.npz'})")
    acc_train = last.split()[2]
    assert 0.0 <= float(acc_train.rstrip("%")) <= 100.0
    assert model_path.exists()

    # evaluate reproduces exactly the accuracy printed at the end of training, from the run's last.npz and --save's copy
    for path in (model_path, tmp_path / "run" / "last.npz"):
        r = _run("evaluate", "--checkpoint", str(path))
        assert r.stdout.strip().splitlines()[-1].startswith(f"test accuracy: {acc_train} ({path}, 359 test images")

    # predict on .npy inputs: the first test digits, raw 0..16 pixel values
    ds = get_dataset("digits")
    np.save(tmp_path / "x.npy", ds.x_test[:4].astype(np.float64))
    r = _run("predict", "--checkpoint", str(model_path), str(tmp_path / "x.npy"))
    lines = [ln for ln in r.stdout.splitlines() if "class" in ln]
    assert len(lines) == 4
    # the same predictions as the library gives
    model = cnn_gpu.load(model_path)
    with np.load(model_path) as z:
        assert z["__cnn_gpu__"].dtype == np.uint8  # the documented JSON header
    classes = [int(ln.split("class")[1].split()[0]) for ln in lines]
    from cnn_gpu.cli import _load_checkpoint, _prepare_data

    _, meta = _load_checkpoint(str(model_path))
    _, xte, _, _ = _prepare_data(ds, meta["mean"], meta["std"])
    model.eval()
    assert classes == list(model(xte[:4]).argmax(axis=1))


def test_default_train_reaches_97_percent_on_digits(tmp_path):
    """`cnn-gpu train` with no arguments: the README's main job (>= 97% on held-out digits)."""
    lines = []
    acc = cli.cmd_train(cli.TrainConfig(run_dir=str(tmp_path / "run")), out=lines.append)
    assert acc >= 0.97, lines[-3:]
    assert lines[-1].startswith(f"test accuracy: {100 * acc:.2f}% (the last epoch's model, ")


def test_info_runs_without_gpu():
    r = _run("info")
    assert "numpy" in r.stdout and "backends:" in r.stdout
    # every kernel entry point is listed, per file, as found in kernels/*.cu
    from cnn_gpu import cuda

    for fname, names in cuda.list_kernels().items():
        assert f"{fname}.cu: {', '.join(names)}" in r.stdout
    assert "im2col_f32" in r.stdout and "adam_update_f64" in r.stdout


def test_bad_arguments_exit_nonzero():
    r = _run("train", "--epochs", "0", check=False)
    assert r.returncode != 0 and "--epochs" in r.stderr
    r = _run("evaluate", "--checkpoint", "/nonexistent/model.npz", check=False)
    assert r.returncode == 2 and "model.npz" in r.stderr


def test_cupy_backend_without_gpu_is_a_clear_error(tmp_path):
    if cnn_gpu.cupy_available():
        pytest.skip("a GPU is present")
    r = _run("train", "--epochs", "1", "--backend", "cupy", "--run-dir", str(tmp_path / "run"), check=False)
    assert r.returncode == 2 and "cupy" in r.stderr


def test_fit_lowers_the_loss_and_seeded_runs_are_identical(xp):
    def run():
        with cnn_gpu.use_backend(xp.__name__):
            cnn_gpu.manual_seed(7)
            rng = np.random.default_rng(0)
            x = xp.asarray(rng.standard_normal((64, 1, 8, 8)).astype(np.float32))
            y = xp.asarray((rng.integers(0, 3, 64)).astype(np.int64))
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
            opt = optim.SGD(model, 0.05, momentum=0.9)
            hist = fit(model, opt, DataLoader(x, y, 16, shuffle=True, seed=1), 8)
            return hist, cnn_gpu.to_numpy(model.state_dict()["4.weight"]).copy(), evaluate(model, x, y)

    h1, w1, ev1 = run()
    h2, w2, _ = run()
    assert h1[-1].train_loss < 0.7 * h1[0].train_loss
    np.testing.assert_array_equal(w1, w2)  # same seed, same weights, bitwise
    assert ev1[1] > 0.5
    assert [h.epoch for h in h1] == list(range(1, 9))


def test_dataloader_batches_cover_every_example_once(xp):
    x = xp.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = xp.arange(10)
    loader = DataLoader(x, y, 4, shuffle=True, seed=0)
    assert len(loader) == 3
    seen = np.concatenate([cnn_gpu.to_numpy(yb) for _, yb in loader.epoch(0)])
    assert sorted(seen) == list(range(10))
    other = np.concatenate([cnn_gpu.to_numpy(yb) for _, yb in loader.epoch(1)])
    assert not np.array_equal(seen, other)  # a new order per epoch
    again = np.concatenate([cnn_gpu.to_numpy(yb) for _, yb in loader.epoch(0)])
    np.testing.assert_array_equal(seen, again)  # and the same order for the same (seed, epoch)
    assert len(DataLoader(x, y, 4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="y"):
        DataLoader(x, y[:9], 4)


def test_models_have_the_documented_shapes():
    for name, (factory, shape) in models.MODELS.items():
        m = factory(in_channels=shape[0], num_classes=10)
        out = m(np.zeros((2,) + shape, dtype=np.float32))
        assert out.shape == (2, 10), name
    assert models.lenet5().num_parameters() == 61706
    assert models.vgg_small().num_parameters() == (3 * 9 * 32 + 32) + (32 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (
        64 * 9 * 64 + 64
    ) + (4096 * 256 + 256) + (256 * 10 + 10)
