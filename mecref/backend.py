"""The one seam between NumPy and CuPy.

Every other module takes its array module from the arrays it is given::

    xp = array_module(x)          # numpy or cupy, whichever owns x

and creates new arrays on a backend chosen by name with :func:`get_xp`.
CuPy is imported here, lazily, and nowhere else.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

__all__ = [
    "cpu_model",
    "MecrefError", "BackendUnavailableError", "BACKENDS",
    "get_xp", "array_module", "backend_name", "to_host", "to_backend",
    "cupy_usable", "default_dtype", "scipy_blas_single_thread", "cupy_stand_in",
    "cupyx_module", "row_dot", "MALLOC_ENV",
]

BACKENDS = ("numpy", "cupy")

def install_hint() -> str:
    """How to get CuPy, in the form that works from where the user is: from a clone of the
    repository (mecref imported from a source tree with its pyproject.toml) the editable
    install of the ``gpu`` extra, with the clone's path unless it is the current folder;
    otherwise the extra of the installed package."""
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        where = "." if Path(os.getcwd()).resolve() == root else str(root)
        cmd = f'python3 -m pip install -e "{where}[gpu]"'
    else:
        cmd = 'python3 -m pip install "mecref[gpu]"'
    return (f"install the GPU extra with `{cmd}` (CuPy for CUDA 12; for CUDA 13 "
            f"`python3 -m pip install cupy-cuda13x`) on a machine with an NVIDIA GPU and driver, "
            f"or use backend='numpy'")


class MecrefError(ValueError):
    """Base class of mecref's own errors (a ValueError: bad input or state)."""


class BackendUnavailableError(MecrefError, RuntimeError):
    """backend='cupy' was asked for, but CuPy or a usable CUDA device is missing."""


_cupy_state: dict = {}


def _import_cupy():
    """Import CuPy and check that a CUDA device is usable; cache the verdict."""
    if "module" in _cupy_state:
        return _cupy_state["module"]
    if "error" in _cupy_state:
        raise BackendUnavailableError(_cupy_state["error"])
    try:
        import cupy  # the only import of cupy in mecref
    except Exception as exc:  # ImportError, or a broken CUDA library underneath
        msg = f"backend='cupy' needs CuPy, which could not be imported ({exc!r}); {install_hint()}"
        _cupy_state["error"] = msg
        raise BackendUnavailableError(msg) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            raise RuntimeError("no CUDA device found")
        cupy.zeros(1).sum().item()  # touches the driver and the kernel compiler
    except Exception as exc:
        msg = (f"backend='cupy': CuPy {cupy.__version__} is installed but no CUDA device is "
               f"usable ({type(exc).__name__}: {exc}); {install_hint()}")
        _cupy_state["error"] = msg
        raise BackendUnavailableError(msg) from None
    _cupy_state["module"] = cupy
    return cupy


@contextlib.contextmanager
def cupy_stand_in(cupy_module, cupyx_module=None):
    """Inside the block, ``backend="cupy"`` is ``cupy_module`` instead of the real CuPy.

    For tests on machines without a GPU: ``tests/fakecupy`` is a stand-in with CuPy's API
    whose arrays refuse to mix with NumPy's (docs/design.md). Arrays whose type is defined in
    the stand-in's package count as device arrays, exactly as ``cupy.ndarray`` does; nothing
    else in mecref changes. The real CuPy's state (and its cached verdict) comes back after.
    """
    saved = dict(_cupy_state)
    _cupy_state.clear()
    _cupy_state.update(module=cupy_module, cupyx=cupyx_module,
                       array_package=cupy_module.ndarray.__module__.split(".")[0])
    try:
        yield cupy_module
    finally:
        _cupy_state.clear()
        _cupy_state.update(saved)


def cupyx_module():
    """CuPy's companion package ``cupyx`` (``errstate``, ``cupyx.scipy.linalg``), for the
    CuPy path of the entropy terms; imported on first use (``cupyx.scipy.linalg`` loads
    cuBLAS, so only on a machine with CUDA)."""
    _import_cupy()
    if _cupy_state.get("cupyx") is None:
        import cupyx
        import cupyx.scipy.linalg  # noqa: F401  (solve_triangular)
        _cupy_state["cupyx"] = cupyx
    return _cupy_state["cupyx"]


def row_dot(a, b=None):
    """Row sums ``sum_j a_ij`` (``b`` None) or row-wise dot products ``sum_j a_ij b_ij`` of
    2-D arrays, on their backend.

    On NumPy ``einsum`` forms them without a temporary; CuPy's ``einsum`` is planned in
    Python on every call, so there a product and a sum (two kernels) do it.
    """
    xp = array_module(a)
    if xp is np:
        return np.einsum("ij->i", a) if b is None else np.einsum("ij,ij->i", a, b)
    return a.sum(axis=1) if b is None else (a * b).sum(axis=1)


def _on_device(a) -> bool:
    """True for a CuPy array (or one of the stand-in's, see :func:`cupy_stand_in`)."""
    pkg = type(a).__module__.split(".")[0]
    return pkg == "cupy" or pkg == _cupy_state.get("array_package")


def cupy_usable() -> bool:
    """True when backend='cupy' would work here (CuPy imports and a GPU answers)."""
    try:
        _import_cupy()
        return True
    except BackendUnavailableError:
        return False


def get_xp(backend: str = "numpy"):
    """Array module for a backend name: ``numpy`` or ``cupy``.

    Raises
    ------
    ValueError
        for an unknown name.
    BackendUnavailableError
        for ``"cupy"`` where CuPy or a CUDA device is missing; the message says which and how
        to install it.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise MecrefError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return np
    return _import_cupy()


def array_module(*arrays):
    """The array module (numpy or cupy) that owns the given arrays.

    Plain Python numbers and NumPy arrays give numpy. Mixing host and device arrays is an
    error: move them with :func:`to_backend` first.
    """
    mods = set()
    for a in arrays:
        if _on_device(a):
            mods.add("cupy")
        elif a is not None:
            mods.add("numpy")
    if "cupy" in mods:
        if len(mods) > 1 and any(isinstance(a, np.ndarray) for a in arrays):
            raise MecrefError("arrays live on different backends (numpy and cupy); "
                              "move them with mecref.backend.to_backend first")
        return _import_cupy()
    return np


def backend_name(xp) -> str:
    """'numpy' or 'cupy' for an array module."""
    return "numpy" if xp is np else "cupy"


def to_host(a):
    """A NumPy copy (or view) of an array from either backend; numbers pass through."""
    if _on_device(a):
        return a.get()
    return a


def to_backend(a, backend: str = "numpy", dtype=None):
    """Move an array to the named backend (a no-op when it is already there)."""
    xp = get_xp(backend)
    if xp is np:
        return np.asarray(to_host(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def default_dtype():
    """Training dtype: float32 (derivation checks in the tests use float64)."""
    return np.float32


@contextlib.contextmanager
def scipy_blas_single_thread():
    """Run SciPy's own BLAS/LAPACK on one thread inside the block; NumPy's keeps its threads.

    NumPy and SciPy wheels each bundle an OpenBLAS. After a multi-threaded call, one library's
    workers keep spinning for a while, so a small SciPy Cholesky that follows a NumPy GEMM
    (every training step with an entropy regulariser) waited ~8 ms instead of ~40 us
    (docs/benchmarks.md). The entropy terms factor small matrices (d x d or m x m, d, m of a
    few hundred), which one thread does as fast, so the training loop and the benchmarks run
    inside this block. Uses threadpoolctl.
    """
    from threadpoolctl import ThreadpoolController

    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS so it can be found)
    numpy_libs = os.sep + "numpy.libs" + os.sep
    ctl = ThreadpoolController()
    scipy_pools = [lib for lib in ctl.lib_controllers
                   if lib.user_api == "blas" and numpy_libs not in lib.filepath
                   and "scipy" in lib.filepath]
    saved = [lib.num_threads for lib in scipy_pools]
    for lib in scipy_pools:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(scipy_pools, saved):
            lib.set_num_threads(n)


def cpu_model():
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the platform's processor string,
    else None: recorded beside every timing, since the machines that run mecref differ."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or None


# glibc's allocator settings for a process that allocates the same large arrays step after
# step (the grid's workers start with them): a freed block up to 32 MiB stays in the heap for
# reuse instead of being a fresh mmap that page-faults in again
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

