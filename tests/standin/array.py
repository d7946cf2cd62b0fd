"""The stand-in's ndarray: device memory simulated by a NumPy array, with CuPy's rules.

* Its type is its own (``type(a).__module__ == "cupy"``), so the library takes its CuPy branches.
* Implicit conversion to NumPy raises TypeError, as in CuPy; ``float(a)``, ``int(a)``,
  ``bool(a)``, ``a.item()``, ``a.get()``, ``a.tolist()``, iteration, printing and indexing with a
  boolean array (``a[mask]``, ``a[mask] = v``: CuPy reads the count of true values) are host syncs
  and are counted; mixing with a NumPy array in arithmetic raises, as in CuPy.
* Every operation counts its launches (elementwise, reduction, gather, copy, fill, ...),
  allocations and copies; a copy that only changes the memory layout is counted apart.
* A method CuPy's ndarray lacks raises AttributeError; known methods are checked against the
  installed CuPy's signatures (tests/standin/surface.py).
* Each operation is issued through tests/standin/graph.py: on a capturing stream it is recorded
  into the CUDA graph instead of run, and transfers refuse as CuPy's do; each new buffer goes
  through tests/standin/memory.py (counted, charged to the current allocator).
"""

from __future__ import annotations

import numpy as np

from . import graph, memory, surface
from . import null as null_mode
from .counters import current

_REDUCTIONS = {"sum", "prod", "max", "min", "argmax", "argmin", "mean", "var", "std", "all", "any", "cumsum"}
_VIEWS = {"T", "transpose", "swapaxes", "view", "squeeze", "diagonal", "real", "imag"}


class StandinGap(NotImplementedError):
    """The real CuPy has this, the stand-in does not implement it yet: add it to tests/standin."""


def unwrap(x, what: str = "argument"):
    """The NumPy buffer behind a stand-in array; NumPy arrays are refused (CuPy refuses them)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(
            f"Unsupported type {type(x)} ({what}): CuPy does not mix host NumPy arrays into device "
            "operations; move it with cupy.asarray first"
        )
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v, what) for v in x)
    return x


def wrap(a, alloc: bool = True):
    """A stand-in array around NumPy result ``a`` (counted as an allocation when new)."""
    if isinstance(a, np.ndarray):
        if alloc:
            memory.allocated(a)
        return ndarray._of(a)
    if isinstance(a, tuple):
        return tuple(wrap(v, alloc) for v in a)
    if isinstance(a, np.generic):  # CuPy returns 0-d arrays, never host scalars
        a = np.asarray(a)
        if alloc:
            memory.allocated(a)
        return ndarray._of(a)
    return a


class _Flags:
    def __init__(self, a):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[key]


class _MemoryPointer:
    def __init__(self, a):
        self.ptr = int(a.__array_interface__["data"][0])


class ndarray:
    """cupy.ndarray, simulated."""

    __module__ = "cupy"
    __array_priority__ = 100
    __slots__ = ("_a",)

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise StandinGap("ndarray(memptr=, strides=) is not simulated")
        self._a = memory.allocated(graph.fresh(np.empty(shape, dtype=dtype, order=order)))

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        obj = object.__new__(cls)
        obj._a = a
        return obj

    # ---------------------------------------------------------------- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _MemoryPointer(self._a))
    T = property(lambda self: ndarray._of(self._a.T))
    device = property(lambda self: _device())

    def __len__(self):
        return len(self._a)

    def __getattr__(self, name):
        if name.startswith("__") or not surface.has("cupy.ndarray", name):
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} (the installed CuPy lacks it)")
        if not hasattr(np.ndarray, name):
            raise StandinGap(f"cupy.ndarray.{name} exists in CuPy but the stand-in does not simulate it")
        return lambda *args, **kwargs: self._generic(name, args, kwargs)

    def _generic(self, name, args, kwargs):
        surface.check_call("cupy.ndarray", name, args, kwargs, method=True)
        if name == "nonzero":
            graph.refuse_transfer("D2H")  # CuPy reads the count of nonzero values to size the result
        if name == "dot":
            graph.refuse_cublas(self.dtype)
        src, np_args, np_kwargs = self._a, unwrap(args), {k: unwrap(v) for k, v in kwargs.items()}
        if name in _VIEWS:
            return wrap(getattr(src, name)(*np_args, **np_kwargs), alloc=False)
        kind = "reduction" if name in _REDUCTIONS else "elementwise"
        if np_kwargs.get("out") is not None:
            graph.launch(kind, lambda: getattr(src, name)(*np_args, **np_kwargs), inplace=True)
            return kwargs["out"]
        meta = (
            null_mode.reduction_meta(name, lambda z: getattr(z, name)(*np_args, **np_kwargs), src, np_args, np_kwargs)
            if kind == "reduction" and name != "sort"
            else None
        )
        return wrap(
            graph.launch(
                kind,
                lambda: getattr(src, name)(*np_args, **np_kwargs),
                inputs=graph._arrays([src], np_args, np_kwargs),
                meta=meta,
            )
        )

    # ------------------------------------------------------------- host syncs
    def _sync(self, why, stream=None):
        """A device-to-host read: CuPy's copy_to_host_async refuses a capturing stream first
        (iteration is not one in CuPy: it yields views; the stand-in counts it)."""
        if why != "iteration":
            graph.refuse_transfer("D2H", stream)
        current().sync(why, self._a.nbytes)

    def get(self, stream=None, order="C", out=None, blocking=True):
        self._sync("get", stream)
        return np.array(self._a, order=order)

    def item(self):
        self._sync("item")
        return self._a.item()

    def tolist(self):
        self._sync("tolist")
        return self._a.tolist()

    def __float__(self):
        self._sync("float")
        return float(self._a)

    def __int__(self):
        self._sync("int")
        return int(self._a)

    def __bool__(self):
        self._sync("bool")
        return bool(self._a)

    def __index__(self):
        self._sync("index")
        return self._a.__index__()

    def __iter__(self):
        self._sync("iteration")
        return iter([ndarray._of(v) if isinstance(v, np.ndarray) else wrap(v, alloc=False) for v in self._a])

    def __repr__(self):
        self._sync("print")
        return repr(self._a)

    def __str__(self):
        self._sync("print")
        return str(self._a)

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
        )

    def set(self, arr, stream=None):
        arr = np.asarray(arr)
        graph.refuse_transfer("H2D", stream)
        current().upload(arr.nbytes)
        self._a[...] = arr

    # ------------------------------------------------------------- shape and copies
    def reshape(self, *shape, order="C", copy=None):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        src = self._a
        out = src.reshape(shape, order=order)
        if out.size and not np.shares_memory(out, src):  # a reshape that needs a copy
            out = memory.allocated(graph.launch("copy", lambda: src.reshape(shape, order=order)))
            current().copy(out.nbytes, layout=True, site="reshape")
        return ndarray._of(out)

    def transpose(self, *axes):
        return ndarray._of(self._a.transpose(*axes))

    def ravel(self, order="C"):
        return self.reshape(-1, order=order)

    def view(self, dtype=None, type=None):
        return ndarray._of(self._a.view(dtype) if dtype is not None else self._a.view())

    def copy(self, order="C"):
        src = self._a
        out = graph.launch("copy", lambda: np.array(src, order=order), meta=lambda: np.empty_like(src, order=order))
        current().copy(out.nbytes, layout=not src.flags.c_contiguous, site="copy")
        return wrap(out)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        src = self._a
        order = "C" if order in ("K", "A") and src.flags.c_contiguous else order
        out = graph.launch(
            "elementwise", lambda: src.astype(dtype, order=order), meta=lambda: np.empty_like(src, dtype=dtype, order=order)
        )
        current().copy(out.nbytes, layout=np.dtype(dtype) == self.dtype and not src.flags.c_contiguous, site="astype")
        return wrap(out)

    def fill(self, value):
        dst = self._a
        graph.launch("fill", lambda: dst.fill(value), inplace=True)

    # ------------------------------------------------------------- indexing
    def __getitem__(self, key):
        _mask_sync(key)
        key = _index(key)
        src = self._a
        if _basic(key):  # no index array: a view, or (every axis an int) one element
            out = src[key]
            if isinstance(out, np.ndarray) and np.shares_memory(out, src):
                return ndarray._of(out)  # a view: no launch
        # under capture the index arrays' values are not known yet: zeros give the result's shape
        return wrap(graph.launch("gather", lambda: src[key], probe=lambda: src[_probe_key(key)]))

    def __setitem__(self, key, value):
        _mask_sync(key)
        key = _index(key)
        whole = self._a
        if isinstance(value, np.ndarray):
            graph.refuse_transfer("H2D")  # CuPy moves the host value to the device first
            current().upload(value.nbytes)
            graph.launch("copy", lambda: whole.__setitem__(key, value), inplace=True)
            return
        if isinstance(value, ndarray):
            src, dst = value._a, whole[key] if _basic(key) else None
            layout = (
                dst is not None
                and src.dtype == dst.dtype
                and src.size == dst.size
                and (not src.flags.c_contiguous or not dst.flags.c_contiguous)
                and src.size > 1
            )
            current().copy(src.nbytes, layout=layout, site="setitem")
            graph.launch("copy" if _basic(key) else "scatter", lambda: whole.__setitem__(key, src), inplace=True)
            return
        graph.launch("fill", lambda: whole.__setitem__(key, value), inplace=True)

    # ------------------------------------------------------------- numpy protocols
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__":
            raise StandinGap(f"numpy ufunc method {method} on a cupy array")
        args = [unwrap(x, f"{ufunc.__name__} input") for x in inputs]
        out = kwargs.pop("out", None)
        if out is not None:
            kwargs["out"] = tuple(unwrap(o, "out") for o in (out if isinstance(out, tuple) else (out,)))
            graph.launch("elementwise", lambda: ufunc(*args, **kwargs), inplace=True)
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return wrap(
            graph.launch(
                "elementwise", lambda: ufunc(*args, **kwargs), inputs=args, meta=null_mode.ufunc_meta(ufunc, args, kwargs)
            )
        )

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(
            f"numpy.{func.__name__} on a cupy array: call cupy.{func.__name__} (the stand-in does not dispatch NumPy functions)"
        )


def _mask_sync(key) -> None:
    """Indexing with a boolean array (``a[mask]``, ``a[mask] = v``) is a host sync in CuPy: its
    _prepare_mask_indexing_single (cupy/_core/_routines_indexing.pyx) reads the number of true
    values, ``int(mask_scanned[-1])``, to size the result."""
    for k in key if isinstance(key, tuple) else (key,):
        if isinstance(k, (ndarray, np.ndarray)) and k.dtype == np.bool_ and k.ndim > 0:
            graph.refuse_transfer("D2H")  # that count is a device-to-host read
            current().sync("boolean mask")
            return


def _basic(key) -> bool:
    parts = key if isinstance(key, tuple) else (key,)
    return all(isinstance(k, (int, np.integer, slice)) or k is Ellipsis or k is None for k in parts)


def _index(key):
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, np.ndarray):
        graph.refuse_transfer("H2D")  # CuPy moves a host index array to the device
        current().upload(key.nbytes)
        return key
    return key


def _probe_key(key):
    """``key`` with zeros for its integer index arrays: the same result shape, whatever they hold."""
    if isinstance(key, tuple):
        return tuple(_probe_key(k) for k in key)
    if isinstance(key, np.ndarray) and key.dtype.kind in "iu":
        return np.zeros_like(key)
    return key


def _device():
    from .module import Device  # noqa: PLC0415

    return Device()


def _binary(ufunc, reflected=False, inplace=False):
    def op(self, other):
        if isinstance(other, np.ndarray):
            raise TypeError(f"Unsupported type {type(other)}")
        if inplace:
            return self.__array_ufunc__(ufunc, "__call__", self, other, out=(self,))
        return self.__array_ufunc__(ufunc, "__call__", *((other, self) if reflected else (self, other)))

    return op


for _name, _uf in [
    ("add", np.add),
    ("sub", np.subtract),
    ("mul", np.multiply),
    ("truediv", np.true_divide),
    ("floordiv", np.floor_divide),
    ("mod", np.remainder),
    ("pow", np.power),
    ("and", np.bitwise_and),
    ("or", np.bitwise_or),
    ("xor", np.bitwise_xor),
    ("lshift", np.left_shift),
    ("rshift", np.right_shift),
]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in [
    ("lt", np.less),
    ("le", np.less_equal),
    ("gt", np.greater),
    ("ge", np.greater_equal),
    ("eq", np.equal),
    ("ne", np.not_equal),
]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
ndarray.__neg__ = lambda self: self.__array_ufunc__(np.negative, "__call__", self)
ndarray.__abs__ = lambda self: self.__array_ufunc__(np.absolute, "__call__", self)
ndarray.__invert__ = lambda self: self.__array_ufunc__(np.invert, "__call__", self)
ndarray.__pos__ = lambda self: self.__array_ufunc__(np.positive, "__call__", self)
ndarray.__hash__ = None


def _matmul(self, other):
    from .module import matmul  # noqa: PLC0415

    return matmul(self, other)


ndarray.__matmul__ = _matmul
ndarray.__rmatmul__ = lambda self, other: _matmul(other, self)

__all__ = ["ndarray", "wrap", "unwrap", "StandinGap"]
