"""The model zoo. Every model is a Sequential of ``features`` (conv/pool), ``flatten`` and
``classifier`` (fully connected), so parameters are named like ``features.0.weight``."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .nn import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential
from .random import resolve_generator


def _net(features, classifier) -> Sequential:
    return Sequential(OrderedDict(features=Sequential(*features), flatten=Flatten(), classifier=Sequential(*classifier)))


def lenet5(in_channels=1, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """LeNet-5 for 1x28x28 inputs: conv5x5(6, pad 2) ReLU pool2, conv5x5(16) ReLU pool2, 400-120-84-classes."""
    g = dict(dtype=dtype, generator=resolve_generator(generator))  # one stream for all layers
    return _net(
        [Conv2d(in_channels, 6, 5, padding=2, **g), ReLU(), MaxPool2d(2),
         Conv2d(6, 16, 5, **g), ReLU(), MaxPool2d(2)],
        [Linear(16 * 5 * 5, 120, **g), ReLU(), Linear(120, 84, **g), ReLU(), Linear(84, num_classes, **g)],
    )


def vgg_small(in_channels=3, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """A small VGG for 3x32x32 inputs: (conv3x3 32, ReLU) x2, pool2, (conv3x3 64, ReLU) x2, pool2, 4096-256-classes."""
    g = dict(dtype=dtype, generator=resolve_generator(generator))  # one stream for all layers
    return _net(
        [Conv2d(in_channels, 32, 3, padding=1, **g), ReLU(), Conv2d(32, 32, 3, padding=1, **g), ReLU(), MaxPool2d(2),
         Conv2d(32, 64, 3, padding=1, **g), ReLU(), Conv2d(64, 64, 3, padding=1, **g), ReLU(), MaxPool2d(2)],
        [Linear(64 * 8 * 8, 256, **g), ReLU(), Linear(256, num_classes, **g)],
    )


def lenet_digits(in_channels=1, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """A LeNet-style CNN for the bundled 1x8x8 digits: (conv3x3 32, pad 1, ReLU) x2, pool2,
    conv3x3(64, pad 1) ReLU pool2, dropout 0.3, 256-128, dropout 0.3, 128-classes."""
    g = dict(dtype=dtype, generator=resolve_generator(generator))  # one stream for all layers
    return _net(
        [Conv2d(in_channels, 32, 3, padding=1, **g), ReLU(), Conv2d(32, 32, 3, padding=1, **g), ReLU(), MaxPool2d(2),
         Conv2d(32, 64, 3, padding=1, **g), ReLU(), MaxPool2d(2)],
        [Dropout(0.3, generator=g["generator"]), Linear(64 * 2 * 2, 128, **g), ReLU(),
         Dropout(0.3, generator=g["generator"]), Linear(128, num_classes, **g)],
    )


MODELS = {
    "lenet5": (lenet5, (1, 28, 28)),
    "vgg_small": (vgg_small, (3, 32, 32)),
    "lenet_digits": (lenet_digits, (1, 8, 8)),
}


def get_model(name: str, in_channels: int, num_classes: int, **kwargs) -> Sequential:
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name][0](in_channels=in_channels, num_classes=num_classes, **kwargs)
