"""Benchmark 5: the training step and the entropy terms on a GPU, mecref on CuPy against torch
CUDA; skipped with a message where CuPy or a CUDA device (for either library) is missing.

Every timed callable synchronises its device before it returns, so a median is the time to
finish the work, not to queue it. Same variants, terms and interleaving as the CPU benchmarks.
"""
from __future__ import annotations

import traceback

from . import common
from . import entropy_terms
from . import step as step_bench

GRID_M, GRID_D = (128, 512, 2048), (64, 256, 512)
TERMS = ("coding_length", "mec_exact", "mec_order4", "moe_K4")


def unavailable(torch):
    """Why the GPU benchmark cannot run here, or None when it can."""
    missing = common.mecref_missing("nn", "losses", "optim", "entropy")
    if missing:
        return "mecref modules missing: " + "; ".join(missing)
    from mecref.backend import BackendUnavailableError, get_xp
    try:
        get_xp("cupy")
    except BackendUnavailableError as exc:
        return f"no usable CuPy/CUDA device (mecref.backend.cupy_usable() is False): {exc}"
    if torch is None:
        return common.torch_missing_reason()
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def run(torch, quick=False, log=print):
    why = unavailable(torch)
    if why:
        log(f"GPU benchmark skipped: {why}")
        return dict(skipped=why)
    from mecref.backend import get_xp

    xp = get_xp("cupy")

    def csync():
        xp.cuda.get_current_stream().synchronize()

    def synced(fn, sync):
        def call():
            fn()
            sync()
        return call

    out = dict(device=torch.cuda.get_device_name(0), cupy=xp.__version__, torch_cuda=torch.version.cuda,
               ratio="median over reps of t_mecref / t_torch of the same rep (interleaved A/B)",
               step={}, entropy=[])
    n = 8 if quick else 128
    reps = 3 if quick else 30
    x, y = step_bench.batch(n)
    rows = []
    for variant, spec in step_bench.VARIANTS.items():
        try:
            model, m_fwd, m_step = step_bench.mecref_model(variant, xp.asarray(x), xp.asarray(y),
                                                           backend="cupy")
            _, t_fwd, t_step = step_bench.torch_model(torch, variant, model, x, y, device="cuda")
            fns = dict(mecref_forward=synced(m_fwd, csync), mecref_step=synced(m_step, csync),
                       torch_forward=synced(t_fwd, torch.cuda.synchronize),
                       torch_step=synced(t_step, torch.cuda.synchronize))
            times = common.interleave(fns, reps, warmup=5, lead=0.005)
            rec = dict(label=spec["label"], batch=n)
            for part in ("forward", "step"):
                rec[part] = dict(mecref=common.stats(times[f"mecref_{part}"]),
                                 torch=common.stats(times[f"torch_{part}"]),
                                 ratio=common.paired_ratio(times[f"mecref_{part}"], times[f"torch_{part}"]))
                rows.append(dict(what=f"{spec['label']} {part}", mecref=rec[part]["mecref"]["median_ms"],
                                 torch=rec[part]["torch"]["median_ms"], ratio=rec[part]["ratio"]))
        except Exception:
            rec = dict(label=spec["label"], error=traceback.format_exc(limit=4))
            log(f"  GPU step {spec['label']} failed:\n{rec['error']}")
        out["step"][variant] = rec
    ms, ds = (entropy_terms.QUICK_M, entropy_terms.QUICK_D) if quick else (GRID_M, GRID_D)
    for m in ms:
        for d in ds:
            Z1, Z2 = entropy_terms.features(m, d)
            for term in TERMS:
                rec = dict(term=term, m=m, d=d)
                try:
                    fns = dict(mecref=synced(entropy_terms.mecref_fn(term, xp.asarray(Z1), xp.asarray(Z2)), csync))
                    T1 = torch.tensor(Z1, device="cuda", requires_grad=True)
                    T2 = torch.tensor(Z2, device="cuda", requires_grad=True)
                    fns["torch"] = entropy_terms.torch_fn(torch, term, T1, T2, sync=torch.cuda.synchronize)
                    r = common.auto_reps(fns, 0.2, 3 if quick else 10, 3 if quick else 30)
                    times = common.interleave(fns, r, warmup=3, lead=0.005)
                    rec.update(mecref=common.stats(times["mecref"]), torch=common.stats(times["torch"]),
                               ratio=common.paired_ratio(times["mecref"], times["torch"]))
                    rows.append(dict(what=f"{term} m={m} d={d}", mecref=rec["mecref"]["median_ms"],
                                     torch=rec["torch"]["median_ms"], ratio=rec["ratio"]))
                except Exception:
                    rec["error"] = traceback.format_exc(limit=4)
                    log(f"  GPU {term} m={m} d={d} failed:\n{rec['error']}")
                out["entropy"].append(rec)
    log(common.table(rows, [("what", "what", "s"), ("CuPy ms", "mecref", ".3f"),
                            ("torch CUDA ms", "torch", ".3f"), ("mecref/torch", "ratio", ".2f")],
                     title=f"GPU ({out['device']}): mecref on CuPy vs torch CUDA, medians"))
    return out
