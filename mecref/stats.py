"""Paired comparisons over seeds: differences, confidence intervals, p-values, a forest plot.

Two methods run with the same seed share the FP32 pretraining, the initialisation of every
other parameter and the data order (the standard protocol of :mod:`mecref.study`), so their
accuracies are compared seed by seed: d_s = acc_A(s) - acc_B(s). With n seeds,

    mean  d = (1/n) sum_s d_s,     sd = sqrt(sum_s (d_s - d)^2 / (n - 1)),    se = sd / sqrt(n)
    t interval:   d +- t_{n-1, (1+c)/2} se                  (Student, c = 0.95)
    p-value:      2 P(T_{n-1} > |d / se|)                    (the paired t-test)
    bootstrap:    scipy.stats.bootstrap of the mean of the d_s (percentile interval)

(derivations S1). The t interval assumes roughly normal differences; the bootstrap does not,
but with 5 seeds it is coarse (it can never be wider than the range of the d_s). Both are
reported; a claim of an effect needs the t interval to exclude zero.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import MecrefError

__all__ = ["paired", "paired_summary", "plot_forest"]


def paired(a: dict, b: dict) -> tuple:
    """Align two ``{seed: value}`` maps on their common seeds: ``(seeds, a_values, b_values)``.

    Raises MecrefError when they share fewer than 2 seeds.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise MecrefError(f"a paired comparison needs at least 2 common seeds, got {seeds} "
                          f"(seeds of A: {sorted(a)}, of B: {sorted(b)})")
    return seeds, np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)


def paired_summary(diffs, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Mean, standard deviation, t interval, bootstrap interval and paired t-test p-value of
    per-seed differences (see the module docstring).

    Parameters
    ----------
    diffs : 1-D array-like of at least 2 finite floats
    confidence : float in (0, 1)
    n_resamples, seed : the bootstrap's resamples and its random seed (reproducible)

    Returns
    -------
    dict with ``n, mean, sd, se, t_low, t_high, boot_low, boot_high, p``
    """
    from scipy import stats
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size < 2 or not np.isfinite(d).all():
        raise MecrefError(f"diffs must be a 1-D array of at least 2 finite values, got {diffs!r}")
    if not 0.0 < confidence < 1.0:
        raise MecrefError(f"confidence must be in (0, 1), got {confidence!r}")
    n = d.size
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    q = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    if se > 0:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    else:  # every seed gave the same difference
        p = 1.0 if mean == 0 else 0.0
    if sd > 0:
        boot = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                               method="percentile", random_state=np.random.default_rng(seed))
        blo, bhi = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    else:
        blo = bhi = mean
    return dict(n=n, mean=mean, sd=sd, se=se, t_low=mean - q * se, t_high=mean + q * se,
                boot_low=blo, boot_high=bhi, p=p)


def plot_forest(entries, path, title: str = "", xlabel: str = "difference (points)"):
    """A forest plot: one row per comparison, its mean difference and 95 % t interval
    (bar), the bootstrap interval (thin bar) and the per-seed differences (dots); a line at 0.

    ``entries``: list of dicts with ``label``, ``mean``, ``t_low``, ``t_high``, ``boot_low``,
    ``boot_high`` and ``diffs`` (the per-seed values), in points; the first is drawn at the top.
    Returns the written path.
    """
    from pathlib import Path

    from matplotlib.figure import Figure
    if not entries:
        raise MecrefError("plot_forest: no entries to draw")
    n = len(entries)
    fig = Figure(figsize=(7.5, 0.45 * n + 1.4), layout="constrained")
    ax = fig.subplots()
    for i, e in enumerate(entries):
        y = n - 1 - i
        excl = e["t_low"] > 0 or e["t_high"] < 0
        color = "C3" if excl else "C0"
        ax.plot([e["boot_low"], e["boot_high"]], [y - 0.18] * 2, color="0.55", lw=1.2,
                label="bootstrap 95 % interval" if i == 0 else None)
        ax.plot([e["t_low"], e["t_high"]], [y, y], color=color, lw=2.6,
                label="t 95 % interval" if i == 0 else None)
        ax.plot(e["mean"], y, "D", color=color, ms=6, label="mean over seeds" if i == 0 else None)
        ax.plot(e["diffs"], [y + 0.2] * len(e["diffs"]), ".", color="0.3", ms=4,
                label="one seed" if i == 0 else None)
    ax.axvline(0.0, color="0.2", lw=0.8)
    ax.set_yticks(range(n))
    ax.set_yticklabels([e["label"] for e in reversed(entries)], fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
