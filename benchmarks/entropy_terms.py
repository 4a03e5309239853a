"""Benchmark 2: the entropy terms, value + gradient, mecref (closed form) against torch autograd
of the same formula; and the MOE speed-up over the exact coding length as m grows.

Terms (docs/derivations.md E1-E5), each timed as forward + backward on float32 features
``Z`` (m, d), rows l2-normalised inside:

- ``coding_length``: ``mu logdet(I + lam Z Z^T)``, Cholesky on the smaller side;
- ``mec_exact``: ``-mu logdet(I + lam Z1 Z2^T)``, LU on the smaller side (two views);
- ``mec_order4``: its order-4 Taylor form;
- ``moe_K{1,2,4,8}``: the mixture-of-experts coding length, hard routing by row norm.

eps = 0.5 (the training default) except for the Taylor form, which uses eps = sqrt(2 d) so
that lam m = 1/2 and the series converges (its cost does not depend on eps). The two views
are ``Z2 = Z1 + 0.1 noise``, as two augmentations of one batch would be.
"""
from __future__ import annotations

import math

import numpy as np

from . import common
from . import torch_ref

EPS = 0.5
GRID_M, GRID_D = (128, 512, 2048), (64, 256, 512)
QUICK_M, QUICK_D = (16, 32), (8, 24)
EXPERTS = (1, 2, 4, 8)
# the MOE speed map: exact coding length against MOE over this grid (docs/benchmarks.md)
SCALING_M, SCALING_D, SCALING_K = (128, 512, 2048, 8192), (64, 256, 1024), (2, 4, 8)
QUICK_SCALING_M, QUICK_SCALING_D = (16, 32), (8, 24)
TERMS = ("coding_length", "mec_exact", "mec_order4") + tuple(f"moe_K{k}" for k in EXPERTS)


def features(m, d, seed=0):
    """Two views (m, d) float32 of one batch: Z2 = Z1 + 0.1 noise; row norms vary (heavy tail)."""
    rng = np.random.default_rng(seed)
    Z1 = rng.standard_normal((m, d)) * rng.lognormal(0.0, 0.5, (m, 1))
    Z2 = Z1 + 0.1 * rng.standard_normal((m, d)) * np.abs(Z1).mean()
    return Z1.astype(np.float32), Z2.astype(np.float32)


def term_eps(term, d):
    return math.sqrt(2 * d) if term == "mec_order4" else EPS


def mecref_fn(term, Z1, Z2):
    """A callable computing mecref's value and closed-form gradient of one term."""
    from mecref import entropy as E

    eps = term_eps(term, Z1.shape[1])
    if term == "coding_length":
        return lambda: E.coding_length_backward(E.coding_length(Z1, eps)[1])
    if term.startswith("mec_"):
        order = None if term == "mec_exact" else 4
        return lambda: E.mec_loss_backward(E.mec_loss(Z1, Z2, eps, order=order)[1])
    K = int(term.split("K")[1])
    return lambda: E.moe_coding_length_backward(E.moe_coding_length(Z1, eps, experts=K)[1])


def torch_value(torch, term, T1, T2):
    eps = term_eps(term, T1.shape[1])
    if term == "coding_length":
        return torch_ref.coding_length(torch, T1, eps)
    if term.startswith("mec_"):
        return torch_ref.mec_loss(torch, T1, T2, eps, None if term == "mec_exact" else 4)
    return torch_ref.moe_coding_length(torch, T1, eps, int(term.split("K")[1]))


def torch_fn(torch, term, T1, T2, sync=None):
    """A callable computing torch's value and autograd gradient(s) of one term."""
    leaves = [T1, T2] if term.startswith("mec_") else [T1]

    def fn():
        L = torch_value(torch, term, T1, T2)
        torch.autograd.grad(L, leaves)
        if sync is not None:
            sync()
    return fn


def agreement(torch, term, Z1, Z2):
    """Relative differences of value and gradient, mecref vs torch, in float32."""
    from mecref import entropy as E
    from mecref.backend import to_host

    eps = term_eps(term, Z1.shape[1])
    if term == "coding_length":
        L, c = E.coding_length(Z1, eps)
        g = E.coding_length_backward(c)
    elif term.startswith("mec_"):
        L, c = E.mec_loss(Z1, Z2, eps, order=None if term == "mec_exact" else 4)
        g = E.mec_loss_backward(c)[0]
    else:
        L, c = E.moe_coding_length(Z1, eps, experts=int(term.split("K")[1]))
        g = E.moe_coding_length_backward(c)[0]
    T1 = torch.tensor(to_host(Z1), requires_grad=True)
    T2 = torch.tensor(to_host(Z2), requires_grad=True)
    Lt = torch_value(torch, term, T1, T2)
    (gt,) = torch.autograd.grad(Lt, [T1])
    g, gt = to_host(g), gt.numpy()
    return dict(value_rel_diff=abs(float(L) - float(Lt.detach())) / max(abs(float(Lt.detach())), 1e-30),
                grad_rel_diff=float(np.linalg.norm(g - gt) / max(np.linalg.norm(gt), 1e-30)))


def run(torch, quick=False, lead=0.01, log=print):
    missing = common.mecref_missing("entropy")
    if missing:
        return dict(skipped="mecref modules missing: " + "; ".join(missing))
    ms, ds = (QUICK_M, QUICK_D) if quick else (GRID_M, GRID_D)
    budget, lo, hi = (0.01, 3, 3) if quick else (0.4, 10, 30)
    lead = min(lead, 0.001) if quick else lead
    out = dict(eps=EPS, eps_note="eps = sqrt(2 d) for mec_order4 (lam m = 1/2: the series converges)",
               dtype="float32", lead_s=lead, grid=[], scaling=None,
               ratio="median over reps of t_mecref / t_torch of the same rep (interleaved A/B)",
               timed="value + gradient (mecref: forward + closed-form backward; torch: forward + "
                     "torch.autograd.grad)")
    if torch is None:
        out["torch"] = common.torch_missing_reason()
    rows = []
    for m in ms:
        for d in ds:
            Z1, Z2 = features(m, d)
            for term in TERMS:
                if term.startswith("moe_K") and int(term.split("K")[1]) > m:
                    continue
                fns = {"mecref": mecref_fn(term, Z1, Z2)}
                rec = dict(term=term, m=m, d=d)
                if torch is not None:
                    T1 = torch.tensor(Z1, requires_grad=True)
                    T2 = torch.tensor(Z2, requires_grad=True)
                    fns["torch"] = torch_fn(torch, term, T1, T2)
                    rec["check"] = agreement(torch, term, Z1, Z2)
                reps = common.auto_reps(fns, budget, lo, hi)
                times = common.interleave(fns, reps, warmup=2, lead=lead)
                rec["mecref"] = common.stats(times["mecref"])
                if torch is not None:
                    rec["torch"] = common.stats(times["torch"])
                    rec["ratio"] = common.paired_ratio(times["mecref"], times["torch"])
                    rec["speedup"] = 1.0 / rec["ratio"]
                out["grid"].append(rec)
                rows.append(dict(term=term, m=m, d=d, mecref=rec["mecref"]["median_ms"],
                                 torch=rec.get("torch", {}).get("median_ms"), ratio=rec.get("ratio"),
                                 check=(f"{rec['check']['grad_rel_diff']:.0e}" if "check" in rec else None)))
    log(common.table(rows, [("term", "term", "s"), ("m", "m", "d"), ("d", "d", "d"),
                            ("mecref ms", "mecref", ".3f"), ("torch ms", "torch", ".3f"),
                            ("mecref/torch", "ratio", ".2f"), ("grad rel diff", "check", "s")],
                     title="entropy terms, value + gradient, float32, medians of interleaved reps"))
    if torch is not None:
        from . import blas_timeout
        out["blas_timeout_default"] = blas_timeout.measure("coding_length", quick, log)
    out["profiles"] = profiles(out, quick, log)
    out["scaling"] = scaling(quick, lead, log)
    return out


def profiles(out, quick, log=print):
    """cProfile of mecref where the targets are hardest: the coding length at the (m, d) with
    the worst ratio to torch, and MOE K=4 at the largest m and d of the grid."""
    calls = 3 if quick else 30
    cases = []
    cl = [r for r in out["grid"] if r["term"] == "coding_length"]
    if cl and "ratio" in cl[0]:
        worst = max(cl, key=lambda r: r["ratio"])
        cases.append(("coding_length", worst["m"], worst["d"], "coding length, worst ratio to torch"))
    m, d = max(r["m"] for r in out["grid"]), max(r["d"] for r in out["grid"])
    cases.append(("moe_K4", m, d, "MOE K=4 at the largest m, d"))
    res = []
    for term, m, d, why in cases:
        Z1, Z2 = features(m, d)
        prof = common.profile(mecref_fn(term, Z1, Z2), calls)
        res.append(dict(term=term, m=m, d=d, why=why, profile=prof))
        log(f"  cProfile of mecref {term} (m={m}, d={d}; {why}), top {len(prof['top'])} by own time:")
        log("    " + common.profile_text(prof).replace("\n", "\n    "))
    return res


def scaling(quick=False, lead=0.01, log=print):
    """mecref's MOE (K experts) against its exact coding length, value + gradient, over m and d
    (the speed map). Reps fill a time budget per point: 3 at the largest sizes (a pass over
    exact + three MOEs takes about a second at m = 8192, d = 1024), up to 25 at the smallest."""
    ms, ds = (QUICK_SCALING_M, QUICK_SCALING_D) if quick else (SCALING_M, SCALING_D)
    budget, lo, hi = (0.01, 3, 3) if quick else (0.4, 3, 25)
    lead = min(lead, 0.001) if quick else lead
    rows, recs = [], []
    for d in ds:
        for m in ms:
            Z1, Z2 = features(m, d)
            fns = {"exact": mecref_fn("coding_length", Z1, Z2)}
            for K in SCALING_K:
                if K <= m:
                    fns[f"moe_K{K}"] = mecref_fn(f"moe_K{K}", Z1, Z2)
            reps = common.auto_reps(fns, budget, lo, hi)
            times = common.interleave(fns, reps, warmup=1, lead=lead)
            rec = dict(m=m, d=d, exact=common.stats(times["exact"]), moe={}, speedup={})
            row = dict(m=m, d=d, exact=rec["exact"]["median_ms"])
            for name in fns:
                if name == "exact":
                    continue
                rec["moe"][name] = common.stats(times[name])
                rec["speedup"][name] = common.paired_ratio(times["exact"], times[name])
                row[name] = rec["speedup"][name]
            recs.append(rec)
            rows.append(row)
    cols = [("d", "d", "d"), ("m", "m", "d"), ("exact ms", "exact", ".3f")]
    cols += [(f"K={K} speed-up", f"moe_K{K}", ".2f") for K in SCALING_K]
    log(common.table(rows, cols, title="MOE speed-up over the exact coding length (mecref, value + "
                                       "gradient): t_exact / t_moe, median of paired reps"))
    return dict(ms=list(ms), ds=list(ds), experts=list(SCALING_K), points=recs,
                speedup="median over reps of t_exact / t_moe of the same rep")
