"""The fair test of MEC-Quant: every form at matched strength, the standard QAT protocol,
paired seeds (docs/results.md is written from this module's outputs).

Stages, each a grid of :func:`mecref.experiments.run_grid` cells, cached under ``out/bundled``
(the first two) and ``out/full`` (the others), so the stages of one data setting share their
FP32 pretrainings (a rerun trains nothing that is cached; an interrupted study resumes). Each
stage writes ``<stage>.csv`` and ``<stage>.json`` (its summary rows) in its folder:

1. ``lr``: the QAT learning rate, chosen once for every method on the bundled validation split
   (LSQ at W2A2, from an FP32 pretraining of the same seed).
2. ``strength``: every form (exact, Taylor n=4, MOE K = 2, 4, 8) over ONE grid of eps x beta on
   the bundled validation split (:func:`mecref.experiments.sweep_grid`); each form's best
   setting by validation accuracy. ``control``: the mixture's objective with one expert
   (K = 1) on the same grid, the MOE diagnosis's control.
3. ``headline``: the full Fashion-MNIST (55,000 train / 5,000 validation / 10,000 test), the
   standard protocol (FP32 pretraining per seed, then every method from it), FP32, STE,
   DoReFa+PACT, LSQ, LSQ+ and every form at its validated setting, W2A2 then W4A4, 5 seeds.
4. ``placement``: the regulariser also on the inner blocks' pooled outputs (``reg_at="blocks"``)
   for the best form, W2A2, the same seeds.

``python -m mecref study --out runs/study`` runs them in order (``--stages`` picks some).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .backend import MecrefError
from .experiments import (_write_json_atomic, best_settings, main_grid, run_grid, summarize,
                          sweep_grid, write_results)

__all__ = ["PROTOCOL", "LR_GRID", "SEEDS", "STAGES", "lr_grid", "strength_grid", "headline_grid",
           "placement_grid", "chosen_lr", "chosen_settings", "run_study"]

# The budget every method gets, in both data settings: FP32 pretraining, then QAT.
PROTOCOL = dict(pretrain_epochs=6, epochs=3)
LR_GRID = (0.01, 0.03, 0.1)
SEEDS = (0, 1, 2, 3, 4)
SWEEP_SEEDS = (0,)
BUNDLED = dict(dataset="bundled", val_size=2000)
FULL = dict(dataset="fashion-mnist", val_size=5000)
HEADLINE_BITS = ((2, 2), (4, 4))
STAGES = ("lr", "strength", "control", "headline", "placement")
STAGE_DIR = dict(lr="bundled", strength="bundled", control="bundled", headline="full",
                 placement="full")
# The MOE diagnosis's control: one expert (m_k = m = 128 > d = 64), the same objective as the
# mixture form (each view's own coding length, no alignment of the two views) on the whole batch
CONTROL_FORMS = ({"reg": "moe", "experts": 1},)


def lr_grid() -> list:
    """LSQ W2A2 on the bundled validation split at each QAT learning rate of LR_GRID."""
    return [dict(BUNDLED, **PROTOCOL, quantizer="lsq", w_bits=2, a_bits=2, reg=None, lr=lr)
            for lr in LR_GRID]


def chosen_lr(out) -> float:
    """The learning rate of the ``lr`` stage's row with the best validation accuracy."""
    rows = [r for r in summarize(Path(out, "bundled"), lr_grid()) if r["val_acc_mean"] is not None]
    if not rows:
        raise MecrefError(f"no finished run in {Path(out, 'bundled')}: run the 'lr' stage first")
    return float(max(rows, key=lambda r: r["val_acc_mean"])["lr"])


def strength_grid(lr: float) -> list:
    """Every form over the same eps x beta grid, bundled validation split, W2A2."""
    return sweep_grid(**BUNDLED, **PROTOCOL, lr=lr)


CONTROL_BETAS, CONTROL_EPS = (0.2, 1.0), (1.0, 2.0, 4.0, 8.0)


def control_grid(lr: float) -> list:
    """MOE with K = 1, the mixture's objective without the experts, on the part of the
    strength grid where the mixture forms collapsed (beta 0.2 and 1, eps 1 to 8)."""
    return sweep_grid(forms=CONTROL_FORMS, reg_weights=CONTROL_BETAS, eps_values=CONTROL_EPS,
                      **BUNDLED, **PROTOCOL, lr=lr)


def chosen_settings(out, lr: float) -> dict:
    """Each form's setting with the best validation accuracy in the ``strength`` stage."""
    return best_settings(summarize(Path(out, "bundled"), strength_grid(lr)))


def headline_grid(lr: float, settings: dict, bits=HEADLINE_BITS) -> list:
    """FP32, the four baselines and every form at its validated setting, full data; in the
    order they are run: LSQ and the forms first (the comparison the study is for), then
    FP32 and the other baselines."""
    configs = main_grid(bits=bits, settings=settings, lr=lr, **FULL, **PROTOCOL)
    first = [c for c in configs if c["quantizer"] == "lsq"]
    return first + [c for c in configs if c["quantizer"] != "lsq"]


def placement_grid(lr: float, settings: dict, form: str) -> list:
    """``form`` at its validated setting with ``reg_at="blocks"``, W2A2, full data."""
    if form not in settings:
        raise MecrefError(f"form {form!r} has no validated setting; known: {sorted(settings)}")
    return [dict(FULL, **PROTOCOL, lr=lr, quantizer="lsq", w_bits=2, a_bits=2,
                 **dict(settings[form], reg_at="blocks"))]


def run_study(out, stages=STAGES, workers: int = 2, progress=True, placement_form=None) -> dict:
    """Run (or resume) the study's stages in order; returns what each chose or wrote."""
    out = Path(out)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise MecrefError(f"stages must be among {STAGES}, got {unknown}")
    done = {}

    def grid(stage, configs, seeds):
        t0 = time.time()
        folder = out / STAGE_DIR[stage]
        run_grid(configs, list(seeds), folder, workers=workers, progress=progress)
        rows = write_results(folder, configs, stem=stage)
        _log(out, stage, dict(cells=len(configs) * len(seeds), wall_s=time.time() - t0))
        return rows

    if "lr" in stages:
        grid("lr", lr_grid(), SWEEP_SEEDS)
    lr = chosen_lr(out)
    done["lr"] = lr
    if "strength" in stages:
        grid("strength", strength_grid(lr), SWEEP_SEEDS)
    if "control" in stages:
        grid("control", control_grid(lr), SWEEP_SEEDS)
    if not {"headline", "placement"} & set(stages):
        return done
    settings = chosen_settings(out, lr)
    done["settings"] = settings
    _write_json_atomic(out / "chosen.json", dict(lr=lr, settings=settings))
    # W2A2 first (the claim's hardest case): LSQ, the forms and FP32; then the placement
    # ablation; then W2A2's other baselines; then W4A4 in the same order
    for i, bits in enumerate(HEADLINE_BITS):
        configs = headline_grid(lr, settings, bits=[bits])
        core = [c for c in configs if c["quantizer"] in ("lsq", "fp32")]
        if "headline" in stages:
            grid("headline", core, SEEDS)
            write_results(out / "full", headline_grid(lr, settings), stem="headline")
        if i == 0 and "placement" in stages:
            form = placement_form or "Taylor n=4"
            grid("placement", placement_grid(lr, settings, form), SEEDS)
        if "headline" in stages:
            grid("headline", configs, SEEDS)
            write_results(out / "full", headline_grid(lr, settings), stem="headline")
    return done


def _log(out, stage, info):
    """Append the stage's wall time and machine to ``out/timings.json``."""
    from .backend import cpu_model
    path = out / "timings.json"
    log = json.loads(path.read_text()) if path.is_file() else []
    log.append(dict(info, stage=stage, cpu=cpu_model(),
                    finished_at=time.strftime("%Y-%m-%dT%H:%M:%S")))
    _write_json_atomic(path, log)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m mecref.study", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--placement-form", default=None)
    a = p.parse_args(argv)
    done = run_study(a.out, a.stages, a.workers, placement_form=a.placement_form)
    print(json.dumps(done, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------
# The MOE diagnosis: does the mixture form hurt where an expert holds no more rows than d?
# ----------------------------------------------------------------------------------------------

def expert_cosines(Z, y, experts: int, batch_size: int = 128, seed: int = 0) -> dict:
    """Mean |cos| between rows of the same class, and of different classes, that share an
    expert, as the hard norm gate routes them in training batches (derivations E5).

    The rows are shuffled (``seed``) into batches of ``batch_size`` (the training batch of one
    view); in each batch the samples are ranked by their norm and expert k takes the ranks
    ``floor(j K / m) == k``. Pairs are counted inside each (batch, expert).

    Returns
    -------
    dict: ``same_class`` and ``other_class`` mean |cos| (None where no such pair exists),
    ``rows_per_expert`` (m / K)
    """
    Z = np.asarray(Z, dtype=np.float64)
    y = np.asarray(y)
    order = np.random.default_rng(seed).permutation(len(Z))
    same, other = [], []
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        Zb, yb = Z[idx], y[idx]
        rank = np.argsort(np.argsort(np.linalg.norm(Zb, axis=1), kind="stable"), kind="stable")
        gate = (rank * experts) // batch_size
        U = Zb / np.maximum(np.linalg.norm(Zb, axis=1, keepdims=True), 1e-300)
        for k in range(experts):
            sel = gate == k
            C = np.abs(U[sel] @ U[sel].T)
            eq = yb[sel][:, None] == yb[sel][None, :]
            off = ~np.eye(int(sel.sum()), dtype=bool)
            same.extend(C[eq & off].tolist())
            other.extend(C[~eq].tolist())
    return dict(same_class=float(np.mean(same)) if same else None,
                other_class=float(np.mean(other)) if other else None,
                rows_per_expert=batch_size / experts)


def moe_diagnosis(out, lr: float | None = None, n_samples: int = 2000) -> list:
    """For every cell of the ``strength`` stage: validation accuracy and, on its validation
    images, the features' effective rank, class separation (between / within spread) and the
    mean |cos| of same-class and other-class rows inside an expert of K = 2, 4, 8 (every
    form is measured under each K, so LSQ and the exact form give the reference values).
    Writes ``out/moe_diagnosis.json``; returns the rows."""
    from . import data as mdata
    from .diagnostics import collect_features, effective_rank, per_class_spread
    from .experiments import cell_key, form_label, load_runs, model_from_checkpoint
    out = Path(out)
    lr = chosen_lr(out) if lr is None else lr
    wanted = {cell_key(c, seed) for c in strength_grid(lr) + control_grid(lr)
              for seed in SWEEP_SEEDS}
    rows, cache = [], {}
    for rec in load_runs(out / "bundled"):
        cfg = rec["config"]
        if rec["status"] != "ok" or rec["key"] not in wanted:
            continue
        key = (cfg["dataset"], cfg["val_size"], cfg["seed"])
        if key not in cache:
            ds = mdata.load_dataset(cfg["dataset"], data_dir=cfg["data_dir"])
            _, (xv, yv) = mdata.train_val_split(ds, cfg["val_size"], seed=cfg["seed"])
            cache[key] = (xv[:n_samples], yv[:n_samples])
        xv, yv = cache[key]
        model, _ = model_from_checkpoint(out / "bundled" / rec["checkpoint"])
        Z, pred = collect_features(model, xv, yv)
        keep = np.sum(Z * Z, axis=1) > 0
        spread = per_class_spread(Z[keep], yv[keep])
        row = dict(form="LSQ" if cfg["reg"] is None else form_label(cfg), reg=cfg["reg"],
                   experts=cfg["experts"] if cfg["reg"] == "moe" else None,
                   reg_weight=cfg["reg_weight"] if cfg["reg"] else None,
                   eps=cfg["eps"] if cfg["reg"] else None, seed=cfg["seed"],
                   val_acc=rec["val_acc"], accuracy=float(np.mean(pred == yv)),
                   effective_rank=effective_rank(Z[keep]), separation=spread["ratio"],
                   dead_rows=int(np.sum(~keep)))
        for k in (2, 4, 8):
            cos = expert_cosines(Z[keep], yv[keep], k)
            row[f"same_cos_K{k}"], row[f"other_cos_K{k}"] = cos["same_class"], cos["other_class"]
        rows.append(row)
    rows.sort(key=lambda r: (r["form"], r["reg_weight"] or 0, r["eps"] or 0))
    _write_json_atomic(out / "moe_diagnosis.json", dict(rows=rows, n_samples=n_samples))
    return rows


def plot_moe_diagnosis(rows, path, beta: float):
    """Four panels against eps at one beta: validation accuracy, same-class |cos| inside the
    form's own experts (K of the form; K = 4 for the others), effective rank, class
    separation; a line per form, LSQ as a dashed line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator
    sub = [r for r in rows if r["reg_weight"] == beta or r["reg"] is None]
    order = ["exact", "Taylor n=4", "MOE K=2", "MOE K=4", "MOE K=8", "MOE K=1"]
    forms = sorted((f for f in dict.fromkeys(r["form"] for r in sub) if f != "LSQ"),
                   key=lambda f: order.index(f) if f in order else len(order))
    color = {f: f"C{order.index(f)}" if f in order else None for f in forms}
    base = [r for r in sub if r["reg"] is None]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 4)
    panels = [("val_acc", "validation accuracy (%)", 100.0),
              ("same_cos", "same-class |cos| inside an expert", 1.0),
              ("effective_rank", "effective rank of the features", 1.0),
              ("separation", "class separation (between / within)", 1.0)]
    eps_all = sorted({r["eps"] for r in sub if r["eps"] is not None})

    def value(r, key):
        if key == "same_cos":
            k = r["experts"] if r["experts"] and r["experts"] > 1 else 4
            return r[f"same_cos_K{k}"]
        return r[key]

    for ax, (key, title, scale) in zip(axes, panels):
        for form in forms:
            line = sorted((r for r in sub if r["form"] == form), key=lambda r: r["eps"])
            ax.plot([r["eps"] for r in line], [scale * value(r, key) for r in line], marker="o",
                    label=form + (" (control)" if form == "MOE K=1" else ""), ms=4,
                    color=color[form], ls="--" if form == "MOE K=1" else "-")
        for r in base:
            ax.axhline(scale * value(r, key), color="0.4", ls="--", label="LSQ (no regulariser)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(eps_all))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{e:g}" for e in eps_all])
        ax.set_xlabel("eps")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MOE diagnosis, W2A2, bundled validation split, beta = {beta:g} "
                 f"(batch m = 128 per view, d = 64: m/K = 64, 32, 16 rows per expert)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
