"""Quantization schemes as registered records (derivations N9, X2, X3).

A quantized layer (:class:`mecref.nn.QuantConv2d`, :class:`mecref.nn.QuantLinear`) fake-
quantizes two operands: its weights (signed, per output channel where the quantizer has a
step) and its input activations (unsigned after ReLU, signed for the images of the first
layer). A :class:`Scheme` names one :class:`Quantizer` for each; a Quantizer is the
forward/backward pair of :mod:`mecref.quant` plus what the layer needs to hold and initialise
it, and what the integer export needs to read its grid:

- ``params``: learnable arrays it adds to the layer (step, clip, offset), each with its shape
  rule, initial value, positivity and weight decay;
- ``buffers``: non-learnable state (the STE range's running maximum);
- ``init``: the data-driven initial values, from the first batch (or the weights);
- ``forward(x, p, bits, signed, train) -> (xq, cache)`` and
  ``backward(cache, dxq) -> (dx, {param: grad})``, ``p`` the layer's arrays by name;
- ``grid(p, x, bits, signed) -> (s, beta)``: the step and offset of its integer grid,
  ``q(x) = s * code + beta`` (for the integer export).

Adding a scheme is one :func:`register` call: the layers, ``TrainConfig``, the command line,
the tables and the export read the registry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import quant
from .backend import MecrefError, array_module

__all__ = ["Param", "Quantizer", "Scheme", "REGISTRY", "register", "unregister", "get", "names",
           "STE_EMA_MOMENTUM"]

STE_EMA_MOMENTUM = 0.1       # EMA of the batch max that sets the STE activation step


@dataclass(frozen=True)
class Param:
    """A learnable array a quantizer adds to its layer.

    ``per_channel``: shape (F, 1, ...) of the weights' output channels, else the activation
    quantizer's per-tensor shape (1, ..., 1). ``positive``: the optimiser keeps it above 0.
    ``decay``: weight decay applies (quantizer parameters usually have none)."""
    name: str
    init: float = 1.0
    per_channel: bool = False
    positive: bool = True
    decay: bool = False


@dataclass(frozen=True)
class Quantizer:
    """One operand's fake quantizer (see the module docstring)."""
    name: str
    forward: Callable
    backward: Callable
    grid: Callable
    params: tuple = ()
    buffers: tuple = ()
    init: Callable | None = None


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: the weight quantizer and the activation quantizer of a layer.

    ``act_signed`` quantizes signed inputs (the first layer's images) where ``act`` cannot
    (PACT clips at 0); None means ``act`` handles both."""
    name: str
    weight: Quantizer
    act: Quantizer
    label: str
    help: str = ""
    act_signed: Quantizer | None = field(default=None)

    def act_for(self, signed: bool) -> Quantizer:
        return self.act_signed if (signed and self.act_signed is not None) else self.act


REGISTRY: dict = {}


def register(scheme: Scheme, replace: bool = False) -> Scheme:
    """Add a scheme to the registry (``replace=True`` to redefine a name)."""
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a Scheme, got {type(scheme).__name__}")
    if not isinstance(scheme.name, str) or not scheme.name.isidentifier() or scheme.name == "fp32":
        raise MecrefError(f"a scheme's name must be an identifier other than 'fp32', got {scheme.name!r}")
    if scheme.name in REGISTRY and not replace:
        raise MecrefError(f"scheme {scheme.name!r} is already registered")
    REGISTRY[scheme.name] = scheme
    return scheme


def unregister(name: str):
    """Remove a registered scheme (tests that register one temporarily)."""
    REGISTRY.pop(name, None)


def get(name: str) -> Scheme:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MecrefError(f"scheme must be one of {names()}, got {name!r}") from None


def names() -> tuple:
    return tuple(REGISTRY)


# ----------------------------------------------------------------------------------------------
# The quantizers
# ----------------------------------------------------------------------------------------------

def _max_step(W, bits):
    """STE weights: s = max|w| / Qp per output channel, recomputed each forward (N9)."""
    xp = array_module(W)
    _, Qp = quant.qrange(bits, True)
    axes = tuple(range(1, W.ndim))
    return xp.maximum(xp.abs(W).max(axis=axes, keepdims=True), np.finfo(W.dtype).tiny) / Qp


def _ste_w_forward(W, p, bits, signed, train):
    return quant.ste_quantize(W, _max_step(W, bits), bits, signed=True)


def _ste_backward(cache, dy):
    return quant.ste_quantize_backward(cache, dy), {}


def _ste_w_grid(p, W, bits, signed):
    return _max_step(W, bits), None


def _batch_max(x, signed):
    xp = array_module(x)
    return (xp.abs(x) if signed else x).max()


def _range_step(p, x, bits, signed):
    _, Qp = quant.qrange(bits, signed)
    return array_module(p["a_max"]).maximum(p["a_max"], np.finfo(x.dtype).tiny) / Qp


def _ste_a_init(p, x, bits, signed):
    p["a_max"][...] = _batch_max(x, signed)


def _ste_a_forward(x, p, bits, signed, train):
    if train:  # the running maximum of the batch (an EMA), a buffer
        a_max = p["a_max"]
        a_max *= 1 - STE_EMA_MOMENTUM
        a_max += STE_EMA_MOMENTUM * _batch_max(x, signed)
    return quant.ste_quantize(x, _range_step(p, x, bits, signed), bits, signed=signed)


def _ste_a_grid(p, x, bits, signed):
    return _range_step(p, x, bits, signed), None


def _dorefa_w_forward(W, p, bits, signed, train):
    return quant.dorefa_weight_quantize(W, bits)


def _dorefa_w_backward(cache, dy):
    return quant.dorefa_weight_quantize_backward(cache, dy), {}


def _dorefa_w_grid(p, W, bits, signed):
    """bits >= 2: levels (2k - Qp) / Qp on codes 2k - Qp, step 1 / (2^b - 1); bits = 1:
    E|w| sign(w), step E|w| (X3)."""
    xp = array_module(W)
    scale = float(xp.abs(W).mean()) if bits == 1 else 1.0 / (2 ** bits - 1)
    return xp.full((W.shape[0],) + (1,) * (W.ndim - 1), scale, dtype=np.float64), None


def _pact_init(p, x, bits, signed):
    """The same initial grid as LSQ: alpha = Qp * s0 (N9)."""
    _, Qp = quant.qrange(bits, False)
    p["alpha"][...] = Qp * quant.lsq_init_step(x, bits, signed=False)


def _pact_forward(x, p, bits, signed, train):
    return quant.pact_quantize(x, p["alpha"], bits)


def _pact_backward(cache, dy):
    dx, dalpha = quant.pact_quantize_backward(cache, dy)
    return dx, {"alpha": dalpha}


def _pact_grid(p, x, bits, signed):
    _, Qp = quant.qrange(bits, False)
    return p["alpha"] / np.float32(Qp), None


def _lsq_w_init(p, W, bits, signed):
    p["s_w"][...] = quant.lsq_init_step(W, bits, signed=True, per_channel=True).reshape(p["s_w"].shape)


def _lsq_w_forward(W, p, bits, signed, train):
    return quant.lsq_quantize(W, p["s_w"], bits, signed=True)


def _lsq_w_backward(cache, dy):
    dW, ds = quant.lsq_quantize_backward(cache, dy)
    return dW, {"s_w": ds}


def _lsq_w_grid(p, W, bits, signed):
    return p["s_w"], None


def _lsqplus_w_init(p, W, bits, signed):
    """LSQ+ keeps weights symmetric (beta = 0: LSQ's quantizer) with LSQ+'s initial step."""
    s, _ = quant.lsqplus_init(W, bits, signed=True, per_channel=True)
    p["s_w"][...] = s.reshape(p["s_w"].shape)


def _act_grad_scale(x, bits, signed):
    """LSQ's gradient scale counts the features of one sample: g = 1/sqrt(N_feat Qp) (N9)."""
    _, Qp = quant.qrange(bits, signed)
    return 1.0 / math.sqrt((x.size // x.shape[0]) * Qp)


def _lsq_a_init(p, x, bits, signed):
    p["s_a"][...] = quant.lsq_init_step(x, bits, signed=signed)


def _lsq_a_forward(x, p, bits, signed, train):
    return quant.lsq_quantize(x, p["s_a"], bits, signed=signed,
                              grad_scale=_act_grad_scale(x, bits, signed))


def _lsq_a_backward(cache, dy):
    dx, ds = quant.lsq_quantize_backward(cache, dy)
    return dx, {"s_a": ds}


def _lsq_a_grid(p, x, bits, signed):
    return p["s_a"], None


def _lsqplus_a_init(p, x, bits, signed):
    s, beta = quant.lsqplus_init(x, bits, signed=signed)
    p["s_a"][...] = s
    p["beta_a"][...] = beta


def _lsqplus_a_forward(x, p, bits, signed, train):
    return quant.lsqplus_quantize(x, p["s_a"], p["beta_a"], bits, signed=signed,
                                  grad_scale=_act_grad_scale(x, bits, signed))


def _lsqplus_a_backward(cache, dy):
    dx, ds, dbeta = quant.lsqplus_quantize_backward(cache, dy)
    return dx, {"s_a": ds, "beta_a": dbeta}


def _lsqplus_a_grid(p, x, bits, signed):
    return p["s_a"], p["beta_a"]


STE_WEIGHT = Quantizer("ste", _ste_w_forward, _ste_backward, _ste_w_grid)
STE_ACT = Quantizer("ste", _ste_a_forward, _ste_backward, _ste_a_grid, buffers=("a_max",),
                    init=_ste_a_init)
DOREFA_WEIGHT = Quantizer("dorefa", _dorefa_w_forward, _dorefa_w_backward, _dorefa_w_grid)
PACT_ACT = Quantizer("pact", _pact_forward, _pact_backward, _pact_grid,
                     params=(Param("alpha"),), init=_pact_init)
LSQ_WEIGHT = Quantizer("lsq", _lsq_w_forward, _lsq_w_backward, _lsq_w_grid,
                       params=(Param("s_w", per_channel=True),), init=_lsq_w_init)
LSQ_ACT = Quantizer("lsq", _lsq_a_forward, _lsq_a_backward, _lsq_a_grid,
                    params=(Param("s_a"),), init=_lsq_a_init)
LSQPLUS_WEIGHT = Quantizer("lsqplus", _lsq_w_forward, _lsq_w_backward, _lsq_w_grid,
                           params=(Param("s_w", per_channel=True),), init=_lsqplus_w_init)
LSQPLUS_ACT = Quantizer("lsqplus", _lsqplus_a_forward, _lsqplus_a_backward, _lsqplus_a_grid,
                        params=(Param("s_a"), Param("beta_a", init=0.0, positive=False)),
                        init=_lsqplus_a_init)

register(Scheme("ste", STE_WEIGHT, STE_ACT, "STE",
                help="fixed ranges (max|w|, running max of the inputs), straight-through"))
register(Scheme("dorefa_pact", DOREFA_WEIGHT, PACT_ACT, "DoReFa+PACT", act_signed=STE_ACT,
                help="DoReFa weights, PACT activations (learned clip)"))
register(Scheme("lsq", LSQ_WEIGHT, LSQ_ACT, "LSQ", help="learned step size"))
register(Scheme("lsqplus", LSQPLUS_WEIGHT, LSQPLUS_ACT, "LSQ+",
                help="learned step and offset of the activations"))
