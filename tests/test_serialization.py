"""cnn_gpu.serialization: save/load round trips, the documented header, and clear
errors (ValueError naming the path) for truncated, corrupted or mismatched files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import small_net

import cnn_gpu
from cnn_gpu import models, nn, serialization
from cnn_gpu.backend import to_numpy


@pytest.fixture
def saved(tmp_path):
    model = small_net(0)
    path = tmp_path / "model.npz"
    serialization.save(model, path, metadata={"epoch": 3, "note": "unit test"})
    return model, path


def test_round_trip_identical_predictions(xp, rng, tmp_path):
    with cnn_gpu.use_backend(xp.__name__):
        model = small_net(5)
        x = xp.asarray(rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
        y = to_numpy(model(x))
        path = tmp_path / "m.npz"
        cnn_gpu.save(model, path)
        loaded = cnn_gpu.load(path)
    assert type(loaded.features[0].weight.data) is type(x)  # rebuilt on the current backend
    np.testing.assert_array_equal(to_numpy(loaded(x)), y)
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert repr(loaded) == repr(model)


ARCHITECTURES = {
    "lenet5_f64": (lambda: models.lenet5(dtype=np.float64, generator=1), (2, 1, 28, 28)),
    "vgg_small": (lambda: models.vgg_small(generator=2), (2, 3, 32, 32)),
    "every_layer": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=2, bias=False, generator=0),
            nn.LeakyReLU(0.2),
            nn.AvgPool2d(2, 1, 1),
            nn.Tanh(),
            nn.Sigmoid(),
            nn.MaxPool2d(3, 2, 1),
            nn.Flatten(),
            nn.Dropout(0.25, generator=0),
            nn.Linear(2 * 3 * 3, 3, generator=0),
        ),
        (2, 3, 9, 7),
    ),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_round_trip_architectures(rng, tmp_path, name):
    build, shape = ARCHITECTURES[name]
    model = build().eval()
    dtype = model.parameters()[0].dtype
    path = tmp_path / "m.npz"
    serialization.save(model, path)
    loaded = serialization.load(path, backend="numpy").eval()
    for (n, p), (m, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n == m and q.dtype == dtype
        np.testing.assert_array_equal(to_numpy(q.data), to_numpy(p.data))
    x = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert serialization.describe(loaded) == serialization.describe(model)


def test_file_has_documented_header(saved):
    model, path = saved
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        header = json.loads(z["__cnn_gpu__"].tobytes().decode("utf-8"))
        assert z["__cnn_gpu__"].dtype == np.uint8
        np.testing.assert_array_equal(z["features.0.weight"], to_numpy(model.features[0].weight.data))
        assert z["features.0.weight"].dtype == np.float32
    assert files == {"__cnn_gpu__"} | {n for n, _ in model.named_parameters()}
    assert header["format"] == "cnn_gpu.model" and header["version"] == 1 and header["dtype"] == "float32"
    assert header["metadata"] == {"epoch": 3, "note": "unit test", "num_classes": 10}  # + what save knows: the outputs
    arch = header["architecture"]
    assert arch["type"] == "Sequential"
    assert [name for name, _ in arch["children"]] == ["features", "flatten", "classifier"]
    conv = arch["children"][0][1]["children"][0][1]
    assert conv == {
        "type": "Conv2d",
        "config": {
            "in_channels": 1,
            "out_channels": 4,
            "kernel_size": [3, 3],
            "stride": [1, 1],
            "padding": [1, 1],
            "dilation": [1, 1],
            "bias": True,
        },
    }


def test_save_is_atomic_and_leaves_no_temp_files(saved, tmp_path):
    model, path = saved
    serialization.save(model, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_raises_value_error_with_path(saved, tmp_path, keep):
    _, path = saved
    raw = path.read_bytes()
    bad = tmp_path / f"truncated_{keep}.npz"
    bad.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError) as info:
        serialization.load(bad)
    assert str(bad) in str(info.value)


def test_corrupted_files_raise_value_error_with_path(saved, tmp_path):
    """Flip or zero bytes all over the file: every load either raises ValueError naming the
    path, or (corruption of bytes that carry nothing, e.g. zeros over zeros) returns the model."""
    model, path = saved
    raw = path.read_bytes()
    bad = tmp_path / "corrupt.npz"
    r = np.random.default_rng(0)
    raised = 0
    for trial in range(120):
        b = bytearray(raw)
        i = int(r.integers(0, len(raw) - 8))
        if trial % 2:
            b[i] ^= 0xFF
        else:
            b[i : i + 8] = bytes(8)
        bad.write_bytes(bytes(b))
        try:
            loaded = serialization.load(bad)
        except ValueError as exc:
            assert str(bad) in str(exc), str(exc)
            raised += 1
            continue
        for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
            np.testing.assert_array_equal(to_numpy(q.data), to_numpy(p.data), err_msg=f"silent corruption in {n}")
    assert raised > 100


def test_not_a_zip_and_missing_file(tmp_path):
    bad = tmp_path / "text.npz"
    bad.write_text("hello, not a model")
    with pytest.raises(ValueError, match="text.npz.*not a readable cnn_gpu file"):
        serialization.load(bad)
    with pytest.raises(FileNotFoundError):
        serialization.load(tmp_path / "nope.npz")


def test_npz_without_header_or_wrong_format(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.zeros(3))
    with pytest.raises(ValueError, match="plain.npz.*missing the __cnn_gpu__ header"):
        serialization.load(plain)
    other = tmp_path / "other.npz"
    np.savez(other, __cnn_gpu__=serialization.encode_header({"format": "something.else", "version": 1}))
    with pytest.raises(ValueError, match="other.npz.*expected a 'cnn_gpu.model' file, got format 'something.else'"):
        serialization.load(other)
    future = tmp_path / "future.npz"
    np.savez(future, __cnn_gpu__=serialization.encode_header({"format": "cnn_gpu.model", "version": 99}))
    with pytest.raises(ValueError, match="future.npz.*expected format version 1, got 99"):
        serialization.load(future)


def test_weights_not_matching_the_saved_architecture(saved, tmp_path):
    model, path = saved
    arrays = serialization.read_npz(path)
    arrays["features.0.weight"] = np.zeros((5, 1, 3, 3), np.float32)  # the header says 4 filters
    bad = tmp_path / "mismatch.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=r"mismatch.npz.*weights do not match the saved architecture.*features.0.weight"):
        serialization.load(bad)
    arrays = serialization.read_npz(path)
    del arrays["classifier.2.bias"]  # a weight the architecture needs is missing
    missing = tmp_path / "missing.npz"
    np.savez(missing, **arrays)
    with pytest.raises(
        ValueError,
        match=r"missing.npz.*weights do not match the saved architecture"
        r".*missing \['classifier.2.bias'\]",
    ):
        serialization.load(missing)


def test_other_architecture_via_load_state_dict(saved):
    _, path = saved
    arrays = serialization.read_npz(path)
    arrays.pop("__cnn_gpu__")
    lenet = models.lenet5(generator=0)
    with pytest.raises(KeyError, match=r"missing \[.*'classifier.4.weight'.*unexpected \[\]"):
        lenet.load_state_dict(arrays)
    wider = small_net(0, width=8)  # same names, other shapes
    with pytest.raises(ValueError, match=r"state\['features.0.weight'\]: expected shape \(8, 1, 3, 3\), got \(4, 1, 3, 3\)"):
        wider.load_state_dict(arrays)


def test_save_rejects_non_modules_and_mixed_dtypes(tmp_path):
    with pytest.raises(TypeError, match="model: expected a cnn_gpu.nn.Module, got dict"):
        serialization.save({}, tmp_path / "x.npz")
    mixed = nn.Sequential(nn.Linear(2, 2, generator=0), nn.Linear(2, 2, dtype=np.float64, generator=0))
    with pytest.raises(TypeError, match=r"model: expected one parameter dtype, got \['float32', 'float64'\]"):
        serialization.save(mixed, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
