"""Experiment grids on a Dask cluster: :func:`mecref.experiments.run_grid` with ``client=``.

::

    from distributed import Client
    with Client("tcp://scheduler-host:8786") as client:
        run_grid(configs, seeds, "runs/main", client=client)

or ``mecref table --scheduler tcp://scheduler-host:8786 ...`` (docs/cluster.md: starting the
scheduler and workers by hand, through a batch system, on Kubernetes). Needs the optional extra
``cluster`` (``dask[distributed]``) on the runner and on every worker, with the same mecref and
NumPy; nothing else is shared.

No shared filesystem
--------------------
Each cell is one ``dask.distributed`` future of :func:`train_cell`. The worker trains the cell
in a scratch folder of its own (under the worker's local directory, removed afterwards) and
returns the cell's run record (configuration, history, accuracies, timings) with the bytes of
every file of its checkpoint folder (``last.npz`` and ``last.json``). The runner alone writes
the cache in ``out_dir``, atomically as the local pool does: the checkpoint files first, then
``runs/<key>.json``, so a record is never there without its checkpoint. A cached cell is not
sent. A cell that starts from an FP32 pretraining gets the pretraining's result as an argument:
a pretraining that runs on the cluster too is a future the cell depends on (Dask moves its
checkpoint from worker to worker and starts the cell once it is done); a cached one is read
from ``out_dir`` and scattered once for all the cells that start from it. A cell is trained
from its start on the worker: an unfinished checkpoint of an interrupted local run is not sent
(the finished checkpoint replaces it).

Faults
------
distributed's own handling: a worker that dies while it runs a cell (killed, out of memory,
its machine lost) has that cell run again on another worker from the start, up to the
scheduler's ``distributed.scheduler.allowed-failures`` deaths (3 by default). A cell that
exhausts them (``KilledWorker``) is reported failed (``status="failed"``, not cached, so the
next run of the grid tries it again), and the other cells go on; the cells that start from a
failed pretraining fail with it. An error raised by a cell's code (other than divergence, a
result that is cached) cancels the grid's cells still to run and is raised, as in the local
pool. Ctrl-C (or SIGTERM in the CLI) cancels the grid's cells on the cluster and leaves the
cluster up; a cell already running finishes on its worker (Python cannot stop a running task)
and its result is dropped.

Determinism
-----------
A cell runs with one BLAS thread (threadpoolctl, whatever the worker was started with; the
nanny's default environment also sets ``OPENBLAS_NUM_THREADS=1`` and its kin) and one mecref
thread (:mod:`mecref.threads`), as in the local pool's workers, and its record says so
(``blas_threads``). The numbers, and the arrays of its checkpoint, are the local pool's bit for
bit (tests/test_cluster.py). The checkpoint's ``config.init_from`` names the copy of the
pretraining it was read from (the worker's scratch copy); the record's ``pretrained_from``
names the cache's.
"""
from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

from .backend import MecrefError

__all__ = ["connect", "train_cell", "run_cells", "cluster_workers", "worker_environ"]

_CELL_PREFIX = "mecref-cell"


def _distributed():
    """The ``distributed`` module, or a MecrefError saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise MecrefError("running a grid on a Dask cluster needs dask.distributed: install "
                          "the extra with `python3 -m pip install \"mecref[cluster]\"` (or "
                          "`python3 -m pip install \"dask[distributed]\"`)") from None
    return distributed


def connect(scheduler: str, timeout: float = 30):
    """A ``distributed.Client`` of the scheduler at ``scheduler`` (``tcp://HOST:8786``).

    Raises
    ------
    MecrefError
        dask.distributed is not installed, ``scheduler`` is not an address, or no scheduler
        answers there within ``timeout`` seconds.
    TypeError
        ``scheduler`` is not a str.
    """
    distributed = _distributed()
    if not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be a str such as 'tcp://HOST:8786', got "
                        f"{type(scheduler).__name__} {scheduler!r}")
    if "://" not in scheduler:
        raise MecrefError(f"scheduler must be an address such as 'tcp://HOST:8786', got "
                          f"{scheduler!r}")
    try:
        return distributed.Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise MecrefError(f"no Dask scheduler answered at {scheduler} within {timeout:g} s "
                          f"({type(exc).__name__}: {exc}); start one with `dask scheduler` "
                          f"(docs/cluster.md)") from None


def worker_environ() -> dict:
    """The environment of the local pool's worker processes, for a Dask worker's process
    (the nanny's ``distributed.nanny.pre-spawn-environ``, read before the worker starts, or
    the environment ``dask worker`` is started in): one BLAS, OpenMP and mecref thread, and
    glibc's mmap/trim thresholds as the pool sets them (Dask's default trims at 64 kB).
    Threads are pinned in each cell anyway, so the numbers do not depend on it; it makes a
    worker's process the pool's, for comparable seconds per epoch."""
    from .backend import MALLOC_ENV
    from .gridcache import _WORKER_ENV
    return dict(_WORKER_ENV, **MALLOC_ENV)


def cluster_workers(client) -> int:
    """The number of workers the client's scheduler has now."""
    return len(client.nthreads())


# ----------------------------------------------------------------------------------------------
# On the worker
# ----------------------------------------------------------------------------------------------

def _scratch_root():
    """The worker's local directory (Dask removes it with a dead worker), else the temp dir."""
    try:
        from distributed import get_worker
        return get_worker().local_directory
    except (ImportError, ValueError):
        return None


def train_cell(full: dict, pre: dict | None = None) -> dict:
    """Train one cell on this machine, in a scratch folder; return what the runner caches.

    Parameters
    ----------
    full : dict
        The cell's full configuration (:func:`mecref.experiments.cell_config`).
    pre : dict or None
        For a cell with ``pretrain_epochs > 0``: the result of its FP32 pretraining (what this
        function returned for it, or the same read from the cache): ``record`` and ``files``.

    Returns
    -------
    dict
        ``record``: the run record (as the local pool writes it); ``files``: ``{path: bytes}``
        of every file of the cell's checkpoint folder, paths relative to the grid's folder
        (``checkpoints/<key>/last.npz``, ...).
    """
    from threadpoolctl import threadpool_limits

    from . import threads
    from .gridcache import _init_path, _run_cell
    from .grids import _digest
    key = _digest(full)
    with tempfile.TemporaryDirectory(prefix=f"mecref-{key}-", dir=_scratch_root()) as tmp:
        init, failed = None, None
        if pre is not None:
            pkey = pre["record"]["key"]
            init, failed = _init_path(tmp, {pkey: pre["record"]}, key, pkey)
            if init is not None:
                _write_files(Path(tmp), pre["files"])
        if failed is not None:
            return dict(record=failed, files={})
        old = threads.set_num_threads(1)
        try:
            with threadpool_limits(limits=1):
                rec = _run_cell(full, tmp, False, init)
        finally:
            threads.set_num_threads(old)
        folder = Path(tmp, "checkpoints", key)
        files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file() and _kept_file(p)}
        return dict(record=rec, files=files)


def _kept_file(path: Path) -> bool:
    """A checkpoint folder's own files: not the run lock, a probe or a temporary file."""
    return not path.name.startswith(".") and not path.name.endswith(".tmp")


def _write_files(root: Path, files: dict):
    """Write ``{relative path: bytes}`` under ``root``, each atomically; a path that would
    leave ``root`` is refused."""
    from .checkpoint import write_atomic
    for rel, data in files.items():
        parts = PurePosixPath(rel).parts
        if parts[:1] != ("checkpoints",) or ".." in parts:   # absolute, empty, or escaping
            raise MecrefError(f"a cell's result names the file {rel!r}: expected a path "
                              f"under checkpoints/")
        path = root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda fh, data=data: fh.write(data))


# ----------------------------------------------------------------------------------------------
# On the runner
# ----------------------------------------------------------------------------------------------

def _cached_result(out: Path, rec: dict) -> dict:
    """A cached pretraining as :func:`train_cell` returns it: its record and checkpoint."""
    rec = {k: v for k, v in rec.items() if k != "from_cache"}
    return dict(record=rec, files={rec["checkpoint"]: Path(out, rec["checkpoint"]).read_bytes()})


def _failed_record(full: dict, key: str, why: str) -> dict:
    from .grids import bits_label, group_key, method_label
    return dict(key=key, group=group_key(full), label=method_label(full),
                bits=bits_label(full), seed=full["seed"], config=full, status="failed",
                error=f"failed on the cluster, not cached: {why}", history=[],
                test_acc=None, val_acc=None, seconds=None, seconds_per_epoch=[],
                checkpoint=None, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))


def run_cells(client, jobs, out, records, report):
    """Run the jobs ``(full, key, pretrain_key)`` of :func:`mecref.experiments.run_grid` on
    the client's cluster; each finished cell is cached in ``out`` and put in ``records``.

    Every job is submitted at once (the scheduler spreads them over its workers; a cell that
    starts from a pretraining waits for it); the results are written as they come.
    """
    from .gridcache import _write_json_atomic
    distributed = _distributed()
    out = Path(out)
    tag = uuid.uuid4().hex[:8]
    futures, by_key, scattered = {}, {}, {}
    for full, key, pkey in jobs:
        pre = None
        if pkey is not None:
            pre = by_key.get(pkey)
            if pre is None:  # cached: read once, scattered once for every cell that needs it
                if pkey not in scattered:
                    scattered[pkey] = client.scatter(_cached_result(out, records[pkey]),
                                                     hash=False)
                pre = scattered[pkey]
        fut = client.submit(train_cell, full, pre, key=f"{_CELL_PREFIX}-{key}-{tag}",
                            pure=False, retries=0)
        futures[fut], by_key[key] = (full, key), fut
    by_key.clear()    # a finished cell's result is released once written (dependents keep theirs)
    status = _ClusterStatus(getattr(report, "on", False), client, futures)
    try:
        for fut in distributed.as_completed(list(futures)):
            full, key = futures[fut]
            if fut.status == "finished":
                res = fut.result()
                _write_files(out, res["files"])
                _write_json_atomic(out / "runs" / f"{key}.json", res["record"])
                rec = res["record"]
            elif fut.status == "cancelled":  # a restart of the cluster, or another client
                rec = _failed_record(full, key, "cancelled on the cluster")
            else:
                exc = fut.exception()
                if not isinstance(exc, distributed.KilledWorker):
                    fut.result()  # raises the cell's own error, with its remote traceback
                rec = _failed_record(full, key, f"{type(exc).__name__}: {exc}")
            del futures[fut]   # kept until here: an error above cancels it with the rest
            records[key] = dict(rec, from_cache=False)
            report.done(records[key])
            status.show()
    except BaseException:   # Ctrl-C, SIGTERM (as KeyboardInterrupt in the CLI), an error
        client.cancel(list(futures) + list(scattered.values()))
        raise


class _ClusterStatus:
    """After each finished cell (when progress is printed): how many of the grid's cells a
    worker is executing and how many wait (at the scheduler or in a worker's queue), as the
    scheduler sees them, and how many workers there are."""

    def __init__(self, on, client, futures):
        self.on, self.client, self.futures = on, client, futures

    def show(self):
        if not self.on or not self.futures:
            return
        keys = {f.key for f in self.futures}

        def executing(dask_scheduler, keys=keys):  # runs on the scheduler: no mecref there
            return sum(ts.key in keys for ws in dask_scheduler.workers.values()
                       for ts in ws.executing)
        try:
            running = self.client.run_on_scheduler(executing)
        except Exception:  # a scheduler that went away: the next result will say so
            return
        print(f"  cluster: {running} running, {len(keys) - running} queued, "
              f"{cluster_workers(self.client)} workers", file=sys.stderr, flush=True)
