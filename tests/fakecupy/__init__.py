"""A device-strict stand-in for CuPy, so that the tests run mecref's CuPy path without a GPU.

``tests/conftest.py`` points ``mecref.backend`` at it (``mecref.backend.use_cupy_stand_in``)
for every ``backend="cupy"`` test case when no real GPU is usable. It behaves like CuPy where
mecref's correctness depends on it:

- **A distinct array type.** :class:`ndarray` holds a NumPy array but is not one. Mixing it
  with a NumPy array in an operator, a ufunc or a function raises ``TypeError`` (CuPy:
  "Unsupported type <class 'numpy.ndarray'>"); so does implicit conversion to NumPy
  (``np.asarray(a)``, ``__array__``, handing one to SciPy). NumPy functions and ufuncs called
  on it dispatch to the same-named CuPy function (``__array_function__``,
  ``__array_ufunc__``), or raise where CuPy has none, as CuPy does.
- **Host syncs are counted.** ``.get()``, ``asnumpy``, ``.item()``, ``.tolist()``,
  ``float(a)``, ``int(a)``, ``bool(a)``, ``repr``, boolean-mask indexing and the routines that
  size their output from the data (``nonzero``, ``flatnonzero``, ``argwhere``) each add one to
  :data:`syncs` (by kind); host-to-device copies (``asarray`` of host data, NumPy or list
  indices, ``.set``) are counted in :data:`uploads`, calls of the solvers (``cupy.linalg``,
  ``solve_triangular``) in :data:`solver_calls`. A test bounds the syncs of a step.
- **Only CuPy's names.** Every attribute of the ``cupy``, ``cupy.linalg``,
  ``cupy.lib.stride_tricks``, ``cupyx`` and ``cupyx.scipy.linalg`` namespaces, and every
  ``ndarray`` method, must be in ``cupy_api.json``, the snapshot of the real package written by
  ``scripts/cupy_api_snapshot.py`` (it records CuPy's version); a NumPy-only name raises
  ``AttributeError``. Calls are bound against CuPy's recorded signature first, so a keyword
  CuPy lacks raises ``TypeError``.
- **CuPy's own semantics where they differ from NumPy:** reductions and indexing return 0-d
  device arrays, never NumPy scalars; ``argsort``/``sort`` are always stable and take
  ``kind`` only as None or "stable"; ``cupy.linalg`` does not raise on a failed factorisation
  (a matrix that is not positive definite, a singular system) unless
  ``cupyx.errstate(linalg="raise")`` is active: the result is NaN instead (CuPy leaves
  whatever cuSOLVER wrote, which holds NaN or garbage); with ``"raise"`` each call checks
  cuSOLVER's status on the host (one sync) and raises ``numpy.linalg.LinAlgError``.
  ``cupyx.scipy.linalg.solve_triangular`` (cuBLAS trsm) never checks and never raises: a
  zero on the diagonal gives NaN here.
  ``cupy[...] = numpy_array`` with basic indices raises ``ValueError`` as in CuPy 14.

Not imitated (docs/design.md lists what only a real GPU shows): kernels, asynchrony and
streams, memory limits, speed, the order of floating-point reductions (results are NumPy's
bit for bit), ``cupy.random`` (mecref draws every random number on the host), and the
ufunc methods ``reduce``/``accumulate``/``at``.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import json
import numbers
import threading
import types
from pathlib import Path

import numpy as np
import scipy.linalg

API = json.loads(Path(__file__).with_name("cupy_api.json").read_text())
__version__ = API["cupy_version"]

syncs = collections.Counter()     # device -> host reads, by kind
uploads = collections.Counter()   # host -> device copies: "count" and "bytes"
upload_sizes = []                 # the size of each host -> device copy, in bytes
solver_calls = collections.Counter()   # cupy.linalg / cupyx.scipy.linalg routines, by name


def reset_counters():
    syncs.clear()
    uploads.clear()
    upload_sizes.clear()
    solver_calls.clear()


def sync_count() -> int:
    return sum(syncs.values())


def _sync(kind):
    syncs[kind] += 1


def _upload(a):
    n = int(np.asarray(a).nbytes)
    uploads["count"] += 1
    uploads["bytes"] += n
    upload_sizes.append(n)


# ============================================================================ unwrap / wrap
def _refuse(x, where):
    raise TypeError(f"Unsupported type {type(x)} in {where}: a numpy.ndarray cannot be mixed "
                    "with cupy arrays (move it with cupy.asarray first)")


def _dev(x, where):
    """NumPy data for a device operation: stand-in arrays unwrap; NumPy arrays are refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        _refuse(x, where)
    if type(x) in (list, tuple):
        return type(x)(_dev(v, where) for v in x)
    if isinstance(x, dict):
        return {k: _dev(v, where) for k, v in x.items()}
    return x


def _wrap(r):
    """Results on the device: arrays wrap, NumPy scalars become 0-d arrays (as in CuPy)."""
    if isinstance(r, np.ndarray):
        return ndarray._of(r)
    if isinstance(r, np.generic):
        return ndarray._of(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _same_out(result, kwargs):
    """Return the caller's ``out=`` array itself when NumPy wrote into it."""
    out = kwargs.get("out")
    if isinstance(out, ndarray) and isinstance(result, ndarray) and result._a is out._a:
        return out
    return result


_P = inspect.Parameter
_KINDS = {"pos": _P.POSITIONAL_ONLY, "any": _P.POSITIONAL_OR_KEYWORD, "*": _P.VAR_POSITIONAL,
          "kw": _P.KEYWORD_ONLY, "**": _P.VAR_KEYWORD}


def _signature(entry):
    """CuPy's recorded parameters as a Signature (defaults unknown: every one optional)."""
    if not entry or entry.get("params") is None:
        return None
    ps = [_P(n, _KINDS[k], default=None if k in ("pos", "any", "kw") else _P.empty)
          for n, k in entry["params"]]
    return inspect.Signature(ps, __validate_parameters__=False)


def _bind(sig, qual, args, kwargs):
    if sig is None:
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{qual}{sig}: {exc} (CuPy {__version__}'s signature)") from None


# ============================================================================ ndarray
class ndarray:
    """A device array of the stand-in: NumPy data that refuses to meet NumPy arrays."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = np.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _of(cls, a):
        obj = object.__new__(cls)
        obj._a = a
        return obj

    # --- attributes ----------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: ndarray._of(self._a.T))
    mT = property(lambda self: ndarray._of(np.swapaxes(self._a, -1, -2)))
    flags = property(lambda self: self._a.flags)

    def __getattr__(self, name):
        entry = API["ndarray"].get(name)
        if entry is None or name.startswith("_") or not hasattr(np.ndarray, name):
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} (not in CuPy "
                                 f"{__version__}'s API, or not implemented by the stand-in)")
        meth = getattr(self._a, name)
        sig = _signature(entry)
        qual = f"cupy.ndarray.{name}"
        if name in ("argsort", "sort"):
            def call(*args, **kwargs):
                _bind(sig, qual, args, kwargs)
                kind = kwargs.pop("kind", args[1] if len(args) > 1 else None)
                if kind not in (None, "stable"):
                    raise ValueError(f"{qual}: kind must be None or 'stable' (CuPy sorts stably), "
                                     f"got {kind!r}")
                return _wrap(meth(*_dev(args[:1], qual), kind="stable"))
            return call

        def call(*args, **kwargs):
            _bind(sig, qual, args, kwargs)
            r = meth(*_dev(args, qual), **_dev(kwargs, qual))
            return _same_out(_wrap(r), kwargs)
        return call

    # --- the ways to the host (each one a sync) -------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        _sync("get")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape:
            raise ValueError("cupy.ndarray.set needs a numpy.ndarray of the same shape")
        _upload(arr)
        self._a[...] = arr

    def item(self, *args):
        _sync("item")
        return self._a.item(*args)

    def tolist(self):
        _sync("tolist")
        return self._a.tolist()

    def __float__(self):
        _sync("float")
        return float(self._a)

    def __int__(self):
        _sync("int")
        return int(self._a)

    def __complex__(self):
        _sync("complex")
        return complex(self._a)

    def __bool__(self):
        _sync("bool")
        return bool(self._a)

    def __repr__(self):
        _sync("repr")
        return repr(self._a)

    __str__ = __repr__

    def __format__(self, spec):
        _sync("format")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    # --- NumPy's dispatch: to the same-named CuPy function, or NotImplemented --------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__":
            return NotImplemented
        try:
            f = getattr(cupy, ufunc.__name__)
        except AttributeError:
            return NotImplemented
        return f(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        mod = cupy
        for part in func.__module__.split(".")[1:]:
            try:
                mod = getattr(mod, part)
            except AttributeError:
                return NotImplemented
        try:
            f = getattr(mod, func.__name__)
        except AttributeError:
            return NotImplemented
        return f(*args, **kwargs)

    # --- containers and copies ------------------------------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (ndarray._of(self._a[i]) for i in range(len(self._a)))

    def __copy__(self):
        return ndarray._of(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray._of(self._a.copy())

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        k = _index(key)
        if isinstance(value, np.ndarray):
            if _is_basic(key) and value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            _upload(value)
        elif isinstance(value, ndarray):
            value = value._a
        self._a[k] = value


def _is_basic(key):
    key = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (slice, numbers.Integral))
               for k in key)


def _index(key):
    """An index on the device: NumPy or list indices are uploaded, boolean masks sync (CuPy
    sizes the result from the mask's count on the host)."""
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for k in parts:
        if isinstance(k, ndarray):
            if k.dtype == np.bool_:
                _sync("mask")
            k = k._a
        elif isinstance(k, (np.ndarray, list)):
            _upload(k)
            k = np.asarray(k)
            if k.dtype == np.bool_:
                _sync("mask")
        out.append(k)
    return tuple(out) if isinstance(key, tuple) else out[0]


# operators: through the stand-in's ufuncs, which refuse NumPy arrays as CuPy's do
def _binary(name, reflected=False, inplace=False):
    def op(self, other):
        if not isinstance(other, (ndarray, numbers.Number, np.generic, np.ndarray)):
            return NotImplemented
        f = getattr(cupy, name)
        if inplace:
            f(self, other, out=self)
            return self
        return f(other, self) if reflected else f(self, other)
    return op


for _op, _uf in [("add", "add"), ("sub", "subtract"), ("mul", "multiply"),
                 ("truediv", "true_divide"), ("floordiv", "floor_divide"), ("mod", "remainder"),
                 ("pow", "power"), ("and", "bitwise_and"), ("or", "bitwise_or"),
                 ("xor", "bitwise_xor"), ("lshift", "left_shift"), ("rshift", "right_shift"),
                 ("matmul", "matmul")]:
    setattr(ndarray, f"__{_op}__", _binary(_uf))
    setattr(ndarray, f"__r{_op}__", _binary(_uf, reflected=True))
    if _op != "matmul":
        setattr(ndarray, f"__i{_op}__", _binary(_uf, inplace=True))
for _op, _uf in [("eq", "equal"), ("ne", "not_equal"), ("lt", "less"), ("le", "less_equal"),
                 ("gt", "greater"), ("ge", "greater_equal")]:
    setattr(ndarray, f"__{_op}__", _binary(_uf))
ndarray.__neg__ = lambda self: cupy.negative(self)
ndarray.__pos__ = lambda self: cupy.positive(self)
ndarray.__abs__ = lambda self: cupy.absolute(self)
ndarray.__invert__ = lambda self: cupy.invert(self)


# ============================================================================ functions
def _function(qual, impl, entry, after=None):
    sig = _signature(entry)

    def f(*args, **kwargs):
        _bind(sig, qual, args, kwargs)
        r = _wrap(impl(*_dev(args, qual), **_dev(kwargs, qual)))
        if after is not None:
            after(r)
        return _same_out(r, kwargs)
    f.__name__ = qual.rsplit(".", 1)[-1]
    f.__qualname__ = qual
    return f


def _ufunc(qual, impl, entry):
    """A ufunc: operands must be device arrays or scalars (CuPy refuses lists and NumPy)."""
    sig = _signature(entry)
    nin = impl.nin

    def f(*args, **kwargs):
        _bind(sig, qual, args, kwargs)
        for x in args[:nin]:
            if not isinstance(x, (ndarray, numbers.Number, np.generic)):
                raise TypeError(f"Unsupported type {type(x)} in {qual}")
        return _same_out(_wrap(impl(*_dev(args, qual), **_dev(kwargs, qual))), kwargs)
    f.__name__ = qual.rsplit(".", 1)[-1]
    f.nin, f.nout = impl.nin, impl.nout
    return f


def _asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    if isinstance(a, ndarray):
        r = np.asarray(a._a, dtype=dtype, order=order)
        return a if r is a._a else ndarray._of(r)
    _upload(a)
    return ndarray._of(np.array(a, dtype=dtype, order=order, copy=True))


def _array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return ndarray._of(np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    _upload(obj)
    return ndarray._of(np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def _asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def _get_array_module(*args):
    return cupy if any(isinstance(a, ndarray) for a in args) else np


def _sorting(name):
    impl = getattr(np, name)

    def f(a, axis=-1, kind=None):
        if kind not in (None, "stable"):
            raise ValueError(f"cupy.{name}: kind must be None or 'stable', got {kind!r}")
        return _wrap(impl(_dev(a, f"cupy.{name}"), axis=axis, kind="stable"))
    return f


# ---- linear algebra: no raise by default, as CuPy ------------------------------------------
_config = threading.local()


def _linalg_mode():
    return getattr(_config, "linalg", "ignore")


@contextlib.contextmanager
def _errstate(*, divide=None, over=None, under=None, invalid=None, linalg=None):
    old = _seterr(divide=divide, over=over, under=under, invalid=invalid, linalg=linalg)
    try:
        yield
    finally:
        _seterr(**old)


def _seterr(*, divide=None, over=None, under=None, invalid=None, linalg=None):
    old = _geterr()
    if any(v is not None for v in (divide, over, under, invalid)):
        raise NotImplementedError()
    if linalg is not None:
        if linalg not in ("ignore", "raise"):
            raise NotImplementedError()
        _config.linalg = linalg
    return old


def _geterr():
    return dict(divide=None, over=None, under=None, invalid=None, linalg=_linalg_mode())


def _checked(qual, impl, shape_of):
    """A cuSOLVER/cuBLAS-backed routine: NaN on failure unless linalg='raise' (one host sync
    per call to read the status, then numpy.linalg.LinAlgError)."""
    def f(*args, **kwargs):
        solver_calls[qual] += 1
        a, k = _dev(args, qual), _dev(kwargs, qual)
        raising = _linalg_mode() == "raise"
        if raising:
            _sync("linalg_status")
        with np.errstate(all="ignore"):
            try:
                return _wrap(impl(*a, **k))
            except np.linalg.LinAlgError:
                if raising:
                    raise np.linalg.LinAlgError(f"Error reported by {qual} (stand-in for "
                                                "cuSOLVER): devInfo != 0") from None
                shape, dtype = shape_of(*a)
                return ndarray._of(np.full(shape, np.nan, dtype=dtype))
    f.__name__ = qual.rsplit(".", 1)[-1]
    return f


def _first(*a, **k):
    return a[0].shape, np.result_type(a[0].dtype, np.float32)


def _second(*a, **k):
    return np.broadcast_shapes(a[1].shape), np.result_type(a[0].dtype, a[1].dtype, np.float32)


def _solve_triangular(a, b, trans=0, lower=False, unit_diagonal=False, overwrite_b=False,
                      check_finite=False):
    """cuBLAS trsm: never checks, never raises; a zero on the diagonal gives inf/NaN."""
    solver_calls["cupyx.scipy.linalg.solve_triangular"] += 1
    with np.errstate(all="ignore"):
        try:
            x = scipy.linalg.solve_triangular(a, b, trans=trans, lower=lower,
                                              unit_diagonal=unit_diagonal, check_finite=False)
        except np.linalg.LinAlgError:
            x = np.full(b.shape, np.nan, dtype=np.result_type(a.dtype, b.dtype, np.float32))
    return x


class _Device:
    """``cupy.cuda.Device()``: one device, whose queue is always empty here."""

    def __init__(self, device=None):
        self.id = 0

    def synchronize(self):
        pass


_cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                              Device=_Device)


# ============================================================================ namespaces
class _Namespace(types.ModuleType):
    """A CuPy namespace: only names in the snapshot, resolved on first use."""

    def __init__(self, qual, numpy_mod, special):
        super().__init__(qual)
        self.__dict__["_qual"], self.__dict__["_np"], self.__dict__["_special"] = (
            qual, numpy_mod, special)

    def __getattr__(self, name):
        entries = API["modules"][self._qual]
        entry = entries.get(name)
        if entry is None or name.startswith("_"):
            raise AttributeError(f"module {self._qual!r} has no attribute {name!r} (not in CuPy "
                                 f"{__version__}'s API, tests/fakecupy/cupy_api.json)")
        obj = self._resolve(name, entry)
        if obj is None:
            raise AttributeError(f"{self._qual}.{name} is CuPy API that the stand-in does not "
                                 "implement; add it to tests/fakecupy")
        self.__dict__[name] = obj
        return obj

    def _resolve(self, name, entry):
        qual = f"{self._qual}.{name}"
        if name in self._special:
            return self._special[name]
        target = getattr(self._np, name, None) if self._np is not None else None
        if target is None:
            return None
        if entry.get("numpy") or entry["kind"] == "value":
            return target
        if entry["kind"] == "ufunc" and isinstance(target, np.ufunc):
            return _ufunc(qual, target, entry)
        if entry["kind"] == "function" and callable(target):
            return _function(qual, target, entry, _SYNCING.get(name))
        return None

    def __dir__(self):
        return sorted(API["modules"][self._qual])


_SYNCING = {n: (lambda r, n=n: _sync(n)) for n in ("nonzero", "flatnonzero", "argwhere",
                                                  "unique", "count_nonzero_host")}

linalg = _Namespace("cupy.linalg", np.linalg, {
    "cholesky": _checked("cupy.linalg.cholesky", np.linalg.cholesky, _first),
    "slogdet": _checked("cupy.linalg.slogdet", np.linalg.slogdet, _first),
    "solve": _checked("cupy.linalg.solve", np.linalg.solve, _second),
    "inv": _checked("cupy.linalg.inv", np.linalg.inv, _first),
    "LinAlgError": np.linalg.LinAlgError,
})
stride_tricks = _Namespace("cupy.lib.stride_tricks", np.lib.stride_tricks, {})
cupy = _Namespace("cupy", np, {
    "ndarray": ndarray,
    "asarray": _asarray,
    "array": _array,
    "asnumpy": _asnumpy,
    "get_array_module": _get_array_module,
    "argsort": _sorting("argsort"),
    "sort": _sorting("sort"),
    "linalg": linalg,
    "lib": types.SimpleNamespace(stride_tricks=stride_tricks),
    "cuda": _cuda,
})
cupy.__version__ = __version__
scipy_linalg = _Namespace("cupyx.scipy.linalg", scipy.linalg, {
    "solve_triangular": _function("cupyx.scipy.linalg.solve_triangular", _solve_triangular,
                                  API["modules"]["cupyx.scipy.linalg"]["solve_triangular"]),
})
cupyx = _Namespace("cupyx", None, {
    "errstate": _errstate,
    "seterr": _seterr,
    "geterr": _geterr,
    "scipy": types.SimpleNamespace(linalg=scipy_linalg),
})

# the device array type's module is the stand-in's: mecref.backend recognises it by that name
ndarray.__module__ = __name__
