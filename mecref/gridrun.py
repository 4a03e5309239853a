"""Running a grid: :func:`run_grid` runs the cells that are not cached yet, in this process or
in a pool of worker processes, each FP32 pretraining before the cells that start from it, with
progress on stderr; :func:`estimate_seconds` prices the cells still to run (the dry run of
``mecref table``/``sweep``). Used through :mod:`mecref.experiments`.

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

from .backend import MALLOC_ENV, MecrefError
from .gridcache import (_WORKER_ENV, _dataset, _init_path, _load_record,
                        _record_grid, _run_cell)
from .grids import _digest, bits_label, cell_config, group_key, method_label, pretrain_cell
from .validate import check_int

__all__ = ["run_grid", "estimate_seconds"]


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
    for k, v in MALLOC_ENV.items():
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
# The dry run: which cells are cached, how long the others will take
# ----------------------------------------------------------------------------------------------

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
    """How long the given cells (full configurations, as :func:`~mecref.grids.cell_config` makes
    them) will take to train, roughly: each cell from the times of the cached cells of its
    configuration (other seeds) in ``out_dir``, else from a measured step of its kind
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
