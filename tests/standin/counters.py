"""What a GPU step costs, as the stand-in sees it: launches by kind, host syncs, transfers,
allocations and copies (layout-only copies apart)."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Iterator

from . import devices


@dataclasses.dataclass
class Counters:
    launches: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kind -> count
    kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # our kernel names
    syncs: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # why -> count
    uploads: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0
    alloc_bytes: int = 0
    allocations: int = 0
    copy_bytes: int = 0
    layout_copies: int = 0
    layout_copy_bytes: int = 0
    layout_copy_sites: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def launch(self, kind: str, kernel: str | None = None) -> None:
        devices.machine().touch("launch")
        self.launches[kind] += 1
        if kernel is not None:
            self.kernels[kernel] += 1

    def sync(self, why: str, nbytes: int = 0) -> None:
        self.syncs[why] += 1
        self.download_bytes += nbytes

    def upload(self, nbytes: int) -> None:
        self.uploads += 1
        self.upload_bytes += nbytes

    def alloc(self, nbytes: int) -> None:
        devices.machine().touch("alloc")
        self.allocations += 1
        self.alloc_bytes += nbytes

    def copy(self, nbytes: int, layout: bool, site: str = "") -> None:
        self.copy_bytes += nbytes
        if layout:
            self.layout_copies += 1
            self.layout_copy_bytes += nbytes
            self.layout_copy_sites[site] += 1

    def summary(self) -> dict:
        return {"launches": dict(self.launches), "total_launches": self.total_launches,
                "syncs": dict(self.syncs), "total_syncs": self.total_syncs, "uploads": self.uploads,
                "upload_bytes": self.upload_bytes, "download_bytes": self.download_bytes,
                "alloc_bytes": self.alloc_bytes, "allocations": self.allocations, "copy_bytes": self.copy_bytes,
                "layout_copies": self.layout_copies, "layout_copy_bytes": self.layout_copy_bytes,
                "kernels": dict(self.kernels)}


_current = [Counters()]


def current() -> Counters:
    return _current[0]


@contextlib.contextmanager
def counting() -> Iterator[Counters]:
    """Count what runs inside the block in a fresh Counters."""
    before = _current[0]
    _current[0] = Counters()
    try:
        yield _current[0]
    finally:
        _current[0] = before
