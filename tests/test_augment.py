"""Device-side augmentation (cnn_gpu.data.augment): random crop + horizontal flip of whole batches.

A naive per-sample reference written from the definition (pure-Python splitmix64, np.pad, slicing,
[::-1]) holds the vectorised gather to its exact bits; the CUDA kernel (kernels/augment.cu) runs
under the CPU emulation and must give the same batches bit for bit (CPU and GPU agree); PyTorch
checks the reflect padding; the DataLoader and the training runs use the transforms with (epoch,
step), and an interrupted run resumes to the same weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import callbacks, cli, runs
from cnn_gpu.backend import to_numpy
from cnn_gpu.cuda import ops
from cnn_gpu.data import DataLoader
from cnn_gpu.data.augment import AUGMENTATIONS, Compose, RandomCrop, RandomHorizontalFlip, batch_key, from_name
from cnn_gpu.functional import reference as R
from cnn_gpu.functional.geometry import CropFlip

M64 = (1 << 64) - 1


def mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def bits(key, counter):
    return mix64((key + mix64(counter)) & M64)


def naive(x, size, padding, mode, p, crop_key, flip_key):
    """One sample at a time: pad, cut the window, mirror."""
    x = np.asarray(x)
    N, C, H, W = x.shape
    (OH, OW), (PH, PW) = size, padding
    xpad = np.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW)), mode="reflect" if mode == "reflect" else "constant")
    out = np.empty((N, C, OH, OW), x.dtype)
    for n in range(N):
        oy = bits(crop_key, 2 * n) % (H + 2 * PH - OH + 1)
        ox = bits(crop_key, 2 * n + 1) % (W + 2 * PW - OW + 1)
        win = xpad[n, :, oy : oy + OH, ox : ox + OW]
        out[n] = win[:, :, ::-1] if (bits(flip_key, n) >> 11) / 2.0**53 < p else win
    return out


def images(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


CASES = [  # (x shape, size, padding, mode)
    ((5, 3, 8, 8), 8, 2, "zeros"),
    ((5, 3, 8, 8), 8, 2, "reflect"),
    ((4, 2, 7, 9), (5, 6), (1, 3), "zeros"),
    ((4, 2, 7, 9), (7, 9), (3, 4), "reflect"),
    ((3, 1, 6, 6), 4, 0, "zeros"),
    ((2, 3, 5, 5), 9, 2, "zeros"),
    ((1, 1, 1, 1), 1, 0, "zeros"),
]


@pytest.fixture(params=["auto", "reference"])
def engine(request):
    """auto: the cpu engine's window gather on NumPy (the kernel on CuPy); reference: the definition."""
    with cnn_gpu.config.override(engine=request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_crop_flip_matches_the_naive_reference_bitwise(xp, engine, rng, case, dtype):
    shape, size, padding, mode = case
    x = images(rng, shape, dtype)
    crop, flip = RandomCrop(size, padding, mode), RandomHorizontalFlip(0.5)
    y = Compose([crop, flip])(xp.asarray(x), seed=3, epoch=1, step=4)
    assert y.dtype == dtype and type(y) is type(xp.asarray(x))
    want = naive(x, crop.size, crop.padding, mode, 0.5, batch_key(3, 1, 4, 0), batch_key(3, 1, 4, 1))
    np.testing.assert_array_equal(to_numpy(y), want)
    # a lone crop and a lone flip use transform index 0
    np.testing.assert_array_equal(
        to_numpy(crop(xp.asarray(x), seed=3, epoch=1, step=4)),
        naive(x, crop.size, crop.padding, mode, 0.0, batch_key(3, 1, 4), 0),
    )
    np.testing.assert_array_equal(
        to_numpy(flip(xp.asarray(x), seed=3, epoch=1, step=4)), naive(x, shape[2:], (0, 0), "zeros", 0.5, 0, batch_key(3, 1, 4))
    )


def test_fused_crop_flip_equals_the_two_one_after_the_other(rng):
    x = images(rng, (6, 2, 8, 8))
    crop, flip = RandomCrop(6, 3, "reflect"), RandomHorizontalFlip(0.3)
    fused = Compose([crop, flip])(x, seed=1, epoch=2, step=3)
    k0, k1 = batch_key(1, 2, 3, 0), batch_key(1, 2, 3, 1)
    cropped = R.crop_flip(x, CropFlip(6, 2, 8, 8, 6, 6, 3, 3, 1, k0, 0, 0))
    two = R.crop_flip(cropped, CropFlip(6, 2, 6, 6, 6, 6, 0, 0, 0, 0, k1, flip.threshold))
    np.testing.assert_array_equal(fused, two)
    # flip then crop is a different pipeline (not fused): still one gather per transform
    np.testing.assert_array_equal(
        Compose([flip, crop])(x, seed=1, epoch=2, step=3),
        naive(naive(x, (8, 8), (0, 0), "zeros", 0.3, 0, k0), (6, 6), (3, 3), "reflect", 0, k1, 0),
    )


def test_reflect_padding_is_torchs(rng):
    torch = pytest.importorskip("torch")
    x = images(rng, (2, 3, 6, 5))
    y = RandomCrop((10, 9), padding=(2, 2), padding_mode="reflect")(x)  # the whole padded image: offsets 0
    want = torch.nn.functional.pad(torch.from_numpy(x), (2, 2, 2, 2), mode="reflect").numpy()
    np.testing.assert_array_equal(y, want)
    z = RandomCrop((10, 9), padding=(2, 2))(x)
    np.testing.assert_array_equal(z, torch.nn.functional.pad(torch.from_numpy(x), (2, 2, 2, 2)).numpy())


def test_draws_cover_every_offset_and_flip_at_rate_p():
    x = np.zeros((4000, 1, 4, 4), np.float32)
    a = CropFlip(4000, 1, 4, 4, 4, 4, 2, 2, 0, batch_key(0, 0, 0), batch_key(0, 0, 1), RandomHorizontalFlip(0.3).threshold)
    oy, ox, flip = R.crop_flip_draws(np, a)
    assert sorted(set(oy.tolist())) == [0, 1, 2, 3, 4] and sorted(set(ox.tolist())) == [0, 1, 2, 3, 4]
    assert abs(flip.mean() - 0.3) < 0.03
    assert np.array_equal(RandomHorizontalFlip(0.0)(x + 1), x + 1)
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 1, 3, 4)
    np.testing.assert_array_equal(RandomHorizontalFlip(1.0)(x), x[..., ::-1])


def test_batches_depend_on_seed_epoch_and_step_only(rng):
    x = images(rng, (8, 3, 8, 8))
    aug = from_name("crop-flip", (3, 8, 8))
    a = aug(x, seed=1, epoch=2, step=3)
    np.testing.assert_array_equal(a, aug(x.copy(), seed=1, epoch=2, step=3))
    for other in (dict(seed=2, epoch=2, step=3), dict(seed=1, epoch=3, step=3), dict(seed=1, epoch=2, step=4)):
        assert not np.array_equal(a, aug(x, **other)), other


@pytest.mark.parametrize("launch", [None, (1, 32), (3, 64)], ids=["default", "g1b32", "g3b64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_emul_crop_flip_kernel_equals_the_reference(cuda_emulation, rng, case, dtype, launch):
    shape, size, padding, mode = case
    x = images(rng, shape, dtype)
    crop, flip = RandomCrop(size, padding, mode), RandomHorizontalFlip(0.5)
    a = CropFlip(
        *shape, *crop.size, *crop.padding, int(mode == "reflect"), batch_key(5, 0, 9, 0), batch_key(5, 0, 9, 1), flip.threshold
    )
    kw = {} if launch is None else {"grid": launch[0], "block": launch[1]}
    np.testing.assert_array_equal(ops.crop_flip(x, a, **kw), R.crop_flip(x, a))


def test_emul_augmented_batches_are_the_same_on_cpu_and_gpu(cuda_emulation, rng):
    """One launch per batch on the CUDA engine, the same bits as the CPU engine's window gather
    (cpu/augment.py) and the reference's element gather."""
    x = images(rng, (16, 3, 8, 8))
    aug = Compose([RandomCrop(8, 2, "reflect"), RandomHorizontalFlip()])
    before = len(cuda_emulation.log)
    gpu = aug(x, seed=4, epoch=1, step=2)
    assert len(cuda_emulation.log) - before == 1
    with cnn_gpu.config.override(engine="cpu"):
        cpu = aug(x, seed=4, epoch=1, step=2)
    with cnn_gpu.config.override(engine="reference"):
        ref = aug(x, seed=4, epoch=1, step=2)
    np.testing.assert_array_equal(gpu, cpu)
    np.testing.assert_array_equal(gpu, ref)
    # extreme keys (high bit set) travel to the kernel as long long
    a = CropFlip(16, 3, 8, 8, 6, 6, 1, 1, 0, M64, (1 << 63) + 5, 1 << 52)
    np.testing.assert_array_equal(ops.crop_flip(x, a), R.crop_flip(x, a))


def test_loader_applies_the_transform_with_epoch_and_step(rng):
    x, y = images(rng, (10, 1, 4, 4)), np.arange(10)
    aug = from_name("crop-flip", (1, 4, 4))
    loader = DataLoader(x, y, 3, shuffle=True, seed=5, transform=aug)
    plain = DataLoader(x, y, 3, shuffle=True, seed=5)
    full = list(loader.epoch(2))
    for step, ((xb, yb), (px, py)) in enumerate(zip(full, plain.epoch(2))):
        np.testing.assert_array_equal(yb, py)
        np.testing.assert_array_equal(xb, aug(px, seed=5, epoch=2, step=step))
    resumed = list(loader.epoch(2, start=2))  # a resumed epoch sees the same augmented batches
    assert len(resumed) == 2
    for (a, _), (b, _) in zip(resumed, full[2:]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="transform: expected a callable"):
        DataLoader(x, y, 3, transform="crop-flip")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RandomCrop(0), "size: expected values >= 1"),
        (lambda: RandomCrop(4, -1), "padding: expected values >= 0"),
        (lambda: RandomCrop(4, 1, "edge"), "padding_mode: expected one of"),
        (lambda: RandomHorizontalFlip(1.5), r"p: expected a probability in \[0, 1\]"),
        (lambda: Compose([lambda x: x]), r"transforms\[0\]: expected a RandomCrop"),
        (lambda: from_name("mixup", (3, 8, 8)), "augment: expected one of"),
    ],
)
def test_bad_transform_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_batches(xp):
    x = xp.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"size: expected a crop within the padded 6x6 images"):
        RandomCrop(7, 1)(x)
    with pytest.raises(ValueError, match="padding: reflect padding must be smaller than the image"):
        RandomCrop(4, 4, "reflect")(x)
    with pytest.raises(TypeError, match="x: expected a float32 or float64 array, got uint8"):
        RandomHorizontalFlip()(xp.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="x: expected a 4-D array"):
        RandomHorizontalFlip()(xp.zeros((2, 4, 4), np.float32))


# ------------------------------------------------------------------ runs, recipes and the command line
def test_augment_and_label_smoothing_flags_reach_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--epochs",
            "1",
            "--augment",
            "crop-flip",
            "--label-smoothing",
            "0.1",
            "--run-dir",
            str(run),
            "--progress",
            "plain",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "augmentation crop-flip, label smoothing 0.1" in out
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert (cfg["augment"], cfg["label_smoothing"]) == ("crop-flip", 0.1)
    assert cnn_gpu.checkpoint.load_checkpoint(run / "checkpoint.npz").config["augment"] == "crop-flip"
    for bad in (["--augment", "mixup"], ["--label-smoothing", "1.5"]):
        with pytest.raises(SystemExit):
            cli.main(["train", *bad])
        assert bad[0] in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", str(run), "--augment", "none"])
    assert "--augment" in capsys.readouterr().err


def test_recipes_carry_augment_and_label_smoothing(monkeypatch):
    cfg = runs.TrainConfig().resolved()
    assert (cfg.augment, cfg.label_smoothing) == ("none", 0.0)  # runs.RECIPE_DEFAULTS
    monkeypatch.setitem(runs.RECIPES, "digits", dict(runs.RECIPES["digits"], augment="crop", label_smoothing=0.2))
    cfg = runs.TrainConfig().resolved()
    assert (cfg.augment, cfg.label_smoothing) == ("crop", 0.2)
    assert runs.TrainConfig(augment="flip", label_smoothing=0.0).resolved().augment == "flip"
    assert set(AUGMENTATIONS) == {"none", "flip", "crop", "crop-flip"}
    with pytest.raises(ValueError, match="label_smoothing: expected a number in"):
        runs.TrainConfig(label_smoothing=-1.0).resolved()
    with pytest.raises(ValueError, match="augment: expected one of"):
        runs.TrainConfig(augment="all").resolved()


def test_interrupted_augmented_run_resumes_bitwise(tmp_path):
    cfg = dict(epochs=2, seed=3, augment="crop-flip", label_smoothing=0.1, quiet=True)
    straight = tmp_path / "straight"
    cli.cmd_train(runs.TrainConfig(run_dir=str(straight), **cfg), out=lambda s: None)

    def on_step(epoch, step):
        if (epoch, step) == (1, 17):
            raise KeyboardInterrupt

    run = tmp_path / "interrupted"
    with pytest.raises(runs.RunStopped):
        cli.cmd_train(
            runs.TrainConfig(run_dir=str(run), **cfg), out=lambda s: None, callbacks=[callbacks.LambdaCallback(on_step=on_step)]
        )
    cli.cmd_train(runs.TrainConfig(), out=lambda s: None, resume=str(run))
    a, b = (cnn_gpu.load(d / "last.npz").state_dict() for d in (straight, run))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # augmentation changes the training: the same run without it ends elsewhere
    plain = tmp_path / "plain"
    cli.cmd_train(runs.TrainConfig(run_dir=str(plain), **dict(cfg, augment="none")), out=lambda s: None)
    c = cnn_gpu.load(plain / "last.npz").state_dict()
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def _fit_tiny(seed=0):
    """Two epochs of fit on 16 tiny images with crop-flip, label smoothing and a depthwise layer."""
    from cnn_gpu import nn, optim
    from cnn_gpu.random import resolve_generator
    from cnn_gpu.train import fit

    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((16, 3, 8, 8)), rng.integers(0, 4, 16)
    g = dict(dtype=np.float64, generator=resolve_generator(1))
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, **g),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=6, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(54, 4, **g),
    )
    loader = DataLoader(x, y, 8, shuffle=True, seed=seed, transform=from_name("crop-flip", (3, 8, 8)))
    history = fit(model, optim.SGD(model, 0.1, momentum=0.9), loader, 2, label_smoothing=0.1)
    return [h.train_loss for h in history], model.state_dict()


def test_emul_fit_with_augmentation_and_label_smoothing_on_the_cuda_engine(cuda_emulation):
    """A whole fit through the kernels (crop_flip, the smoothed loss, depthwise convolution) gives
    the reference engine's losses and weights."""
    got = _fit_tiny()
    used = {k.rsplit("_f", 1)[0] for k, _, _ in cuda_emulation.log}
    assert {"crop_flip", "softmax_cross_entropy", "depthwise_conv_forward", "depthwise_conv_weight_grad"} <= used
    with cnn_gpu.config.override(engine="reference"):
        want = _fit_tiny()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_a_run_saved_before_these_settings_resumes_with_the_defaults():
    old = {k: v for k, v in runs.TrainConfig().resolved().as_dict().items() if k not in ("augment", "label_smoothing")}
    cfg = runs.TrainConfig.from_dict(old).with_defaults()
    assert (cfg.augment, cfg.label_smoothing) == ("none", 0.0)
    cfg.check()
