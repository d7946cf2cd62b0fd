"""Hostile model files and checkpoints: crafted headers, huge size claims, deep nesting,
compression bombs, lying members. Every one is a ValueError naming the file and the field, found
before anything large is built or decompressed (memory measured with tracemalloc)."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest

import cnn_gpu
import cnn_gpu.cli
from cnn_gpu import checkpoint, nn, optim, serialization
from cnn_gpu.archive import Archive
from cnn_gpu.train import Position


def small_model():
    cnn_gpu.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.npz"
    serialization.save(small_model(), path)
    return path


def write_npz(path, header, arrays):
    np.savez(path, __cnn_gpu__=serialization.encode_header(header), **arrays)


def model_header(arch, dtype="float32", **extra):
    return {"format": "cnn_gpu.model", "version": 1, "dtype": dtype, "architecture": arch, "metadata": {}, **extra}


def linear(i, o, bias=True):
    return {"type": "Linear", "config": {"in_features": i, "out_features": o, "bias": bias}}


def peak_mib(fn):
    tracemalloc.start()
    try:
        fn()
    except ValueError as exc:
        err = exc
    else:
        err = None
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return err, peak


def test_huge_size_claims_are_refused_before_anything_is_built(tmp_path):
    path = tmp_path / "huge.npz"
    arch = {
        "type": "Sequential",
        "children": [
            ["0", linear(100_000, 100_000)],
            ["1", {"type": "Conv2d", "config": {"in_channels": 50_000, "out_channels": 50_000, "kernel_size": [9, 9]}}],
        ],
    }
    write_npz(path, model_header(arch), {"0.weight": np.zeros((2, 2), np.float32), "0.bias": np.zeros(2, np.float32)})
    err, peak = peak_mib(lambda: serialization.load(path))
    assert err is not None and str(path) in str(err)
    assert "weights do not match the saved architecture" in str(err)
    assert "212,500,150,000 parameters" in str(err), str(err)  # 1e10 + 1e5 + 50000*50000*81 + 50000
    assert peak < 20, f"{peak:.1f} MiB used to refuse a file of a few hundred bytes"


@pytest.mark.parametrize(
    "arch,field",
    [
        (linear(-3, 4), "architecture.config.in_features"),
        (linear(3, 2**40), "architecture.config.out_features"),
        (linear(3.5, 4), "architecture.config.in_features"),
        ({"type": "Linear", "config": {"in_features": 3, "out_features": 4, "evil": 1}}, "architecture.config.evil"),
        (
            {"type": "Conv2d", "config": {"in_channels": 1, "out_channels": 2, "kernel_size": [3, 0]}},
            "architecture.config.kernel_size",
        ),
        ({"type": "Conv2d", "config": {"in_channels": 1, "out_channels": 2}}, "architecture.config.kernel_size"),
        ({"type": "Dropout", "config": {"p": float("nan")}}, "architecture.config.p"),
        ({"type": "MaxPool2d", "config": {"kernel_size": 100_000}}, "architecture.config.kernel_size"),
        ({"type": "Dropout", "config": {"p": 3.0}}, "architecture.config"),  # the layer's own check, named
        ({"type": "os.system"}, "architecture.type"),
        ({"type": 7}, "architecture"),
        ([1, 2], "architecture"),
        (None, "architecture"),
        ({"type": "Sequential"}, "architecture.children"),
        ({"type": "Sequential", "children": [["a", linear(2, 2)], ["a", linear(2, 2)]]}, "architecture.children[1]"),
        ({"type": "Sequential", "children": [["a.b", linear(2, 2)]]}, "architecture.children[0]"),
        ({"type": "Sequential", "children": [["a", {"type": "ReLU", "config": [1]}]]}, "architecture.children[0][1].config"),
    ],
)
def test_malformed_architecture_is_a_value_error_naming_the_field(tmp_path, arch, field):
    path = tmp_path / "bad.npz"
    write_npz(path, model_header(arch), {})
    with pytest.raises(ValueError) as info:
        serialization.load(path)
    assert str(path) in str(info.value) and field in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "header,field",
    [
        ([1, 2, 3], "__cnn_gpu__"),
        ("text", "__cnn_gpu__"),
        (dict(model_header(linear(2, 2)), dtype="int8"), "dtype"),
        (dict(model_header(linear(2, 2)), dtype=None), "dtype"),
        (dict(model_header(linear(2, 2)), version="1"), "version"),
        (dict(model_header(linear(2, 2)), version=True), "version"),
        (dict(model_header(linear(2, 2)), metadata=[1]), "metadata"),
        ({"format": "cnn_gpu.model", "version": 1, "dtype": "float32"}, "architecture"),
    ],
)
def test_malformed_header_fields(tmp_path, header, field):
    path = tmp_path / "bad.npz"
    np.savez(path, __cnn_gpu__=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(ValueError) as info:
        serialization.load(path)
    assert str(path) in str(info.value) and field in str(info.value), str(info.value)


@pytest.mark.parametrize("depth", [40, 20_000])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, depth):
    path = tmp_path / "deep.npz"
    text = '{"type": "Sequential", "children": [["a", ' * depth + '{"type": "ReLU"}' + "]]}" * depth
    header = '{"format": "cnn_gpu.model", "version": 1, "dtype": "float32", "architecture": ' + text + "}"
    np.savez(path, __cnn_gpu__=np.frombuffer(header.encode(), np.uint8))
    with pytest.raises(ValueError, match=r"deep.npz: .*(levels|not valid JSON)"):
        serialization.load(path)
    with pytest.raises(ValueError, match="deep.npz"):
        cnn_gpu.cli._load_checkpoint(str(path))


def npy_bytes_header(shape, dtype=np.float32) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def test_compression_bomb_is_refused_before_decompressing(tmp_path, model_file):
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        with dst.open("zeros.npy", "w", force_zip64=True) as f:
            f.write(npy_bytes_header(((64 << 20) // 8,), np.float64))
            chunk = bytes(1 << 20)
            for _ in range(64):
                f.write(chunk)
    assert bomb.stat().st_size < 1 << 20
    err, peak = peak_mib(lambda: serialization.load(bomb))
    assert err is not None and "bomb.npz" in str(err) and "compressed" in str(err), err
    assert peak < 10


def test_a_member_that_lies_about_its_size_is_refused(tmp_path, model_file):
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(liar, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "0.weight.npy":  # claims (10**9, 1, 3, 3), holds 18 floats
                data = npy_bytes_header((10**9, 1, 3, 3)) + bytes(72)
            dst.writestr(info.filename, data)
    err, peak = peak_mib(lambda: serialization.load(liar))
    assert err is not None and "liar.npz" in str(err) and "'0.weight'" in str(err), err
    assert peak < 10


def test_object_and_oversized_header_members_are_refused(tmp_path, model_file):
    obj = tmp_path / "obj.npz"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(obj, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("pickled.npy", npy_bytes_header((1,), object) + b"x" * 8)
    with pytest.raises(ValueError, match=r"obj.npz: .*(numeric array|unexpected \['pickled'\])"):
        serialization.load(obj)
    big = tmp_path / "bighead.npz"
    np.savez(big, __cnn_gpu__=np.zeros(5 << 20, np.uint8))
    with pytest.raises(ValueError, match="bighead.npz: .*member '__cnn_gpu__': expected at most"):
        serialization.load(big)


def test_only_the_expected_members_are_read(model_file, tmp_path, monkeypatch):
    read = []
    original = Archive.read

    def spy(self, name, *args, **kwargs):
        read.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(Archive, "read", spy)
    serialization.load(model_file)
    assert sorted(read) == sorted(["__cnn_gpu__", "0.weight", "0.bias", "3.weight", "3.bias"])
    extra = tmp_path / "extra.npz"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(extra, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("junk.npy", npy_bytes_header((4,)) + bytes(16))
    read.clear()
    with pytest.raises(ValueError, match=r"extra.npz: weights do not match .*unexpected \['junk'\]"):
        serialization.load(extra)
    assert "junk" not in read


@pytest.fixture
def ckpt_file(tmp_path):
    model = small_model()
    opt = optim.Adam(model, 1e-3)
    path = tmp_path / "ckpt.npz"
    checkpoint.save_checkpoint(path, model, opt, position=Position(epoch=1))
    return path


def rewrite_header(src, dst, change):
    arrays = serialization.read_npz(src)
    header = json.loads(arrays.pop("__cnn_gpu__").tobytes())
    change(header)
    write_npz(dst, header, arrays)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda h: h["position"].update(epoch=-1), "position.epoch"),
        (lambda h: h["position"].update(step="3"), "position.step"),
        (lambda h: h.update(position=[1]), "position"),
        (lambda h: h.update(optimizer={"type": "Adam"}), "optimizer"),
        (lambda h: h.update(sha256=5), "sha256"),
        (lambda h: h.update(rng="x"), "rng"),
        (lambda h: h.update(schedule=3), "schedule"),
        (lambda h: h["architecture"]["children"][0][1]["config"].update(out_channels=10**6), "weights do not match"),
    ],
)
def test_malformed_checkpoint_headers(tmp_path, ckpt_file, change, field):
    bad = tmp_path / "bad_ckpt.npz"
    rewrite_header(ckpt_file, bad, change)
    with pytest.raises(ValueError) as info:
        checkpoint.load_checkpoint(bad)
    assert str(bad) in str(info.value) and field in str(info.value), str(info.value)


def test_checkpoint_members_are_checked(tmp_path, ckpt_file):
    arrays = serialization.read_npz(ckpt_file)
    header = json.loads(arrays.pop("__cnn_gpu__").tobytes())
    bad = tmp_path / "extra_ckpt.npz"
    write_npz(bad, header, dict(arrays, junk=np.zeros(3)))
    with pytest.raises(ValueError, match=r"extra_ckpt.npz: unexpected members \['junk'\]"):
        checkpoint.load_checkpoint(bad)
    odd = dict(arrays)
    odd["optim/0.weight/exp_avg"] = np.zeros((7,), np.float32)
    write_npz(bad, header, odd)
    with pytest.raises(ValueError, match=r"extra_ckpt.npz: member 'optim/0.weight/exp_avg': expected shape \(2, 1, 3, 3\)"):
        checkpoint.load_checkpoint(bad)
    stray = dict(arrays, **{"optim/nothere/exp_avg": np.zeros(2, np.float32)})
    write_npz(bad, header, stray)
    with pytest.raises(ValueError, match=r"extra_ckpt.npz: member 'optim/nothere/exp_avg'"):
        checkpoint.load_checkpoint(bad)


def test_hostile_checkpoint_is_refused_before_building(tmp_path, ckpt_file):
    bad = tmp_path / "huge_ckpt.npz"
    rewrite_header(ckpt_file, bad, lambda h: h["architecture"]["children"][3][1]["config"].update(in_features=10**9))
    err, peak = peak_mib(lambda: checkpoint.load_checkpoint(bad))
    assert err is not None and "huge_ckpt.npz" in str(err) and "weights do not match" in str(err)
    assert peak < 10


def test_truncated_checkpoints_name_the_file(tmp_path, ckpt_file):
    raw = ckpt_file.read_bytes()
    for keep in (0.0, 0.3, 0.7, 0.99):
        bad = tmp_path / f"cut{keep}.npz"
        bad.write_bytes(raw[: int(len(raw) * keep)])
        with pytest.raises(ValueError, match=f"cut{keep}.npz"):
            checkpoint.load_checkpoint(bad)


def test_valid_files_still_load(model_file, ckpt_file):
    model = serialization.load(model_file)
    assert serialization.describe(model) == serialization.describe(small_model())
    ckpt = checkpoint.load_checkpoint(ckpt_file)
    restored = ckpt.build_model()
    assert restored.num_parameters() == small_model().num_parameters()
    assert checkpoint.read_header(ckpt_file)["format"] == "cnn_gpu.checkpoint"
