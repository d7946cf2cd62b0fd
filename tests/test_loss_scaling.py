"""Dynamic loss scaling and the float16 path's optimizer step on the device (kernels/scaler.cu and optim.cu,
through cnn_gpu.cuda.ops on the g++ emulation): the found-inf flag over the gradient buffer, the
scale's update held to torch's own (torch._amp_update_scale_, GradScaler's rule, when torch is
installed; a plain rule written here otherwise), and SGD on float32 master weights that unscales the
gradient, writes the float16 copy, and skips the whole step when the flag is set.

Every test has "emul" in its name (``pytest -k emul``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnn_gpu import cuda
from cnn_gpu.cuda import ops

if os.name != "posix":
    pytest.skip("the CUDA emulation needs a POSIX system with g++", allow_module_level=True)


@pytest.fixture(scope="module")
def emul():
    from helpers import load_harness  # noqa: PLC0415

    launcher = load_harness().EmulationLauncher(check_order=True, grid_cap=8)
    with cuda.use_launcher(launcher):
        yield launcher


def _flag():
    return np.zeros(1, np.int32)


@pytest.mark.parametrize("launch", [None, (1, 32), (3, 32)], ids=["default", "g1b32", "g3b32"])
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", [0, 777, 4999])
def test_emul_found_inf_flags_any_non_finite_gradient(emul, bad, where, launch):
    g = np.random.default_rng(1).standard_normal(5000).astype(np.float32) * 1e30  # large but finite
    if bad is not None:
        g[where] = bad
    found = _flag()
    ops.found_inf_(g, found, **({} if launch is None else {"grid": launch[0], "block": launch[1]}))
    assert found[0] == (0 if bad is None else 1)
    if bad is None:  # a set flag stays set (the kernel only ever writes 1)
        found[0] = 1
        ops.found_inf_(g, found)
        assert found[0] == 1


def _plain_rule(scale, tracker, found, growth, backoff, interval):
    """GradScaler's update, as torch documents it (torch.amp.GradScaler.update)."""
    if found:
        return scale * backoff, 0
    if tracker + 1 >= interval:
        grown = np.float32(scale * growth)
        return (grown if np.isfinite(grown) else scale), 0
    return scale, tracker + 1


def test_emul_loss_scale_update_follows_gradscaler(emul):
    """A pattern of overflows and clean runs (interval 3): the scale and the count of clean steps
    after every step equal torch's _amp_update_scale_ (else the documented rule); the flag is reset."""
    pattern = [1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    scale, tracker, found, taken = np.array([2.0**16], np.float32), np.zeros(1, np.int32), _flag(), _flag()
    try:
        import torch  # noqa: PLC0415  (torch's own update, the oracle, where installed)
    except ImportError:
        torch = None
    if torch is not None:
        t_scale, t_tracker = torch.tensor([2.0**16]), torch.zeros(1, dtype=torch.int32)
    p_scale, p_tracker = np.float32(2.0**16), 0
    for step, inf in enumerate(pattern):
        found[0] = inf
        ops.loss_scale_update_(scale, tracker, found, taken, 2.0, 0.5, 3)
        assert found[0] == 0 and taken[0] == step + 1 - sum(pattern[: step + 1])  # the steps not skipped
        p_scale, p_tracker = _plain_rule(p_scale, p_tracker, inf, np.float32(2.0), np.float32(0.5), 3)
        assert (scale[0], tracker[0]) == (p_scale, p_tracker), step
        if torch is not None:
            torch._amp_update_scale_(t_scale, t_tracker, torch.tensor([float(inf)]), 2.0, 0.5, 3)
            assert (scale[0], tracker[0]) == (t_scale.item(), t_tracker.item()), step


def test_emul_loss_scale_growth_stops_below_inf(emul):
    """Growth that would make the scale inf keeps it (torch: only a finite scale is taken)."""
    scale, tracker, found = np.array([2.0**127], np.float32), np.array([1999], np.int32), _flag()
    ops.loss_scale_update_(scale, tracker, found, np.zeros(1, np.int32), 2.0, 0.5, 2000)
    assert scale[0] == 2.0**127 and tracker[0] == 0
    with pytest.raises(ValueError, match=r"^scale: expected a float32 array of shape \(1,\), got float64"):
        ops.loss_scale_update_(scale.astype(np.float64), tracker, found, np.zeros(1, np.int32), 2.0, 0.5, 2000)


def _naive_master_sgd(p, g, buf, lr, mu, wd, nesterov, scale):
    """The step in float32, written from the formulas (the master weights, the buffer, the copy)."""
    p, buf = p.copy(), None if buf is None else buf.copy()
    f = np.float32
    d = g * (f(1) / f(scale))
    if wd:
        d = d + f(wd) * p
    if mu:
        buf = f(mu) * buf + d
        d = d + f(mu) * buf if nesterov else buf
    p = p - f(lr) * d
    return p, buf, p.astype(np.float16)


@pytest.mark.parametrize("mu,wd,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 5e-4, True), (0.0, 1e-2, False)])
def test_emul_sgd_update_master_unscales_and_writes_the_float16_copy(emul, mu, wd, nesterov):
    """Two steps: the float32 masters follow the SGD formulas on g / scale (bit for bit), the
    float16 copy is the masters rounded, the momentum buffer starts from zeros."""
    rng = np.random.default_rng(4)
    n = 3000
    p = rng.standard_normal(n).astype(np.float32)
    buf = np.zeros(n, np.float32) if mu else None
    p16 = np.full(n, np.nan, np.float16)
    scale = np.array([2.0**16], np.float32)
    want_p, want_buf = p.copy(), None if buf is None else buf.copy()
    for _ in range(2):
        g = (rng.standard_normal(n) * 2.0**16).astype(np.float32)  # scaled gradients
        ops.sgd_update_master_(p, g, buf, p16, 0.05, mu, wd, nesterov, scale, _flag())
        want_p, want_buf, want16 = _naive_master_sgd(want_p, g, want_buf, 0.05, mu, wd, nesterov, scale[0])
        np.testing.assert_array_equal(p, want_p)
        np.testing.assert_array_equal(p16, want16)
        if mu:
            np.testing.assert_array_equal(buf, want_buf)


def test_emul_sgd_update_master_skips_the_step_on_overflow(emul):
    """found[0] = 1: masters, momentum buffer and float16 copy are untouched (a NaN gradient does
    not reach them); the lr from device scalars as sgd_update_'s."""
    rng = np.random.default_rng(6)
    p, buf = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
    p16 = p.astype(np.float16)
    g = np.full(100, np.nan, np.float32)
    found = np.ones(1, np.int32)
    before = (p.copy(), buf.copy(), p16.copy())
    ops.sgd_update_master_(p, g, buf, p16, 0.1, 0.9, 0.0, False, np.array([2.0**24], np.float32), found)
    for a, b in zip((p, buf, p16), before):
        assert a.tobytes() == b.tobytes()
    g = np.ones(100, np.float32)
    ops.sgd_update_master_(
        p, g, None, p16, 123.0, 0.0, 0.0, False, np.array([4.0], np.float32), _flag(), device_scalars=np.array([0.5])
    )
    np.testing.assert_array_equal(p, before[0] - np.float32(0.5) * np.float32(0.25))
    with pytest.raises(ValueError, match=r"^p16: expected 100 float16 values \(the master weights'\), got 100 float32"):
        ops.sgd_update_master_(p, g, None, p, 0.1, 0.0, 0.0, False, np.ones(1, np.float32), _flag())


def _naive_master_adam(p, m, v, g, lr, b1, b2, eps, wd, decoupled, scale, t):
    """Adam / AdamW in float32 from the formulas, on g / scale, the step's scalars in double (t: the
    steps taken)."""
    f = np.float32
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    g = g * (f(1) / f(scale))
    if wd:
        if decoupled:
            p = p * f(1.0 - lr * wd)
        else:
            g = g + f(wd) * p
    m = f(b1) * m + f(1.0 - b1) * g
    v = f(b2) * v + f(1.0 - b2) * (g * g)
    p = p - f(lr / bc1) * m / (np.sqrt(v / f(bc2)) + f(eps))
    return p, m, v


@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (1e-2, False), (1e-2, True)], ids=["adam", "l2", "adamw"])
def test_emul_adam_update_master_counts_only_the_steps_taken(emul, wd, decoupled):
    """Three steps, the second skipped (found): the masters, m, v follow Adam's formulas on g / scale
    bit for bit with t = 1, 2 (the skipped step leaves everything and t alone); the float16 copy is
    the masters rounded; the lr from the optimizer's device scalars (their first value)."""
    rng = np.random.default_rng(9)
    n = 2000
    p = rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    p16 = p.astype(np.float16)
    scale, taken = np.array([2.0**12], np.float32), np.zeros(1, np.int32)
    want = (p.copy(), m.copy(), v.copy())
    for step, skip in enumerate([0, 1, 0]):
        g = (rng.standard_normal(n) * 2.0**12).astype(np.float32)
        found = np.array([skip], np.int32)
        before = (p.copy(), m.copy(), v.copy(), p16.copy())
        ops.adam_update_master_(
            p, g, m, v, p16, 99.0, 0.9, 0.999, 1e-8, wd, decoupled, scale, found, taken, device_scalars=np.array([1e-3, 0.0, 0.0])
        )
        if skip:
            assert all(a.tobytes() == b.tobytes() for a, b in zip((p, m, v, p16), before))
        else:
            want = _naive_master_adam(*want, g, 1e-3, 0.9, 0.999, 1e-8, wd, decoupled, scale[0], int(taken[0]) + 1)
            np.testing.assert_array_equal(p, want[0])
            np.testing.assert_array_equal(m, want[1])
            np.testing.assert_array_equal(v, want[2])
            np.testing.assert_array_equal(p16, want[0].astype(np.float16))
        ops.loss_scale_update_(scale, np.zeros(1, np.int32), found, taken, 2.0, 0.5, 2000)
        assert taken[0] == [1, 1, 2][step]
    assert taken[0] == 2
