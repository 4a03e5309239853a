"""Experiment grids: run many (config, seed) cells, cache each finished run, summarise.

A *cell* is one :class:`mecref.train.TrainConfig` (given as a dict of the fields that differ
from the defaults) and one seed. ::

    configs = main_grid(epochs=6)                      # FP32, STE, DoReFa+PACT, LSQ, LSQ+,
    records = run_grid(configs, [0, 1, 2], "runs/main")  # MEC-Quant (exact, Taylor, MOE)
    rows = write_results("runs/main")                  # results.csv + results.json
    print(markdown_table(rows))

Caching and resuming
--------------------
Each finished cell is written to ``out_dir/runs/<key>.json`` (temporary file + ``os.replace``,
so a file is either complete or absent). ``key`` is the first 16 hex digits of the SHA-256 of
the cell's *full* configuration (every TrainConfig field after defaults and validation, the
seed included) as canonical JSON: spelling a default out, or a tuple as a list, gives the same
key, while any change that could change the run gives a new one. A grid that is run again
skips every cell whose file exists and holds the same configuration, so an interrupted grid
resumes where it stopped and never recomputes a finished cell. Each cell also checkpoints after
every epoch (``out_dir/checkpoints/<key>/last.npz``): a cell interrupted mid-way resumes from its
last finished epoch, and :mod:`mecref.diagnostics` loads the trained models from there.

A cell whose training diverges (NaN/inf loss, :class:`mecref.train.TrainingDivergedError`) is a
result, not a crash: it is cached with ``status="diverged"`` and counted in the summary.

Parallel runs
-------------
``workers > 1`` runs cells in that many processes (``concurrent.futures.ProcessPoolExecutor``
with the ``spawn`` start method: a fresh interpreter per worker, safe with CuPy and threads).
Each worker's BLAS (and mecref's own element-wise threads, :mod:`mecref.threads`) is limited to
ONE thread, so ``workers`` processes share the cores instead of fighting over them:
``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``MECREF_NUM_THREADS`` are set
to 1 in the environment the workers are spawned with (they read it before NumPy is imported),
and, where ``threadpoolctl`` is installed, the worker also limits its pools with it. The same
environment raises glibc's mmap/trim thresholds (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) unless they are already set, which keeps large temporaries from
being re-mapped (and page-faulted) every step. ``workers=1`` runs the cells in this process with
its BLAS unchanged. The seconds-per-epoch column therefore depends on ``workers``: each cell's
record says how many BLAS threads it ran with (``blas_threads``, read with threadpoolctl; None
where threadpoolctl is not installed).

``client=`` (a ``distributed.Client``) runs the cells on a Dask cluster instead, with no
shared filesystem: :mod:`mecref.cluster`, docs/cluster.md.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .backend import MecrefError
from .checkpoint import write_atomic
from .gridcache import (_MALLOC_ENV, _WORKER_ENV, _dataset, _init_path, _load_record, _read_grid,
                        _record_grid, _run_cell, _write_json_atomic)
from .grids import (_NEUTRAL, _check_bits_list, _digest,  # noqa: F401
                    BETA_GRID, EPS_GRID, FORMS, MAIN_BITS, bits_label, cell_config, cell_key,
                    default_settings, form_label, form_spec, group_key, main_grid, method_label,
                    pretrain_cell, quantizer_label, sweep_grid, taylor_eps)
from .validate import check_int

__all__ = [
    "quantizer_label", "cell_config", "cell_key", "group_key", "method_label", "bits_label",
    "run_grid", "load_runs", "summarize", "write_results", "markdown_table", "main_grid",
    "sweep_grid", "best_row", "best_settings", "settings_from_sweep", "default_settings", "taylor_eps", "plot_sweep",
    "run_table", "model_from_checkpoint", "MAIN_BITS", "FORMS", "EPS_GRID", "BETA_GRID",
    "form_label", "form_spec", "pretrain_cell",
]


# ----------------------------------------------------------------------------------------------
# Running a grid
# ----------------------------------------------------------------------------------------------

def run_grid(configs, seeds, out_dir, workers: int = 2, progress=True, client=None) -> list:
    """Run every (config, seed) cell that is not finished yet; return all cells' records.

    Parameters
    ----------
    configs : list of dict
        TrainConfig fields per configuration (without ``seed``). All are validated before any
        cell runs, so a typo fails at once and not an hour in.
    seeds : list of int
    out_dir : str or Path
        Gets ``runs/<key>.json`` per finished cell, ``checkpoints/<key>/`` per cell, and
        ``grid.json`` (every configuration run in this folder, in first-run order: the order
        of the summary).
    workers : int >= 1
        Processes to run cells in (see the module docstring); 1 runs them in this process.
        Spawned workers re-import the main program, so with ``workers > 1`` it must be a file,
        ``python -m``, the ``mecref`` command, pytest or a notebook (not ``python -``).
    progress : bool or callable
        True prints one line per finished cell on stderr (which cell, accuracy, time, how many
        are left); a callable gets ``(record, done, total)`` instead.
    client : distributed.Client, optional
        Run the cells on this Dask cluster instead (``workers`` is then unused): no shared
        filesystem, the cache is written here; :mod:`mecref.cluster`. A cell the cluster gives
        up on (its workers died) comes back with ``status="failed"`` and is not cached.

    Returns
    -------
    list of dict
        One record per cell in grid order (configs outer, seeds inner), as stored in its run
        file (``config``, ``seed``, ``key``, ``group``, ``label``, ``bits``, ``status``,
        ``history``, ``test_acc``, ``val_acc``, ``seconds``, ``seconds_per_epoch``, ...), plus
        ``from_cache`` (True when the cell was not run by this call).

    Raises
    ------
    MecrefError, TypeError
        A bad configuration or argument. A cell that fails with anything but divergence stops
        the grid (the cells already finished stay cached) and its error is raised.
    """
    workers = check_int("workers", workers, 1)
    if isinstance(seeds, (int, np.integer)) or not len(seeds):
        raise MecrefError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    if isinstance(configs, dict) or not len(configs):
        raise MecrefError(f"configs must be a non-empty list of dicts, got {configs!r}")
    out = Path(out_dir)
    cells = []
    for config in configs:
        for seed in seeds:
            full = cell_config(config, seed)
            cells.append((full, _digest(full)))
    if len({k for _, k in cells}) != len(cells):
        raise MecrefError("the grid holds the same (config, seed) cell twice")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _record_grid(out / "grid.json", configs)

    records, todo = {}, []
    for full, key in cells:
        rec = _load_record(out / "runs" / f"{key}.json", full)
        if rec is None:
            todo.append((full, key))
        else:
            records[key] = dict(rec, from_cache=True)
    jobs = _with_pretraining(todo, out, records)
    report = _GridProgress(progress, total=len(cells) + len(jobs) - len(todo),
                           cached=len(cells) - len(todo))
    if client is not None:
        from .cluster import cluster_workers, run_cells
        report.start(len(jobs), cluster_workers(client))
        run_cells(client, jobs, out, records, report)
        return [records[key] for _, key in cells]
    report.start(len(jobs), workers)
    if workers == 1 or len(jobs) <= 1:
        _run_in_order(jobs, out, records, report, progress is True and workers == 1)
    else:
        _run_parallel(jobs, out, min(workers, len(jobs)), records, report)
    return [records[key] for _, key in cells]


def _with_pretraining(todo, out, records):
    """The jobs ``(full, key, pretrain_key)`` to run: each FP32 pretraining that a cell to run
    needs and that is not cached (first), then the cells; ``records`` gets the cached ones."""
    pre_jobs, jobs = {}, []
    for full, key in todo:
        pkey = None
        if full.get("pretrain_epochs"):
            pre = pretrain_cell(full)
            pkey = _digest(pre)
            if pkey not in pre_jobs and pkey not in records:
                rec = _load_record(out / "runs" / f"{pkey}.json", pre)
                if rec is not None and Path(out, rec.get("checkpoint") or "-").is_file():
                    records[pkey] = dict(rec, from_cache=True)
                else:
                    pre_jobs[pkey] = (pre, pkey, None)
        jobs.append((full, key, pkey))
    return list(pre_jobs.values()) + jobs


def _run_in_order(jobs, out, records, report, progress):
    for full, key, pkey in jobs:
        init, failed = _init_path(out, records, key, pkey)
        rec = failed or _run_cell(full, str(out), progress=progress, init_from=init)
        records[key] = dict(rec, from_cache=False)
        report.done(records[key])


def _run_parallel(jobs, out, workers, records, report):
    """Run the jobs on ``workers`` processes, at most ``workers`` at a time, each as soon as
    the pretraining it starts from (if any) is done."""
    waiting = list(jobs)
    with _worker_environment(), ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"),
            initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        pending = {}

        def submit_ready():
            for job in list(waiting):
                if len(pending) >= workers:
                    return
                full, key, pkey = job
                if pkey is not None and pkey not in records:
                    continue  # its pretraining is still running
                waiting.remove(job)
                init, failed = _init_path(out, records, key, pkey)
                if failed:
                    records[key] = dict(failed, from_cache=False)
                    report.done(records[key])
                else:
                    pending[pool.submit(_run_cell, full, str(out), False, init)] = key

        try:
            submit_ready()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    key = pending.pop(fut)
                    records[key] = dict(fut.result(), from_cache=False)
                    report.done(records[key])
                submit_ready()
        except BrokenProcessPool as exc:
            raise MecrefError(
                "a worker process died before finishing its cell (finished cells are cached). "
                "Spawned workers re-import the main program: it must be a file, `python -m ...`, "
                "the `mecref` command, pytest or a notebook, not code read from stdin "
                "(`python -`); a worker can also be killed for lack of memory. Run with "
                "workers=1 to see the error in this process") from exc
        except BaseException:   # Ctrl-C, SIGTERM (as KeyboardInterrupt in the CLI), an error
            _stop_workers(pool)
            raise


@contextmanager
def _worker_environment():
    """Environment the spawned workers inherit: one BLAS thread each (see module docstring)."""
    saved = dict(os.environ)
    os.environ.update(_WORKER_ENV)
    for k, v in _MALLOC_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _stop_workers(pool):
    """Stop a pool at once: queued cells are cancelled and running ones dropped (their
    checkpoints stay; finished cells are already cached), instead of waiting for them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()


def _watch_parent(parent_pid, interval=0.2):
    """Exit this worker as soon as the process that started it is gone (killed, even with
    SIGKILL): the worker is then re-parented and its parent pid changes."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:
            os._exit(1)


def _init_worker(parent_pid=None):
    """Worker start-up: Ctrl-C is left to the runner (which stops the workers), a watcher
    thread ends the worker if its runner dies, and BLAS/OpenMP pools are capped with
    threadpoolctl where it is installed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1)


class _GridProgress:
    """Progress of a grid on stderr: on a terminal a tqdm bar of cells (done of all, cached,
    ETA) with a line per finished cell above it; elsewhere the line per finished cell alone
    (which cell, accuracy, time, how many are left, a rough ETA)."""

    def __init__(self, progress, total, cached):
        self.fn = progress if callable(progress) else None
        self.on = progress is True
        self.total, self.finished, self.cached = total, cached, cached
        self.t0, self.ran = time.perf_counter(), 0
        self.bar = None

    def start(self, n_todo, workers):
        if not self.on:
            return
        print(f"grid: {self.total} cells, {self.finished} cached, {n_todo} to run "
              f"({workers} worker{'s' if workers > 1 else ''})", file=sys.stderr, flush=True)
        if sys.stderr.isatty() and n_todo:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.finished, desc="grid", unit="cell",
                            file=sys.stderr, dynamic_ncols=True, position=0,
                            postfix=f"{self.cached} cached")

    def done(self, rec):
        self.finished += 1
        self.ran += 1
        if self.fn is not None:
            self.fn(rec, self.finished, self.total)
        if not self.on:
            return
        left = self.total - self.finished
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.ran * left
        if rec["status"] == "ok":
            val = "" if rec["val_acc"] is None else f" val {100 * rec['val_acc']:.2f}%"
            what = (f"test {100 * rec['test_acc']:.2f}%{val}, "
                    f"{np.mean(rec['seconds_per_epoch']):.1f} s/epoch, {rec['seconds']:.0f} s")
        else:
            what = f"DIVERGED ({rec['error']})"
        line = (f"[{self.finished}/{self.total}] {rec['bits']} {rec['label']} seed {rec['seed']}: "
                f"{what}; {left} left, ~{eta / 60:.1f} min to go")
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
            return
        self.bar.write(line, file=sys.stderr)
        self.bar.update(1)
        if self.finished >= self.total:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------------------------
# Summaries and writers
# ----------------------------------------------------------------------------------------------

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
        A folder written by :func:`run_grid`.
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
    that has rows with ``metric``: the ``settings`` argument of :func:`main_grid`.
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


# ----------------------------------------------------------------------------------------------
# One call for the CLI, and trained models back from their checkpoints
# ----------------------------------------------------------------------------------------------

def run_table(grid: str, seeds, out_dir, workers: int = 2, progress=True, dry_run=False,
              from_sweep=None, client=None, **grid_kwargs) -> str:
    """Build a canonical grid, run (or resume) it, write the results; return Markdown.

    ``grid`` is ``"main"`` (:func:`main_grid`) or ``"sweep"`` (:func:`sweep_grid`, which also
    writes ``sweep.png`` and ``best_settings.json``, and lists the best setting per form by
    validation accuracy); ``grid_kwargs`` go to the grid function. For the main grid,
    ``from_sweep`` names a sweep folder whose best settings (chosen on validation accuracy)
    the MEC-Quant rows use. ``dry_run`` lists the cells and which are cached, and trains nothing.
    ``client`` runs the cells on a Dask cluster (:func:`run_grid`); cells the cluster gave up
    on are listed under the table.
    """
    if grid not in ("main", "sweep"):
        raise MecrefError(f"grid must be 'main' or 'sweep', got {grid!r}")
    header = ""
    if from_sweep is not None:
        if grid != "main":
            raise MecrefError("from_sweep applies to the main grid only")
        settings = settings_from_sweep(from_sweep, grid_kwargs.get("settings"))
        grid_kwargs["settings"] = settings
        header = f"MEC-Quant settings from the sweep in {from_sweep}: {json.dumps(settings)}\n\n"
    configs = (main_grid if grid == "main" else sweep_grid)(**grid_kwargs)
    if dry_run:
        return header + _dry_run(configs, seeds, out_dir, workers)
    records = run_grid(configs, seeds, out_dir, workers=workers, progress=progress, client=client)
    rows = write_results(out_dir, configs)
    text = header + markdown_table(rows)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        text += "\n\n" + "\n".join(f"- FAILED (not cached; run again to retry): {r['bits']} "
                                    f"{r['label']} seed {r['seed']}: {r['error']}" for r in failed)
    if grid == "sweep":
        plot_sweep(rows, Path(out_dir, "sweep.png"))
        best = best_settings(rows)
        _write_json_atomic(Path(out_dir, "best_settings.json"), best)
        text += "\n\n" + "\n".join(
            f"- best {form} by validation accuracy: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in s.items())
            for form, s in best.items())
    return text


def _dry_run(configs, seeds, out_dir, workers=2) -> str:
    out = Path(out_dir)
    lines, todo, n_cached = [], [], 0
    for c in configs:
        for s in seeds:
            full = cell_config(c, s)
            key = _digest(full)
            cached = _load_record(out / "runs" / f"{key}.json", full) is not None
            n_cached += cached
            if not cached:
                todo.append(full)
            lines.append(f"{key}  {'cached' if cached else 'to run'}  {bits_label(full)} "
                         f"{method_label(full)} seed {s}")
    total = len(configs) * len(seeds)
    lines.append(f"{total} cells: {n_cached} cached, {total - n_cached} to run")
    if todo:
        lines.append(_estimate_text(estimate_seconds(todo, out), workers, len(todo)))
    return "\n".join(lines + ["dry run: nothing was trained or written"])


def estimate_seconds(cells, out_dir) -> dict:
    """How long the given cells (full configurations, as :func:`cell_config` makes them) will
    take to train, roughly: each cell from the times of the cached cells of its configuration
    (other seeds) in ``out_dir``, else from a measured step of its kind
    (:func:`mecref.train.time_step`, once per kind: quantizer, regulariser, width, batch,
    data) times its steps; the FP32 pretrainings the cells need and that are not cached are
    added. Returns ``dict(seconds, from_cache, measured)``: the total and how many cells each
    source priced."""
    from .train import TrainConfig, time_step
    out = Path(out_dir)
    by_group = {}
    for path in sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("status") == "ok" and isinstance(rec.get("seconds"), (int, float)):
            by_group.setdefault(rec.get("group"), []).append(float(rec["seconds"]))
    jobs, pre_seen = [], set()
    for full in cells:
        if full.get("pretrain_epochs"):
            pre = pretrain_cell(full)
            pkey = _digest(pre)
            if pkey not in pre_seen and _load_record(out / "runs" / f"{pkey}.json", pre) is None:
                pre_seen.add(pkey)
                jobs.append(pre)
        jobs.append(full)
    measured_steps, seconds, n_cache, n_meas = {}, 0.0, 0, 0
    for full in jobs:
        times = by_group.get(group_key(full))
        if times:
            seconds += float(np.mean(times))
            n_cache += 1
            continue
        kind = json.dumps([full.get(k) for k in ("quantizer", "reg", "order", "experts", "reg_at", "width",
                                           "batch_size", "backend", "dataset", "data_dir",
                                           "train_limit", "val_size")])
        if kind not in measured_steps:
            cfg = TrainConfig(**full)
            measured_steps[kind] = time_step(cfg, _dataset(cfg.dataset, cfg.data_dir))
        per_step, steps_per_epoch = measured_steps[kind]
        seconds += per_step * steps_per_epoch * full["epochs"]
        n_meas += 1
    return dict(seconds=seconds, from_cache=n_cache, measured=n_meas)


def _estimate_text(est, workers, n_cells) -> str:
    w = max(1, min(int(workers), n_cells))
    sources = []
    if est["from_cache"]:
        sources.append(f"{est['from_cache']} from cached cells' times")
    if est["measured"]:
        sources.append(f"{est['measured']} from a measured step")
    return (f"estimated time: ~{_duration(est['seconds'] / w)} on {w} worker{'s' if w > 1 else ''} "
            f"({_duration(est['seconds'])} of training in all; {', '.join(sources)}; rough: "
            f"evaluation and other work on the machine add to it)")


def _duration(seconds) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def model_from_checkpoint(path, backend: str = "numpy"):
    """Rebuild the small CNN saved in a training checkpoint (``last.npz``), in eval-ready state.

    Returns
    -------
    (model, meta) : the model with the checkpoint's parameters and buffers, and the
        checkpoint's metadata (``config``, ``model_config``, ``history``, ...).
    """
    from . import nn
    from .checkpoint import load_checkpoint
    state, _, meta = load_checkpoint(path)
    if not isinstance(meta.get("model_config"), dict):
        raise MecrefError(f"checkpoint {str(path)!r} has no model_config: not a training "
                          f"checkpoint")
    model = nn.small_cnn(**dict(meta["model_config"], backend=backend))
    model.load_state_dict(state)
    return model, meta
