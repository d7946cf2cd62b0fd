"""Data augmentation on the batch's backend: random crops and horizontal flips, one gather per batch.

    aug = Compose([RandomCrop(32, padding=4), RandomHorizontalFlip()])
    xb = aug(xb, seed=0, epoch=3, step=17)      # (N, C, 32, 32), on xb's backend

A transform takes a whole batch (N, C, H, W) (float32 or float64, NumPy or CuPy) and returns a
new one. Randomness has no generator state: the draws of batch (seed, epoch, step) come from
the counter-based generator (cnn_gpu/functional/counter_rng.py) under the key
key(seed, epoch, step, "augment", transform index), sample n using counters 2n, 2n + 1 (crop
offsets) and n (flip). So the same (seed, epoch, step) gives the same batch on any backend and
after a resume, and the GPU needs no upload: the CUDA engine's kernel (kernels/augment.cu,
``crop_flip``) hashes the key itself. A RandomCrop directly followed by a RandomHorizontalFlip
in a Compose runs as one launch (with each transform's own key, so the result is the one the two
would give one after the other). On NumPy the CPU engine's window gather runs (cpu/augment.py;
no loop over samples): engine dispatch as for every op (cnn_gpu/functional/_dispatch.py), the
reference (functional/reference.py crop_flip) being the definition all engines match bit for bit.

``Compose(..., device_scalars=True)`` (or ``use_device_scalars()``): on the CUDA engine each launch
reads its two keys from a small device array, uploaded per batch with one asynchronous copy
(cnn_gpu/cuda/scalars.py), instead of from its launch arguments, so a CUDA graph that replays the
augmentation draws each batch anew; the same batches either way.

The DataLoader applies a transform to each training batch with its (epoch, step)
(``DataLoader(..., transform=aug)``); ``cnn-gpu train --augment crop-flip`` builds one (see
:func:`from_name`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backend import get_array_module
from ..cuda.scalars import DeviceScalars, takes_device_scalars
from ..functional import _dispatch, counter_rng
from ..functional._checks import check_float, describe, pair
from ..functional.geometry import CropFlip

PADDING_MODES = ("zeros", "reflect")
#: the names ``from_name`` (and ``cnn-gpu train --augment``) accept
AUGMENTATIONS = ("none", "flip", "crop", "crop-flip")
_DOMAIN = 0x4155474D  # "AUGM": keeps these keys apart from other users of (seed, epoch, step)


def batch_key(seed: int, epoch: int, step: int, index: int = 0) -> int:
    """The 64-bit key of transform ``index`` of a pipeline for batch (seed, epoch, step)."""
    return counter_rng.key(seed, epoch, step, _DOMAIN, index)


class RandomCrop:
    """A random (size) window of each image padded by ``padding`` on every side, with zeros or
    torch's "reflect" padding (torchvision.transforms.RandomCrop for a whole batch)."""

    def __init__(self, size, padding=0, padding_mode: str = "zeros"):
        self.size = pair("size", size, 1)
        self.padding = pair("padding", padding, 0)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode

    def check(self, x) -> None:
        (OH, OW), (PH, PW) = self.size, self.padding
        H, W = int(x.shape[2]), int(x.shape[3])
        if OH > H + 2 * PH or OW > W + 2 * PW:
            raise ValueError(
                f"size: expected a crop within the padded {H + 2 * PH}x{W + 2 * PW} images of x "
                f"({describe(x)}, padding {self.padding}), got {self.size}"
            )
        if self.padding_mode == "reflect" and (PH >= H or PW >= W):
            raise ValueError(f"padding: reflect padding must be smaller than the image ({H}x{W}), got {self.padding}")

    def __call__(self, x, *, seed: int = 0, epoch: int = 0, step: int = 0):
        return Compose([self])(x, seed=seed, epoch=epoch, step=step)

    def config(self) -> dict:
        return {"size": list(self.size), "padding": list(self.padding), "padding_mode": self.padding_mode}

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding}, padding_mode={self.padding_mode!r})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
        self.p = float(p)

    @property
    def threshold(self) -> int:
        """Flip when the top 53 bits of the sample's random word are below this: ceil(p * 2**53)."""
        return int(math.ceil(self.p * 2.0**53))

    def __call__(self, x, *, seed: int = 0, epoch: int = 0, step: int = 0):
        return Compose([self])(x, seed=seed, epoch=epoch, step=step)

    def config(self) -> dict:
        return {"p": self.p}

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _plan(x, crop: RandomCrop | None, flip: RandomHorizontalFlip | None, crop_key: int, flip_key: int) -> CropFlip:
    N, C, H, W = (int(s) for s in x.shape)
    if crop is not None:
        crop.check(x)
    (OH, OW), (PH, PW) = crop.size if crop else (H, W), crop.padding if crop else (0, 0)
    reflect = crop is not None and crop.padding_mode == "reflect"
    return CropFlip(N, C, H, W, OH, OW, PH, PW, int(reflect), crop_key, flip_key, flip.threshold if flip else 0)


class Compose:
    """Transforms applied in order to a batch; a RandomCrop directly followed by a
    RandomHorizontalFlip runs as one gather (one kernel launch on the GPU). ``device_scalars``:
    the keys reach the CUDA kernels through device memory (see the module's docstring)."""

    def __init__(self, transforms: Sequence, *, device_scalars: bool = False):
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):
            if not isinstance(t, (RandomCrop, RandomHorizontalFlip)):
                raise TypeError(f"transforms[{i}]: expected a RandomCrop or RandomHorizontalFlip, got {t!r}")
        self.device_scalars = bool(device_scalars)
        self._keys: dict[int, DeviceScalars] = {}  # launch's first transform -> its keys' device array

    def use_device_scalars(self, enabled: bool = True) -> Compose:
        """Device-scalar mode on (or off): per batch, each launch's (crop_key, flip_key) is uploaded
        (one asynchronous 16-byte copy) to a device array its kernel reads. Returns the Compose."""
        self.device_scalars = bool(enabled)
        return self

    def __call__(self, x, *, seed: int = 0, epoch: int = 0, step: int = 0):
        check_float("x", x, ndim=4)
        ts, i = self.transforms, 0
        while i < len(ts):
            t, nxt = ts[i], ts[i + 1] if i + 1 < len(ts) else None
            first = i
            if isinstance(t, RandomCrop) and isinstance(nxt, RandomHorizontalFlip):
                a = _plan(x, t, nxt, batch_key(seed, epoch, step, i), batch_key(seed, epoch, step, i + 1))
                i += 2
            else:
                k = batch_key(seed, epoch, step, i)
                a = _plan(x, t, None, k, 0) if isinstance(t, RandomCrop) else _plan(x, None, t, 0, k)
                i += 1
            fn = _dispatch.impl("crop_flip", x)
            x = fn(x, a, **self._scalars_kw(fn, x, first, a))
        return x

    def _scalars_kw(self, fn, x, first: int, a: CropFlip) -> dict:
        """``{"device_scalars": array}`` with a's keys uploaded, for the launch of transform
        ``first`` in device-scalar mode on the CUDA engine; else {} (the keys go in ``a``)."""
        if not (self.device_scalars and takes_device_scalars(fn, x)):
            return {}
        if first not in self._keys:
            self._keys[first] = DeviceScalars(get_array_module(x), "crop_flip")
        return {"device_scalars": self._keys[first].upload((a.crop_key, a.flip_key))}

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def from_name(name: str, image_shape: Sequence[int]) -> Any:
    """The augmentation ``name`` (one of AUGMENTATIONS) for images of ``image_shape`` (C, H, W),
    or None for "none". "crop": RandomCrop to the image size with padding max(1, H // 8) (4 for
    32x32 images, as the usual CIFAR-10 recipe); "flip": RandomHorizontalFlip(0.5);
    "crop-flip": both, in one gather."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment: expected one of {AUGMENTATIONS}, got {name!r}")
    H, W = int(image_shape[1]), int(image_shape[2])
    crop = RandomCrop((H, W), padding=(max(1, H // 8), max(1, W // 8)))
    return {
        "none": None,
        "flip": Compose([RandomHorizontalFlip()]),
        "crop": Compose([crop]),
        "crop-flip": Compose([crop, RandomHorizontalFlip()]),
    }[name]


__all__ = ["RandomCrop", "RandomHorizontalFlip", "Compose", "from_name", "batch_key", "AUGMENTATIONS", "PADDING_MODES"]
