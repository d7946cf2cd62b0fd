"""Label smoothing in softmax cross-entropy (torch's semantics): the target is
t = (1 - eps) * onehot + eps / K (or (1 - eps) * labels + eps / K for probability rows).

Gradient checks in float64, a naive loop reference written from that definition, PyTorch as an
optional oracle, the layer, and bad input. The CUDA kernel's smoothing is tested under the
emulation in tests/test_kernels_emul.py and on every engine in tests/test_engines.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_close, gradcheck, tol_for

import cnn_gpu.functional as F
from cnn_gpu import nn
from cnn_gpu.backend import to_numpy

EPS = [0.0, 0.1, 0.35, 1.0]


def make_labels(xp, rng, kind, N, K, dtype=np.float64):
    idx = rng.integers(0, K, N)
    if kind == "int":
        return xp.asarray(idx)
    if kind == "onehot":
        return xp.asarray(np.eye(K, dtype=dtype)[idx])
    t = rng.random((N, K))
    return xp.asarray((t / t.sum(axis=1, keepdims=True)).astype(dtype))


def naive(z, labels, eps):
    """Loops over samples and classes, from the definition, in float64."""
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels)
    N, K = z.shape
    loss, dz = 0.0, np.zeros((N, K))
    for n in range(N):
        m = max(z[n])
        lse = m + math.log(sum(math.exp(v - m) for v in z[n]))
        for k in range(K):
            target = labels[n, k] if labels.ndim == 2 else float(k == labels[n])
            t = (1 - eps) * target + eps / K
            loss -= t * (z[n, k] - lse) / N
            dz[n, k] = (math.exp(z[n, k] - lse) - t) / N
    return loss, dz


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("kind", ["int", "onehot", "soft"])
def test_label_smoothing_gradcheck(xp, rng, kind, eps):
    z = xp.asarray(3 * rng.standard_normal((5, 4)))
    labels = make_labels(xp, rng, kind, 5, 4)

    def fwd(a):
        return F.softmax_cross_entropy(a, labels, label_smoothing=eps)

    gradcheck(fwd, lambda dloss, dz: dz * dloss, [z], tol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("kind", ["int", "onehot", "soft"])
def test_label_smoothing_matches_naive(xp, rng, kind, eps, dtype):
    z = (3 * rng.standard_normal((7, 6))).astype(dtype)
    labels = make_labels(xp, rng, kind, 7, 6, dtype)
    loss, dz = F.softmax_cross_entropy(xp.asarray(z), labels, label_smoothing=eps)
    assert loss.dtype == dtype and dz.dtype == dtype  # float32 stays float32
    want_loss, want_dz = naive(z, to_numpy(labels), eps)
    assert_close(to_numpy(loss), np.asarray(want_loss), tol_for(dtype), "loss")
    assert_close(to_numpy(dz), want_dz, tol_for(dtype), "dlogits")


def test_label_smoothing_zero_is_plain_cross_entropy(xp, rng):
    z = xp.asarray(rng.standard_normal((8, 5)))
    labels = xp.asarray(rng.integers(0, 5, 8))
    (a, da), (b, db) = F.softmax_cross_entropy(z, labels), F.softmax_cross_entropy(z, labels, label_smoothing=0.0)
    assert float(a) == float(b) and np.array_equal(to_numpy(da), to_numpy(db))
    smoothed, _ = F.softmax_cross_entropy(z, labels, label_smoothing=0.2)
    assert float(smoothed) != float(a)


@pytest.mark.parametrize("eps", [0.1, 0.7])
@pytest.mark.parametrize("kind", ["int", "soft"])
def test_label_smoothing_torch_oracle(xp, rng, kind, eps):
    torch = pytest.importorskip("torch")
    z = 2 * rng.standard_normal((9, 7))
    labels = make_labels(np, rng, kind, 9, 7)
    tz = torch.tensor(z, requires_grad=True)
    tl = torch.tensor(labels)
    want = torch.nn.functional.cross_entropy(tz, tl, label_smoothing=eps)
    want.backward()
    layer = nn.CrossEntropyLoss(label_smoothing=eps)
    loss = layer.forward(xp.asarray(z), xp.asarray(labels))
    assert_close(to_numpy(loss), want.detach().numpy(), 1e-12, "loss vs torch")
    assert_close(to_numpy(layer.backward()), tz.grad.numpy(), 1e-12, "dlogits vs torch")


def test_cross_entropy_layer_label_smoothing_config(xp, rng):
    assert nn.CrossEntropyLoss().config() == {}
    layer = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert layer.label_smoothing == 0.1 and layer.config() == {"label_smoothing": 0.1}
    z = xp.asarray(rng.standard_normal((4, 3)).astype(np.float32))
    loss = layer.forward(z, xp.asarray(np.array([0, 1, 2, 0])))
    want, dz = F.softmax_cross_entropy(z, xp.asarray(np.array([0, 1, 2, 0])), label_smoothing=0.1)
    assert float(loss) == float(want)
    assert np.array_equal(to_numpy(layer.backward()), to_numpy(dz))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", True, None])
def test_label_smoothing_bad_value(xp, bad):
    z = xp.asarray(np.zeros((2, 3)))
    labels = xp.asarray(np.array([0, 1]))
    with pytest.raises(ValueError, match=r"label_smoothing: expected a number in \[0, 1\], got"):
        F.softmax_cross_entropy(z, labels, label_smoothing=bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.CrossEntropyLoss(label_smoothing=bad)
