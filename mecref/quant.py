"""Fake quantizers: forward/backward pairs with closed-form straight-through gradients.

Every quantizer is a pair, named after the math::

    y, cache = lsq_quantize(x, s, bits, signed=True)   # forward: fake-quantized x
    dx, ds = lsq_quantize_backward(cache, dy)          # backward: one gradient per input

- ``ste_quantize``: ``y = s clip(round(x/s), Qn, Qp)`` with the step ``s`` given (Q2)
- ``lsq_quantize``: the same, with LSQ's gradient for ``s`` (Q3, Q4); ``lsq_init_step``
- ``lsqplus_quantize``: ``y = s clip(round((x-beta)/s), Qn, Qp) + beta`` (Q5); ``lsqplus_init``
- ``pact_quantize``: ``y = round(clip(x, 0, alpha) Qp/alpha) alpha/Qp`` (Q6)
- ``dorefa_weight_quantize``: ``y = 2 q_k(tanh(w)/(2 max|tanh w|) + 1/2) - 1`` (Q7)
- ``dorefa_act_quantize``: ``y = q_k(clip(x, 0, 1))`` (Q8)

The Q-numbers point to the sections of ``docs/derivations.md`` that derive each gradient.

Conventions
-----------
- Integer range (:func:`qrange`): unsigned ``Qn = 0, Qp = 2^b - 1``; signed
  ``Qn = -2^(b-1), Qp = 2^(b-1) - 1`` for ``b >= 2``. Signed ``b = 1`` is the binary
  quantizer: codes ``{-1, +1}`` (levels ``{-s, +s}``), ``code = sign(v)`` with
  ``sign(0) = +1``, and ``(Qn, Qp) = (-1, +1)`` so that the clip range ``[Qn s, Qp s]``, the
  STE mask, LSQ's outside gradient (``Qn`` or ``Qp``) and its gradient scale
  ``g = 1/sqrt(N Qp)`` keep their meaning (derivations Q1). ``restricted=True`` (``ste``,
  ``lsq``, ``lsqplus``) gives the symmetric signed range ``Qn = -Qp = -(2^(b-1) - 1)``
  (lsq-net's ``symmetric=True``; Q1).
- ``round`` is round-half-to-even (``xp.rint``), as in NumPy, CuPy and PyTorch.
- The straight-through mask (``ste``, ``lsq``, ``lsqplus``): ``mask="unrounded"`` (the
  default, the LSQ paper's and lsq-net's) passes the gradient where ``Qn <= v <= Qp``;
  ``mask="rounded"`` (PyTorch's fake-quantize ops) where ``Qn <= round(v) <= Qp``, about
  ``[Qn - 1/2, Qp + 1/2]``. Values are the same; gradients differ in the two half-step
  bands just outside the range (derivations Q10, docs/conventions.md).
- Steps ``s`` (and ``alpha``, ``beta``) are a Python number or an array that broadcasts
  against ``x`` without enlarging it: ``()`` per tensor, ``(C_out, 1, 1, 1)`` per output
  channel of a conv weight ``(C_out, C_in, k, k)``, ``(C_out, 1)`` for a linear weight
  ``(C_out, C_in)``. They are cast to ``x.dtype`` (float32 inputs stay float32), and their
  gradients are summed back to their own shape (``()`` for a Python number, returned as a
  0-d array).
- Bit-widths are 1..8. Full precision (``bits = 32``) is not a quantizer: the layers skip
  quantization altogether, and every function here rejects ``bits = 32``.
- ``x`` (or ``w``) is a floating array with at least one dimension and finite values.
- Caches are opaque tuples: pass them to the matching ``*_backward`` only.
- One code path for NumPy and CuPy: ``xp = array_module(x)``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import MecrefError, array_module
from .validate import check_array, check_bits, check_choice, check_positive, values_checked

__all__ = [
    "qrange",
    "ste_quantize", "ste_quantize_backward",
    "lsq_quantize", "lsq_quantize_backward", "lsq_init_step",
    "lsqplus_quantize", "lsqplus_quantize_backward", "lsqplus_init",
    "pact_quantize", "pact_quantize_backward",
    "dorefa_weight_quantize", "dorefa_weight_quantize_backward",
    "dorefa_act_quantize", "dorefa_act_quantize_backward",
]


# ----------------------------------------------------------------------------- range
def qrange(bits, signed, restricted=False):
    """Integer code range ``(Qn, Qp)`` of a ``bits``-bit quantizer (derivations Q1).

    .. math::
        \\text{unsigned: } Q_n = 0,\\; Q_p = 2^b - 1 \\qquad
        \\text{signed: } Q_n = -2^{b-1},\\; Q_p = 2^{b-1} - 1 \\quad (b \\ge 2)

    Signed ``b = 1`` is binary: codes ``{-1, +1}``, so ``(Qn, Qp) = (-1, 1)``. With
    ``restricted``, signed ``b >= 2`` drops the most negative code: ``Qn = -Qp``.

    Parameters
    ----------
    bits : int
        Bit-width, 1..8.
    signed : bool
        Signed (weights) or unsigned (activations after ReLU).
    restricted : bool
        Signed only: the symmetric range ``Qn = -Qp = -(2^(b-1) - 1)``, one code fewer
        (lsq-net's ``symmetric=True``; binary ``b = 1`` is already symmetric).

    Returns
    -------
    (Qn, Qp) : tuple of int
    """
    bits = check_bits("bits", bits)
    signed = _check_flag("signed", signed)
    if _check_flag("restricted", restricted) and not signed:
        raise MecrefError("restricted applies to signed ranges only (Qn = -Qp), got "
                          "restricted=True with signed=False")
    if not signed:
        return 0, 2 ** bits - 1
    if bits == 1:
        return -1, 1
    Qp = 2 ** (bits - 1) - 1
    return (-Qp if restricted else -Qp - 1), Qp


# ----------------------------------------------------------------------------- helpers
def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_x(name, x):
    check_array(name, x, min_ndim=1)
    return array_module(x)


def _check_param(name, p, x, positive=True):
    """A scalar or an array broadcasting against x (not enlarging it), cast to x.dtype."""
    xp = array_module(x)
    if isinstance(p, numbers.Real) and not isinstance(p, (bool, np.bool_)):
        v = check_positive(name, p) if positive else float(p)
        if not math.isfinite(v):
            raise MecrefError(f"{name} must be finite, got {p!r}")
        with np.errstate(over="ignore"):
            c = np.asarray(v, dtype=x.dtype)     # checked on the host: no device read
        return xp.asarray(_check_cast(name, c, p, positive))
    if not hasattr(p, "shape"):
        raise TypeError(f"{name} must be a real number or a numpy/cupy array, "
                        f"got {type(p).__name__}")
    check_array(name, p)
    array_module(x, p)  # raises on a numpy/cupy mix
    try:
        ok = np.broadcast_shapes(tuple(p.shape), tuple(x.shape)) == tuple(x.shape)
    except ValueError:
        ok = False
    if not ok:
        raise MecrefError(f"{name} of shape {tuple(p.shape)} must broadcast against x of shape "
                          f"{tuple(x.shape)} without enlarging it (e.g. () or (C, 1, ..., 1))")
    if positive and values_checked() and not bool((p > 0).all()):
        raise MecrefError(f"{name} must be > 0 everywhere, got min {float(p.min())!r}")
    with np.errstate(over="ignore"):
        c = p.astype(x.dtype, copy=False)
    return _check_cast(name, c, p, positive) if values_checked() else c


def _check_cast(name, c, p, positive):
    """The parameter as x's dtype must still be finite, and a positive one (a step or a clip
    level, divided by) at least the dtype's smallest normal number: 1e-300 rounds to 0 in
    float32 and 1e300 overflows, and either would make x / s or s * code inf or NaN."""
    xp = array_module(c)
    info = np.finfo(c.dtype)
    bad = ~xp.isfinite(c)
    if positive:
        bad |= c < info.tiny
    if bool(bad.any()):
        given = (repr(p) if isinstance(p, numbers.Real)
                 else f"an array with min {float(p.min())!r}, max {float(p.max())!r}")
        lo = float(info.tiny) if positive else -float(info.max)
        raise MecrefError(f"{name} must lie in [{lo:.3g}, {float(info.max):.3g}] to be usable "
                          f"in x's dtype {c.dtype}, got {given} (it rounds to 0, a subnormal "
                          f"or inf there)")
    return c


def _check_grad_scale(grad_scale):
    if grad_scale is None:
        return None
    return check_positive("grad_scale", grad_scale)


MASKS = ("unrounded", "rounded")


def _check_mask(mask, bits, signed):
    check_choice("mask", mask, MASKS)
    if mask == "rounded" and signed and bits == 1:
        raise MecrefError("mask must be 'unrounded' for the binary quantizer (signed, bits=1): "
                          "its code sign(v) is never out of range, so a rounded-code mask would "
                          "pass every gradient; got mask='rounded'")
    return mask == "rounded"


def _check_dy(dy, shape):
    if not hasattr(dy, "shape"):
        raise TypeError(f"dy must be a numpy/cupy array, got {type(dy).__name__}")
    if tuple(dy.shape) != tuple(shape):
        raise MecrefError(f"dy must have the output's shape {tuple(shape)}, got {tuple(dy.shape)}")


def _sum_to_shape(a, shape):
    """Sum a broadcast gradient back to a parameter's shape (derivations Q4)."""
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and a.shape[lead + i] != 1)
    if axes:
        a = a.sum(axis=axes, keepdims=True)
    return a.reshape(shape)


def _codes(v, Qn, Qp, binary, rounded=False):
    """Integer codes ``clip(round(v), Qn, Qp)`` (binary: ``sign(v)``, sign(0) = +1) and the
    STE mask ``Qn <= v <= Qp`` (derivations Q1, Q2), or with ``rounded`` the mask
    ``Qn <= round(v) <= Qp`` (Q10)."""
    xp = array_module(v)
    if binary:
        code = (v >= 0).astype(v.dtype)
        code *= 2
        code -= 1
        inside = (v >= Qn) & (v <= Qp)
    elif rounded:
        code = xp.rint(v)
        inside = (code >= Qn) & (code <= Qp)
        xp.clip(code, Qn, Qp, out=code)
    else:
        # three passes instead of five (Q1): round and clip commute (the bounds are integers),
        # and v lies in [Qn, Qp] exactly where clipping leaves it unchanged (NaN: outside)
        code = xp.clip(v, Qn, Qp)
        inside = v == code
        xp.rint(code, out=code)
    return code, inside


def _floor_step(s, dtype):
    """Keep an initial step positive for an all-zero (or constant) tensor or channel."""
    xp = array_module(s)
    return xp.asarray(xp.maximum(s, float(np.finfo(dtype).eps)), dtype=dtype)


# ----------------------------------------------------------------------------- STE
def ste_quantize(x, s, bits, signed=False, mask="unrounded", restricted=False):
    """Uniform fake quantizer with a given step and the straight-through estimator (Q2).

    .. math::
        v = x / s, \\qquad y = s \\cdot \\mathrm{clip}(\\mathrm{round}(v), Q_n, Q_p)

    Parameters
    ----------
    x : ndarray, any shape, floating
    s : float or ndarray broadcasting against ``x`` (``()``, ``(C, 1, ..., 1)``), > 0
    bits : int, 1..8
    signed : bool
        ``(Qn, Qp)`` from :func:`qrange`; signed ``b = 1`` gives levels ``{-s, +s}``.
    mask : "unrounded" or "rounded"
        The gradient passes where ``Qn <= v <= Qp`` (default) or where
        ``Qn <= round(v) <= Qp`` (PyTorch's ``fake_quantize_per_tensor_affine``; Q10).
    restricted : bool
        Signed only: ``Qn = -Qp`` (:func:`qrange`).

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
    cache : tuple for :func:`ste_quantize_backward`
    """
    _check_x("x", x)
    Qn, Qp = qrange(bits, signed, restricted)
    rounded = _check_mask(mask, bits, signed)
    s = _check_param("s", s, x)
    v = x / s
    code, inside = _codes(v, Qn, Qp, binary=signed and bits == 1, rounded=rounded)
    code *= s
    return code, (inside,)


def ste_quantize_backward(cache, dy):
    """Straight-through gradient (Q2): ``dx = dy`` inside ``[Qn s, Qp s]``, 0 outside.

    .. math::
        \\frac{\\partial y}{\\partial x} = 1[Q_n \\le x/s \\le Q_p]

    (``mask="rounded"``: ``1[Qn <= round(x/s) <= Qp]``, Q10.)

    Parameters
    ----------
    cache : from :func:`ste_quantize`
    dy : ndarray, shape of ``y``

    Returns
    -------
    dx : ndarray, shape of ``x``
    """
    (inside,) = cache
    _check_dy(dy, inside.shape)
    return dy * inside


# ----------------------------------------------------------------------------- LSQ
def lsq_quantize(x, s, bits, signed=False, grad_scale=None, mask="unrounded", restricted=False):
    """Learned step size quantization, LSQ (Esser et al., ICLR 2020) (Q3, Q4).

    Forward as :func:`ste_quantize`; the backward also gives the step's gradient

    .. math::
        \\frac{\\partial y}{\\partial s} = \\begin{cases}
            \\mathrm{round}(v) - v & Q_n \\le v \\le Q_p \\\\
            Q_n & v < Q_n \\\\ Q_p & v > Q_p \\end{cases}
        \\qquad ds = g \\sum_{\\text{elements of } s} dy \\cdot \\frac{\\partial y}{\\partial s},
        \\qquad g = \\frac{1}{\\sqrt{N Q_p}}

    with ``N = x.size / s.size`` the number of elements that share one step value (all of
    ``x`` per tensor; ``C_in k k`` per output channel of a conv weight; for activations the
    batch is included, pass ``grad_scale`` for another count).

    Parameters
    ----------
    x : ndarray, any shape, floating
    s : float or ndarray broadcasting against ``x``, > 0
    bits : int, 1..8
    signed : bool
    grad_scale : float > 0 or None
        ``g``; None gives ``1/sqrt(N Qp)``, 1.0 disables the scaling.
    mask : "unrounded" or "rounded"
        "inside" means ``Qn <= v <= Qp`` (default, the LSQ paper) or ``Qn <= round(v) <= Qp``
        (PyTorch's ``_fake_quantize_learnable_per_tensor_affine``); the formulas above hold
        with either mask (Q10).
    restricted : bool
        Signed only: ``Qn = -Qp`` (:func:`qrange`; lsq-net's ``symmetric=True``).

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
    cache : tuple for :func:`lsq_quantize_backward`
    """
    _check_x("x", x)
    Qn, Qp = qrange(bits, signed, restricted)
    rounded = _check_mask(mask, bits, signed)
    s = _check_param("s", s, x)
    g = _check_grad_scale(grad_scale)
    if g is None:
        g = 1.0 / math.sqrt((x.size // s.size) * Qp)
    v = x / s
    code, inside = _codes(v, Qn, Qp, binary=signed and bits == 1, rounded=rounded)
    y = code * s
    v *= inside
    code -= v                      # dy/ds: code - v inside, Qn or Qp outside
    return y, (inside, code, s.shape, g)


def lsq_quantize_backward(cache, dy):
    """Gradients of :func:`lsq_quantize` (Q3): ``dx`` (STE) and ``ds`` (shape of ``s``).

    .. math::
        dx = dy \\cdot 1[Q_n \\le v \\le Q_p], \\qquad
        ds = g \\sum dy \\cdot (\\mathrm{code} - v \\cdot 1[Q_n \\le v \\le Q_p])

    Returns
    -------
    dx : ndarray, shape of ``x``
    ds : ndarray, shape of ``s`` (0-d for a scalar step)
    """
    inside, dyds, s_shape, g = cache
    _check_dy(dy, inside.shape)
    ds = _sum_to_shape(dy * dyds, s_shape)
    ds *= g
    return dy * inside, ds


def lsq_init_step(x, bits, signed=False, per_channel=False):
    """LSQ's initial step (Q3): ``s = 2 mean|x| / sqrt(Qp)``.

    Per channel the mean runs over all axes but 0 and ``s`` has shape ``(C, 1, ..., 1)``, so it
    broadcasts against ``x``; per tensor ``s`` is a 0-d array. A step that would be 0 (an
    all-zero tensor or channel) is floored at the dtype's machine epsilon.

    Returns
    -------
    s : ndarray of ``x.dtype``, shape ``()`` or ``(C, 1, ..., 1)``
    """
    xp = _check_x("x", x)
    Qn, Qp = qrange(bits, signed)
    per_channel = _check_flag("per_channel", per_channel)
    if per_channel:
        m = xp.abs(x).mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    else:
        m = xp.asarray(xp.abs(x).mean(), dtype=x.dtype)
    return _floor_step(m * (2.0 / math.sqrt(Qp)), x.dtype)


# ----------------------------------------------------------------------------- LSQ+
def lsqplus_quantize(x, s, beta, bits, signed=False, grad_scale=None, mask="unrounded",
                     restricted=False):
    """LSQ+ (Bhalgat et al., CVPRW 2020): learned step ``s`` and offset ``beta`` (Q5).

    .. math::
        v = (x - \\beta)/s, \\qquad
        y = s \\cdot \\mathrm{clip}(\\mathrm{round}(v), Q_n, Q_p) + \\beta

    Backward: ``dx`` and ``ds`` as in LSQ (with this ``v``), and
    ``dbeta = g_beta * sum(dy * 1[v outside [Qn, Qp]])``. Both ``s`` and ``beta`` get LSQ's
    gradient scale, ``g = 1/sqrt(N Qp)`` with ``N = x.size / s.size`` (resp. ``beta.size``),
    or ``grad_scale`` for both when given.

    Parameters
    ----------
    x : ndarray, any shape, floating
    s : float or ndarray broadcasting against ``x``, > 0
    beta : float or ndarray broadcasting against ``x`` (any sign)
    bits : int, 1..8
    signed : bool
    grad_scale : float > 0 or None
    mask : "unrounded" or "rounded"
        As in :func:`lsq_quantize` (Q10); "rounded" with ``beta = -z s`` for an integer ``z``
        is PyTorch's learnable affine fake-quantizer (docs/conventions.md).
    restricted : bool
        Signed only: ``Qn = -Qp`` (:func:`qrange`).

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
    cache : tuple for :func:`lsqplus_quantize_backward`
    """
    _check_x("x", x)
    Qn, Qp = qrange(bits, signed, restricted)
    rounded = _check_mask(mask, bits, signed)
    s = _check_param("s", s, x)
    beta = _check_param("beta", beta, x, positive=False)
    g = _check_grad_scale(grad_scale)
    g_s = g if g is not None else 1.0 / math.sqrt((x.size // s.size) * Qp)
    g_beta = g if g is not None else 1.0 / math.sqrt((x.size // beta.size) * Qp)
    v = x - beta
    v /= s
    code, inside = _codes(v, Qn, Qp, binary=signed and bits == 1, rounded=rounded)
    y = code * s
    y += beta
    v *= inside
    code -= v
    return y, (inside, code, s.shape, beta.shape, g_s, g_beta)


def lsqplus_quantize_backward(cache, dy):
    """Gradients of :func:`lsqplus_quantize` (Q5).

    .. math::
        dx = dy \\cdot 1_{in}, \\quad
        ds = g_s \\sum dy\\,(\\mathrm{code} - v\\,1_{in}), \\quad
        d\\beta = g_\\beta \\sum dy\\,(1 - 1_{in})

    Returns
    -------
    dx : ndarray, shape of ``x``
    ds : ndarray, shape of ``s``
    dbeta : ndarray, shape of ``beta``
    """
    inside, dyds, s_shape, beta_shape, g_s, g_beta = cache
    _check_dy(dy, inside.shape)
    dx = dy * inside
    ds = _sum_to_shape(dy * dyds, s_shape)
    ds *= g_s
    dbeta = _sum_to_shape(dy - dx, beta_shape)
    dbeta *= g_beta
    return dx, ds, dbeta


def lsqplus_init(x, bits, signed=False, per_channel=False):
    """Initial ``(s, beta)`` for LSQ+ (Q5).

    - unsigned (activations, the offset's purpose): min/max, so the grid spans the data,
      ``s = (max x - min x) / (Qp - Qn)``, ``beta = min x - Qn s``.
    - signed (weights): the paper's rule for symmetric weights,
      ``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``, ``beta = 0``.

    Statistics run over the whole tensor, or per channel over all axes but 0 (shapes
    ``(C, 1, ..., 1)``). ``s`` is floored at the dtype's machine epsilon.

    Returns
    -------
    s, beta : ndarrays of ``x.dtype``, shape ``()`` or ``(C, 1, ..., 1)``
    """
    xp = _check_x("x", x)
    Qn, Qp = qrange(bits, signed)
    per_channel = _check_flag("per_channel", per_channel)
    axes = tuple(range(1, x.ndim)) if per_channel else None
    keep = per_channel
    if signed:
        mu = x.mean(axis=axes, keepdims=keep)
        sigma = x.std(axis=axes, keepdims=keep)
        s = xp.maximum(xp.abs(mu - 3 * sigma), xp.abs(mu + 3 * sigma)) / (2 ** (bits - 1))
        s = _floor_step(xp.asarray(s, dtype=x.dtype), x.dtype)
        return s, xp.zeros_like(s)
    lo = xp.asarray(x.min(axis=axes, keepdims=keep), dtype=x.dtype)
    hi = xp.asarray(x.max(axis=axes, keepdims=keep), dtype=x.dtype)
    s = _floor_step((hi - lo) / (Qp - Qn), x.dtype)
    return s, xp.asarray(lo - Qn * s, dtype=x.dtype)


# ----------------------------------------------------------------------------- PACT
def pact_quantize(x, alpha, bits):
    """PACT (Choi et al. 2018): activations clipped at a learned ``alpha``, then quantized (Q6).

    .. math::
        y = \\mathrm{round}\\!\\left(\\mathrm{clip}(x, 0, \\alpha) \\frac{Q_p}{\\alpha}\\right)
            \\frac{\\alpha}{Q_p}, \\qquad Q_p = 2^b - 1

    Parameters
    ----------
    x : ndarray, any shape, floating
    alpha : float or ndarray broadcasting against ``x``, > 0
    bits : int, 1..8

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
    cache : tuple for :func:`pact_quantize_backward`
    """
    xp = _check_x("x", x)
    _, Qp = qrange(bits, False)
    alpha = _check_param("alpha", alpha, x)
    y = xp.clip(x, 0, alpha)
    y *= Qp / alpha
    xp.rint(y, out=y)
    y *= alpha / Qp
    above = x >= alpha
    inside = (x >= 0) & ~above
    return y, (inside, above, alpha.shape)


def pact_quantize_backward(cache, dy):
    """PACT's straight-through gradients (Q6), the paper's rule:

    .. math::
        dx = dy \\cdot 1[0 \\le x < \\alpha], \\qquad d\\alpha = \\sum dy \\cdot 1[x \\ge \\alpha]

    Inside the range the rounding error's own dependence on ``alpha`` is dropped (the paper
    treats the quantized output as ``clip(x, 0, alpha)``; Q6 gives the term that is left out).

    Returns
    -------
    dx : ndarray, shape of ``x``
    dalpha : ndarray, shape of ``alpha``
    """
    inside, above, alpha_shape = cache
    _check_dy(dy, inside.shape)
    return dy * inside, _sum_to_shape(dy * above, alpha_shape)


# ----------------------------------------------------------------------------- DoReFa
def dorefa_weight_quantize(w, bits):
    """DoReFa-Net weight quantizer (Zhou et al. 2016), per tensor (Q7).

    .. math::
        t = \\tanh w, \\quad M = \\max|t|, \\quad
        y = 2\\, q_k\\!\\left(\\frac{t}{2M} + \\frac12\\right) - 1, \\quad
        q_k(r) = \\frac{\\mathrm{round}((2^k - 1) r)}{2^k - 1}

    ``bits = 1`` follows the paper's binary case: ``y = E sign(w)``, ``E = mean|w|``,
    ``sign(0) = +1``.

    Parameters
    ----------
    w : ndarray, any shape, floating, not all zero
    bits : int, 1..8

    Returns
    -------
    y : ndarray, shape and dtype of ``w``, levels in [-1, 1] (``{-E, +E}`` for ``bits = 1``)
    cache : tuple for :func:`dorefa_weight_quantize_backward`
    """
    xp = _check_x("w", w)
    bits = check_bits("bits", bits)
    if bits == 1:
        E = xp.abs(w).mean()
        y = (w >= 0).astype(w.dtype)
        y *= 2
        y -= 1
        y *= E
        return y, (w.shape, None, None, None)
    Qp = 2 ** bits - 1
    t = xp.tanh(w)
    a = xp.abs(t)
    M = a.max()
    if values_checked() and not bool(M > 0):
        raise MecrefError("w must have a nonzero entry (DoReFa divides by max|tanh w|), "
                          "got all zeros")
    at_max = a == M            # a mask, not indices: their count would be a host sync
    y = t * (Qp / (2 * M))     # (2^k - 1) (t / 2M + 1/2), in place below
    y += Qp / 2
    xp.rint(y, out=y)
    y *= 2 / Qp
    y -= 1
    return y, (w.shape, t, M, at_max)


def dorefa_weight_quantize_backward(cache, dy):
    """Gradient of :func:`dorefa_weight_quantize` (Q7): straight through ``q_k``, exact
    through ``tanh`` and the normalisation, the ``max`` included.

    .. math::
        dw_j = dy_j \\frac{1 - t_j^2}{M}
              - 1[j \\in J] \\frac{\\mathrm{sign}(t_j)(1 - t_j^2)}{|J|}
                \\frac{\\sum_i dy_i t_i}{M^2}

    with ``J`` the entries where ``|t|`` attains ``M`` (ties share the max's gradient
    equally). ``bits = 1``: ``dw = dy`` (sign as identity, ``E`` held constant).

    Returns
    -------
    dw : ndarray, shape of ``w``
    """
    shape, t, M, at_max = cache
    _check_dy(dy, shape)
    if t is None:
        return dy.copy()
    xp = array_module(t)
    dw = 1 - t * t
    dw *= dy
    dw /= M
    c = xp.vdot(dy.reshape(-1), t.reshape(-1)) / (M * M)
    dw -= at_max * (c * xp.sign(t) * (1 - t * t) / at_max.sum())
    return dw


def dorefa_act_quantize(x, bits):
    """DoReFa-Net activation quantizer (Q8): ``y = q_k(clip(x, 0, 1))``.

    .. math::
        y = \\frac{\\mathrm{round}((2^k - 1)\\,\\mathrm{clip}(x, 0, 1))}{2^k - 1}

    the uniform quantizer with ``s = 1/(2^k - 1)``, unsigned.

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
    cache : tuple for :func:`dorefa_act_quantize_backward`
    """
    xp = _check_x("x", x)
    bits = check_bits("bits", bits)
    Qp = 2 ** bits - 1
    y = xp.clip(x, 0, 1)
    y *= Qp
    xp.rint(y, out=y)
    y /= Qp
    inside = (x >= 0) & (x <= 1)
    return y, (inside,)


def dorefa_act_quantize_backward(cache, dy):
    """Straight-through gradient of :func:`dorefa_act_quantize` (Q8):
    ``dx = dy * 1[0 <= x <= 1]``.

    Returns
    -------
    dx : ndarray, shape of ``x``
    """
    (inside,) = cache
    _check_dy(dy, inside.shape)
    return dy * inside
