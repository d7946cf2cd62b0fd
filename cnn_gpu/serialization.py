"""Saving and loading models: one ``.npz`` file with the weights and the architecture.

File format (a NumPy ``.npz`` archive, readable with ``numpy.load(path, allow_pickle=False)``):

- one array per parameter, under its derived name (``features.0.weight``, ...), in the model's dtype;
- ``__cnn_gpu__``: a uint8 array holding UTF-8 JSON:
  ``{"format": "cnn_gpu.model", "version": 1, "dtype": "float32",
     "architecture": <module description>, "metadata": {...}}``.
  A module description is ``{"type": "Sequential", "children": [[name, description], ...]}``,
  ``{"type": "Residual", "body": description, "shortcut": description or null}``
  or ``{"type": "<Layer class>", "config": {constructor arguments}}``.
- buffers (BatchNorm's running statistics) are stored like parameters, under their names.

``load`` rebuilds the model from the description alone, so a saved model can be evaluated
without the code that built it.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from .archive import MAX_HEADER_BYTES, Archive
from .backend import to_numpy
from .io import atomic_write
from .nn import LAYER_TYPES, Module, Residual, Sequential

FORMAT = "cnn_gpu.model"
VERSION = 1
HEADER_KEY = "__cnn_gpu__"


def describe(module: Module) -> dict:
    """The JSON-serialisable architecture of ``module``."""
    if isinstance(module, Sequential):
        return {"type": "Sequential", "children": [[n, describe(c)] for n, c in module.named_children()]}
    if isinstance(module, Residual):
        return {
            "type": "Residual",
            "body": describe(module.body),
            "shortcut": describe(module.shortcut) if module.shortcut is not None else None,
        }
    name = type(module).__name__
    if name not in LAYER_TYPES:
        raise TypeError(f"module: {name} is not a cnn_gpu layer type and cannot be described; known: {sorted(LAYER_TYPES)}")
    return {"type": name, "config": module.config()}


def build(desc: dict, dtype: Any = np.float32, path: Any = "model") -> Module:
    """A freshly initialised module from a description (the inverse of :func:`describe`);
    the description is checked first (:func:`parameter_shapes`)."""
    parameter_shapes(desc, path)
    return build_checked(desc, dtype, path)


def build_checked(desc: dict, dtype: Any, path: Any) -> Module:
    """:func:`build` of a description that :func:`parameter_shapes` has already checked."""

    def make(d: dict, where: str) -> Module:
        if d["type"] == "Sequential":
            return Sequential(OrderedDict((n, make(c, f"{where}.children[{i}][1]")) for i, (n, c) in enumerate(d["children"])))
        if d["type"] == "Residual":
            shortcut = d.get("shortcut")
            return Residual(
                make(d["body"], f"{where}.body"), make(shortcut, f"{where}.shortcut") if shortcut is not None else None
            )
        return _build_leaf(d["type"], d.get("config", {}), dtype, path, f"{where}.config")

    return make(desc, "architecture")


def model_dtype(model: Module) -> np.dtype:
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        raise TypeError(f"model: expected one parameter dtype, got {sorted(map(str, dtypes))}")
    return next(iter(dtypes)) if dtypes else np.dtype(np.float32)


def encode_header(obj: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode("utf-8"), dtype=np.uint8)


# ---------------------------------------------------------------------------- reading, checked first
MAX_DEPTH = 32  # nesting of Sequential containers
MAX_CHILDREN = 10_000  # leaves and containers in one architecture
MAX_INT = 2**31 - 1  # any size in a layer's config
MAX_UNKNOWN_SIZE = 2**16  # sizes of layers without a shape rule below, which are built to read their shapes
DTYPES = ("float32", "float64")


def field_error(path: Any, where: str, expected: str, got: Any) -> ValueError:
    text = repr(got)
    return ValueError(f"{path}: {where}: expected {expected}, got {text if len(text) <= 80 else text[:77] + '...'}")


def read_header(archive: Archive) -> dict:
    """The JSON header of an open archive, as a dict; nothing else is read."""
    path = archive.path
    if HEADER_KEY not in archive.names:
        raise ValueError(f"{path}: missing the {HEADER_KEY} header; not a file written by cnn_gpu")
    arr = archive.read(HEADER_KEY, dtype=np.uint8, max_bytes=MAX_HEADER_BYTES)
    try:
        header = json.loads(arr.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: the {HEADER_KEY} header is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise field_error(path, HEADER_KEY, "a JSON object", type(header).__name__)
    return header


def check_header(header: dict, path: Any, expected_format: str, version: int, what: str) -> None:
    """The fields every cnn_gpu file has: format, version, dtype, metadata (architecture: below)."""
    if header.get("format") != expected_format:
        raise ValueError(f"{path}: expected a {expected_format!r} file, got format {header.get('format')!r}")
    v = header.get("version")
    if v != version or isinstance(v, bool):
        raise ValueError(f"{path}: expected format version {version}, got {v!r} (a {what})")
    if header.get("dtype") not in DTYPES:
        raise field_error(path, "dtype", f"one of {list(DTYPES)}", header.get("dtype"))
    if not isinstance(header.get("metadata", {}), dict):
        raise field_error(path, "metadata", "a JSON object", header.get("metadata"))


def _check_value(path: Any, where: str, v: Any) -> None:
    if isinstance(v, bool) or v is None or (isinstance(v, str) and len(v) <= 64):
        return
    if isinstance(v, int):
        if not 0 <= v <= MAX_INT:
            raise field_error(path, where, f"an int in [0, {MAX_INT}]", v)
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise field_error(path, where, "a finite number", v)
        return
    if isinstance(v, list) and 1 <= len(v) <= 4:
        for i, item in enumerate(v):
            if not isinstance(item, int) or isinstance(item, bool):
                raise field_error(path, f"{where}[{i}]", "an int", item)
            _check_value(path, f"{where}[{i}]", item)
        return
    raise field_error(path, where, "a number, a bool, a short string or a list of 1 to 4 ints", v)


def _size(cfg: dict, key: str, path: Any, where: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise field_error(path, f"{where}.{key}", "a positive int", v)
    return v


def _leaf_shapes(kind: str, cfg: dict, path: Any, where: str) -> dict[str, tuple]:
    """The parameter shapes of one layer, from its config; nothing large is allocated."""
    allowed = set(inspect.signature(LAYER_TYPES[kind].__init__).parameters) - {"self", "dtype", "generator"}
    for key, v in cfg.items():
        if key not in allowed:
            raise field_error(path, f"{where}.{key}", f"a setting of {kind} (one of {sorted(allowed)})", key)
        _check_value(path, f"{where}.{key}", v)
    bias = cfg.get("bias", True)
    if kind == "Conv2d":
        i, o = _size(cfg, "in_channels", path, where), _size(cfg, "out_channels", path, where)
        k = cfg.get("kernel_size")
        kh, kw = (k, k) if isinstance(k, int) else (tuple(k) if isinstance(k, list) and len(k) == 2 else (0, 0))
        if kh < 1 or kw < 1:
            raise field_error(path, f"{where}.kernel_size", "a positive int or a pair of them", k)
        groups = cfg.get("groups", 1)
        if not isinstance(groups, int) or groups < 1 or i % groups or o % groups:
            raise field_error(path, f"{where}.groups", f"a positive divisor of in_channels {i} and out_channels {o}", groups)
        return {"weight": (o, i // groups, kh, kw), **({"bias": (o,)} if bias else {})}
    if kind == "Linear":
        i, o = _size(cfg, "in_features", path, where), _size(cfg, "out_features", path, where)
        return {"weight": (o, i), **({"bias": (o,)} if bias else {})}
    for key, v in cfg.items():  # another layer type: built (small) to read its shapes
        if any(isinstance(n, int) and n > MAX_UNKNOWN_SIZE for n in (v if isinstance(v, list) else [v])):
            raise field_error(path, f"{where}.{key}", f"at most {MAX_UNKNOWN_SIZE}", v)
    module = _build_leaf(kind, cfg, np.float32, path, where)
    return {name: tuple(a.shape) for name, a in module.state_dict().items()}


def parameter_shapes(desc: Any, path: Any = "model", where: str = "architecture") -> dict[str, tuple]:
    """{parameter name: shape} of an architecture description, checked field by field (types,
    ranges, nesting depth, layer types and settings) without building anything large."""
    shapes: dict[str, tuple] = {}
    count = [0]

    def visit(d: Any, prefix: str, where: str, depth: int) -> None:
        count[0] += 1
        if depth > MAX_DEPTH or count[0] > MAX_CHILDREN:
            raise field_error(path, where, f"at most {MAX_DEPTH} levels and {MAX_CHILDREN} modules", "more")
        if not isinstance(d, dict) or not isinstance(d.get("type"), str):
            raise field_error(path, where, "an object with a 'type' string", d)
        kind = d["type"]
        if kind == "Sequential":
            children = d.get("children")
            if not isinstance(children, list):
                raise field_error(path, f"{where}.children", "a list of [name, module] pairs", children)
            names = set()
            for i, item in enumerate(children):
                if (
                    not isinstance(item, list)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not item[0]
                    or "." in item[0]
                    or len(item[0]) > 64
                    or item[0] in names
                ):
                    raise field_error(path, f"{where}.children[{i}]", "a [unique name without dots, module] pair", item)
                names.add(item[0])
                visit(item[1], f"{prefix}{item[0]}.", f"{where}.children[{i}][1]", depth + 1)
            return
        if kind == "Residual":
            shortcut = d.get("shortcut")
            visit(d.get("body"), f"{prefix}body.", f"{where}.body", depth + 1)
            if shortcut is not None:
                visit(shortcut, f"{prefix}shortcut.", f"{where}.shortcut", depth + 1)
            return
        if kind not in LAYER_TYPES:
            raise field_error(path, f"{where}.type", f"a layer type (one of {sorted(LAYER_TYPES)})", kind)
        cfg = d.get("config", {})
        if not isinstance(cfg, dict):
            raise field_error(path, f"{where}.config", "an object of constructor arguments", cfg)
        for name, shape in _leaf_shapes(kind, cfg, path, f"{where}.config").items():
            shapes[prefix + name] = shape

    visit(desc, "", where, 0)
    return shapes


def read_weights(archive: Archive, shapes: dict[str, tuple], dtype: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays ``prefix + name`` of ``shapes``, each checked (shape, dtype, declared size) before
    it is read; a member that is missing, of another shape, or not expected is a ValueError."""
    path = archive.path
    stored = {n[len(prefix) :] for n in archive.names if n.startswith(prefix) and n != HEADER_KEY}
    missing, unexpected = sorted(set(shapes) - stored), sorted(stored - set(shapes))
    wrong = sorted(n for n in set(shapes) & stored if archive.info(prefix + n)[0] != shapes[n])
    if missing or unexpected or wrong:
        want = sum(math.prod(s) for s in shapes.values())
        have = sum(math.prod(archive.info(prefix + n)[0]) for n in stored)
        detail = "; ".join(f"{prefix}{n}: expected shape {shapes[n]}, got {archive.info(prefix + n)[0]}" for n in wrong[:5])
        raise ValueError(
            f"{path}: weights do not match the saved architecture ({want:,} parameters; the file stores "
            f"{have:,}): missing {missing[:10]}, unexpected {unexpected[:10]}" + (f"; {detail}" if detail else "")
        )
    return {n: archive.read(prefix + n, shapes[n], member_dtype(n, dtype)) for n in shapes}


INTEGER_STATE = {"num_batches_tracked": np.int64}  # buffers that are counters, not weights


def member_dtype(name: str, dtype: Any) -> np.dtype:
    """The stored dtype of state ``name``: the model's dtype, or int64 for counters."""
    return np.dtype(INTEGER_STATE.get(name.rpartition(".")[2], dtype))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file (for inspection and tests; loading reads only what it expects)."""
    with Archive(path) as archive:
        return {name: archive.read(name) for name in archive.names}


def _build_leaf(kind: str, cfg: dict, dtype: Any, path: Any, where: str) -> Module:
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    accepted = inspect.signature(LAYER_TYPES[kind].__init__).parameters
    if "dtype" in accepted:
        args.update(dtype=dtype)
    if "generator" in accepted and "dtype" in accepted:
        args.update(generator=np.random.default_rng(0))  # weights are overwritten by load
    try:
        return LAYER_TYPES[kind](**args)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {where}: {exc}") from None


def check_header_size(header: np.ndarray, path: Any) -> None:
    """Refuse to write a header (encoded, :func:`encode_header`) whose archive member (its .npy
    header included, as the reader counts it) is larger than readers accept."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(header))
    size = len(buf.getvalue()) + header.nbytes  # the member as np.savez writes it
    if size > MAX_HEADER_BYTES:
        raise ValueError(
            f"{path}: not saved: its JSON header (architecture, metadata) takes {size:,} bytes, "
            f"over the {MAX_HEADER_BYTES:,} that cnn_gpu.load reads; keep the metadata smaller"
        )


def check_savable(model: Module, path: Any, metadata: dict | None = None) -> None:
    """Refuse, before anything is written, a model that :func:`load` would refuse: the reader's
    limits (nesting depth, module count, sizes, names: :func:`parameter_shapes`) and the header's
    size. A file that saves but cannot be loaded would lose the user's work."""
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a cnn_gpu.nn.Module, got {type(model).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata: expected a dict (JSON object) or None, got {type(metadata).__name__}")
    architecture = describe(model)
    try:
        parameter_shapes(architecture, "model")
    except ValueError as exc:
        raise ValueError(f"{path}: not saved: cnn_gpu.load would refuse this model: {str(exc)[len('model: ') :]}") from None
    header = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(model_dtype(model)),
        "architecture": architecture,
        "metadata": metadata or {},
    }
    check_header_size(encode_header(header), path)


def _outputs(model: Module) -> int | None:
    """The number of outputs of a model whose last parameterised leaf is a Linear (a classifier)."""
    last = [m for _, m in model.named_modules() if not m._modules and m.parameters()]
    return getattr(last[-1], "out_features", None) if last else None


def _jsonable(v: Any) -> Any:
    """Metadata values as JSON: NumPy (or CuPy) arrays and scalars become lists and numbers."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist") and hasattr(v, "dtype"):
        return to_numpy(v).tolist()
    return v


def model_metadata(model: Module, classes: Any = None, metadata: dict | None = None) -> dict:
    """The metadata :func:`save` writes: ``metadata`` as given, plus what the model knows and the
    caller did not say: ``input_shape`` (the last input it saw, e.g. (1, 28, 28)), ``model`` (a zoo
    model's name), ``classes`` (names, in label order) and ``num_classes``."""
    meta = _jsonable(dict(metadata or {}))
    outputs = _outputs(model)
    if classes is not None:
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise TypeError(f"classes: expected a sequence of class names (str), got {classes!r:.80}")
        classes = list(classes)
        if outputs is not None and len(classes) != outputs:
            raise ValueError(f"classes: expected {outputs} names (the model's outputs), got {len(classes)}")
        if meta.get("classes") is not None and meta["classes"] != classes:
            raise ValueError("classes: given twice (classes= and metadata['classes']) with different names")
        meta["classes"] = classes
    spec = getattr(model, "input_spec", None)
    shape = getattr(model, "last_input_shape", None)
    if shape is None and spec is not None and spec.min_size is None:
        shape = spec.shape
    if shape is not None:
        meta.setdefault("input_shape", list(shape))
    if spec is not None:
        meta.setdefault("model", spec.name)
    if outputs is not None:
        meta.setdefault("num_classes", outputs)
    return meta


def save(model: Module, path: str | os.PathLike, classes: Any = None, metadata: dict | None = None) -> None:
    """Write ``model`` (architecture + weights) to ``path`` atomically, with ``metadata`` (a dict
    of JSON values; NumPy arrays are written as lists) and what the model knows: the input shape it
    last saw, its classes' names (``classes``, in label order) and its normalisation when given
    (``metadata={"mean": ..., "std": ..., "scale": ...}``, as cnn-gpu train records it). Then
    ``cnn-gpu predict``, ``evaluate`` and ``export`` need no further arguments (see
    :func:`model_metadata`)."""
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a cnn_gpu.nn.Module, got {type(model).__name__}")
    metadata = model_metadata(model, classes, metadata)
    check_savable(model, path, metadata)  # nothing is written that load would refuse
    header = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(model_dtype(model)),
        "architecture": describe(model),
        "metadata": metadata,
    }
    arrays = {name: to_numpy(a) for name, a in model.state_dict().items()}
    arrays[HEADER_KEY] = encode_header(header)
    with atomic_write(path) as f:
        np.savez(f, allow_pickle=False, **arrays)  # numbers only (the header too: JSON bytes)


def _remember_input(model: Module, meta: dict) -> None:
    """Give a loaded model the input shape (and zoo spec) its file records, so that a model loaded
    and saved again keeps them and its errors say what it takes; values are checked first."""
    from .models import ANY_SIZE_FROM  # noqa: PLC0415 (models imports nn, not this module)
    from .nn.module import InputSpec  # noqa: PLC0415

    shape = meta.get("input_shape")
    if not (
        isinstance(shape, list)
        and 1 <= len(shape) <= 3
        and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_INT for d in shape)
    ):
        return
    if "_last_input" in model.__dict__:
        object.__setattr__(model, "_last_input", tuple(shape))
        name = meta.get("model")
        if isinstance(name, str) and len(name) <= 64 and len(shape) == 3:
            object.__setattr__(model, "input_spec", InputSpec(name, tuple(shape), ANY_SIZE_FROM.get(name)))


def load(path: str | os.PathLike, backend: str | None = None) -> Module:
    """Rebuild a model saved by :func:`save` (on the current backend, or ``backend``). The header
    is checked and the weights' shapes matched against the stored arrays before anything is built."""
    with Archive(path) as archive:
        header = read_header(archive)
        check_header(header, path, FORMAT, VERSION, "model file")
        shapes = parameter_shapes(header.get("architecture"), path)
        arrays = read_weights(archive, shapes, header["dtype"])
    model = build_checked(header["architecture"], np.dtype(header["dtype"]), path)  # checked above
    if backend is not None:
        model.to(backend)
    try:
        model.load_state_dict(arrays)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: weights do not match the saved architecture: {exc}") from None
    _remember_input(model, header.get("metadata", {}))
    return model
