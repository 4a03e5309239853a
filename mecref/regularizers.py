"""The entropy regularisers of MEC-Quant, one record each (derivations T1, T2).

A regulariser acts on the two views' l2-normalised rows ``Z1, Z2`` (m, d) and is a quantity to
MINIMISE that MAXIMISES the coding length (entropy) of the rows. Each is a forward/backward pair
on the pair of views, plus what the rest of the package needs to know about it:

- ``"mec"``:        L = mec_loss(Z1, Z2, eps)                   (exact, -mu logdet(I + C))
- ``"mec_taylor"``: L = mec_loss(Z1, Z2, eps, order)            (order-n Taylor form)
- ``"moe"``:        L = -(L_moe(Z1) + L_moe(Z2)) / 2            (mixture-of-experts coding length)

The training loss takes ``beta * L / m`` (per sample). Adding a form is one :func:`register`
call: the training loop, ``TrainConfig.validate``, the command line's ``--reg`` choices, the
experiment labels and sweeps, and the tests that iterate the registry pick it up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import entropy
from .backend import MecrefError

__all__ = ["Regularizer", "REGISTRY", "register", "unregister", "get", "names"]


@dataclass(frozen=True)
class Regularizer:
    """One entropy regulariser.

    Attributes
    ----------
    name : str
        The value of ``TrainConfig.reg`` (and of ``--reg``) that selects it.
    forward : callable
        ``forward(Z1, Z2, eps, **params) -> (L, cache)``: the regulariser summed over the batch
        (a scalar to minimise) and what ``backward`` needs. ``Z1, Z2`` are (m, d) rows, not yet
        normalised (the entropy functions normalise them).
    backward : callable
        ``backward(cache, dL) -> (dZ1, dZ2)``: ``dL`` times the gradient of L.
    params : tuple of str
        The ``TrainConfig`` fields it reads besides ``eps`` (e.g. ``("order",)``); a sweep may
        vary them and the labels show them.
    label : str
        Its name in tables, a format string over ``params`` (``"Taylor n={order}"``).
    help : str
        One line for ``mecref train --help``.
    min_eps : callable or None
        ``min_eps(d)``: the smallest eps where the form is defined as intended for features of
        dimension d (the Taylor series' convergence bound), or None for no bound.
    """
    name: str
    forward: Callable
    backward: Callable
    params: tuple = ()
    label: str = ""
    help: str = ""
    min_eps: Callable | None = field(default=None, compare=False)

    def describe(self, config) -> str:
        """The label filled in from a config (a dict or a TrainConfig)."""
        get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
        return (self.label or self.name).format(**{p: get(p) for p in self.params})

    def settings(self, config) -> dict:
        """The fields of ``config`` this regulariser reads: reg_weight, eps and ``params``."""
        get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
        return {k: get(k) for k in ("reg_weight", "eps") + tuple(self.params)}


REGISTRY: dict = {}


def register(reg: Regularizer, replace: bool = False) -> Regularizer:
    """Add a regulariser to the registry (``replace=True`` to redefine a name)."""
    if not isinstance(reg, Regularizer):
        raise TypeError(f"reg must be a Regularizer, got {type(reg).__name__}")
    if not isinstance(reg.name, str) or not reg.name.isidentifier():
        raise MecrefError(f"a regulariser's name must be an identifier, got {reg.name!r}")
    if reg.name in REGISTRY and not replace:
        raise MecrefError(f"regulariser {reg.name!r} is already registered")
    REGISTRY[reg.name] = reg
    return reg


def unregister(name: str):
    """Remove a registered regulariser (tests that register one temporarily)."""
    REGISTRY.pop(name, None)


def get(name: str) -> Regularizer:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MecrefError(f"reg must be one of {names()} or None, got {name!r}") from None


def names() -> tuple:
    """The registered names, in registration order."""
    return tuple(REGISTRY)


# ----------------------------------------------------------------------------------------------
# The three forms
# ----------------------------------------------------------------------------------------------

def _mec_forward(Z1, Z2, eps):
    return entropy.mec_loss(Z1, Z2, eps)


def _mec_taylor_forward(Z1, Z2, eps, order):
    return entropy.mec_loss(Z1, Z2, eps, order=order)


def _mec_backward(cache, dL):
    return entropy.mec_loss_backward(cache, dL)


def _moe_forward(Z1, Z2, eps, experts):
    L1, c1 = entropy.moe_coding_length(Z1, eps, experts=experts)
    L2, c2 = entropy.moe_coding_length(Z2, eps, experts=experts)
    return -(L1 + L2) / 2, (c1, c2)


def _moe_backward(cache, dL):
    c1, c2 = cache
    return (entropy.moe_coding_length_backward(c1, -dL / 2)[0],
            entropy.moe_coding_length_backward(c2, -dL / 2)[0])


def _taylor_min_eps(d):
    """The order-n series converges for every pair of unit-row views when eps >= sqrt(d):
    the spectral radius of C = lam Z1 Z2^T is at most lam m = d / eps^2 (derivations E4)."""
    return float(d) ** 0.5


register(Regularizer("mec", _mec_forward, _mec_backward, label="exact",
                     help="exact two-view MEC, -mu logdet(I + lam Z1 Z2^T)"))
register(Regularizer("mec_taylor", _mec_taylor_forward, _mec_backward, params=("order",),
                     label="Taylor n={order}", min_eps=_taylor_min_eps,
                     help="its order-n Taylor series (--order), defined for eps >= sqrt(d)"))
register(Regularizer("moe", _moe_forward, _moe_backward, params=("experts",),
                     label="MOE K={experts}",
                     help="minus the mixture-of-experts coding length of each view (--experts)"))
