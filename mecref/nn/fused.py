"""BatchNorm, ReLU and 2x2 max pooling in one pass over memory (derivations N11).

:class:`~mecref.nn.SmallCNN` runs each ``BatchNorm2d -> MaxPool2d`` pair of its layers through
:class:`BatchNormPool` in train mode; the two layers keep their params, grads and buffers (the
checkpoints, taps and exports see the same layers), and eval mode runs them one by one.

Why one pass: BatchNorm's output is a per-channel affine map ``y = A (x - mu) + beta`` with
``A = gamma / sqrt(var + eps)``. For ``A >= 0`` it is monotone, so it commutes with the max:
``pool(bn(x)) = A pool(x - mu) + beta``; for ``A < 0`` the max becomes a min, which is the max
of ``-(x - mu)``. So the pair needs ``xs = sign(gamma) (x - mu)`` (the statistics need the
centred values anyway), the max of ``xs`` per window, and the affine map on the pooled array,
4x smaller. BatchNorm's full-size output and the full-size gradient between the two layers are
never formed; the backward reads the pooled gradient once and writes the input gradient once.

``xs`` is kept with the four window positions ``(a, b)`` as separate planes,
``(C, 2, 2, N, H/2, W/2)``: every pooling comparison then runs over long contiguous rows
(a window's four values sit 1 and W apart in the image layout, which NumPy walks in loops of
``W/2`` elements). Writing the planes costs one strided pass; reading them back costs none.
"""
from __future__ import annotations

from ..backend import MecrefError, array_module, row_dot
from ..threads import over_channels
from .base import Layer, _check_dy, _check_image, _cm
from .layers import BatchNorm2d, MaxPool2d

__all__ = ["BatchNormPool"]


class BatchNormPool(Layer):
    """Train-mode ``pool(bn(x))`` for a :class:`BatchNorm2d` ``bn`` and a :class:`MaxPool2d`
    ``pool`` (with or without its ReLU), equal to running the two layers in turn (N11).

    Forward, per channel, with ``M = N H W``, ``s = sign(gamma)`` (+1 at gamma = 0),
    ``t = (var + eps)^(-1/2)`` and ``A = gamma t``:

    .. math::
        x_s = s\\,(x - \\mu), \\quad m = \\mathrm{pool}(x_s), \\quad
        y = |A|\\, m + \\beta \\quad (\\text{then } \\max(y, 0) \\text{ with the ReLU})

    The window's winner is the first position in row-major order attaining the max of ``x_s``
    (as :class:`MaxPool2d` picks it on ``bn(x)``); with the ReLU a window with ``y <= 0`` has
    none. Backward, with ``g = dy`` on windows that have a winner (0 elsewhere) and
    ``R(g)`` the full-size array holding ``g`` at each winner:

    .. math::
        d\\beta = \\textstyle\\sum g, \\quad d\\gamma = s\\, t \\textstyle\\sum g\\, m, \\quad
        dx = A\\, R(g) - \\frac{A\\, d\\beta}{M} - x_s \\frac{|A|\\, t\\, d\\gamma}{M}

    Shapes: x (N, C, H, W) with H and W even -> y (N, C, H/2, W/2). ``bn``'s running
    statistics are updated as its own forward does; ``bn.grads`` gets ``gamma`` and ``beta``.
    """

    def __init__(self, bn, pool):
        if not isinstance(bn, BatchNorm2d) or not isinstance(pool, MaxPool2d):
            raise TypeError(f"BatchNormPool needs a BatchNorm2d and a MaxPool2d, got "
                            f"{type(bn).__name__} and {type(pool).__name__}")
        self.bn, self.pool = bn, pool
        self._cache, self._ws = None, {}

    # the pair's state is the BatchNorm's: its params, grads and buffers, seen here
    params = property(lambda self: self.bn.params)
    grads = property(lambda self: self.bn.grads)
    buffers = property(lambda self: self.bn.buffers)
    no_decay = property(lambda self: self.bn.no_decay)
    positive = property(lambda self: self.bn.positive)

    def astype(self, dtype):
        """Cast the BatchNorm's params and buffers; returns self."""
        self.bn.astype(dtype)
        self._ws, self._cache = {}, None
        return self

    def __repr__(self):
        return f"BatchNormPool({self.bn!r}, {type(self.pool).__name__}(relu={self.pool.relu}))"

    @staticmethod
    def fits(x) -> bool:
        """True when the pair can run fused on ``x``: even H and W (the pool drops nothing)."""
        return x.ndim == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0

    def forward(self, x, train=True):
        if not train:
            raise MecrefError("BatchNormPool runs in train mode only; in eval mode run the "
                              "BatchNorm2d and the MaxPool2d in turn")
        bn = self.bn
        _check_image(bn, x, bn.params["gamma"].shape[0])
        if not self.fits(x):
            raise MecrefError(f"BatchNormPool needs even H and W, got shape {tuple(x.shape)}")
        xp = array_module(x)
        N, C, H, W = x.shape
        Ho, Wo, M = H // 2, W // 2, N * H * W
        bn._check_train_batch(x)
        xcm = xp.ascontiguousarray(_cm(x))                          # (C, N, H, W): a view if channel-major
        x2, x6 = xcm.reshape(C, M), xcm.reshape(C, N, Ho, 2, Wo, 2)  # x6[..., a, :, b]: window position (a, b)
        gamma, beta, relu = bn.params["gamma"], bn.params["beta"], self.pool.relu
        s = xp.where(gamma < 0, -1.0, 1.0).astype(x.dtype)          # sign(A) = sign(gamma), without a host read
        mu, var, t = (xp.empty(C, dtype=x.dtype) for _ in range(3))
        A = xp.empty(C, dtype=x.dtype)
        planes = (C, 2, 2, N, Ho, Wo)
        xs = self._buffer(xp, "xs", planes, x.dtype)                 # s (x - mu), by window position
        win = self._buffer(xp, "win", planes, xp.bool_)              # each window's winner (with a gradient)
        m = self._buffer(xp, "m", (C, N, Ho, Wo), x.dtype)           # pool(xs)
        live = self._buffer(xp, "live", (C, N, Ho, Wo), xp.bool_)    # windows with a winner
        r1 = self._buffer(xp, "r1", (C, N, Ho, Wo), x.dtype)         # bottom row's max
        y = xp.empty((C, N, Ho, Wo), dtype=x.dtype)                  # channel-major

        def kernel(c):                                               # channels c: independent
            n = c.stop - c.start
            mu[c] = row_dot(x2[c]) / M
            for a in (0, 1):
                for b in (0, 1):
                    xp.subtract(x6[c, :, :, a, :, b], mu[c, None, None, None], out=xs[c, a, b])
            xs[c] *= s[c, None, None, None, None, None]
            flat = xs[c].reshape(n, -1)
            var[c] = row_dot(flat, flat) / M
            t[c] = 1.0 / xp.sqrt(var[c] + bn.eps)
            A[c] = gamma[c] * t[c]
            p00, p01, p10, p11 = xs[c, 0, 0], xs[c, 0, 1], xs[c, 1, 0], xs[c, 1, 1]
            xp.greater(p01, p00, out=win[c, 0, 1])                   # right wins the top row (ties: left)
            xp.greater(p11, p10, out=win[c, 1, 1])                   # ... the bottom row
            xp.maximum(p00, p01, out=m[c])
            xp.maximum(p10, p11, out=r1[c])
            bottom = xp.greater(r1[c], m[c], out=live[c])            # the bottom row wins (ties: top)
            xp.maximum(m[c], r1[c], out=m[c])
            xp.multiply(m[c], xp.abs(A[c])[:, None, None, None], out=y[c])
            y[c] += beta[c, None, None, None]
            top = ~bottom
            if relu:
                xp.maximum(y[c], 0, out=y[c])
                alive = y[c] > 0                                     # max <= 0: no gradient
                top &= alive
                bottom &= alive
            xp.logical_not(win[c, 0, 1], out=win[c, 0, 0])
            xp.logical_not(win[c, 1, 1], out=win[c, 1, 0])
            win[c, 0] &= top[:, None]
            win[c, 1] &= bottom[:, None]
            xp.logical_or(top, bottom, out=live[c])

        over_channels(kernel, C, x.size, xp)
        bn._update_running(mu, var, M)
        self._cache = (s, t, A, x.shape, (N, C, Ho, Wo))
        return _cm(y)

    def backward(self, dy):
        s, t, A, x_shape, y_shape = self._pending()
        _check_dy(self, dy, y_shape)
        xp = array_module(dy)
        N, C, H, W = x_shape
        Ho, Wo, M = H // 2, W // 2, N * H * W
        xs, win, m, live = self._ws["xs"], self._ws["win"], self._ws["m"], self._ws["live"]
        dyc = _cm(dy)
        g = self._buffer(xp, "g", (C, N, Ho, Wo), dy.dtype)
        routed = self._buffer(xp, "routed", (C, N, Ho, Wo), dy.dtype)
        dxs = self._buffer(xp, "dxs", xs.shape, dy.dtype)
        dbeta, dgamma = xp.empty(C, dtype=dy.dtype), xp.empty(C, dtype=dy.dtype)
        dx = xp.empty((C, N, H, W), dtype=dy.dtype)                  # channel-major
        dx6 = dx.reshape(C, N, Ho, 2, Wo, 2)

        def kernel(c):                                               # channels c: independent
            n = c.stop - c.start
            xp.multiply(dyc[c], live[c], out=g[c])                   # dy where the window has a winner
            gf, mf = g[c].reshape(n, -1), m[c].reshape(n, -1)
            dbeta[c] = row_dot(gf)
            dgamma[c] = s[c] * t[c] * row_dot(gf, mf)
            # dx = A R(g) - A dbeta / M - xs |A| t dgamma / M, planes first, then interleaved once
            xp.multiply(xs[c], (-xp.abs(A[c]) * t[c] * dgamma[c] / M)[:, None, None, None, None, None],
                        out=dxs[c])
            dxs[c] -= (A[c] * dbeta[c] / M)[:, None, None, None, None, None]
            g[c] *= A[c, None, None, None]
            for a in (0, 1):
                for b in (0, 1):
                    xp.add(dxs[c, a, b], xp.multiply(win[c, a, b], g[c], out=routed[c]),
                           out=dx6[c, :, :, a, :, b])                # back to the image layout

        over_channels(kernel, C, dx.size, xp)
        self.grads["beta"], self.grads["gamma"] = dbeta, dgamma
        return _cm(dx)
