"""The textbook formulation of CNN backprop: parameters in a dict, corrected and fast.

Conventions (those of the classic course notes this library grew out of):

- ``X`` is (m, n_H, n_W, n_C): channels last, one example per row.
- Conv layers come first: ``W1..Wk`` of shape (f, f, n_C_prev, n_C), ``b1..bk`` of shape
  (1, 1, 1, n_C). Each conv layer is stride 1, no padding ("valid"), no activation unless
  ``conv_activation="relu"``, then a 2x2 max-pool with stride 2.
- Then flatten (channels-last order) to activations of shape (n, m): one *column* per example.
- Then fully connected layers ``W`` (n_out, n_in), ``b`` (n_out, 1): Z = W A_prev + b, ReLU in the
  hidden layers and softmax at the output. ``Y`` is one-hot (n_classes, m); the output layer is
  (n_classes, m).

The number of conv layers is inferred from the ranks of the weights (a 4-D W is a conv
layer), so conv and fully connected layer counts may differ. (The original notes take
L = len(parameters) // 2 for both loops, which is wrong whenever they differ.)

Backward, with delta_l = dL/dZ_l:
    delta_L = (A_L - Y) / m                    softmax + mean cross-entropy
    dW_l = delta_l A_{l-1}^T,  db_l = sum over examples of delta_l,  dA_{l-1} = W_l^T delta_l
    delta_{l-1} = dA_{l-1} * relu'(Z_{l-1})
and through each conv block: max-pool backward (to the argmax), ReLU' (if used), then the
conv backward (col2im of W^T delta) from cnn_gpu.functional.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import functional as F
from .backend import current_xp, get_array_module
from .functional._checks import check_float, describe
from .random import resolve_generator

CONV_ACTIVATIONS = (None, "relu")


def _layer_count(parameters: dict) -> tuple[int, int]:
    """(number of conv layers, total number of layers) from keys W1..WL and their ranks."""
    if not isinstance(parameters, dict):
        raise TypeError(f"parameters: expected a dict with keys 'W1', 'b1', ..., got {type(parameters).__name__}")
    L = 0
    while f"W{L + 1}" in parameters:
        L += 1
    if L == 0:
        raise ValueError(f"parameters: expected keys 'W1', 'b1', ..., got {sorted(parameters)}")
    for l in range(1, L + 1):
        if f"b{l}" not in parameters:
            raise ValueError(f"parameters: 'W{l}' has no bias 'b{l}'")
    ranks = [parameters[f"W{l}"].ndim for l in range(1, L + 1)]
    n_conv = 0
    while n_conv < L and ranks[n_conv] == 4:
        n_conv += 1
    if any(r != 2 for r in ranks[n_conv:]):
        raise ValueError(f"parameters: expected 4-D conv weights first, then 2-D fully connected ones, got ranks {ranks}")
    if n_conv == L:
        raise ValueError("parameters: expected at least one fully connected layer (the softmax output), got none")
    return n_conv, L


def initialize_parameters(input_shape, conv_layers, fc_layers, generator=None, dtype=np.float32) -> dict:
    """He-initialised parameters for ``conv_layers`` [(f, n_C), ...] and ``fc_layers`` [n_1, ..., n_classes].

    ``input_shape`` is (n_H, n_W, n_C) of one example. Biases start at zero.
    """
    gen = resolve_generator(generator)
    xp = current_xp()
    if len(input_shape) != 3:
        raise ValueError(f"input_shape: expected (n_H, n_W, n_C), got {input_shape!r}")
    if not fc_layers:
        raise ValueError("fc_layers: expected at least the output layer size, got an empty list")
    n_H, n_W, n_C = (int(s) for s in input_shape)
    params: dict[str, Any] = {}
    l = 0
    for f, c in conv_layers:
        l += 1
        if f > n_H or f > n_W:
            raise ValueError(f"conv_layers[{l - 1}]: a {f}x{f} filter does not fit the {n_H}x{n_W} input of layer {l}")
        std = math.sqrt(2.0 / (f * f * n_C))
        params[f"W{l}"] = xp.asarray((gen.standard_normal((f, f, n_C, c)) * std).astype(dtype))
        params[f"b{l}"] = xp.zeros((1, 1, 1, c), dtype=dtype)
        n_H, n_W, n_C = (n_H - f + 1) // 2, (n_W - f + 1) // 2, c
        if n_H < 1 or n_W < 1:
            raise ValueError(f"conv_layers: layer {l} leaves no spatial extent after pooling")
    n_prev = n_H * n_W * n_C
    for n in fc_layers:
        l += 1
        params[f"W{l}"] = xp.asarray((gen.standard_normal((n, n_prev)) * math.sqrt(2.0 / n_prev)).astype(dtype))
        params[f"b{l}"] = xp.zeros((n, 1), dtype=dtype)
        n_prev = n
    return params


def forward_propagation(X, parameters: dict, conv_activation: str | None = None):
    """Forward pass -> (output_layer (n_classes, m), caches)."""
    check_float("X", X, ndim=4)
    if conv_activation not in CONV_ACTIVATIONS:
        raise ValueError(f"conv_activation: expected one of {CONV_ACTIVATIONS}, got {conv_activation!r}")
    n_conv, L = _layer_count(parameters)
    xp = get_array_module(X)
    caches: list[tuple] = []
    A = xp.ascontiguousarray(X.transpose(0, 3, 1, 2))  # (m, n_C, n_H, n_W)
    for l in range(1, n_conv + 1):
        W, b = parameters[f"W{l}"], parameters[f"b{l}"]
        if W.shape[2] != A.shape[1]:
            raise ValueError(f"W{l}: expected n_C_prev = {A.shape[1]} in its third axis, got {describe(W)}")
        w = xp.ascontiguousarray(W.transpose(3, 2, 0, 1))  # (n_C, n_C_prev, f, f)
        Z, conv_cache = F.conv2d_forward(A, w, b.reshape(-1))  # (m, n_C, n_H', n_W')
        act_cache = None
        if conv_activation == "relu":
            Z, act_cache = F.relu_forward(Z)
        A, pool_cache = F.max_pool2d_forward(Z, 2, 2)
        caches.append(("conv", conv_cache, act_cache, pool_cache))
    if n_conv:
        conv_shape = A.shape
        A = A.transpose(0, 2, 3, 1).reshape(A.shape[0], -1)  # (m, n_H*n_W*n_C), channels-last order
        caches.append(("flatten", conv_shape))
    else:
        A = A.transpose(0, 2, 3, 1).reshape(A.shape[0], -1)  # (m, n_H*n_W*n_C)
        caches.append(("flatten", None))
    # fully connected layers on rows (m, n); the textbook's column view is their transpose
    for l in range(n_conv + 1, L + 1):
        W, b = parameters[f"W{l}"], parameters[f"b{l}"]
        if W.shape[1] != A.shape[1]:
            raise ValueError(f"W{l}: expected {A.shape[1]} input columns, got {describe(W)}")
        Z, lin_cache = F.linear_forward(A, W, b.reshape(-1))  # (m, n_out)
        if l < L:
            A, act_cache = F.relu_forward(Z)
        else:
            A, act_cache = F.softmax(Z, axis=1), None
        caches.append(("fc", lin_cache, act_cache))
    return A.T, caches  # (n_classes, m)


def compute_cost(output_layer, Y):
    """Mean cross-entropy -(1/m) sum Y log(output_layer); a 0-d array."""
    check_float("output_layer", output_layer, ndim=2)
    check_float("Y", Y, ndim=2)
    if Y.shape != output_layer.shape:
        raise ValueError(f"Y: expected one-hot of shape {tuple(output_layer.shape)} (n_classes, m), got {describe(Y)}")
    xp = get_array_module(output_layer)
    tiny = np.finfo(output_layer.dtype).tiny
    m = Y.shape[1]
    return -(Y * xp.log(xp.maximum(output_layer, tiny))).sum() / output_layer.dtype.type(m)


def backward_propagation(Y, output_layer, caches) -> dict:
    """Gradients of compute_cost -> {"dW1": ..., "db1": ..., ...} in the parameters' shapes."""
    check_float("Y", Y, ndim=2)
    if Y.shape != output_layer.shape:
        raise ValueError(f"Y: expected one-hot of shape {tuple(output_layer.shape)} (n_classes, m), got {describe(Y)}")
    xp = get_array_module(output_layer)
    m = Y.shape[1]
    grads: dict[str, Any] = {}
    L = sum(1 for c in caches if c[0] in ("conv", "fc"))
    dZ = ((output_layer - Y) / output_layer.dtype.type(m)).T  # (m, n_classes): delta_L, one row per example
    l = L
    dA: Any = None
    for entry in reversed(caches):
        kind = entry[0]
        if kind == "fc":
            _, lin_cache, act_cache = entry
            if act_cache is not None:  # hidden layer: delta = dA * relu'(Z)
                dZ = F.relu_backward(dA, act_cache)
            dA, dW, db = F.linear_backward(dZ, lin_cache)  # dA (m, n_in), dW (n_out, n_in), db (n_out,)
            grads[f"dW{l}"], grads[f"db{l}"] = dW, db.reshape(-1, 1)
            l -= 1
        elif kind == "flatten":
            shape = entry[1]
            if shape is None:
                break
            m_, C, H, W = shape
            dA = xp.ascontiguousarray(dA.reshape(m_, H, W, C).transpose(0, 3, 1, 2))  # (m, n_C, n_H, n_W)
        else:
            _, conv_cache, act_cache, pool_cache = entry
            dZ = F.max_pool2d_backward(dA, pool_cache)
            if act_cache is not None:
                dZ = F.relu_backward(dZ, act_cache)
            dA, dw, db = F.conv2d_backward(dZ, conv_cache)  # dw (n_C, n_C_prev, f, f)
            grads[f"dW{l}"] = xp.ascontiguousarray(dw.transpose(2, 3, 1, 0))  # (f, f, n_C_prev, n_C)
            grads[f"db{l}"] = db.reshape(1, 1, 1, -1)
            l -= 1
    return grads


def update_parameters(parameters: dict, gradients: dict, learning_rate: float) -> dict:
    """Gradient descent in place: W <- W - alpha dW, b <- b - alpha db. Returns ``parameters``."""
    n_conv, L = _layer_count(parameters)
    for l in range(1, L + 1):
        for p in ("W", "b"):
            key, gkey = f"{p}{l}", f"d{p}{l}"
            if gkey not in gradients:
                raise KeyError(f"gradients: missing {gkey!r}")
            if gradients[gkey].shape != parameters[key].shape:
                raise ValueError(
                    f"gradients[{gkey!r}]: expected shape {tuple(parameters[key].shape)}, got {describe(gradients[gkey])}"
                )
            parameters[key] -= parameters[key].dtype.type(learning_rate) * gradients[gkey]
    return parameters


def predict(X, parameters: dict, conv_activation: str | None = None):
    """Predicted class index per example, shape (m,)."""
    out, _ = forward_propagation(X, parameters, conv_activation)
    return out.argmax(axis=0)
