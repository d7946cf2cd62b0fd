"""The model zoo. Every model is a Sequential of ``features`` (conv/pool), ``flatten`` and
``classifier`` (fully connected), so parameters are named like ``features.0.weight``.
The ResNets' residual blocks are ``Residual`` modules inside ``features``
(``features.3.body.0.weight``, ``features.9.shortcut.1.running_mean``)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .nn import (
    AdaptiveAvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
)
from .nn.module import InputSpec
from .random import resolve_generator


def _net(features, classifier, spec: InputSpec | None = None) -> Sequential:
    """features + flatten + classifier; ``spec`` (what the model takes) is kept for error messages."""
    net = Sequential(OrderedDict(features=Sequential(*features), flatten=Flatten(), classifier=Sequential(*classifier)))
    object.__setattr__(net, "input_spec", spec)
    return net


def lenet5(in_channels=1, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """LeNet-5 for 1x28x28 inputs: conv5x5(6, pad 2) ReLU pool2, conv5x5(16) ReLU pool2, 400-120-84-classes."""
    g = dict(dtype=dtype, generator=resolve_generator(generator))  # one stream for all layers
    return _net(
        [Conv2d(in_channels, 6, 5, padding=2, **g), ReLU(), MaxPool2d(2), Conv2d(6, 16, 5, **g), ReLU(), MaxPool2d(2)],
        [Linear(16 * 5 * 5, 120, **g), ReLU(), Linear(120, 84, **g), ReLU(), Linear(84, num_classes, **g)],
        InputSpec("lenet5", (in_channels, 28, 28)),
    )


def vgg_small(in_channels=3, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """A small VGG for 3x32x32 inputs: (conv3x3 32, ReLU) x2, pool2, (conv3x3 64, ReLU) x2, pool2, 4096-256-classes."""
    g = dict(dtype=dtype, generator=resolve_generator(generator))  # one stream for all layers
    return _net(
        [
            Conv2d(in_channels, 32, 3, padding=1, **g),
            ReLU(),
            Conv2d(32, 32, 3, padding=1, **g),
            ReLU(),
            MaxPool2d(2),
            Conv2d(32, 64, 3, padding=1, **g),
            ReLU(),
            Conv2d(64, 64, 3, padding=1, **g),
            ReLU(),
            MaxPool2d(2),
        ],
        [Linear(64 * 8 * 8, 256, **g), ReLU(), Linear(256, num_classes, **g)],
        InputSpec("vgg_small", (in_channels, 32, 32)),
    )


def lenet_digits(in_channels=1, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """A LeNet-style CNN for the bundled 1x8x8 digits: (conv3x3 32, pad 1, ReLU) x2, pool2,
    conv3x3(64, pad 1) ReLU pool2, dropout 0.3, 256-128, dropout 0.3, 128-classes."""
    g = dict(dtype=dtype, generator=resolve_generator(generator))  # one stream for all layers
    return _net(
        [
            Conv2d(in_channels, 32, 3, padding=1, **g),
            ReLU(),
            Conv2d(32, 32, 3, padding=1, **g),
            ReLU(),
            MaxPool2d(2),
            Conv2d(32, 64, 3, padding=1, **g),
            ReLU(),
            MaxPool2d(2),
        ],
        [
            Dropout(0.3, generator=g["generator"]),
            Linear(64 * 2 * 2, 128, **g),
            ReLU(),
            Dropout(0.3, generator=g["generator"]),
            Linear(128, num_classes, **g),
        ],
        InputSpec("lenet_digits", (in_channels, 8, 8)),
    )


def _basic_block(c_in, c_out, stride, g) -> list:
    """He et al.'s basic block: Residual(conv3x3 BN ReLU conv3x3 BN, shortcut), then ReLU. The shortcut is
    the identity, or a 1x1 convolution + BN (a projection) where the stride or the width changes."""
    body = Sequential(
        Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False, **g),
        BatchNorm2d(c_out, dtype=g["dtype"]),
        ReLU(),
        Conv2d(c_out, c_out, 3, padding=1, bias=False, **g),
        BatchNorm2d(c_out, dtype=g["dtype"]),
    )
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = Sequential(Conv2d(c_in, c_out, 1, stride=stride, bias=False, **g), BatchNorm2d(c_out, dtype=g["dtype"]))
    return [Residual(body, shortcut), ReLU()]


def resnet(depth=20, in_channels=3, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """The CIFAR ResNets of He et al. 2016 (section 4.2), depth = 6n + 2: conv3x3 16 + BN + ReLU, three stages
    of n basic blocks with 16, 32 and 64 channels (the 2nd and 3rd start with stride 2 and a 1x1 conv + BN
    projection shortcut), global average pooling, a fully connected layer. Convolutions have no bias (BN follows)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth: expected 6n + 2 for n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}")
    n = (depth - 2) // 6
    g = dict(dtype=dtype, generator=resolve_generator(generator))  # one stream for all layers
    features = [Conv2d(in_channels, 16, 3, padding=1, bias=False, **g), BatchNorm2d(16, dtype=dtype), ReLU()]
    c_in = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            features += _basic_block(c_in, width, 2 if stage > 0 and i == 0 else 1, g)
            c_in = width
    features.append(AdaptiveAvgPool2d(1))  # (N, 64, 1, 1): global average pooling
    return _net(features, [Linear(64, num_classes, **g)], InputSpec(f"resnet{depth}", (in_channels, 32, 32), 8))


def resnet20(in_channels=3, num_classes=10, dtype=np.float32, generator=None) -> Sequential:
    """ResNet-20 for 3x32x32 inputs (CIFAR-10): resnet(20), about 0.27 M parameters."""
    return resnet(20, in_channels, num_classes, dtype, generator)


MODELS = {
    "lenet5": (lenet5, (1, 28, 28)),
    "vgg_small": (vgg_small, (3, 32, 32)),
    "lenet_digits": (lenet_digits, (1, 8, 8)),
    "resnet20": (resnet20, (3, 32, 32)),
}
#: The models that end in global average pooling take any image of at least this size (MODELS
#: gives the one they were designed for); the others only their own.
ANY_SIZE_FROM = {"resnet20": 8}


def accepts_size(name: str, hw) -> bool:
    """Whether model ``name`` takes images of (H, W) ``hw``."""
    H, W = (int(v) for v in hw)
    if name in ANY_SIZE_FROM:
        return min(H, W) >= ANY_SIZE_FROM[name]
    return tuple(MODELS[name][1][1:]) == (H, W)


def get_model(name: str, in_channels: int, num_classes: int, **kwargs) -> Sequential:
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name][0](in_channels=in_channels, num_classes=num_classes, **kwargs)
