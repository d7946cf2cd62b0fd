"""``cupy.cuda.nccl`` in the stand-in: one process plays every rank of a communicator whose ranks
all hold the same values (so an allreduce with NCCL_SUM multiplies by the rank count, NCCL_AVG and
a broadcast leave the buffer as it is), and every call is logged.

Its strictness is CuPy 14's, read from the installed CuPy's compiled NCCL module (the signatures
Cython embeds there; the module itself needs libnccl to import): ``get_unique_id()`` returns
``bytes`` of NCCL_UNIQUE_ID_BYTES (128, nccl.h); ``NcclCommunicator(int ndev, bytes commId, int
rank, ...)`` refuses anything but bytes of that length, and every pointer, count and enum argument
must be an int, as Cython's ``intptr_t`` / ``size_t`` / ``int`` conversions require. The enum
values are nccl.h's.

NCCL collectives can be captured: on a capturing stream (the ``stream`` handle) a collective is
logged when called and recorded into the CUDA graph, which runs it at each replay
(tests/standin/graph.py)."""

from __future__ import annotations

import ctypes
import os

import numpy as np

from . import graph, surface

_MODULE = "cupy_backends.cuda.libs.nccl"
NCCL_UNIQUE_ID_BYTES = 128  # nccl.h
NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4
_CTYPES = {
    NCCL_FLOAT16: np.float16,
    NCCL_FLOAT32: np.float32,
    NCCL_FLOAT64: np.float64,
    NCCL_INT32: np.int32,
    NCCL_INT64: np.int64,
}
available = True
log: list = []  # every call: (name, args...)


class NcclError(RuntimeError):
    pass


def _check(qualname: str, args: tuple) -> None:
    """Refuse what CuPy's Cython signature of ``qualname`` refuses (types and count)."""
    params = surface.compiled_signature(_MODULE, qualname)
    if params is None:
        raise AssertionError(f"the installed CuPy's NCCL module has no embedded signature for {qualname}")
    required = [p for p in params if not p[2]]
    if not len(required) <= len(args) <= len(params):
        raise TypeError(f"{qualname}() takes {len(required)} to {len(params)} arguments ({len(args)} given)")
    for (ctype, name, _), value in zip(params, args):
        if ctype == "bytes" and not isinstance(value, bytes):
            raise TypeError(f"Argument '{name}' has incorrect type (expected bytes, got {type(value).__name__})")
        if ctype in ("int", "intptr_t", "size_t") and not isinstance(value, (int, np.integer)):
            raise TypeError(f"an integer is required for '{name}' ({ctype}), got {type(value).__name__}")


def get_unique_id() -> bytes:
    _check("get_unique_id", ())
    log.append(("get_unique_id",))
    return os.urandom(NCCL_UNIQUE_ID_BYTES)


def _buffer(ptr: int, count: int, datatype: int) -> np.ndarray:
    """The ``count`` values of ``datatype`` at device address ``ptr`` (the stand-in's arrays live in
    host memory, so the address is a NumPy buffer's)."""
    dtype = np.dtype(_CTYPES[datatype])
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype)


class NcclCommunicator:
    __module__ = _MODULE

    def __init__(self, ndev, commId, rank, config=None):
        _check("NcclCommunicator", (ndev, commId, rank) + (() if config is None else (config,)))
        if len(commId) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"commId: expected {NCCL_UNIQUE_ID_BYTES} bytes (ncclUniqueId), got {len(commId)}")
        if not 0 <= rank < ndev:
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: invalid rank")
        self.ndev, self.rank_, self.aborted = int(ndev), int(rank), False
        log.append(("NcclCommunicator", ndev, rank))

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        _check("NcclCommunicator.allReduce", (sendbuf, recvbuf, count, datatype, op, stream))
        log.append(("allReduce", sendbuf, recvbuf, count, datatype, op, stream))
        if op not in (NCCL_SUM, NCCL_AVG):
            raise AssertionError(f"the stand-in simulates NCCL_SUM and NCCL_AVG, got op {op}")
        src, dst = _buffer(sendbuf, count, datatype), _buffer(recvbuf, count, datatype)
        scale = src.dtype.type(self.ndev if op == NCCL_SUM else 1)

        def run():
            dst[...] = src * scale if op == NCCL_SUM else src

        graph.launch("nccl", run, inplace=True, stream=stream)

    def bcast(self, buff, count, datatype, root, stream):
        _check("NcclCommunicator.bcast", (buff, count, datatype, root, stream))
        log.append(("bcast", buff, count, datatype, root, stream))
        graph.launch("nccl", lambda: None, inplace=True, stream=stream)  # every rank holds the root's values

    def abort(self):
        log.append(("abort",))
        self.aborted = True


def members() -> dict:
    return {
        "available": available,
        "log": log,
        "get_unique_id": get_unique_id,
        "NcclCommunicator": NcclCommunicator,
        "NcclError": NcclError,
        **{k: v for k, v in globals().items() if k.startswith("NCCL_") and k != "NCCL_UNIQUE_ID_BYTES"},
    }
