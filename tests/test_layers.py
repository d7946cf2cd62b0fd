"""cnn_gpu.nn and cnn_gpu.models: gradient accumulation, parameter names, train/eval,
state dicts, dtype conversion, initialisation and seeding, and whole models against
equivalent PyTorch models (outputs and every parameter gradient)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
from helpers import assert_close, small_net, tol_for

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import models, nn
from cnn_gpu.backend import to_numpy
from cnn_gpu.random import manual_seed


def host_params(model) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((n, to_numpy(p.data).copy()) for n, p in model.named_parameters())


def host_grads(model) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((n, to_numpy(p.grad).copy()) for n, p in model.named_parameters())


def batch(xp, rng, shape, dtype=np.float32):
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


def forward_backward(model, x, labels):
    loss_fn = nn.CrossEntropyLoss()
    logits = model(x)
    loss = loss_fn(logits, labels)
    dx = model.backward(loss_fn.backward())
    return logits, loss, dx


# --- gradient accumulation ------------------------------------------------------------
def test_param_grad_accumulates_until_zero_grad(xp, rng):
    with cnn_gpu.use_backend(xp.__name__):
        model = small_net(0)
    x, labels = batch(xp, rng, (4, 1, 8, 8)), xp.asarray(rng.integers(0, 10, 4))
    forward_backward(model, x, labels)
    first = host_grads(model)
    assert all(np.abs(g).sum() > 0 for g in first.values()), "every parameter gets a gradient"
    forward_backward(model, x, labels)
    for name, g in host_grads(model).items():
        if xp is np:
            np.testing.assert_array_equal(g, 2 * first[name], err_msg=name)  # g + g == 2g exactly
        else:  # GPU reductions may use atomics: the same sum in another order
            np.testing.assert_allclose(g, 2 * first[name], rtol=1e-5, atol=1e-6, err_msg=name)
    model.zero_grad()
    assert all(not g.any() for g in host_grads(model).values())
    forward_backward(model, x, labels)
    for name, g in host_grads(model).items():
        np.testing.assert_allclose(g, first[name], rtol=0 if xp is np else 1e-5, atol=0 if xp is np else 1e-6, err_msg=name)


def test_backward_before_forward_raises(xp):
    with cnn_gpu.use_backend(xp.__name__):
        layers = [
            nn.Conv2d(1, 2, 3),
            nn.Linear(3, 2),
            nn.MaxPool2d(2),
            nn.AvgPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.LeakyReLU(),
            nn.Sigmoid(),
            nn.Tanh(),
            nn.CrossEntropyLoss(),
        ]
    for layer in layers:
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(xp.zeros((1, 2), dtype=np.float32))


# --- names, modes ---------------------------------------------------------------------
def test_named_parameters_lenet5():
    model = models.lenet5(generator=0)
    names = [(n, p.shape) for n, p in model.named_parameters()]
    assert names == [
        ("features.0.weight", (6, 1, 5, 5)),
        ("features.0.bias", (6,)),
        ("features.3.weight", (16, 6, 5, 5)),
        ("features.3.bias", (16,)),
        ("classifier.0.weight", (120, 400)),
        ("classifier.0.bias", (120,)),
        ("classifier.2.weight", (84, 120)),
        ("classifier.2.bias", (84,)),
        ("classifier.4.weight", (10, 84)),
        ("classifier.4.bias", (10,)),
    ]
    assert list(model.state_dict()) == [n for n, _ in names]
    assert model.num_parameters() == 6 * 25 + 6 + 16 * 150 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
    assert [n for n, _ in model.named_modules()][:3] == ["", "features", "features.0"]


def test_named_parameters_vgg_small():
    names = [n for n, _ in models.vgg_small(generator=0).named_parameters()]
    assert names == [f"features.{i}.{k}" for i in (0, 2, 5, 7) for k in ("weight", "bias")] + [
        f"classifier.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")
    ]


def test_train_eval_dropout(xp, rng):
    with cnn_gpu.use_backend(xp.__name__):
        model = nn.Sequential(
            nn.Linear(20, 30, generator=1), nn.ReLU(), nn.Dropout(0.5, generator=2), nn.Linear(30, 5, generator=3)
        )
    x = batch(xp, rng, (8, 20))
    assert all(m.training for _, m in model.named_modules())
    y_train1, y_train2 = to_numpy(model(x)), to_numpy(model(x))
    assert not np.array_equal(y_train1, y_train2), "training: a fresh mask per call"
    assert model.eval() is model
    assert not any(m.training for _, m in model.named_modules())
    y_eval = to_numpy(model(x))
    np.testing.assert_array_equal(to_numpy(model(x)), y_eval)
    h = F.relu_forward(F.linear_forward(x, model[0].weight.data, model[0].bias.data)[0])[0]
    expected = F.linear_forward(h, model[3].weight.data, model[3].bias.data)[0]
    np.testing.assert_array_equal(y_eval, to_numpy(expected))  # eval: dropout is the identity
    dy = batch(xp, rng, (8, 30))
    assert model[2].backward(dy) is dy
    model.train()
    assert all(m.training for _, m in model.named_modules())
    assert not np.array_equal(to_numpy(model(x)), y_eval)


def test_dropout_masks_reproducible_from_seed(xp, rng):
    x = xp.ones((6, 40), dtype=np.float32)
    a, b = nn.Dropout(0.3, generator=11), nn.Dropout(0.3, generator=11)
    for _ in range(3):
        np.testing.assert_array_equal(to_numpy(a(x)), to_numpy(b(x)))
    assert a.calls == 3
    c = nn.Dropout(0.3, generator=12)
    assert not np.array_equal(to_numpy(c(x)), to_numpy(nn.Dropout(0.3, generator=11)(x)))


# --- state ----------------------------------------------------------------------------
def test_state_dict_round_trip_identical_predictions(xp, rng):
    with cnn_gpu.use_backend(xp.__name__):
        a, b = small_net(1), small_net(2)
    x = batch(xp, rng, (5, 1, 8, 8))
    assert not np.array_equal(to_numpy(a(x)), to_numpy(b(x)))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(to_numpy(b(x)), to_numpy(a(x)))
    before = to_numpy(b(x)).copy()
    a.features[0].weight.data[...] = 0  # load copies: b is independent of a afterwards
    np.testing.assert_array_equal(to_numpy(b(x)), before)
    # from host arrays, as read back from a file
    c = small_net(3)
    c.to(xp.__name__)
    c.load_state_dict({k: to_numpy(v) for k, v in b.state_dict().items()})
    np.testing.assert_array_equal(to_numpy(c(x)), before)


def test_load_state_dict_mismatches_raise(xp):
    with cnn_gpu.use_backend(xp.__name__):
        model = small_net(0)
    state = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match="missing.*features.0.bias"):
        model.load_state_dict({k: v for k, v in state.items() if k != "features.0.bias"})
    with pytest.raises(KeyError, match="unexpected.*extra"):
        model.load_state_dict({**state, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"features.0.weight.*expected shape \(4, 1, 3, 3\), got \(4, 1, 5, 5\)"):
        model.load_state_dict({**state, "features.0.weight": np.zeros((4, 1, 5, 5), np.float32)})
    with pytest.raises(TypeError, match="features.0.bias.*expected dtype float32, got float64"):
        model.load_state_dict({**state, "features.0.bias": np.zeros(4)})
    model.load_state_dict({"features.0.bias": np.full(4, 7, np.float32)}, strict=False)
    assert float(to_numpy(model.features[0].bias.data)[3]) == 7.0


def test_to_float64(xp, rng):
    with cnn_gpu.use_backend(xp.__name__):
        model = small_net(0)
    x32 = batch(xp, rng, (3, 1, 8, 8))
    before = host_params(model)
    y32 = to_numpy(model(x32))
    assert model.to(dtype=np.float64) is model
    for name, p in model.named_parameters():
        assert p.dtype == np.float64 and p.grad.dtype == np.float64 and not p.grad.any()
        assert type(p.data) is type(x32)  # same backend
        np.testing.assert_array_equal(to_numpy(p.data), before[name].astype(np.float64))
    y64 = model(x32.astype(np.float64))
    assert y64.dtype == np.float64
    assert_close(y64, y32, 1e-5, "float64 vs float32 forward")
    with pytest.raises(TypeError, match=r"^x: expected float64 \(the model's dtype\), got float32 \(at "):
        model(x32)  # the input is named, not the weights
    model.to(dtype=np.float32)
    np.testing.assert_array_equal(to_numpy(model(x32)), y32)
    with pytest.raises(TypeError, match="dtype: expected float32 or float64"):
        model.to(dtype=np.int32)


# --- initialisation and seeding -------------------------------------------------------
@pytest.mark.parametrize(
    "layer,fan_in",
    [
        (lambda g: nn.Conv2d(64, 128, 3, generator=g), 64 * 9),
        (lambda g: nn.Conv2d(32, 128, (5, 3), generator=g), 32 * 15),
        (lambda g: nn.Linear(1000, 300, generator=g), 1000),
    ],
    ids=["conv3x3", "conv5x3", "linear"],
)
def test_he_init_statistics(layer, fan_in):
    m = layer(np.random.default_rng(0))
    w = to_numpy(m.weight.data).astype(np.float64).ravel()
    std = math.sqrt(2.0 / fan_in)
    assert w.size > 50_000
    assert abs(w.std() / std - 1) < 0.02
    assert abs(w.mean()) < 5 * std / math.sqrt(w.size)
    assert abs(np.mean(np.abs(w)) / (std * math.sqrt(2 / math.pi)) - 1) < 0.02  # half-normal mean: Gaussian shape
    assert not to_numpy(m.bias.data).any()
    assert m.weight.dtype == np.float32


def test_seeding_gives_identical_weights(xp):
    with cnn_gpu.use_backend(xp.__name__):
        manual_seed(42)
        a = host_params(models.lenet5())
        manual_seed(42)
        b = host_params(models.lenet5())
        manual_seed(43)
        c = host_params(models.lenet5())
        d = host_params(models.lenet5(generator=np.random.default_rng(5)))
        e = host_params(models.lenet5(generator=np.random.default_rng(5)))
        f = host_params(models.lenet5(generator=5))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        np.testing.assert_array_equal(d[name], e[name], err_msg=name)
        np.testing.assert_array_equal(d[name], f[name], err_msg=name)  # an int seed == a Generator of that seed
    assert not np.array_equal(a["features.0.weight"], c["features.0.weight"])
    assert not np.array_equal(a["features.0.weight"], d["features.0.weight"])


def test_int_seed_draws_one_stream_for_all_layers():
    """An int seed must not restart the stream in every layer (each layer's weights would then
    be a rescaled prefix of the same normal sequence: correlated layers)."""
    model = models.lenet5(generator=3)
    w2 = to_numpy(model.classifier[2].weight.data).ravel() / math.sqrt(2 / 120)
    w4 = to_numpy(model.classifier[4].weight.data).ravel() / math.sqrt(2 / 84)
    assert not np.allclose(w2[: w4.size], w4, rtol=1e-4)
    c0 = to_numpy(model.features[0].weight.data).ravel() / math.sqrt(2 / 25)
    c3 = to_numpy(model.features[3].weight.data).ravel() / math.sqrt(2 / 150)
    assert not np.allclose(c0, c3[: c0.size], rtol=1e-4)


# --- dtype preservation in layers ------------------------------------------------------
def test_every_layer_preserves_float32(xp, rng):
    with cnn_gpu.use_backend(xp.__name__):
        layers = [
            nn.Conv2d(3, 4, 3, padding=1, generator=0),
            nn.MaxPool2d(3, 2, 1),
            nn.AvgPool2d(2),
            nn.ReLU(),
            nn.LeakyReLU(0.1),
            nn.Sigmoid(),
            nn.Tanh(),
            nn.Dropout(0.5, generator=0),
            nn.Flatten(),
            nn.Linear(16, 5, generator=0),
        ]
    x = batch(xp, rng, (2, 3, 8, 8))
    h, shapes = x, []
    for layer in layers:
        h = layer(h)
        shapes.append(h.shape)
        assert h.dtype == np.float32, type(layer).__name__
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(h, xp.asarray(np.array([1, 3])))
    assert loss.dtype == np.float32 and loss.shape == ()
    dy = loss_fn.backward()
    assert dy.dtype == np.float32
    for layer in reversed(layers):
        dy = layer.backward(dy)
        assert dy.dtype == np.float32, type(layer).__name__
    assert dy.shape == x.shape
    for layer in (layers[0], layers[-1]):
        for name, p in layer.named_parameters():
            assert p.data.dtype == np.float32 and p.grad.dtype == np.float32 and p.grad.any(), name


def test_float64_layers_keep_float64(xp, rng):
    with cnn_gpu.use_backend(xp.__name__):
        conv, lin = nn.Conv2d(2, 3, 3, dtype=np.float64, generator=0), nn.Linear(3 * 4 * 4, 2, dtype=np.float64, generator=0)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), lin)
    y = model(batch(xp, rng, (2, 2, 6, 6), np.float64))
    assert y.dtype == np.float64
    assert model.backward(xp.ones_like(y)).dtype == np.float64
    assert all(p.grad.dtype == np.float64 for p in model.parameters())


# --- whole models against PyTorch -----------------------------------------------------
def to_torch(model, torch, dtype):
    """An equivalent torch.nn.Sequential with our weights copied in."""
    tnn = torch.nn
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    mods = []
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            t = tnn.Conv2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, bias=m.bias is not None, dtype=tdt
            )
        elif isinstance(m, nn.Linear):
            t = tnn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=tdt)
        elif isinstance(m, nn.MaxPool2d):
            t = tnn.MaxPool2d(m.kernel_size, m.stride, m.padding)
        elif isinstance(m, nn.AvgPool2d):
            t = tnn.AvgPool2d(m.kernel_size, m.stride, m.padding, count_include_pad=True)
        elif isinstance(m, nn.ReLU):
            t = tnn.ReLU()
        elif isinstance(m, nn.LeakyReLU):
            t = tnn.LeakyReLU(m.negative_slope)
        elif isinstance(m, nn.Sigmoid):
            t = tnn.Sigmoid()
        elif isinstance(m, nn.Tanh):
            t = tnn.Tanh()
        elif isinstance(m, nn.Flatten):
            t = tnn.Flatten()
        elif isinstance(m, nn.Sequential):
            continue
        else:  # pragma: no cover
            raise AssertionError(type(m))
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                t.weight.copy_(torch.from_numpy(to_numpy(m.weight.data)))
                if m.bias is not None:
                    t.bias.copy_(torch.from_numpy(to_numpy(m.bias.data)))
        mods.append((m, t))
    return mods


def compare_with_torch(model, x_host, labels_host, xp, dtype):
    torch = pytest.importorskip("torch")
    pairs = to_torch(model, torch, dtype)
    tmodel = torch.nn.Sequential(*[t for _, t in pairs])
    tx = torch.tensor(x_host, requires_grad=True)
    tlogits = tmodel(tx)
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.tensor(labels_host))
    tloss.backward()
    logits, loss, dx = forward_backward(model, xp.asarray(x_host), xp.asarray(labels_host))
    tol = tol_for(dtype)
    assert logits.dtype == dtype and dx.dtype == dtype
    assert_close(logits, tlogits.detach().numpy(), tol, "logits")
    assert abs(float(loss) - tloss.item()) <= tol * abs(tloss.item())
    assert_close(dx, tx.grad.numpy(), tol, "dx")
    checked = 0
    for ours, t in pairs:
        for name in ("weight", "bias"):
            p = getattr(ours, name, None)
            if isinstance(p, nn.Parameter):
                assert p.grad.dtype == dtype
                assert_close(p.grad, getattr(t, name).grad.numpy(), tol, f"{type(ours).__name__}.{name}.grad")
                checked += 1
    return checked


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_lenet5_vs_torch(xp, rng, dtype):
    with cnn_gpu.use_backend(xp.__name__):
        model = models.lenet5(dtype=dtype, generator=0)
    x = rng.standard_normal((3, 1, 28, 28)).astype(dtype)
    assert compare_with_torch(model, x, rng.integers(0, 10, 3), xp, dtype) == 10


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_vgg_small_vs_torch(xp, rng, dtype):
    with cnn_gpu.use_backend(xp.__name__):
        model = models.vgg_small(dtype=dtype, generator=0)
    x = rng.standard_normal((2, 3, 32, 32)).astype(dtype)
    assert compare_with_torch(model, x, rng.integers(0, 10, 2), xp, dtype) == 12


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_every_layer_type_vs_torch(xp, rng, dtype):
    """A net using every layer type with non-default geometry, against torch."""
    with cnn_gpu.use_backend(xp.__name__):
        g = dict(dtype=dtype, generator=np.random.default_rng(0))
        model = nn.Sequential(
            OrderedDict(
                features=nn.Sequential(
                    nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), **g),
                    nn.LeakyReLU(0.05),
                    nn.AvgPool2d(3, 2, 1),
                    nn.Tanh(),
                    nn.Conv2d(4, 3, 2, bias=False, **g),
                    nn.MaxPool2d(3, 1, 1),
                    nn.Sigmoid(),
                ),
                flatten=nn.Flatten(),
                classifier=nn.Sequential(nn.Linear(3 * 2 * 5, 6, **g), nn.ReLU(), nn.Linear(6, 4, bias=False, **g)),
            )
        )
    x = rng.standard_normal((3, 2, 11, 9)).astype(dtype)
    assert compare_with_torch(model, x, rng.integers(0, 4, 3), xp, dtype) == 6


def test_cross_entropy_loss_backward_scales():
    z = np.random.default_rng(0).standard_normal((4, 3))
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(z, np.array([0, 1, 2, 0]))
    np.testing.assert_array_equal(loss_fn.backward(np.float64(2.0)), 2 * loss_fn.backward())


# --- the channels-last fast path of Sequential --------------------------------------------
def test_backward_without_input_grad_skips_only_the_input_gradient(xp, rng):
    """backward(dy, input_grad=False) returns None and leaves every parameter gradient as the
    full backward computes it (layers before the first parameterised one do not run)."""

    def build():
        with cnn_gpu.use_backend(xp.__name__):
            g = dict(dtype=np.float64, generator=np.random.default_rng(5))
            return nn.Sequential(
                OrderedDict(
                    features=nn.Sequential(
                        nn.MaxPool2d(2, 1),
                        nn.Conv2d(2, 3, 3, padding=1, **g),
                        nn.ReLU(),
                        nn.Conv2d(3, 4, 3, padding=1, **g),
                        nn.ReLU(),
                        nn.MaxPool2d(2),
                    ),
                    flatten=nn.Flatten(),
                    classifier=nn.Sequential(nn.Linear(4 * 3 * 3, 5, **g)),
                )
            )

    x = xp.asarray(rng.standard_normal((4, 2, 7, 7)))
    labels = xp.asarray(rng.integers(0, 5, 4))
    full, part = build(), build()
    _, _, dx = forward_backward(full, x, labels)
    assert dx.shape == x.shape
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(part(x), labels)
    assert part.backward(loss_fn.backward(), input_grad=False) is None
    for (name, p), q in zip(full.named_parameters(), part.parameters()):
        assert_close(q.grad, p.grad, 1e-13, name)


@pytest.mark.parametrize("model_fn,shape", [(models.lenet5, (3, 1, 28, 28)), (models.vgg_small, (2, 3, 32, 32))])
def test_model_fast_path_equals_layer_by_layer(xp, rng, model_fn, shape):
    """nn.Sequential's channels-last run with its fusions gives the numbers of the layers called
    one by one on NCHW arrays (float64)."""
    with cnn_gpu.use_backend(xp.__name__):
        model = model_fn(dtype=np.float64, generator=0)
    x = xp.asarray(rng.standard_normal(shape))
    dy = xp.asarray(rng.standard_normal((shape[0], 10)))
    y = model(x)
    dx = model.backward(dy)
    fast = [to_numpy(y), to_numpy(dx)] + [to_numpy(p.grad).copy() for p in model.parameters()]
    model.zero_grad()
    leaves = [m for _, m in model.named_modules() if not m._modules]
    h = x
    for m in leaves:
        h = m.forward(h)
    g = dy
    for m in reversed(leaves):
        g = m.backward(g)
    slow = [to_numpy(h), to_numpy(g)] + [to_numpy(p.grad).copy() for p in model.parameters()]
    for a, b in zip(fast, slow):
        assert_close(a, b, 1e-12, model_fn.__name__)


def test_backward_without_input_grad_with_a_user_layer(rng):
    """A user's layer with parameters, first in a Sequential: with input_grad=False it is asked
    to skip its dx (Module.backward's signature) and the steps before it do not run."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(np.array([2.0]))
            self._x = None
            self.skipped = 0

        def forward(self, x):
            self._x = x
            return x * self.s.data

        def backward(self, dy, input_grad=True):
            self.s.grad += (dy * self._x).sum(keepdims=True).reshape(1)
            if not input_grad:
                self.skipped += 1
                return None
            return dy * self.s.data

    class CountingTanh(nn.Tanh):
        calls = 0

        def backward(self, dy, input_grad=True):
            CountingTanh.calls += 1
            return super().backward(dy, input_grad)

    scale = Scale()
    model = nn.Sequential(CountingTanh(), scale, nn.Linear(3, 2, dtype=np.float64, generator=0))
    x = rng.standard_normal((4, 3))
    model(x)
    assert model.backward(np.ones((4, 2)), input_grad=False) is None
    assert scale.skipped == 1 and CountingTanh.calls == 0  # the steps before the first with parameters never ran
    grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    model(x)
    assert model.backward(np.ones((4, 2))).shape == x.shape
    assert CountingTanh.calls == 1
    for g, p in zip(grads, model.parameters()):
        np.testing.assert_array_equal(g, p.grad)


def test_sequential_plans_fusion_from_what_the_layers_declare():
    """The CPU and CUDA engines run a ReLU inside the Conv2d/Linear before it; the CPU engine runs
    a ReLU before a max pool after it; the reference runs every layer as it comes."""
    from cnn_gpu import cpu
    from cnn_gpu.cuda import ops as cuda_ops
    from cnn_gpu.functional import reference
    from cnn_gpu.nn.module import plan

    conv, relu, pool, relu2 = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU()
    conv2, relu3, flat, lin, relu4 = nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2), nn.ReLU()
    layers = [conv, relu, pool, conv2, relu3, flat, lin, relu4, relu2]

    def shape(steps):
        return [(type(s.layer).__name__, s.activation) if hasattr(s, "activation") else type(s).__name__ for s in steps]

    assert shape(plan(layers, reference)) == [type(m).__name__ for m in layers]
    assert shape(plan(layers, cuda_ops)) == [
        ("Conv2d", "relu"),
        "MaxPool2d",
        ("Conv2d", "relu"),
        "Flatten",
        ("Linear", "relu"),
        "ReLU",
    ]
    assert shape(plan(layers, cpu)) == ["Conv2d", "MaxPool2d", "ReLU", ("Conv2d", "relu"), "Flatten", ("Linear", "relu"), "ReLU"]

    class MyAct(nn.ReLU):  # a user's layer inherits what ReLU declares, or overrides it
        activation_name = None
        commutes_with_max = False

    assert shape(plan([conv, MyAct(), pool], cpu)) == ["Conv2d", "MyAct", "MaxPool2d"]


@pytest.mark.parametrize("engine", ["reference", "cpu"])
def test_cross_entropy_loss_range_check_numpy_at_once_and_the_flag_elsewhere(engine):
    """On NumPy arrays the layer checks the labels at once; the functional device flag
    (label_check) works on every engine: engines without it in their kernel get it from the
    public API (a few array ops), with the same sticky semantics."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 3))
    with cnn_gpu.config.override(engine=engine):
        with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 2\], got values in \[0, 3\]"):
            nn.CrossEntropyLoss()(z, np.array([0, 1, 3, 2]))
        flag = np.zeros((), np.int64)
        F.softmax_cross_entropy(z, np.array([0, 1, 2, 2]), label_check=flag)
        assert int(flag) == 0
        loss, _ = F.softmax_cross_entropy(z, np.array([0, -1, 2, 2]), label_check=flag)  # no error raised here
        assert int(flag) == 1
        F.softmax_cross_entropy(z, np.array([0, 1, 2, 2]), label_check=flag)
        assert int(flag) == 1  # sticky
        with pytest.raises(TypeError, match="label_check: expected a 0-d int64 array"):
            F.softmax_cross_entropy(z, np.array([0, 1, 2, 2]), label_check=np.zeros(1, np.int32))
