"""What every layer shares: the :class:`Layer` base (params, grads, buffers, a train-mode
cache, reusable workspaces), the channel-major view :func:`_cm`, and the input checks."""
from __future__ import annotations

import numbers

import numpy as np

from ..backend import MecrefError, array_module


FULL_PRECISION = 32          # bits = 32: no quantizer at all


def _float32(xp, a):
    return xp.asarray(a, dtype=np.float32)


def _check_qbits(name, bits):
    """Bits of a quantized layer: 1..8, or 32 for full precision."""
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool) and int(bits) == FULL_PRECISION:
        return FULL_PRECISION
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= 8:
        raise MecrefError(f"{name} must be an integer in 1..8, or 32 for full precision, got {bits!r}")
    return int(bits)


def _check_dy(layer, dy, shape):
    if not hasattr(dy, "shape"):
        raise TypeError(f"{type(layer).__name__}.backward: dy must be a numpy/cupy array, "
                        f"got {type(dy).__name__}")
    if tuple(dy.shape) != tuple(shape):
        raise MecrefError(f"{type(layer).__name__}.backward: dy must have the output's shape "
                          f"{tuple(shape)}, got {tuple(dy.shape)}")


def _cm(a):
    """Swap the first two axes, ``(N, C, ...) <-> (C, N, ...)``: a view, its own inverse.

    Layers keep 4-D activations and their gradients channel-major in memory, ``(C, N, H, W)``,
    and hand them on as this ``(N, C, H, W)`` view (module docstring)."""
    return a.swapaxes(0, 1)


class Layer:
    """Base of every layer: empty ``params``, ``grads``, ``buffers``, ``no_decay``,
    ``positive``, a train-mode cache and a workspace of reusable arrays."""

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}
        self.no_decay, self.positive = set(), set()
        self._cache = None
        self._ws = {}

    def _buffer(self, xp, name, shape, dtype, zero=False):
        """A workspace array reused across steps (reallocated when the shape changes)."""
        a = self._ws.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype or array_module(a) is not xp:
            a = xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
            self._ws[name] = a
        return a

    def _pending(self):
        if self._cache is None:
            raise MecrefError(f"{type(self).__name__}.backward needs a forward(x, train=True) first")
        return self._cache

    def astype(self, dtype):
        """Cast params and buffers to ``dtype`` (e.g. float64 for gradient checks); returns self."""
        for d in (self.params, self.buffers):
            for k, v in d.items():
                d[k] = v.astype(dtype)
        self.grads, self._ws, self._cache = {}, {}, None
        return self

    def __repr__(self):
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({shapes})"


def _check_floating(layer, x):
    """x: a floating-point array (any shape)."""
    if not hasattr(x, "dtype") or not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise TypeError(f"{type(layer).__name__}: x must be a floating-point numpy/cupy array, "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")


def _check_image(layer, x, channels):
    """x: (N, channels, H, W) floating."""
    _check_floating(layer, x)
    name = type(layer).__name__
    if x.ndim != 4:
        raise MecrefError(f"{name}: x must be 4-dimensional (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise MecrefError(f"{name}: x must have {channels} channels (axis 1), "
                          f"got shape {tuple(x.shape)}")
