"""The run folder: what a training run keeps, beside its checkpoint.

``mecref train`` writes one by default (``runs/<name or date-time>/``); from Python,
``train_small_cnn(..., out="runs/x")`` does the same, and without ``out`` nothing is written.
The folder is held by :func:`mecref.checkpoint.run_folder` (checked writable, locked, never
overwritten without ``overwrite``) and holds:

==================  ===============================================================
``config.json``     the run's :class:`~mecref.train.TrainConfig` and the model's config
``history.csv``     one row per finished epoch (loss, ce, reg, accuracies, lr, seconds)
``history.json``    the same rows as a JSON list
``curves.png``      the training curves: loss terms and accuracies against the epoch
``last.npz``        the checkpoint (and ``last.json``, its metadata for people to read)
``summary.txt``     one line: the method, its settings, the test accuracy, the time
==================  ===============================================================

The history and the curves are rewritten after every epoch, so a run that is stopped keeps
what it had done; every file is written atomically (:func:`mecref.checkpoint.write_atomic`).
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from .checkpoint import write_atomic

__all__ = ["FILES", "HISTORY_COLUMNS", "default_run_dir", "write_config", "write_history",
           "plot_curves", "summary_line", "write_summary"]

FILES = {"config": "config.json", "history_csv": "history.csv", "history_json": "history.json",
         "curves": "curves.png", "checkpoint": "last.npz", "summary": "summary.txt"}
HISTORY_COLUMNS = ("epoch", "loss", "ce", "reg", "train_acc", "val_acc", "test_acc", "lr",
                   "seconds", "samples_per_s", "backend")


def default_run_dir(name=None, root="runs") -> Path:
    """``root/name``, or ``root/<YYYYmmdd-HHMMSS>`` (local time) without a name; a date-time
    folder that exists already gets ``-2``, ``-3``, ... so two runs never share one."""
    if name is not None:
        if not isinstance(name, str) or not name.strip() or "/" in name or name in (".", ".."):
            from .backend import MecrefError
            raise MecrefError(f"name (of the run) must be a non-empty folder name without '/', got {name!r}")
        return Path(root) / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = Path(root) / stamp, 1
    while path.exists():
        k += 1
        path = Path(root) / f"{stamp}-{k}"
    return path


def write_config(folder, config: dict, model_config: dict) -> Path:
    """``config.json``: the run's configuration (``TrainConfig(**config)`` rebuilds it)."""
    path = Path(folder) / FILES["config"]
    text = json.dumps(dict(config=config, model_config=model_config), indent=1, sort_keys=True)
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))
    return path


def write_history(folder, history: list) -> tuple:
    """``history.csv`` and ``history.json``: one row per finished epoch; returns both paths."""
    folder = Path(folder)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in HISTORY_COLUMNS})
    paths = folder / FILES["history_csv"], folder / FILES["history_json"]
    write_atomic(paths[0], lambda fh: fh.write(buf.getvalue().encode("utf-8")))
    text = json.dumps(history, indent=1)
    write_atomic(paths[1], lambda fh: fh.write(text.encode("utf-8")))
    return paths


def plot_curves(history: list, path, title: str = "") -> Path:
    """The training curves as a PNG: the loss, its cross-entropy part and the regulariser's
    value against the epoch (left), the train, validation and test accuracy (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plotting import style_context
    epochs = [h["epoch"] for h in history]
    with style_context():
        fig = Figure(figsize=(9.0, 3.6))
        FigureCanvasAgg(fig)
        ax_loss, ax_acc = fig.subplots(1, 2)
        ax_loss.plot(epochs, [h["loss"] for h in history], marker="o", label="loss (cross-entropy + beta * regulariser)")
        ax_loss.plot(epochs, [h["ce"] for h in history], marker="o", label="cross-entropy")
        if any(h.get("reg") for h in history):
            ax_loss.plot(epochs, [h["reg"] for h in history], marker="o", label="regulariser (before beta)")
        ax_loss.set(xlabel="epoch", ylabel="training loss (mean over the epoch)")
        ax_loss.legend()
        for key, label in (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test")):
            if any(h.get(key) is not None for h in history):
                ax_acc.plot(epochs, [h.get(key) for h in history], marker="o", label=label)
        ax_acc.set(xlabel="epoch", ylabel="accuracy")
        ax_acc.legend()
        for ax in (ax_loss, ax_acc):
            ax.xaxis.get_major_locator().set_params(integer=True)
        if title:
            fig.suptitle(title)
        path = Path(path)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    write_atomic(path, lambda fh: fh.write(buf.getvalue()))
    return path


def method_text(config: dict) -> str:
    """'W2A2 lsq + mec_taylor (n=4, beta=0.2, eps=8)', 'FP32, no regulariser', ..."""
    q = config["quantizer"]
    what = "FP32" if q == "fp32" else f"W{config['w_bits']}A{config['a_bits']} {q}"
    reg = config.get("reg")
    if reg is None:
        return f"{what}, no regulariser"
    extra = {"mec_taylor": f"n={config.get('order')}, ", "moe": f"K={config.get('experts')}, "}.get(reg, "")
    where = ", also on the inner blocks" if config.get("reg_at") == "blocks" else ""
    return (f"{what} + {reg} ({extra}beta={config['reg_weight']:g}, eps={config['eps']:g}"
            f"{where})")


def summary_line(config: dict, history: list, seconds: float) -> str:
    """One line for a finished run: method and settings, accuracies, epochs and time."""
    last = history[-1]
    val = "" if last.get("val_acc") is None else f", validation {last['val_acc']:.4f}"
    return (f"{method_text(config)}: test accuracy {last['test_acc']:.4f}{val} after "
            f"{len(history)} epoch{'s' if len(history) != 1 else ''} ({seconds:.1f} s)")


def write_summary(folder, line: str) -> Path:
    path = Path(folder) / FILES["summary"]
    write_atomic(path, lambda fh: fh.write((line + "\n").encode("utf-8")))
    return path
