"""Layers and containers: thin wrappers over cnn_gpu.functional."""

from .layers import (
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Sigmoid,
    Tanh,
    kaiming_normal,
)
from .module import InputSpec, LayerDtypeError, LayerInputError, Module, Parameter, Sequential

# Every layer type that cnn_gpu.load can rebuild from a saved architecture.
LAYER_TYPES = {
    cls.__name__: cls
    for cls in (
        Conv2d,
        Linear,
        MaxPool2d,
        AvgPool2d,
        ReLU,
        LeakyReLU,
        Sigmoid,
        Tanh,
        Flatten,
        Dropout,
        Sequential,
        BatchNorm1d,
        BatchNorm2d,
        GELU,
        AdaptiveAvgPool2d,
        Residual,
    )
}

__all__ = [
    "Module",
    "Parameter",
    "Sequential",
    "LayerInputError",
    "LayerDtypeError",
    "InputSpec",
    "Conv2d",
    "Linear",
    "MaxPool2d",
    "AvgPool2d",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "Flatten",
    "Dropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "GELU",
    "AdaptiveAvgPool2d",
    "Residual",
    "CrossEntropyLoss",
    "kaiming_normal",
    "LAYER_TYPES",
]
