"""Convolution and the fully connected layer as GEMMs: :func:`im2col` / :func:`col2im`,
:class:`Conv2d` and :class:`Linear` (derivations N1, N2)."""
from __future__ import annotations

import math

import numpy as np

from ..backend import MecrefError, array_module, get_xp
from ..threads import over_channels
from ..validate import check_int
from .base import Layer, _check_dy, _check_floating, _check_image, _cm, _float32


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


def offset_major(W):
    """The kernel as the column gradient's GEMM operand: ``W (F, C, k, k) -> (k k C, F)``, row
    ``(i, j, c)`` holding ``W[:, c, i, j]``, so ``offset_major(W) @ dY`` is the offset-major
    ``dcols`` that :func:`col2im` folds (N1). A small copy (the kernel's size)."""
    F, C, k, _ = W.shape
    return W.transpose(2, 3, 1, 0).reshape(k * k * C, F)


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
        dcols = xp.matmul(offset_major(W), dY, out=self._buffer(xp, "dcols", (k * k * C, N * Ho * Wo), dy.dtype))
        H, Wd = x_shape[2:]
        p = self.padding
        dxpad = self._buffer(xp, "dxpad", (C, N, H + 2 * p, Wd + 2 * p), dy.dtype)
        rows = self._buffer(xp, "rows", (C, N, H + 2 * p, Wo), dy.dtype)
        return dW, col2im(dcols.reshape(k * k * C, N, Ho * Wo).swapaxes(0, 1), x_shape, k,
                          self.stride, p, dxpad=dxpad, rows=rows)


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
