"""cnn_gpu: a from-scratch CNN training library with hand-written backprop on NumPy or CuPy."""

from . import (
    config,
    cpu,
    functional,
    models,
    nn,
    onnx,  # ONNX export; imports the onnx package only when exporting
    optim,
    textbook,
)
from .backend import (
    BackendUnavailableError,
    asarray,
    cupy_available,
    current_backend,
    from_dlpack,
    get_array_module,
    set_backend,
    to_numpy,
    use_backend,
)
from .cuda import ops as _cuda_ops  # (also binds cnn_gpu.cuda)
from .functional import _dispatch
from .random import manual_seed
from .serialization import load, save
from .workspace import Workspace, get_workspace_limit, set_workspace_limit, use_workspace_limit

__version__ = "0.1.0"

_dispatch.register(cpu)  # the engines behind cnn_gpu.functional (the reference is built in)
_dispatch.register(_cuda_ops)

__all__ = [
    "config",
    "functional",
    "nn",
    "optim",
    "models",
    "textbook",
    "use_backend",
    "set_backend",
    "current_backend",
    "get_array_module",
    "to_numpy",
    "asarray",
    "from_dlpack",
    "onnx",
    "cupy_available",
    "BackendUnavailableError",
    "manual_seed",
    "save",
    "load",
    "Workspace",
    "set_workspace_limit",
    "get_workspace_limit",
    "use_workspace_limit",
]
