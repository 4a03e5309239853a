"""Named stacks of layers: :class:`Sequential` and the experiments' :class:`SmallCNN`, built by
:func:`small_cnn` (derivations N10); both save and load a ``state_dict``."""
from __future__ import annotations

import numbers

import numpy as np

from .. import schemes
from ..backend import MecrefError, array_module, get_xp, to_host
from ..validate import check_array, check_choice, check_int
from .base import FULL_PRECISION, _check_qbits
from .conv import Conv2d, Linear
from .fakequant import QuantConv2d, QuantLinear
from .fused import BatchNormPool
from .layers import BatchNorm2d, GlobalAvgPool2d, MaxPool2d, ReLU


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
        # each BatchNorm2d -> MaxPool2d pair runs as one pass in train mode (N11)
        self._fused = {i: BatchNormPool(bn, pool) for i, (bn, pool) in enumerate(zip(layers, layers[1:]))
                       if isinstance(bn, BatchNorm2d) and isinstance(pool, MaxPool2d)}
        self._plan = None

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
        h, tapped, plan, i = x, {}, [], 0
        while i < len(self.layers) - 1:
            pair = self._fused.get(i)
            if train and pair is not None and pair.fits(h) and self.names[i] not in (taps or ()):
                h, step = pair.forward(h), (i, i + 1)         # BatchNorm + pool in one pass
            else:
                h, step = self.layers[i].forward(h, train), (i,)
            plan.append(step)
            i = step[-1] + 1
            if taps and self.names[step[-1]] in taps:
                tapped[self.names[step[-1]]] = h
        logits = self.layers[-1].forward(h, train)
        if train:
            self._plan = plan
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
        plan = self._plan or [(i,) for i in range(len(self.layers) - 1)]
        inside = [self.names[step[0]] for step in plan if len(step) == 2 and self.names[step[0]] in dtaps]
        if inside:
            raise MecrefError(f"dtaps name {inside}, whose output the forward never formed: each "
                              "runs fused with the pool after it (tap them in forward to keep them)")
        for step in reversed(plan):
            name = self.names[step[-1]]
            if name in dtaps:
                extra = dtaps[name]
                if not hasattr(extra, "shape") or tuple(extra.shape) != tuple(d.shape):
                    what = "dfeatures" if name == self.names[-2] else f"dtaps[{name!r}]"
                    raise MecrefError(f"{what} must have the shape of {name}'s output "
                                      f"{tuple(d.shape)}, got {tuple(getattr(extra, 'shape', ()))}")
                d = d + extra
            d = (self._fused[step[0]] if len(step) == 2 else self.layers[step[0]]).backward(d)
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
