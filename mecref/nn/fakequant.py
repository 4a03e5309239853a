"""Fake-quantized layers: :class:`QuantConv2d` and :class:`QuantLinear`, a convolution or linear
layer whose weight and input go through one of :func:`mecref.schemes.names` (derivations N9)."""
from __future__ import annotations


import numpy as np

from .. import schemes
from ..backend import array_module
from ..validate import check_choice
from .base import FULL_PRECISION, _check_qbits
from .conv import Conv2d, Linear


class _FakeQuant:
    """Weight and input fake quantization of one layer (derivations N9).

    Mixed into :class:`QuantConv2d` and :class:`QuantLinear`; its params and buffers live in
    the layer's own dicts. The scheme (a record of :mod:`mecref.schemes`) names the weight
    quantizer and the input quantizer; this class only holds their arrays, runs their
    data-driven initialisation at the first forward (buffer ``ready`` flips to 1 and travels
    with the state dict, so a loaded model is not re-initialised) and calls their pairs:

    - ``"ste"``: weights ``s = max|w| / Qp`` recomputed each forward, held constant in the
      backward; inputs ``s = a_max / Qp`` with ``a_max`` an EMA of the batch max (a buffer).
    - ``"dorefa_pact"``: DoReFa weights (per tensor); PACT inputs with a learnable ``alpha``
      (signed inputs, which PACT cannot clip, use the ``"ste"`` input quantizer).
    - ``"lsq"``: LSQ weights (learnable ``s_w``, per output channel) and inputs (``s_a``).
    - ``"lsqplus"``: LSQ+ weights (symmetric, i.e. LSQ's quantizer with LSQ+'s initial step)
      and LSQ+ inputs (learnable ``s_a`` and offset ``beta_a``).
    """

    def _setup_quant(self, scheme, w_bits, a_bits, a_signed, a_shape):
        self.scheme = check_choice("scheme", scheme, schemes.names())
        self.w_bits = _check_qbits("w_bits", w_bits)
        self.a_bits = _check_qbits("a_bits", a_bits)
        if not isinstance(a_signed, (bool, np.bool_)):
            raise TypeError(f"a_signed must be a bool, got {type(a_signed).__name__} {a_signed!r}")
        self.a_signed = bool(a_signed)
        rec = schemes.get(scheme)
        self.w_quant = rec.weight if self.w_bits != FULL_PRECISION else None
        self.a_quant = rec.act_for(self.a_signed) if self.a_bits != FULL_PRECISION else None
        W = self.params["W"]
        xp = array_module(W)
        w_shape = (W.shape[0],) + (1,) * (W.ndim - 1)          # per output channel
        for q in (self.w_quant, self.a_quant):
            if q is None:
                continue
            for prm in q.params:
                shape = w_shape if prm.per_channel else a_shape
                self.params[prm.name] = xp.full(shape, prm.init, dtype=np.float32)
                if not prm.decay:
                    self.no_decay.add(prm.name)
                if prm.positive:
                    self.positive.add(prm.name)
            for name in q.buffers:
                self.buffers[name] = xp.ones(a_shape, dtype=np.float32)
        if self.w_quant is not None or self.a_quant is not None:
            self.buffers["ready"] = xp.zeros((), dtype=np.float32)
        self._qcache = None

    def _arrays(self, q):
        """A quantizer's params and buffers by name (the layer's own arrays)."""
        names = [p.name for p in q.params] + list(q.buffers)
        return {k: self.params[k] if k in self.params else self.buffers[k] for k in names}

    def _init_quant(self, x):
        """Data-driven initial values: the weight quantizer's from W, the input's from x."""
        if self.w_quant is not None and self.w_quant.init is not None:
            W = self.params["W"]
            self.w_quant.init(self._arrays(self.w_quant), W, self.w_bits, True)
        if self.a_quant is not None and self.a_quant.init is not None:
            self.a_quant.init(self._arrays(self.a_quant), x, self.a_bits, self.a_signed)
        self.buffers["ready"][...] = 1
        self._ready = True

    def _quant_ready(self):
        """The buffer ``ready``, read from the device once and then remembered (a host sync
        per forward otherwise); ``load_state_dict`` makes the layer read it again."""
        if getattr(self, "_ready", None) is None:
            self._ready = bool(float(self.buffers["ready"]))
        return self._ready

    def _quant_w(self, W, train=True):
        """Fake-quantized weight and what its backward needs."""
        if self.w_quant is None:
            return W, None
        return self.w_quant.forward(W, self._arrays(self.w_quant), self.w_bits, True, train)

    def _quant_w_backward(self, cache, dWq):
        if self.w_quant is None:
            return dWq
        dW, grads = self.w_quant.backward(cache, dWq)
        self.grads.update(grads)
        return dW

    def _quant_x(self, x, train):
        if self.a_quant is None:
            return x, None
        return self.a_quant.forward(x, self._arrays(self.a_quant), self.a_bits, self.a_signed, train)

    def _quant_x_backward(self, cache, dxq):
        if self.a_quant is None:
            return dxq
        dx, grads = self.a_quant.backward(cache, dxq)
        self.grads.update(grads)
        return dx

    def _learns_from_input(self):
        """True when the input quantizer has a learnable param (it needs dx to get its grad)."""
        return self.a_quant is not None and bool(self.a_quant.params)

    def _quant_forward(self, x, train, core):
        """Quantize x and W, run the layer's core, cache the quantizer caches (train)."""
        if "ready" in self.buffers and not self._quant_ready():
            self._init_quant(x)
        xq, cx = self._quant_x(x, train)
        Wq, cw = self._quant_w(self.params["W"], train)
        y = core(xq, Wq, train)
        if train:
            self._qcache = (cx, cw)
        return y

    def _quant_describe(self):
        return f"scheme={self.scheme!r}, w_bits={self.w_bits}, a_bits={self.a_bits}, a_signed={self.a_signed}"


class QuantConv2d(_FakeQuant, Conv2d):
    """Conv2d on fake-quantized weights and inputs (derivations N9).

    .. math::
        y = \\mathrm{conv}(q_a(x), q_w(W)), \\qquad
        dW = q_w'^T \\big(\\mathrm{dW}_q\\big), \\quad dx = q_a'^T \\big(\\mathrm{dx}_q\\big)

    where ``dW_q``, ``dx_q`` are :class:`Conv2d`'s gradients at the quantized operands and
    ``q'^T`` the quantizer's backward (which also fills the grads of its own step, clip or
    offset).

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, bias, backend, seed
        as :class:`Conv2d`.
    scheme : one of :func:`mecref.schemes.names`
    w_bits, a_bits : int, 1..8 or 32 (full precision: no quantizer for that operand)
    a_signed : bool
        Signed input codes (normalised images of the first layer) or unsigned (after ReLU).

    Params added per scheme: ``s_w`` (F, 1, 1, 1); ``s_a``, ``beta_a``, ``alpha`` (1, 1, 1, 1).
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=True,
                 scheme="lsq", w_bits=4, a_bits=4, a_signed=False, backend="numpy", seed=0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, backend, seed)
        self._setup_quant(scheme, w_bits, a_bits, a_signed, (1, 1, 1, 1))

    def forward(self, x, train=True):
        self._check_input(x)
        return self._quant_forward(x, train, self._conv_forward)

    def backward(self, dy):
        self._pending()
        cx, cw = self._qcache
        dWq, dxq = self._conv_backward(dy, self.input_grad or self._learns_from_input())
        self.grads["W"] = self._quant_w_backward(cw, dWq)
        dx = self._quant_x_backward(cx, dxq) if dxq is not None else None
        return dx if self.input_grad else None

    def __repr__(self):
        return f"QuantConv2d(W{tuple(self.params['W'].shape)}, {self._quant_describe()})"


class QuantLinear(_FakeQuant, Linear):
    """Linear layer on fake-quantized weights and inputs (derivations N9); see
    :class:`QuantConv2d` for the schemes. Params added: ``s_w`` (out, 1); ``s_a``, ``beta_a``,
    ``alpha`` (1, 1)."""

    def __init__(self, in_features, out_features, bias=True, scheme="lsq", w_bits=4, a_bits=4,
                 a_signed=False, backend="numpy", seed=0):
        super().__init__(in_features, out_features, bias, backend, seed)
        self._setup_quant(scheme, w_bits, a_bits, a_signed, (1, 1))

    def forward(self, x, train=True):
        self._check_input(x)
        return self._quant_forward(x, train, self._linear_forward)

    def backward(self, dy):
        self._pending()
        cx, cw = self._qcache
        dWq, dxq = self._linear_backward(dy)
        self.grads["W"] = self._quant_w_backward(cw, dWq)
        dx = self._quant_x_backward(cx, dxq)
        return dx if self.input_grad else None

    def __repr__(self):
        return f"QuantLinear(W{tuple(self.params['W'].shape)}, {self._quant_describe()})"
