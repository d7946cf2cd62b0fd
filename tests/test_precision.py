"""fit(..., precision=) and cnn-gpu train --precision (cnn_gpu/precision.py): the setting, its
checks, where it is recorded, and tf32 (the GEMMs in cuBLAS's TF32 math mode on cnn_gpu's handle,
through the stand-in's fake libcublas, which rounds the inputs to TF32 in that mode).

Every stand-in test has "standin" in its id (``pytest -k standin``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import cli, models, optim, precision
from cnn_gpu.data.loader import DataLoader
from cnn_gpu.runs import RUN_SETTINGS, TrainConfig
from cnn_gpu.train import fit

standin_pkg = pytest.importorskip("standin", reason="tests/standin needs the cupy package installed")
from standin import cublas as fake  # noqa: E402


def _data(xp, n=24, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return xp.asarray(x), xp.asarray(y)


def _fit(xp, prec, epochs=1, n=24, **kw):
    x, y = _data(xp, n)
    with cnn_gpu.use_backend("cupy" if xp is not np else "numpy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
        opt = optim.SGD(model, 0.05, momentum=0.9)
    fit(model, opt, DataLoader(x, y, 8, shuffle=False), epochs, precision=prec, **kw)
    return model


# ============================================================================ the setting
@pytest.mark.parametrize("bad", ["fp64", "FP32", "bf16", None, 16])
def test_precision_check_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"^precision: expected one of \('fp32', 'tf32', 'fp16'\), got "):
        precision.check(bad)


@pytest.mark.parametrize("prec", ["tf32", "fp16"])
def test_precision_cpu_engine_refuses_gpu_precisions(prec):
    """The CPU engine computes in float32 only: fit refuses tf32 and fp16 in one line, before a step."""
    x, y = _data(np)
    with cnn_gpu.use_backend("numpy"):
        model = models.lenet5()
        opt = optim.SGD(model, 0.05)
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(
        ValueError,
        match=rf"^precision: '{prec}' runs on the cuda engine .*the cpu engine computes "
        r"in float32 only",
    ) as exc:
        fit(model, opt, DataLoader(x, y, 8), 1, precision=prec)
    assert "\n" not in str(exc.value)
    assert all((p.data == b).all() for p, b in zip(model.parameters(), before))  # nothing trained


def test_precision_train_config_and_cli():
    """TrainConfig.precision (default fp32) is checked, is a run setting (--resume keeps it), and
    --precision parses into it; an unknown value is the CLI's usage error."""
    assert TrainConfig().precision == "fp32" and "precision" in RUN_SETTINGS
    with pytest.raises(ValueError, match=r"^precision: expected one of \('fp32', 'tf32', 'fp16'\), got 'half'"):
        TrainConfig(precision="half").resolved()
    assert cli.build_parser().parse_args(["train", "--precision", "tf32"]).precision == "tf32"
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--precision", "half"])
    assert exc.value.code == 2


def test_precision_cli_refuses_tf32_on_numpy_before_writing(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--backend",
            "numpy",
            "--precision",
            "tf32",
            "--epochs",
            "1",
            "--run-dir",
            str(run),
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "precision: 'tf32' runs on the cuda engine" in err and "Traceback" not in err
    assert not run.exists()


def test_precision_recorded_in_config_and_model_file(tmp_path):
    """A run records its precision in config.json and in the model files' metadata."""
    run = tmp_path / "run"
    cli.cmd_train(
        TrainConfig(
            dataset="digits", epochs=1, backend="numpy", run_dir=str(run), progress="none", data_dir=str(tmp_path / "data")
        ),
        out=lambda line: None,
    )
    assert json.loads((run / "config.json").read_text())["config"]["precision"] == "fp32"
    _, meta = cli._load_checkpoint(str(run / "last.npz"))
    assert meta["config"]["precision"] == "fp32"


# ============================================================================ tf32
def test_standin_cublas_tf32_math_mode_rounds_the_gemm_inputs(standin):
    """CublasHandle.set_math_mode(TF32) is cublasSetMathMode on our handle; a float32 GEMM then
    multiplies TF32-rounded inputs (the fake, as the tensor cores), and DEFAULT restores exact float32."""
    cp = standin
    h, why = cnn_gpu.cuda.cublas.get_handle()
    assert h is not None, why
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((7, 3)).astype(np.float32)
    a, b, out = cp.asarray(A), cp.asarray(B), cp.zeros((5, 3), np.float32)
    exact = A.astype(np.float64) @ B
    assert h.set_math_mode(cnn_gpu.cuda.cublas.CUBLAS_TF32_TENSOR_OP_MATH) == 0
    h.gemm(a, b, out)
    tf32 = cp.asnumpy(out)
    ra, rb = fake.round_to_tf32(A), fake.round_to_tf32(B)
    assert not np.array_equal(ra, A) and (np.abs(ra - A) <= np.abs(A) * 2.0**-11).all()
    np.testing.assert_allclose(tf32, ra.astype(np.float64) @ rb, rtol=1e-6, atol=1e-6)
    assert np.abs(tf32 - exact).max() > 1e-5  # measurably not float32
    assert h.set_math_mode(cnn_gpu.cuda.cublas.CUBLAS_DEFAULT_MATH) == 3
    h.gemm(a, b, out)
    np.testing.assert_allclose(cp.asnumpy(out), exact, rtol=1e-5, atol=1e-6)
    assert fake.active().gemm_math_modes[-2:] == [3, 0]
    with pytest.raises(ValueError, match=r"^mode: expected CUBLAS_DEFAULT_MATH \(0\) or CUBLAS_TF32"):
        h.set_math_mode(1)


def test_standin_round_to_tf32_keeps_specials_and_rounds_to_nearest():
    x = np.array(
        [1.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-12, np.inf, -np.inf, np.nan, np.finfo(np.float32).max, -0.0], np.float32
    )
    r = fake.round_to_tf32(x)
    assert r[0] == 1.0 and r[1] == 1.0 and r[2] == 1 + 2.0**-9 and r[3] == 1.0  # ties to even, below half down
    assert r[4] == np.inf and r[5] == -np.inf and np.isnan(r[6]) and r[7] == np.inf and r[8] == 0.0  # max rounds up to inf


@pytest.mark.parametrize("cuda_graph", [False, "auto"], ids=["eager", "graph"])
def test_standin_fit_tf32_runs_every_gemm_in_tf32_and_restores(standin, cuda_graph):
    """fit(precision="tf32") sets TF32 math on our handle for the run: every GEMM of the fit (eager,
    captured and replayed: 3 steps) ran under it, and the mode is DEFAULT again after; fp32 never
    sets a mode."""
    lib = fake.active()
    _fit(standin, "fp32", cuda_graph=cuda_graph)
    n32 = len(lib.gemm_math_modes)
    assert n32 > 0 and set(lib.gemm_math_modes) == {0}
    assert not [e for e in lib.log if e[0] == "cublasSetMathMode"]
    _fit(standin, "tf32", cuda_graph=cuda_graph)
    modes = lib.gemm_math_modes[n32:]
    assert len(modes) > 0 and set(modes) == {3}
    assert [e[2] for e in lib.log if e[0] == "cublasSetMathMode"] == [3, 0]
    h, _ = cnn_gpu.cuda.cublas.get_handle()
    assert h.math_mode == 0


def test_standin_fit_tf32_step_is_close_to_fp32(standin):
    """One SGD step in tf32 against fp32 from the same weights: every parameter's update differs
    (the GEMM inputs were rounded) by TF32's order of error: the last two layers' by under 2e-3 of the
    update, those fed by the convolutions' (sums of 8*24*24 terms that cancel) under 5e-2."""
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        init = [cnn_gpu.to_numpy(p.data).copy() for p in models.lenet5().parameters()]
    fp32, tf32 = _fit(standin, "fp32", n=8), _fit(standin, "tf32", n=8)
    for (name, p), q, w0 in zip(fp32.named_parameters(), tf32.parameters(), init):
        P, Q = cnn_gpu.to_numpy(p.data), cnn_gpu.to_numpy(q.data)
        rel = np.linalg.norm(P - Q) / np.linalg.norm(P - w0)
        assert 0 < rel < (2e-3 if name.startswith(("classifier.2", "classifier.4")) else 5e-2), (name, rel)


def test_standin_fit_tf32_restores_the_mode_when_training_fails(standin):
    """The mode is restored however fit ends (here: a label past the model's outputs)."""
    x, y = _data(standin)
    y[0] = 12
    with cnn_gpu.use_backend("cupy"):
        model = models.lenet5()
        opt = optim.SGD(model, 0.05)
    with pytest.raises(ValueError, match="labels"):
        fit(model, opt, DataLoader(x, y, 8), 1, precision="tf32")
    h, _ = cnn_gpu.cuda.cublas.get_handle()
    assert h.math_mode == 0


# ============================================================================ float16 GEMMs
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32], ids=["out16", "out32"])
@pytest.mark.parametrize("transa,transb", [(False, False), (False, True), (True, False)], ids=["NN", "NT", "TN"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_standin_cublas_float16_gemm_is_gemmex_with_float32_sums(gpu_cupy, out_dtype, transa, transb, beta):
    """float16 a, b -> cublasGemmEx (CUBLAS_COMPUTE_32F): the products and sums in float32 from the
    float16 values, out rounded to its dtype (float16 or float32), beta = 1 adding into it."""
    cp = gpu_cupy
    rng = np.random.default_rng(5)
    m, n, k = 6, 5, 300
    A = rng.standard_normal((k, m) if transa else (m, k)).astype(np.float16)
    B = rng.standard_normal((n, k) if transb else (k, n)).astype(np.float16)
    C = rng.standard_normal((m, n)).astype(out_dtype)
    out = cp.asarray(C)
    h, why = cnn_gpu.cuda.cublas.get_handle()
    assert h is not None, why
    h.gemm(cp.asarray(A), cp.asarray(B), out, transa=transa, transb=transb, beta=beta)
    exact = (A.T if transa else A).astype(np.float64) @ (B.T if transb else B).astype(np.float64)
    want = (exact + (beta * C.astype(np.float64) if beta else 0)).astype(out_dtype)
    got = cp.asnumpy(out)
    assert got.dtype == out_dtype
    # float32 sums of 300 products: within a float32 rounding of the sum's magnitude, then out's rounding
    ulp = np.spacing(np.abs(want).astype(out_dtype)).astype(np.float64)
    assert (np.abs(got.astype(np.float64) - want.astype(np.float64)) <= ulp + 1e-4).all()
    if type(cp.zeros(1)).__module__ == "cupy" and hasattr(cp, "_standin_cupyx"):
        entry = fake.active().gemms()[-1]
        assert entry[0] == "cublasGemmEx"


def test_standin_cublas_float16_gemm_overflows_to_inf_like_cublas(standin):
    """A float32 sum beyond float16's range is inf in a float16 out and exact in a float32 out."""
    cp = standin
    h, _ = cnn_gpu.cuda.cublas.get_handle()
    a, b = cp.full((2, 3), 200.0, np.float16), cp.full((3, 2), 200.0, np.float16)  # sums 120000 > 65504
    o16, o32 = cp.zeros((2, 2), np.float16), cp.zeros((2, 2), np.float32)
    h.gemm(a, b, o16)
    h.gemm(a, b, o32)
    assert (cp.asnumpy(o16) == np.inf).all() and (cp.asnumpy(o32) == 120000.0).all()
    with pytest.raises(TypeError, match=r"^gemm: b must have a's dtype float16, got float32"):
        h.gemm(a, b.astype(np.float32), o32)
    with pytest.raises(TypeError, match=r"^gemm: out must have a's dtype float16 or float32, got float64"):
        h.gemm(a, b, o32.astype(np.float64))


# ============================================================================ float16 training
def _lenet5_sgd(cp, lr=0.05):
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
        return model, optim.SGD(model, lr, momentum=0.9)


def test_standin_fp16_planted_overflow_skips_the_step_without_a_host_sync(standin):
    """A loss scale of 2**24 on the first step: dlogits overflow float16, the found-inf check sees
    it, the update leaves the float32 masters (and the float16 copy) as they were, the scale halves;
    the whole step syncs the host 0 times. The next steps, at lower scales, train."""
    from standin import counting  # noqa: PLC0415

    from cnn_gpu.precision import Float16Step, LossScaler  # noqa: PLC0415
    from cnn_gpu.train import train_step  # noqa: PLC0415

    model, opt = _lenet5_sgd(standin)
    loss_fn = cnn_gpu.nn.CrossEntropyLoss(validate_range=False)
    step = Float16Step(model, opt, loss_fn, LossScaler(standin, init_scale=2.0**24))
    x, y = _data(standin, 8)
    before = [cnn_gpu.to_numpy(p.data).copy() for p in model.parameters()]
    with counting() as c:
        loss, logits = train_step(model, loss_fn, opt, x, y)
    assert c.total_syncs == 0, dict(c.syncs)
    assert {"found_inf_f32", "sgd_update_master_f16", "loss_scale_update_f32", "softmax_cross_entropy_f16"} <= set(c.kernels), (
        dict(c.kernels)
    )
    state = opt.scaler.state_dict()
    assert state["scale"] == 2.0**23 and state["growth_tracker"] == 0
    after = [cnn_gpu.to_numpy(p.data) for p in model.parameters()]
    assert all(np.array_equal(a, b) for a, b in zip(after, before))  # skipped: not a bit changed
    assert all(np.array_equal(cnn_gpu.to_numpy(g.half), cnn_gpu.to_numpy(g.data).astype(np.float16)) for g in opt.groups)
    scales = []
    for _ in range(10):  # halving until a step is clean (this random net's gradients are large)
        train_step(model, loss_fn, opt, x, y)
        state = opt.scaler.state_dict()
        scales.append(state["scale"])
        if state["growth_tracker"]:
            break
    assert state["growth_tracker"] == 1 and scales == [2.0 ** (22 - i) for i in range(len(scales) - 1)] + [scales[-2]]
    after = [cnn_gpu.to_numpy(p.data) for p in model.parameters()]
    assert all(np.isfinite(a).all() for a in after) and not all(np.array_equal(a, b) for a, b in zip(after, before))
    step.close()
    assert opt.scaler is None and opt.float16_step is None and loss_fn.grad_scale is None
    assert opt.loss_scaler_state == state


def _fit16(cp, x, y, prec, cuda_graph=False):
    model, opt = _lenet5_sgd(cp, lr=0.01)
    hist = fit(model, opt, DataLoader(x, y, 8, shuffle=False), 2, precision=prec, cuda_graph=cuda_graph)
    return [h.train_loss for h in hist], model, opt


def test_standin_fp16_fit_is_close_to_fp32(standin):
    """fit(precision="fp16") on lenet5, 4 steps: float32 weights before and after (the masters),
    losses and weights close to an fp32 fit's; the scale (no overflow) counted 4 clean steps."""
    x, y = _data(standin, 16)
    l32, m32, _ = _fit16(standin, x, y, "fp32")
    l16, m16, o16 = _fit16(standin, x, y, "fp16")
    assert all(p.data.dtype == np.float32 for p in m16.parameters())
    np.testing.assert_allclose(l16, l32, rtol=1e-2)
    init, _ = _lenet5_sgd(standin)
    for (name, p), q, w0 in zip(m32.named_parameters(), m16.parameters(), init.parameters()):
        P, Q, W0 = (cnn_gpu.to_numpy(a.data) for a in (p, q, w0))
        assert np.linalg.norm(Q - P) < 0.1 * np.linalg.norm(P - W0), name  # float16 rounding (first layer: its
        # input rounded too, 6%), not another path (unscaled: 65536x; skipped: 100%)
    assert o16.scaler is None and o16.loss_scaler_state["scale"] == 2.0**16
    assert o16.loss_scaler_state["growth_tracker"] == 4


def test_standin_fp16_fit_graph_equals_eager(standin):
    """The CUDA-graph fp16 fit (captured at step 2, replayed, first replay checked) gives the eager
    fp16 fit's weights and scale bit for bit."""
    x, y = _data(standin, 16)
    lg, mg, og = _fit16(standin, x, y, "fp16", cuda_graph="auto")
    le, me, oe = _fit16(standin, x, y, "fp16", cuda_graph=False)
    assert lg == le and og.loss_scaler_state == oe.loss_scaler_state
    for p, q in zip(mg.parameters(), me.parameters()):
        np.testing.assert_array_equal(cnn_gpu.to_numpy(p.data), cnn_gpu.to_numpy(q.data))


def test_standin_fp16_adam_fit_and_what_fp16_refuses(standin):
    """Adam in fp16: 2 steps close to fp32's, the steps counted on the device (steps_taken); a
    float64 model is refused in one line before a step."""
    x, y = _data(standin, 16)
    out = {}
    for prec in ("fp32", "fp16"):
        with cnn_gpu.use_backend("cupy"):
            cnn_gpu.manual_seed(0)
            model = models.lenet5()
            opt = optim.AdamW(model, 1e-3)
        out[prec] = (fit(model, opt, DataLoader(x, y, 8, shuffle=False), 1, precision=prec)[0].train_loss, opt)
    assert abs(out["fp16"][0] - out["fp32"][0]) < 1e-2 * out["fp32"][0]
    assert out["fp16"][1].loss_scaler_state["steps_taken"] == 2
    with pytest.raises(ValueError, match=r"^precision: 'fp16' applies to float32 models and data, got float64"):
        fit(model, optim.SGD(model, 0.1), DataLoader(x.astype(np.float64), y, 8), 1, precision="fp16")

    class Mine(cnn_gpu.nn.ReLU):  # a layer of the user's own: its ops' float16 kernels are unknown
        pass

    with cnn_gpu.use_backend("cupy"):
        net = cnn_gpu.nn.Sequential(cnn_gpu.nn.Flatten(), cnn_gpu.nn.Linear(784, 10), Mine())
    refused = r"^model: precision='fp16' runs cnn_gpu's layers \(.*\), whose float16 kernels it knows; layer '2' is a Mine \("
    with pytest.raises(ValueError, match=refused):
        fit(net, optim.SGD(net, 0.1), DataLoader(x, y, 8), 1, precision="fp16")


def _every_layer_net(cp):
    """Every layer kind of cnn_gpu.nn with float16 kernels: BatchNorm (2-D and 1-D), depthwise
    convolution, adaptive pooling, the activations other than ReLU, a residual block."""
    nn = cnn_gpu.nn
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.GELU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
            nn.LeakyReLU(0.1),
            nn.Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh())),
            nn.AvgPool2d(2),
            nn.GELU("tanh"),
            nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
            nn.Linear(72, 16),
            nn.BatchNorm1d(16),
            nn.Sigmoid(),
            nn.Dropout(0.25),
            nn.Linear(16, 10),
        )


def _distance(a, b, arrays=False) -> float:
    """The distance between two models' parameters (or two lists of arrays), over all of them."""
    if not arrays:
        a, b = [p.data for p in a.parameters()], [p.data for p in b.parameters()]
    d = [cnn_gpu.to_numpy(p).astype(np.float64) - cnn_gpu.to_numpy(q) for p, q in zip(a, b)]
    return float(np.sqrt(sum(float((v * v).sum()) for v in d)))


@pytest.mark.parametrize("make", ["every_layer", "resnet20"])
def test_standin_fp16_trains_batchnorm_depthwise_adaptive_and_every_activation(standin, make):
    """fp16 runs every layer of cnn_gpu.nn: a net of each kind, and resnet20, train 2 epochs (4
    steps) -- the float16 kernels of BatchNorm (float32 statistics), depthwise convolution, adaptive
    pooling and the activations launched, the masters and running statistics float32 -- and land as
    near the fp32 fit as an fp32 fit on the batch rounded to float16 does; the CUDA-graph fp16 fit
    equals the eager one bit for bit."""
    from standin import counting  # noqa: PLC0415

    rng = np.random.default_rng(5)
    x = standin.asarray(rng.standard_normal((16, 3, 12, 12)).astype(np.float32))
    y = standin.asarray(rng.integers(0, 10, 16))

    def run(prec, cuda_graph=False, x16=False):
        if make == "resnet20":
            with cnn_gpu.use_backend("cupy"):
                cnn_gpu.manual_seed(0)
                model = models.resnet20()
        else:
            model = _every_layer_net(standin)
        opt = optim.SGD(model, 0.02, momentum=0.9)
        with counting() as c:
            xb = x.astype(np.float16).astype(np.float32) if x16 else x
            hist = fit(model, opt, DataLoader(xb, y, 8, shuffle=False), 2, precision=prec, cuda_graph=cuda_graph)
        return [h.train_loss for h in hist], model, opt, c

    l32, m32, _, _ = run("fp32")
    l16, m16, o16, c = run("fp16")
    want = {"batch_norm_forward_f16", "batch_norm_backward_f16"}
    if make == "every_layer":
        want |= {"gelu_forward_f16", "leaky_relu_backward_f16", "tanh_forward_f16", "sigmoid_backward_f16"}
        want |= {"depthwise_conv_forward_f16", "depthwise_conv_weight_grad_f16", "adaptive_avg_pool2d_backward_f16"}
    assert want <= set(c.kernels), sorted(want - set(c.kernels))
    assert o16.loss_scaler_state["growth_tracker"] == 4  # 4 clean steps, no overflow
    np.testing.assert_allclose(l16, l32, rtol=2e-2)
    _, mx, _, _ = run("fp32", x16=True)  # fp32 on the batch rounded to float16: the input's rounding alone
    dev16, devx = _distance(m16, m32), _distance(mx, m32)
    assert 0 < dev16 <= 2 * devx, (dev16, devx)  # float16 storage throughout costs about what rounding the
    # input alone does (this random batch makes resnet20's gradients sensitive: 0.44 vs 0.33; the small net
    # 4.4e-4 vs 4.0e-4); an unscaled, skipped or wrongly rounded step would be far off
    assert all(q.data.dtype == np.float32 for q in m16.parameters())
    for (name, b), (_, b32) in zip(m16.named_buffers(), m32.named_buffers()):
        assert b.dtype == b32.dtype, name  # float32 running statistics, int64 counters

    def stats(m):
        return [b for n, b in m.named_buffers() if n.endswith(("running_mean", "running_var"))]

    dstat16, dstatx = (_distance(stats(a), stats(m32), arrays=True) for a in (m16, mx))
    size = float(np.sqrt(sum(float((cnn_gpu.to_numpy(b).astype(np.float64) ** 2).sum()) for b in stats(m32))))
    assert 0 < dstat16 <= max(2 * dstatx, 1e-3 * size), (dstat16, dstatx, size)  # (the statistics of float16
    # activations: rounded at every layer, not only at the input)
    lg, mg, og, _ = run("fp16", cuda_graph="auto")
    assert lg == l16 and og.loss_scaler_state == o16.loss_scaler_state
    for p, q in zip(mg.parameters(), m16.parameters()):
        np.testing.assert_array_equal(cnn_gpu.to_numpy(p.data), cnn_gpu.to_numpy(q.data))


def test_standin_fp16_resume_continues_with_the_saved_scale_exactly(standin, tmp_path):
    """The loss scale and its count of clean steps are in the checkpoint (the optimizer's header):
    two steps, save, two more -- equals a fresh optimizer restored from the checkpoint doing the
    last two, bit for bit (masters, momentum, scale, count)."""
    from cnn_gpu.checkpoint import load_checkpoint, restore, save_checkpoint  # noqa: PLC0415
    from cnn_gpu.precision import Float16Step  # noqa: PLC0415
    from cnn_gpu.train import Position, train_step  # noqa: PLC0415

    x, y = _data(standin, 8)

    def run(model, opt, steps):
        loss_fn = cnn_gpu.nn.CrossEntropyLoss(validate_range=False)
        half = Float16Step(model, opt, loss_fn)
        for _ in range(steps):
            train_step(model, loss_fn, opt, x, y)
        half.close()

    model, opt = _lenet5_sgd(standin, lr=0.01)
    opt.loss_scaler_state = {
        "scale": 2.0**11,
        "growth_tracker": 0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 3,
    }  # grows within the 4 steps
    run(model, opt, 2)
    save_checkpoint(tmp_path / "c.npz", model, opt, position=Position())
    run(model, opt, 2)
    with cnn_gpu.use_backend("cupy"):
        model2 = models.lenet5()
        opt2 = optim.SGD(model2, 0.01, momentum=0.9)
    restore(load_checkpoint(tmp_path / "c.npz"), model2, opt2)
    assert opt2.loss_scaler_state["growth_tracker"] == 2 and opt2.loss_scaler_state["scale"] == 2.0**11
    run(model2, opt2, 2)
    assert opt2.loss_scaler_state == opt.loss_scaler_state and opt.loss_scaler_state["scale"] == 2.0**12
    for p, q in zip(model.parameters(), model2.parameters()):
        np.testing.assert_array_equal(cnn_gpu.to_numpy(p.data), cnn_gpu.to_numpy(q.data))
    for g, h in zip(opt.groups, opt2.groups):
        np.testing.assert_array_equal(cnn_gpu.to_numpy(g.state["momentum_buffer"]), cnn_gpu.to_numpy(h.state["momentum_buffer"]))


def test_precision_gpu_budget_bytes_fp16_moves_about_half():
    """benchmarks/gpu_budget.py --bytes: a float16 step of lenet5 moves 0.45-0.7 of the float32 step's
    bytes (activations, columns and GEMM inputs halve; the gradients, masters and momentum stay
    float32, and the update writes the float16 copy too), in 2 more launches (found_inf, the scale)."""
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_budget  # noqa: PLC0415

    b32, b16 = gpu_budget.step_bytes("lenet5", 16, "fp32"), gpu_budget.step_bytes("lenet5", 16, "fp16")
    assert 0.45 < b16["bytes"] / b32["bytes"] < 0.7, (b16, b32)
    assert b16["launches"] == b32["launches"] + 2
