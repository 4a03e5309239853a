"""The input gradient of a stride-1 convolution three ways, timed at the main job's shapes.

- *fold* (what mecref.nn.Conv2d does): ``dcols = W_offsets^T dY`` (one GEMM, (k k C) x F times
  F x (N H W)), then the scatter-add :func:`mecref.nn.col2im` of the k k slabs;
- *gather* (docs/derivations.md N1, "the gather form"): the output gradient padded by
  ``k - 1 - p`` and unfolded by :func:`mecref.nn.im2col`, against the flipped, transposed
  kernel: ``dX = W_flip (C x F k k) cols(dy_pad) (F k k x N H W)``, one GEMM and no scatter;
- *offsets* (docs/derivations.md N1, "the offsets form"): no column array at all: for each of the k k kernel offsets one GEMM
  ``W[:, :, i, j]^T (C x F) @ dY (F x N H W)`` and its result added, shifted by the offset,
  into dx (k k GEMMs of a C-row output instead of one of k k C rows).

All three give the same dx (checked in float64 before timing); which is faster depends on the
shapes and the machine: gather unfolds F k k rows where fold writes C k k, so it moves more
memory whenever F > C, as in every layer of the small CNN; offsets reads dY k k times and
adds k k shifted blocks into dx.
"""
from __future__ import annotations

import numpy as np

from . import common

CONVS = ((1, 28, 16), (16, 14, 32), (32, 7, 64))   # (C_in, H = W, F) of conv1..conv3, 3x3 pad 1


def fold_dx(W, dy, x_shape, bufs):
    """mecref's path: the offset-major column gradient, then col2im."""
    from mecref.nn import _cm, col2im
    from mecref.nn.conv import offset_major
    F, C, k, _ = W.shape
    N, _, H, Wd = x_shape
    dY = _cm(dy).reshape(F, -1)
    dcols = np.matmul(offset_major(W), dY, out=bufs["dcols"])
    return col2im(dcols.reshape(k * k * C, N, H * Wd).swapaxes(0, 1), x_shape, k, 1, 1,
                  dxpad=bufs["dxpad"], rows=bufs["rows"])


def gather_dx(W, dy, x_shape, bufs):
    """The gather form: im2col of dy (padded by k - 1 - p = 1) against the flipped kernel."""
    from mecref.nn import _cm, im2col
    F, C, k, _ = W.shape
    N, _, H, Wd = x_shape
    W_flip = W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C, F * k * k)
    p = 1                                         # the small CNN's padding; dy is padded by k - 1 - p
    cols = im2col(dy, k, 1, k - 1 - p, out=bufs["cols"], xpad=bufs["dypad"])
    cols = cols.swapaxes(0, 1).reshape(F * k * k, N * H * Wd)
    return _cm((W_flip @ cols).reshape(C, N, H, Wd))


def offsets_dx(W, dy, x_shape, bufs):
    """Per kernel offset (i, j): one GEMM, its block added into dx shifted by (i - p, j - p)."""
    from mecref.nn import _cm
    F, C, k, _ = W.shape
    N, _, H, Wd = x_shape
    p = 1                                         # the small CNN's padding
    dY = _cm(dy).reshape(F, -1)
    dx = np.zeros((C, N, H, Wd), dtype=dy.dtype)
    block = bufs["block"].reshape(C, N, H, Wd)
    for i in range(k):
        for j in range(k):
            np.matmul(np.ascontiguousarray(W[:, :, i, j].T), dY, out=bufs["block"])
            h0, h1, w0, w1 = max(0, i - p), min(H, H + i - p), max(0, j - p), min(Wd, Wd + j - p)
            dx[:, :, h0:h1, w0:w1] += block[:, :, h0 - i + p:h1 - i + p, w0 - j + p:w1 - j + p]
    return _cm(dx)


def _case(C, H, F, n, dtype, seed=0):
    from mecref.nn import _cm
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    dy = _cm(rng.standard_normal((F, n, H, H)).astype(dtype))
    bufs = dict(dcols=np.empty((9 * C, n * H * H), dtype), dxpad=np.empty((C, n, H + 2, H + 2), dtype),
                rows=np.empty((C, n, H + 2, H), dtype), cols=np.empty((9 * F, n * H * H), dtype),
                dypad=np.zeros((F, n, H + 2, H + 2), dtype), block=np.empty((C, n * H * H), dtype))
    return W, dy, (n, C, H, H), bufs


def run(n, reps, log=print):
    """Interleaved medians of fold, gather and offsets for conv1..conv3 at batch n (float32)."""
    forms = {"fold": fold_dx, "gather": gather_dx, "offsets": offsets_dx}
    rows = []
    for i, (C, H, F) in enumerate(CONVS):
        W, dy, shape, bufs = _case(C, H, F, 4, np.float64)
        a = fold_dx(W, dy, shape, bufs)
        agree = {name: float(np.abs(f(W, dy, shape, bufs) - a).max() / np.abs(a).max())
                 for name, f in forms.items() if name != "fold"}
        W, dy, shape, bufs = _case(C, H, F, n, np.float32)
        times = common.interleave({name: (lambda f=f: f(W, dy, shape, bufs)) for name, f in forms.items()},
                                  reps, warmup=2)
        rows.append(dict(layer=f"conv{i + 1}", C=C, F=F, H=H, batch=n, float64_rel_diff=max(agree.values()),
                         **{name: common.stats(times[name]) for name in forms},
                         gather_over_fold=common.paired_ratio(times["gather"], times["fold"]),
                         offsets_over_fold=common.paired_ratio(times["offsets"], times["fold"])))
    log(common.table([dict(layer=r["layer"], shape=f"{r['C']}->{r['F']} @ {r['H']}x{r['H']}",
                           fold=r["fold"]["median_ms"], gather=r["gather"]["median_ms"],
                           offsets=r["offsets"]["median_ms"], g=r["gather_over_fold"],
                           o=r["offsets_over_fold"]) for r in rows],
                     [("layer", "layer", "s"), ("shape", "shape", "s"), ("fold ms", "fold", ".2f"),
                      ("gather ms", "gather", ".2f"), ("offsets ms", "offsets", ".2f"),
                      ("gather/fold", "g", ".2f"), ("offsets/fold", "o", ".2f")],
                     title=f"conv input gradient, batch {n}: scatter fold (used), gather, per-offset GEMMs"))
    return rows
