"""Checkpoints: model parameters and buffers, optimiser state and the run's progress in one
``.npz`` file, written atomically (temporary file, flush, fsync, rename), with the run's
configuration as JSON inside it and beside it (``<name>.json``, for people to read).

A checkpoint that is truncated, corrupt, or made for another configuration is refused with a
:class:`CheckpointError` before anything is loaded into the model.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import MecrefError, to_host

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "write_atomic", "FORMAT_VERSION",
           "PORTABLE_FIELDS"]

FORMAT_VERSION = 1
_META = "__meta__"
# config entries a checkpoint may differ in from the run that reads it: the backend does the
# same math on another device, so a run trained on a GPU resumes or is evaluated on a CPU
PORTABLE_FIELDS = ("backend",)


class CheckpointError(MecrefError):
    """A checkpoint could not be read, or does not fit the run that asked for it."""


def save_checkpoint(path, model_state: dict, optim_state: dict | None, meta: dict) -> Path:
    """Write a checkpoint atomically and return its path.

    Parameters
    ----------
    path : str or Path
        Target ``.npz`` file; its folder is created.
    model_state : dict[str, ndarray]
        ``model.state_dict()``: host arrays (device arrays are copied to the host).
    optim_state : dict[str, ndarray] or None
        ``optimizer.state_dict()``, the same.
    meta : dict
        JSON-serialisable: the run config, epoch, step, history.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{k}": np.asarray(to_host(v)) for k, v in model_state.items()}
    for k, v in (optim_state or {}).items():
        arrays[f"optim/{k}"] = np.asarray(to_host(v))
    meta = dict(meta, format_version=FORMAT_VERSION)
    text = json.dumps(meta, indent=1, sort_keys=True, default=_json_default)
    arrays[_META] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    write_atomic(path, lambda fh: np.savez(fh, **arrays))
    write_atomic(path.with_suffix(".json"), lambda fh: fh.write(text.encode("utf-8")))
    return path


def write_atomic(path, write):
    """Write a file all or nothing: ``write(fh)`` fills a temporary file in the same folder,
    which is flushed, fsync'ed and renamed over ``path``; on any failure it is removed and the
    old file stays as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, expect_config: dict | None = None, keys=("model_config",)):
    """Read a checkpoint; return ``(model_state, optim_state, meta)`` as host arrays.

    Everything is read and checked before it is returned, so a failure never leaves a model
    half-loaded. With ``expect_config``, each entry named in ``keys`` must equal the same entry
    of the checkpoint's meta, or :class:`CheckpointError` says which differ; fields named in
    :data:`PORTABLE_FIELDS` (the backend) may differ.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__} {path!r}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        _verify_zip(path)
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile, numpy's header parser, ...: any failure here is corruption
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt "
                              f"({type(exc).__name__}: {exc})") from None
    if not all(isinstance(v, np.ndarray) for v in data.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: a member is not a .npy array")
    if _META not in data:
        raise CheckpointError(f"checkpoint {str(path)!r} has no metadata: not a mecref checkpoint")
    try:
        meta = json.loads(data.pop(_META).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: unreadable metadata ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{meta.get('format_version')!r}, this mecref reads {FORMAT_VERSION}")
    if expect_config is not None:
        diffs = [k for k in keys if _portable(meta.get(k)) != _portable(expect_config.get(k))]
        if diffs:
            detail = "; ".join(f"{k}: checkpoint {meta.get(k)!r} vs run {expect_config.get(k)!r}"
                               for k in diffs)
            raise CheckpointError(f"checkpoint {str(path)!r} was made for another configuration ({detail})")
    model_state = {k[len("model/"):]: v for k, v in data.items() if k.startswith("model/")}
    optim_state = {k[len("optim/"):]: v for k, v in data.items() if k.startswith("optim/")}
    return model_state, optim_state, meta


def _verify_zip(path):
    """Read every member to its end, so zipfile checks its CRC-32 and that its local header
    names it as the directory does (numpy reads only an array's own bytes, and a corrupt
    header length would shift them without a CRC check); refuse duplicate names."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len({i.filename for i in infos}) != len(infos):
            raise zipfile.BadZipFile("duplicate member names")
        for info in infos:
            with zf.open(info) as fh:
                while fh.read(1 << 20):
                    pass




def _portable(entry):
    """A config entry without the fields that may differ between backends."""
    if not isinstance(entry, dict):
        return entry
    return {k: v for k, v in entry.items() if k not in PORTABLE_FIELDS}


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
