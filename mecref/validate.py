"""Checks at the public boundary: each raises MecrefError naming the argument,
what was expected and what was given. Inner functions trust their inputs.

Checks of array *values* (finite, > 0, labels in range, non-zero rows) read the data: on a GPU
each one is a host sync, a stall of the device's queue. A caller that has validated its data
once, the training step, runs its inner calls inside :func:`values_trusted`, where those checks
are skipped (shapes, dtypes and scalar arguments are still checked).
"""
from __future__ import annotations

import contextlib
import numbers
import threading

import numpy as np

from .backend import MecrefError, array_module

__all__ = ["check_array", "check_bits", "check_positive", "check_choice", "check_int",
           "values_trusted", "values_checked"]

_trust = threading.local()


@contextlib.contextmanager
def values_trusted():
    """Inside the block (this thread only), the checks that read array values are skipped."""
    old = getattr(_trust, "on", False)
    _trust.on = True
    try:
        yield
    finally:
        _trust.on = old


def values_checked() -> bool:
    """False inside :func:`values_trusted`: whether to run the checks that read array values."""
    return not getattr(_trust, "on", False)


def check_array(name, x, ndim=None, min_ndim=None, finite=True, floating=True, nonempty=True):
    """Validate an array argument and return it unchanged."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a numpy/cupy array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise MecrefError(f"{name} must be {ndim}-dimensional, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise MecrefError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if nonempty and x.size == 0:
        raise MecrefError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if floating and not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if finite and x.size and values_checked():
        xp = array_module(x)
        if not bool(xp.isfinite(x).all()):
            raise MecrefError(f"{name} must be finite, got NaN or inf")
    return x


def check_bits(name, bits, allowed=range(1, 9)):
    """Bit-width: an int in ``allowed`` (1..8 by default)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in allowed:
        raise MecrefError(f"{name} must be an integer in {_spans(allowed)}, got {bits!r}")
    return int(bits)


def _spans(values) -> str:
    """Sorted integers as runs: [1, ..., 8, 32] -> '1..8 or 32'."""
    vals, runs = sorted(set(int(v) for v in values)), []
    for v in vals:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return " or ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs)


def check_positive(name, value, allow_zero=False):
    """A finite real scalar > 0 (>= 0 with allow_zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise MecrefError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_int(name, value, lo=None, hi=None):
    """An integer in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise MecrefError(f"{name} must be an integer >= {lo}, got {v}")
        if lo is None:
            raise MecrefError(f"{name} must be an integer <= {hi}, got {v}")
        raise MecrefError(f"{name} must be an integer in [{lo}, {hi}], got {v}")
    return v


def check_choice(name, value, choices):
    """One of a fixed set of names."""
    if value not in choices:
        raise MecrefError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
