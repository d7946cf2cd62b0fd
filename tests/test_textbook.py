"""The textbook API: parameter dict W1..WL, channels-last X, one-hot Y (n_classes, m)."""

import numpy as np
import pytest
from helpers import numerical_grad, rel_error

import cnn_gpu
from cnn_gpu import textbook as tb


def _problem(xp, conv_layers=((3, 4), (2, 5)), fc=(7, 3), m=5, shape=(11, 11, 2), seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    with cnn_gpu.use_backend(xp.__name__):
        params = tb.initialize_parameters(shape, list(conv_layers), list(fc), generator=seed, dtype=dtype)
    # non-zero biases so their gradients are exercised through every path
    for k in params:
        if k.startswith("b"):
            params[k] += xp.asarray(rng.standard_normal(params[k].shape).astype(dtype) * 0.1)
    X = xp.asarray(rng.standard_normal((m,) + shape).astype(dtype))
    labels = rng.integers(0, fc[-1], size=m)
    Y = xp.asarray(np.eye(fc[-1], dtype=dtype)[labels].T)  # (n_classes, m)
    return params, X, Y


def test_shapes_follow_the_textbook_conventions(xp):
    params, X, Y = _problem(xp)
    assert params["W1"].shape == (3, 3, 2, 4) and params["b1"].shape == (1, 1, 1, 4)
    assert params["W2"].shape == (2, 2, 4, 5) and params["b2"].shape == (1, 1, 1, 5)
    # 11 -> conv3 9 -> pool 4 -> conv2 3 -> pool 1: flatten 1*1*5
    assert params["W3"].shape == (7, 5) and params["b3"].shape == (7, 1)
    assert params["W4"].shape == (3, 7) and params["b4"].shape == (3, 1)
    out, caches = tb.forward_propagation(X, params)
    assert out.shape == Y.shape
    np.testing.assert_allclose(cnn_gpu.to_numpy(out).sum(axis=0), np.ones(X.shape[0]), rtol=1e-12)
    grads = tb.backward_propagation(Y, out, caches)
    for l in range(1, 5):
        assert grads[f"dW{l}"].shape == params[f"W{l}"].shape
        assert grads[f"db{l}"].shape == params[f"b{l}"].shape


@pytest.mark.parametrize("conv_activation", [None, "relu"])
@pytest.mark.parametrize("layout", [((3, 4), (2, 5)), ((3, 3),)], ids=["2conv", "1conv"])
def test_gradients_match_finite_differences(xp, conv_activation, layout):
    params, X, Y = _problem(xp, conv_layers=layout, shape=(9, 9, 2) if len(layout) == 1 else (11, 11, 2))
    out, caches = tb.forward_propagation(X, params, conv_activation)
    grads = tb.backward_propagation(Y, out, caches)

    def cost():
        o, _ = tb.forward_propagation(X, params, conv_activation)
        return float(tb.compute_cost(o, Y))

    for key in params:
        numeric = numerical_grad(cost, params[key])
        err = rel_error(grads["d" + key], numeric)
        assert err < 1e-6, f"d{key}: relative error {err:.2e}"


def test_conv_and_fc_layer_counts_may_differ(xp):
    # 1 conv layer, 3 fully connected: the textbook's L = len(parameters)//2 loop would mix them up
    params, X, Y = _problem(xp, conv_layers=((3, 2),), fc=(6, 5, 3), shape=(8, 8, 1))
    assert tb._layer_count(params) == (1, 4)
    out, caches = tb.forward_propagation(X, params)
    grads = tb.backward_propagation(Y, out, caches)
    assert sorted(grads) == sorted("d" + k for k in params)


def test_gradient_descent_lowers_the_cost(xp):
    params, X, Y = _problem(xp, m=16, dtype=np.float32)
    costs = []
    for _ in range(30):
        out, caches = tb.forward_propagation(X, params, "relu")
        costs.append(float(tb.compute_cost(out, Y)))
        grads = tb.backward_propagation(Y, out, caches)
        params = tb.update_parameters(params, grads, 0.1)
    assert costs[-1] < 0.5 * costs[0], costs
    assert params["W1"].dtype == np.float32  # no silent upcast


def test_update_parameters_is_plain_gradient_descent(xp):
    params, X, Y = _problem(xp)
    before = {k: cnn_gpu.to_numpy(v).copy() for k, v in params.items()}
    out, caches = tb.forward_propagation(X, params)
    grads = tb.backward_propagation(Y, out, caches)
    tb.update_parameters(params, grads, 0.5)
    for k in params:
        np.testing.assert_allclose(cnn_gpu.to_numpy(params[k]), before[k] - 0.5 * cnn_gpu.to_numpy(grads["d" + k]), rtol=1e-12)


def test_bad_parameters_are_named():
    params, X, Y = _problem(np)
    with pytest.raises(ValueError, match="parameters"):
        tb.forward_propagation(X, {})
    bad = dict(params)
    bad["W2"] = bad["W2"][:, :, :3, :]  # n_C_prev 3 where the previous layer gives 4
    with pytest.raises(ValueError, match="W2"):
        tb.forward_propagation(X, bad)
    out, caches = tb.forward_propagation(X, params)
    with pytest.raises(ValueError, match="Y"):
        tb.backward_propagation(Y[:, :2], out, caches)
