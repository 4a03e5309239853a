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

from .base import FULL_PRECISION, Layer, _cm  # noqa: F401  (_cm, _FakeQuant: used by benchmarks and tests)
from .conv import Conv2d, Linear, col2im, im2col
from .fakequant import QuantConv2d, QuantLinear, _FakeQuant
from .layers import BatchNorm2d, Flatten, GlobalAvgPool2d, MaxPool2d, ReLU
from .model import Sequential, SmallCNN, small_cnn

__all__ = [
    "Layer", "Conv2d", "Linear", "ReLU", "MaxPool2d", "BatchNorm2d",
    "GlobalAvgPool2d", "Flatten", "Sequential", "QuantConv2d", "QuantLinear",
    "SmallCNN", "small_cnn", "im2col", "col2im", "FULL_PRECISION",
]
