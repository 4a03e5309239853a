"""Checkpoints: model parameters and buffers, optimiser state and the run's progress in one
``.npz`` file, written atomically (temporary file, flush, fsync, rename), with the run's
configuration as JSON inside it and beside it (``<name>.json``, for people to read).

A checkpoint that is truncated, corrupt, or made for another configuration is refused with a
:class:`CheckpointError` before anything is loaded into the model.
"""
from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import MecrefError, to_host

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "write_atomic", "run_folder",
           "FORMAT_VERSION", "PORTABLE_FIELDS"]

FORMAT_VERSION = 1
_META = "__meta__"
MAX_WIDTH = 4096        # channels per conv layer a checkpoint may declare
MAX_CLASSES = 100000
_MAX_META_BYTES = 64 << 20
# config entries a checkpoint may differ in from the run that reads it: the backend does the
# same math on another device, so a run trained on a GPU resumes or is evaluated on a CPU; and
# init_from is where the starting weights were read, a path (the same grid folder spelled
# otherwise, or a cluster worker's scratch copy, mecref.cluster) that a resumed run, whose
# weights come from the checkpoint, never reads
PORTABLE_FIELDS = ("backend", "init_from")
_MEMBER = re.compile(r"(model|optim)/[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.npy")


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"could not create the folder of checkpoint {str(path)!r}: "
                              f"{exc.strerror or exc}") from None
    arrays = {f"model/{k}": np.asarray(to_host(v)) for k, v in model_state.items()}
    for k, v in (optim_state or {}).items():
        arrays[f"optim/{k}"] = np.asarray(to_host(v))
    meta = dict(meta, format_version=FORMAT_VERSION)
    text = json.dumps(meta, indent=1, sort_keys=True, default=_json_default)
    arrays[_META] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    try:
        write_atomic(path, lambda fh: np.savez(fh, **arrays))
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {str(path)!r} (the previous one, if "
                              f"any, is kept): {exc.strerror or exc}") from None
    side = path.with_suffix(".json")
    try:
        write_atomic(side, lambda fh: fh.write(text.encode("utf-8")))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} was saved, but its sidecar "
                              f"{str(side)!r} could not be written: {exc.strerror or exc}") from None
    return path


def write_atomic(path, write):
    """Write a file all or nothing: ``write(fh)`` fills a temporary file in the same folder,
    which is flushed, fsync'ed and renamed over ``path``; on any failure it is removed and the
    old file stays as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())     # mkstemp makes 0600: give the user's umask
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path, expect_config: dict | None = None, keys=("model_config",)):
    """Read a checkpoint; return ``(model_state, optim_state, meta)`` as host arrays.

    Everything is read and checked before it is returned, so a failure never leaves a model
    half-loaded. With ``expect_config``, each entry named in ``keys`` must equal the same entry
    of the checkpoint's meta, or :class:`CheckpointError` says which differ; fields named in
    :data:`PORTABLE_FIELDS` (the backend, the path of ``init_from``) may differ.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__} {path!r}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        meta = _read_meta(path)
        _verify_zip(path, _byte_budget(path, meta))
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile, numpy's header parser, ...: any failure here is corruption
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt "
                              f"({type(exc).__name__}: {exc})") from None
    if not all(isinstance(v, np.ndarray) for v in data.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: a member is not a .npy array")
    data.pop(_META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{meta.get('format_version')!r}, this mecref reads {FORMAT_VERSION}")
    if expect_config is not None:
        diffs = [k for k in keys if _portable(meta.get(k)) != _portable(expect_config.get(k))]
        if diffs:
            detail = "; ".join(_differences(k, _portable(meta.get(k)), _portable(expect_config.get(k)))
                              for k in diffs)
            raise CheckpointError(f"checkpoint {str(path)!r} was made for another configuration ({detail})")
    model_state = {k[len("model/"):]: v for k, v in data.items() if k.startswith("model/")}
    optim_state = {k[len("optim/"):]: v for k, v in data.items() if k.startswith("optim/")}
    return model_state, optim_state, meta


def _read_meta(path):
    """The ``__meta__`` member, bounded in size and read first: a JSON object whose
    ``model_config`` (if any) declares a bounded model (so nothing huge is built from it)."""
    where = f"checkpoint {str(path)!r}"
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(_META + ".npy")
        except KeyError:
            raise CheckpointError(f"{where} has no metadata: not a mecref checkpoint") from None
        if info.file_size > _MAX_META_BYTES:
            raise CheckpointError(f"{where}: metadata declares {info.file_size} bytes, more than "
                                  f"{_MAX_META_BYTES}")
        with zf.open(info) as fh:
            raw = np.lib.format.read_array(fh, allow_pickle=False)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{where}: metadata must be a 1-d uint8 array of JSON text, got "
                              f"{raw.dtype} of shape {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: unreadable metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: metadata must be a JSON object, got "
                              f"{type(meta).__name__}")
    cfg = meta.get("model_config")
    if cfg is not None:
        check_model_config(cfg, where)
    return meta


def check_model_config(cfg, where):
    """A model_config read from a file: a dict whose width (when given) is at most three ints
    in 1..MAX_WIDTH and num_classes an int in 2..MAX_CLASSES; ``small_cnn`` checks the rest."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: model_config must be a JSON object, got "
                              f"{type(cfg).__name__}")
    width, nc = cfg.get("width", []), cfg.get("num_classes", 10)
    if (not isinstance(width, list) or len(width) > 3
            or not all(_is_int(w) and 1 <= w <= MAX_WIDTH for w in width)):
        raise CheckpointError(f"{where}: model_config width must be three ints in "
                              f"1..{MAX_WIDTH}, got {width!r}")
    if not (_is_int(nc) and 2 <= nc <= MAX_CLASSES):
        raise CheckpointError(f"{where}: model_config num_classes must be an int in "
                              f"2..{MAX_CLASSES}, got {nc!r}")


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _byte_budget(path, meta):
    """Most bytes the arrays of the declared model can take: every parameter (conv, BN, fc)
    and a few per-channel quantizer values, as float64, once for the model and once for the
    optimiser, plus .npy headers; without a full width, 256 MiB."""
    cfg = meta.get("model_config")
    if cfg is None or len(cfg.get("width", [])) != 3:
        return 256 << 20
    c1, c2, c3 = cfg["width"]
    nc = cfg.get("num_classes", 10)
    n = 9 * (c1 + c1 * c2 + c2 * c3) + (c3 + 1) * nc + 16 * (c1 + c2 + c3 + nc) + 256
    return 2 * 8 * n + (1 << 20)


def _verify_zip(path, budget, names=True):
    """Check every member's declared size before decompressing any (within ``budget``
    bytes in all; with ``names``, only the names a checkpoint holds), then read every member
    to its end, so zipfile checks its CRC-32 and that its local header names it as the
    directory does (numpy reads only an array's own bytes, and a corrupt header length would
    shift them without a CRC check); refuse duplicate names."""
    where = f"checkpoint {str(path)!r}"
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len({i.filename for i in infos}) != len(infos):
            raise zipfile.BadZipFile("duplicate member names")
        odd = [i.filename for i in infos if names
               and i.filename != _META + ".npy" and not _MEMBER.fullmatch(i.filename)]
        if odd:
            raise CheckpointError(f"{where} holds members no checkpoint has: {odd[:3]}")
        total = sum(i.file_size for i in infos if i.filename != _META + ".npy")
        if total > budget:
            raise CheckpointError(f"{where}: its arrays declare {total} bytes, more than the "
                                  f"{budget} its model can need")
        for info in infos:
            with zf.open(info) as fh:
                while fh.read(1 << 20):
                    pass




def _portable(entry):
    """A config entry without the fields that may differ between backends."""
    if not isinstance(entry, dict):
        return entry
    return {k: v for k, v in entry.items() if k not in PORTABLE_FIELDS}


def _differences(key, saved, wanted):
    """'key: field checkpoint a vs run b, ...' naming only the fields that differ."""
    if not (isinstance(saved, dict) and isinstance(wanted, dict)):
        return f"{key}: checkpoint {saved!r} vs run {wanted!r}"
    fields = sorted(f for f in set(saved) | set(wanted) if saved.get(f) != wanted.get(f))
    return f"{key}: " + ", ".join(f"{f} checkpoint {saved.get(f)!r} vs run {wanted.get(f)!r}"
                                  for f in fields)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- the run's folder
LOCK = ".lock"


@contextlib.contextmanager
def run_folder(checkpoint_dir, resume=False, overwrite=False):
    """Hold a training run's checkpoint folder for the duration of the ``with`` block.

    Before anything is trained: the folder is created and shown writable (a probe file is
    written, fsync'ed and removed), so a read-only folder, a parent that is a file or a full
    disk stop the run at once; a lock file (``.lock``, holding the pid) refuses a second run
    on the same folder while the first one lives (a lock left by a killed run is taken over);
    temporary files of a checkpoint write cut short by a kill are removed; and without
    ``resume`` a checkpoint already there (``last.npz`` or ``pretrain/last.npz``) is refused
    unless ``overwrite``. ``checkpoint_dir=None`` holds nothing.
    """
    if checkpoint_dir is None:
        yield None
        return
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a str or path-like, got "
                        f"{type(checkpoint_dir).__name__} {checkpoint_dir!r}")
    folder = Path(checkpoint_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"checkpoint_dir {str(folder)!r} is not a writable folder: "
                              f"{exc.strerror or exc}") from None
    lock = _take_lock(folder)
    try:
        for sub in (folder, folder / "pretrain"):
            for stale in sub.glob("last.*.tmp"):
                stale.unlink(missing_ok=True)
        if not resume and not overwrite:
            there = [p for p in (folder / "last.npz", folder / "pretrain" / "last.npz") if p.exists()]
            if there:
                raise CheckpointError(f"checkpoint_dir {str(folder)!r} already holds a checkpoint "
                                      f"({str(there[0])!r}): continue it (resume=True, --resume) "
                                      f"or replace it (overwrite=True, --overwrite)")
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def _take_lock(folder):
    """Create ``folder/.lock`` exclusively with this process's pid; a lock whose pid no longer
    runs is stale and taken over."""
    lock = folder / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise CheckpointError(f"checkpoint_dir {str(folder)!r} is in use by another run "
                                      f"(pid {pid}, lock file {str(lock)!r})") from None
            lock.unlink(missing_ok=True)        # stale: its run was killed
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return lock
    raise CheckpointError(f"checkpoint_dir {str(folder)!r}: could not take the lock {str(lock)!r}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
