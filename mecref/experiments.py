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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import product
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .backend import MecrefError
from .checkpoint import write_atomic
from .validate import check_int

__all__ = [
    "QUANTIZER_NAMES", "cell_config", "cell_key", "group_key", "method_label", "bits_label",
    "run_grid", "load_runs", "summarize", "write_results", "markdown_table", "main_grid",
    "sweep_grid", "best_row", "best_settings", "settings_from_sweep", "default_settings", "taylor_eps", "plot_sweep",
    "run_table", "model_from_checkpoint", "MAIN_BITS", "FORMS",
]

QUANTIZER_NAMES = {"fp32": "FP32", "ste": "STE", "dorefa_pact": "DoReFa+PACT", "lsq": "LSQ",
                   "lsqplus": "LSQ+"}
MAIN_BITS = ((4, 4), (3, 3), (2, 2), (2, 4))  # (weight bits, activation bits)
_KEY_DIGITS = 16
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MECREF_NUM_THREADS": "1"}
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


# ----------------------------------------------------------------------------------------------
# Cells: full configurations, keys and labels
# ----------------------------------------------------------------------------------------------

def cell_config(config: dict, seed: int) -> dict:
    """The full, validated configuration of one cell: every TrainConfig field, ``seed`` set.

    Parameters
    ----------
    config : dict
        TrainConfig fields (any subset) except ``seed``.
    seed : int >= 0

    Raises
    ------
    MecrefError
        ``config`` sets ``seed`` (seeds are given separately), or a field is invalid.
    TypeError
        ``config`` is not a dict or names an unknown field.
    """
    from .train import TrainConfig
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of TrainConfig fields, got {type(config).__name__}")
    if "seed" in config:
        raise MecrefError(f"config must not set 'seed' (seeds are passed to the grid), got "
                          f"seed={config['seed']!r} in {config!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise TypeError(f"config names unknown TrainConfig fields {unknown}; known: {sorted(fields)}")
    check_int("seed", seed, 0)
    return TrainConfig(**dict(config, seed=int(seed))).validate().as_dict()


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_KEY_DIGITS]


def cell_key(config: dict, seed: int) -> str:
    """Stable file name of a cell: SHA-256 (16 hex digits) of its full configuration."""
    return _digest(cell_config(config, seed))


def group_key(full_config: dict) -> str:
    """Key of a cell's configuration without its seed: the cells averaged in one table row."""
    return _digest({k: v for k, v in full_config.items() if k != "seed"})


def bits_label(config: dict) -> str:
    """``"FP32"`` or ``"W<w>A<a>"`` (e.g. ``"W2A4"``: 2-bit weights, 4-bit activations)."""
    if config.get("quantizer") == "fp32":
        return "FP32"
    return f"W{config['w_bits']}A{config['a_bits']}"


def method_label(config: dict) -> str:
    """Human name of a configuration's method.

    ``"LSQ"`` + ``reg="mec"`` is ``"MEC-Quant (exact)"``; ``"mec_taylor"`` is
    ``"MEC-Quant (Taylor n=4)"``; ``"moe"`` is ``"MEC-Quant (MOE K=4)"``. A regulariser on another
    quantizer reads ``"STE + MEC (exact)"`` and so on.
    """
    q = QUANTIZER_NAMES.get(config.get("quantizer"), str(config.get("quantizer")))
    reg = config.get("reg")
    if reg is None or config.get("reg_weight") == 0:
        return q
    form = {"mec": "exact", "mec_taylor": f"Taylor n={config.get('order')}",
            "moe": f"MOE K={config.get('experts')}"}[reg]
    return f"MEC-Quant ({form})" if q == "LSQ" else f"{q} + MEC ({form})"


# ----------------------------------------------------------------------------------------------
# Running a grid
# ----------------------------------------------------------------------------------------------

def run_grid(configs, seeds, out_dir, workers: int = 2, progress=True) -> list:
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
    report = _GridProgress(progress, total=len(cells), cached=len(records))
    report.start(len(todo), workers)

    if workers == 1 or len(todo) <= 1:
        for full, key in todo:
            rec = _run_cell(full, str(out), progress=progress is True and workers == 1)
            records[key] = dict(rec, from_cache=False)
            report.done(records[key])
    else:
        _run_parallel(todo, out, min(workers, len(todo)), records, report)
    return [records[key] for _, key in cells]


def _record_grid(path: Path, configs):
    """Keep ``grid.json``: every configuration ever run in this folder, first-run order."""
    known = json.loads(path.read_text())["configs"] if path.is_file() else []
    seen = {group_key(c) for c in known}
    for c in configs:
        full = dict(cell_config(c, 0), seed=None)
        if group_key(full) not in seen:
            seen.add(group_key(full))
            known.append(full)
    _write_json_atomic(path, dict(configs=known))


def _run_parallel(todo, out, workers, records, report):
    with _worker_environment(), ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"),
            initializer=_init_worker) as pool:
        pending = {pool.submit(_run_cell, full, str(out), False): key for full, key in todo}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    key = pending.pop(fut)
                    records[key] = dict(fut.result(), from_cache=False)
                    report.done(records[key])
        except BrokenProcessPool as exc:
            raise MecrefError(
                "a worker process died before finishing its cell (finished cells are cached). "
                "Spawned workers re-import the main program: it must be a file, `python -m ...`, "
                "the `mecref` command, pytest or a notebook, not code read from stdin "
                "(`python -`); a worker can also be killed for lack of memory. Run with "
                "workers=1 to see the error in this process") from exc
        except BaseException:
            for fut in pending:
                fut.cancel()
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


def _init_worker():
    """Worker start-up: also cap BLAS/OpenMP pools with threadpoolctl where it is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1)


_DATASETS: dict = {}


def _dataset(name, data_dir):
    """Each process loads a dataset once and reuses it for all its cells."""
    from .data import load_dataset
    if (name, data_dir) not in _DATASETS:
        _DATASETS[(name, data_dir)] = load_dataset(name, data_dir=data_dir)
    return _DATASETS[(name, data_dir)]


def _version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mecref")
    except PackageNotFoundError:
        return None


def _blas_threads():
    """Threads of the loaded BLAS (threadpoolctl), or None where threadpoolctl is missing."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    n = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(n) if n else None


def _run_cell(full: dict, out_dir: str, progress=False) -> dict:
    """Train one cell (resuming from its checkpoint), write its run file, return the record."""
    from .train import TrainConfig, TrainingDivergedError, train_small_cnn
    out = Path(out_dir)
    key = _digest(full)
    cfg = TrainConfig(**full).validate()
    rec = dict(key=key, group=group_key(full), label=method_label(full), bits=bits_label(full),
               seed=full["seed"], config=full, mecref_version=_version(),
               blas_threads=_blas_threads(), pid=os.getpid())
    ckpt_dir = out / "checkpoints" / key
    try:
        res = train_small_cnn(cfg, progress=progress, checkpoint_dir=ckpt_dir, resume=True,
                              dataset=_dataset(cfg.dataset, cfg.data_dir))
    except TrainingDivergedError as exc:
        rec.update(status="diverged", error=str(exc), history=[], test_acc=None, val_acc=None,
                   seconds=None, seconds_per_epoch=[], checkpoint=None)
    else:
        rec.update(status="ok", error=None, history=res.history, test_acc=float(res.test_acc),
                   val_acc=None if res.val_acc is None else float(res.val_acc),
                   seconds=float(res.seconds),
                   seconds_per_epoch=[float(h["seconds"]) for h in res.history],
                   checkpoint=str(Path(res.checkpoint).relative_to(out)))
    rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_json_atomic(out / "runs" / f"{key}.json", rec)
    return rec


def _load_record(path: Path, full: dict):
    """A cached run, or None when it is missing, unreadable or made for another config."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("config") == full else None


def _write_json_atomic(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, sort_keys=True)
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


class _GridProgress:
    """One line per finished cell: which, accuracy, time, how many are left, a rough ETA."""

    def __init__(self, progress, total, cached):
        self.fn = progress if callable(progress) else None
        self.on = progress is True
        self.total, self.finished = total, cached
        self.t0, self.ran = time.perf_counter(), 0

    def start(self, n_todo, workers):
        if self.on:
            print(f"grid: {self.total} cells, {self.finished} cached, {n_todo} to run "
                  f"({workers} worker{'s' if workers > 1 else ''})", file=sys.stderr, flush=True)

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
        print(f"[{self.finished}/{self.total}] {rec['bits']} {rec['label']} seed {rec['seed']}: "
              f"{what}; {left} left, ~{eta / 60:.1f} min to go", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Summaries and writers
# ----------------------------------------------------------------------------------------------

def load_runs(out_dir) -> list:
    """Every cached run record under ``out_dir/runs`` (unreadable files are skipped)."""
    runs = []
    for path in sorted(Path(out_dir, "runs").glob("*.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return runs


_ROW_FIELDS = ("quantizer", "w_bits", "a_bits", "first_last_bits", "reg", "reg_weight", "eps",
               "order", "experts", "epochs", "batch_size", "lr", "val_size", "train_limit",
               "dataset", "width", "backend")


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
        grid = Path(out_dir, "grid.json")
        order = []
        if grid.is_file():
            order = [group_key(c) for c in json.loads(grid.read_text())["configs"]]
        order += sorted((g for g in groups if g not in order),
                        key=lambda g: (groups[g][0]["bits"], groups[g][0]["label"]))
    return [_row(groups[g]) for g in order if g in groups]


def _row(recs) -> dict:
    recs = sorted(recs, key=lambda r: r["seed"])
    cfg = recs[0]["config"]
    ok = [r for r in recs if r["status"] == "ok"]
    row = dict(label=recs[0]["label"], bits=recs[0]["bits"])
    row.update({k: cfg[k] for k in _ROW_FIELDS})
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


def write_results(out_dir, configs=None) -> list:
    """Write ``results.csv`` and ``results.json`` in ``out_dir``; return the rows.

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
    _write_text_atomic(Path(out_dir, "results.csv"), buf.getvalue())
    _write_json_atomic(Path(out_dir, "results.json"),
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


_VARYING = ("reg_weight", "eps", "order", "experts", "epochs", "dataset", "train_limit")


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
    acts = {"reg_weight": row["reg"] is not None, "eps": row["reg"] is not None,
            "order": row["reg"] == "mec_taylor", "experts": row["reg"] == "moe"}
    return row[key] if acts.get(key, True) else None


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
# The canonical grids
# ----------------------------------------------------------------------------------------------

FORMS = ("mec", "mec_taylor", "moe")
_FORM_KEYS = {"mec": ("reg_weight", "eps"), "mec_taylor": ("reg_weight", "eps", "order"),
              "moe": ("reg_weight", "eps", "experts")}


def taylor_eps(width=None) -> float:
    r"""Default eps of the Taylor form: :math:`2\sqrt d`, d = ``width[2]`` (64 gives 16).

    The order-n series of :math:`\log\det(I + C)` converges only when the spectral radius of
    :math:`C = \lambda Z_1 Z_2^T` is below 1; for unit rows it is at most
    :math:`\lambda m = d / \epsilon^2` (method spec, section 2), so :math:`\epsilon = 2\sqrt d`
    bounds it by 1/4 for any features. At the exact form's eps (0.5) the series diverges and the
    Taylor "form" would be a different polynomial objective, not an approximation.
    """
    from .train import TrainConfig
    d = (TrainConfig().width if width is None else width)[2]
    return 2.0 * float(d) ** 0.5


def default_settings(width=None) -> dict:
    """MEC-Quant's settings per form before a sweep: TrainConfig's ``reg_weight`` and ``eps``,
    order 4 (MEC's) with eps = :func:`taylor_eps`, and 4 experts."""
    from .train import TrainConfig
    d = TrainConfig()
    return {"mec": dict(reg_weight=d.reg_weight, eps=d.eps),
            "mec_taylor": dict(reg_weight=d.reg_weight, eps=taylor_eps(width), order=d.order),
            "moe": dict(reg_weight=d.reg_weight, eps=d.eps, experts=d.experts)}


def _merge_settings(settings, width):
    merged = default_settings(width)
    for form, values in (settings or {}).items():
        if form not in merged:
            raise MecrefError(f"settings has unknown form {form!r}; forms are {FORMS}")
        unknown = set(values) - set(_FORM_KEYS[form])
        if unknown:
            raise MecrefError(f"settings[{form!r}] has unknown keys {sorted(unknown)}; "
                              f"allowed: {_FORM_KEYS[form]}")
        merged[form].update(values)
    return merged


def main_grid(epochs: int = 6, bits=MAIN_BITS, settings=None, **common) -> list:
    """The main table's configurations: every method at every bit-width, one shared budget.

    FP32; then for each ``(w_bits, a_bits)`` in ``bits`` (W4A4, W3A3, W2A2, W2A4 by default):
    STE, DoReFa+PACT, LSQ, LSQ+, and MEC-Quant = LSQ + the regulariser in its exact
    (``"mec"``), Taylor (``"mec_taylor"``) and MOE (``"moe"``) forms.

    Every configuration gets the same ``epochs`` and ``common`` TrainConfig fields (batch size,
    schedule, data, ...), and the training loop gives every method the same two augmented views,
    so the regulariser is the only difference between LSQ and MEC-Quant.

    Parameters
    ----------
    settings : dict, optional
        Per form, the regulariser's ``reg_weight``, ``eps`` and ``order`` / ``experts``, e.g.
        ``{"mec": {"reg_weight": 1.0, "eps": 0.25}}``; missing entries keep
        :func:`default_settings`. Choose them with :func:`sweep_grid` on a validation split
        (:func:`best_settings`), never on the test set.

    Returns
    -------
    list of dict
        ``1 + 7 * len(bits)`` configurations (29 by default), each without ``seed``.
    """
    check_int("epochs", epochs, 1)
    base = dict(common, epochs=int(epochs))
    forms = _merge_settings(settings, common.get("width"))
    configs = [dict(base, quantizer="fp32", reg=None)]
    for w, a in _check_bits_list(bits):
        q = dict(base, w_bits=w, a_bits=a)
        configs += [dict(q, quantizer=name, reg=None)
                    for name in ("ste", "dorefa_pact", "lsq", "lsqplus")]
        configs += [dict(q, quantizer="lsq", reg=form, **forms[form]) for form in FORMS]
    return configs


def _check_bits_list(bits):
    try:
        pairs = [(int(w), int(a)) for w, a in bits]
    except (TypeError, ValueError):
        raise MecrefError(f"bits must be a list of (w_bits, a_bits) pairs, got {bits!r}") from None
    if not pairs:
        raise MecrefError("bits must hold at least one (w_bits, a_bits) pair, got []")
    return pairs


def _check_list(name, vals):
    if isinstance(vals, (str, int, float)) or not len(vals):
        raise MecrefError(f"{name} must be a non-empty list, got {vals!r}")
    return list(vals)


def sweep_grid(epochs: int = 6, reg_weights=(0.1, 0.5, 2.0), eps_values=(0.25, 0.5, 1.0),
               taylor_eps_values=None, orders=(2, 4, 8), experts=(2, 4, 8), w_bits: int = 2,
               a_bits: int = 2, val_size: int = 2000, **common) -> list:
    """Hyperparameter sweep of MEC-Quant (LSQ + regulariser) at W2A2, judged on validation.

    - the LSQ baseline (no regulariser);
    - each form over ``reg_weights`` x its eps values: ``eps_values`` for the exact and MOE
      forms, ``taylor_eps_values`` for the Taylor form (default: :func:`taylor_eps` / 4, / 2,
      x 1, i.e. 4, 8, 16 for d = 64: the series needs a large eps to converge), at the default
      order and experts (:func:`default_settings`);
    - ``orders`` (Taylor) and ``experts`` (MOE) at the form's middle weight and eps (the middle
      of each sorted list, the lower one of an even count: beta 0.5, eps 0.5, Taylor eps 8).

    ``val_size`` images are held out of the training set (stratified, per seed) and every choice
    is made on their accuracy (``val_acc``); the test set is never looked at for a choice.

    Returns
    -------
    list of dict, each without ``seed``; no configuration twice
        (1 + 9 + 9 + 9 + 2 + 2 = 32 by default: orders 4 and experts 4 are already there).
    """
    check_int("epochs", epochs, 1)
    check_int("val_size", val_size, 1)
    reg_weights = [float(b) for b in _check_list("reg_weights", reg_weights)]
    eps_values = [float(e) for e in _check_list("eps_values", eps_values)]
    orders = [int(n) for n in _check_list("orders", orders)]
    experts = [int(k) for k in _check_list("experts", experts)]
    d_eps = taylor_eps(common.get("width"))
    if taylor_eps_values is None:
        taylor_eps_values = (d_eps / 4, d_eps / 2, d_eps)
    taylor_eps_values = [float(e) for e in _check_list("taylor_eps_values", taylor_eps_values)]
    forms = default_settings(common.get("width"))
    base = dict(common, epochs=int(epochs), quantizer="lsq", w_bits=w_bits, a_bits=a_bits,
                val_size=int(val_size))
    configs = [dict(base, reg=None)]
    for form, eps_list in (("mec", eps_values), ("mec_taylor", taylor_eps_values),
                           ("moe", eps_values)):
        configs += [dict(base, reg=form, **dict(forms[form], reg_weight=b, eps=e))
                    for b, e in product(reg_weights, eps_list)]
    b_mid = _middle(reg_weights)
    configs += [dict(base, reg="mec_taylor", **dict(forms["mec_taylor"], reg_weight=b_mid,
                                                    eps=_middle(taylor_eps_values), order=n))
                for n in orders]
    configs += [dict(base, reg="moe", **dict(forms["moe"], reg_weight=b_mid,
                                             eps=_middle(eps_values), experts=k)) for k in experts]
    unique = {}
    for c in configs:
        unique.setdefault(json.dumps(c, sort_keys=True, default=list), c)
    return list(unique.values())


def _middle(values):
    v = sorted(values)
    return v[(len(v) - 1) // 2]


def best_row(rows, metric: str = "val_acc_mean", reg=None):
    """The summary row with the highest ``metric`` (validation accuracy by default).

    ``reg`` restricts the choice to one regulariser (``"mec"``, ``"mec_taylor"``, ``"moe"``).
    Raises MecrefError when no row has the metric.
    """
    cand = [r for r in rows if r.get(metric) is not None and (reg is None or r["reg"] == reg)]
    if not cand:
        raise MecrefError(f"no summary row has {metric!r}" + (f" for reg={reg!r}" if reg else ""))
    return max(cand, key=lambda r: r[metric])


def best_settings(rows, metric: str = "val_acc_mean") -> dict:
    """Per form, the settings of the sweep row with the best validation accuracy.

    Returns ``{form: {"reg_weight", "eps", ["order" | "experts"]}}`` for each form that has
    rows with ``metric``: the ``settings`` argument of :func:`main_grid`.
    """
    out = {}
    for form in FORMS:
        try:
            r = best_row(rows, metric, reg=form)
        except MecrefError:
            continue
        out[form] = {k: r[k] for k in _FORM_KEYS[form]}
    if not out:
        raise MecrefError(f"no regularised sweep row has {metric!r}: is this a sweep folder "
                          "(val_size > 0)?")
    return out


def settings_from_sweep(sweep_dir, settings=None) -> dict:
    """:func:`best_settings` of a sweep folder, with the entries of ``settings`` (if any)
    taking precedence, key by key within each form."""
    best = best_settings(summarize(sweep_dir))
    for form, values in (settings or {}).items():
        best[form] = dict(best.get(form, {}), **values)
    return best


def plot_sweep(rows, path, metric: str = "val_acc_mean"):
    """Plot a sweep: validation accuracy against each swept hyperparameter.

    Panels: each form's accuracy against ``reg_weight`` (log axis), one line per eps (Taylor at
    its most common order, MOE at its most common number of experts); then accuracy against the
    Taylor ``order`` and the MOE ``experts``, one line per (reg_weight, eps) with two or more
    points. Error bars: std over seeds. The LSQ baseline (no regulariser) is a dashed line.
    Panels without data are left out.

    Returns
    -------
    Path of the written image (format from the suffix, e.g. ``.png``).
    """
    from matplotlib.figure import Figure
    rows = [r for r in rows if r.get(metric) is not None]
    base = [r for r in rows if r["reg"] is None]
    std_key = metric.replace("_mean", "_std")
    panels = []
    for form, title in (("mec", "exact MEC"), ("mec_taylor", "Taylor MEC"), ("moe", "MOE")):
        sub = [r for r in rows if r["reg"] == form]
        if not sub:
            continue
        fixed = {"mec_taylor": "order", "moe": "experts"}.get(form)
        if fixed:
            common_value = max({r[fixed] for r in sub}, key=lambda v: sum(r[fixed] == v for r in sub))
            wsub = [r for r in sub if r[fixed] == common_value]
            panels.append((f"{title} ({fixed} {common_value})", wsub, "reg_weight", ("eps",)))
            panels.append((f"{title}: {fixed}", sub, fixed, ("reg_weight", "eps")))
        else:
            panels.append((title, sub, "reg_weight", ("eps",)))
    drawn = []
    for title, sub, x, line_keys in panels:
        lines = {}
        for r in sub:
            lines.setdefault(tuple(r[k] for k in line_keys), []).append(r)
        lines = {k: v for k, v in lines.items() if len(v) >= (2 if x != "reg_weight" else 1)}
        if lines:
            drawn.append((title, x, line_keys, lines))
    if not drawn:
        raise MecrefError(f"plot_sweep: no regularised row has {metric!r} to plot")
    ncols = min(3, len(drawn))
    nrows = -(-len(drawn) // ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, x, line_keys, lines) in zip(axes, drawn):
        for key, line in sorted(lines.items()):
            line = sorted(line, key=lambda r: r[x])
            ax.errorbar([r[x] for r in line], [100 * r[metric] for r in line],
                        yerr=[100 * (r.get(std_key) or 0.0) for r in line], marker="o", capsize=3,
                        label=", ".join(f"{k} {v:.3g}" for k, v in zip(line_keys, key)))
        for r in base:
            ax.axhline(100 * r[metric], color="0.4", ls="--", label=f"{r['label']} (no reg.)")
        if x == "reg_weight":
            ax.set_xscale("log")
        else:
            ax.set_xticks(sorted({r[x] for line in lines.values() for r in line}))
        ax.set_xlabel({"reg_weight": "regulariser weight beta", "order": "Taylor order n",
                       "experts": "experts K"}[x])
        ax.set_ylabel(("validation" if metric.startswith("val") else "test") + " accuracy (%)")
        ax.set_title(f"{title}, {next(iter(lines.values()))[0]['bits']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------------------------
# One call for the CLI, and trained models back from their checkpoints
# ----------------------------------------------------------------------------------------------

def run_table(grid: str, seeds, out_dir, workers: int = 2, progress=True, dry_run=False,
              from_sweep=None, **grid_kwargs) -> str:
    """Build a canonical grid, run (or resume) it, write the results; return Markdown.

    ``grid`` is ``"main"`` (:func:`main_grid`) or ``"sweep"`` (:func:`sweep_grid`, which also
    writes ``sweep.png`` and ``best_settings.json``, and lists the best setting per form by
    validation accuracy); ``grid_kwargs`` go to the grid function. For the main grid,
    ``from_sweep`` names a sweep folder whose best settings (chosen on validation accuracy)
    the MEC-Quant rows use. ``dry_run`` lists the cells and which are cached, and trains nothing.
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
        return header + _dry_run(configs, seeds, out_dir)
    run_grid(configs, seeds, out_dir, workers=workers, progress=progress)
    rows = write_results(out_dir, configs)
    text = header + markdown_table(rows)
    if grid == "sweep":
        plot_sweep(rows, Path(out_dir, "sweep.png"))
        best = best_settings(rows)
        _write_json_atomic(Path(out_dir, "best_settings.json"), best)
        text += "\n\n" + "\n".join(
            f"- best {form} by validation accuracy: " + " ".join(f"{k}={v:.4g}" for k, v in s.items())
            for form, s in best.items())
    return text


def _dry_run(configs, seeds, out_dir) -> str:
    out = Path(out_dir)
    lines, n_cached = [], 0
    for c in configs:
        for s in seeds:
            full = cell_config(c, s)
            key = _digest(full)
            cached = _load_record(out / "runs" / f"{key}.json", full) is not None
            n_cached += cached
            lines.append(f"{key}  {'cached' if cached else 'to run'}  {bits_label(full)} "
                         f"{method_label(full)} seed {s}")
    total = len(configs) * len(seeds)
    return "\n".join(lines + [f"{total} cells: {n_cached} cached, {total - n_cached} to run"])


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
    model = nn.small_cnn(**dict(meta["model_config"], backend=backend))
    model.load_state_dict(state)
    return model, meta
