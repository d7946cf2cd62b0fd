"""cnn_gpu's own cuBLAS handle (cnn_gpu/cuda/cublas.py), through the CuPy stand-in's fake libcublas
(tests/standin/cublas.py: the C API through ctypes, validated as cuBLAS and ctypes would), and on a
real GPU where there is one (marked ``gpu``).

Every stand-in test has "standin" in its id (``pytest -k standin``)."""

from __future__ import annotations

import ctypes
import warnings

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import models, nn, optim
from cnn_gpu.cuda import build, cublas
from cnn_gpu.train import train_step

standin = pytest.importorskip("standin", reason="tests/standin needs the cupy package installed")
from standin import counting  # noqa: E402
from standin import cublas as fake  # noqa: E402


def _handle():
    h, why = cublas.get_handle()
    assert h is not None, why
    return h


def _operands(cp, m, n, k, transa, transb, dtype, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, m) if transa else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if transb else (k, n)).astype(dtype)
    C = rng.standard_normal((m, n)).astype(dtype)
    return A, B, C, cp.asarray(A), cp.asarray(B)


def _is_standin(cp):
    return type(cp.zeros(1)).__module__ == "cupy" and hasattr(cp, "_standin_cupyx")


# ============================================================================ the GEMM
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "transa,transb", [(False, False), (False, True), (True, False), (True, True)], ids=["NN", "NT", "TN", "TT"]
)
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("m,n,k", [(3, 5, 4), (7, 2, 9), (1, 6, 1)])
def test_cublas_handle_gemm_matches_numpy(gpu_cupy, dtype, transa, transb, beta, m, n, k):
    """out = op(a) @ op(b) + beta out for the four transposes, both dtypes, non-square shapes; with
    beta = 0 out is not read (NaN there does not leak); one cuBLAS launch, on the user workspace."""
    cp = gpu_cupy
    A, B, C, a, b = _operands(cp, m, n, k, transa, transb, dtype)
    out = cp.asarray(C if beta else np.full_like(C, np.nan))
    h = _handle()
    with counting() as c:
        h.gemm(a, b, out, transa=transa, transb=transb, beta=beta)
    want = (A.T if transa else A).astype(np.float64) @ (B.T if transb else B) + (beta * C if beta else 0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    got = cp.asnumpy(out)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, **tol)
    if _is_standin(cp):
        assert dict(c.launches) == {"cublas": 1} and c.layout_copies == 0
        entry = fake.active().gemms()[-1]
        assert entry[0] == ("cublasSgemm_v2" if dtype == np.float32 else "cublasDgemm_v2")
        assert entry[-1] == (entry[-1][0], h.workspace_bytes) and entry[-1][0] % 256 == 0  # the user workspace


def test_cublas_handle_views_and_k0(gpu_cupy):
    """Row views of a larger array (the grouped-conv weight-gradient slices) are C-contiguous
    operands; k = 0 is BLAS's out = beta out (0 with beta = 0, even over NaN), empty out is a no-op."""
    cp = gpu_cupy
    rng = np.random.default_rng(1)
    D, X, W = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 4, 8)), np.zeros((2, 3, 4))
    d, x, w = cp.asarray(D), cp.asarray(X), cp.asarray(W)
    h = _handle()
    for g in range(2):
        h.gemm(d[g], x[g], w[g], transb=True)
    np.testing.assert_allclose(cp.asnumpy(w), D @ X.transpose(0, 2, 1), rtol=1e-12)
    for beta, want in ((0.0, 0.0), (1.0, 3.0), (2.0, 6.0)):
        out = cp.asarray(np.full((3, 5), np.nan if beta == 0 else 3.0))
        h.gemm(cp.zeros((3, 0)), cp.zeros((0, 5)), out, beta=beta)
        np.testing.assert_array_equal(cp.asnumpy(out), np.full((3, 5), want))
        h.gemm(cp.zeros((0, 3)), cp.zeros((5, 0)), out, transa=True, transb=True, beta=beta)  # k = 0 transposed
    empty = cp.zeros((0, 5))
    h.gemm(cp.zeros((0, 4)), cp.zeros((4, 5)), empty)
    assert empty.shape == (0, 5)


def test_standin_cublas_k0_in_the_fake_follows_blas(standin):
    """The fake itself, called with k = 0 as BLAS allows: C = beta C, A and B not read (NULL);
    lda still >= max(1, m) with A untransposed, ldb >= max(1, k) = 1."""
    cp = standin
    h = _handle()
    lib = fake.active()
    out = cp.asarray(np.full((2, 3), 4.0, np.float32))
    one, half = ctypes.c_float(1.0), ctypes.c_float(0.5)
    status = lib.cublasSgemm_v2(h.ptr, 0, 0, 3, 2, 0, ctypes.byref(one), None, 3, None, 1, ctypes.byref(half), out.data.ptr, 3)
    assert status == 0
    np.testing.assert_array_equal(cp.asnumpy(out), np.full((2, 3), 2.0, np.float32))


# ============================================================================ preconditions
def test_standin_cublas_gemm_preconditions_name_the_argument(standin):
    cp = standin
    h = _handle()
    f32 = np.float32
    a, b, out = cp.zeros((3, 4), f32), cp.zeros((4, 5), f32), cp.zeros((3, 5), f32)
    flat = cp.zeros(64, f32)
    cases = [
        (TypeError, "gemm: a must be a CuPy array, got numpy.ndarray", (np.zeros((3, 4), f32), b, out), {}),
        (ValueError, r"gemm: b must be 2-D, got shape \(20,\)", (a, cp.zeros(20, f32), out), {}),
        (ValueError, "gemm: out must be C-contiguous", (a, b, cp.zeros((5, 3), f32).T), {}),
        (ValueError, "gemm: a must be C-contiguous", (cp.zeros((3, 8), f32)[:, ::2], b, out), {}),
        (TypeError, r"gemm: a must be float32 or float64 \(or float16\), got int32", (a.astype(np.int32), b, out), {}),
        (TypeError, "gemm: b must have a's dtype float32, got float64", (a, b.astype(np.float64), out), {}),
        (TypeError, "gemm: out must have a's dtype float32, got float64", (a, b, out.astype(np.float64)), {}),
        (ValueError, r"gemm: b: op\(a\) is 3x4 but op\(b\) is 5x4", (a, b.T.copy(), out), {}),
        (ValueError, r"gemm: out must have shape \(3, 5\)", (a, b, cp.zeros((5, 3), f32)), {}),
        (ValueError, r"gemm: out must have shape \(4, 5\)", (cp.zeros((4, 4), f32), b, out), {"transa": True}),
        (ValueError, "gemm: out overlaps a", (flat[:16].reshape(4, 4), flat[32:48].reshape(4, 4), flat[8:24].reshape(4, 4)), {}),
        (ValueError, "gemm: out overlaps b", (flat[:16].reshape(4, 4), flat[32:48].reshape(4, 4), flat[40:56].reshape(4, 4)), {}),
        (TypeError, "gemm: beta must be a real number on the host, got ndarray", (a, b, out), {"beta": cp.ones(())}),
    ]
    for exc, match, args, kw in cases:
        with pytest.raises(exc, match=match) as info:
            h.gemm(*args, **kw)
        assert "\n" not in str(info.value), str(info.value)
    assert not fake.active().gemms()  # nothing reached cuBLAS


# ============================================================================ the fake validates
def test_standin_cublas_fake_catches_a_planted_wrong_ld(standin, monkeypatch):
    """A binding that computes a leading dimension wrong gets cuBLAS's INVALID_VALUE, turned into
    a CublasError naming the call and the status."""
    cp = standin
    h = _handle()
    a, b, out = cp.ones((3, 4), np.float32), cp.ones((4, 5), np.float32), cp.zeros((3, 5), np.float32)
    real = cublas._gemm_args
    for slot in (6, 8, 10):  # lda, ldb, ldc of (transa, transb, m, n, k, A, lda, B, ldb, C, ldc)

        def planted(*args, slot=slot):
            v = list(real(*args))
            v[slot] -= 1
            return tuple(v)

        monkeypatch.setattr(cublas, "_gemm_args", planted)
        with pytest.raises(cublas.CublasError, match=r"^cublasSgemm_v2 failed: CUBLAS_STATUS_INVALID_VALUE \(7\)"):
            h.gemm(a, b, out)
    monkeypatch.undo()
    h.gemm(a, b, out)
    np.testing.assert_array_equal(cp.asnumpy(out), np.full((3, 5), 4, np.float32))


def test_standin_cublas_fake_checks_ctypes_arguments(standin, monkeypatch):
    """Argument types as ctypes converts them for the declared C signature, sizes that ctypes
    would truncate, cuBLAS's status codes, and cnn_gpu's argtypes against cublas_api.h."""
    cp = standin
    h = _handle()
    lib = fake.active()
    out = cp.zeros((2, 2), np.float32)
    one = ctypes.c_float(1.0)

    def sgemm(**kw):
        args = dict(
            h=h.ptr,
            ta=0,
            tb=0,
            m=2,
            n=2,
            k=2,
            alpha=ctypes.byref(one),
            A=out.data.ptr,
            lda=2,
            B=out.data.ptr,
            ldb=2,
            beta=ctypes.byref(one),
            C=out.data.ptr,
            ldc=2,
        )
        args.update(kw)
        return lib.cublasSgemm_v2(*args.values())

    with pytest.raises(ctypes.ArgumentError, match="argument 4: TypeError"):
        sgemm(m=2.0)
    with pytest.raises(ctypes.ArgumentError, match="argument 7: TypeError"):
        sgemm(alpha=ctypes.byref(ctypes.c_double(1.0)))  # double* where float* is declared
    with pytest.raises(AssertionError, match="does not fit c_int"):
        sgemm(lda=2**32 + 2)  # ctypes would pass 2
    with pytest.raises(TypeError, match="takes 14 arguments"):
        lib.cublasSgemm_v2(h.ptr, 0, 0)
    assert sgemm(m=-1) == 7 and sgemm(ta=5) == 7 and sgemm(ldc=1) == 7 and sgemm(C=None) == 7
    assert sgemm(lda=1) == 7 and sgemm(tb=1, ldb=1) == 7 and sgemm(beta=None) == 7
    assert sgemm(h=0xDEAD000) == 1  # not a handle: CUBLAS_STATUS_NOT_INITIALIZED
    assert lib.cublasSetWorkspace_v2(h.ptr, 0x1000 + 8, 1024) == 7  # not 256-byte aligned
    assert lib.cublasSetPointerMode_v2(h.ptr, 3) == 7
    monkeypatch.setattr(lib.cublasSgemm_v2, "argtypes", [ctypes.c_void_p] * 14)
    with pytest.raises(AssertionError, match=r"cublas_api.h declares cublasStatus_t cublasSgemm_v2\("):
        h.gemm(out, out, cp.zeros((2, 2), np.float32))


def test_standin_cublas_handle_follows_the_stream_and_rebinds_its_workspace(standin, monkeypatch):
    """cublasSetStream resets the workspace to cuBLAS's pool: the handle sets the stream only when
    it changed, then binds that stream's own workspace again; every GEMM runs on a user workspace
    of the recommended size (32 MiB on the stand-in's sm_90), one per stream."""
    cp = standin
    h = _handle()
    lib = fake.active()
    a, b, out = cp.ones((3, 4), np.float32), cp.ones((4, 5), np.float32), cp.zeros((3, 5), np.float32)
    assert h.workspace_bytes == 32 * 2**20 == cublas.workspace_bytes("90") and cublas.workspace_bytes(80) == 4 * 2**20
    real_stream = cp.cuda.get_current_stream
    for _ in range(3):
        h.gemm(a, b, out)
    other = type("Stream", (), {"ptr": 0x5000})()
    monkeypatch.setattr(cp.cuda, "get_current_stream", lambda device_id=-1: other)
    h.gemm(a, b, out)
    h.gemm(a, b, out)
    monkeypatch.setattr(cp.cuda, "get_current_stream", real_stream)
    h.gemm(a, b, out)
    calls = [e[0].replace("cublas", "").replace("_v2", "") for e in lib.log]
    assert calls == [
        "Create",
        "SetPointerMode",
        "SetStream",
        "SetWorkspace",
        "Sgemm",
        "Sgemm",
        "Sgemm",
        "SetStream",
        "SetWorkspace",
        "Sgemm",
        "Sgemm",
        "SetStream",
        "SetWorkspace",
        "Sgemm",
    ], calls
    gemms = lib.gemms()
    assert [g[-2] for g in gemms] == [0, 0, 0, 0x5000, 0x5000, 0]
    spaces = [g[-1] for g in gemms]
    assert all(s is not None and s[1] == 32 * 2**20 for s in spaces)
    assert spaces[0] == spaces[5] != spaces[3]  # a workspace per stream, kept
    h.destroy()
    h.destroy()  # idempotent
    assert lib.log[-1][0] == "cublasDestroy_v2" and not lib.handles
    with pytest.raises(cublas.CublasError, match="destroyed"):
        h.gemm(a, b, out)


def test_standin_cublas_one_handle_per_device(standin):
    from standin import devices

    with devices.visible(0, 1):
        h0 = _handle()
        assert _handle() is h0
        with standin.cuda.Device(1):
            h1 = _handle()
            assert h1 is not h0 and h1.device_id == 1
            a = standin.ones((2, 2), np.float64)
            out = standin.zeros((2, 2), np.float64)
            h1.gemm(a, a, out)
            with pytest.raises(AssertionError, match="made on device 1 used on device 0"):
                with standin.cuda.Device(0):
                    h1.gemm(a, a, out)
        np.testing.assert_array_equal(standin.asnumpy(out), np.full((2, 2), 2.0))
        cublas.reset()  # these handles belong to this machine


# ============================================================================ CUDA-graph capture
def test_standin_cublas_launcher_gemm_is_captured_without_allocating(standin):
    """The launcher's GEMM under stream capture: cupy.cublas.gemm refuses the capturing stream,
    cnn_gpu's handle is recorded into the graph and recomputed at each replay; after a warm-up on
    the stream (which binds its workspace) the capture allocates nothing."""
    from standin import graph as sgraph  # noqa: PLC0415

    cp = standin
    rng = np.random.default_rng(4)
    A, B, C = rng.standard_normal((3, 6)), rng.standard_normal((5, 6)), rng.standard_normal((3, 5))
    a, b, out = cp.asarray(A), cp.asarray(B), cp.asarray(C)
    launcher = build.CupyLauncher()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        launcher.gemm(a, b, cp.zeros((3, 5)), transb=True)  # warm-up on the stream
        stream.begin_capture()
        with pytest.raises(NotImplementedError, match="during stream capture"):
            cp.cublas.gemm("N", "T", a, b, out=out)
        launcher.gemm(a, b, out, transb=True, beta=1.0)
        g = stream.end_capture()
    assert sgraph.kernels_inside(g) == {"cublas": 1} and sgraph.allocations(g) == []
    np.testing.assert_array_equal(cp.asnumpy(out), C)  # recorded, not run
    g.launch(stream)
    g.launch(stream)
    np.testing.assert_allclose(cp.asnumpy(out), C + 2 * A @ B.T, rtol=1e-12)
    assert fake.active().gemms()[-1][-2] == stream.ptr


# ============================================================================ training
def _lenet_step_params(standin, steps=2):
    """LeNet-5 trained ``steps`` steps on stand-in arrays: (parameters after, the counts of the steps
    after the first, the weight-gradient pointers (the weights' .grad buffers) of the last step)."""
    rng = np.random.default_rng(0)
    x = standin.asarray(rng.standard_normal((4, 1, 28, 28)).astype(np.float32))
    y = standin.asarray(rng.integers(0, 10, 4))
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
        opt = optim.SGD(model, 0.05, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        train_step(model, loss_fn, opt, x, y)  # warm-up: compiles, allocates (the workspace too)
        with counting() as c:
            for _ in range(steps - 1):
                train_step(model, loss_fn, opt, x, y)
        grads = {int(p.grad.data.ptr) for p in model.parameters() if p.data.ndim >= 2}
        return [standin.asnumpy(p.data).copy() for p in model.parameters()], c, grads


def test_standin_cublas_lenet5_step_uses_our_handle_and_matches_cupy_cublas(standin, monkeypatch):
    """A LeNet-5 training step: every launcher GEMM goes through cnn_gpu's handle, on the user
    workspace, among them the 5 weight-gradient GEMMs (2 conv, 3 linear: their C is a weight's
    .grad); the parameters are those of the steps through cupy.cublas.gemm (the fallback), and the
    launches and allocations are the same."""
    lib = fake.active()
    calls = []
    real_gemm = build.CupyLauncher.gemm

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real_gemm(self, *args, **kwargs)

    monkeypatch.setattr(build.CupyLauncher, "gemm", counted)
    ours, c_ours, grads = _lenet_step_params(standin, steps=3)
    gemms = lib.gemms()
    assert len(grads) == 5 and len(gemms) == len(calls) >= 3 * 5
    assert all(g[-1] is not None and g[-1][1] == 32 * 2**20 for g in gemms)  # on the user workspace
    last_step = gemms[-len(gemms) // 3 :]
    assert len([g for g in last_step if g[13] in grads]) == 5  # (..., beta, C, ldc, stream, workspace)
    assert c_ours.total_syncs == 0 and c_ours.layout_copies == 0

    monkeypatch.setattr(cublas, "_load_library", _no_library)
    with pytest.warns(RuntimeWarning, match="using cupy.cublas") as rec:
        theirs, c_theirs, _ = _lenet_step_params(standin, steps=3)
    assert len([w for w in rec if "cupy.cublas" in str(w.message)]) == 1
    assert len(lib.gemms()) == len(gemms)  # none more
    assert dict(c_ours.launches) == dict(c_theirs.launches) and c_ours.launches["cublas"] >= 10
    assert c_ours.allocations == c_theirs.allocations
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)  # float32 products summed in another order


# ============================================================================ the fallback
def _no_library():
    raise OSError("no libcublas: libcublas.so.12: cannot open shared object file")


def test_standin_cublas_fallback_warns_once_and_uses_cupy_cublas(standin, monkeypatch):
    cp = standin
    lib = fake.active()
    monkeypatch.setattr(cublas, "_load_library", _no_library)
    h, why = cublas.get_handle()
    assert h is None and why == "OSError: no libcublas: libcublas.so.12: cannot open shared object file"
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    out = cp.zeros((3, 5))
    launcher = build.CupyLauncher()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with counting() as c:
            launcher.gemm(cp.asarray(A), cp.asarray(B), out, transb=True)
            launcher.gemm(cp.asarray(A), cp.asarray(B), out, transb=True, beta=1.0)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert msgs[0] == (
        "cnn_gpu: using cupy.cublas for GEMMs (not capturable in a CUDA graph): cnn_gpu's own cuBLAS "
        "handle is unavailable (OSError: no libcublas: libcublas.so.12: cannot open shared object file)"
    )
    assert rec[0].filename == __file__  # points at the caller of the launcher
    assert c.launches["cublas"] == 2 and not lib.gemms()
    np.testing.assert_allclose(cp.asnumpy(out), 2 * A @ B.T, rtol=1e-12)


@pytest.mark.parametrize(
    "lib,reason",
    [
        (
            lambda: fake.FakeLibcublas(missing=("cublasSetWorkspace_v2",)),
            "AttributeError: fake libcublas: undefined symbol: cublasSetWorkspace_v2",
        ),
        (lambda: _failing_create(), "cublasCreate_v2 failed: CUBLAS_STATUS_NOT_INITIALIZED (1)"),
    ],
    ids=["missing-symbol", "create-fails"],
)
def test_standin_cublas_unusable_library_is_reported(standin, lib, reason):
    uninstall = fake.install(lib())
    try:
        h, why = cublas.get_handle()
        assert h is None and why == reason
        out = standin.zeros((2, 2))
        with pytest.warns(RuntimeWarning, match=f"unavailable \\({reason.replace('(', '.').replace(')', '.')}\\)"):
            build.CupyLauncher().gemm(standin.ones((2, 2)), standin.ones((2, 2)), out)
        np.testing.assert_array_equal(standin.asnumpy(out), np.full((2, 2), 2.0))
        assert cublas.get_handle() == (None, reason)  # remembered, not retried
    finally:
        uninstall()


def _failing_create():
    lib = fake.FakeLibcublas()
    lib._cublasCreate_v2 = lambda handle_p: 1
    lib.cublasCreate_v2 = fake._Function("cublasCreate_v2", lib._cublasCreate_v2)
    return lib


def test_cublas_real_library_lookup_reports_one_line():
    """Outside the stand-in: the real lookup (cuda-pathfinder, then the soname) gives the library
    with every symbol bound, or one line saying why there is none."""
    pytest.importorskip("cupy")
    assert cublas._soname_major("/x/libcublas.so.12.9.1.4") == 12 and cublas._soname_major("cublas64_13.dll") == 13
    try:
        lib, where = cublas._load_library()
    except OSError as exc:
        assert str(exc).startswith("no libcublas: ")
        return
    cublas._bind(lib)
    assert "libcublas" in where or "cublas64" in where
