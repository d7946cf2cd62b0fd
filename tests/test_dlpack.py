"""DLPack exchange: cnn_gpu.asarray / to_numpy / from_dlpack read torch tensors (and any DLPack
producer) without copying, torch.from_dlpack reads cnn_gpu's arrays in place, and
Module.load_state_dict takes torch tensors, so weights move between a cnn_gpu model and a torch
model of the same architecture. Memory sharing is checked by writing through one side and
reading on the other."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from helpers import assert_close

import cnn_gpu
from cnn_gpu import models, nn
from cnn_gpu.backend import cupy_available

torch = pytest.importorskip("torch", reason="the DLPack tests exchange arrays with torch (CPU)")


# --- into cnn_gpu ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_asarray_shares_a_torch_tensors_memory(dtype):
    t = torch.arange(12, dtype=dtype).reshape(3, 4)
    a = cnn_gpu.asarray(t)
    assert isinstance(a, np.ndarray) and a.shape == (3, 4) and a.dtype == np.dtype(str(dtype).split(".")[1])
    a[0, 1] = 100  # write through cnn_gpu's side ...
    assert t[0, 1].item() == 100  # ... read on torch's
    t[2, 3] = -7  # and the other way
    assert a[2, 3] == -7


def test_asarray_of_a_strided_tensor_and_of_a_tensor_that_records_gradients():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = cnn_gpu.asarray(t.T)  # a transposed view: strides, no copy
    assert a.shape == (4, 3) and not a.flags["C_CONTIGUOUS"]
    t[1, 2] = 55.0
    assert a[2, 1] == 55.0
    w = torch.nn.Parameter(torch.ones(2, 3))  # requires_grad: read through a detached view
    b = cnn_gpu.asarray(w)
    with torch.no_grad():
        w[0, 0] = 3.0
    assert b[0, 0] == 3.0 and b.dtype == np.float32


def test_asarray_with_another_dtype_copies_and_to_numpy_shares():
    t = torch.zeros(4, dtype=torch.float32)
    a = cnn_gpu.asarray(t, dtype=np.float64)  # asked for: a cast, hence a copy
    assert a.dtype == np.float64
    a[0] = 1.0
    assert t[0].item() == 0.0
    v = cnn_gpu.to_numpy(t)
    v[1] = 2.0
    assert t[1].item() == 2.0
    f = cnn_gpu.from_dlpack(t)
    f[2] = 3.0
    assert t[2].item() == 3.0


def test_numpy_arrays_pass_through_untouched():
    x = np.arange(6.0).reshape(2, 3)
    assert cnn_gpu.asarray(x) is x or np.shares_memory(cnn_gpu.asarray(x), x)


def test_an_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match=r"a: cannot read the Tensor through DLPack as a numpy array"):
        cnn_gpu.asarray(torch.zeros(3, dtype=torch.bfloat16))


def test_a_model_runs_on_torch_tensors_read_through_asarray():
    model = models.lenet5(generator=np.random.default_rng(0)).eval()
    t = torch.rand(3, 1, 28, 28)
    y = model(cnn_gpu.asarray(t))
    np.testing.assert_array_equal(y, model(t.numpy().copy()))


# --- out of cnn_gpu --------------------------------------------------------------------------------


def test_torch_reads_the_librarys_outputs_in_place():
    model = models.lenet5(generator=np.random.default_rng(1)).eval()
    x = np.random.default_rng(2).random((4, 1, 28, 28), dtype=np.float32)
    with cnn_gpu.config.override(engine="cpu"):
        h = model.features[0](x)  # the CPU engine's convolution output: channels-last memory, NCHW shape
        y = model(x)
    assert not h.flags["C_CONTIGUOUS"]  # torch accepts strided DLPack tensors
    for arr in (h, y):
        t = torch.from_dlpack(arr)
        assert tuple(t.shape) == arr.shape
        np.testing.assert_array_equal(t.numpy(), arr)
        t[(0,) * arr.ndim] = 123.0  # write on torch's side, read on cnn_gpu's
        assert arr[(0,) * arr.ndim] == 123.0


def test_torch_writes_into_a_models_parameters_through_dlpack():
    model = models.lenet5(generator=np.random.default_rng(1))
    tw = torch.from_dlpack(model.state_dict()["classifier.4.bias"])
    tw.fill_(0.5)
    np.testing.assert_array_equal(model.classifier[4].bias.data, np.full(10, 0.5, dtype=np.float32))


# --- weights between cnn_gpu and torch -------------------------------------------------------------


def _torch_layer(m):
    tnn = torch.nn
    kind = type(m).__name__
    if kind == "Sequential":
        return tnn.Sequential(OrderedDict((name, _torch_layer(c)) for name, c in m.named_children()))
    if kind == "Conv2d":
        return tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, bias=m.bias is not None)
    if kind == "Linear":
        return tnn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    if kind == "MaxPool2d":
        return tnn.MaxPool2d(m.kernel_size, m.stride, m.padding)
    simple = {"ReLU": tnn.ReLU, "Flatten": tnn.Flatten, "Tanh": tnn.Tanh, "Sigmoid": tnn.Sigmoid}
    if kind == "Dropout":
        return tnn.Dropout(m.p)
    return simple[kind]()


def torch_twin(model):
    """A torch model of the same architecture, with the same nesting and so the same parameter names."""
    return _torch_layer(model)


def flat_names(model) -> dict:
    """cnn_gpu parameter name -> the name in a flat torch nn.Sequential of the same leaf layers
    (lenet5: features.3.weight -> 3.weight, classifier.0.weight -> 7.weight): leaf k holds 'k.'."""
    leaves = [name for name, m in model.named_modules() if not m._modules]
    index = {name: k for k, name in enumerate(leaves)}
    return {name: f"{index[name.rsplit('.', 1)[0]]}.{name.rsplit('.', 1)[1]}" for name in model.state_dict()}


@pytest.mark.parametrize("name", ["lenet5", "vgg_small", "lenet_digits"])
def test_weights_round_trip_cnn_gpu_torch_cnn_gpu(name):
    factory, shape = models.MODELS[name]
    model = factory(in_channels=shape[0], generator=np.random.default_rng(3)).eval()
    twin = torch_twin(model).eval()
    assert list(twin.state_dict()) == list(model.state_dict())  # the same names
    twin.load_state_dict({k: torch.from_dlpack(v) for k, v in model.state_dict().items()})
    x = np.random.default_rng(4).standard_normal((2,) + shape).astype(np.float32)
    with torch.no_grad():
        ty = twin(torch.from_numpy(x)).numpy()
    y = model(x)
    assert_close(ty, y, 1e-5, f"{name}: torch twin vs cnn_gpu")

    back = factory(in_channels=shape[0], generator=np.random.default_rng(99)).eval()  # other weights
    assert not np.array_equal(back(x), y)
    back.load_state_dict(twin.state_dict())  # torch tensors straight in
    np.testing.assert_array_equal(back(x), y)
    for (n, p), (tn, tp) in zip(back.named_parameters(), twin.named_parameters()):  # copied, not aliased
        assert n == tn and not np.shares_memory(p.data, tp.detach().numpy())


def test_weights_from_a_flat_torch_sequential():
    model = models.lenet5(generator=np.random.default_rng(5)).eval()
    tnn = torch.nn
    flat = tnn.Sequential(
        tnn.Conv2d(1, 6, 5, padding=2),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Conv2d(6, 16, 5),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Flatten(),
        tnn.Linear(400, 120),
        tnn.ReLU(),
        tnn.Linear(120, 84),
        tnn.ReLU(),
        tnn.Linear(84, 10),
    ).eval()
    names = flat_names(model)
    assert names["features.3.weight"] == "3.weight" and names["classifier.0.weight"] == "7.weight"
    assert names["classifier.4.bias"] == "11.bias" and sorted(names.values()) == sorted(flat.state_dict())
    state = flat.state_dict()
    model.load_state_dict({ours: state[theirs] for ours, theirs in names.items()})
    x = np.random.default_rng(6).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        assert_close(model(x), flat(torch.from_numpy(x)).numpy(), 1e-5, "flat torch lenet5")


def test_load_state_dict_checks_torch_tensors_and_changes_nothing_on_error():
    model = models.lenet5(generator=np.random.default_rng(7))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    good = {k: torch.from_numpy(v.copy()) + 1 for k, v in before.items()}
    bad = dict(good, **{"classifier.4.bias": torch.zeros(10, dtype=torch.float64)})
    with pytest.raises(TypeError, match=r"state\['classifier.4.bias'\]: expected dtype float32, got float64"):
        model.load_state_dict(bad)
    bad = dict(good, **{"features.0.weight": torch.zeros(6, 1, 5, 4)})
    with pytest.raises(ValueError, match=r"state\['features.0.weight'\]: expected shape \(6, 1, 5, 5\), got \(6, 1, 5, 4\)"):
        model.load_state_dict(bad)
    bad = dict(good, **{"features.0.bias": [0.0] * 6})
    with pytest.raises(TypeError, match=r"state\['features.0.bias'\]: expected an array .* got list"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():  # nothing was written by the failed loads
        np.testing.assert_array_equal(v, before[k])
    model.load_state_dict(good)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k] + 1)


def test_jax_arrays_where_jax_is_installed():
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed (optional: pip install jax)")
    j = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    a = cnn_gpu.asarray(j)
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))
    model = nn.Sequential(nn.Linear(3, 2, generator=np.random.default_rng(0)))
    model.load_state_dict({"0.weight": jnp.ones((2, 3), jnp.float32), "0.bias": jnp.zeros(2, jnp.float32)})
    np.testing.assert_array_equal(model(a), np.repeat(a.sum(axis=1, keepdims=True), 2, axis=1))


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")
def test_torch_cpu_tensors_move_to_the_gpu_backend():
    import cupy  # noqa: PLC0415

    t = torch.arange(6, dtype=torch.float32)
    with cnn_gpu.use_backend("cupy"):
        a = cnn_gpu.asarray(t)
    assert isinstance(a, cupy.ndarray) and a.dtype == cupy.float32
    np.testing.assert_array_equal(a.get(), t.numpy())
    model = models.lenet5().to("cupy")
    model.load_state_dict(torch_twin(model).state_dict())
    assert isinstance(model.state_dict()["features.0.weight"], cupy.ndarray)


# --- the README ------------------------------------------------------------------------------------


def test_readme_dlpack_section_runs_as_written(tmp_path, monkeypatch, capsys):
    from helpers import readme_blocks  # noqa: PLC0415

    (code,) = readme_blocks("### Arrays to torch and back (DLPack)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert float(capsys.readouterr().out.split()[-1]) < 1e-5


def test_readme_name_table_matches_the_zoo():
    from helpers import doc_section  # noqa: PLC0415

    readme = doc_section("Arrays to torch and back (DLPack)")  # docs/interop.md
    for name in ["lenet5", "vgg_small", "lenet_digits"]:
        factory, shape = models.MODELS[name]
        names = flat_names(factory(in_channels=shape[0]))
        ours = [k[: -len(".weight")] for k in names if k.endswith(".weight")]
        theirs = [names[k + ".weight"][: -len(".weight")] for k in ours]
        short, prefix = [], None
        for k in ours:  # the table writes features.0, .2, .5 for a run within one container
            head, tail = k.rsplit(".", 1)
            short.append(k if head != prefix else f".{tail}")
            prefix = head
        row = f"| `{name}` | " + ", ".join(f"`{s}`" for s in short) + " | " + ", ".join(f"`{t}`" for t in theirs) + " |"
        assert row in readme, row
