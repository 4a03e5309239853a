"""Integer export and integer-only inference of the small quantized CNN (docs/export.md;
derivations X1-X6).

::

    imodel = export_int_model(model)               # codes, scales, requantisation constants
    save_int_model(imodel, "int.npz")              # one .npz (graph JSON inside, copy beside)
    imodel = load_int_model("int.npz")             # checked before it is returned
    logits = int_forward(imodel, images)           # uint8 (N, 28, 28) -> int64 (N, 10)
    pred = int_predict(imodel, images)             # argmax of the integer logits
    report = compare_int(model, imodel, images)    # integer path vs the fake-quant model

The exported model is a graph of integer operations on named tensors (X1):

======================  ===================================================================
op                      integer arithmetic
======================  ===================================================================
``lut``                 uint8 pixel -> input code: a 256-entry table (X2)
``conv2d``, ``linear``  int8 codes x int8 weight codes, accumulated in int32 (X3)
``requant``             ``clip(round_shift(M acc + C, n), lo, Qp)``: BatchNorm, ReLU and the
                        next layer's input quantizer in one int64 step per channel (X4, X5)
``maxpool2d``           2x2 max over codes (after the monotone requantisation) (X4)
``requant_gap``         ReLU, global average pool and the quantizer of the last layer (X5)
======================  ===================================================================

``M`` (an int32 multiplier), ``n`` (a right shift) and ``C`` (an int64 offset at the
multiplier's precision) are fixed-point constants computed once at export; rounding is
round-half-to-even, as ``numpy.rint`` in the fake quantizers.

BatchNorm is not folded into the weight codes: the fake-quant model quantizes each weight
channel *before* BatchNorm, so scaling the weights by BN's factor would change the codes. It is
folded into the per-channel requantisation instead, which reproduces the fake-quant model (X4).
All four schemes (``ste``, ``lsq``, ``lsqplus``, ``dorefa_pact``) export; full-precision
layers (bits 32) do not (:class:`ExportError`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import nn, quant
from .backend import MecrefError, array_module, backend_name, to_backend, to_host
from .checkpoint import CheckpointError, _verify_zip, write_atomic
from .data import PIXEL_MEAN, PIXEL_STD, normalize
from .validate import check_int
from .onnx_export import to_onnx  # noqa: F401  (ONNX in QDQ form: mecref.onnx_export)

__all__ = [
    "ExportError", "IntModel", "FORMAT", "FORMAT_VERSION",
    "export_int_model", "save_int_model", "load_int_model", "export_checkpoint",
    "int_run", "int_forward", "int_predict", "fake_quant_trace", "compare_int",
    "evaluate_int", "describe_int_model", "markdown_comparison",
]

FORMAT = "mecref-int"
FORMAT_VERSION = 1
_META = "__graph__"
LOGIT_FRAC_BITS = 8          # logits carry 8 fractional bits below the coarsest accumulator step
_ACC_LIMIT = 2 ** 31         # int32 accumulators
_REQ_LIMIT = 2 ** 62         # int64 requantisation, one bit of headroom for the rounding add
_INT_BUDGET = 256 << 20      # bytes an integer model's arrays may declare in all
_OPS = ("lut", "conv2d", "linear", "requant", "maxpool2d", "requant_gap")


class ExportError(MecrefError):
    """A model cannot be exported, or an exported file is not a valid integer model."""


@dataclass
class IntModel:
    """An exported integer model.

    Attributes
    ----------
    graph : list of dict
        Nodes in execution order: ``op`` (one of ``lut, conv2d, linear, requant, maxpool2d,
        requant_gap``), ``name``, ``input``, ``output`` (tensor names) and the op's attributes;
        array attributes name entries of ``arrays``.
    arrays : dict[str, ndarray]
        Integer arrays (weight codes, tables, multipliers, shifts, offsets) and the float
        scales they came from (``*.w_scale``, for reference; inference does not read them).
    tensors : dict[str, dict]
        What each integer tensor means: real value ``= scale * code + offset`` (codes and
        logits), bits, signedness, code range.
    meta : dict
        The source model's config, scheme, bit-widths and input format.
    """
    graph: list
    arrays: dict
    tensors: dict
    meta: dict = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.graph[-1]["output"]


# ============================================================================ fixed point
def _round_shift(V, n):
    """``round(V / 2^n)``, ties to even, for int64 ``V`` and per-channel shifts ``n >= 1`` (X4).

    .. math:: q = \\lfloor (V + 2^{n-1}) / 2^n \\rfloor - 1[V \\bmod 2^n = 2^{n-1},\\ q \\text{ odd}]
    """
    one = np.int64(1)
    half = one << (n - 1)
    q = (V + half) >> n
    tie = (V & ((one << n) - 1)) == half
    q -= tie & ((q & 1) == 1)
    return q


def _fixed_point(m, c, bound, terms=1):
    """Per-channel ``(M, n, C)`` with ``m ~ M 2^-n`` and ``c ~ C 2^-n`` (X4).

    ``n`` is the largest shift that keeps ``|M| < 2^31`` (a normalised int32 multiplier) and
    ``terms (|M| bound + |C|) < 2^62`` (no int64 overflow, ``bound`` the largest |acc|).

    Parameters
    ----------
    m : (F,) float64, real multipliers
    c : (F,) or (F, H, W) float64, real offsets in output units
    bound : (F,) float64, largest |accumulator| per channel
    terms : int, accumulators summed before the shift (the pooled positions of ``requant_gap``)
    """
    F = m.shape[0]
    cmax = np.abs(c).reshape(F, -1).max(axis=1)
    M = np.zeros(F, np.int64)
    n = np.zeros(F, np.int64)
    C = np.zeros(c.shape, np.int64)
    for f in range(F):
        span = terms * (abs(m[f]) * bound[f] + cmax[f])
        n_f = 62 if span == 0 else math.floor(61 - math.log2(span))
        if m[f] != 0:
            n_f = min(n_f, 31 - math.frexp(abs(m[f]))[1])
        n_f = min(n_f, 62)
        if n_f < 1:
            raise ExportError(f"channel {f}: multiplier {m[f]!r} and offset up to {cmax[f]!r} do "
                              f"not fit an int32 multiplier with an int64 requantisation")
        M[f] = int(np.rint(m[f] * 2.0 ** n_f))
        if abs(int(M[f])) >= 2 ** 31:       # m rounded up to the next power of two
            n_f -= 1
            M[f] = int(np.rint(m[f] * 2.0 ** n_f))
        C[f] = np.rint(c[f] * 2.0 ** n_f).astype(np.int64)
        n[f] = n_f
        worst = terms * (abs(int(M[f])) * int(bound[f]) + int(np.abs(C[f]).max()))
        if worst >= _REQ_LIMIT:
            raise ExportError(f"channel {f}: requantisation would overflow int64 ({worst} >= 2^62)")
    return M.astype(np.int32), n.astype(np.int32), C


# ============================================================================ quantizers of a layer
def _act_quantizer(layer):
    """The input quantizer of a quantized layer as ``dict(kind, bits, signed, Qn, Qp, s, beta,
    arrays)``: ``kind`` the quantizer's name, ``s`` and ``beta`` float32 arrays shaped as the
    layer uses them (X2), from the quantizer's own ``grid`` (:mod:`mecref.schemes`)."""
    bits, signed, aq = layer.a_bits, layer.a_signed, layer.a_quant
    Qn, Qp = quant.qrange(bits, signed)
    arrays = {k: np.asarray(to_host(v)) for k, v in layer._arrays(aq).items()}
    s, beta = aq.grid(arrays, np.zeros(1, np.float32), bits, signed)
    s = np.asarray(s, np.float32)
    beta = np.zeros_like(s) if beta is None else np.asarray(beta, np.float32)
    return dict(kind=aq.name, bits=bits, signed=signed, Qn=Qn, Qp=Qp, s=s, beta=beta,
                quantizer=aq, arrays=arrays)


def _act_codes(q, x):
    """Integer codes the fake quantizer gives float32 ``x``, through its own forward (eval
    mode) exactly as the layer runs it: ``code = (q(x) - beta) / s`` (an integer up to
    rounding)."""
    y, _ = q["quantizer"].forward(x, {k: v.copy() for k, v in q["arrays"].items()}, q["bits"],
                                  q["signed"], False)
    return np.rint((y - q["beta"]) / q["s"]).astype(np.int64)


def _weight_codes(layer):
    """Weight codes ``Wc`` (int) and per-output-channel scales ``sw`` (F,) float64 with
    ``q_w(W) = sw Wc`` (X3), from the layer's own quantizer: its forward and its grid."""
    W = np.asarray(to_host(layer.params["W"]))
    F, bits, wq = W.shape[0], layer.w_bits, layer.w_quant
    shape = (F,) + (1,) * (W.ndim - 1)
    arrays = {k: np.asarray(to_host(v)) for k, v in layer._arrays(wq).items()}
    Wq, _ = wq.forward(W, arrays, bits, True, False)
    s, _ = wq.grid(arrays, W, bits, True)
    s = np.broadcast_to(np.asarray(s, np.float64), shape).reshape(shape)
    Wc = np.rint(Wq / s)
    if np.abs(Wq / s - Wc).max() > 1e-3:     # float32 levels sit within ~1e-5 code of the grid
        raise ExportError(f"weights of {type(layer).__name__} are not on the grid of their scale")
    lim = int(np.abs(Wc).max())
    return Wc.astype(np.int8 if lim <= 127 else np.int16), s.reshape(F)


def _code_dtype(lo, hi):
    for dt in (np.uint8, np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return np.dtype(dt).name
    raise ExportError(f"codes in [{lo}, {hi}] do not fit int32")


# ============================================================================ export
def _blocks(model):
    """Split the small CNN into ``(conv, bn, pool_or_relu, gap_or_None)`` blocks and the head."""
    if not isinstance(model, nn.SmallCNN):
        raise TypeError(f"model must be a mecref.nn.SmallCNN (from small_cnn), got {type(model).__name__}")
    L, names = model.layers, model.names
    full = [n for n, l in zip(names, L) if isinstance(l, (nn.Conv2d, nn.Linear))
            and not isinstance(l, (nn.QuantConv2d, nn.QuantLinear))]
    full += [n for n, l in zip(names, L) if isinstance(l, (nn.QuantConv2d, nn.QuantLinear))
             and (l.w_bits == nn.FULL_PRECISION or l.a_bits == nn.FULL_PRECISION)]
    if full:
        raise ExportError(f"integer export needs every conv and linear layer quantized; {full} "
                          "run in full precision (quantizer=None, or bits 32: train with "
                          "first_last_bits, w_bits and a_bits in 1..8)")
    blocks, i = [], 0
    while i < len(L) and isinstance(L[i], nn.QuantConv2d):
        conv, bn, act = L[i:i + 3]
        if not (isinstance(bn, nn.BatchNorm2d) and (isinstance(act, nn.ReLU)
                                                   or (isinstance(act, nn.MaxPool2d) and act.relu))):
            raise ExportError(f"layer {names[i]}: expected conv -> BatchNorm2d -> ReLU or "
                              f"MaxPool2d(relu=True), got {[type(l).__name__ for l in L[i:i + 3]]}")
        gap = L[i + 3] if i + 3 < len(L) and isinstance(L[i + 3], nn.GlobalAvgPool2d) else None
        blocks.append((names[i], conv, bn, act, gap))
        i += 4 if gap is not None else 3
    if not blocks or blocks[-1][4] is None or i != len(L) - 1 or not isinstance(L[-1], nn.QuantLinear):
        raise ExportError("integer export supports the small CNN's layout: blocks of "
                          "QuantConv2d -> BatchNorm2d -> ReLU/MaxPool2d, a GlobalAvgPool2d, then QuantLinear")
    return blocks, (names[-1], L[-1])


def export_int_model(model, input_shape=(28, 28)) -> IntModel:
    """Export a trained fake-quantized :class:`~mecref.nn.SmallCNN` to integer form (X1-X5).

    Per block ``conv -> BN -> ReLU (-> maxpool)`` and the next layer's input quantizer
    ``q' = (s', beta', Qn', Qp')``, with input codes ``a`` (scale ``s_a``, offset ``beta_a``),
    weight codes ``Wc`` (scale ``sw_f``) and BN's eval affine ``A_f, B_f``:

    .. math::
        \\mathrm{acc}_f = \\sum W_c\\, a, \\qquad
        \\mathrm{code}' = \\mathrm{clip}\\Big(\\mathrm{round}\\big(m_f\\, \\mathrm{acc}_f
            + k_f O_f + c_f\\big), \\mathrm{lo}', Q_p'\\Big),

        m_f = \\frac{A_f sw_f s_a}{s'}, \\quad k_f = \\frac{A_f sw_f \\beta_a}{s'}, \\quad
        c_f = \\frac{A_f b_f + B_f - \\beta'}{s'}, \\quad
        \\mathrm{lo}' = \\mathrm{clip}(\\mathrm{round}(-\\beta'/s'), Q_n', Q_p')

    with ``O_f`` the sum of ``Wc`` over the unpadded part of each window (only when
    ``beta_a != 0``), in fixed point ``M 2^-n``.

    Parameters
    ----------
    model : SmallCNN from :func:`mecref.nn.small_cnn` with a quantizer, every layer 1..8 bits,
        trained (its quantizers initialised), on either backend.
    input_shape : (H, W) of the uint8 images, (28, 28) for the bundled data.

    Returns
    -------
    IntModel
    """
    blocks, (fc_name, fc) = _blocks(model)
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 2):
        raise MecrefError(f"input_shape must be (H, W), got {input_shape!r}")
    H, W = (check_int("input_shape", v, 1) for v in input_shape)
    for name, layer in [(b[0], b[1]) for b in blocks] + [(fc_name, fc)]:
        if not float(to_host(layer.buffers["ready"])):
            raise ExportError(f"layer {name}: its quantizers were never initialised (the model "
                              "has not seen data); train it before export")
    graph, arrays, tensors = [], {}, {}
    qs = [_act_quantizer(b[1]) for b in blocks] + [_act_quantizer(fc)]

    # X2: pixels -> codes of the first layer's input, a table of the fake quantizer itself
    q0 = qs[0]
    pixels = normalize(np.arange(256, dtype=np.uint8).reshape(1, 16, 16))
    table = _act_codes(q0, pixels).reshape(256)
    first = f"{blocks[0][0]}.in"
    arrays[f"{first}.lut"] = table.astype(_code_dtype(q0["Qn"], q0["Qp"]))
    tensors[first] = _code_tensor(q0, [blocks[0][1].in_channels, H, W])
    graph.append(dict(op="lut", name=f"{first}.lut", input="image", output=first,
                      table=f"{first}.lut"))

    shape = (H, W)
    for j, (name, conv, bn, act, gap) in enumerate(blocks):
        qa, qn = qs[j], qs[j + 1]
        nxt = f"{blocks[j + 1][0]}.in" if j + 1 < len(blocks) else f"{fc_name}.in"
        Wc, sw = _weight_codes(conv)
        k, stride, pad = Wc.shape[2], conv.stride, conv.padding
        arrays[f"{name}.w"], arrays[f"{name}.w_scale"] = Wc, sw.astype(np.float32)
        graph.append(dict(op="conv2d", name=name, input=f"{name}.in", output=f"{name}.acc",
                          weight=f"{name}.w", weight_scale=f"{name}.w_scale", w_bits=conv.w_bits,
                          stride=stride, padding=pad))
        shape = ((shape[0] + 2 * pad - k) // stride + 1, (shape[1] + 2 * pad - k) // stride + 1)
        A, B = _bn_affine(bn)
        bias = _f64(conv.params["b"]) if "b" in conv.params else np.zeros(len(sw))
        sa, ba = float(qa["s"].reshape(())), float(qa["beta"].reshape(()))
        sn, bn_off = float(qn["s"].reshape(())), float(qn["beta"].reshape(()))
        amax = max(abs(qa["Qn"]), abs(qa["Qp"]))
        bound = np.abs(Wc.astype(np.int64)).reshape(len(sw), -1).sum(axis=1) * amax
        _check_acc(name, bound)
        P = 1 if gap is None else shape[0] * shape[1]
        m = A * sw * sa / (P * sn)
        c = (A * bias + B - (bn_off if gap is None else 0.0)) / (P * sn)
        if ba != 0.0:   # offset of the input codes reaches only the unpadded part of a window
            O = _window_sums(Wc, shape, stride, pad)
            c = c[:, None, None] + (A * sw * ba / (P * sn))[:, None, None] * O
        M, n, C = _fixed_point(m, c, bound, terms=P)
        arrays[f"{name}.M"], arrays[f"{name}.n"] = M, n
        arrays[f"{name}.C"] = C if C.ndim == 3 else C[:, None, None]
        lo = int(_act_codes(qn, np.zeros((1, 1, 1, 1) if gap is None else (1, 1), np.float32)).reshape(()))
        if gap is None:
            graph.append(dict(op="requant", name=f"{name}.requant", input=f"{name}.acc",
                              output=f"{name}.q", multiplier=f"{name}.M", shift=f"{name}.n",
                              offset=f"{name}.C", qmin=lo, qmax=qn["Qp"],
                              dtype=_code_dtype(qn["Qn"], qn["Qp"])))
            tensors[f"{name}.q"] = _code_tensor(qn, [len(sw), *shape])
            if isinstance(act, nn.MaxPool2d):
                graph.append(dict(op="maxpool2d", name=f"{name}.pool", input=f"{name}.q", output=nxt))
                shape = (shape[0] // 2, shape[1] // 2)
            else:
                graph[-1]["output"] = nxt
                del tensors[f"{name}.q"]
            tensors[nxt] = _code_tensor(qn, [len(sw), *shape])
        else:
            D = np.rint(-bn_off / sn * 2.0 ** n.astype(np.float64)).astype(np.int64)
            arrays[f"{name}.D"] = D
            graph.append(dict(op="requant_gap", name=f"{name}.requant_gap", input=f"{name}.acc",
                              output=nxt, multiplier=f"{name}.M", shift=f"{name}.n",
                              offset=f"{name}.C", post_offset=f"{name}.D", qmin=qn["Qn"],
                              qmax=qn["Qp"], dtype=_code_dtype(qn["Qn"], qn["Qp"])))
            if P * np.abs(C).reshape(len(sw), -1).max() + np.abs(D).max() >= _REQ_LIMIT:
                raise ExportError(f"layer {name}: the pooled requantisation would overflow int64")
            tensors[nxt] = _code_tensor(qn, [len(sw)])

    # X5: the head, to int64 logits with LOGIT_FRAC_BITS below the coarsest accumulator step
    qa = qs[-1]
    Wc, sw = _weight_codes(fc)
    arrays[f"{fc_name}.w"], arrays[f"{fc_name}.w_scale"] = Wc, sw.astype(np.float32)
    graph.append(dict(op="linear", name=fc_name, input=f"{fc_name}.in", output=f"{fc_name}.acc",
                      weight=f"{fc_name}.w", weight_scale=f"{fc_name}.w_scale", w_bits=fc.w_bits))
    sa, ba = float(qa["s"].reshape(())), float(qa["beta"].reshape(()))
    amax = max(abs(qa["Qn"]), abs(qa["Qp"]))
    bound = np.abs(Wc.astype(np.int64)).sum(axis=1) * amax
    _check_acc(fc_name, bound)
    S_out = sa * float(sw.max()) / 2 ** LOGIT_FRAC_BITS
    bias = _f64(fc.params["b"]) if "b" in fc.params else np.zeros(len(sw))
    m = sw * sa / S_out
    c = (bias + ba * sw * Wc.astype(np.float64).sum(axis=1)) / S_out
    M, n, C = _fixed_point(m, c, bound)
    arrays[f"{fc_name}.M"], arrays[f"{fc_name}.n"], arrays[f"{fc_name}.C"] = M, n, C
    graph.append(dict(op="requant", name=f"{fc_name}.requant", input=f"{fc_name}.acc",
                      output="logits", multiplier=f"{fc_name}.M", shift=f"{fc_name}.n",
                      offset=f"{fc_name}.C", qmin=None, qmax=None, dtype="int64"))
    tensors["logits"] = dict(scale=S_out, offset=0.0, bits=64, signed=True, qmin=None, qmax=None,
                             shape=[len(sw)])
    cfg = {k: v for k, v in model.config.items() if k != "backend"}
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, model_config=cfg,
                input=dict(tensor="image", dtype="uint8", shape=[H, W], pixel_mean=PIXEL_MEAN,
                           pixel_std=PIXEL_STD),
                output=dict(tensor="logits", scale=S_out))
    imodel = IntModel(graph=graph, arrays=arrays, tensors=tensors, meta=meta)
    _check_int_model(imodel, "exported model")
    return imodel


def _f64(a):
    return np.asarray(to_host(a), dtype=np.float64)


def _bn_affine(bn):
    """BatchNorm's eval map ``z = A y + B`` per channel (X4), in float64."""
    A = _f64(bn.params["gamma"]) / np.sqrt(_f64(bn.buffers["running_var"]) + bn.eps)
    return A, _f64(bn.params["beta"]) - _f64(bn.buffers["running_mean"]) * A


def _code_tensor(q, shape):
    return dict(scale=float(q["s"].reshape(())), offset=float(q["beta"].reshape(())),
                bits=q["bits"], signed=q["signed"], qmin=q["Qn"], qmax=q["Qp"], shape=list(shape))


def _check_acc(name, bound):
    if bound.max() >= _ACC_LIMIT:
        raise ExportError(f"layer {name}: accumulators may reach {int(bound.max())}, beyond int32")


def _window_sums(Wc, out_shape, stride, pad):
    """``O[f, h, w]``: the sum of ``Wc[f]`` over the part of window (h, w) inside the image."""
    F, Cin, k, _ = Wc.shape
    H = (out_shape[0] - 1) * stride + k - 2 * pad
    Wd = (out_shape[1] - 1) * stride + k - 2 * pad
    cols, _ = _windows(np.ones((1, Cin, H, Wd), np.int32), k, stride, pad)
    return (Wc.reshape(F, -1).astype(np.int64) @ cols[0]).reshape(F, *out_shape).astype(np.float64)


# ============================================================================ integer inference
def _op_lut(node, arrays, x):
    return arrays[node["table"]][x][:, None, :, :]


def _windows(x, k, stride, pad):
    """Integer im2col: ``cols[n, (c, i, j), (h, w)] = x_pad[n, c, i + stride h, j + stride w]``,
    shape (N, C k k, Ho Wo), zero padding (the code 0) (X3)."""
    N, C, H, W = x.shape
    xp = np.zeros((N, C, H + 2 * pad, W + 2 * pad), np.int32)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    sN, sC, sH, sW = xp.strides
    win = np.lib.stride_tricks.as_strided(
        xp, (N, C, k, k, Ho, Wo), (sN, sC, sH, sW, stride * sH, stride * sW))
    return win.reshape(N, C * k * k, Ho * Wo), (Ho, Wo)


def _op_conv2d(node, arrays, x):
    Wc = arrays[node["weight"]]
    F, _, k, _ = Wc.shape
    cols, (Ho, Wo) = _windows(x, k, node["stride"], node["padding"])
    acc = Wc.reshape(F, -1).astype(np.int32) @ cols                     # int32 (N, F, Ho*Wo)
    return acc.reshape(x.shape[0], F, Ho, Wo)


def _op_linear(node, arrays, x):
    return x.astype(np.int32) @ arrays[node["weight"]].astype(np.int32).T   # int32 (N, F)


def _op_requant(node, arrays, acc):
    M, n, C = arrays[node["multiplier"]], arrays[node["shift"]], arrays[node["offset"]]
    if acc.ndim == 4:
        M, n = M[:, None, None], n[:, None, None]
    V = M.astype(np.int64) * acc.astype(np.int64) + C                 # int64
    q = _round_shift(V, n.astype(np.int64))
    if node["qmin"] is not None:
        np.clip(q, node["qmin"], node["qmax"], out=q)
    return q.astype(node["dtype"])


def _op_requant_gap(node, arrays, acc):
    M, n, C = arrays[node["multiplier"]], arrays[node["shift"]], arrays[node["offset"]]
    V = M[:, None, None].astype(np.int64) * acc.astype(np.int64) + C
    np.maximum(V, 0, out=V)                                           # ReLU
    S = V.sum(axis=(2, 3)) + arrays[node["post_offset"]]              # sum over positions
    q = _round_shift(S, n.astype(np.int64))
    np.clip(q, node["qmin"], node["qmax"], out=q)
    return q.astype(node["dtype"])


def _op_maxpool2d(node, arrays, x):
    N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    return x[:, :, :2 * Ho, :2 * Wo].reshape(N, C, Ho, 2, Wo, 2).max(axis=(3, 5))


_RUN = dict(lut=_op_lut, conv2d=_op_conv2d, linear=_op_linear, requant=_op_requant,
            requant_gap=_op_requant_gap, maxpool2d=_op_maxpool2d)


def _check_imodel(imodel):
    if not isinstance(imodel, IntModel):
        raise TypeError(f"imodel must be an IntModel (export_int_model, load_int_model), "
                        f"got {type(imodel).__name__}")


def _check_images(imodel, images):
    _check_imodel(imodel)
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    images = np.asarray(to_host(images))
    H, W = imodel.meta["input"]["shape"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (H, W) or not len(images):
        raise MecrefError(f"images must be a non-empty uint8 array (N, {H}, {W}), got "
                          f"{images.dtype} {tuple(images.shape)}")
    return images


def int_run(imodel, feeds, outputs):
    """Run the integer graph from the tensors in ``feeds`` to the tensors in ``outputs`` (X1).

    A node runs when its input is known (fed or computed); feeding an inner tensor (e.g. the
    fake-quant model's codes at ``"conv2.in"``) runs only what follows it.

    Parameters
    ----------
    imodel : IntModel
    feeds : dict[str, ndarray], e.g. ``{"image": uint8 (N, H, W)}``
    outputs : list of tensor names

    Returns
    -------
    dict[str, ndarray] with the tensors named in ``outputs``
    """
    _check_imodel(imodel)
    if not isinstance(feeds, dict) or not feeds:
        raise TypeError(f"feeds must be a non-empty dict of tensor name -> array, got {feeds!r:.80}")
    known = {"image"} | {nd["output"] for nd in imodel.graph}
    for name in list(feeds) + list(outputs):
        if name not in known:
            raise MecrefError(f"unknown tensor {name!r}; the graph has {sorted(known)}")
    env = dict(feeds)
    if "image" in env:
        env["image"] = _check_images(imodel, env["image"])
    for name, v in env.items():
        if not hasattr(v, "dtype") or not np.issubdtype(v.dtype, np.integer):
            raise TypeError(f"feeds[{name!r}] must be an integer array, got "
                            f"{getattr(v, 'dtype', type(v).__name__)}")
        want = imodel.tensors.get(name, {}).get("shape")
        if want is not None and (v.ndim != len(want) + 1 or list(v.shape[1:]) != want or not len(v)):
            raise MecrefError(f"feeds[{name!r}] must have shape (N, {', '.join(map(str, want))}) "
                              f"with N >= 1, got {tuple(v.shape)}")
    for node in imodel.graph:
        if node["output"] in env or node["input"] not in env:
            continue
        env[node["output"]] = _RUN[node["op"]](node, imodel.arrays, env[node["input"]])
    missing = [o for o in outputs if o not in env]
    if missing:
        raise MecrefError(f"tensors {missing} cannot be computed from the feeds {sorted(feeds)}")
    return {o: env[o] for o in outputs}


def int_forward(imodel, images, return_codes=False, batch_size=500):
    """Integer-only inference: uint8 images ``(N, H, W)`` -> int64 logits ``(N, K)``.

    The real logits are ``logits * imodel.tensors["logits"]["scale"]``. With
    ``return_codes`` also the integer codes at every layer input (``"<layer>.in"``).
    """
    images = _check_images(imodel, images)
    batch_size = check_int("batch_size", batch_size, 1)
    names = [imodel.output] + ([t for t in imodel.tensors if t.endswith(".in")] if return_codes else [])
    parts = [int_run(imodel, {"image": images[i:i + batch_size]}, names)
             for i in range(0, len(images), batch_size)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in names}
    return (out[imodel.output], out) if return_codes else out[imodel.output]


def int_predict(imodel, images, batch_size=500):
    """Class predictions ``argmax_k logits`` of the integer model, int64 ``(N,)``."""
    return int_forward(imodel, images, batch_size=batch_size).argmax(axis=1)


# ============================================================================ reference: fake quant
def fake_quant_trace(model, images, batch_size=500):
    """The fake-quantized float model (eval mode) on uint8 images: its float logits and the
    integer codes of every quantized layer's input, ``code = (q(x) - beta) / s``.

    Returns
    -------
    dict: ``"logits"`` float (N, K), ``"<layer>.in"`` int64 codes
    """
    blocks, (fc_name, fc) = _blocks(model)
    quants = {b[0]: _act_quantizer(b[1]) for b in blocks}
    quants[fc_name] = _act_quantizer(fc)
    images = np.asarray(to_host(images))
    if images.dtype != np.uint8 or images.ndim != 3 or not len(images):
        raise MecrefError(f"images must be a non-empty uint8 array (N, H, W), got "
                          f"{images.dtype} {tuple(images.shape)}")
    batch_size = check_int("batch_size", batch_size, 1)
    xp_model = model.layers[0].params["W"]
    out = {}
    for i in range(0, len(images), batch_size):
        h = normalize(images[i:i + batch_size])
        h = _to_model(h, xp_model)
        for name, layer in zip(model.names, model.layers):
            if name in quants:
                out.setdefault(f"{name}.in", []).append(_act_codes(quants[name], np.asarray(to_host(h))))
            h = layer.forward(h, train=False)
        out.setdefault("logits", []).append(np.asarray(to_host(h)))
    return {k: np.concatenate(v) for k, v in out.items()}


def _to_model(h, W):
    return to_backend(h, backend_name(array_module(W)))


def compare_int(model, imodel, images, batch_size=500) -> dict:
    """Compare the integer path with the fake-quant model on the same uint8 images (X6).

    Returns
    -------
    dict with
    - ``n``: images; ``pred_equal``: images where both predict the same class;
    - ``stages``: per code tensor, the integer stage run on the fake-quant model's codes of its
      input (isolated): ``max_diff`` (codes), ``n_diff``, ``size``; for ``"logits"`` the
      difference is in units of the logit scale;
    - ``chain``: the same for the end-to-end integer run from the pixels;
    - ``pred_int``, ``pred_fake``: (N,) predictions.
    """
    fake = fake_quant_trace(model, images, batch_size)
    _, chain = int_forward(imodel, images, return_codes=True, batch_size=batch_size)
    code_names = [t for t in imodel.tensors if t.endswith(".in")]
    stages, prev = {}, None
    S_out = imodel.tensors["logits"]["scale"]
    for t in code_names + ["logits"]:
        if prev is None:
            got = chain[t]
        else:
            got = np.concatenate([int_run(imodel, {prev: fake[prev][i:i + batch_size]}, [t])[t]
                                  for i in range(0, len(images), batch_size)])
        stages[t] = _diff(got, fake[t], S_out if t == "logits" else None)
        prev = t
    chains = {t: _diff(chain[t], fake[t], S_out if t == "logits" else None)
              for t in code_names + ["logits"]}
    pred_int, pred_fake = chain["logits"].argmax(axis=1), fake["logits"].argmax(axis=1)
    return dict(n=len(pred_int), pred_equal=int((pred_int == pred_fake).sum()),
                stages=stages, chain=chains, pred_int=pred_int, pred_fake=pred_fake)


def _diff(got, want, scale=None):
    if scale is None:
        d = np.abs(got.astype(np.int64) - want.astype(np.int64))
    else:
        d = np.abs(got.astype(np.float64) - want.astype(np.float64) / scale)
    return dict(max_diff=float(d.max()), n_diff=int((d > (0.5 if scale else 0)).sum()), size=int(d.size))


# ============================================================================ files
def save_int_model(imodel, path) -> Path:
    """Write an :class:`IntModel` atomically to one ``.npz`` (the graph as JSON inside it) and
    a copy of the JSON beside it (``<name>.json``, for people to read). Returns the path."""
    _check_imodel(imodel)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        raise MecrefError(f"path must end in .npz, got {str(path)!r}")
    _check_int_model(imodel, "model to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(imodel.meta, graph=imodel.graph, tensors=imodel.tensors)
    text = json.dumps(doc, indent=1, sort_keys=True)
    arrays = dict(imodel.arrays)
    arrays[_META] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    write_atomic(path, lambda fh: np.savez(fh, **arrays))
    write_atomic(path.with_suffix(".json"), lambda fh: fh.write(text.encode("utf-8")))
    return path


def load_int_model(path) -> IntModel:
    """Read an exported integer model; every array and node is checked before it is
    returned (:class:`ExportError` for a truncated, corrupt or foreign file)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"integer model {str(path)!r} does not exist")
    try:
        _verify_zip(path, _INT_BUDGET, names=False)   # sizes bounded, then CRC-32 and names
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except CheckpointError as exc:
        raise ExportError(str(exc).replace("checkpoint", "integer model", 1)) from None
    except Exception as exc:  # zipfile, numpy's header parser, ...: any failure here is corruption
        raise ExportError(f"integer model {str(path)!r} is truncated or corrupt "
                          f"({type(exc).__name__}: {exc})") from None
    if _META not in arrays:
        raise ExportError(f"{str(path)!r} has no graph: not a mecref integer model")
    if not all(isinstance(a, np.ndarray) for a in arrays.values()):
        raise ExportError(f"integer model {str(path)!r} is corrupt: a member is not a .npy array")
    try:
        doc = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"integer model {str(path)!r}: unreadable graph ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{str(path)!r} is not a {FORMAT} v{FORMAT_VERSION} file")
    try:
        graph, tensors = doc.pop("graph"), doc.pop("tensors")
    except KeyError as exc:
        raise ExportError(f"{str(path)!r} lacks {exc}") from None
    imodel = IntModel(graph=graph, arrays=arrays, tensors=tensors, meta=doc)
    _check_int_model(imodel, repr(str(path)))
    return imodel


_NODE_ARRAYS = dict(lut=("table",), conv2d=("weight",), linear=("weight",),
                    requant=("multiplier", "shift", "offset"), maxpool2d=(),
                    requant_gap=("multiplier", "shift", "offset", "post_offset"))


def _check_int_model(imodel, what):
    """Structure of the graph: known ops, tensors defined before use, integer arrays with
    consistent shapes, shifts in 1..62, the input/output description."""
    def bad(msg):
        raise ExportError(f"{what}: {msg}")
    if not isinstance(imodel.graph, list) or not imodel.graph:
        bad("graph must be a non-empty list of nodes")
    try:
        H, W = imodel.meta["input"]["shape"]
        check_int("input height", H, 1), check_int("input width", W, 1)
    except (KeyError, TypeError, ValueError):
        bad("meta['input']['shape'] must be [H, W]")
    defined = {"image"}
    for i, node in enumerate(imodel.graph):
        if not isinstance(node, dict) or node.get("op") not in _OPS:
            bad(f"node {i} has an unknown op {node.get('op') if isinstance(node, dict) else node!r}")
        if node.get("input") not in defined:
            bad(f"node {i} ({node['op']}) reads {node.get('input')!r} before it is defined")
        for key in _NODE_ARRAYS[node["op"]]:
            a = imodel.arrays.get(node.get(key))
            if a is None or not np.issubdtype(a.dtype, np.integer):
                bad(f"node {i} ({node['op']}): {key} {node.get(key)!r} is missing or not an integer array")
        if node["op"] in ("requant", "requant_gap"):
            n = imodel.arrays[node["shift"]]
            Mk = imodel.arrays[node["multiplier"]]
            F = Mk.shape[0] if Mk.ndim == 1 else 0
            if F < 1 or n.shape != (F,) or n.min() < 1 or n.max() > 62:
                bad(f"node {i}: shift must be ({F},) in 1..62")
            if imodel.arrays[node["offset"]].shape[:1] != (F,):
                bad(f"node {i}: offset must have {F} rows")
            if node.get("dtype") not in ("uint8", "int8", "int16", "int32", "int64"):
                bad(f"node {i}: dtype must name an integer type, got {node.get('dtype')!r}")
            lims = (node.get("qmin"), node.get("qmax"))
            if lims != (None, None) and not (all(type(q) is int for q in lims) and lims[0] <= lims[1]):
                bad(f"node {i}: qmin, qmax must be ints with qmin <= qmax (or both null), got {lims}")
        if node["op"] == "conv2d":
            st, pad = node.get("stride"), node.get("padding")
            if imodel.arrays[node["weight"]].ndim != 4 or type(st) is not int or st < 1 \
                    or type(pad) is not int or pad < 0:
                bad(f"node {i}: conv weight must be 4-dimensional, stride an int >= 1, padding >= 0")
        if node["op"] == "lut" and imodel.arrays[node["table"]].shape != (256,):
            bad(f"node {i}: the pixel table must have 256 entries")
        defined.add(node.get("output"))
    if imodel.graph[-1].get("output") not in imodel.tensors:
        bad("the last node's output is not described in tensors")
    _check_int_flow(imodel, bad)


def _check_int_flow(imodel, bad):
    """Channel counts along the graph (1 image channel; each conv's and linear's input
    channels those of the tensor it reads; each requant one row per channel, shifts not
    empty, offsets at least 1-d), kernels and padding that fit the input, requant codes within
    their dtype, and |M| < 2^31, |C| < 2^62 so that M acc + C never wraps in int64 (X4)."""
    ch = {"image": 1}
    for i, node in enumerate(imodel.graph):
        op, c = node["op"], ch.get(node["input"])
        A = {k: imodel.arrays[node[k]] for k in _NODE_ARRAYS[op]}
        if op in ("conv2d", "linear"):
            w = A["weight"]
            if w.ndim != (4 if op == "conv2d" else 2) or w.shape[0] < 1 or w.shape[1] != c:
                bad(f"node {i} ({op}): weight of shape {w.shape} must read {c} input channels "
                    f"with at least one filter")
            if op == "conv2d" and not (w.shape[2] == w.shape[3] <= 64 and node["padding"] < w.shape[2]):
                bad(f"node {i} (conv2d): kernel {w.shape[2:]} must be square, at most 64, with "
                    f"padding ({node['padding']}) smaller than it")
            c = w.shape[0]
        if op in ("requant", "requant_gap"):
            F = len(A["multiplier"]) if A["multiplier"].ndim == 1 else -1
            if F != c or A["shift"].size == 0 or A["offset"].ndim < 1:
                bad(f"node {i} ({op}): multiplier, shift and offset need one row per channel "
                    f"({c}), got shapes {A['multiplier'].shape}, {A['shift'].shape}, "
                    f"{A['offset'].shape}")
            if np.abs(A["multiplier"].astype(np.float64)).max() >= 2.0 ** 31 or any(
                    np.abs(A[k].astype(np.float64)).max(initial=0) >= 2.0 ** 62
                    for k in ("offset", "post_offset") if k in A):
                bad(f"node {i} ({op}): |multiplier| must be < 2^31 and |offset| < 2^62 (int64 "
                    f"arithmetic would wrap)")
            info = np.iinfo(node["dtype"])
            lims = (node.get("qmin"), node.get("qmax"))
            if lims == (None, None) and node["dtype"] != "int64":
                bad(f"node {i} ({op}): qmin, qmax may be null only for int64 output, got "
                    f"dtype {node['dtype']}")
            if lims != (None, None) and not (info.min <= lims[0] and lims[1] <= info.max):
                bad(f"node {i} ({op}): qmin, qmax {lims} must lie within {node['dtype']} "
                    f"[{info.min}, {info.max}]")
        ch[node["output"]] = c


# ============================================================================ users
def export_checkpoint(checkpoint, out) -> tuple:
    """Export a training checkpoint (``last.npz`` of :func:`mecref.train.train_small_cnn`) to an
    integer model file; returns ``(IntModel, Path)``. Writing over the checkpoint itself is
    refused."""
    if (isinstance(checkpoint, (str, os.PathLike)) and isinstance(out, (str, os.PathLike))
            and Path(out).resolve() == Path(checkpoint).resolve()):
        raise ExportError(f"out {str(out)!r} is the checkpoint being exported: give another "
                          f"file name")
    model = _model_from_checkpoint(checkpoint)
    imodel = export_int_model(model)
    return imodel, save_int_model(imodel, out)


def _model_from_checkpoint(path):
    from .checkpoint import load_checkpoint
    state, _, meta = load_checkpoint(path)
    cfg = meta.get("model_config")
    if not isinstance(cfg, dict):
        raise ExportError(f"checkpoint {str(path)!r} has no model_config: not a training checkpoint")
    model = nn.small_cnn(**dict(cfg, backend="numpy"))
    model.load_state_dict(state)
    return model


def evaluate_int(int_path, checkpoint=None, dataset="bundled", data_dir=None, limit=None,
                 batch_size=500) -> dict:
    """Accuracy of an exported integer model on a test set and, given the training
    ``checkpoint`` it came from, its agreement with the fake-quant model (:func:`compare_int`).

    Returns
    -------
    dict: ``n``, ``acc_int``; with a checkpoint also ``acc_fake``, ``pred_equal``, ``stages``,
    ``chain``
    """
    from .data import load_dataset
    imodel = load_int_model(int_path)
    ds = load_dataset(dataset, data_dir=data_dir)
    x, y = ds.x_test, ds.y_test
    if limit is not None:
        limit = check_int("limit", limit, 1)
        x, y = x[:limit], y[:limit]
    if checkpoint is None:
        pred = int_predict(imodel, x, batch_size)
        return dict(n=len(y), acc_int=float((pred == y).mean()))
    model = _model_from_checkpoint(checkpoint)
    if {k: v for k, v in model.config.items() if k != "backend"} != imodel.meta["model_config"]:
        raise ExportError(f"checkpoint {str(checkpoint)!r} holds another model than {str(int_path)!r}")
    res = compare_int(model, imodel, x, batch_size)
    res.update(acc_int=float((res["pred_int"] == y).mean()), acc_fake=float((res["pred_fake"] == y).mean()))
    return res


def describe_int_model(imodel) -> str:
    """A Markdown table of the graph: op, output tensor, bits, scale, what it does."""
    rows = ["| node | op | output | codes | scale |", "|---|---|---|---|---|"]
    for node in imodel.graph:
        t = imodel.tensors.get(node["output"])
        codes = "-" if t is None or t["qmin"] is None else f"{t['qmin']}..{t['qmax']} ({t['bits']} bit)"
        scale = "-" if t is None else f"{t['scale']:.6g}"
        rows.append(f"| {node['name']} | {node['op']} | {node['output']} | {codes} | {scale} |")
    return "\n".join(rows)


def markdown_comparison(res) -> str:
    """A Markdown summary of :func:`evaluate_int`'s result."""
    lines = [f"integer accuracy: {res['acc_int']:.4f} on {res['n']} test images"]
    if "pred_equal" not in res:
        return "\n".join(lines)
    lines += [f"fake-quant accuracy: {res['acc_fake']:.4f}",
              f"identical predictions: {res['pred_equal']}/{res['n']}", "",
              "| tensor | isolated: max diff | isolated: values differing | end to end: max diff | end to end: values differing |",
              "|---|---|---|---|---|"]
    for t, s in res["stages"].items():
        c = res["chain"][t]
        lines.append(f"| {t} | {s['max_diff']:.3g} | {s['n_diff']}/{s['size']} | "
                     f"{c['max_diff']:.3g} | {c['n_diff']}/{c['size']} |")
    return "\n".join(lines)
