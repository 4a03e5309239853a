"""Write docs/benchmarks.md (and docs/img/bench_moe_map.png with its data, bench_moe_map.json)
from a results JSON.

    python -m benchmarks.report benchmarks/results/latest.json [--out docs/benchmarks.md]
                                                              [--img-dir docs/img]

Tables, the plot, the machine, the command behind each figure, and the targets with
met/missed; where a target is missed, the cProfile of the mecref code behind it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from . import common

DOC = common.REPO / "docs" / "benchmarks.md"
IMG_DIR = common.REPO / "docs" / "img"
SCALING_PNG = "bench_moe_map.png"
SCALING_JSON = "bench_moe_map.json"

# (key, description, comparison, threshold)
TARGETS = (
    ("main_step", "default main-job step (W2A2 LSQ, two views, order-4 Taylor MEC), mecref / torch time",
     "<=", 1.0),
    ("main_epoch", "whole bundled epoch of the main job, mecref / torch twin time", "<=", 1.0),
    ("main_floor", "main-job step's time above its GEMM floor, in floors (mecref)", "<=", 1.5),
    ("step_fp32", "FP32 training step, mecref / torch time", "<=", 1.2),
    ("step_w4a4", "W4A4 LSQ training step, mecref / torch time", "<=", 1.0),
    ("coding_length", "coding length + gradient, torch / mecref time, at every (m, d) (worst shown)", ">=", 1.5),
    ("moe_k4", "MOE K=4 at m=2048: exact coding length / MOE time (mecref; worst d shown)", ">=", 3.0),
    ("memory", "peak memory of a training epoch, mecref / torch (worst variant shown)", "<=", 1.5),
)


# ----------------------------------------------------------------------------- targets
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def targets(doc):
    """Each target's measured value and verdict: list of dict(key, target, value, where, met)."""
    res = doc.get("results", {})
    out = []
    for key, desc, op, thr in TARGETS:
        value, where = None, ""
        if key == "main_step":
            value = _get(res, "main", "step", "ratio")
        elif key == "main_epoch":
            value = _get(res, "main", "epoch", "ratio")
        elif key == "main_floor":
            value = _get(res, "main", "floor", "mecref_above_floor")
            t = _get(res, "main", "floor", "torch_above_floor")
            where = "" if t is None else f"torch: {t:.2f}"
        elif key == "step_fp32":
            value = _get(res, "step", "variants", "fp32", "step", "ratio")
        elif key == "step_w4a4":
            value = _get(res, "step", "variants", "w4a4_lsq", "step", "ratio")
        elif key == "coding_length":
            cl = [r for r in _get(res, "entropy", "grid") or [] if r["term"] == "coding_length" and "speedup" in r]
            if cl:
                worst = min(cl, key=lambda r: r["speedup"])
                value, where = worst["speedup"], f"m={worst['m']}, d={worst['d']}"
        elif key == "moe_k4":
            pts = [p for p in _get(res, "entropy", "scaling", "points") or []
                   if p["m"] == 2048 and "moe_K4" in p["speedup"]]
            if pts:
                worst = min(pts, key=lambda p: p["speedup"]["moe_K4"])
                value = worst["speedup"]["moe_K4"]
                where = ", ".join(f"d={p['d']}: {p['speedup']['moe_K4']:.2f}" for p in pts)
        elif key == "memory":
            vs = [(v["ratio"], v["label"]) for v in (_get(res, "memory", "variants") or {}).values()
                  if "ratio" in v]
            if vs:
                value, where = max(vs)
                where = ", ".join(f"{label}: {r:.2f}" for r, label in vs)
        alt = _alternative(res, key)
        out.append(dict(key=key, target=f"{desc} {op} {thr}", value=value, where=where,
                        met=_meets(value, op, thr), alt_value=alt, alt_met=_meets(alt, op, thr)))
    return out


def _meets(value, op, thr):
    return None if value is None else (value <= thr if op == "<=" else value >= thr)


def _alternative(res, key):
    """The same figure from the rerun under OpenBLAS's default thread timeout, if any."""
    if key in ("step_fp32", "step_w4a4"):
        items = _get(res, "step", "blas_timeout_default", "items") or []
        variant = "fp32" if key == "step_fp32" else "w4a4_lsq"
        return next((r["ratio"] for r in items if r["key"] == variant), None)
    if key == "coding_length":
        items = _get(res, "entropy", "blas_timeout_default", "items") or []
        return min((r["speedup"] for r in items), default=None)
    return None


def _verdict(met):
    return "not measured" if met is None else ("met" if met else "**missed**")


def targets_text(tgts):
    lines = ["targets:"]
    for t in tgts:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        alt = ("" if t.get("alt_value") is None else
               f"; under OpenBLAS's default timeout {t['alt_value']:.2f}, {_verdict(t['alt_met']).strip('*')}")
        lines.append(f"  [{_verdict(t['met']).strip('*'):>12}] {t['target']}: {v}"
                     + (f" ({t['where']})" if t["where"] else "") + alt)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot
def plot_moe_map(doc, path):
    """The MOE speed map: one heat map per K of t_exact / t_MOE over (m, d), log colour scale
    centred on 1 (red: MOE faster, blue: slower), every cell annotated, the line m/K = d drawn."""
    scaling = _get(doc, "results", "entropy", "scaling")
    if not scaling or not scaling.get("points"):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    ms, ds, Ks = scaling["ms"], scaling["ds"], scaling["experts"]
    grid = {(p["m"], p["d"]): p["speedup"] for p in scaling["points"]}
    vals = [v for sp in grid.values() for v in sp.values()]
    span = max(2.0, max(max(vals), 1 / min(vals))) if vals else 2.0
    norm = LogNorm(vmin=1 / span, vmax=span)
    fig, axes = plt.subplots(1, len(Ks), figsize=(4.0 * len(Ks) + 1.2, 3.9), squeeze=False)
    for ax, K in zip(axes[0], Ks):
        A = np.full((len(ds), len(ms)), np.nan)
        for i, d in enumerate(ds):
            for j, m in enumerate(ms):
                A[i, j] = grid.get((m, d), {}).get(f"moe_K{K}", np.nan)
        im = ax.imshow(A, cmap="RdBu_r", norm=norm, origin="lower", aspect="auto")
        for i in range(len(ds)):
            for j in range(len(ms)):
                if np.isfinite(A[i, j]):
                    dark = abs(np.log(A[i, j])) > 0.55 * np.log(span)
                    ax.text(j, i, f"{A[i, j]:.2f}x", ha="center", va="center", fontsize=9,
                            color="white" if dark else "black")
        # the rule's boundary m / K = d, in cell coordinates (both axes are log2 steps of the grid)
        xs = np.linspace(-0.5, len(ms) - 0.5, 50)
        m_at = np.exp(np.interp(xs, range(len(ms)), np.log(ms), left=np.nan, right=np.nan))
        y_at = np.interp(np.log(m_at / K), np.log(ds), range(len(ds)), left=np.nan, right=np.nan)
        ax.plot(xs, y_at, color="k", ls="--", lw=1, label="m / K = d")
        ax.set_xticks(range(len(ms)), [str(m) for m in ms])
        ax.set_yticks(range(len(ds)), [str(d) for d in ds])
        ax.set_xlabel("batch size m (rows)")
        if K == Ks[0]:
            ax.set_ylabel("feature dimension d")
        ax.set_title(f"K = {K} experts")
        ax.set_xlim(-0.5, len(ms) - 0.5)
        ax.set_ylim(-0.5, len(ds) - 0.5)
        ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    ticks = [t for t in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16) if 1 / span <= t <= span]
    cb.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
    cb.minorticks_off()
    cb.set_label("speed-up t_exact / t_MOE (x, log scale)\n> 1: MOE faster")
    fig.suptitle("mecref: MOE coding length against the exact coding length, value + gradient "
                 "(float32, CPU)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_moe_map_data(doc, path):
    """The map's figures next to its PNG, with the machine and the command that made them."""
    scaling = _get(doc, "results", "entropy", "scaling")
    if not scaling or not scaling.get("points"):
        return None
    rec = doc["results"]["entropy"]
    data = dict(command=rec.get("command", "python -m benchmarks --only entropy"),
                report_command="python -m benchmarks.report <results json>",
                started=doc.get("started"), cpu=doc["machine"]["cpu"],
                git_commit=doc["machine"].get("git_commit"), speedup=scaling["speedup"],
                ms=scaling["ms"], ds=scaling["ds"], experts=scaling["experts"],
                points=[dict(m=p["m"], d=p["d"], exact_ms=p["exact"]["median_ms"], reps=p["exact"]["n"],
                             moe_ms={k: v["median_ms"] for k, v in p["moe"].items()}, speedup=p["speedup"])
                        for p in scaling["points"]])
    path = Path(path)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- markdown
def _ms(s):
    return "-" if not s else f"{s['median_ms']:.3g} ({s['q1_ms']:.3g}-{s['q3_ms']:.3g})"


def _x(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def _md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _profile_md(prof, unit):
    return "```\n" + common.profile_text(prof, unit) + "\n```"


def _skipped(rec):
    if rec is None:
        return "_Not run in this results file._"
    if "skipped" in rec:
        return f"_Skipped: {rec['skipped']}_"
    if "error" in rec:
        return "_Failed:_\n\n```\n" + rec["error"].strip()[-2000:] + "\n```"
    return None


def render(doc, json_path=None, img_rel="img"):
    """The Markdown text of docs/benchmarks.md for a results document."""
    res = doc.get("results", {})
    tg = doc.get("targets") or targets(doc)
    mach, thr = doc["machine"], doc["threads"]
    src = json_path or "benchmarks/results/latest.json"
    L = ["# Benchmarks: mecref against PyTorch", "",
         f"Generated by `python -m benchmarks.report {src}` from the run `{doc['command']}` "
         f"on {mach['cpu']} (started {doc['started']}, {doc['seconds']:.0f} s, git "
         f"{mach.get('git_commit', '?')}); every figure below is from that one run, on that CPU. "
         "Do not edit by hand: rerun the two commands.", "",
         "mecref computes every gradient in closed form with NumPy; the comparison is PyTorch on "
         "the same CPU with autograd, on the same model (weights copied from mecref) and the "
         "same formulas (docs/derivations.md). Times are medians with the interquartile range in "
         "brackets, in milliseconds; every ratio comes from interleaved A/B runs in one process "
         "(the median over reps of the ratio of the two runs of a rep).", ""]
    if doc.get("quick"):
        L += ["> **Quick run** (`--quick`): tiny sizes and few reps, a smoke test only; the "
              "figures say nothing about speed.", ""]
    la, lb = doc.get("loadavg_start"), doc.get("loadavg_end")
    L += [f"> The machine was shared with other work during this run (load average {la} at the "
          f"start, {lb} at the end, on {mach['usable_cpus']} CPUs): treat single figures as "
          "noisy; the interleaving keeps the ratios fairer than the absolute times.", ""]

    # targets
    L += ["## Targets", "", f"Ratios mecref / PyTorch (or as named), {mach['cpu']}, this run.", ""]
    L.append(_md_table(["target", "measured", "verdict", "where",
                        "under OpenBLAS's default thread timeout (see below)"],
                       [[t["target"], _x(t["value"]), _verdict(t["met"]), t["where"] or "-",
                         "-" if t.get("alt_value") is None else
                         f"{t['alt_value']:.2f}, {_verdict(t['alt_met'])}"] for t in tg]))
    L += ["", "The verdicts use the main run (OPENBLAS_THREAD_TIMEOUT=4, as prescribed against the "
          "thread-spin trap); the last column repeats the step and coding-length comparisons with "
          "OpenBLAS's default timeout and a long lead-in instead."]
    missed = [t for t in tg if t["met"] is False]
    if missed:
        L += ["", "Missed targets have their profile under "
              "[Where the time goes](#where-the-time-goes)."]
    L.append("")

    # machine
    L += ["## Machine and threads", ""]
    blas = mach.get("numpy_blas", {}).get("blas", {}) if isinstance(mach.get("numpy_blas"), dict) else {}
    L += [f"- CPU: {mach['cpu']} ({', '.join(mach.get('cpu_flags', []))}); {mach['logical_cpus']} "
          f"logical CPUs, {mach['usable_cpus']} usable; {mach.get('memory_gib')} GiB",
          f"- Python {mach['python']}, NumPy {mach['numpy']}, SciPy {mach['scipy']}, "
          f"PyTorch {mach.get('torch') or 'not installed'}, mecref {mach.get('mecref')}; {mach['platform']}",
          f"- NumPy BLAS: {blas.get('name', '?')} {blas.get('version', '')} "
          f"({blas.get('openblas configuration', '').strip()})",
          "- Thread pools (threadpoolctl): " + "; ".join(
              f"{p.get('internal_api')} {p.get('version') or ''} {p.get('num_threads')} threads "
              f"[{os.path.basename(str(p.get('filepath', '')))}]" for p in mach.get("thread_pools", [])),
          f"- Threads: NumPy's BLAS has {thr['numpy_blas_threads']} ({thr['numpy_blas_threads_from']}); "
          + (f"{thr['torch_threads']}, {thr['torch_interop_threads']} inter-op; " if "torch_threads" in thr else "")
          + f"OPENBLAS_THREAD_TIMEOUT {thr['openblas_thread_timeout']}.",
          f"- OPENBLAS_CORETYPE={thr['OPENBLAS_CORETYPE']} (left as found: it forces OpenBLAS's "
          f"AVX2 Haswell kernels on this AVX-512 machine), OPENBLAS_L2_SIZE={thr['OPENBLAS_L2_SIZE']}, "
          f"OMP_WAIT_POLICY={thr['OMP_WAIT_POLICY']}."]
    sc = doc.get("spin_check")
    if sc:
        L += [f"- The thread-spin trap, measured ({sc['probe']}, medians): NumPy alone "
              f"{sc['numpy_alone_ms']:.2f} ms; right after a torch call, while torch's OpenMP "
              f"workers may still spin, {sc['numpy_right_after_torch_ms']:.2f} ms; with the "
              f"{sc['lead_s'] * 1e3:.0f} ms lead-in of untimed runs that the entropy benchmark puts "
              f"before each timed run {sc['numpy_interleaved_with_lead_ms']:.2f} ms."]
    L.append("")

    L += _step_md(res.get("step"))
    L += _main_md(res.get("main"))
    L += _entropy_md(res.get("entropy"), img_rel)
    L += _memory_md(res.get("memory"))
    L += _gemm_md(res.get("gemm"))
    L += _gpu_md(res.get("gpu"))
    L += _profiles_md(res, missed)
    L += ["## Reproduce", "", "```bash",
          "python3 -m pip install -e . && python3 -m pip install torch==2.13.0 threadpoolctl",
          f"{doc['command'].replace('python -m', 'python3 -m')}",
          f"python3 -m benchmarks.report {src}", "```", "",
          "`--only step,main,entropy,memory,gemm,gpu` runs a subset; `--quick` runs tiny sizes (the "
          "smoke test in tests/test_benchmarks_smoke.py does).", ""]
    return "\n".join(L)


def _cmd(rec):
    return f"Command: `{rec.get('command', '?')}` ({rec.get('seconds', 0):.0f} s)."


def _step_md(rec):
    L = ["## 1. Training step of the small CNN", ""]
    s = _skipped(rec)
    if s:
        return L + [s, ""]
    L += [f"Batch {rec['batch']} of {rec['image']}; {rec['reps']} interleaved reps after "
          f"{rec['warmup']} warm-up runs, each timed run preceded by {rec['lead_s'] * 1e3:.0f} ms of "
          "untimed runs of the same code. *forward*: the train-mode forward alone (batch statistics; "
          "mecref caches for backward, torch records the graph); *step*: forward + cross-entropy + "
          "backward + SGD (momentum 0.9, weight decay 5e-4). W4A4 LSQ: conv2, conv3 at 4-bit "
          "weights and activations, conv1 and the linear layer at 8 bits.", ""]
    rows = []
    for v in rec["variants"].values():
        for part in ("forward", "step"):
            r = v[part]
            rows.append([v["label"], part, _ms(r["mecref"]), _ms(r.get("torch")), _x(r.get("ratio"))])
    L.append(_md_table(["variant", "part", "mecref ms", "torch ms", "mecref / torch"], rows))
    checks = [(v["label"], v["check"]) for v in rec["variants"].values() if "check" in v]
    if checks:
        L += ["", "Same model, checked before timing (float64, random-normal images, first step "
              "from the same weights): " + "; ".join(
                  f"{lab}: loss {c['loss_mecref']:.10f} vs {c['loss_torch']:.10f}, gradients "
                  f"differ by {c['grad_rel_diff_median']:.1e} (median over parameters, relative) and "
                  f"{c['grad_rel_diff_worst']:.1e} at worst ({c['grad_rel_diff_worst_param']})"
                  for lab, c in checks) + ". Under fake quantization exact ties are common (equal "
              "values in a max-pool window, a BatchNorm output at 0 before a ReLU); the two "
              "libraries sum the convolutions in different orders, so a tie can break differently "
              "by the last bit and send a few gradient entries elsewhere: hence the W4A4 "
              "worst case while the losses agree."]
    abs_ = [(v["label"], v["threads_ab"]) for v in rec["variants"].values() if "threads_ab" in v]
    if abs_:
        L += ["", "mecref's element-wise passes (im2col, col2im, max pool, BatchNorm) run on "
              "`mecref.threads`' thread pool, split over channels (docs/design.md, *Threads*). The "
              "same step with them on one thread, interleaved A/B in this run (the GEMMs keep "
              "OpenBLAS's threads in both): " + "; ".join(
                  f"{lab}: {_ms(ab['one'])} ms on 1 thread, {_ms(ab['all'])} ms on {ab['threads']} "
                  f"(1-thread / {ab['threads']}-thread time {_x(ab['ratio'])})" for lab, ab in abs_) + "."]
    layered = [v for v in rec["variants"].values() if "layers" in v]
    if layered:
        names = [r["layer"] for r in layered[0]["layers"]]
        head = ["layer"] + [f"{v['label']} {part} ms" for v in layered for part in ("forward", "backward")]
        rows = []
        for i, name in enumerate(names):
            row = [name]
            for v in layered:
                r = v["layers"][i]
                row += [f"{r['forward']['median_ms']:.2f}", f"{r['backward']['median_ms']:.2f}"]
            rows.append(row)
        rows.append(["sum"] + [f"{sum(r[part]['median_ms'] for r in v['layers']):.2f}"
                               for v in layered for part in ("forward", "backward")])
        L += ["", "Where a mecref step spends its time, layer by layer (medians of each layer's "
              "train-mode forward, and of its backward right after it, on the activations and "
              "gradients of a real step; a BatchNorm and the max pool after it run as one fused "
              "unit, `bn1+pool1`, as in the step (docs/derivations.md N11); conv1's backward computes "
              "no input gradient, except the quantized conv1's, whose input step needs it):", "",
              _md_table(head, rows)]
    L += _blas_timeout_md(rec.get("blas_timeout_default"))
    return L + ["", _cmd(rec), ""]


def _main_md(rec):
    L = ["## 1b. The main job: the default training step and a whole epoch", ""]
    s = _skipped(rec)
    if s:
        return L + [s, ""]
    cfg = rec["config"]
    L += [f"What `mecref train` runs by default: {cfg['quantizer'].upper()} W{cfg['w_bits']}A{cfg['a_bits']} "
          f"(conv1 and the linear layer at {cfg['first_last_bits']} bits), two augmented views of each "
          f"batch of {rec['batch']} run as one batch of {rec['network_batch']}, cross-entropy on both views "
          f"plus {cfg['reg_weight']} x the order-{cfg['order']} Taylor MEC of the two views' features "
          f"(eps {cfg['eps']}), SGD with momentum. *step*: `mecref.train.train_step` (augmentation, "
          "forward, loss, closed-form backward, the finite check that reads the device once, SGD) "
          "against a PyTorch twin: the same host augmentation, the same network with mecref's weights "
          "and LSQ steps, the same loss with autograd, `loss.item()`, the same SGD "
          f"(benchmarks/main_job.py); {rec['reps']} interleaved reps after {rec['warmup']} warm-up runs. "
          f"*epoch*: a whole epoch on the bundled data ({rec['epoch']['train_images']} training images, "
          f"{rec['epoch']['steps']} steps, then the {rec['epoch']['test_images']} test images evaluated) "
          "from a fresh model: `train_small_cnn(epochs=1)` against the twin's loop over the same "
          "batches in the same order with the same augmentation and learning rates; "
          f"{rec['epoch']['reps']} interleaved reps.", ""]
    rows = [["step", _ms(rec["step"]["mecref"]), _ms(rec["step"].get("torch")), _x(rec["step"].get("ratio"))],
            ["epoch", _ms(rec["epoch"]["mecref"]), _ms(rec["epoch"].get("torch")), _x(rec["epoch"].get("ratio"))]]
    L.append(_md_table(["what", "mecref ms", "torch ms", "mecref / torch"], rows))
    ab = rec["step"].get("threads_ab")
    if ab:
        L += ["", f"The mecref step with its element-wise passes on one thread: {_ms(ab['one'])} ms; on "
              f"{ab['threads']} (mecref.threads' default, one per usable CPU): {_ms(ab['all'])} ms "
              f"(1-thread / {ab['threads']}-thread time {_x(ab['ratio'])}, interleaved in this run; "
              "the GEMMs keep OpenBLAS's threads in both)."]
    c = rec.get("check")
    if c:
        L += ["", f"Same step, checked before timing (float64, random-normal images, the same two views): "
              f"loss {c['loss_mecref']:.10f} (mecref) vs {c['loss_torch']:.10f} (torch); gradients differ "
              f"by {c['grad_rel_diff_median']:.1e} (median over parameters, relative) and "
              f"{c['grad_rel_diff_worst']:.1e} at worst ({c['grad_rel_diff_worst_param']})."]
    f = rec["floor"]
    L += ["", f"**GEMM floor.** The step's GEMMs (im2col form, batch {f['batch']}: "
          f"{f['gemm_gflop']:.3f} GFLOP; {f['note']}) run alone as plain NumPy matmuls of the same "
          f"shapes, timed in the same interleaved rounds as the two steps, take **{f['floor_ms']:.2f} ms** "
          f"({f['floor_gflops']:.0f} GFLOP/s): no step that computes these products with this BLAS "
          "can be faster. Above it (*above / floor*: the median over rounds of (step - floor) / floor, "
          "both from the same round):", "",
          _md_table(["library", "step ms", "above the floor ms", "above / floor", "share of the step above the floor"],
                    [[lib, f"{f[f'{lib}_step_ms']:.2f}", f"{f[f'{lib}_step_ms'] - f['floor_ms']:.2f}",
                      _x(f[f"{lib}_above_floor"]), f"{f[f'{lib}_share_above']:.0%}"]
                     for lib in ("mecref", "torch") if f"{lib}_step_ms" in f]),
          "", "torch's convolutions run in oneDNN, not OpenBLAS: its own GEMM rate differs, so its row "
          "says how far its step is above *NumPy's* floor, for comparison only."]
    cg = rec.get("conv_input_grad")
    if cg:
        offsets = all("offsets" in r for r in cg)    # a JSON from before the offsets form has none
        head = ["layer", "C -> F", "size", "fold ms", "gather ms"] + (["offsets ms"] if offsets else []) \
            + ["gather / fold"] + (["offsets / fold"] if offsets else []) + ["float64 rel. diff"]
        rows = [[r["layer"], f"{r['C']} -> {r['F']}", f"{r['H']}x{r['H']}", _ms(r["fold"]), _ms(r["gather"])]
                + ([_ms(r["offsets"])] if offsets else []) + [_x(r["gather_over_fold"])]
                + ([_x(r["offsets_over_fold"])] if offsets else []) + [f"{r['float64_rel_diff']:.0e}"] for r in cg]
        L += ["", "**The input gradient of a stride-1 convolution, three ways** (docs/derivations.md "
              "N1): mecref scatters the column gradient back with col2im (*fold*); the *gather* form "
              "unfolds the padded output gradient and multiplies it by the flipped kernel, one GEMM "
              "and no scatter, but F k k rows of columns instead of C k k"
              + ("; the *offsets* form runs one GEMM per kernel offset and adds each C-row block, "
                 "shifted, into dx, with no column array" if offsets else "")
              + ". All at this step's shapes, interleaved (benchmarks/conv_grad.py; they agree with the "
              "fold to the float64 difference shown, the worst of the forms):", "",
              _md_table(head, rows), ""]
        keys = ["gather"] + (["offsets"] if offsets else [])
        faster = [f"{r['layer']} {k} ({r[f'{k}_over_fold']:.2f})" for r in cg for k in keys if r[f"{k}_over_fold"] < 1]
        L.append("In this run the fold was beaten " + ("by: " + ", ".join(faster) if faster else "at no layer")
                 + ". mecref uses the fold for every layer: in the small CNN each layer has F = 2C "
                 "(or C = 1, conv1, whose dx only the quantized input step needs), so the gather "
                 "unfolds twice the rows (sixteen times for conv1) that the fold writes.")
    gl = rec.get("gemm_layout")
    if gl:
        lo, hi = min(r["ratio"] for r in gl["rows"]), max(r["ratio"] for r in gl["rows"])
        L += ["", f"**The GEMMs' operand layouts** (benchmarks/gemm_layout.py): each conv GEMM of a main-job "
              f"step at batch {gl['batch']}, its operands as the layer hands them to `np.matmul` (*C*: "
              "row-major; *T*: the transpose of a row-major array, which NumPy passes to BLAS with the "
              "transpose flag, no copy; *copy*: other strides, copied first), timed against the same "
              f"product on row-major copies made beforehand ({gl['reps']} interleaved reps; the "
              "operands come from a real step, each product checked against the layer's):", "",
              _md_table(["layer", "GEMM", "m x k x n", "A", "B", "as used ms", "row-major ms", "as used / row-major"],
                        [[r["layer"], r["gemm"], r["shape"], r["a"], r["b"], f"{r['as_used_ms']:.2f}",
                          f"{r['row_major_ms']:.2f}", _x(r["ratio"])] for r in gl["rows"]]),
              "", ("No operand is copied before its GEMM" if all(r["a"] != "copy" and r["b"] != "copy" for r in gl["rows"])
                   else "Some operands are copied before their GEMM")
              + f"; as used / row-major runs from {lo:.2f} to {hi:.2f} in this run (above 1: the layout "
              "costs time; below 1: it saves some)."]
    prof = rec["step"].get("profile")
    if prof:
        L += ["", "cProfile of the mecref main-job step (top functions by own time):", "",
              _profile_md(prof, "step")]
    return L + ["", _cmd(rec), ""]


def _blas_timeout_md(bt):
    """The A/B rerun under OpenBLAS's default thread timeout, as a table."""
    if not bt:
        return []
    if "error" in bt:
        return ["", f"_The rerun under OpenBLAS's default thread timeout failed: {bt['error']}_"]
    rows = [[r["what"], _ms(r["mecref"]), _ms(r["torch"]), _x(r["ratio"]), _x(1 / r["ratio"])]
            for r in bt["items"]]
    return ["", f"The same A/B comparison under OPENBLAS_THREAD_TIMEOUT={bt['OPENBLAS_THREAD_TIMEOUT']} "
            f"(OpenBLAS's default, about 0.1 s of spinning after each call) with a "
            f"{bt['lead_s'] * 1e3:.0f} ms lead-in of untimed runs before each timed run (longer than "
            f"the other library's workers spin), {bt['reps']} reps, in a subprocess "
            "(benchmarks/blas_timeout.py). With the timeout of 4 that the main run sets, OpenBLAS's "
            "workers sleep after every call, so each of mecref's BLAS and LAPACK calls (SciPy's "
            "Cholesky is many small ones) may pay a wake-up; this table shows what that costs.", "",
            _md_table(["what", "mecref ms", "torch ms", "mecref / torch", "torch / mecref"], rows)]


def _entropy_md(rec, img_rel):
    L = ["## 2. Entropy terms", ""]
    s = _skipped(rec)
    if s:
        return L + [s, ""]
    L += [f"Value + gradient of each term on float32 features Z (m, d), rows l2-normalised inside: "
          f"mecref's forward and closed-form backward against torch's forward and "
          f"`torch.autograd.grad` of the same formula on the same side (Cholesky, or LU for the "
          f"exact two-view MEC). eps = {rec['eps']} ({rec['eps_note']}). *speed-up* = torch / mecref "
          "time (the target wants >= 1.5 for the coding length).", ""]
    grid = rec["grid"]
    terms = list(dict.fromkeys(r["term"] for r in grid))
    rows = []
    for r in grid:
        c = r.get("check", {})
        rows.append([r["term"], r["m"], r["d"], _ms(r["mecref"]), _ms(r.get("torch")),
                     _x(r.get("speedup")), "-" if not c else f"{c['grad_rel_diff']:.0e}"])
    rows.sort(key=lambda row: (terms.index(row[0]), row[1], row[2]))
    L.append(_md_table(["term", "m", "d", "mecref ms", "torch ms", "speed-up (torch / mecref)",
                        "gradient rel. diff"], rows))
    L += ["", "*gradient rel. diff*: |g_mecref - g_torch| / |g_torch| in float32, both computed "
          "from the same Z."]
    L += _blas_timeout_md(rec.get("blas_timeout_default")) + [""]
    sc = rec.get("scaling")
    if sc and sc.get("points"):
        L += ["### The MOE speed map: where the experts pay off", "",
              f"![MOE speed map: t_exact / t_MOE over m and d, one panel per K]({img_rel}/{SCALING_PNG})", "",
              "mecref only, value + gradient of the coding length of Z (m, d), float32; speed-up = "
              "exact / MOE time (median over reps of the ratio of paired runs; reps fill a time "
              "budget per cell, 3 at the largest sizes). The figures behind the map, with the "
              f"command and the machine, are stored next to it in `docs/img/{SCALING_JSON}`.", "",
              "**The rule.** The exact form codes the whole batch on its smaller side: it costs "
              "about m d min(m, d) + min(m, d)^3 flops (the Gram matrix and its Cholesky). MOE "
              "routes the rows into K experts of m/K rows and codes each on *its* smaller side, "
              "min(m/K, d). Where m/K >= d every expert still takes the d x d side: K Gram matrices "
              "of (m/K) d^2 add up to the exact form's m d^2, plus K Cholesky factorisations instead "
              "of one, and the routing on top: MOE is slower (< 1 below). Only where **m/K < d** does "
              "the per-expert Gram side shrink, to m/K: the work drops to m^2 d / K, a speed-up "
              "of about min(K, K d / m) in flops (K when m <= d; K d / m when m/K < d < m), less "
              "the routing and the K separate calls. The dashed line in each panel is m/K = d: MOE "
              "can only win above it (to its upper left); whether it does there depends on "
              "whether the Gram work it saves outweighs that overhead, which dominates at small "
              "m, where the exact form takes well under a millisecond.", ""]
        rows = []
        for p in sc["points"]:
            rows.append([p["d"], p["m"], _ms(p["exact"]), p["exact"]["n"]] +
                        [_x(p["speedup"].get(f"moe_K{K}")) for K in sc["experts"]])
        L.append(_md_table(["d", "m", "exact ms", "reps"] + [f"K={K} speed-up" for K in sc["experts"]], rows))
        L.append("")
    return L + [_cmd(rec), ""]


def _memory_md(rec):
    L = ["## 3. Peak memory of a training epoch", ""]
    s = _skipped(rec)
    if s:
        return L + [s, ""]
    L += [f"{rec['steps']} training steps of batch {rec['batch']} (consecutive batches of the bundled "
          f"data), each library in its own subprocess. Method: {rec['method']}.", ""]
    rows = []
    for v in rec["variants"].values():
        m, t, tm = v["mecref"], v["torch"], v["mecref_tracemalloc"]
        rows.append([v["label"], _x(m.get("delta_mib"), ".1f"), _x(tm.get("tracemalloc_peak_mib"), ".1f"),
                     _x(t.get("delta_mib"), ".1f"), _x(v.get("ratio")),
                     _x(m.get("baseline_rss_mib"), ".0f"), _x(t.get("baseline_rss_mib"), ".0f")])
    L.append(_md_table(["variant", "mecref MiB", "mecref traced MiB (tracemalloc)", "torch MiB",
                        "mecref / torch", "mecref RSS after set-up MiB", "torch RSS after set-up MiB"], rows))
    return L + ["", _cmd(rec), ""]


def _gemm_md(rec):
    L = ["## 4. How much of the sgemm rate the step reaches", ""]
    s = _skipped(rec)
    if s:
        return L + [s, ""]
    peak = f"{rec['numpy_sgemm_gflops']:.0f} GFLOP/s (NumPy/OpenBLAS)"
    if "torch_sgemm_gflops" in rec:
        peak += f", {rec['torch_sgemm_gflops']:.0f} GFLOP/s (torch)"
    L += [f"Machine rate, measured in the same run: a {rec['peak_size']}^3 float32 matmul, "
          f"best of {rec.get('peak_reps', '?')}: {peak}. The step's GEMM FLOPs are counted "
          "analytically (im2col form of each conv: forward, weight gradient, input gradient; "
          "the first conv's input gradient only where the input step needs it), then divided "
          "by the **measured step time** (so everything that is not a GEMM counts against the "
          "fraction). *replay*: the same GEMM shapes run alone as 2-D NumPy matmuls; their total is "
          "the step's *GEMM floor*, and *above floor / floor* = (step - floor) / floor (the target "
          "for the main job, section 1b, is <= 1.5).", ""]
    rows = []
    for v in rec["variants"].values():
        rows.append([v["label"], f"{v['gemm_gflop']:.3f}", _x(v.get("mecref_step_ms")),
                     _x(v.get("mecref_gflops"), ".1f"), _x(v.get("mecref_fraction_of_peak")),
                     _x(v.get("torch_step_ms")), _x(v.get("torch_gflops"), ".1f"),
                     _x(v.get("torch_fraction_of_peak")), f"{v['replay_gflops']:.1f}",
                     _x(v.get("replay_share_of_mecref_step")), _x(v.get("replay_ms")),
                     _x(v.get("mecref_above_floor")), _x(v.get("torch_above_floor"))])
    if any((v.get(k) or 0) > 1 for v in rec["variants"].values()
           for k in ("mecref_fraction_of_peak", "torch_fraction_of_peak", "replay_fraction_of_peak")):
        L += ["_A fraction above 1 below means the machine's rate was measured during a load spike "
              "of the shared machine (it is lower than what the step reached at another moment): "
              "these fractions are not valid in this run; rerun `python -m benchmarks --only "
              "step,gemm` on a quiet machine._", ""]
    L.append(_md_table(["variant", "GEMM GFLOP / step", "mecref step ms", "mecref GFLOP/s",
                        "mecref / peak", "torch step ms", "torch GFLOP/s", "torch / peak",
                        "replay GFLOP/s", "replay time / mecref step", "GEMM floor ms",
                        "mecref above floor / floor", "torch above floor / floor"], rows))
    return L + ["", _cmd(rec), ""]


def _gpu_md(rec):
    L = ["## 5. GPU: CuPy against torch CUDA", ""]
    s = _skipped(rec)
    if s:
        return L + [s, ""]
    L += [f"Device: {rec['device']}; CuPy {rec['cupy']}, torch CUDA {rec['torch_cuda']}. Each timed "
          "call synchronises the device.", ""]
    rows = []
    for v in rec["step"].values():
        if "error" in v:
            rows.append([v["label"], "failed", "-", "-", "-"])
            continue
        for part in ("forward", "step"):
            r = v[part]
            rows.append([f"{v['label']} {part}", "", _ms(r["mecref"]), _ms(r["torch"]), _x(r["ratio"])])
    for r in rec["entropy"]:
        if "error" in r:
            rows.append([r["term"], f"m={r['m']} d={r['d']}", "failed", "-", "-"])
        else:
            rows.append([r["term"], f"m={r['m']} d={r['d']}", _ms(r["mecref"]), _ms(r["torch"]), _x(r["ratio"])])
    L.append(_md_table(["what", "size", "CuPy ms", "torch CUDA ms", "mecref / torch"], rows))
    return L + ["", _cmd(rec), ""]


def _step_gap_md(res, missed):
    """For each missed step target: the budget the target leaves once the GEMMs are paid, from
    this run's own figures (the GEMM replay of section 4 and the per-layer times of section 1)."""
    thr = {k: t for k, _, _, t in TARGETS}
    L = []
    for t in missed:
        variant = {"step_fp32": "fp32", "step_w4a4": "w4a4_lsq"}.get(t["key"])
        g = _get(res, "gemm", "variants", variant) if variant else None
        v = _get(res, "step", "variants", variant) if variant else None
        if not g or not v or "torch" not in v["step"] or "replay_ms" not in g:
            continue
        torch_ms, mec_ms, gemm_ms = v["step"]["torch"]["median_ms"], v["step"]["mecref"]["median_ms"], g["replay_ms"]
        budget = thr[t["key"]] * torch_ms
        rest, allowed = mec_ms - gemm_ms, budget - gemm_ms
        line = (f"**{v['label']} step.** The target allows {budget:.1f} ms ({thr[t['key']]} x torch's "
                f"{torch_ms:.1f} ms). The step's GEMMs alone, replayed as plain NumPy matmuls (section 4), "
                f"take {gemm_ms:.1f} ms, {gemm_ms / torch_ms:.0%} of torch's whole step; that leaves "
                f"{allowed:.1f} ms for everything else, where mecref spends {rest:.1f} ms: im2col and col2im "
                f"copies, max pool, BatchNorm, quantizers, the optimiser, Python, and the GEMMs' own "
                f"slowdown inside the step (their large operands come from memory, not cache, and the "
                f"weight-gradient GEMMs, with a long inner dimension and a small output, are bound by "
                f"memory bandwidth): {rest - allowed:.1f} ms too many.")
        layers = v.get("layers")
        if layers:
            conv = sum(r["forward"]["median_ms"] + r["backward"]["median_ms"] for r in layers
                       if r["layer"].startswith("conv"))
            other = sum(r["forward"]["median_ms"] + r["backward"]["median_ms"] for r in layers
                        if not r["layer"].startswith("conv"))
            line += (f" Per layer (section 1), the convolutions take {conv:.1f} ms (GEMMs, im2col, col2im"
                     f"{', their quantizers' if variant != 'fp32' else ''}) and the other layers {other:.1f} ms.")
        L += [line, ""]
    if L:
        L = ["What would close the gap: torch runs each convolution as one oneDNN kernel "
             "(`aten::mkldnn_convolution` in torch's profiler) that reads the image directly, so it pays neither the im2col/col2im copies nor the "
             "separate element-wise passes over memory; NumPy can only call a GEMM on materialised "
             "columns and run one pass per ufunc. What is left to try in NumPy is to do less of that "
             "work: fold the activation quantizer's passes into the max pool that precedes it, "
             "and keep each pass's block in cache by splitting over images as well as channels. "
             "A compiled kernel (im2col fused into the GEMM) would close it, at the cost of the "
             "library's plain-NumPy rule.", ""] + L
    return L


def _main_gap_md(res, missed):
    """For missed main-job targets: the step against its GEMM floor and torch, from this run."""
    keys = {t["key"] for t in missed} & {"main_step", "main_epoch", "main_floor"}
    f = _get(res, "main", "floor")
    if not keys or not f or "mecref_step_ms" not in f:
        return []
    mec, floor = f["mecref_step_ms"], f["floor_ms"]
    line = (f"**Main-job step.** mecref {mec:.1f} ms, of which the GEMMs at their replayed speed "
            f"(the floor, section 1b) are {floor:.1f} ms and everything else {mec - floor:.1f} ms "
            f"({(mec - floor) / floor:.2f} floors)")
    if "torch_step_ms" in f:
        t = f["torch_step_ms"]
        line += (f"; torch's step takes {t:.1f} ms, so reaching it means cutting {max(mec - t, 0):.1f} ms "
                 f"of the {mec - floor:.1f} ms outside the GEMMs")
    layers = _get(res, "step", "variants", "w4a4_lsq", "layers")
    line += (". The profile of section 1b names where: the GEMMs inside `_conv_backward` and "
             "`_conv_forward`, then col2im's `fold`, BatchNorm with the max pool after it (the two "
             "`kernel`s of `mecref/nn/fused.py`, the `einsum` row sums), im2col (`copy_windows`) and "
             "the LSQ quantizers, each a few passes over an activation-sized array.")
    if layers:
        line += " The per-layer table of section 1 (W4A4 LSQ, the same layers) splits it by layer."
    return [line, ""]


def _profiles_md(res, missed):
    L = ["## Where the time goes", ""]
    keys = {t["key"] for t in missed}
    L.append("Missed targets: " + (", ".join(t["target"] for t in missed) if missed else "none") + ".")
    L.append("")
    L += _step_gap_md(res, missed)
    L += _main_gap_md(res, missed)
    step = res.get("step") or {}
    for v in step.get("variants", {}).values():
        if "profile" in v:
            L += [f"cProfile of the mecref {v['label']} training step (top functions by own time):", "",
                  _profile_md(v["profile"], "step"), ""]
            median = v["step"]["mecref"]["median_ms"]
            if v["profile"]["total_ms"] > 3 * median:
                L += [f"_This profile ({v['profile']['total_ms']:.0f} ms/step) was taken during a load "
                      f"spike of the shared machine (the timed median is {median:.0f} ms): read its "
                      "proportions, not its times._", ""]
    for p in (res.get("entropy") or {}).get("profiles", []):
        if ("coding_length" in keys and p["term"] == "coding_length") or \
                ("moe_k4" in keys and p["term"] == "moe_K4") or not missed:
            L += [f"cProfile of mecref {p['term']} at m={p['m']}, d={p['d']} ({p['why']}):", "",
                  _profile_md(p["profile"], "call"), ""]
    return L


def write(doc, json_path=None, out=DOC, img_dir=IMG_DIR):
    """Write the Markdown report and its plot; returns the paths written."""
    out, img_dir = Path(out), Path(img_dir)
    written = []
    png = plot_moe_map(doc, img_dir / SCALING_PNG)
    if png:
        written += [png, write_moe_map_data(doc, img_dir / SCALING_JSON)]
    rel = os.path.relpath(img_dir, out.parent)
    if json_path:
        p = Path(json_path).resolve()
        json_path = os.path.relpath(p, common.REPO) if common.REPO in p.parents else str(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(doc, json_path=json_path, img_rel=rel.replace(os.sep, "/")))
    written.append(out)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results JSON written by `python -m benchmarks --json`")
    p.add_argument("--out", default=str(DOC), help="Markdown file to write (default: docs/benchmarks.md)")
    p.add_argument("--img-dir", default=str(IMG_DIR), help="folder for bench_*.png (default: docs/img)")
    args = p.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    doc["targets"] = targets(doc)
    for path in write(doc, json_path=args.results, out=args.out, img_dir=args.img_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
