"""SGD with momentum and decoupled-from-quantizers weight decay, and the cosine schedule with
linear warm-up (docs/derivations.md, sections N7 and N8).

    opt = SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(total_steps):
        opt.lr = cosine_lr(step, total_steps, base_lr=0.05, warmup_steps=100)
        ...forward, backward...
        opt.step()            # updates layer.params[key] in place
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import MecrefError, array_module, to_host
from .validate import check_int, check_positive

__all__ = ["SGD", "cosine_lr"]


def _check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= float(momentum) < 1.0:
        raise MecrefError(f"momentum must be a real in [0, 1), got {momentum!r}")
    return float(momentum)


class SGD:
    """Stochastic gradient descent with (Nesterov) momentum and weight decay (N7).

    For every param ``p`` with gradient ``g``, velocity ``v`` (zeros at the start):

    .. math::
        g' = g + \\lambda_{wd}\\, p \\;\\; (\\text{only keys not in } \\texttt{layer.no\\_decay}),
        \\qquad v \\leftarrow \\mu v + g', \\qquad
        p \\leftarrow p - \\eta \\,(v \\text{ or, Nesterov, } g' + \\mu v)

    then ``p <- max(p, positive_floor)`` for keys in ``layer.positive`` (quantizer steps and
    PACT's clip must stay > 0). This is PyTorch's ``torch.optim.SGD`` (dampening 0).

    Parameters
    ----------
    params : a model with ``named_params()``, or a list of ``(name, layer, key)``
    lr : float >= 0, the step size eta (settable: ``opt.lr = ...`` for a schedule)
    momentum : float in [0, 1), mu
    weight_decay : float >= 0, lambda_wd (L2 penalty ``lambda_wd / 2 |p|^2``)
    nesterov : bool (needs momentum > 0)
    positive_floor : float > 0
        Absolute floor of ``positive`` params after each step. 1e-8 keeps ``x / s`` finite in
        float32 for any ``|x| < 3e30`` while never touching a step of a sane size.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, nesterov=False,
                 positive_floor=1e-8):
        entries = list(params.named_params()) if hasattr(params, "named_params") else list(params)
        names = set()
        for e in entries:
            if not (isinstance(e, tuple) and len(e) == 3 and hasattr(e[1], "params")
                    and e[2] in e[1].params):
                raise MecrefError(f"params must yield (name, layer, key) with key in layer.params, "
                                  f"got {e!r}")
            if e[0] in names:
                raise MecrefError(f"params: duplicate name {e[0]!r}")
            names.add(e[0])
        if not entries:
            raise MecrefError("params is empty: nothing to optimise")
        self.entries = entries
        self.lr = lr
        self.momentum = _check_momentum(momentum)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__} {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise MecrefError("nesterov=True needs momentum > 0, got momentum=0")
        self.nesterov = bool(nesterov)
        self.positive_floor = check_positive("positive_floor", positive_floor)
        self.velocity = {name: array_module(layer.params[key]).zeros_like(layer.params[key])
                         for name, layer, key in entries}

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = check_positive("lr", value, allow_zero=True)

    def step(self):
        """One update of every param, in place (N7). Needs ``grads`` from a backward pass."""
        mu, wd, lr = self.momentum, self.weight_decay, self._lr
        for name, layer, key in self.entries:
            p, g = layer.params[key], layer.grads.get(key)
            if g is None:
                raise MecrefError(f"no gradient for {name}: run backward before step()")
            if tuple(g.shape) != tuple(p.shape):
                raise MecrefError(f"gradient of {name} has shape {tuple(g.shape)}, "
                                  f"the param has {tuple(p.shape)}")
            if wd and key not in layer.no_decay:
                g = g + wd * p
            v = self.velocity[name]
            v *= mu
            v += g
            p -= lr * (g + mu * v if self.nesterov else v)
            if key in layer.positive:
                array_module(p).maximum(p, self.positive_floor, out=p)

    def state_dict(self):
        """Host copies of the momentum buffers, ``{name: np.ndarray}``."""
        return {name: np.array(to_host(v), copy=True) for name, v in self.velocity.items()}

    def load_state_dict(self, state):
        """Copy momentum buffers in; refuses (MecrefError, nothing loaded) on missing or extra
        names or shape mismatches."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
        missing = sorted(set(self.velocity) - set(state))
        extra = sorted(set(state) - set(self.velocity))
        if missing or extra:
            raise MecrefError(f"optimizer state does not match: missing {missing}, unexpected {extra}")
        for name, v in self.velocity.items():
            if tuple(getattr(state[name], "shape", ())) != tuple(v.shape) or not hasattr(state[name], "shape"):
                raise MecrefError(f"optimizer state {name!r} has shape "
                                  f"{tuple(getattr(state[name], 'shape', ()))}, expected {tuple(v.shape)}")
        for name, v in self.velocity.items():
            v[...] = array_module(v).asarray(state[name], dtype=v.dtype)


def cosine_lr(step, total_steps, base_lr, warmup_steps, min_lr=0.0):
    """Learning rate at a step: linear warm-up, then cosine decay to ``min_lr`` (N8).

    .. math::
        \\eta_t = \\begin{cases}
            \\eta_0 \\frac{t + 1}{T_w} & t < T_w \\\\
            \\eta_{min} + \\frac{\\eta_0 - \\eta_{min}}{2}
              \\Big(1 + \\cos\\big(\\pi \\frac{t - T_w}{T - T_w}\\big)\\Big) & T_w \\le t \\le T
        \\end{cases}

    so the last warm-up step (``t = T_w - 1``) and the first cosine step use ``eta_0``, the
    midpoint of the cosine part ``(eta_0 + eta_min) / 2``, and ``t = T`` gives ``eta_min``.

    Parameters
    ----------
    step : int in [0, total_steps], t (the number of updates done before this one)
    total_steps : int >= 1, T
    base_lr : float >= 0, eta_0
    warmup_steps : int in [0, total_steps], T_w (``T_w = T``: warm-up only, then ``eta_min``
        at ``t = T``)
    min_lr : float in [0, base_lr], eta_min

    Returns
    -------
    float
    """
    T = check_int("total_steps", total_steps, 1)
    t = check_int("step", step, 0, T)
    Tw = check_int("warmup_steps", warmup_steps, 0, T)
    base = check_positive("base_lr", base_lr, allow_zero=True)
    lo = check_positive("min_lr", min_lr, allow_zero=True)
    if lo > base:
        raise MecrefError(f"min_lr must be <= base_lr ({base!r}), got {min_lr!r}")
    if t < Tw:
        return base * (t + 1) / Tw
    progress = (t - Tw) / (T - Tw) if T > Tw else 1.0
    return lo + 0.5 * (base - lo) * (1.0 + math.cos(math.pi * progress))
