"""The layout of every GEMM operand in the main job's convolutions, and what it costs.

Each conv layer runs three GEMMs (mecref.nn.conv, derivations N1):

- forward ``Y = W (F x Ckk) @ cols (Ckk x NHW)``;
- weight gradient ``dW = dY (F x NHW) @ cols^T``;
- column gradient ``dcols = W_offsets (kkC x F) @ dY`` (not for conv1, whose input needs none).

For each operand it records how NumPy hands it to BLAS: ``C`` (row-major, contiguous), ``T``
(the transpose of a contiguous array: BLAS reads it with its transpose flag, no copy) or
``copy`` (any other strides: NumPy would copy it first), and times the GEMM with the operands
as the layer has them against the same GEMM on row-major copies made beforehand (interleaved
medians). A ratio near 1 says the layout costs nothing. The operands are taken from a real
train step of the main job's model (its caches) and checked first: ``Y`` against the layer's
forward output, ``dW`` against its gradient.
"""
from __future__ import annotations

import numpy as np

from . import common


def layout(a) -> str:
    """How np.matmul passes a 2-D operand to BLAS."""
    if a.flags.c_contiguous:
        return "C"
    if a.flags.f_contiguous:
        return "T"
    return "copy"


def operands(model, x):
    """{(layer, gemm): (A, B)} of each conv's GEMMs, as mecref.nn.conv forms them, after one
    train-mode forward and backward of ``model`` on ``x``; each product is checked against the
    layer's own output or gradient first."""
    from mecref.nn import Conv2d, _cm
    from mecref.nn.conv import offset_major
    convs = [(n, l) for n, l in zip(model.names, model.layers) if isinstance(l, Conv2d)]
    seen = {}

    def recording(name, layer):            # each GEMM stage's result and the output gradient
        forward, backward = layer._conv_forward, layer._conv_backward
        layer._conv_forward = lambda h, W, train: seen.setdefault((name, "y"), forward(h, W, train))
        layer._conv_backward = lambda dy, need_dx: (seen.setdefault((name, "dy"), dy),
                                                    seen.setdefault((name, "dW"), backward(dy, need_dx)))[1]

    for name, layer in convs:
        recording(name, layer)
    try:
        logits, _ = model.forward(x, train=True)
        model.backward(np.random.default_rng(0).standard_normal(logits.shape).astype(x.dtype))
    finally:
        for _, layer in convs:
            del layer._conv_forward, layer._conv_backward
    out = {}
    for name, layer in convs:
        cols, W, _, _ = layer._cache                        # W: the (fake-quantized) weight used
        F = W.shape[0]
        dY = _cm(seen[(name, "dy")]).reshape(F, -1)
        pairs = {"forward": (W.reshape(F, -1), cols), "dW": (dY, cols.T)}
        if layer.input_grad:
            pairs["dcols"] = (offset_major(W), dY)
        y = _cm(seen[(name, "y")]).reshape(F, -1)
        np.testing.assert_allclose(pairs["forward"][0] @ pairs["forward"][1], y, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose((dY @ cols.T).reshape(W.shape), seen[(name, "dW")][0], rtol=1e-4, atol=1e-5)
        out.update({(name, g): ab for g, ab in pairs.items()})
    return out


def run(n, reps, log=print):
    """Layouts and interleaved times of the main job's conv GEMMs at network batch ``n``."""
    from mecref import data, train
    from . import main_job
    cfg = train.TrainConfig().validate()
    ds = data.load_bundled()
    xb = np.ascontiguousarray(data.normalize(ds.x_train[:n // 2]))
    model, _ = main_job.mecref_setup(cfg, xb)
    rows = []
    for (name, gemm), (A, B) in operands(model, np.concatenate([xb, xb])).items():
        Ac, Bc = np.ascontiguousarray(A), np.ascontiguousarray(B)
        times = common.interleave({"as_used": lambda: A @ B, "row_major": lambda: Ac @ Bc}, reps, warmup=2)
        rows.append(dict(layer=name, gemm=gemm, shape=f"{A.shape[0]} x {A.shape[1]} x {B.shape[1]}",
                         a=layout(A), b=layout(B), as_used_ms=common.stats(times["as_used"])["median_ms"],
                         row_major_ms=common.stats(times["row_major"])["median_ms"],
                         ratio=common.paired_ratio(times["as_used"], times["row_major"])))
    log(common.table(rows, [("layer", "layer", "s"), ("gemm", "gemm", "s"), ("m x k x n", "shape", "s"),
                            ("A", "a", "s"), ("B", "b", "s"), ("as used ms", "as_used_ms", ".2f"),
                            ("row-major ms", "row_major_ms", ".2f"), ("ratio", "ratio", ".2f")],
                     title=f"conv GEMM operands, batch {n}: C row-major, T a transposed view (no copy)"))
    return dict(batch=n, reps=reps, rows=rows,
                note="ratio: median over interleaved reps of t(as used) / t(row-major copies made beforehand)")
