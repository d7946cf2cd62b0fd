"""Reading cnn_gpu's ``.npz`` files defensively, one member at a time.

A model file or checkpoint may be truncated, corrupted or crafted. This reader opens the zip's
directory only; a member is read when asked for, after its ``.npy`` header (shape, dtype) has been
checked against what the caller expects and against the size the zip declares for it, so a
member that claims more bytes than its array needs (a compression bomb) or an array of another
shape is refused before anything is decompressed. Members the caller does not ask for are never
decompressed. Every failure is a ValueError naming the file and the member.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

MAX_HEADER_BYTES = 4 << 20  # the JSON header of a model or checkpoint is a few KiB
# cnn_gpu writes uncompressed (stored) archives; a compressed member may shrink at most this much
# once the archive's arrays exceed BOMB_MIN_BYTES (deflate tops out near 1032:1)
MAX_RATIO = 100
BOMB_MIN_BYTES = 16 << 20
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError, NotImplementedError, RuntimeError)


class Archive:
    """``with Archive(path) as a:`` ``a.names``, ``a.info(name) -> (shape, dtype)``, ``a.read(name)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise
        except _READ_ERRORS as exc:
            raise self.error(f"not a zip archive ({type(exc).__name__}: {exc})") from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            if not info.filename.endswith(".npy") or info.filename[:-4] in self._members:
                self._zip.close()
                raise self.error(f"member {info.filename!r}: expected unique NAME.npy array members")
            self._members[info.filename[:-4]] = info
        self._info: dict[str, tuple[tuple, np.dtype]] = {}  # each member's header, read once
        self._check_ratio()

    def error(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not a readable cnn_gpu file (truncated or corrupted?): {what}")

    def _check_ratio(self) -> None:
        declared = sum(i.file_size for i in self._members.values())
        packed = sum(i.compress_size for i in self._members.values())
        if declared > BOMB_MIN_BYTES and declared > MAX_RATIO * max(packed, 1):
            self._zip.close()
            raise self.error(
                f"its members declare {declared:,} bytes from {packed:,} compressed "
                f"(over {MAX_RATIO}:1; cnn_gpu writes uncompressed archives)"
            )

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self._zip.close()

    @property
    def names(self) -> list[str]:
        return list(self._members)

    def info(self, name: str) -> tuple[tuple, np.dtype]:
        """(shape, dtype) from the member's .npy header, checked against its declared size."""
        if name not in self._info:
            self._info[name] = self._read_info(name)
        return self._info[name]

    def _read_info(self, name: str) -> tuple[tuple, np.dtype]:
        member = self._members[name]
        try:
            with self._zip.open(member) as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = reader(f)
                offset = f.tell()
        except _READ_ERRORS as exc:
            raise self.error(f"member {name!r}: {type(exc).__name__}: {exc}") from None
        if dtype.hasobject or dtype.kind not in "biuf":
            raise self.error(f"member {name!r}: expected a numeric array, got dtype {dtype}")
        need = offset + math.prod(shape) * dtype.itemsize
        if member.file_size != need:
            raise self.error(
                f"member {name!r}: declares {member.file_size:,} bytes, but its array {tuple(shape)} {dtype} takes {need:,}"
            )
        return tuple(shape), dtype

    def read(self, name: str, shape: tuple | None = None, dtype=None, max_bytes: int | None = None) -> np.ndarray:
        """The member's array, after checking its header against ``shape``/``dtype``/``max_bytes``."""
        if name not in self._members:
            raise ValueError(f"{self.path}: member {name!r}: missing")
        got_shape, got_dtype = self.info(name)
        if shape is not None and got_shape != tuple(shape):
            raise ValueError(f"{self.path}: member {name!r}: expected shape {tuple(shape)}, got {got_shape}")
        if dtype is not None and got_dtype != np.dtype(dtype):
            raise ValueError(f"{self.path}: member {name!r}: expected dtype {np.dtype(dtype)}, got {got_dtype}")
        if max_bytes is not None and self._members[name].file_size > max_bytes:
            raise ValueError(
                f"{self.path}: member {name!r}: expected at most {max_bytes:,} bytes, got {self._members[name].file_size:,}"
            )
        try:
            with self._zip.open(self._members[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except _READ_ERRORS as exc:
            raise self.error(f"member {name!r}: {type(exc).__name__}: {exc}") from None


__all__ = ["Archive", "MAX_HEADER_BYTES", "MAX_RATIO"]
