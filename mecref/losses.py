"""Softmax cross-entropy and accuracy (docs/derivations.md, section N6).

    loss, cache = softmax_cross_entropy(logits, y)
    dlogits = softmax_cross_entropy_backward(cache, dL=1.0)
"""
from __future__ import annotations

import numpy as np

from .backend import MecrefError, array_module
from .validate import check_array, values_checked

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_backward", "accuracy"]


def _check_labels(logits, y):
    """logits (N, K) finite floating; y (N,) integers in [0, K) on the same backend."""
    check_array("logits", logits, ndim=2)
    if not hasattr(y, "shape") or not hasattr(y, "dtype"):
        raise TypeError(f"y must be a numpy/cupy array of integer labels, got {type(y).__name__}")
    if not np.issubdtype(np.dtype(y.dtype), np.integer):
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    N, K = logits.shape
    if tuple(y.shape) != (N,):
        raise MecrefError(f"y must have shape ({N},) to match logits {tuple(logits.shape)}, "
                          f"got {tuple(y.shape)}")
    array_module(logits, y)  # refuses a numpy/cupy mix
    if not values_checked():
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= K:
        raise MecrefError(f"y must hold labels in [0, {K - 1}] (K = {K} classes), got range [{lo}, {hi}]")


def softmax_cross_entropy(logits, y):
    """Mean softmax cross-entropy over the batch, with a stable log-sum-exp (N6).

    .. math::
        z_n = \\mathrm{logits}_n - \\max_k \\mathrm{logits}_{nk}, \\qquad
        L = \\frac1N \\sum_n \\Big(\\log \\sum_k e^{z_{nk}} - z_{n y_n}\\Big)

    Parameters
    ----------
    logits : ndarray (N, K), floating
    y : ndarray (N,), integer labels in [0, K)

    Returns
    -------
    loss : 0-d array / scalar of ``logits.dtype`` on the logits' backend (``float(loss)``)
    cache : for :func:`softmax_cross_entropy_backward` (holds the softmax probabilities)
    """
    _check_labels(logits, y)
    xp = array_module(logits)
    N = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    lse = xp.log(xp.exp(z).sum(axis=1))
    rows = xp.arange(N)
    loss = (lse - z[rows, y]).mean()
    p = xp.exp(z - lse[:, None])
    return loss, (p, y)


def softmax_cross_entropy_backward(cache, dL=1.0):
    """Gradient of :func:`softmax_cross_entropy` (N6).

    .. math::
        \\frac{\\partial L}{\\partial \\mathrm{logits}_{nk}} = \\frac{dL}{N}
        \\big(\\mathrm{softmax}(\\mathrm{logits}_n)_k - 1[k = y_n]\\big)

    Parameters
    ----------
    cache : from :func:`softmax_cross_entropy`
    dL : float or 0-d array, upstream gradient of the loss

    Returns
    -------
    dlogits : ndarray (N, K), dtype of the logits
    """
    p, y = cache
    xp = array_module(p)
    N = p.shape[0]
    d = p.copy()
    d[xp.arange(N), y] -= 1
    d *= xp.asarray(dL, dtype=p.dtype) / N
    return d


def accuracy(logits, y) -> float:
    """Fraction of rows whose arg-max logit is the label: ``mean(argmax_k logits_nk == y_n)``.

    logits (N, K), y (N,) integer labels; returns a Python float in [0, 1].
    """
    _check_labels(logits, y)
    return float((logits.argmax(axis=1) == y).mean())
