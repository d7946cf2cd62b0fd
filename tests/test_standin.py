"""The CuPy path through the CuPy stand-in (tests/standin), and the stand-in itself.

Every test here has "standin" in its id (``pytest -k standin``). Tests of the library's CuPy path
take the ``gpu_cupy`` fixture: the stand-in everywhere, and real CuPy on a machine with a GPU
(marked ``gpu``), so scripts/gpu_check.sh runs the same tests on the real thing.
"""

from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import cli, models, nn, optim
from cnn_gpu.checkpoint import load_checkpoint, restore, save_checkpoint
from cnn_gpu.data import DataLoader
from cnn_gpu.train import NonFiniteLossError, Position, fit, train_step

standin = pytest.importorskip("standin", reason="tests/standin needs the cupy package installed")
from standin import counting  # noqa: E402
from standin.array import StandinGap  # noqa: E402


def _batch(cp, n=8, shape=(1, 28, 28), seed=0):
    rng = np.random.default_rng(seed)
    return cp.asarray(rng.standard_normal((n,) + shape).astype(np.float32)), cp.asarray(rng.integers(0, 10, n))


# ======================================================================== the stand-in itself
def test_standin_refuses_what_cupy_lacks(standin):
    cp = standin
    with pytest.raises(AttributeError, match="no attribute 'permutation'"):
        cp.random.default_rng(0).permutation(5)  # the call that crashed `cnn-gpu train --backend cupy`
    with pytest.raises(AttributeError, match="no attribute 'no_such_function'"):
        cp.no_such_function
    with pytest.raises(TypeError, match="dtyp"):
        cp.zeros((2,), dtyp=np.float32)  # a keyword CuPy's signature does not have
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'kind'"):
        cp.arange(3).argmax(kind="stable")
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(cp.zeros(3))
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.zeros(3) + np.zeros(3)  # CuPy does not mix host arrays into device arithmetic
    assert type(cp.zeros(1)).__module__ == "cupy" and cnn_gpu.get_array_module(cp.zeros(1)) is cp


def test_standin_counts_syncs_uploads_and_launches(standin):
    cp = standin
    with counting() as c:
        a = cp.asarray(np.arange(6, dtype=np.float32))  # an upload
        b = (a * 2 + 1).sum()  # two elementwise kernels and a reduction
        float(b), int(a[1]), bool(a[2]), a[3].item(), a.get(), list(a[:2]), repr(a)
    assert c.uploads == 1 and c.upload_bytes == 24
    assert c.launches["elementwise"] == 2 and c.launches["reduction"] == 1
    assert c.syncs == {"float": 1, "int": 1, "bool": 1, "item": 1, "get": 1, "iteration": 1, "print": 1}
    with counting() as c:
        t = cp.zeros((4, 5), dtype=np.float32).T
        cp.ascontiguousarray(t)  # a layout-only copy
        cp.matmul(cp.zeros((3, 5), np.float32), t)  # an F-contiguous operand: no copy (cuBLAS transposes)
        cp.matmul(cp.zeros((2, 3, 4), np.float32), cp.zeros((2, 5, 4), np.float32).transpose(0, 2, 1))
    assert c.layout_copies == 2 and c.launches["cublas"] == 2  # the batched matmul copied its operand


def test_standin_kernel_arguments_follow_cupys_rules(standin):
    """A Python int reaches a kernel as a 64-bit integer (CuPy's rule): the emulator refuses it
    where the kernel takes an int, as a GPU would misread it."""
    from cnn_gpu.cuda import build

    out = standin.empty((8,), dtype=np.int64)
    build.get_function("probe", "cnn_probe")((1,), (8,), (out, 8))  # 8 -> int64: the right type here
    assert out.get().tolist() == [3 * i + 1 for i in range(8)]
    harness_error = __import__("helpers").load_harness().EmulationError
    with pytest.raises(harness_error, match="must be passed as int64"):
        build.get_function("probe", "cnn_probe")((1,), (8,), (out, np.int32(8)))


def test_standin_python_scalars_reach_kernels_as_cupy_converts_them(standin):
    """CuPy's numpy_dtype_from_pyscalar: a bool is a 1-byte numpy.bool_ (not an int64), an int is
    an int64 below 2**63 and a uint64 from there, a float a float64: the emulator then refuses a
    bool or a huge int where the kernel takes a long long."""
    from standin import kernels  # noqa: PLC0415

    from cnn_gpu.cuda import build  # noqa: PLC0415

    conv = [kernels._kernel_arg(v) for v in (True, 7, 2**63 - 1, 2**63, 2.5, 1j)]
    assert [type(v) for v in conv] == [np.bool_, np.int64, np.int64, np.uint64, np.float64, np.complex128]
    assert conv[3] == 2**63
    out = standin.empty((8,), dtype=np.int64)
    harness_error = __import__("helpers").load_harness().EmulationError
    for bad in (True, 2**63):
        with pytest.raises(harness_error, match="must be passed as int64"):
            build.get_function("probe", "cnn_probe")((1,), (8,), (out, bad))


def test_standin_launch_and_load_take_cupys_argument_types(standin):
    """Function.__call__(self, tuple grid, tuple block, args, ...) and Module.load(self, bytes cubin)
    (CuPy's function.pyx): a list grid or a bytearray binary is a TypeError, as on a GPU."""
    from cnn_gpu.cuda import build  # noqa: PLC0415

    fn = build.get_function("probe", "cnn_probe")
    out = standin.empty((8,), dtype=np.int64)
    for grid, block in (([1], (8,)), ((1,), [8]), (1, (8,))):
        with pytest.raises(TypeError, match="expected tuple"):
            fn(grid, block, (out, np.int64(8)))
    binary, _ = build.nvrtc_compile("probe", "sm_90")
    assert isinstance(binary, bytes)
    with pytest.raises(TypeError, match="expected bytes"):
        standin.cuda.function.Module().load(bytearray(binary))
    standin.cuda.function.Module().load(binary)


def test_standin_boolean_mask_indexing_is_a_host_sync(standin):
    """CuPy sizes a[mask] by reading the count of true values on the host
    (_prepare_mask_indexing_single); a[mask] = v takes the same path."""
    a = standin.asarray(np.arange(6, dtype=np.float32))
    mask = a > 2
    with counting() as c:
        a[mask]
    assert c.syncs == {"boolean mask": 1}
    with counting() as c:
        a[mask] = 0
        a[np.array([True, False] * 3)] = 1
    assert c.syncs == {"boolean mask": 2}
    with counting() as c:
        standin.where(mask, a, np.float32(0))  # the select that replaces a masked write
    assert c.total_syncs == 0


@pytest.mark.parametrize("reflect", [0, 1])
def test_standin_crop_flip_reference_has_no_host_sync(standin, reflect):
    """The reference crop+flip (what every engine is held to, and what runs on CuPy under
    engine="reference") zeroes the padding with a select, not with a boolean mask (a sync)."""
    from cnn_gpu.functional import reference as R  # noqa: PLC0415
    from cnn_gpu.functional.geometry import CropFlip  # noqa: PLC0415

    x = np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32)
    a = CropFlip(3, 2, 6, 6, 6, 6, 2, 2, reflect, 11, 12, 2**52)
    with counting() as c:
        y = R.crop_flip(standin.asarray(x), a)
    assert c.total_syncs == 0, c.syncs
    np.testing.assert_array_equal(y.get(), R.crop_flip(x, a))


def test_standin_nccl_is_cupy_14s(standin):
    """cupy.cuda.nccl in the stand-in, typed from the installed CuPy's compiled NCCL module: the
    unique id is bytes of NCCL_UNIQUE_ID_BYTES (a tuple of ints before CuPy 14), the communicator
    refuses anything else, and the collectives take integer pointers, counts and enums."""
    from standin import surface  # noqa: PLC0415

    nccl = standin.cuda.nccl
    typed = surface.compiled_signature("cupy_backends.cuda.libs.nccl", "NcclCommunicator")
    assert typed[:3] == [("int", "ndev", False), ("bytes", "commId", False), ("int", "rank", False)]
    uid = nccl.get_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    with pytest.raises(TypeError, match="expected bytes, got tuple"):
        nccl.NcclCommunicator(2, tuple(uid), 0)
    with pytest.raises(ValueError, match="expected 128 bytes"):
        nccl.NcclCommunicator(2, uid[:64], 0)
    comm = nccl.NcclCommunicator(2, uid, 1)
    buf = standin.asarray(np.arange(4, dtype=np.float32))
    comm.allReduce(buf.data.ptr, buf.data.ptr, 4, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 0)
    assert buf.get().tolist() == [0.0, 2.0, 4.0, 6.0]  # two ranks holding the same values
    comm.allReduce(buf.data.ptr, buf.data.ptr, 4, nccl.NCCL_FLOAT32, nccl.NCCL_AVG, 0)
    assert buf.get().tolist() == [0.0, 2.0, 4.0, 6.0]
    with pytest.raises(TypeError, match="sendbuf"):
        comm.allReduce(buf, buf.data.ptr, 4, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 0)


def test_standin_readme_training_loop_has_no_host_sync_and_still_catches_bad_labels(standin):
    """The README's hand-written loop (default CrossEntropyLoss) on CuPy arrays: 0 host syncs per
    step (its label range check runs on the device, inside the loss kernel); an out-of-range
    label is reported by loss_fn.check_labels(), the one host read, naming the range."""
    rng = np.random.default_rng(0)
    x = standin.asarray(rng.random((8, 1, 28, 28)).astype(np.float32))
    y = standin.asarray(rng.integers(0, 10, 8))
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
        loss_fn = nn.CrossEntropyLoss()
        opt = optim.SGD(model, lr=0.05, momentum=0.9)

        def step(labels):
            opt.zero_grad()
            loss = loss_fn(model(x), labels)
            model.backward(loss_fn.backward())
            opt.step()
            return loss

        step(y)  # warm-up: compiles, allocates, makes the flag
        with counting() as c:
            for _ in range(2):
                step(y)
        assert c.total_syncs == 0, c.syncs
        loss_fn.check_labels()  # nothing out of range
        bad = standin.asarray(np.array([0, 1, 2, 3, 4, 5, 6, 12]))
        with counting() as c:
            loss = step(bad)
        assert c.total_syncs == 0, c.syncs
        assert np.isnan(float(loss))
        with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 9\]"):
            loss_fn.check_labels()
        loss_fn.check_labels()  # the flag was reset


# ======================================================================== planted bugs
def test_standin_catches_planted_bugs(standin, monkeypatch):
    """Calls CuPy lacks, planted in the library, fail under the stand-in."""
    from cnn_gpu.data import loader

    x, y = _batch(standin, 16)
    dl = DataLoader(x, y, 4, shuffle=True)
    monkeypatch.setattr(loader.DataLoader, "order", lambda self, e: standin.random.default_rng(e).permutation(self.num_examples))
    with pytest.raises(AttributeError, match="permutation"):
        next(iter(dl.epoch(0)))
    monkeypatch.undo()
    from cnn_gpu.cuda import ops

    monkeypatch.setattr(ops, "_i32", lambda *v: tuple(int(a) for a in v))  # plain ints for int params
    with pytest.raises(Exception, match="must be passed as int32"):
        cnn_gpu.functional.max_pool2d_forward(x, 2)
    monkeypatch.undo()
    monkeypatch.setattr(np, "isfinite", np.isfinite)  # (untouched) and a host read of a device array:
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(cnn_gpu.functional.relu_forward(x)[0])


def test_standin_sees_a_per_step_sync(standin, monkeypatch):
    """A training loop that reads the loss every step (a planted float(loss)) shows in the counts."""
    from cnn_gpu import train

    x, y = _batch(standin, 32)
    with cnn_gpu.use_backend("cupy"):
        model = models.lenet5()
        opt = optim.SGD(model, 0.01)
        real_step = train.train_step

        def chatty_step(*a, **k):
            loss, logits = real_step(*a, **k)
            float(loss)  # the bug: a host sync per step
            return loss, logits

        monkeypatch.setattr(train, "train_step", chatty_step)
        with counting() as c:
            fit(model, opt, DataLoader(x, y, 8), 1)
    assert c.syncs["float"] == 4


# ======================================================================== the GPU budget
def _every_layer_net():
    g = dict(generator=np.random.default_rng(1))
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, bias=False, **g),
        nn.LeakyReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 1, **g),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.2, **g),
        nn.Linear(8 * 3 * 3, 16, **g),
        nn.ReLU(),
        nn.Linear(16, 10, **g),
        nn.Sigmoid(),
        nn.Linear(10, 10, **g),
    )


def _modern_net():
    """BatchNorm (2d, fused ReLU, 1d), a residual block with a projection, GELU, global pooling."""
    g = dict(generator=np.random.default_rng(2))
    block = nn.Residual(
        nn.Sequential(
            nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False, **g),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False, **g),
            nn.BatchNorm2d(8),
        ),
        shortcut=nn.Sequential(nn.Conv2d(6, 8, 1, stride=2, bias=False, **g), nn.BatchNorm2d(8)),
    )
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False, **g),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        block,
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 12, **g),
        nn.BatchNorm1d(12),
        nn.GELU(approximate="tanh"),
        nn.Linear(12, 10, **g),
    )


@pytest.mark.parametrize("engine", ["auto", "reference"])
@pytest.mark.parametrize(
    "make,shape",
    [(models.lenet5, (1, 28, 28)), (models.vgg_small, (3, 32, 32)), (_every_layer_net, (1, 28, 28)), (_modern_net, (3, 12, 12))],
    ids=["lenet5", "vgg_small", "every-layer", "modern"],
)
def test_standin_training_step_budget(standin, make, shape, engine):
    """A training step on the GPU: no host sync, no upload, no layout copy -- on the CUDA engine
    and on the reference engine (CNN_GPU_ENGINE=reference, once CNN_GPU_KERNELS=0)."""
    x, y = _batch(standin, 4, shape)
    with cnn_gpu.use_backend("cupy"), cnn_gpu.config.override(engine=engine):
        cnn_gpu.manual_seed(0)
        model = make()
        opt = optim.Adam(model, 1e-3)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        train_step(model, loss_fn, opt, x, y)
        with counting() as c:
            train_step(model, loss_fn, opt, x, y)
    assert c.total_syncs == 0, c.syncs
    assert c.uploads == 0 and c.download_bytes == 0
    if engine == "auto":
        assert c.layout_copies == 0, c.layout_copy_sites
        assert c.kernels and c.launches["kernel"] >= 6


def test_standin_cublas_gemm_follows_cupy(standin):
    """cupy.cublas (which needs libcublas to import) has its surface read from CuPy's source: gemm's
    parameters, refused keywords; out = alpha op(a) @ op(b) + beta out in one cuBLAS launch,
    beta = 0 not reading out, a non-contiguous operand copied as CuPy does."""
    import cupy.cublas  # noqa: PLC0415  (the stand-in's, inside the fixture)
    from standin import surface  # noqa: PLC0415

    assert list(surface.signature("cupy.cublas", "gemm").parameters) == ["transa", "transb", "a", "b", "out", "alpha", "beta"]
    cp, rng = standin, np.random.default_rng(0)
    A, B, C0 = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((3, 5))
    a, b, out = cp.asarray(A), cp.asarray(B), cp.asarray(C0)
    with counting() as c:
        got = cupy.cublas.gemm("N", "T", a, b, out=out, beta=1.0)
    assert got is out and c.launches == {"cublas": 1} and c.layout_copies == 0
    np.testing.assert_allclose(cp.asnumpy(out), A @ B.T + C0, rtol=1e-13)
    cupy.cublas.gemm("T", "N", cp.asarray(A.T.copy()), cp.asarray(B.T.copy()), out=out)  # beta 0: out not read
    np.testing.assert_allclose(cp.asnumpy(out), A @ B.T, rtol=1e-13)
    with counting() as c:
        cupy.cublas.gemm("N", "N", cp.asarray(rng.standard_normal((3, 8)))[:, ::2], b.T, out=out)
    assert c.layout_copies == 1  # a strided operand is copied first
    with pytest.raises(TypeError, match="gamma"):
        cupy.cublas.gemm("N", "N", a, b, gamma=1.0)
    with pytest.raises(AssertionError):
        cupy.cublas.gemm("N", "N", a, b, out=out)  # (3, 4) @ (5, 4): CuPy asserts the inner sizes
    with pytest.raises(AttributeError, match="cupy.cublas' has no attribute 'no_such'"):
        cupy.cublas.no_such


def test_standin_layers_add_gradients_and_count_batches_in_their_own_launches(standin):
    """Conv2d, Linear and BatchNorm add their parameter gradients inside their GEMMs and kernels,
    BatchNorm counts num_batches_tracked inside its last kernel, a Residual and the ReLU after it
    are one kernel: the only elementwise launch left is the sum of the Residual's two input
    gradients; the gradients are the previous values plus this backward's."""
    cp = standin
    x, _ = _batch(cp, 4, (3, 6, 6))
    with cnn_gpu.use_backend("cupy"):
        g = dict(generator=np.random.default_rng(0))
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, **g),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False, **g), nn.BatchNorm2d(4))),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(144, 5, **g),
            nn.ReLU(),
        )
        y = net(x)
        dy = cp.asarray(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
        net.backward(dy)
        once = [cp.asnumpy(p.grad).copy() for p in net.parameters()]
        with counting() as c:
            net(x)
            net.backward(dy, input_grad=False)
    assert c.launches["elementwise"] == 1 and c.total_syncs == 0, c.launches  # the Residual's dx + dx_shortcut
    assert c.kernels["add_act_forward_f32"] == 1 and c.kernels["relu_backward_f32"] == 1
    for p, g1 in zip(net.parameters(), once):
        np.testing.assert_allclose(cp.asnumpy(p.grad), 2 * g1, rtol=1e-5, atol=1e-6)
    assert int(cp.asnumpy(net[1].num_batches_tracked)) == 2


def test_standin_adaptive_pooling_is_one_kernel_each_way(standin):
    """AdaptiveAvgPool2d on the GPU: one launch forward, one backward, whatever the output size
    (the reference loops over the output cells: 49 cells here), the reference's numbers."""
    cp = standin
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 10)).astype(np.float32)
    pool = nn.AdaptiveAvgPool2d(7)
    with counting() as c:
        y = pool(cp.asarray(x))
        dx = pool.backward(cp.ones_like(y))
    assert c.kernels == {"adaptive_avg_pool2d_forward_f32": 1, "adaptive_avg_pool2d_backward_f32": 1}
    assert c.launches["kernel"] == 2 and c.launches.get("elementwise", 0) == 0, c.launches
    with cnn_gpu.config.override(engine="reference"):
        y_ref = nn.AdaptiveAvgPool2d(7)(x)
        dx_ref = nn.AdaptiveAvgPool2d(7)
        dx_ref(x)
        dx_ref = dx_ref.backward(np.ones_like(y_ref))
    np.testing.assert_allclose(cp.asnumpy(y), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cp.asnumpy(dx), dx_ref)


def test_standin_modern_layers_train_like_numpy(standin):
    """Two SGD steps of BatchNorm/Residual/GELU/global pooling on the CuPy path match NumPy's:
    the weights, the running statistics (updated on the device) and the int64 batch counter;
    eval mode then uses the running statistics on both."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 3, 12, 12)).astype(np.float32), rng.integers(0, 10, 6)
    states, outputs = [], []
    for backend in ("numpy", "cupy"):
        with cnn_gpu.use_backend(backend):
            model = _modern_net()
            xp_x = standin.asarray(x) if backend == "cupy" else x
            xp_y = standin.asarray(y) if backend == "cupy" else y
            opt = optim.SGD(model, 0.1, momentum=0.9)
            for _ in range(2):
                train_step(model, nn.CrossEntropyLoss(), opt, xp_x, xp_y)
            model.eval()
            outputs.append(cnn_gpu.to_numpy(model(xp_x)))
            states.append({k: cnn_gpu.to_numpy(v) for k, v in model.state_dict().items()})
            if backend == "cupy":
                assert all(isinstance(v, standin.ndarray) for v in model.state_dict().values())
    assert states[1]["1.num_batches_tracked"].dtype == np.int64 and int(states[1]["1.num_batches_tracked"]) == 2
    assert set(states[0]) == set(states[1])
    for k in states[0]:
        assert states[1][k].dtype == states[0][k].dtype, k
        np.testing.assert_allclose(states[1][k], states[0][k], rtol=1e-4, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def test_standin_cpu_engine_never_runs_on_the_gpu(standin, monkeypatch):
    from cnn_gpu.cpu import parallel

    def refuse(*a, **k):
        raise AssertionError("the CPU engine's threads ran for CuPy arrays")

    monkeypatch.setattr(parallel, "run", refuse)
    monkeypatch.setattr(parallel, "single_threaded_blas", refuse)
    x, y = _batch(standin, 4, (3, 32, 32))
    with cnn_gpu.use_backend("cupy"):
        model = models.vgg_small()
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        train_step(model, loss_fn, optim.SGD(model, 0.1, momentum=0.9), x, y)


def test_standin_kernels_are_compiled_without_ftz(standin):
    from standin import kernels

    kernels.compile_log.clear()
    x, _ = _batch(standin, 2)
    cnn_gpu.functional.max_pool2d_forward(x, 2)
    assert kernels.compile_log, "the pool kernels were compiled through NVRTC"
    for name, options in kernels.compile_log:
        assert "-ftz=true" not in options and "--ftz=false" in options and "--fmad=false" in options, (name, options)
        assert any(o.startswith("--gpu-architecture=sm_90") for o in options), options


def test_standin_availability_check_launches_the_probe(standin):
    from standin import kernels

    kernels.compile_log.clear()
    cnn_gpu.backend._cupy_status.cache_clear()
    assert cnn_gpu.cupy_available()
    assert [n for n, _ in kernels.compile_log] == ["probe.cu"]


def test_standin_broken_kernels_are_one_clear_error_at_the_start(standin, monkeypatch):
    from cnn_gpu.cuda import build

    def broken():
        raise build.KernelCompileError("probe.cu failed to compile: libnvrtc.so.12 not found")

    monkeypatch.setattr(build, "probe", broken)
    cnn_gpu.backend._cupy_status.cache_clear()
    assert not cnn_gpu.cupy_available()
    with pytest.raises(cnn_gpu.BackendUnavailableError, match="cannot compile or run cnn_gpu's kernels.*libnvrtc"):
        with cnn_gpu.use_backend("cupy"):
            pass
    cnn_gpu.backend._cupy_status.cache_clear()


def test_standin_dropout_is_one_kernel_without_generator_state(standin):
    """Dropout's mask: one launch of its kernel from (seed, call), no cuRAND generator per forward,
    and the same mask as on NumPy."""
    x, _ = _batch(standin, 4, (10,))
    drop = nn.Dropout(0.5, generator=3)
    with counting() as c:
        y = drop(x)
    assert c.launches["curand"] == 0 and c.kernels == {"dropout_forward_f32": 1} and c.total_launches == 1
    cpu = nn.Dropout(0.5, generator=3)
    np.testing.assert_array_equal(cnn_gpu.to_numpy(y), cpu(cnn_gpu.to_numpy(x)))
    assert drop.calls == cpu.calls == 1


def test_standin_cnn_gpu_info_compiles_every_kernel(standin, capsys, monkeypatch):
    from cnn_gpu.cuda import build

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: cnn_gpu CuPy stand-in" in out and "compiled all kernels for this GPU" in out
    assert build.device_arch() == "sm_90"
    monkeypatch.setattr(type(standin.cuda.Device()), "compute_capability", "120")  # newer than NVRTC knows
    assert build.device_arch() == "compute_90"  # PTX, for the driver to JIT


# ======================================================================== the library on CuPy
def test_standin_save_load_checkpoint_resume(gpu_cupy, tmp_path):
    x, y = _batch(gpu_cupy, 24)
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
        opt = optim.SGD(model, 0.05, momentum=0.9)
        loader = DataLoader(x, y, 8, shuffle=True, seed=3)
        fit(model, opt, loader, 1)
        save_checkpoint(tmp_path / "c.npz", model, opt, position=Position(1), loader=loader)
        cnn_gpu.save(model, tmp_path / "m.npz")
        fit(model, opt, loader, 2, position=Position(1))
        want = {k: cnn_gpu.to_numpy(v) for k, v in model.state_dict().items()}
        cnn_gpu.manual_seed(5)
        m2 = models.lenet5()
        o2 = optim.SGD(m2, 0.05, momentum=0.9)
        l2 = DataLoader(x, y, 8, shuffle=True, seed=0)
        pos = restore(load_checkpoint(tmp_path / "c.npz"), m2, o2, loader=l2)
        fit(m2, o2, l2, 2, position=pos)
        loaded = cnn_gpu.load(tmp_path / "m.npz", backend="cupy")
    assert type(loaded.parameters()[0].data).__module__.startswith("cupy")
    for k, v in m2.state_dict().items():
        np.testing.assert_allclose(cnn_gpu.to_numpy(v), want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_standin_fit_shuffles_validates_and_stops_on_nan(gpu_cupy):
    x, y = _batch(gpu_cupy, 32)
    loader = DataLoader(x, y, 8, shuffle=True, seed=1)
    np_order = DataLoader(np.zeros((32, 1)), np.zeros(32, np.int64), 8, shuffle=True, seed=1).order(2)
    np.testing.assert_array_equal(cnn_gpu.to_numpy(loader.order(2)), np_order)  # the same order as on NumPy
    with cnn_gpu.use_backend("cupy"):
        model = models.lenet5()
        from cnn_gpu.callbacks import Evaluate

        hist = fit(model, optim.Adam(model, 1e-3), loader, 3, callbacks=[Evaluate((x[:8], y[:8]), "val")])
        assert len(hist) == 3 and all(np.isfinite(h.train_loss) and h.val_accuracy is not None for h in hist)
        with pytest.raises(NonFiniteLossError, match="epoch 1, step 2 of 4"):  # step 1 updates, step 2 overflows
            fit(model, optim.SGD(model, 1e30), loader, 1)
        with pytest.raises(ValueError, match="labels: expected class indices in \\[0, 9\\]"):
            fit(model, optim.SGD(model, 0.1), DataLoader(x, y + 10, 8), 1)


def test_standin_cli_train_evaluate_predict(gpu_cupy, tmp_path, capsys):
    run = tmp_path / "run"
    rc = cli.main(
        ["train", "--backend", "cupy", "--epochs", "2", "--batch-size", "96", "--run-dir", str(run), "--progress", "plain"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "backend cupy" in out and out.strip().splitlines()[-1].startswith("test accuracy: ")
    acc = float(out.strip().splitlines()[-1].split()[2].rstrip("%"))  # test accuracy: NN.NN% (the last epoch's ...)
    assert acc > 30.0  # two epochs of 14 steps on the digits: well above chance (10%)
    assert cli.main(["evaluate", "--checkpoint", str(run), "--backend", "cupy"]) == 0
    out, _ = capsys.readouterr()
    assert "test accuracy:" in out
    from cnn_gpu.data import get_dataset

    np.save(tmp_path / "x.npy", get_dataset("digits").x_test[:3].astype(np.float64))
    assert cli.main(["predict", "--checkpoint", str(run), "--backend", "cupy", str(tmp_path / "x.npy")]) == 0
    out, _ = capsys.readouterr()
    assert out.count("class") == 3


def test_standin_gap_is_an_explicit_error(standin):
    with pytest.raises(StandinGap, match="does not simulate"):
        standin.fft  # real CuPy has it; the stand-in says so instead of pretending
