"""Test helpers: a finite-difference gradient checker, an error metric, and naive
loop implementations of every op (the independent references the vectorised ops are
compared against). The references run on NumPy float64 and are deliberately written
as explicit Python loops, straight from the definitions, sharing no code with cnn_gpu.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from cnn_gpu.backend import to_numpy


# --- error metric ---------------------------------------------------------------------
def rel_error(a, b) -> float:
    """max|a - b| / max(1e-12, max|a| + max|b|), on host float64 copies."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1e-12, np.max(np.abs(a)) + np.max(np.abs(b))))


def assert_close(a, b, tol: float, what: str = "") -> None:
    err = rel_error(a, b)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def tol_for(dtype) -> float:
    """Agreement required against an independent reference: 1e-10 in float64, 1e-5 in float32."""
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-5


# --- gradient check -------------------------------------------------------------------
def numerical_grad(loss: Callable[[], float], x, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``loss()`` with respect to every element of ``x``
    (modified in place and restored); ``x`` may be a NumPy or a CuPy array."""
    grad = np.zeros(x.shape, dtype=np.float64)
    assert x.flags.c_contiguous, "x must be C-contiguous (perturbed through a flat view)"
    flat = x.reshape(-1)  # a view of x
    for i in range(flat.size):
        old = flat[i].item()
        flat[i] = old + eps
        lp = loss()
        flat[i] = old - eps
        lm = loss()
        flat[i] = old
        grad.reshape(-1)[i] = (lp - lm) / (2 * eps)
    return grad


def gradcheck(
    forward: Callable,
    backward: Callable,
    inputs: Sequence,
    wrt: Sequence[int] | None = None,
    eps: float = 1e-6,
    tol: float = 1e-6,
    seed: int = 0,
) -> list[float]:
    """Check ``backward`` against central finite differences.

    ``forward(*inputs) -> (y, cache)``; ``backward(dy, cache)`` returns the gradient of
    each input (a single array or a tuple in input order). The scalar checked is
    L = sum(y * R) for a fixed random R, so backward gets dy = R. ``inputs`` must be
    contiguous float64 arrays (NumPy or CuPy); ``wrt`` selects which of them to check.
    Returns the relative errors (asserting each is < tol).
    """
    inputs = list(inputs)
    for a in inputs:
        assert a.dtype == np.float64 and a.flags.c_contiguous
    wrt = list(range(len(inputs))) if wrt is None else list(wrt)
    y, cache = forward(*inputs)
    xp = _xp(y)
    R = xp.asarray(np.random.default_rng(seed).standard_normal(y.shape))
    grads = backward(R, cache)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)

    def loss() -> float:
        yy, _ = forward(*inputs)
        return float((yy * R).sum())

    errors = []
    for i in wrt:
        analytic = grads[i]
        assert analytic is not None, f"input {i}: backward returned None"
        assert tuple(analytic.shape) == tuple(inputs[i].shape), f"input {i}: grad shape {analytic.shape} != {inputs[i].shape}"
        numeric = numerical_grad(loss, inputs[i], eps)
        err = rel_error(analytic, numeric)
        assert err < tol, f"input {i}: gradcheck relative error {err:.3e} >= {tol:.1e}"
        errors.append(err)
    return errors


def _xp(a):
    from cnn_gpu.backend import get_array_module

    return get_array_module(a)


def distinct_values(rng: np.random.Generator, shape, gap: float = 1e-2) -> np.ndarray:
    """Random float64 values, all distinct and at least ``gap`` apart (no ties/kinks in max-pool FD)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).astype(np.float64) * gap - n * gap / 2).reshape(shape)


def away_from_zero(rng: np.random.Generator, shape, margin: float = 1e-2) -> np.ndarray:
    """Standard normal values with |x| >= margin (no kinks of relu/leaky_relu under FD)."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < margin, np.sign(x + 1e-300) * margin + x, x)


# --- naive references: convolution ----------------------------------------------------
def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_ref(x, w, b=None, stride=1, padding=0, dilation=1):
    """y[n, f, oh, ow] = b[f] + sum_{c, kh, kw} w[f, c, kh, kw] * x[n, c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW]."""
    (SH, SW), (PH, PW), (DH, DW) = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    OH = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1
    OW = (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1
    y = np.zeros((N, F, OH, OW), dtype=np.float64)
    for n in range(N):
        for f in range(F):
            for oh in range(OH):
                for ow in range(OW):
                    s = 0.0 if b is None else float(b[f])
                    for c in range(C):
                        for kh in range(KH):
                            h = oh * SH - PH + kh * DH
                            if not 0 <= h < H:
                                continue
                            for kw in range(KW):
                                ww = ow * SW - PW + kw * DW
                                if 0 <= ww < W:
                                    s += float(w[f, c, kh, kw]) * float(x[n, c, h, ww])
                    y[n, f, oh, ow] = s
    return y


def conv2d_backward_ref(dy, x, w, stride=1, padding=0, dilation=1):
    """(dx, dw, db) by differentiating each term of conv2d_ref's sum: the same loops, accumulating."""
    (SH, SW), (PH, PW), (DH, DW) = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    _, _, OH, OW = dy.shape
    dx = np.zeros(x.shape)
    dw = np.zeros(w.shape)
    db = np.zeros(F)
    for n in range(N):
        for f in range(F):
            for oh in range(OH):
                for ow in range(OW):
                    g = float(dy[n, f, oh, ow])
                    db[f] += g
                    for c in range(C):
                        for kh in range(KH):
                            h = oh * SH - PH + kh * DH
                            if not 0 <= h < H:
                                continue
                            for kw in range(KW):
                                ww = ow * SW - PW + kw * DW
                                if 0 <= ww < W:
                                    dx[n, c, h, ww] += g * float(w[f, c, kh, kw])
                                    dw[f, c, kh, kw] += g * float(x[n, c, h, ww])
    return dx, dw, db


def im2col_ref(x, kernel_size, stride=1, padding=0, dilation=1):
    """cols[n, (c*KH + kh)*KW + kw, oh*OW + ow] = x_padded[n, c, oh*SH + kh*DH, ow*SW + kw*DW]."""
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    OH = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1
    OW = (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1
    cols = np.zeros((N, C * KH * KW, OH * OW))
    for n in range(N):
        for c in range(C):
            for kh in range(KH):
                for kw in range(KW):
                    for oh in range(OH):
                        for ow in range(OW):
                            h, ww = oh * SH - PH + kh * DH, ow * SW - PW + kw * DW
                            if 0 <= h < H and 0 <= ww < W:
                                cols[n, (c * KH + kh) * KW + kw, oh * OW + ow] = x[n, c, h, ww]
    return cols


# --- naive references: pooling --------------------------------------------------------
def _pool_out(H, K, S, P):
    return (H + 2 * P - K) // S + 1


def max_pool2d_ref(x, kernel_size, stride=None, padding=0):
    """(y, argmax): the first maximum in row-major window order wins; argmax = h*W + w."""
    (KH, KW) = _pair(kernel_size)
    (SH, SW) = _pair(kernel_size if stride is None else stride)
    (PH, PW) = _pair(padding)
    N, C, H, W = x.shape
    OH, OW = _pool_out(H, KH, SH, PH), _pool_out(W, KW, SW, PW)
    y = np.zeros((N, C, OH, OW))
    arg = np.zeros((N, C, OH, OW), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    best, where = -math.inf, -1
                    for kh in range(KH):
                        for kw in range(KW):
                            h, ww = oh * SH - PH + kh, ow * SW - PW + kw
                            if 0 <= h < H and 0 <= ww < W and (where < 0 or x[n, c, h, ww] > best):
                                best, where = float(x[n, c, h, ww]), h * W + ww
                    y[n, c, oh, ow], arg[n, c, oh, ow] = best, where
    return y, arg


def max_pool2d_backward_ref(dy, arg, x_shape):
    N, C, H, W = x_shape
    dx = np.zeros(x_shape)
    for n in range(N):
        for c in range(C):
            for oh in range(dy.shape[2]):
                for ow in range(dy.shape[3]):
                    a = int(arg[n, c, oh, ow])
                    dx[n, c, a // W, a % W] += dy[n, c, oh, ow]
    return dx


def avg_pool2d_ref(x, kernel_size, stride=None, padding=0):
    """Mean over the window with zero padding counted (divisor KH*KW)."""
    (KH, KW) = _pair(kernel_size)
    (SH, SW) = _pair(kernel_size if stride is None else stride)
    (PH, PW) = _pair(padding)
    N, C, H, W = x.shape
    OH, OW = _pool_out(H, KH, SH, PH), _pool_out(W, KW, SW, PW)
    y = np.zeros((N, C, OH, OW))
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    s = 0.0
                    for kh in range(KH):
                        for kw in range(KW):
                            h, ww = oh * SH - PH + kh, ow * SW - PW + kw
                            if 0 <= h < H and 0 <= ww < W:
                                s += float(x[n, c, h, ww])
                    y[n, c, oh, ow] = s / (KH * KW)
    return y


def avg_pool2d_backward_ref(dy, x_shape, kernel_size, stride=None, padding=0):
    (KH, KW) = _pair(kernel_size)
    (SH, SW) = _pair(kernel_size if stride is None else stride)
    (PH, PW) = _pair(padding)
    N, C, H, W = x_shape
    dx = np.zeros(x_shape)
    for n in range(N):
        for c in range(C):
            for oh in range(dy.shape[2]):
                for ow in range(dy.shape[3]):
                    for kh in range(KH):
                        for kw in range(KW):
                            h, ww = oh * SH - PH + kh, ow * SW - PW + kw
                            if 0 <= h < H and 0 <= ww < W:
                                dx[n, c, h, ww] += dy[n, c, oh, ow] / (KH * KW)
    return dx


# --- naive references: linear, activations, softmax -------------------------------------
def linear_ref(x, w, b=None):
    N, I = x.shape
    O = w.shape[0]
    y = np.zeros((N, O))
    for n in range(N):
        for o in range(O):
            s = 0.0 if b is None else float(b[o])
            for i in range(I):
                s += float(x[n, i]) * float(w[o, i])
            y[n, o] = s
    return y


def linear_backward_ref(dy, x, w):
    N, I = x.shape
    O = w.shape[0]
    dx, dw, db = np.zeros((N, I)), np.zeros((O, I)), np.zeros(O)
    for n in range(N):
        for o in range(O):
            db[o] += dy[n, o]
            for i in range(I):
                dx[n, i] += dy[n, o] * w[o, i]
                dw[o, i] += dy[n, o] * x[n, i]
    return dx, dw, db


def _elementwise(f, x):
    x = np.asarray(x, dtype=np.float64)
    return np.array([f(float(v)) for v in x.reshape(-1)]).reshape(x.shape)


def relu_ref(x):
    return _elementwise(lambda v: v if v > 0 else 0.0, x)


def relu_grad_ref(x):
    return _elementwise(lambda v: 1.0 if v > 0 else 0.0, x)


def leaky_relu_ref(x, slope):
    return _elementwise(lambda v: v if v > 0 else slope * v, x)


def leaky_relu_grad_ref(x, slope):
    return _elementwise(lambda v: 1.0 if v > 0 else slope, x)


def sigmoid_ref(x):
    return _elementwise(lambda v: 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v)), x)


def sigmoid_grad_ref(x):
    s = sigmoid_ref(x)
    return s * (1.0 - s)


def tanh_ref(x):
    return _elementwise(math.tanh, x)


def tanh_grad_ref(x):
    return _elementwise(lambda v: 1.0 - math.tanh(v) ** 2, x)


def log_softmax_ref(z):
    """Row-wise log-softmax with the max shift, by loops and math.fsum."""
    z = np.asarray(z, dtype=np.float64)
    out = np.zeros_like(z)
    for n in range(z.shape[0]):
        m = max(float(v) for v in z[n])
        lse = m + math.log(math.fsum(math.exp(float(v) - m) for v in z[n]))
        for k in range(z.shape[1]):
            out[n, k] = z[n, k] - lse
    return out


def cross_entropy_ref(z, labels):
    """(loss, dz) for int labels (N,) or float target rows (N, K): mean over the batch."""
    logp = log_softmax_ref(z)
    N, K = logp.shape
    t = np.zeros((N, K))
    if np.asarray(labels).ndim == 1:
        for n in range(N):
            t[n, int(labels[n])] = 1.0
    else:
        t[...] = labels
    loss = -math.fsum(t[n, k] * logp[n, k] for n in range(N) for k in range(K)) / N
    dz = (np.exp(logp) - t) / N
    return loss, dz


# --- a small deterministic model (no dropout) for layer / optimizer / serialization tests --
def small_net(generator=0, dtype=np.float32, in_channels=1, width=4):
    """features: conv3x3(pad 1) relu pool2, conv3x3(pad 1) relu pool2; flatten; classifier 24-16-10.
    For 1x8x8 inputs. Parameter names: features.0/3.*, classifier.0/2.*."""
    from collections import OrderedDict

    from cnn_gpu import nn
    from cnn_gpu.random import resolve_generator

    g = dict(dtype=dtype, generator=resolve_generator(generator))
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, **g),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(width, 6, 3, padding=1, **g),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ),
            flatten=nn.Flatten(),
            classifier=nn.Sequential(nn.Linear(24, 16, **g), nn.ReLU(), nn.Linear(16, 10, **g)),
        )
    )


# --- the CUDA emulation (tests/emulation) ----------------------------------------------
def load_harness():
    """tests/emulation/harness.py as a module (it is not a package), loaded once."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "cnn_gpu_emulation_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "emulation" / "harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- the README and the documentation pages ---------------------------------------------
def doc_pages() -> list:
    """README.md and every page of the documentation site (docs/**/*.md), README first."""
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def docs_text() -> str:
    """The README and every documentation page, one after the other (for "is this said somewhere")."""
    return "\n".join(page.read_text(encoding="utf-8") for page in doc_pages())


def _sections(text: str):
    """(level, title, body) of each Markdown heading of ``text`` outside code fences; the body runs up
    to the next heading of the same or a higher level."""
    lines, heads, fenced = text.splitlines(keepends=True), [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#") and line.lstrip("#").startswith(" "):
            heads.append((i, len(line) - len(line.lstrip("#")), line.lstrip("#").strip()))
    for k, (i, level, title) in enumerate(heads):
        end = next((j for j, lv, _ in heads[k + 1 :] if lv <= level), len(lines))
        yield level, title, "".join(lines[i + 1 : end])


def doc_section(title: str) -> str:
    """The text of the section headed ``title`` (any level: "### T", "## T" and "T" all name it) in the
    documentation or the README (a page of the documentation first), up to the next heading of the
    same or a higher level; no two documentation pages may have it."""
    title = title.lstrip("#").strip()
    found = [
        (page.name, body)
        for page in doc_pages()[1:] + doc_pages()[:1]
        for _, head, body in _sections(page.read_text(encoding="utf-8"))
        if head == title
    ]
    pages = [name for name, _ in found]
    assert found, f"section {title!r}: in no page of the documentation"
    assert len(found) == 1 or pages[1:] == ["README.md"], f"section {title!r}: in more than one page: {pages}"
    return found[0][1]


def readme_blocks(heading: str, lang: str = "python") -> list[str]:
    """The ```lang code blocks of the section whose heading is ``heading`` (its level does not matter:
    the section may have moved from the README into a documentation page)."""
    import re  # noqa: PLC0415

    return re.findall(rf"```{lang}\n(.*?)```", doc_section(heading), flags=re.S)


# ------------------------------------------------------------------ the engines under test
ENGINES = [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda-emul")]
DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]


def force_engine(request):
    """For a fixture parametrized by ENGINES: the engine forced for the test's ops (cuda: the
    kernels launched into the CPU emulator, through the cuda_emulation fixture)."""
    import cnn_gpu  # noqa: PLC0415

    if request.param == "cuda":
        request.getfixturevalue("cuda_emulation")
        yield "cuda"
    else:
        with cnn_gpu.config.override(engine=request.param):
            yield request.param


# ---- the float16 kernels' tests (test_fp16_*.py, test_activation_kernels.py) ---------------------
F16_LAUNCHES = [None, (2, 32)]  # the default grid, and a tiny one (the grid-stride loops loop)
F16_LAUNCH_IDS = ["default", "g2b32"]


def emulated_kernels():
    """A context: cnn_gpu's launches run in the g++ emulation (tests/emulation), each launch in
    both block orders (a race shows), the default grid capped at 8 blocks."""
    from cnn_gpu import cuda

    return cuda.use_launcher(load_harness().EmulationLauncher(check_order=True, grid_cap=8))


def launch_kw(launch) -> dict:
    """``grid=`` / ``block=`` for one of F16_LAUNCHES (None: the launcher's defaults)."""
    return {} if launch is None else {"grid": launch[0], "block": launch[1]}


def same_f16(got, want, what) -> None:
    """Equal float16 arrays, bit for bit (NaN where NaN; +0 and -0 told apart)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == np.float16 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    assert got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes() or (
        np.array_equal(got, want, equal_nan=True) and (np.signbit(got) == np.signbit(want)).all()
    ), what


def f16_data(rng, shape, big=False):
    """float16 values: standard normal, or (``big``) uniform in +-60000, finite but so large that
    their sums overflow float16."""
    v = rng.uniform(-60000.0, 60000.0, shape) if big else rng.standard_normal(shape)
    return v.astype(np.float16)
