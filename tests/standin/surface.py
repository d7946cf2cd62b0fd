"""The API surface of the installed CuPy, read without a GPU: names and signatures.

CuPy imports on a machine without a GPU. For each namespace the stand-in mimics, this module
records ``dir()`` and, per callable, an ``inspect.Signature``: from ``inspect.signature`` when
it works, else parsed from the first docstring line that Cython embeds
(``_ndarray_base.reshape(self, *shape, order='C', copy=None)``), else (ufuncs) the ufunc
calling convention. The stand-in refuses any name, method or keyword the real one lacks.

A CuPy module that loads a CUDA library when imported (``cupy.cublas`` needs libcublas, which a
machine without CUDA lacks) is read from its source file instead: its top-level functions and
classes, and each function's parameter list (defaults as None).
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

_UFUNC_SIG = inspect.Signature(
    [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
    + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in ("out", "casting", "dtype")]
)


_REAL = importlib.import_module("cupy")  # captured before any stand-in takes its place in sys.modules
_REAL_X = importlib.import_module("cupyx.scipy.special")  # (and cupyx, which imports cupy's internals)


#: CuPy modules whose surface is read from their source (importing them needs CUDA libraries)
SOURCE_ONLY = ("cupy.cublas",)


def real_cupy():
    return _REAL


@functools.cache
def _source_defs(path: str) -> dict:
    """{name: ast node} of the top-level functions and classes of CuPy module ``path`` (a SOURCE_ONLY one)."""
    file = Path(_REAL.__file__).parent.joinpath(*path.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _signature_of(params: str) -> inspect.Signature | None:
    """The signature of ``def f(<params>)`` (a parameter list from CuPy's own docs or source), or
    None when it does not parse."""
    try:
        fn = ast.parse(f"def f({params}): pass").body[0]
    except SyntaxError:
        return None
    ns: dict = {}
    exec(compile(ast.Module([fn], []), "<sig>", "exec"), ns)  # noqa: S102 (CuPy's own parameter list)
    return inspect.signature(ns["f"])


def _source_signature(fn: ast.FunctionDef) -> inspect.Signature | None:
    """A source function's parameters, defaults as None and annotations dropped (the cached node
    is left as it is)."""
    args = copy.deepcopy(fn.args)
    args.defaults = [ast.Constant(None) for _ in args.defaults]
    args.kw_defaults = [None if d is None else ast.Constant(None) for d in args.kw_defaults]
    for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None
    return _signature_of(ast.unparse(args))


@functools.cache
def namespace(path: str):
    """The real object at ``path`` ("cupy", "cupy.random", "cupy.ndarray", ...)."""
    parts = path.split(".")
    if parts[0] not in ("cupy", "cupyx"):
        raise ValueError(f"path: expected a name under cupy or cupyx, got {path!r}")
    obj = _REAL if parts[0] == "cupy" else importlib.import_module("cupyx")
    for p in parts[1:]:
        obj = getattr(obj, p)
    return obj


@functools.cache
def names(path: str) -> frozenset:
    if path in SOURCE_ONLY:
        return frozenset(_source_defs(path))
    return frozenset(dir(namespace(path)))


@functools.cache
def has(path: str, name: str) -> bool:
    """Whether the real ``path`` has ``name`` (listed by dir(), or loaded lazily on access)."""
    if path in SOURCE_ONLY:
        return name in names(path)
    return name in names(path) or hasattr(namespace(path), name)


def _from_docstring(obj: Any) -> inspect.Signature | None:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    if not doc:
        return None
    m = re.match(r"^[\w.]+\((.*)\)(\s*->.*)?$", doc[0].strip())
    if not m:
        return None
    params = []
    depth, cur = 0, ""
    for ch in m.group(1):  # split on the commas at depth 0
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            params.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        params.append(cur.strip())
    cleaned = []
    for p in params:
        if p in ("*", "/") or p.startswith("*"):
            cleaned.append(p.replace("\\", ""))
            continue
        name, _, default = p.partition("=")
        name = name.strip().split()[-1]  # drop a Cython type: "str code" -> "code"
        cleaned.append(f"{name}=None" if default else name)
    return _signature_of(", ".join(cleaned))


@functools.cache
def signature(path: str, name: str) -> inspect.Signature | None:
    """The signature of ``path.name`` (methods include ``self``), or None when CuPy gives none."""
    if path in SOURCE_ONLY:
        node = _source_defs(path)[name]
        return _source_signature(node) if isinstance(node, ast.FunctionDef) else None
    obj = getattr(namespace(path), name)
    if isinstance(obj, real_cupy().ufunc):
        return _UFUNC_SIG
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return _from_docstring(obj)


@functools.cache
def compiled_signature(module: str, qualname: str) -> list[tuple[str, str, bool]] | None:
    """The typed parameters [(C type or "", name, has a default)] of ``qualname`` in the compiled
    CuPy module ``module`` (e.g. "cupy_backends.cuda.libs.nccl", "NcclCommunicator.allReduce"),
    read from the signature Cython embeds in its docstring, in the extension file itself: such a
    module (NCCL's) cannot be imported where its library is missing. None when it has none."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    data = Path(spec.origin).read_bytes()
    m = re.search(rb"(?:^|\x00|\n)" + re.escape(qualname.encode()) + rb"\(([^()\x00\n]*)\)", data)
    if m is None:
        return None
    params = []
    for p in m.group(1).decode().split(","):
        p = p.strip()
        if not p or p == "self":
            continue
        decl, _, default = p.partition("=")
        words = decl.split()
        params.append((" ".join(words[:-1]), words[-1], bool(default)))
    return params


def check_call(path: str, name: str, args: tuple, kwargs: dict, method: bool = False) -> None:
    """Raise TypeError, as the real CuPy would, when ``args``/``kwargs`` do not fit ``path.name``."""
    if not has(path, name):
        raise AttributeError(f"{path} has no attribute {name!r} (the installed CuPy lacks it)")
    sig = signature(path, name)
    if sig is None:
        return
    try:
        sig.bind(*((None,) + tuple(args) if method else args), **kwargs)
    except TypeError as exc:
        raise TypeError(f"{path}.{name}{sig}: {exc} (as the installed CuPy would refuse)") from None


__all__ = ["namespace", "names", "has", "signature", "check_call", "real_cupy", "compiled_signature"]
