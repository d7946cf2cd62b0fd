"""What a GPU step costs, as the stand-in sees it: launches by kind, host syncs, transfers,
allocations and copies (layout-only copies apart).

CUDA graphs (tests/standin/graph.py): work issued on a capturing stream is recorded, not run, so
it counts in ``captured`` (kind -> count), not as a launch. ``Graph.launch`` is one host launch,
``launches["graph"]``; the work it replays counts apart, in ``graph_kernels`` (kind -> count), so a
budget reads "1 graph launch (K kernels inside)" with K = ``total_graph_kernels``."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

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
    captured: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kind -> recorded
    graph_kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kind -> replayed

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def total_graph_kernels(self) -> int:
        """The launches run inside graph launches (none of them a host launch)."""
        return sum(self.graph_kernels.values())

    def launch(self, kind: str, kernel: str | None = None) -> None:
        devices.machine().touch("launch")
        self.launches[kind] += 1
        if kernel is not None:
            self.kernels[kernel] += 1

    def graph_launch(self, inside: collections.Counter) -> None:
        """One cudaGraphLaunch (one host launch) that runs the launches ``inside`` (kind -> count)."""
        devices.machine().touch("launch")
        self.launches["graph"] += 1
        self.graph_kernels.update(inside)

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
        return {
            "launches": dict(self.launches),
            "total_launches": self.total_launches,
            "syncs": dict(self.syncs),
            "total_syncs": self.total_syncs,
            "uploads": self.uploads,
            "upload_bytes": self.upload_bytes,
            "download_bytes": self.download_bytes,
            "alloc_bytes": self.alloc_bytes,
            "allocations": self.allocations,
            "copy_bytes": self.copy_bytes,
            "layout_copies": self.layout_copies,
            "layout_copy_bytes": self.layout_copy_bytes,
            "kernels": dict(self.kernels),
            "captured": dict(self.captured),
            "graph_kernels": dict(self.graph_kernels),
            "total_graph_kernels": self.total_graph_kernels,
        }


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
