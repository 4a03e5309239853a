"""The layers between the GEMMs: :class:`ReLU`, :class:`MaxPool2d`, :class:`BatchNorm2d`,
:class:`GlobalAvgPool2d` and :class:`Flatten` (derivations N3-N5)."""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..backend import MecrefError, array_module, get_xp, row_dot
from ..threads import over_channels
from ..validate import check_int
from .base import Layer, _check_dy, _check_floating, _check_image, _cm


class ReLU(Layer):
    """``y = max(x, 0)``; ``dx = dy * 1[x > 0]`` (derivations N5). Any shape."""

    def forward(self, x, train=True):
        _check_floating(self, x)
        xp = array_module(x)
        y = xp.maximum(x, 0)
        if train:
            self._cache = xp.greater(x, 0)            # in x's memory layout, as dy will be
        return y

    def backward(self, dy):
        mask = self._pending()
        _check_dy(self, dy, mask.shape)
        return dy * mask


class MaxPool2d(Layer):
    """2x2 max pool, stride 2, with a first-match mask (derivations N4).

    .. math::
        y[n, c, h, w] = \\max_{a, b \\in \\{0, 1\\}} x[n, c, 2h + a, 2w + b], \\qquad
        dx = M \\odot \\mathrm{up}(dy)

    where the mask ``M`` marks, in each window, the FIRST position in row-major order
    (top-left, top-right, bottom-left, bottom-right) that attains the max: ties (common under
    fake quantisation) send the window's gradient once, not once per tied entry. It is built
    in two strict comparisons, so a tie keeps the earlier position: the winning column of each
    window row (``right > left``), then the winning row (``bottom max > top max``).

    With ``relu=True`` the layer computes ``relu(maxpool(x)) = maxpool(relu(x))`` on the pooled
    (4x smaller) array: windows whose max is <= 0 output 0 and pass no gradient, exactly as a
    ReLU before the pool would (N4).

    Shapes: x (N, C, H, W) -> y (N, C, H // 2, W // 2); an odd last row/column is dropped
    (and gets zero gradient).
    """

    def __init__(self, relu=False):
        super().__init__()
        if not isinstance(relu, (bool, np.bool_)):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__} {relu!r}")
        self.relu = bool(relu)

    def forward(self, x, train=True):
        if not hasattr(x, "ndim") or x.ndim != 4 or x.shape[2] < 2 or x.shape[3] < 2:
            raise MecrefError(f"MaxPool2d: x must be (N, C, H, W) with H, W >= 2, "
                              f"got shape {tuple(getattr(x, 'shape', ()))}")
        _check_floating(self, x)
        xp = array_module(x)
        N, C, H, W = x.shape
        Ho, Wo = H // 2, W // 2
        x6 = _cm(x)[:, :, :2 * Ho, :2 * Wo].reshape(C, N, Ho, 2, Wo, 2)  # (.., row a, .., col b)
        y = xp.empty((C, N, Ho, Wo), dtype=x.dtype)                  # channel-major
        shape5 = (C, N, Ho, 2, Wo)
        if train:
            mask_left = self._buffer(xp, "left", shape5, np.bool_)
            mask_right = self._buffer(xp, "right", shape5, np.bool_)
            self._cache = (mask_left, mask_right, x.shape, (N, C, Ho, Wo))
        rows_max = self._buffer(xp, "rows", shape5, x.dtype)

        def pool(c):                                                 # channels c: independent
            left, right = x6[c, ..., 0], x6[c, ..., 1]               # (c, N, Ho, 2, Wo)
            rows = xp.maximum(left, right, out=rows_max[c])          # row maxima
            top, bottom = rows[:, :, :, 0], rows[:, :, :, 1]         # (c, N, Ho, Wo)
            xp.maximum(top, bottom, out=y[c])
            if self.relu:
                xp.maximum(y[c], 0, out=y[c])
            if not train:
                return
            bottom_wins = bottom > top                               # ties: top row
            top_wins = ~bottom_wins
            if self.relu:
                live = y[c] > 0                                      # max <= 0: no gradient
                bottom_wins &= live
                top_wins &= live
            row_wins = mask_left[c]
            row_wins[:, :, :, 0] = top_wins
            row_wins[:, :, :, 1] = bottom_wins
            right_wins = xp.greater(right, left, out=mask_right[c])
            right_wins &= row_wins                                   # ties: left column
            row_wins ^= right_wins                                   # left: row_wins & ~right_wins

        over_channels(pool, C, x.size, xp)
        return _cm(y)

    def backward(self, dy):
        mask_left, mask_right, x_shape, y_shape = self._pending()
        _check_dy(self, dy, y_shape)
        xp = array_module(dy)
        N, C, Ho, Wo = y_shape
        dx6 = xp.empty((C, N, Ho, 2, Wo, 2), dtype=dy.dtype)         # channel-major
        dy5 = _cm(dy)[:, :, :, None, :]

        def route(c):                                                # channels c: independent
            xp.multiply(mask_left[c], dy5[c], out=dx6[c, ..., 0])
            xp.multiply(mask_right[c], dy5[c], out=dx6[c, ..., 1])

        over_channels(route, C, dx6.size, xp)
        if x_shape[2:] == (2 * Ho, 2 * Wo):
            return _cm(dx6.reshape(C, N, 2 * Ho, 2 * Wo))
        dx = xp.zeros((C, N) + tuple(x_shape[2:]), dtype=dy.dtype)
        dx[:, :, :2 * Ho, :2 * Wo] = dx6.reshape(C, N, 2 * Ho, 2 * Wo)
        return _cm(dx)


class BatchNorm2d(Layer):
    """Batch normalisation over (N, H, W) per channel (derivations N3).

    Train mode, with ``M = N H W`` values per channel:

    .. math::
        \\mu = \\tfrac1M \\sum x, \\quad \\sigma^2 = \\tfrac1M \\sum (x - \\mu)^2, \\quad
        \\hat x = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\quad y = \\gamma \\hat x + \\beta

        dx = \\frac{\\gamma}{M \\sqrt{\\sigma^2 + \\epsilon}}
             \\Big(M\\, dy - \\textstyle\\sum dy - \\hat x \\sum dy\\, \\hat x\\Big), \\quad
        d\\gamma = \\textstyle\\sum dy\\, \\hat x, \\quad d\\beta = \\textstyle\\sum dy

    Running statistics (buffers ``running_mean``, ``running_var``) follow
    ``r <- (1 - momentum) r + momentum * batch`` with the unbiased batch variance
    ``M / (M - 1) sigma^2`` (as PyTorch); eval mode normalises with them instead.

    Shapes: x, y (N, C, H, W); gamma, beta, running_mean, running_var (C,).
    """

    def __init__(self, num_features, momentum=0.1, eps=1e-5, backend="numpy"):
        super().__init__()
        C = check_int("num_features", num_features, 1)
        if not (isinstance(momentum, numbers.Real) and not isinstance(momentum, bool)
                and 0.0 <= float(momentum) <= 1.0):
            raise MecrefError(f"momentum must be a real in [0, 1], got {momentum!r}")
        if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool)
                and 0 < float(eps) < math.inf):
            raise MecrefError(f"eps must be a finite real > 0, got {eps!r}")
        self.momentum, self.eps = float(momentum), float(eps)
        xp = get_xp(backend)
        self.params = {"gamma": xp.ones(C, dtype=np.float32), "beta": xp.zeros(C, dtype=np.float32)}
        self.buffers = {"running_mean": xp.zeros(C, dtype=np.float32),
                        "running_var": xp.ones(C, dtype=np.float32)}
        self.no_decay = {"gamma", "beta"}

    def forward(self, x, train=True):
        _check_image(self, x, self.params["gamma"].shape[0])
        xp = array_module(x)
        N, C, H, W = x.shape
        M = N * H * W
        x2 = _cm(x).reshape(C, M)                    # channel-major: a view (else one copy)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not train:
            scale = gamma / xp.sqrt(self.buffers["running_var"] + self.eps)
            shift = beta - self.buffers["running_mean"] * scale
            y = x2 * scale[:, None]
            y += shift[:, None]
            return _cm(y.reshape(C, N, H, W))
        self._check_train_batch(x)
        mu, var = xp.empty(C, dtype=x.dtype), xp.empty(C, dtype=x.dtype)
        xc = self._buffer(xp, "xc", x2.shape, x.dtype)              # x - mu
        t = xp.empty(C, dtype=x.dtype)                             # (sigma^2 + eps)^(-1/2)
        y = xp.empty_like(xc)

        def normalize(c):                                          # channels c: independent
            mu[c] = row_dot(x2[c]) / M
            xp.subtract(x2[c], mu[c, None], out=xc[c])
            var[c] = row_dot(xc[c], xc[c]) / M
            t[c] = 1.0 / xp.sqrt(var[c] + self.eps)
            xp.multiply(xc[c], (gamma[c] * t[c])[:, None], out=y[c])   # gamma xhat + beta
            y[c] += beta[c, None]

        over_channels(normalize, C, x2.size, xp)
        self._update_running(mu, var, M)
        self._cache = (xc, t, x.shape)
        return _cm(y.reshape(C, N, H, W))

    @staticmethod
    def _check_train_batch(x):
        """Train mode's batch statistics need more than one value per channel (M = N H W)."""
        if x.shape[0] * x.shape[2] * x.shape[3] < 2:
            raise MecrefError(f"BatchNorm2d in train mode needs more than one value per channel, "
                              f"got x of shape {tuple(x.shape)}")

    def _update_running(self, mu, var, M):
        """``r <- (1 - momentum) r + momentum * batch``, the variance unbiased (M / (M - 1))."""
        r = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - r
        rm += r * mu.astype(rm.dtype)
        rv *= 1 - r
        rv += (r * M / (M - 1)) * var.astype(rv.dtype)

    def backward(self, dy):
        xc, t, x_shape = self._pending()
        _check_dy(self, dy, x_shape)
        xp = array_module(dy)
        N, C, H, W = x_shape
        M = N * H * W
        dy2 = _cm(dy).reshape(C, M)
        dbeta, dgamma = xp.empty_like(t), xp.empty_like(t)
        a = self.params["gamma"] * t
        dx = xp.empty_like(xc)
        tmp = self._buffer(xp, "tmp", xc.shape, xc.dtype)

        def backward(c):                                           # channels c: independent
            dbeta[c] = row_dot(dy2[c])
            dgamma[c] = row_dot(dy2[c], xc[c]) * t[c]                # sum dy xhat, xhat = xc t
            # dx = gamma t / M (M dy - dbeta - xhat dgamma) = a dy - a dbeta / M - xc (a t dgamma / M)
            xp.multiply(dy2[c], a[c, None], out=dx[c])
            dx[c] -= xp.multiply(xc[c], (a[c] * t[c] * dgamma[c] / M)[:, None], out=tmp[c])
            dx[c] -= (a[c] * dbeta[c] / M)[:, None]

        over_channels(backward, C, xc.size, xp)
        self.grads["beta"], self.grads["gamma"] = dbeta, dgamma
        return _cm(dx.reshape(C, N, H, W))


class GlobalAvgPool2d(Layer):
    """``y[n, c] = (1/HW) sum_{h,w} x[n, c, h, w]``; ``dx = dy / HW`` broadcast (N5).

    Shapes: x (N, C, H, W) -> y (N, C).
    """

    def forward(self, x, train=True):
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise MecrefError(f"GlobalAvgPool2d: x must be (N, C, H, W), "
                              f"got shape {tuple(getattr(x, 'shape', ()))}")
        _check_floating(self, x)
        if train:
            self._cache = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        x_shape = self._pending()
        _check_dy(self, dy, x_shape[:2])
        xp = array_module(dy)
        N, C, H, W = x_shape
        dx = xp.empty((C, N, H, W), dtype=dy.dtype)                    # channel-major
        dx[...] = (dy.T * (1.0 / (H * W)))[:, :, None, None]
        return _cm(dx)


class Flatten(Layer):
    """(N, ...) -> (N, prod(...)); backward reshapes back (N5)."""

    def forward(self, x, train=True):
        if not hasattr(x, "ndim") or x.ndim < 2:
            raise MecrefError(f"Flatten: x must have a batch axis and at least one more, "
                              f"got shape {tuple(getattr(x, 'shape', ()))}")
        if train:
            self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        x_shape = self._pending()
        _check_dy(self, dy, (x_shape[0], int(np.prod(x_shape[1:]))))
        return dy.reshape(x_shape)
