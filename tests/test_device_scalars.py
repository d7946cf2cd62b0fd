"""Per-step scalars from device memory (cnn_gpu/cuda/scalars.py): the optimizer, dropout and
augmentation kernels give the same bits with ``device_scalars=`` as with scalar arguments.

The kernel tests ("emul" in their names) run the CUDA engine's wrappers on the g++ emulation, the
device-scalar calls with *wrong* scalar arguments, so equal bits show that the kernel read the
device array. The stand-in tests ("standin") run whole training steps in both modes and count the
uploads (one asynchronous copy per owner and step) and host syncs (none).
"""

from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import cuda, nn, optim
from cnn_gpu.cuda import ops
from cnn_gpu.cuda.scalars import LAYOUTS, adam_scalars, kernel_args
from cnn_gpu.data.augment import Compose, RandomCrop, RandomHorizontalFlip, batch_key
from cnn_gpu.functional import counter_rng
from cnn_gpu.functional.geometry import CropFlip
from cnn_gpu.train import train_step

DTYPES = [np.float32, np.float64]
LAUNCHES = [{}, {"grid": 1, "block": 32}, {"grid": 3, "block": 32}]
LAUNCH_IDS = ["default", "g1b32", "g3b32"]
M64 = (1 << 64) - 1


@pytest.fixture
def emul():
    """The CUDA engine's launches on the CPU emulator, each run in forward and reverse order."""
    from helpers import load_harness  # noqa: PLC0415

    launcher = load_harness().EmulationLauncher(check_order=True, grid_cap=8)
    with cuda.use_launcher(launcher):
        yield launcher


def same_bits(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    differ = np.flatnonzero(a.view(np.uint8) != b.view(np.uint8)).size
    assert differ == 0, f"{what}: {differ} bytes differ"


def f64(*values):
    return np.array(values, dtype=np.float64)


def i64(*keys):
    """64-bit keys (ints in [0, 2**64)) as the int64 words the kernels read."""
    return np.array(keys, dtype=np.uint64).view(np.int64)


LRS = [0.1, 1 / 3, 0.0123456789, 2.5e-4, 0.07]  # a schedule's values: most do not round exactly to float32


# ======================================================================== optimizers
@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "mu,wd,nesterov",
    [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, True), (0.5, 1e-3, False)],
    ids=["plain", "momentum", "nesterov-wd", "momentum-wd"],
)
def test_emul_sgd_device_lr_is_bitwise_the_argument(emul, dtype, launch, mu, wd, nesterov):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(77).astype(dtype)
    p, q = p0.copy(), p0.copy()
    bp, bq = (np.zeros_like(p0), np.zeros_like(p0)) if mu else (None, None)
    for t, lr in enumerate(LRS):
        g = rng.standard_normal(77).astype(dtype)
        ops.sgd_update_(p, g, bp, lr, mu, wd, nesterov, t == 0, **launch)
        ops.sgd_update_(q, g, bq, 99.0, mu, wd, nesterov, t == 0, device_scalars=f64(lr), **launch)  # 99: not read
        same_bits(q, p, f"p at step {t}")
        if mu:
            same_bits(bq, bp, f"momentum buffer at step {t}")


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (1e-2, False), (1e-1, True)], ids=["adam", "adam-wd", "adamw"])
def test_emul_adam_device_scalars_are_bitwise_the_arguments(emul, dtype, launch, wd, decoupled):
    """Five steps with changing lr and bias corrections: step_size, bc2 and decay from device memory."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(101).astype(dtype)
    (p, m, v), (q, mq, vq) = [(p0.copy(), np.zeros_like(p0), np.zeros_like(p0)) for _ in range(2)]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, lr in enumerate(LRS, start=1):
        g = rng.standard_normal(101).astype(dtype)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        ops.adam_update_(p, g, m, v, lr, b1, b2, eps, wd, decoupled, bc1, bc2, **launch)
        dev = f64(*adam_scalars(lr, wd, bc1, bc2))
        ops.adam_update_(q, g, mq, vq, 7.0, b1, b2, eps, wd, decoupled, 0.5, 0.25, device_scalars=dev, **launch)
        same_bits(q, p, f"p at step {t}")
        same_bits(mq, m, f"m at step {t}")
        same_bits(vq, v, f"v at step {t}")


def test_adam_scalars_are_the_adam_launch_arguments():
    """The (step_size, bc2, decay) layout, in double precision: what adam_update_ passes."""
    step_size, bc2, decay = adam_scalars(1e-3, 1e-2, 1 - 0.9**3, 1 - 0.999**3)
    assert (step_size, bc2, decay) == (1e-3 / (1 - 0.9**3), 1 - 0.999**3, 1.0 - 1e-3 * 1e-2)
    assert LAYOUTS["adam_update_"][1] == ("step_size", "bc2", "decay") and LAYOUTS["sgd_update_"][1] == ("lr",)


# ======================================================================== dropout
KEYS = [0, 1, 12345678901234567, 1 << 63, M64, counter_rng.key(7, 3)]


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_emul_dropout_device_key_is_bitwise_the_argument(emul, dtype, launch, p):
    x = np.random.default_rng(3).standard_normal((4, 3, 5, 7)).astype(dtype)
    for key in KEYS:
        y, cache = ops.dropout_forward(x, p, True, key=key, **launch)
        y2, cache2 = ops.dropout_forward(x, p, True, key=key ^ 0x5555, device_scalars=i64(key), **launch)
        same_bits(y2, y, f"y for key {key}")
        same_bits(cache2.mask, cache.mask, f"mask for key {key}")
        y3, _ = ops.dropout_forward(x, p, True, device_scalars=i64(key), **launch)  # no key argument at all
        same_bits(y3, y, f"y for key {key} without the argument")


def test_emul_dropout_device_key_outside_training_is_the_identity(emul):
    x = np.ones((3, 4), np.float32)
    y, cache = ops.dropout_forward(x, 0.5, False, device_scalars=i64(5))
    assert y is x and cache.mask is None


# ======================================================================== augmentation
CROP_CASES = [
    ((3, 2, 8, 8), 8, 2, "zeros"),
    ((3, 2, 8, 8), 6, 3, "reflect"),
    ((2, 3, 5, 7), (4, 6), (1, 2), "zeros"),
    ((2, 1, 6, 6), 6, 5, "reflect"),
]


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CROP_CASES, ids=["zeros", "reflect", "rect-zeros", "reflect-wide"])
def test_emul_crop_flip_device_keys_are_bitwise_the_arguments(emul, dtype, launch, case):
    shape, size, padding, mode = case
    x = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    crop, flip = RandomCrop(size, padding, mode), RandomHorizontalFlip(0.5)
    for step, (ck, fk) in enumerate([(batch_key(1, 0, 0, 0), batch_key(1, 0, 0, 1)), (M64, 1 << 63), (0, 3)]):
        geom = (*shape, *crop.size, *crop.padding, int(mode == "reflect"))
        a = CropFlip(*geom, ck, fk, flip.threshold)
        wrong = CropFlip(*geom, ck ^ 1, fk ^ 2, flip.threshold)
        want = ops.crop_flip(x, a, **launch)
        same_bits(ops.crop_flip(x, wrong, device_scalars=i64(ck, fk), **launch), want, f"keys {step}")


# ======================================================================== the checks
def test_emul_device_scalars_are_checked_with_one_line_errors(emul):
    p = np.zeros(5, np.float32)
    cases = [
        (
            lambda d: ops.sgd_update_(p, p.copy(), None, 0.1, 0, 0, False, True, device_scalars=d),
            np.zeros(1, np.float32),
            "float64 array of shape (1,) holding (lr)",
        ),
        (
            lambda d: ops.adam_update_(
                p, p.copy(), p.copy(), p.copy(), 0.1, 0.9, 0.99, 1e-8, 0, False, 0.1, 0.01, device_scalars=d
            ),
            np.zeros(2),
            "float64 array of shape (3,) holding (step_size, bc2, decay)",
        ),
        (
            lambda d: ops.dropout_forward(p, 0.5, True, key=1, device_scalars=d),
            np.zeros((1, 1), np.int64),
            "int64 array of shape (1,) holding (key)",
        ),
        (
            lambda d: ops.crop_flip(p.reshape(1, 1, 1, 5), CropFlip(1, 1, 1, 5, 1, 5, 0, 0, 0, 1, 2, 0), device_scalars=d),
            np.zeros(4, np.int64)[::2],
            "int64 array of shape (2,) holding (crop_key, flip_key)",
        ),
    ]
    for call, bad, msg in cases:
        with pytest.raises(ValueError, match=r"^device_scalars: expected a contiguous ") as e:
            call(bad)
        assert msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TypeError, match=r"^device_scalars: expected a numpy array like the data, got builtins.list"):
        ops.sgd_update_(p, p.copy(), None, 0.1, 0, 0, False, True, device_scalars=[0.1])


def test_emul_eager_launches_share_one_unread_placeholder(emul):
    """Without device scalars the kernels get a one-element placeholder, flag 0: made once per
    array kind, device and dtype (no allocation, no upload per step)."""
    x, x64 = np.zeros(3, np.float32), np.zeros(3)  # the optimizers' placeholder is float64 for either dtype
    (a, flag_a), (b, flag_b) = kernel_args("sgd_update_", x, None), kernel_args("adam_update_", x64, None)
    assert flag_a == flag_b == 0 and type(flag_a) is np.int32 and a is b and a.dtype == np.float64 and a.shape == (1,)
    k, _ = kernel_args("dropout_forward", x, None)
    assert k is kernel_args("crop_flip", x, None)[0] and k.dtype == np.int64
    d, flag = kernel_args("crop_flip", x, i64(1, 2))
    assert flag == 1 and type(flag) is np.int32 and d.tolist() == [1, 2]


def test_device_scalar_mode_changes_nothing_on_numpy():
    """NumPy arrays (cpu and reference engines): the values go as arguments, the results are the same."""

    def run(device: bool):
        cnn_gpu.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5, generator=np.random.default_rng(0)), nn.Dropout(0.5), nn.Linear(5, 3))
        opt = optim.AdamW(model, 1e-2)
        sched = optim.OneCycleLR(opt, 1e-2, total_steps=5)
        if device:
            opt.use_device_scalars()
            model._modules["1"].use_device_scalars()
        x, y = np.random.default_rng(1).standard_normal((4, 6)), np.array([0, 1, 2, 1])
        for _ in range(3):
            train_step(model, nn.CrossEntropyLoss(), opt, x.astype(np.float32), y)
            sched.step()
        return [p.data.copy() for p in model.parameters()], opt

    eager, _ = run(False)
    dev, opt = run(True)
    for a, b in zip(eager, dev):
        same_bits(b, a)
    assert opt.device_scalars and all(g.scalars is None for g in opt.groups)  # nothing on a device


# ======================================================================== stand-in: whole steps
@pytest.fixture
def pinned(standin):
    """The sizes of the stand-in's cupy.cuda.alloc_pinned_memory blocks asked from now on."""
    from standin import module  # noqa: PLC0415

    module.pinned_sizes.clear()
    return module.pinned_sizes


def _lenet5_dropout(dtype=np.float32):
    """lenet5 with a Dropout(0.5) before its last Linear."""
    g = dict(dtype=dtype, generator=np.random.default_rng(11))
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120, **g),
        nn.ReLU(),
        nn.Linear(120, 84, **g),
        nn.ReLU(),
        nn.Dropout(0.5, generator=np.random.default_rng(12)),
        nn.Linear(84, 10, **g),
    )


OPTIMIZERS = {
    "adam": lambda m: optim.Adam(m, 1e-3),
    "adamw": lambda m: optim.AdamW(m, 1e-3, weight_decay=0.1),
    "sgd-nesterov": lambda m: optim.SGD(m, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


def _steps(cp, make_opt, device: bool, steps: int = 3):
    """``steps`` lenet5+Dropout training steps under OneCycleLR: the parameters, the masks and
    each step's counters."""
    from standin import counting  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((8, 1, 28, 28)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, 8))
    with cnn_gpu.use_backend("cupy"):
        model = _lenet5_dropout()
        opt = make_opt(model)
        sched = optim.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        dropout = [m for _, m in model.named_modules() if isinstance(m, nn.Dropout)]
        if device:
            opt.use_device_scalars()
            for d in dropout:
                d.use_device_scalars()
        params, masks, counts = [], [], []
        for _ in range(steps):
            with counting() as c:
                train_step(model, loss_fn, opt, x, y)
                sched.step()
            counts.append(c)
            params.append([cp.asnumpy(p.data) for p in model.parameters()])
            masks.append(cp.asnumpy(dropout[0]._cache.mask))
    return params, masks, counts, opt


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_standin_lenet5_dropout_onecycle_device_scalars_equal_eager_bitwise(standin, pinned, monkeypatch, opt_name):
    """Three steps of lenet5 + Dropout under OneCycleLR: device-scalar mode gives the eager bits.
    Uploads per step: 2 -- the optimizer's one group (float32 parameters on one device: lr, or
    Adam's step_size, bc2, decay; 8 or 24 bytes) and the Dropout's key (8 bytes); eager: 0. No host
    sync in either mode; the same kernels, in device mode with their device-scalar flag set."""
    flags = []

    def spy(op, like, device_scalars):
        args = kernel_args(op, like, device_scalars)
        flags.append((op, int(args[1])))
        return args

    monkeypatch.setattr(ops, "kernel_args", spy)
    eager_p, eager_m, eager_c, _ = _steps(standin, OPTIMIZERS[opt_name], device=False)
    update = "sgd_update_" if opt_name.startswith("sgd") else "adam_update_"
    assert flags == [("dropout_forward", 0), (update, 0)] * 3
    flags.clear()
    dev_p, dev_m, dev_c, opt = _steps(standin, OPTIMIZERS[opt_name], device=True)
    assert flags == [("dropout_forward", 1), (update, 1)] * 3
    for t in range(3):
        for i, (a, b) in enumerate(zip(eager_p[t], dev_p[t])):
            same_bits(b, a, f"parameter {i} after step {t + 1}")
        same_bits(dev_m[t], eager_m[t], f"dropout mask at step {t + 1}")
    assert not np.array_equal(eager_p[1][0], eager_p[2][0])  # the steps did change the parameters
    group_bytes = 8 * len(opt.groups[0].scalars.array)
    assert len(opt.groups) == 1 and group_bytes == (8 if opt_name.startswith("sgd") else 24)
    for t, (e, d) in enumerate(zip(eager_c, dev_c)):
        assert e.total_syncs == 0 and d.total_syncs == 0, (t, e.syncs, d.syncs)
        assert e.uploads == 0 and d.uploads == 2 and d.upload_bytes == group_bytes + 8, (t, d.uploads, d.upload_bytes)
        assert d.kernels == e.kernels and d.launches["kernel"] == e.launches["kernel"]
    assert dev_c[1].launches == eager_c[1].launches  # after the first step (which made the device arrays): the same
    assert pinned == [8, group_bytes] * 3  # every upload staged in pinned memory: the key (forward), then the group


@pytest.mark.parametrize(
    "transforms,launches",
    [
        (lambda: [RandomCrop(8, 2, "reflect"), RandomHorizontalFlip()], 1),
        (lambda: [RandomHorizontalFlip(0.3), RandomCrop(6, 1)], 2),
        (lambda: [RandomCrop((6, 7), (1, 3))], 1),
    ],
    ids=["crop-flip", "flip-then-crop", "crop"],
)
def test_standin_augmentation_device_keys_equal_eager_bitwise(standin, pinned, transforms, launches):
    """Compose in device-scalar mode: the eager batches; per batch one 16-byte upload per launch
    (a fused crop + flip is one), no host sync."""
    from standin import counting  # noqa: PLC0415

    x = standin.asarray(np.random.default_rng(5).standard_normal((6, 3, 8, 8)).astype(np.float32))
    eager, dev = Compose(transforms()), Compose(transforms(), device_scalars=True)
    for step in range(3):
        want = standin.asnumpy(eager(x, seed=2, epoch=1, step=step))
        with counting() as c:
            got = dev(x, seed=2, epoch=1, step=step)
        same_bits(standin.asnumpy(got), want, f"batch {step}")
        assert c.total_syncs == 0 and c.uploads == launches and c.upload_bytes == 16 * launches
        assert c.kernels == {"crop_flip_f32": launches}
    assert Compose(transforms()).use_device_scalars().device_scalars


def test_standin_device_scalars_upload_asynchronously_on_the_current_stream(standin, pinned, monkeypatch):
    """DeviceScalars.upload: ndarray.set(pinned host array, stream=the current stream) -- CuPy's
    copy_from_host_async -- then an event behind it; blocks whose copies are done are released."""
    from cnn_gpu.cuda.scalars import DeviceScalars  # noqa: PLC0415

    calls = []
    real_set = type(standin.zeros(1)).set

    def spy(self, arr, stream=None):
        calls.append((arr.dtype, stream))
        return real_set(self, arr, stream)

    monkeypatch.setattr(type(standin.zeros(1)), "set", spy)
    s = DeviceScalars(standin, "dropout_forward")
    stream = standin.cuda.Stream()
    with stream:
        out = s.upload((M64,))
        s.upload((5,))
    assert out is s.array and calls == [(np.dtype(np.int64), stream)] * 2
    assert standin.asnumpy(s.array).view(np.uint64).tolist() == [5] and len(s._in_flight) == 1
