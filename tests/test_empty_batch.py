"""Empty batches (N = 0): every op gives an empty output of the right shape and dtype and zero
gradients for its weights, on every engine (the dispatch runs empty arrays on the reference), as
torch does; the loss's mean over no rows is NaN, as torch's. Only the batch may be empty: a weight
with no filters or no features is an error that names it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DTYPES, ENGINES, force_engine

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import models, nn
from cnn_gpu.backend import to_numpy


@pytest.fixture(params=ENGINES)
def engine(request):
    """The engine under test, forced for the test's ops."""
    yield from force_engine(request)


def empty(shape, dtype):
    return np.zeros(shape, dtype=dtype)


def is_empty(a, shape, dtype, what):
    a = to_numpy(a)
    assert a.shape == tuple(shape), f"{what}: shape {a.shape}, expected {shape}"
    assert a.dtype == np.dtype(dtype), f"{what}: dtype {a.dtype}, expected {np.dtype(dtype)}"


def is_zero(a, shape, dtype, what):
    is_empty(a, shape, dtype, what)
    assert not np.any(to_numpy(a)), f"{what}: expected zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 2)])
def test_conv2d_empty_batch(engine, rng, dtype, activation, stride, padding, dilation):
    x = empty((0, 3, 9, 8), dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    y, cache = F.conv2d_forward(x, w, b, stride=stride, padding=padding, dilation=dilation, activation=activation)
    oh = (9 + 2 * padding - dilation * 2 - 1) // stride + 1
    ow = (8 + 2 * padding - dilation * 2 - 1) // stride + 1
    is_empty(y, (0, 4, oh, ow), dtype, "y")
    dx, dw, db = F.conv2d_backward(np.zeros(y.shape, dtype), cache)
    is_empty(dx, x.shape, dtype, "dx")
    is_zero(dw, w.shape, dtype, "dw")
    is_zero(db, b.shape, dtype, "db")
    y0, cache0 = F.conv2d_forward(x, w, None, stride=stride, padding=padding, dilation=dilation)
    _, dw0, db_none = F.conv2d_backward(np.zeros(y0.shape, dtype), cache0)
    is_zero(dw0, w.shape, dtype, "dw without bias")
    assert db_none is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col_col2im_empty_batch(engine, dtype):
    x = empty((0, 2, 5, 5), dtype)
    cols = F.im2col(x, (3, 3), stride=1, padding=1)
    is_empty(cols, (0, 18, 25), dtype, "cols")
    is_empty(F.col2im(cols, x.shape, (3, 3), stride=1, padding=1), x.shape, dtype, "col2im")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["max", "avg"])
def test_pools_empty_batch(engine, dtype, op):
    x = empty((0, 3, 6, 6), dtype)
    fwd, bwd = getattr(F, f"{op}_pool2d_forward"), getattr(F, f"{op}_pool2d_backward")
    y, cache = fwd(x, 2)
    is_empty(y, (0, 3, 3, 3), dtype, "y")
    is_empty(bwd(np.zeros(y.shape, dtype), cache), x.shape, dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_empty_batch(engine, rng, dtype, activation):
    x = empty((0, 7), dtype)
    w = rng.standard_normal((5, 7)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    y, cache = F.linear_forward(x, w, b, activation=activation)
    is_empty(y, (0, 5), dtype, "y")
    dx, dw, db = F.linear_backward(np.zeros((0, 5), dtype), cache)
    is_empty(dx, x.shape, dtype, "dx")
    is_zero(dw, w.shape, dtype, "dw")
    is_zero(db, b.shape, dtype, "db")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["relu", "leaky_relu", "sigmoid", "tanh", "flatten"])
def test_activations_and_flatten_empty_batch(engine, dtype, op):
    x = empty((0, 3, 4, 2), dtype)
    y, cache = getattr(F, f"{op}_forward")(x)
    is_empty(y, (0, 24) if op == "flatten" else x.shape, dtype, "y")
    is_empty(getattr(F, f"{op}_backward")(np.zeros(y.shape, dtype), cache), x.shape, dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_and_softmax_empty_batch(engine, dtype):
    x = empty((0, 10), dtype)
    y, cache = F.dropout_forward(x, 0.5, True, np.random.default_rng(0))
    is_empty(y, x.shape, dtype, "dropout")
    is_empty(F.dropout_backward(x, cache), x.shape, dtype, "dropout dx")
    is_empty(F.softmax(x, axis=1), x.shape, dtype, "softmax")
    is_empty(F.log_softmax(x, axis=1), x.shape, dtype, "log_softmax")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("labels", [np.zeros(0, np.int64), "onehot"])
def test_loss_of_an_empty_batch_is_nan_with_empty_gradient(engine, dtype, labels):
    logits = empty((0, 10), dtype)
    labels = empty((0, 10), dtype) if isinstance(labels, str) else labels
    loss, dlogits = F.softmax_cross_entropy(logits, labels)
    assert to_numpy(loss).shape == () and to_numpy(loss).dtype == np.dtype(dtype)
    assert np.isnan(to_numpy(loss))
    is_empty(dlogits, (0, 10), dtype, "dlogits")


def test_loss_of_an_empty_batch_matches_torch():
    torch = pytest.importorskip("torch")
    logits = torch.zeros((0, 10), dtype=torch.float64, requires_grad=True)
    want = torch.nn.functional.cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    want.backward()
    loss, dlogits = F.softmax_cross_entropy(np.zeros((0, 10)), np.zeros(0, np.int64))
    assert np.isnan(want.detach().item()) and np.isnan(float(loss))
    assert tuple(logits.grad.shape) == dlogits.shape


def test_conv_and_linear_empty_batch_match_torch(rng):
    torch = pytest.importorskip("torch")
    x = np.zeros((0, 3, 8, 8))
    w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(torch.tensor(x), tw, tb, padding=1)
    ty.sum().backward()
    y, cache = F.conv2d_forward(x, w, b, padding=1)
    _, dw, db = F.conv2d_backward(np.zeros(y.shape), cache)
    assert tuple(ty.shape) == y.shape
    np.testing.assert_array_equal(dw, tw.grad.numpy())
    np.testing.assert_array_equal(db, tb.grad.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make,shape", [(models.lenet5, (1, 28, 28)), (models.vgg_small, (3, 32, 32)), (models.lenet_digits, (1, 8, 8))]
)
def test_models_forward_backward_empty_batch(engine, dtype, make, shape):
    cnn_gpu.manual_seed(0)
    model = make(in_channels=shape[0], num_classes=10).to("numpy", dtype)
    loss_fn = nn.CrossEntropyLoss()
    x = empty((0,) + shape, dtype)
    logits = model(x)
    is_empty(logits, (0, 10), dtype, "logits")
    loss = loss_fn(logits, np.zeros(0, np.int64))
    assert np.isnan(to_numpy(loss))
    dx = model.backward(loss_fn.backward())
    is_empty(dx, x.shape, dtype, "dx")
    for name, p in model.named_parameters():
        is_zero(p.grad, p.data.shape, dtype, f"{name}.grad")
    model(x)
    assert model.backward(np.zeros((0, 10), dtype), input_grad=False) is None


@pytest.mark.parametrize(
    "what,call",
    [
        ("conv, no filters", lambda: F.conv2d_forward(np.zeros((2, 3, 8, 8)), np.zeros((0, 3, 3, 3)), None)),
        ("conv, no input channels", lambda: F.conv2d_forward(np.zeros((2, 0, 8, 8)), np.zeros((4, 0, 3, 3)), None)),
        ("linear, no outputs", lambda: F.linear_forward(np.zeros((2, 3)), np.zeros((0, 3)), None)),
        ("linear, no inputs", lambda: F.linear_forward(np.zeros((2, 0)), np.zeros((4, 0)), None)),
    ],
)
def test_only_the_batch_may_be_empty(what, call):
    with pytest.raises(ValueError, match=r"^w: expected at least one .*got float64 array of shape"):
        call()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: F.max_pool2d_forward(np.zeros((2, 3, 0, 4)), 2), "kernel_size: the 2x2 window must fit"),
        (
            lambda: F.conv2d_forward(np.zeros((2, 3, 2, 2)), np.zeros((4, 3, 3, 3)), None),
            "kernel_size: the .*kernel 3x3 must fit",
        ),
        (lambda: F.relu_forward(np.zeros((2, 3), np.float16)), "x: expected a float32 or float64 array, got float16"),
        (
            lambda: F.linear_forward(np.zeros((2, 3), np.int32), np.zeros((4, 3), np.float32), None),
            "x: expected a float32 or float64",
        ),
    ],
)
def test_odd_shapes_and_dtypes_are_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_training_and_evaluation_need_at_least_one_example():
    from cnn_gpu import optim
    from cnn_gpu.data import DataLoader
    from cnn_gpu.train import evaluate, fit

    model = models.lenet_digits()
    x, y = np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64)
    with pytest.raises(ValueError, match=r"^x: expected at least one example to evaluate, got an array of shape \(0, 1, 8, 8\)"):
        evaluate(model, x, y)
    with pytest.raises(ValueError, match="^loader: expected at least one batch, got a loader of 0 examples"):
        fit(model, optim.SGD(model, 0.1), DataLoader(x, y, 4), 1)
