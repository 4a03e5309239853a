"""Layers and the small CNN: thin holders of ``params`` and ``grads`` around closed-form
forward/backward pairs (docs/derivations.md, sections N1-N5, N9 and N10).

Every layer follows one convention (docs/design.md)::

    y = layer.forward(x, train=True)   # train mode caches what backward needs
    dx = layer.backward(dy)            # sets layer.grads[k] for every k in layer.params

and carries

- ``params`` / ``grads``: dicts with the same keys (``grads`` filled, not accumulated, by
  ``backward``);
- ``buffers``: non-trained state (BatchNorm running statistics, the STE activation range);
- ``no_decay``: param keys the optimiser does not decay (biases, BN gamma/beta, quantizer
  steps, clips and offsets);
- ``positive``: param keys that must stay > 0 (quantizer steps ``s``, PACT's ``alpha``).

``forward(x, train=False)`` keeps no cache and leaves a pending train-mode cache alone.
Images are NCHW float32 (float64 works too: the derivation tests use it). Every layer takes
an (N, C, H, W) array in any memory layout, but returns its 4-D outputs and input gradients
channel-major in memory: a ``(C, N, H, W)`` array seen through the ``(N, C, H, W)`` view
``a.swapaxes(0, 1)`` (:func:`_cm`). In that layout a convolution over the whole batch is one
GEMM with no transpose, and BatchNorm's per-channel sums run over contiguous rows (N1, N3).
Large temporaries that never leave a layer (im2col columns, padded inputs, masks) live in
per-layer workspaces that are reused across steps; arrays a layer returns are always fresh.

Quantized layers (:class:`QuantConv2d`, :class:`QuantLinear`) fake-quantize their weight and
their input activation with one of :func:`mecref.schemes.names` (section N9); :func:`small_cnn` builds the
network of the experiments (section N10).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import schemes
from .backend import MecrefError, array_module, get_xp, row_dot, to_host
from .threads import over_channels
from .validate import check_array, check_choice, check_int

__all__ = [
    "Layer", "Conv2d", "Linear", "ReLU", "MaxPool2d", "BatchNorm2d",
    "GlobalAvgPool2d", "Flatten", "Sequential", "QuantConv2d", "QuantLinear",
    "SmallCNN", "small_cnn", "im2col", "col2im",
]

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


# ============================================================================ im2col / col2im
def _cm(a):
    """Swap the first two axes, ``(N, C, ...) <-> (C, N, ...)``: a view, its own inverse.

    Layers keep 4-D activations and their gradients channel-major in memory, ``(C, N, H, W)``,
    and hand them on as this ``(N, C, H, W)`` view (module docstring)."""
    return a.swapaxes(0, 1)


def im2col(x, k, stride, padding, out=None, xpad=None):
    """Unfold k x k windows into columns (derivations N1).

    .. math::
        \\mathrm{cols}[(c, i, j), (n, h_o, w_o)] = x_{pad}[n, c,\\; i + s h_o,\\; j + s w_o]

    The columns of all images sit side by side, so a convolution is one GEMM
    ``W_(F, Ckk) @ cols_(Ckk, N Ho Wo)``.

    Parameters
    ----------
    x : ndarray (N, C, H, W), any memory layout (channel-major is copied fastest)
    k, stride, padding : int
    out : ndarray (C*k*k, N*Ho*Wo) or None
        Workspace to write the columns into (allocated when None).
    xpad : ndarray (C, N, H + 2 padding, W + 2 padding) or None
        Workspace for the zero-padded input, channel-major, whose border must be zero (it is
        only written inside); allocated when None.

    Returns
    -------
    cols : ndarray (N, C*k*k, Ho*Wo), ``Ho = (H + 2 padding - k) // stride + 1``: the view of
        the (C*k*k, N*Ho*Wo) GEMM operand that reads image n's columns at ``cols[n]``
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    xc = _cm(x)                                                    # (C, N, H, W)
    if padding and xpad is None:
        xpad = xp.zeros((C, N, H + 2 * padding, W + 2 * padding), dtype=x.dtype)
    Hp, Wp = H + 2 * padding, W + 2 * padding
    Ho, Wo = (Hp - k) // stride + 1, (Wp - k) // stride + 1
    if out is None:
        out = xp.empty((C * k * k, N * Ho * Wo), dtype=x.dtype)
    out6 = out.reshape(C, k, k, N, Ho, Wo)
    src = xpad if padding else xc
    sC, sN, sH, sW = src.strides

    def copy_windows(c):                                           # channels c: independent
        if padding:
            xpad[c, :, padding:padding + H, padding:padding + W] = xc[c]
        out6[c] = xp.lib.stride_tricks.as_strided(
            src[c], shape=(c.stop - c.start, k, k, N, Ho, Wo),
            strides=(sC, sH, sW, sN, stride * sH, stride * sW))

    over_channels(copy_windows, C, out.size, xp)
    return out.reshape(C * k * k, N, Ho * Wo).swapaxes(0, 1)


def col2im(dcols, x_shape, k, stride, padding, dxpad=None, rows=None):
    """Fold column gradients back onto the image: the adjoint of :func:`im2col` (N1).

    .. math::
        dx_{pad}[n, c, i + s h_o, j + s w_o] \\mathrel{+}= \\mathrm{dcols}[n, (i, j, c), (h_o, w_o)]

    Whole slabs, no scatter, in two passes: for each column offset ``j`` the ``k`` slabs of
    the row offsets ``i`` are summed into ``rows`` (adds along whole image rows), which is then
    added into the padded gradient at column offset ``j``; finally the padding is cropped.

    Parameters
    ----------
    dcols : ndarray (N, k*k*C, Ho*Wo), offset-major: row ``(i, j, c)``; fastest as the view
        ``dcols2.reshape(k*k*C, N, Ho*Wo).swapaxes(0, 1)`` of a GEMM result
        ``dcols2 (k*k*C, N*Ho*Wo)``, whose slabs are then contiguous
    x_shape : (N, C, H, W)
    dxpad : ndarray (C, N, H + 2 padding, W + 2 padding) or None
        Channel-major workspace for the padded gradient (allocated when None; overwritten).
    rows : ndarray (C, N, H + 2 padding, Wo) or None
        Workspace for one column offset's sum over the row offsets (allocated when None).

    Returns
    -------
    dx : ndarray (N, C, H, W), fresh, channel-major in memory
    """
    xp = array_module(dcols)
    N, C, H, W = x_shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    Ho, Wo = (Hp - k) // stride + 1, (Wp - k) // stride + 1
    if dxpad is None:
        dxpad = xp.empty((C, N, Hp, Wp), dtype=dcols.dtype)
    if rows is None:
        rows = xp.empty((C, N, Hp, Wo), dtype=dcols.dtype)
    slabs = dcols.swapaxes(0, 1).reshape(k, k, C, N, Ho, Wo)       # slabs[i, j]: (C, N, Ho, Wo)
    span_h, span_w = stride * (Ho - 1) + 1, stride * (Wo - 1) + 1   # rows/columns a slab reaches
    dx = xp.empty((C, N, H, W), dtype=dcols.dtype)                  # channel-major

    def fold(c):                                                   # channels c: independent
        dxpad[c] = 0
        for j in range(k):
            if stride > 1:
                rows[c] = 0
            rows[c, :, span_h:] = 0
            rows[c, :, 0:span_h:stride] = slabs[0, j, c]             # i = 0 assigns, i > 0 adds
            for i in range(1, k):
                rows[c, :, i:i + span_h:stride] += slabs[i, j, c]
            dxpad[c, :, :, j:j + span_w:stride] += rows[c]
        dx[c] = dxpad[c, :, padding:padding + H, padding:padding + W]

    over_channels(fold, C, dcols.size, xp)
    return _cm(dx)


# ============================================================================ base layer
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


# ============================================================================ Conv2d
class Conv2d(Layer):
    """2-D convolution (cross-correlation) as im2col + GEMM (derivations N1).

    .. math::
        y[n, f] = \\sum_{c, i, j} W[f, c, i, j]\\, x_{pad}[n, c, i + s h_o, j + s w_o] + b[f]
        \\;\\Longleftrightarrow\\; Y_{(F,\\, N H_o W_o)} = W_{(F, Ckk)}\\,
        \\mathrm{cols}_{(Ckk,\\, N H_o W_o)}

    one GEMM for the whole batch, whose result ``Y`` is ``y`` channel-major. Backward:
    ``dW = dY cols^T``, ``db = dY 1``, ``dcols = W^T dY`` folded back by :func:`col2im`.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int, square kernel k
    stride : int, 1 or 2 (any >= 1 works)
    padding : int >= 0, zero padding on each side
    bias : bool
    backend : "numpy" or "cupy"
    seed : int or numpy Generator
        Init as PyTorch's default, ``W, b ~ U(-1/sqrt(C k k), 1/sqrt(C k k))``. Before a
        BatchNorm the scale of ``W`` does not change the function but sets the effective step
        (``lr / |W|^2``), so PyTorch's scale keeps its hyperparameters transferable.

    Shapes: x (N, C, H, W) -> y (N, F, Ho, Wo), ``Ho = (H + 2 padding - k) // stride + 1``.
    ``input_grad = False`` makes ``backward`` skip dx (return None): the first layer of a
    network does not need the gradient of the images.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=True,
                 backend="numpy", seed=0):
        super().__init__()
        C = check_int("in_channels", in_channels, 1)
        F = check_int("out_channels", out_channels, 1)
        k = check_int("kernel_size", kernel_size, 1)
        self.stride = check_int("stride", stride, 1)
        self.padding = check_int("padding", padding, 0)
        xp = get_xp(backend)
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(C * k * k)
        self.params["W"] = _float32(xp, rng.uniform(-bound, bound, (F, C, k, k)))
        if bias:
            self.params["b"] = _float32(xp, rng.uniform(-bound, bound, F))
            self.no_decay.add("b")
        self.input_grad = True

    @property
    def in_channels(self):
        return self.params["W"].shape[1]

    def _check_input(self, x):
        _check_image(self, x, self.in_channels)
        k = self.params["W"].shape[2]
        H, W = x.shape[2] + 2 * self.padding, x.shape[3] + 2 * self.padding
        if H < k or W < k:
            raise MecrefError(f"{type(self).__name__}: padded image {H}x{W} is smaller than the "
                              f"{k}x{k} kernel (x shape {tuple(x.shape)}, padding {self.padding})")

    def forward(self, x, train=True):
        self._check_input(x)
        return self._conv_forward(x, self.params["W"], train)

    def backward(self, dy):
        dW, dx = self._conv_backward(dy, self.input_grad)
        self.grads["W"] = dW
        return dx

    def _conv_forward(self, x, W, train):
        """y = W cols (+ b) for the given (possibly fake-quantized) x and W: one GEMM."""
        xp = array_module(x)
        N, C, H, Wd = x.shape
        F, _, k, _ = W.shape
        s, p = self.stride, self.padding
        Ho, Wo = (H + 2 * p - k) // s + 1, (Wd + 2 * p - k) // s + 1
        if train:
            cols = im2col(x, k, s, p,
                          out=self._buffer(xp, "cols", (C * k * k, N * Ho * Wo), x.dtype),
                          xpad=self._buffer(xp, "xpad", (C, N, H + 2 * p, Wd + 2 * p), x.dtype,
                                            zero=True) if p else None)
        else:
            cols = im2col(x, k, s, p)
        cols = cols.swapaxes(0, 1).reshape(C * k * k, N * Ho * Wo)     # a view: the operand
        y = W.reshape(F, -1) @ cols                                     # (F, N Ho Wo)
        if "b" in self.params:
            y += self.params["b"][:, None]
        if train:
            self._cache = (cols, W, x.shape, (N, F, Ho, Wo))
        return _cm(y.reshape(F, N, Ho, Wo))

    def _conv_backward(self, dy, need_dx):
        """(dW, dx) of Y = W cols; also sets grads['b']. dx is None unless need_dx.

        With ``dY (F, N Ho Wo)`` the channel-major gradient: ``dW = dY cols^T``, ``db = dY 1``,
        ``dcols = W^T dY`` (rows offset-major, (i, j, c)), three single GEMMs or sums."""
        cols, W, x_shape, y_shape = self._pending()
        _check_dy(self, dy, y_shape)
        xp = array_module(dy)
        N, F, Ho, Wo = y_shape
        C, k = x_shape[1], W.shape[2]
        dY = _cm(dy).reshape(F, N * Ho * Wo)                            # a view if channel-major
        dW = (dY @ cols.T).reshape(W.shape)
        if "b" in self.params:
            self.grads["b"] = dY.sum(axis=1)
        if not need_dx:
            return dW, None
        W_offsets = W.transpose(2, 3, 1, 0).reshape(k * k * C, F)      # rows (i, j, c)
        dcols = xp.matmul(W_offsets, dY, out=self._buffer(xp, "dcols", (k * k * C, N * Ho * Wo), dy.dtype))
        H, Wd = x_shape[2:]
        p = self.padding
        dxpad = self._buffer(xp, "dxpad", (C, N, H + 2 * p, Wd + 2 * p), dy.dtype)
        rows = self._buffer(xp, "rows", (C, N, H + 2 * p, Wo), dy.dtype)
        return dW, col2im(dcols.reshape(k * k * C, N, Ho * Wo).swapaxes(0, 1), x_shape, k,
                          self.stride, p, dxpad=dxpad, rows=rows)


# ============================================================================ Linear
class Linear(Layer):
    """Fully connected layer (derivations N2).

    .. math::
        y = x W^T + b, \\qquad dW = dy^T x, \\quad db = \\textstyle\\sum_n dy_n, \\quad dx = dy\\, W

    Shapes: x (N, in_features), W (out_features, in_features), b (out_features,),
    y (N, out_features). Init as PyTorch's default: ``W, b ~ U(-1/sqrt(in), 1/sqrt(in))``.
    """

    def __init__(self, in_features, out_features, bias=True, backend="numpy", seed=0):
        super().__init__()
        n_in = check_int("in_features", in_features, 1)
        n_out = check_int("out_features", out_features, 1)
        xp = get_xp(backend)
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(n_in)
        self.params["W"] = _float32(xp, rng.uniform(-bound, bound, (n_out, n_in)))
        if bias:
            self.params["b"] = _float32(xp, rng.uniform(-bound, bound, n_out))
            self.no_decay.add("b")
        self.input_grad = True

    def _check_input(self, x):
        _check_floating(self, x)
        n_in = self.params["W"].shape[1]
        if x.ndim != 2 or x.shape[1] != n_in:
            raise MecrefError(f"{type(self).__name__}: x must have shape (N, {n_in}), got {tuple(x.shape)}")

    def forward(self, x, train=True):
        self._check_input(x)
        return self._linear_forward(x, self.params["W"], train)

    def backward(self, dy):
        dW, dx = self._linear_backward(dy)
        self.grads["W"] = dW
        return dx

    def _linear_forward(self, x, W, train):
        y = x @ W.T
        if "b" in self.params:
            y += self.params["b"]
        if train:
            self._cache = (x, W, y.shape)
        return y

    def _linear_backward(self, dy):
        x, W, y_shape = self._pending()
        _check_dy(self, dy, y_shape)
        if "b" in self.params:
            self.grads["b"] = dy.sum(axis=0)
        return dy.T @ x, dy @ W


# ============================================================================ ReLU, pools, BN
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
        if M < 2:
            raise MecrefError(f"BatchNorm2d in train mode needs more than one value per channel, "
                              f"got x of shape {tuple(x.shape)}")
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
        r = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - r
        rm += r * mu.astype(rm.dtype)
        rv *= 1 - r
        rv += (r * M / (M - 1)) * var.astype(rv.dtype)
        self._cache = (xc, t, x.shape)
        return _cm(y.reshape(C, N, H, W))

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


# ============================================================================ fake quantization
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


# ============================================================================ containers
class _Container:
    """Named layers: ``named_params``, ``state_dict``, ``load_state_dict``, ``astype``."""

    def __init__(self, layers, names):
        if len(names) != len(layers) or len(set(names)) != len(names):
            raise MecrefError(f"names must be unique, one per layer, got {names!r}")
        self.layers, self.names = list(layers), list(names)

    def named_params(self):
        """Yield ``(name, layer, key)`` for every trainable param (``name = "<layer>.<key>"``)."""
        for lname, layer in zip(self.names, self.layers):
            for key in layer.params:
                yield f"{lname}.{key}", layer, key

    def _entries(self):
        for lname, layer in zip(self.names, self.layers):
            for d in (layer.params, layer.buffers):
                for key in d:
                    yield f"{lname}.{key}", d, key

    def _value_rules(self):
        """``{name: (test, what)}``: the values an entry must hold besides being finite: a
        quantizer step or clip level > 0, a BatchNorm running variance >= 0, a ``ready`` flag
        0 or 1."""
        rules = {}
        for lname, layer in zip(self.names, self.layers):
            for key in layer.positive:
                rules[f"{lname}.{key}"] = (lambda v: v > 0, "> 0 (a quantizer step or clip level)")
            if "running_var" in layer.buffers:
                rules[f"{lname}.running_var"] = (lambda v: v >= 0, ">= 0 (a variance)")
            if "ready" in layer.buffers:
                rules[f"{lname}.ready"] = (lambda v: (v == 0) | (v == 1), "0 or 1 (a flag)")
        return rules

    def state_dict(self):
        """Host copies of every param and buffer: ``{"<layer>.<key>": np.ndarray}``."""
        return {name: np.array(to_host(d[key]), copy=True) for name, d, key in self._entries()}

    def load_state_dict(self, state):
        """Copy a :meth:`state_dict` in, in place; refuses (MecrefError, nothing loaded) on
        missing or extra keys, shape mismatches, non-floating dtypes, non-finite values, and
        values outside :meth:`_value_rules` (a step <= 0, a negative variance, ...)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
        entries = {name: (d, key) for name, d, key in self._entries()}
        missing = sorted(set(entries) - set(state))
        extra = sorted(set(state) - set(entries))
        if missing or extra:
            raise MecrefError(f"state dict does not match the model: missing keys {missing}, "
                              f"unexpected keys {extra}")
        rules = self._value_rules()
        for name, (d, key) in entries.items():
            v = state[name]
            if not hasattr(v, "shape") or tuple(v.shape) != tuple(d[key].shape):
                raise MecrefError(f"state dict entry {name!r} has shape "
                                  f"{tuple(getattr(v, 'shape', ()))}, the model expects "
                                  f"{tuple(d[key].shape)}")
            if not np.issubdtype(np.dtype(v.dtype), np.floating):
                raise MecrefError(f"state dict entry {name!r} has dtype {v.dtype}, the model "
                                  f"expects a floating array ({d[key].dtype})")
            host = np.asarray(to_host(v), dtype=np.float64)
            if not np.isfinite(host).all():
                raise MecrefError(f"state dict entry {name!r} has NaN or inf values")
            test, what = rules.get(name, (None, None))
            if test is not None and not test(host).all():
                bad = host[~test(host)].ravel()
                raise MecrefError(f"state dict entry {name!r} must be {what}, got "
                                  f"{bad.size} value(s) that are not, e.g. {bad[0]!r}")
        for name, (d, key) in entries.items():
            xp = array_module(d[key])
            d[key][...] = xp.asarray(state[name], dtype=d[key].dtype)
        for layer in self.layers:
            layer.__dict__.pop("_ready", None)   # buffers["ready"] may have changed

    def astype(self, dtype):
        """Cast every layer's params and buffers (float64 for gradient checks); returns self."""
        for layer in self.layers:
            layer.astype(dtype)
        return self


class Sequential(_Container):
    """Layers applied in order; backward in reverse. ``names`` default to "0", "1", ...

    .. math:: y = f_L(\\cdots f_1(x)), \\qquad dx = f_1'^T(\\cdots f_L'^T(dy))
    """

    def __init__(self, *layers, names=None):
        super().__init__(layers, list(names) if names is not None else [str(i) for i in range(len(layers))])

    def forward(self, x, train=True):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


class SmallCNN(_Container):
    """The experiments' network (derivations N10); build it with :func:`small_cnn`.

    ``forward(x, train) -> (logits, features)`` with features the (N, C3) penultimate
    (global-average-pooled, un-normalised) activations; ``backward(dlogits, dfeatures=None)``
    adds ``dfeatures`` (e.g. an entropy regulariser's gradient) at that point:

    .. math::
        \\frac{\\partial L}{\\partial z} = W_{fc}^{T\\!}\\text{-path}(dlogits) + dfeatures

    Attributes: ``layers``, ``names``, ``config`` (``small_cnn(**config)`` rebuilds it).
    """

    def __init__(self, layers, names, config):
        super().__init__(layers, names)
        self.config = config

    def forward(self, x, train=True, taps=None):
        """x (N, C_in, H, W) floating -> logits (N, num_classes), features (N, C3).

        ``taps``: None, or names of inner layers (``self.names``) whose outputs are returned as
        a third value ``{name: output}``; ``backward`` accepts a gradient for each
        (derivations T3).
        """
        check_array("x", x, ndim=4)
        W0 = self.layers[0].params["W"]
        if x.dtype != W0.dtype:
            raise TypeError(f"x must have the model's dtype {W0.dtype}, got {x.dtype}")
        unknown = [t for t in (taps or ()) if t not in self.names[:-2]]
        if unknown:
            raise MecrefError(f"taps must name inner layers of {self.names[:-2]}, got {unknown}")
        h, tapped = x, {}
        for name, layer in zip(self.names[:-1], self.layers[:-1]):
            h = layer.forward(h, train)
            if taps and name in taps:
                tapped[name] = h
        logits = self.layers[-1].forward(h, train)
        return (logits, h) if taps is None else (logits, h, tapped)

    def backward(self, dlogits, dfeatures=None, dtaps=None):
        """Fill every layer's grads; returns the input gradient only if the first layer's
        ``input_grad`` is True (it is False in :func:`small_cnn`: images need none).

        ``dfeatures`` (N, C3) is added to the gradient at the features and ``dtaps[name]`` at
        the output of layer ``name`` (a term of the loss that reads that output directly):

        .. math:: \\frac{dL}{dh_i} = J_{i+1}^T \\frac{dL}{dh_{i+1}} + \\frac{\\partial L}{\\partial h_i}
        """
        d = self.layers[-1].backward(dlogits)
        dtaps = dict(dtaps or {})
        if dfeatures is not None:
            dtaps[self.names[-2]] = dfeatures
        unknown = [t for t in dtaps if t not in self.names[:-1]]
        if unknown:
            raise MecrefError(f"dtaps must name layers of {self.names[:-1]}, got {unknown}")
        for name, layer in zip(reversed(self.names[:-1]), reversed(self.layers[:-1])):
            if name in dtaps:
                extra = dtaps[name]
                if not hasattr(extra, "shape") or tuple(extra.shape) != tuple(d.shape):
                    what = "dfeatures" if name == self.names[-2] else f"dtaps[{name!r}]"
                    raise MecrefError(f"{what} must have the shape of {name}'s output "
                                      f"{tuple(d.shape)}, got {tuple(getattr(extra, 'shape', ()))}")
                d = d + extra
            d = layer.backward(d)
        return d

    def __repr__(self):
        body = "\n".join(f"  ({n}): {l!r}" for n, l in zip(self.names, self.layers))
        return f"SmallCNN(\n{body}\n)"


def small_cnn(quantizer=None, w_bits=32, a_bits=32, first_last_bits=8, width=(16, 32, 64),
              num_classes=10, backend="numpy", seed=0):
    """The small CNN of the experiments (derivations N10), 1 x 28 x 28 inputs::

        conv3x3(1->c1, pad 1) + BN + ReLU + maxpool2      28 -> 14
        conv3x3(c1->c2, pad 1) + BN + ReLU + maxpool2     14 -> 7
        conv3x3(c2->c3, pad 1) + BN + ReLU
        global average pool -> features (N, c3)
        linear(c3 -> num_classes) -> logits

    Convolutions carry no bias (BatchNorm's beta takes its place); each ReLU before a pool is
    folded into the pool (``MaxPool2d(relu=True)``).

    Parameters
    ----------
    quantizer : None (full precision) or one of :func:`mecref.schemes.names`
    w_bits, a_bits : int, 1..8 or 32
        Bits of the inner layers (conv2, conv3). With ``quantizer=None`` both must be 32.
    first_last_bits : int, 1..8 or 32
        Bits (weights and input) of conv1 and the final linear layer; ignored when
        ``quantizer=None``. conv1's input (normalised images) is signed, the others unsigned.
    width : three ints (c1, c2, c3)
    num_classes : int >= 2
    backend : "numpy" or "cupy"
    seed : int, the init seed (one numpy Generator draws every layer in order)

    Returns
    -------
    SmallCNN, with ``config`` holding these arguments (``width`` as a list).
    """
    if quantizer is not None:
        check_choice("quantizer", quantizer, schemes.names())
    w_bits, a_bits = _check_qbits("w_bits", w_bits), _check_qbits("a_bits", a_bits)
    first_last_bits = _check_qbits("first_last_bits", first_last_bits)
    if quantizer is None and (w_bits != FULL_PRECISION or a_bits != FULL_PRECISION):
        raise MecrefError(f"quantizer=None is full precision: w_bits and a_bits must be 32, "
                          f"got w_bits={w_bits}, a_bits={a_bits} (name a quantizer from {schemes.names()})")
    if (not isinstance(width, (tuple, list)) or len(width) != 3
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in width)):
        raise MecrefError(f"width must be three positive ints, got {width!r}")
    c1, c2, c3 = (int(w) for w in width)
    num_classes = check_int("num_classes", num_classes, 2)
    seed = check_int("seed", seed, 0)
    get_xp(backend)
    rng = np.random.default_rng(seed)

    def conv(cin, cout, wb, ab, signed):
        if quantizer is None or (wb == FULL_PRECISION and ab == FULL_PRECISION):
            return Conv2d(cin, cout, 3, 1, 1, bias=False, backend=backend, seed=rng)
        return QuantConv2d(cin, cout, 3, 1, 1, bias=False, scheme=quantizer, w_bits=wb, a_bits=ab,
                           a_signed=signed, backend=backend, seed=rng)

    fl = first_last_bits
    conv1 = conv(1, c1, fl, fl, True)
    conv1.input_grad = False
    layers = [conv1, BatchNorm2d(c1, backend=backend), MaxPool2d(relu=True),
              conv(c1, c2, w_bits, a_bits, False), BatchNorm2d(c2, backend=backend), MaxPool2d(relu=True),
              conv(c2, c3, w_bits, a_bits, False), BatchNorm2d(c3, backend=backend), ReLU(),
              GlobalAvgPool2d()]
    if quantizer is None or fl == FULL_PRECISION:
        layers.append(Linear(c3, num_classes, backend=backend, seed=rng))
    else:
        layers.append(QuantLinear(c3, num_classes, scheme=quantizer, w_bits=fl, a_bits=fl,
                                  a_signed=False, backend=backend, seed=rng))
    names = ["conv1", "bn1", "pool1", "conv2", "bn2", "pool2", "conv3", "bn3", "relu3", "gap", "fc"]
    config = dict(quantizer=quantizer, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits,
                  width=[c1, c2, c3], num_classes=num_classes, backend=backend, seed=seed)
    return SmallCNN(layers, names, config)
