"""Training checkpoints: contents, atomic writes, exact restore, clear errors for bad files."""

import os
import zipfile

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import checkpoint as ck
from cnn_gpu import models, nn, optim
from cnn_gpu.data import DataLoader
from cnn_gpu.train import Position, fit


def _objects(seed=1, model_fn=None):
    cnn_gpu.manual_seed(seed)
    model = (model_fn or models.lenet_digits)()
    opt = optim.Adam(model, 1e-3)
    sched = optim.OneCycleLR(opt, max_lr=1e-3, total_steps=40)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    loader = DataLoader(x, y, 8, shuffle=True, seed=4)
    return model, opt, sched, loader


def _trained_checkpoint(path, epochs=2):
    model, opt, sched, loader = _objects()
    fit(model, opt, loader, epochs, scheduler=sched)
    ck.save_checkpoint(
        path,
        model,
        opt,
        sched,
        position=Position(epochs),
        loader=loader,
        config={"seed": 1, "epochs": 4},
        metadata={"dataset": "synthetic"},
        extra={"best": {"value": 0.5}},
    )
    return model, opt, sched, loader


def test_checkpoint_holds_everything_and_restores_exactly(tmp_path):
    path = tmp_path / "checkpoint.npz"
    model, opt, sched, loader = _trained_checkpoint(path)

    # readable with plain NumPy, no pickles
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
    assert {
        "model/features.0.weight",
        "optim/features.0.weight/exp_avg",
        "optim/features.0.weight/exp_avg_sq",
        "__cnn_gpu__",
    } <= names
    c = ck.load_checkpoint(path)
    h = c.header
    assert h["format"] == "cnn_gpu.checkpoint" and h["version"] == 1
    assert h["position"]["epoch"] == 2 and h["position"]["step"] == 0 and h["global_step"] == 10
    assert h["optimizer"]["type"] == "Adam" and h["optimizer"]["step"] == 10
    assert h["schedule"] == {"type": "OneCycleLR", "last_step": 10, "base_lr": sched.base_lr}
    assert h["rng"]["loader"] == {"seed": 4, "shuffle": True, "batch_size": 8, "num_examples": 40, "steps_per_epoch": 5}
    drops = h["rng"]["dropout"]
    assert set(drops) == {"classifier.0", "classifier.3"} and all(d["calls"] == 10 for d in drops.values())
    assert "bit_generator" in h["rng"]["generator"]
    assert h["config"] == {"seed": 1, "epochs": 4} and c.extra["best"]["value"] == 0.5

    # restore into fresh objects, train two more epochs: same as training four straight
    m2, o2, s2, l2 = _objects(seed=99)  # other initial weights and dropout seeds: all overwritten
    pos = ck.restore(c, m2, o2, s2, l2)
    assert (pos.epoch, pos.step) == (2, 0) and o2.step_count == 10 and s2.last_step == 10 and o2.lr == opt.lr
    fit(m2, o2, l2, 4, scheduler=s2, position=pos)
    fit(model, opt, loader, 4, scheduler=sched, position=Position(2))
    for (name, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)

    # the architecture alone rebuilds a usable model
    m3 = c.build_model()
    np.testing.assert_array_equal(m3.state_dict()["classifier.4.weight"], c.arrays["model/classifier.4.weight"])


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.npz"
    model, opt, sched, loader = _trained_checkpoint(path, epochs=1)
    before = path.read_bytes()
    fit(model, opt, loader, 2, scheduler=sched, position=Position(1))

    real_savez = np.savez

    def savez_then_die(f, **arrays):
        real_savez(f, **arrays)  # a complete archive in the temporary file...
        f.truncate(f.tell() // 2)  # ...half written when the "crash" comes
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck.np, "savez", savez_then_die)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(path, model, opt, sched, position=Position(2), loader=loader)
    assert path.read_bytes() == before  # the old checkpoint, untouched
    assert ck.load_checkpoint(path).position.epoch == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]  # no temporary file left behind

    # a crash between writing and renaming (e.g. in fsync) also keeps the old file
    monkeypatch.setattr(ck.np, "savez", real_savez)

    def fsync_dies(fd):
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(os, "fsync", fsync_dies)
    with pytest.raises(OSError, match="power cut"):
        ck.save_checkpoint(path, model, opt, sched, position=Position(2), loader=loader)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.npz"
    _trained_checkpoint(path, epochs=1)
    c = ck.load_checkpoint(path)
    other, opt, sched, loader = _objects(model_fn=lambda: models.lenet5())
    with pytest.raises(ValueError, match="another architecture") as info:
        ck.restore(c, other, opt, sched, loader)
    msg = str(info.value)
    assert str(path) in msg and "Conv2d(in_channels=1, out_channels=6" in msg and "out_channels=32" in msg
    # same layers, other widths
    cnn_gpu.manual_seed(0)
    narrow = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match="another architecture"):
        ck.restore(c, narrow)
    # float64 model of the same architecture
    m64 = models.lenet_digits(dtype=np.float64)
    with pytest.raises(ValueError, match="float64"):
        ck.restore(c, m64)
    # other training data (number of examples / batches)
    model, opt, sched, _ = _objects()
    small = DataLoader(np.zeros((16, 1, 8, 8), np.float32), np.zeros(16, np.int64), 8)
    with pytest.raises(ValueError, match="num_examples"):
        ck.restore(c, model, opt, sched, small)


def test_truncated_or_corrupted_checkpoints_are_clear_errors(tmp_path):
    good = tmp_path / "checkpoint.npz"
    _trained_checkpoint(good, epochs=1)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npz.*(truncated or corrupted)"):
        ck.load_checkpoint(truncated)

    # flip bytes inside one stored weight array: the zip CRC or our SHA-256 catches it
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("model/classifier.4.weight.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    flipped = bytearray(data)
    flipped[start : start + 8] = bytes(b ^ 0xFF for b in flipped[start : start + 8])
    corrupted = tmp_path / "corrupted.npz"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted.npz") as info_err:
        ck.load_checkpoint(corrupted)
    assert "corrupted" in str(info_err.value)

    # an array swapped for another of the same shape (valid zip, valid CRC): only the checksum sees it
    arrays = dict(np.load(good, allow_pickle=False))
    arrays["model/classifier.4.bias"] = arrays["model/classifier.4.bias"] + 1
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    with pytest.raises(ValueError, match="checksum mismatch"):
        ck.load_checkpoint(tampered)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(ValueError, match="garbage.npz"):
        ck.load_checkpoint(garbage)

    # a model file is not a checkpoint (and says so)
    model_file = tmp_path / "model.npz"
    cnn_gpu.save(models.lenet_digits(), model_file)
    with pytest.raises(ValueError, match="cnn_gpu.checkpoint"):
        ck.load_checkpoint(model_file)
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.npz")
