"""ONNX export (cnn_gpu.onnx): every zoo model and hand-built networks using every layer, run by
ONNX Runtime on the CPU and compared with cnn_gpu's eval-mode outputs (float32, 1e-5 relative),
at two batch sizes (the batch dimension is dynamic); onnx.checker; the errors."""

from __future__ import annotations

import sys
from collections import OrderedDict

import numpy as np
import pytest
from helpers import assert_close

import cnn_gpu
from cnn_gpu import cli, models, nn
from cnn_gpu.nn import Module, Parameter

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install -e '.[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the export is checked by onnxruntime (pip install -e '.[onnx]')")

from cnn_gpu.onnx import CONVERTERS, ExportError, export, register_converter, to_onnx  # noqa: E402

BATCHES = (1, 3)


def _session(proto_or_path):
    src = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") else str(proto_or_path)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _check_against_ort(model, input_shape, path, batches=BATCHES, opset=None, tol=1e-5, seed=0):
    """Export ``model``, reload the file, run it in ONNX Runtime at each batch size and compare
    with the model's eval-mode forward; -> the loaded ModelProto."""
    was_training = model.training
    export(model, path, input_shape, opset=opset)
    assert model.training == was_training  # exporting does not change the model's mode
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.dim_value
    sess = _session(path)
    rng = np.random.default_rng(seed)
    model.eval()
    try:
        for n in batches:
            x = rng.standard_normal((n,) + tuple(input_shape[1:])).astype(np.float32)
            (got,) = sess.run(None, {"input": x})
            want = model.forward(x)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert_close(got, want, tol, f"{type(model).__name__} batch {n}")
    finally:
        model.train(was_training)
    return proto


# --- the zoo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_zoo_model_matches_onnxruntime(name, tmp_path):
    factory, shape = models.MODELS[name]
    model = factory(in_channels=shape[0], num_classes=10, generator=np.random.default_rng(1))
    model.train()  # exported with eval semantics whatever the mode (lenet_digits has Dropout)
    proto = _check_against_ort(model, (1,) + shape, tmp_path / f"{name}.onnx")
    names = {t.name for t in proto.graph.initializer}
    # the parameters and running statistics under their cnn_gpu names (a BatchNorm's batch counter
    # only matters to training, and is not exported)
    assert names == {n for n in model.state_dict() if not n.endswith(".num_batches_tracked")}
    for t in proto.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), model.state_dict()[t.name])


def test_trained_weights_are_exported_not_the_initial_ones(tmp_path):
    cnn_gpu.manual_seed(3)
    model = models.lenet_digits()
    opt = cnn_gpu.optim.SGD(model, lr=0.1)
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(x), np.arange(8) % 10)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    _check_against_ort(model, (1, 1, 8, 8), tmp_path / "trained.onnx", batches=(8, 5))


# --- hand-built networks ---------------------------------------------------------------------------


def _every_layer_net(g):
    """Every layer type of the library (as of this test), with non-default settings."""
    features = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3, stride=1, padding=1, generator=g),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(3, stride=2, padding=1),  # 12 -> 6
            block=nn.Sequential(
                nn.Conv2d(8, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False, generator=g),
                nn.LeakyReLU(0.2),
            ),  # 6x6 -> 6x4
            avg=nn.AvgPool2d(2, stride=1, padding=1),  # count_include_pad: 7x5
            tanh=nn.Tanh(),
            drop=nn.Dropout(0.5, generator=g),
        )
    )
    head = nn.Sequential(
        nn.Linear(6 * 7 * 5, 16, generator=g),
        nn.Sigmoid(),
        nn.Dropout(0.25, generator=g),
        nn.Linear(16, 5, bias=False, generator=g),
    )
    return nn.Sequential(OrderedDict(features=features, flatten=nn.Flatten(), head=head))


def _leaves(model):
    return {type(m).__name__ for _, m in model.named_modules()}


def test_hand_built_network_with_every_layer(tmp_path):
    model = _every_layer_net(np.random.default_rng(2))
    model.train()
    _check_against_ort(model, (1, 3, 12, 12), tmp_path / "every.onnx", batches=(1, 4, 2))


def test_the_hand_built_networks_use_every_layer_type_and_each_has_a_converter():
    used = _leaves(_every_layer_net(np.random.default_rng(0)))
    for build in _MODERN.values():
        used |= _leaves(build(np.random.default_rng(0)))
    assert set(nn.LAYER_TYPES) <= set(CONVERTERS), sorted(set(nn.LAYER_TYPES) - set(CONVERTERS))
    assert set(nn.LAYER_TYPES) <= used, f"add {sorted(set(nn.LAYER_TYPES) - used)} to a hand-built network here"


@pytest.mark.parametrize("opset", [13, None, onnx.defs.onnx_opset_version()])
def test_opsets(opset, tmp_path):
    model = _every_layer_net(np.random.default_rng(5))
    proto = _check_against_ort(model, (1, 3, 12, 12), tmp_path / "m.onnx", batches=(2,), opset=opset)
    assert proto.opset_import[0].version == (opset or cnn_gpu.onnx.DEFAULT_OPSET)


def test_mlp_without_convolutions_and_a_single_layer(tmp_path):
    g = np.random.default_rng(7)
    mlp = nn.Sequential(nn.Linear(10, 7, generator=g), nn.ReLU(), nn.Linear(7, 3, generator=g))
    _check_against_ort(mlp, (1, 10), tmp_path / "mlp.onnx", batches=(1, 6))
    _check_against_ort(nn.Conv2d(2, 3, 3, generator=g), (2, 2, 5, 5), tmp_path / "conv.onnx", batches=(1, 2))


def test_float64_models_export_as_double_graphs(tmp_path):
    """The graph keeps the model's dtype (nothing is cast); ONNX Runtime's CPU provider has double
    kernels for Gemm and the activations, not for Conv."""
    g = np.random.default_rng(8)
    mlp = nn.Sequential(nn.Linear(6, 5, dtype=np.float64, generator=g), nn.Tanh(), nn.Linear(5, 2, dtype=np.float64, generator=g))
    export(mlp, tmp_path / "mlp64.onnx", (1, 6))
    x = np.random.default_rng(0).standard_normal((4, 6))
    (got,) = _session(tmp_path / "mlp64.onnx").run(None, {"input": x})
    assert got.dtype == np.float64
    assert_close(got, mlp.eval()(x), 1e-12, "float64 mlp")
    proto = to_onnx(models.lenet5(dtype=np.float64), (1, 1, 28, 28))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


# --- layers other issues are adding: run where they exist ------------------------------------------


def _fill(buffer, values):
    """Write ``values`` into a layer's buffer or parameter in place (an array, or an object with .data)."""
    target = buffer.data if isinstance(buffer, Parameter) or not hasattr(buffer, "__array_interface__") else buffer
    target[...] = values


def _bn_net(g):
    bn2, bn1 = nn.BatchNorm2d(4), nn.BatchNorm1d(6)
    for bn in (bn2, bn1):
        C = bn.num_features
        _fill(bn.running_mean, g.standard_normal(C))
        _fill(bn.running_var, g.uniform(0.5, 2.0, C))
        _fill(bn.weight, g.standard_normal(C))
        _fill(bn.bias, g.standard_normal(C))
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, generator=g), bn2, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 6, generator=g), bn1
    )


def _gelu_net(g):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, generator=g),
        nn.GELU(),
        nn.Conv2d(4, 4, 1, generator=g),
        nn.GELU(approximate="tanh"),
        nn.AdaptiveAvgPool2d(2),
        nn.Conv2d(4, 2, 1, generator=g),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _residual_net(g):
    body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, generator=g), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1, generator=g))
    down = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, generator=g), nn.ReLU())
    return nn.Sequential(nn.Residual(body, None), nn.Residual(down, nn.Conv2d(3, 5, 1, stride=2, generator=g)), nn.Flatten())


_MODERN = {"BatchNorm2d/BatchNorm1d": _bn_net, "GELU/AdaptiveAvgPool2d": _gelu_net, "Residual": _residual_net}


@pytest.mark.parametrize("what", sorted(_MODERN))
def test_batchnorm_gelu_adaptive_pool_and_residual_networks(what, tmp_path):
    model = _MODERN[what](np.random.default_rng(4))
    _check_against_ort(model, (1, 3, 8, 8), tmp_path / "modern.onnx")


def test_grouped_convolution_where_conv2d_has_groups(tmp_path):
    g = np.random.default_rng(6)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2, generator=g), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6, generator=g), nn.Flatten()
    )
    _check_against_ort(model, (1, 4, 7, 7), tmp_path / "groups.onnx")


# --- the converters alone, against torch, through minimal classes with the layers' attributes ------


class BatchNorm2d(Module):  # the converter is keyed by the class name
    def __init__(self, C, g):
        super().__init__()
        self.num_features, self.eps, self.momentum = C, 1e-3, 0.1
        self.weight = Parameter(g.standard_normal(C).astype(np.float32))
        self.bias = Parameter(g.standard_normal(C).astype(np.float32))
        self.running_mean = g.standard_normal(C).astype(np.float32)
        self.running_var = g.uniform(0.5, 2.0, C).astype(np.float32)


class GELU(Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size


class Residual(Module):
    def __init__(self, body, shortcut=None, activation=None):
        super().__init__()
        self.body, self.shortcut, self.activation = body, shortcut, activation


def _ort_output(model, x):
    (y,) = _session(to_onnx(model, (1,) + x.shape[1:])).run(None, {"input": x})
    return y


def test_converters_of_batchnorm_gelu_adaptive_pool_and_residual_against_torch():
    torch = pytest.importorskip("torch", reason="torch is the oracle of these converter checks")
    tF = torch.nn.functional
    g = np.random.default_rng(11)
    x = g.standard_normal((3, 4, 6, 6)).astype(np.float32)
    tx = torch.from_numpy(x)
    bn = BatchNorm2d(4, g)
    want = tF.batch_norm(
        tx,
        torch.from_numpy(bn.running_mean),
        torch.from_numpy(bn.running_var),
        torch.from_numpy(bn.weight.data),
        torch.from_numpy(bn.bias.data),
        training=False,
        eps=bn.eps,
    )
    assert_close(_ort_output(nn.Sequential(bn), x), want.numpy(), 1e-5, "BatchNorm2d")
    for approximate in ("none", "tanh"):
        assert_close(_ort_output(GELU(approximate), x), tF.gelu(tx, approximate=approximate).numpy(), 1e-5, f"GELU {approximate}")
    for size in (1, (1, 1), 3, (2, 6), (None, 3)):
        want = tF.adaptive_avg_pool2d(tx, size).numpy()
        assert_close(_ort_output(AdaptiveAvgPool2d(size), x), want, 1e-5, f"AdaptiveAvgPool2d {size}")
    conv = nn.Conv2d(4, 4, 3, padding=1, generator=g)
    short = nn.Conv2d(4, 4, 1, generator=g)
    w, b, ws, bs = (torch.from_numpy(a) for a in (conv.weight.data, conv.bias.data, short.weight.data, short.bias.data))
    body = tF.conv2d(torch.relu(tx), w, b, padding=1)
    assert_close(_ort_output(Residual(nn.Sequential(nn.ReLU(), conv)), x), (body + tx).numpy(), 1e-5, "Residual")
    assert_close(
        _ort_output(Residual(nn.Sequential(nn.ReLU(), conv), short), x),
        (body + tF.conv2d(tx, ws, bs)).numpy(),
        1e-5,
        "Residual with a shortcut",
    )
    assert_close(
        _ort_output(Residual(nn.Sequential(nn.ReLU(), conv), short, "relu"), x),
        torch.relu(body + tF.conv2d(tx, ws, bs)).numpy(),
        1e-5,
        "Residual with a ReLU after the add",
    )
    with pytest.raises(ExportError, match=r"\(Residual\): expected activation None or 'relu', got 'gelu'"):
        to_onnx(Residual(conv, None, "gelu"), (1, 4, 6, 6))


def test_converter_reads_groups(monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is the oracle for the grouped convolution")
    g = np.random.default_rng(12)
    conv = nn.Conv2d(2, 6, 3, padding=1, generator=g)  # weight (6, 2, 3, 3): 4 input channels in 2 groups
    object.__setattr__(conv, "groups", 2)
    x = g.standard_normal((2, 4, 5, 5)).astype(np.float32)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(conv.weight.data), torch.from_numpy(conv.bias.data), padding=1, groups=2
    )
    assert_close(_ort_output(conv, x), want.numpy(), 1e-5, "grouped Conv")


def test_a_buffer_in_another_dtype_than_the_model_is_an_error_not_a_cast():
    bn = BatchNorm2d(3, np.random.default_rng(0))
    bn.running_var = bn.running_var.astype(np.float64)
    with pytest.raises(ExportError, match=r"'0' \(BatchNorm2d\): expected running_var as a float32 array .*got float64"):
        to_onnx(nn.Sequential(bn), (1, 3, 4, 4))


def test_adaptive_pool_that_onnx_cannot_express_is_a_clear_error():
    model = nn.Sequential(OrderedDict(pool=AdaptiveAvgPool2d(4)))
    with pytest.raises(ExportError, match=r"'pool' \(AdaptiveAvgPool2d\).*output_size 4 along height.*size 6"):
        to_onnx(model, (1, 2, 6, 6))


# --- errors and extension --------------------------------------------------------------------------


class Swish(Module):
    def forward(self, x):
        return x / (1 + np.exp(-x))


def test_unexportable_layer_names_its_path_and_type(tmp_path):
    g = np.random.default_rng(0)
    model = nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(1, 2, 3, generator=g), Swish()), flatten=nn.Flatten()))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match=r"layer 'features\.1' \(Swish\) cannot be exported.*register_converter"):
        export(model, path, (1, 1, 5, 5))
    assert path.read_bytes() == b"previous"  # nothing written
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left behind
    with pytest.raises(ExportError, match=r"the model \(Swish\)"):
        to_onnx(Swish(), (1, 3))


def test_a_registered_converter_exports_a_user_layer(monkeypatch, tmp_path):
    monkeypatch.setitem(CONVERTERS, "Swish", None)  # removed again after the test

    @register_converter("Swish")
    def swish(layer, ctx, x, shape):
        return ctx.node("Mul", [x, ctx.node("Sigmoid", [x])]), shape

    model = nn.Sequential(nn.Linear(4, 3, generator=np.random.default_rng(1)), Swish())
    _check_against_ort(model, (1, 4), tmp_path / "swish.onnx")


@pytest.mark.parametrize("shape", [(1,), (0, 1, 28, 28), (1, 1, 28.0, 28), "1,1,28,28", 5])
def test_bad_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape: expected the input's shape with the batch first"):
        to_onnx(models.lenet5(), shape)


def test_input_shape_that_does_not_fit_the_model():
    with pytest.raises(ExportError, match=r"layer 'classifier\.0' \(Linear\): expected a 2-D input"):
        to_onnx(nn.Sequential(OrderedDict(classifier=nn.Sequential(nn.Linear(4, 2)))), (1, 2, 2))
    with pytest.raises(ExportError, match=r"'features\.0' \(Conv2d\): expected a 4-D input.*start with the batch"):
        to_onnx(models.lenet5(), (1, 28, 28))
    with pytest.raises(
        ExportError,
        match=r"'features\.3' \(Conv2d\): its 5x5 window does not fit the input of "
        r"shape \(1, 6, 4, 4\)",
    ):
        to_onnx(models.lenet5(), (1, 1, 8, 8))
    with pytest.raises(
        ExportError,
        match=r"'classifier\.0' \(Linear\): expected 400 input features, got shape "
        r"\(1, 576\)",
    ):
        to_onnx(models.lenet5(), (1, 1, 32, 32))


@pytest.mark.parametrize("opset", [12, 10_000, "17", 17.0])
def test_bad_opset(opset):
    with pytest.raises(ValueError, match=r"opset: expected an int from 13 to"):
        to_onnx(models.lenet5(), (1, 1, 28, 28), opset=opset)


def test_not_a_model():
    with pytest.raises(TypeError, match="model: expected a cnn_gpu.nn.Module, got dict"):
        to_onnx({}, (1, 3))


# --- the command line ------------------------------------------------------------------------------


def _saved(tmp_path, metadata, known_input=True):
    from cnn_gpu.runs import BEST_FILE  # noqa: PLC0415

    model = models.lenet_digits(generator=np.random.default_rng(9))
    if not known_input:  # a model that never ran and is not known by name: save cannot record its input shape
        model.input_spec = None
    run = tmp_path / "run"
    run.mkdir()
    cnn_gpu.save(model, run / BEST_FILE, metadata=metadata)
    return model, run


def test_cli_export_a_run_folder(tmp_path, capsys):
    model, run = _saved(tmp_path, {"input_shape": [1, 8, 8]})
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(run), str(out)]) == 0
    assert (
        f"wrote {out}: opset {cnn_gpu.onnx.DEFAULT_OPSET}, input [batch, 1, 8, 8], output [batch, 10]" in capsys.readouterr().out
    )
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    (got,) = _session(out).run(None, {"input": x})
    assert_close(got, model.eval()(x), 1e-5, "cli export")


def test_cli_export_needs_an_input_shape_when_the_file_records_none(tmp_path, capsys):
    from cnn_gpu.runs import BEST_FILE  # noqa: PLC0415

    _, run = _saved(tmp_path, {}, known_input=False)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(run / BEST_FILE), str(out)]) == 2
    assert "pass --input-shape C,H,W" in capsys.readouterr().err and not out.exists()
    assert cli.main(["export", str(run / BEST_FILE), str(out), "--input-shape", "1x8x8", "--opset", "13"]) == 0
    assert onnx.load(str(out)).opset_import[0].version == 13
    with pytest.raises(SystemExit):
        cli.main(["export", str(run), str(out), "--input-shape", "1,-8,8"])
    assert "expected positive integers like 1,28,28" in capsys.readouterr().err


def test_cli_export_without_the_onnx_package(tmp_path, capsys, monkeypatch):
    _, run = _saved(tmp_path, {"input_shape": [1, 8, 8]})
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    assert cli.main(["export", str(run), str(tmp_path / "m.onnx")]) == 2
    assert "pip install -e '.[onnx]'" in capsys.readouterr().err


# --- the README ------------------------------------------------------------------------------------


def test_readme_onnx_section_runs_as_written(tmp_path, monkeypatch, capsys):
    from helpers import readme_blocks  # noqa: PLC0415

    blocks = readme_blocks("### Export to ONNX and run it with ONNX Runtime")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(CONVERTERS, "Swish", None)  # the second block registers one; removed afterwards
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert float(capsys.readouterr().out.split()[-1]) < 1e-5
    assert (tmp_path / "lenet5.onnx").is_file() and CONVERTERS["Swish"] is not None
    bash = readme_blocks("### Export to ONNX and run it with ONNX Runtime", "bash")
    assert "cnn-gpu export runs/digits digits.onnx" in bash[0]  # the CLI form is tested above
