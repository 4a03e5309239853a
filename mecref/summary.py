"""A grid's results, read back from its cached runs: one row per configuration (mean and std
over its seeds), written as ``results.csv`` and ``results.json`` and shown as a Markdown table;
the best setting per MEC-Quant form of a sweep (chosen on validation accuracy) and the sweep's
figure. Used through :mod:`mecref.experiments`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .backend import MecrefError
from .checkpoint import write_atomic
from .gridcache import _read_grid, _write_json_atomic
from .grids import _NEUTRAL, cell_config, form_label, form_spec, group_key

__all__ = ["load_runs", "summarize", "write_results", "markdown_table", "best_row",
           "best_settings", "settings_from_sweep", "plot_sweep"]


_RECORD_FIELDS = {"config": dict, "group": str, "label": str, "bits": str, "seed": int,
                  "status": str}


def load_runs(out_dir) -> list:
    """Every cached run record under ``out_dir/runs``; a file that is unreadable, or not a
    record (a JSON object with ``_RECORD_FIELDS`` of their types), is skipped with a warning
    naming it."""
    import warnings
    runs = []
    for path in sorted(Path(out_dir, "runs").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable run file {str(path)!r} ({exc})", stacklevel=2)
            continue
        bad = ([] if isinstance(rec, dict) else ["a JSON object"]) or [
            f"{k} ({t.__name__})" for k, t in _RECORD_FIELDS.items()
            if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)]
        if bad:
            warnings.warn(f"skipping run file {str(path)!r}: not a run record (expected "
                          f"{', '.join(bad)})", stacklevel=2)
            continue
        runs.append(rec)
    return runs


_ROW_FIELDS = ("quantizer", "w_bits", "a_bits", "first_last_bits", "reg", "reg_weight", "eps",
               "order", "experts", "epochs", "batch_size", "lr", "val_size", "train_limit",
               "dataset", "width", "backend", "pretrain_epochs", "reg_at")


def summarize(out_dir, configs=None) -> list:
    """One row per configuration: mean and std over its seeds.

    Parameters
    ----------
    out_dir : str or Path
        A folder written by :func:`~mecref.gridrun.run_grid`.
    configs : list of dict, optional
        Only these configurations, in this order. Default: every cached run, ordered as in the
        ``grid.json`` (configurations not in it follow, by label).

    Returns
    -------
    list of dict
        Keys: ``label``, ``bits``, the configuration's fields (``quantizer``, ``w_bits``, ...,
        see ``_ROW_FIELDS``), ``n`` (finished seeds), ``n_diverged``, ``seeds``,
        ``test_acc_mean``, ``test_acc_std``, ``val_acc_mean``, ``val_acc_std`` (fractions in
        [0, 1]; std is the sample std, ddof = 1, None for one seed), ``sec_per_epoch``
        (mean over epochs and seeds), ``group``.
    """
    groups: dict = {}
    for rec in load_runs(out_dir):
        groups.setdefault(rec["group"], []).append(rec)
    if configs is not None:
        order = [group_key(cell_config(c, 0)) for c in configs]
    else:
        order = [group_key(c) for c in _read_grid(Path(out_dir, "grid.json"))]
        order += sorted((g for g in groups if g not in order),
                        key=lambda g: (groups[g][0]["bits"], groups[g][0]["label"]))
    return [_row(groups[g]) for g in order if g in groups]


def _row(recs) -> dict:
    recs = sorted(recs, key=lambda r: r["seed"])
    cfg = recs[0]["config"]
    ok = [r for r in recs if r["status"] == "ok"]
    row = dict(label=recs[0]["label"], bits=recs[0]["bits"])
    row.update({k: cfg.get(k, _NEUTRAL.get(k)) for k in _ROW_FIELDS})
    row.update(n=len(ok), n_diverged=len(recs) - len(ok), seeds=[r["seed"] for r in ok])
    for name in ("test_acc", "val_acc"):
        vals = [r[name] for r in ok if r[name] is not None]
        row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(vals)
    secs = [s for r in ok for s in r["seconds_per_epoch"]]
    row["sec_per_epoch"] = float(np.mean(secs)) if secs else None
    row["group"] = recs[0]["group"]
    return row


def _mean_std(vals):
    if not vals:
        return None, None
    a = np.asarray(vals, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


_CSV_COLUMNS = ("label", "bits") + _ROW_FIELDS + (
    "n", "n_diverged", "test_acc_mean", "test_acc_std", "val_acc_mean", "val_acc_std",
    "sec_per_epoch", "group")


def write_results(out_dir, configs=None, stem: str = "results") -> list:
    """Write ``<stem>.csv`` and ``<stem>.json`` (``results.*`` by default) in ``out_dir``;
    return the rows.

    See :func:`summarize` for the rows. The CSV holds one line per configuration (empty fields
    for None, ``width`` as ``16x32x64``); the JSON holds ``{"rows": rows, "written_at": ...}``.
    """
    import csv
    import io
    rows = summarize(out_dir, configs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_CSV_COLUMNS)
    for row in rows:
        w.writerow([_csv_cell(row[c]) for c in _CSV_COLUMNS])
    _write_text_atomic(Path(out_dir, f"{stem}.csv"), buf.getvalue())
    _write_json_atomic(Path(out_dir, f"{stem}.json"),
                       dict(rows=rows, written_at=time.strftime("%Y-%m-%dT%H:%M:%S")))
    return rows


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    return repr(v) if isinstance(v, float) else v


def _write_text_atomic(path: Path, text: str):
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def _pct(mean, std):
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


_VARYING = ("reg_weight", "eps", "order", "experts", "epochs", "pretrain_epochs", "dataset",
            "train_limit")


def markdown_table(rows) -> str:
    """A Markdown table of summary rows: accuracies in percent as ``mean ± std`` over seeds.

    Columns: bits, method, any of ``reg_weight, eps, order, experts, epochs, dataset,
    train_limit`` that differ between rows (a regulariser's settings only where they act:
    ``-`` elsewhere), test accuracy, validation accuracy (when any row has one), seeds (``n``,
    plus ``+k diverged``), seconds per epoch. A single seed shows the mean alone (no std).
    """
    rows = list(rows)
    if not rows:
        return "(no finished runs)"
    extra = [k for k in _VARYING if len({json.dumps(_shown(r, k)) for r in rows}) > 1]
    has_val = any(r["val_acc_mean"] is not None for r in rows)
    head = ["bits", "method"] + extra + ["test acc (%)"] + (["val acc (%)"] if has_val else []) \
        + ["seeds", "s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(
        "---" if i < 2 + len(extra) else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        cells = [r["bits"], r["label"]] + [_fmt(_shown(r, k)) for k in extra]
        cells.append(_pct(r["test_acc_mean"], r["test_acc_std"]))
        if has_val:
            cells.append(_pct(r["val_acc_mean"], r["val_acc_std"]))
        cells.append(str(r["n"]) + (f" (+{r['n_diverged']} diverged)" if r["n_diverged"] else ""))
        cells.append("-" if r["sec_per_epoch"] is None else f"{r['sec_per_epoch']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown(row, key):
    """A row's value of ``key``, or None where the setting does not act (no regulariser)."""
    from . import regularizers
    if key in ("reg_weight", "eps"):
        return row[key] if row["reg"] is not None else None
    if key in ("order", "experts"):
        acts = row["reg"] is not None and key in regularizers.get(row["reg"]).params
        return row[key] if acts else None
    return row.get(key, _NEUTRAL.get(key))  # rows written before the field existed


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
# A sweep's best settings, and its figure
# ----------------------------------------------------------------------------------------------

def best_row(rows, metric: str = "val_acc_mean", form=None):
    """The summary row with the highest ``metric`` (validation accuracy by default).

    ``form`` restricts the choice to one form (a label such as ``"MOE K=4"``, or a regulariser
    name such as ``"mec"``). Raises MecrefError when no row has the metric.
    """
    def matches(r):
        if form is None:
            return True
        return r["reg"] is not None and (r["reg"] == form or form_label(r) == form)
    cand = [r for r in rows if r.get(metric) is not None and matches(r)]
    if not cand:
        raise MecrefError(f"no summary row has {metric!r}" + (f" for form {form!r}" if form else ""))
    return max(cand, key=lambda r: r[metric])


def best_settings(rows, metric: str = "val_acc_mean") -> dict:
    """Per form (label), the settings of the sweep row with the best validation accuracy.

    Returns ``{label: {"reg", "reg_weight", "eps", <the form's parameters>}}`` for each form
    that has rows with ``metric``: the ``settings`` argument of :func:`~mecref.grids.main_grid`.
    """
    out = {}
    for r in rows:
        if r["reg"] is None or r.get(metric) is None:
            continue
        label = form_label(r)
        if label not in out or r[metric] > out[label][1]:
            out[label] = (form_spec(r), r[metric])
    if not out:
        raise MecrefError(f"no regularised sweep row has {metric!r}: is this a sweep folder "
                          "(val_size > 0)?")
    return {k: v[0] for k, v in out.items()}


def settings_from_sweep(sweep_dir, settings=None) -> dict:
    """:func:`best_settings` of a sweep folder, with the entries of ``settings`` (if any)
    taking precedence, key by key within each form."""
    if not Path(sweep_dir, "runs").is_dir():
        raise MecrefError(f"sweep_dir {str(sweep_dir)!r} holds no sweep (no runs/ folder): give "
                          f"the --out folder of `mecref sweep`")
    best = best_settings(summarize(sweep_dir))
    for form, values in (settings or {}).items():
        if not isinstance(values, dict):
            raise MecrefError(f"settings[{form!r}] must be an object of TrainConfig fields "
                              f"(e.g. {{\"eps\": 0.5}}), got {values!r}")
        best[form] = dict(best.get(form, {}), **values)
    return best


def plot_sweep(rows, path, metric: str = "val_acc_mean"):
    """The strength figure: validation accuracy against eps, one line per form, one panel
    per reg_weight; the LSQ baseline (no regulariser) as a band (mean +- std over seeds).
    Error bars: std over seeds (none for one seed).

    Returns
    -------
    Path of the written image (format from the suffix, e.g. ``.png``).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator
    rows = [r for r in rows if r.get(metric) is not None]
    base = [r for r in rows if r["reg"] is None]
    std_key = metric.replace("_mean", "_std")
    betas = sorted({r["reg_weight"] for r in rows if r["reg"] is not None})
    if not betas:
        raise MecrefError(f"plot_sweep: no regularised row has {metric!r} to plot")
    fig = Figure(figsize=(4.6 * len(betas), 4.0), layout="constrained")
    axes = fig.subplots(1, len(betas), squeeze=False, sharey=True).ravel()
    forms = []
    for r in rows:
        if r["reg"] is not None and form_label(r) not in forms:
            forms.append(form_label(r))
    eps_all = sorted({r["eps"] for r in rows if r["reg"] is not None})
    for ax, beta in zip(axes, betas):
        for form in forms:
            line = sorted((r for r in rows if r["reg"] is not None and r["reg_weight"] == beta
                           and form_label(r) == form), key=lambda r: r["eps"])
            if line:
                ax.errorbar([r["eps"] for r in line], [100 * r[metric] for r in line],
                            yerr=[100 * (r.get(std_key) or 0.0) for r in line], marker="o",
                            capsize=3, label=form)
        for r in base:
            m, sd = 100 * r[metric], 100 * (r.get(std_key) or 0.0)
            ax.axhspan(m - sd, m + sd, color="0.85", zorder=0)
            ax.axhline(m, color="0.4", ls="--", label=f"{r['label']} (no regulariser)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(eps_all))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{e:g}" for e in eps_all])
        ax.set_xlabel("eps (distortion; strength d/eps² falls to the right)")
        ax.set_title(f"beta = {beta:g}, {rows[0]['bits']}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(("validation" if metric.startswith("val") else "test") + " accuracy (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
