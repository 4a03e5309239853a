"""A grid's folder: a cell trained into it, and its files (run records, ``grid.json``) written
and read back.

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

The environment of the workers that run cells (one BLAS thread each, glibc's thresholds;
:mod:`mecref.gridrun`) is kept here too, for the local pool and for a Dask worker's process
(:func:`mecref.cluster.worker_environ`) alike. Used through :mod:`mecref.experiments`, and by
:mod:`mecref.cluster` on a Dask worker.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from .backend import MecrefError, cpu_model
from .checkpoint import write_atomic
from .grids import _digest, _key_view, bits_label, cell_config, group_key, method_label

_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MECREF_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# One cell, trained into the folder
# ----------------------------------------------------------------------------------------------

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


def _run_cell(full: dict, out_dir: str, progress=False, init_from=None) -> dict:
    """Train one cell (resuming from its checkpoint), write its run file, return the record.

    ``init_from``: the checkpoint of the cell's FP32 pretraining (``pretrain_epochs > 0``);
    it is not part of the cell's configuration (the pretraining's configuration is)."""
    from .train import TrainConfig, TrainingDivergedError, train_small_cnn
    out = Path(out_dir)
    key = _digest(full)
    cfg = TrainConfig(**full).validate()
    if init_from is not None:
        cfg = dataclasses.replace(cfg, init_from=str(init_from))
    rec = dict(key=key, group=group_key(full), label=method_label(full), bits=bits_label(full),
               seed=full["seed"], config=full, mecref_version=_version(),
               blas_threads=_blas_threads(), pid=os.getpid(), cpu=cpu_model(),
               pretrained_from=None if init_from is None else
               str(Path(init_from).resolve().relative_to(out.resolve())))
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


def _init_path(out, records, key, pkey):
    """The pretrained checkpoint a job starts from, or a record saying why it cannot run."""
    if pkey is None:
        return None, None
    pre = records[pkey]
    if pre["status"] != "ok":
        return None, dict(pre, key=key, status="diverged", history=[], checkpoint=None,
                          error=f"its FP32 pretraining {pkey} diverged: {pre['error']}")
    return str(Path(out, pre["checkpoint"])), None


# ----------------------------------------------------------------------------------------------
# The folder's files: run records and grid.json
# ----------------------------------------------------------------------------------------------

def _load_record(path: Path, full: dict):
    """A cached run, or None when it is missing, unreadable or made for another config."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
        return None
    return rec if _key_view(rec["config"]) == _key_view(full) else None


def _write_json_atomic(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, sort_keys=True)
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def _read_grid(path: Path) -> list:
    """The configurations listed in ``grid.json`` ([] when there is none); an unreadable or
    malformed one is refused naming the file (it is the folder's record of what was run)."""
    if not path.is_file():
        return []
    try:
        configs = json.loads(path.read_text())["configs"]
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            raise TypeError("configs is not a list of objects")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise MecrefError(f"{str(path)!r} is unreadable or malformed ({type(exc).__name__}: "
                          f"{exc}); restore it, or remove it to start its list again") from None
    return configs


def _record_grid(path: Path, configs):
    """Keep ``grid.json``: every configuration ever run in this folder, first-run order."""
    known = _read_grid(path)
    seen = {group_key(c) for c in known}
    for c in configs:
        full = dict(cell_config(c, 0), seed=None)
        if group_key(full) not in seen:
            seen.add(group_key(full))
            known.append(full)
    _write_json_atomic(path, dict(configs=known))
