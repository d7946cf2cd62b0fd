"""The CPU engine: the reference's math arranged for a CPU (NumPy arrays only).

Convolutions run channels-last in cache-sized chunks over the cores (conv.py), pools are
branch-free passes over tap views (pool.py), fully connected layers and ReLU split their work
over the cores (linear.py, elementwise.py), all with the engine's own threads while BLAS is
held to one thread (parallel.py). A ReLU after a convolution or a fully connected layer runs
inside it (``activation="relu"``): in place on each chunk of the output, and as a mask on
each chunk of the gradient; a ReLU followed by a max pool runs after the pool instead (the
same numbers, on a 4x smaller array). Batch normalisation reduces the channels-last memory
as an (N*H*W, C) matrix (norm.py); adaptive average pooling returns its gradient in the
input's layout (adaptive_pool.py). Ops this engine does not list run the reference.
"""

from .adaptive_pool import adaptive_avg_pool2d_backward, adaptive_avg_pool2d_forward
from .augment import crop_flip
from .conv import conv2d_backward, conv2d_forward
from .elementwise import add_backward, add_forward, relu_backward, relu_forward
from .linear import linear_backward, linear_forward
from .norm import batch_norm_backward, batch_norm_forward
from .pool import avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward, max_pool2d_forward

NAME = "cpu"
#: activations a layer can run inside the layer before it (see nn.module.plan)
FUSED_ACTIVATIONS = ("relu",)
#: a ReLU before a max pool runs after it, on the 4x smaller pooled array (see nn.module.plan)
POOL_BEFORE_ACTIVATION = True

__all__ = [
    "NAME",
    "FUSED_ACTIVATIONS",
    "POOL_BEFORE_ACTIVATION",
    "conv2d_forward",
    "conv2d_backward",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "linear_forward",
    "linear_backward",
    "relu_forward",
    "relu_backward",
    "add_forward",
    "add_backward",
    "crop_flip",
    "batch_norm_forward",
    "batch_norm_backward",
    "adaptive_avg_pool2d_forward",
    "adaptive_avg_pool2d_backward",
]
