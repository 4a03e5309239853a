"""Benchmark 4: how much of the machine's sgemm rate the training step's GEMMs reach.

The machine's rate is measured in the same run: a large square float32 matmul (NumPy's
OpenBLAS, and torch's for the torch side). The step's GEMM work is counted analytically from
the im2col form of each layer (a conv3x3 on (N, C, H, W) -> F channels is an (N H W) x (9 C) x F
product): forward, weight gradient, and input gradient (skipped for the first conv when nothing
upstream needs it: FP32; W4A4 needs it for the input step ``s_a``). Two figures:

- ``step``: GEMM FLOPs / measured step time (the whole step, so an upper bound on neither
  side: everything that is not a GEMM counts against it);
- ``replay``: the same GEMMs run alone as plain 2-D NumPy matmuls of those shapes: the rate
  these shapes reach on this machine, and the share of the step they would take. Their total
  time is the step's GEMM floor; ``<lib>_above_floor = (step - floor) / floor``.
"""
from __future__ import annotations

import time

import numpy as np

from . import common
from . import step as step_bench

CONVS = ((1, 28, 16), (16, 14, 32), (32, 7, 64))   # (C_in, H = W, F) of conv1..conv3, 3x3 pad 1


def step_gemms(n, quantized, num_classes=10):
    """The GEMMs of one training step of the small CNN on a batch of n: list of
    dict(layer, kind, m, k, n, flops) with flops = 2 m k n."""
    out = []
    for i, (C, H, F) in enumerate(CONVS):
        M, K = n * H * H, 9 * C
        kinds = [("forward", (M, K, F)), ("weight grad", (K, M, F))]
        if i > 0 or quantized:
            kinds.append(("input grad", (M, F, K)))
        for kind, (a, b, c) in kinds:
            out.append(dict(layer=f"conv{i + 1}", kind=kind, m=a, k=b, n=c, flops=2 * a * b * c))
    c3 = CONVS[-1][2]
    for kind, (a, b, c) in (("forward", (n, c3, num_classes)), ("weight grad", (num_classes, n, c3)),
                            ("input grad", (n, num_classes, c3))):
        out.append(dict(layer="fc", kind=kind, m=a, k=b, n=c, flops=2 * a * b * c))
    return out


def peak_rate(matmul, size, reps):
    """GFLOP/s of a size x size x size matmul (after two warm-up calls): the best of ``reps``
    (the machine's rate; other processes can only slow a run down) and the median."""
    for _ in range(2):
        matmul()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul()
        ts.append(time.perf_counter() - t0)
    flop = 2 * size ** 3
    return flop / min(ts) / 1e9, flop / float(np.median(ts)) / 1e9


def replay(gemms, reps):
    """Median seconds of each GEMM shape as a plain float32 NumPy matmul."""
    rng = np.random.default_rng(0)
    total = 0.0
    for g in gemms:
        A = rng.standard_normal((g["m"], g["k"])).astype(np.float32)
        B = rng.standard_normal((g["k"], g["n"])).astype(np.float32)
        t = common.interleave({"gemm": lambda: A @ B}, reps, warmup=2)["gemm"]
        g["replay_ms"] = float(np.median(t)) * 1e3
        total += g["replay_ms"] / 1e3
    return total


def run(torch, quick=False, step_result=None, log=print):
    size, reps = (256, 3) if quick else (2048, 9)
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    best, med = peak_rate(lambda: a @ a, size, reps)
    out = dict(peak_size=size, peak_reps=reps, numpy_sgemm_gflops=best, numpy_sgemm_gflops_median=med,
               peak="best of the reps (GFLOP/s); the median is recorded too",
               counted="GEMM FLOPs of the step, counted analytically (im2col form), divided by "
                       "the measured step time; replay: the same GEMM shapes timed alone",
               variants={})
    if torch is not None:
        ta = torch.from_numpy(a.copy())
        out["torch_sgemm_gflops"], out["torch_sgemm_gflops_median"] = peak_rate(lambda: ta @ ta, size, reps)
    missing = common.mecref_missing("nn", "losses", "optim")
    n = 8 if quick else 128
    rows = []
    for variant, spec in step_bench.VARIANTS.items():
        gemms = step_gemms(n, quantized=variant != "fp32")
        flops = sum(g["flops"] for g in gemms)
        rec = dict(label=spec["label"], batch=n, gemm_gflop=flops / 1e9, gemms=gemms)
        t_replay = replay(gemms, 3 if quick else 15)
        rec["replay_ms"] = t_replay * 1e3
        rec["replay_gflops"] = flops / t_replay / 1e9
        rec["replay_fraction_of_peak"] = rec["replay_gflops"] / out["numpy_sgemm_gflops"]
        times = _step_times(torch, variant, n, quick, step_result, missing)
        for lib, ms in times.items():
            rec[f"{lib}_step_ms"] = ms
            rate = flops / (ms / 1e3) / 1e9
            rec[f"{lib}_gflops"] = rate
            peak = out["numpy_sgemm_gflops"] if lib == "mecref" else out["torch_sgemm_gflops"]
            rec[f"{lib}_fraction_of_peak"] = rate / peak
            rec[f"{lib}_above_floor"] = (ms - rec["replay_ms"]) / rec["replay_ms"]
        if "mecref_step_ms" in rec:
            rec["replay_share_of_mecref_step"] = rec["replay_ms"] / rec["mecref_step_ms"]
        out["variants"][variant] = rec
        rows.append(dict(variant=spec["label"], gflop=rec["gemm_gflop"], replay=rec["replay_gflops"],
                         rfrac=rec["replay_fraction_of_peak"], mstep=rec.get("mecref_step_ms"),
                         mfrac=rec.get("mecref_fraction_of_peak"), tstep=rec.get("torch_step_ms"),
                         tfrac=rec.get("torch_fraction_of_peak")))
    if missing:
        out["note"] = "step times missing: " + "; ".join(missing)
    log(f"sgemm {size}^3 float32: numpy {out['numpy_sgemm_gflops']:.1f} GFLOP/s"
        + (f", torch {out['torch_sgemm_gflops']:.1f} GFLOP/s" if "torch_sgemm_gflops" in out else ""))
    log(common.table(rows, [("variant", "variant", "s"), ("GEMM GFLOP/step", "gflop", ".3f"),
                            ("replay GFLOP/s", "replay", ".1f"), ("replay/peak", "rfrac", ".2f"),
                            ("mecref step ms", "mstep", ".2f"), ("mecref/peak", "mfrac", ".2f"),
                            ("torch step ms", "tstep", ".2f"), ("torch/peak", "tfrac", ".2f")],
                     title="fraction of the sgemm rate reached by the step's GEMMs "
                           "(FLOPs / step time / peak)"))
    return out


def _step_times(torch, variant, n, quick, step_result, missing):
    """Median step times (ms) from the step benchmark of this run, else measured here."""
    if step_result and variant in step_result.get("variants", {}):
        rec = step_result["variants"][variant]["step"]
        return {lib: rec[lib]["median_ms"] for lib in ("mecref", "torch") if lib in rec}
    if missing:
        return {}
    x, y = step_bench.batch(n)
    model, _, m_step = step_bench.mecref_model(variant, x, y)
    fns = {"mecref": m_step}
    if torch is not None:
        fns["torch"] = step_bench.torch_model(torch, variant, model, x, y)[2]
    times = common.interleave(fns, 3 if quick else 15, warmup=2, lead=0.02)
    return {lib: common.stats(t)["median_ms"] for lib, t in times.items()}
