"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one ``.npz`` archive (readable with ``numpy.load(path, allow_pickle=False)``),
written atomically (temporary file in the same folder, fsync, rename: a crash mid-write leaves
the previous checkpoint intact):

- ``model/<parameter name>``: the weights, in the model's dtype;
- ``optim/<parameter name>/<buffer>``: the optimizer's state (``exp_avg``, ``momentum_buffer``, ...);
- ``__cnn_gpu__``: a uint8 array of UTF-8 JSON::

    {"format": "cnn_gpu.checkpoint", "version": 1,
     "architecture": ..., "dtype": "float32",          # as in a model file (cnn_gpu.save)
     "position": {"epoch": completed epochs, "step": batches done in the next one,
                  "loss_sum", "correct", "seen", "seconds": that epoch's partial sums},
     "global_step": optimizer steps taken,
     "optimizer": {"type": "Adam", "step": t, "hyper": {...}} (+ "loss_scaler": {"scale", "growth_tracker", ...}: fp16),
     "schedule": {"type": "OneCycleLR", "last_step": ..., "base_lr": ...} or null,
     "rng": {"loader": {"seed", "shuffle", "batch_size", "num_examples", "steps_per_epoch"},
             "dropout": {module name: {"seed", "calls"}},
             "generator": the state of cnn_gpu's default NumPy generator},
     "config": {the run's settings}, "metadata": {dataset, normalisation, ...},
     "extra": {e.g. the best validation accuracy so far},
     "sha256": hash of every array above (names, dtypes, shapes and bytes)}

The DataLoader's order depends only on (seed, epoch) and a Dropout layer's masks only on
(seed, calls), so these few numbers restore every random stream. Loading checks the format,
version and checksum (a truncated or corrupted file is a ``ValueError`` naming it), and
:func:`restore` checks that the architecture matches the model it is loaded into.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

from .archive import Archive
from .backend import to_numpy
from .io import atomic_write
from .nn import Dropout, Module
from .optim import LRSchedule, Optimizer
from .random import default_generator
from .serialization import (
    HEADER_KEY,
    build_checked,
    check_header,
    check_header_size,
    check_savable,
    describe,
    encode_header,
    field_error,
    model_dtype,
    parameter_shapes,
    read_weights,
)
from .serialization import read_header as _read_header
from .train import Position

FORMAT = "cnn_gpu.checkpoint"
VERSION = 1
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the JSON header and the arrays (NumPy, on the host)."""

    path: str
    header: dict
    arrays: dict

    @property
    def position(self) -> Position:
        return Position.from_dict(self.header["position"])

    @property
    def config(self) -> dict:
        return self.header.get("config", {})

    @property
    def metadata(self) -> dict:
        return self.header.get("metadata", {})

    @property
    def extra(self) -> dict:
        return self.header.get("extra", {})

    def model_state(self) -> dict:
        return {k[len(MODEL_PREFIX) :]: v for k, v in self.arrays.items() if k.startswith(MODEL_PREFIX)}

    def optimizer_state(self) -> dict | None:
        meta = self.header.get("optimizer")
        if meta is None:
            return None
        state: dict[str, dict] = {}
        for key, value in self.arrays.items():
            if key.startswith(OPTIM_PREFIX):
                name, buf = key[len(OPTIM_PREFIX) :].rsplit("/", 1)
                state.setdefault(name, {})[buf] = value
        return {
            "type": meta["type"],
            "step": meta["step"],
            "hyper": meta["hyper"],
            "state": state,
            "loss_scaler": meta.get("loss_scaler"),
        }

    def build_model(self, backend: str | None = None) -> Module:
        """A model of the saved architecture holding the saved weights."""
        # the architecture was checked by load_checkpoint
        model = build_checked(self.header["architecture"], np.dtype(self.header["dtype"]), self.path)
        if backend is not None:
            model.to(backend)
        _load_weights(model, self)
        _restore_dropout(model, self)
        return model


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def dropout_states(model: Module) -> dict:
    return {name: {"seed": int(m.seed), "calls": int(m.calls)} for name, m in model.named_modules() if isinstance(m, Dropout)}


def _restore_dropout(model: Module, ckpt: Checkpoint) -> None:
    saved = ckpt.header.get("rng", {}).get("dropout", {})
    for name, m in model.named_modules():
        if isinstance(m, Dropout) and name in saved:
            m.seed, m.calls = int(saved[name]["seed"]), int(saved[name]["calls"])


def _load_weights(model: Module, ckpt: Checkpoint) -> None:
    try:
        model.load_state_dict(ckpt.model_state())
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{ckpt.path}: weights do not match the saved architecture: {exc}") from None


def save_checkpoint(
    path: str | os.PathLike,
    model: Module,
    optimizer: Optimizer | None = None,
    scheduler: LRSchedule | None = None,
    *,
    position: Position,
    loader: Any = None,
    config: dict | None = None,
    metadata: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write a checkpoint to ``path`` atomically (see the module docs for the layout); one that
    :func:`load_checkpoint` would refuse (the model files' limits) is a ValueError, nothing written."""
    check_savable(model, path)
    arrays: dict[str, np.ndarray] = {}
    for name, a in model.state_dict().items():
        arrays[MODEL_PREFIX + name] = np.array(to_numpy(a), copy=True)
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for name, bufs in sd["state"].items():
            for buf, value in bufs.items():
                arrays[f"{OPTIM_PREFIX}{name}/{buf}"] = value
        opt_meta = {"type": sd["type"], "step": sd["step"], "hyper": sd["hyper"]}
        if sd.get("loss_scaler") is not None:  # float16 training's loss scale (cnn_gpu/precision.py)
            opt_meta["loss_scaler"] = sd["loss_scaler"]
    loader_meta = None
    if loader is not None:
        loader_meta = {
            "seed": loader.seed,
            "shuffle": loader.shuffle,
            "batch_size": loader.batch_size,
            "num_examples": loader.num_examples,
            "steps_per_epoch": len(loader),
        }
    header = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": describe(model),
        "dtype": str(model_dtype(model)),
        "position": position.as_dict(),
        "global_step": optimizer.step_count if optimizer is not None else None,
        "optimizer": opt_meta,
        "schedule": scheduler.state_dict() if scheduler is not None else None,
        "rng": {"loader": loader_meta, "dropout": dropout_states(model), "generator": default_generator().bit_generator.state},
        "config": config or {},
        "metadata": metadata or {},
        "extra": extra or {},
        "sha256": _digest(arrays),
    }
    arrays[HEADER_KEY] = encode_header(header)
    check_header_size(arrays[HEADER_KEY], path)
    with atomic_write(path) as f:
        np.savez(f, allow_pickle=False, **arrays)  # numbers only (the header too: JSON bytes)


def _check_checkpoint_header(h: dict, path: Any) -> None:
    """The checkpoint's own fields (types and ranges), before any array is read."""

    def need(key, ok, expected, where=None):
        if not ok:
            raise field_error(path, where or key, expected, h.get(key) if where is None else None)

    for key in ("position", "rng", "config", "extra"):
        need(key, isinstance(h.get(key, {}), dict), "a JSON object")
    pos = h["position"]  # present (load_checkpoint) and an object (above)
    for key in ("epoch", "step", "correct", "seen"):
        v = pos.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 2**53:
            raise field_error(path, f"position.{key}", "a non-negative int", v)
    for key in ("loss_sum", "seconds"):
        v = pos.get(key, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise field_error(path, f"position.{key}", "a number", v)
    opt = h.get("optimizer")
    if opt is not None and not (
        isinstance(opt, dict)
        and isinstance(opt.get("type"), str)
        and isinstance(opt.get("step"), int)
        and isinstance(opt.get("hyper"), dict)
    ):
        raise field_error(path, "optimizer", "null or {type: str, step: int, hyper: {...}}", opt)
    if h.get("schedule") is not None and not isinstance(h.get("schedule"), dict):
        raise field_error(path, "schedule", "null or a JSON object", h.get("schedule"))
    sha = h.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise field_error(path, "sha256", "a hex SHA-256 digest", sha)


def _read_optimizer_state(archive: Archive, shapes: dict, dtype: str) -> dict:
    """optim/<parameter>/<buffer> members: each of its parameter's shape and the model's dtype."""
    arrays = {}
    for member in archive.names:
        if not member.startswith(OPTIM_PREFIX):
            continue
        name, _, buf = member[len(OPTIM_PREFIX) :].rpartition("/")
        if name not in shapes or not buf.isidentifier():
            raise ValueError(f"{archive.path}: member {member!r}: expected optim/<parameter name>/<buffer>")
        arrays[member] = archive.read(member, shapes[name], dtype)
    return arrays


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint (header fields, array shapes, checksum); nothing is built yet.
    Only the members the header implies are read, each after its declared shape and size are checked."""
    with Archive(path) as archive:
        header = _read_header(archive)
        check_header(header, path, FORMAT, VERSION, "checkpoint")
        missing = [k for k in ("architecture", "position", "sha256") if k not in header]  # dtype: check_header
        if missing:
            raise ValueError(f"{path}: the checkpoint header lacks {missing} (truncated or corrupted?)")
        _check_checkpoint_header(header, path)
        shapes = parameter_shapes(header["architecture"], path)
        others = [n for n in archive.names if n != HEADER_KEY and not n.startswith((MODEL_PREFIX, OPTIM_PREFIX))]
        if others:
            raise ValueError(f"{path}: unexpected members {sorted(others)[:10]} (expected model/..., optim/...)")
        weights = read_weights(archive, shapes, header["dtype"], MODEL_PREFIX)
        arrays = {MODEL_PREFIX + n: a for n, a in weights.items()}
        arrays.update(_read_optimizer_state(archive, shapes, header["dtype"]))
    if _digest(arrays) != header["sha256"]:
        raise ValueError(f"{path}: checksum mismatch: the checkpoint's arrays are corrupted")
    return Checkpoint(str(path), header, arrays)


def _arch_summary(desc: dict) -> str:
    if desc.get("type") == "Sequential":
        return "[" + ", ".join(_arch_summary(c) for _, c in desc.get("children", [])) + "]"
    if desc.get("type") == "Residual":
        shortcut = desc.get("shortcut")
        return f"Residual({_arch_summary(desc.get('body', {}))}, {_arch_summary(shortcut) if shortcut else 'identity'})"
    cfg = desc.get("config", {})
    return desc.get("type", "?") + ("(" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + ")" if cfg else "")


def restore(
    ckpt: Checkpoint, model: Module, optimizer: Optimizer | None = None, scheduler: LRSchedule | None = None, loader: Any = None
) -> Position:
    """Load weights, optimizer, schedule and RNG state into freshly built objects; -> the position.

    The model must have the checkpoint's architecture and dtype, and ``loader`` (if given) the
    same number of examples and batches; otherwise a ValueError says what differs.
    """
    own = describe(model)
    if own != ckpt.header["architecture"]:
        raise ValueError(
            f"{ckpt.path}: checkpoint of another architecture: expected (the model) {_arch_summary(own)}, "
            f"got (the file) {_arch_summary(ckpt.header['architecture'])}"
        )
    if str(model_dtype(model)) != ckpt.header["dtype"]:
        raise ValueError(f"{ckpt.path}: expected a {model_dtype(model)} checkpoint for this model, got {ckpt.header['dtype']}")
    saved_loader = ckpt.header.get("rng", {}).get("loader")
    if loader is not None and saved_loader is not None:
        now = {"num_examples": loader.num_examples, "steps_per_epoch": len(loader), "batch_size": loader.batch_size}
        then = {k: saved_loader[k] for k in now}
        if now != then:
            raise ValueError(f"{ckpt.path}: the training data differ from the checkpoint's: expected {then}, got {now}")
        loader.seed, loader.shuffle = int(saved_loader["seed"]), bool(saved_loader["shuffle"])
    _load_weights(model, ckpt)
    _restore_dropout(model, ckpt)
    if optimizer is not None:
        sd = ckpt.optimizer_state()
        if sd is None:
            raise ValueError(f"{ckpt.path}: the checkpoint holds no optimizer state")
        try:
            optimizer.load_state_dict(sd)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{ckpt.path}: optimizer state does not fit: {exc}") from None
    if scheduler is not None:
        sched = ckpt.header.get("schedule")
        if sched is None:
            raise ValueError(f"{ckpt.path}: expected the state of a {type(scheduler).__name__} schedule, got none")
        scheduler.load_state_dict(sched)
    gen_state = ckpt.header.get("rng", {}).get("generator")
    if gen_state is not None:
        gen = default_generator()
        if gen.bit_generator.state.get("bit_generator") == gen_state.get("bit_generator"):
            gen.bit_generator.state = gen_state
    return ckpt.position


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of any cnn_gpu .npz file (model or checkpoint), for inspection; no array is read."""
    with Archive(path) as archive:
        return _read_header(archive)


__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "restore", "read_header", "dropout_states", "FORMAT", "VERSION"]
