"""The decode cache: image folders decoded once into ``.npy`` arrays, re-opened without decoding.

Where: ``<data folder>/images/<key>/`` (the data folder is ``$CNN_GPU_DATA`` or
``~/.cache/cnn_gpu``: :func:`cnn_gpu.data.datasets.data_dir`), or ``<cache_dir>/<key>/`` when a
``cache_dir`` is given. ``<key>`` is the SHA-256 of the source folder's absolute path, every
image's relative path, size and modification time (ns), and the settings that shape the arrays
(image size, channels, test fraction, seed, format version): touching, adding, removing or renaming
an image makes a new key, so the folder is decoded again (and the stale entry of the same folder
is removed). Each entry holds ``meta.json`` and one ``.npy`` file per array.

Atomic: an entry is written into a temporary folder (``.<key>.<random>.tmp``) next to it, every
file fsynced, ``meta.json`` last, then renamed into place; an interrupted write leaves only a
temporary folder, which is never trusted (and is removed by the next write). An entry is trusted
only when its ``meta.json`` names its key and every array file has the recorded size.

Large arrays: an array file larger than the ``mmap_mb`` setting (``CNN_GPU_MMAP_MB``, default
1024 MiB) is opened with ``np.load(mmap_mode="r")``, a read-only ``np.memmap`` that is read in
batches as training needs it; smaller ones are read into memory. Clear the cache by deleting the
folder, or with :func:`clear_cache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import config

FORMAT_VERSION = 1
META = "meta.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds the cache entries: ``cache_dir``, else ``<data folder>/images``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from .datasets import data_dir  # noqa: PLC0415

    return data_dir() / "images"


def cache_key(doc: dict) -> str:
    """The SHA-256 (hex) of ``doc`` as canonical JSON."""
    text = json.dumps(dict(doc, format=FORMAT_VERSION), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def load_array(path: Path) -> np.ndarray:
    """A cached ``.npy`` array: memory-mapped read-only when the file is larger than ``mmap_mb``."""
    big = path.stat().st_size > config.get().mmap_mb * 2**20
    return np.load(path, mmap_mode="r" if big else None, allow_pickle=False)


def open_entry(root: Path, key: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(meta, {name: array}) of the entry ``key`` under ``root``, or None when there is none that can
    be trusted (missing, another key, a file missing or of another size)."""
    folder = root / key
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("arrays"), dict):
        return None
    arrays = {}
    for name, size in meta["arrays"].items():
        path = folder / f"{name}.npy"
        try:
            if path.stat().st_size != size:
                return None
            arrays[name] = load_array(path)
        except (OSError, ValueError):
            return None
    return meta, arrays


class EntryWriter:
    """A cache entry being written: arrays go into a temporary folder; :meth:`commit` renames it
    into place (see the module docs); a writer that is not committed removes its folder."""

    def __init__(self, root: Path, key: str):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.key = root, key
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
        self.arrays: dict[str, np.ndarray] = {}

    def empty(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A writable array ``name`` backed by its ``.npy`` file (filled by the caller)."""
        out = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape))
        self.arrays[name] = out
        return out

    def save(self, name: str, a: np.ndarray) -> None:
        self.empty(name, a.shape, a.dtype)[...] = a

    def commit(self, meta: dict) -> Path:
        """Flush and fsync every file, write meta.json last, rename the folder into place."""
        sizes = {}
        for name, a in self.arrays.items():
            if isinstance(a, np.memmap):
                a.flush()
            path = self.tmp / f"{name}.npy"
            _fsync(path)
            sizes[name] = path.stat().st_size
        self.arrays.clear()  # the memmaps close when the last view goes
        (self.tmp / META).write_text(json.dumps(dict(meta, key=self.key, arrays=sizes), indent=1, sort_keys=True))
        _fsync(self.tmp / META)
        final = self.root / self.key
        if final.exists():  # another process wrote the same entry meanwhile: keep its
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, final)
        _fsync(self.root)
        return final

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def writing(root: Path, key: str) -> Iterator[EntryWriter]:
    """``with writing(root, key) as w: ...; w.commit(meta)``; on an error the partial entry is removed."""
    w = EntryWriter(root, key)
    try:
        yield w
    finally:
        if w.tmp.exists():
            w.abort()


def discard(root: Path, key: str) -> None:
    """Remove the entry ``key`` (one that could not be trusted), so it can be written again."""
    shutil.rmtree(root / key, ignore_errors=True)


def remove_stale(root: Path, source: str, settings: dict, keep: str) -> list[Path]:
    """Remove the entries of ``source`` (a folder's absolute path) made with the same ``settings``
    other than ``keep`` (made from older files), and temporary folders left over for an hour or
    more; -> the folders removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name == keep or not entry.is_dir():
            continue
        stale = entry.name.endswith(".tmp") and not _recent(entry)
        if not stale:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                meta = json.loads((entry / META).read_text())
                stale = meta.get("source") == source and meta.get("settings") == settings
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every decode-cache entry under the cache folder; -> how many were removed."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return 0
    n = 0
    for entry in root.iterdir():
        if entry.is_dir() and ((entry / META).exists() or entry.name.endswith(".tmp")):
            shutil.rmtree(entry, ignore_errors=True)
            n += 1
    return n


def _recent(path: Path, seconds: float = 3600.0) -> bool:
    """Whether a temporary folder may still be written by a live process (changed in the last hour)."""
    import time  # noqa: PLC0415

    with contextlib.suppress(OSError):
        return time.time() - path.stat().st_mtime < seconds
    return False


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def describe(meta: dict[str, Any]) -> str:
    """'N images, HxW, C channel(s)' of an entry."""
    c, h, w = meta["input_shape"]
    return f"{meta['images']} images, {h}x{w}, {c} channel{'s' if c != 1 else ''}"


__all__ = ["cache_root", "cache_key", "load_array", "open_entry", "writing", "discard", "remove_stale", "clear_cache"]
