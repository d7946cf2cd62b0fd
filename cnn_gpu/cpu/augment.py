"""The CPU engine's random crop + horizontal flip (cnn_gpu.data.augment): whole windows at once.

The reference (functional/reference.py crop_flip) gathers element by element through four index
arrays; here the batch is padded once (zeros or reflect) and each sample's window is taken as a
block from a sliding-window view, one advanced index over the samples, then the flipped samples
are mirrored with a reversed view. The draws are the reference's (crop_flip_draws), and the
values are copies, so the result is the reference's bit for bit.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..functional.reference import crop_flip_draws


def crop_flip(x, a):
    """x (N, C, H, W) -> y (N, C, OH, OW) (a: functional.geometry.CropFlip)."""
    oy, ox, flip = crop_flip_draws(np, a)
    xpad = x
    if a.PH or a.PW:
        xpad = np.pad(x, ((0, 0), (0, 0), (a.PH, a.PH), (a.PW, a.PW)), mode="reflect" if a.reflect else "constant")
    windows = sliding_window_view(xpad, (a.OH, a.OW), axis=(2, 3))  # (N, C, H+2PH-OH+1, W+2PW-OW+1, OH, OW) view
    y = windows[np.arange(a.N), :, oy, ox]  # (N, C, OH, OW): sample n's window at (oy[n], ox[n])
    if a.flip_threshold and flip.any():
        y[flip] = y[flip][..., ::-1]
    return y
