"""The MEC-Quant training loop (docs/derivations.md, section T1).

    loss = CE(f_q([x1; x2]), [y; y])  +  beta * L_reg(Z1, Z2)

f_q is the (fake-)quantized small CNN; x1, x2 two augmented views of the batch, run as one
concatenated batch; Z1, Z2 the penultimate features of the two views (l2-normalised inside the
entropy functions); L_reg one of

- ``"mec"``:        mec_loss(Z1, Z2, eps) / m                  (exact, -mu logdet(I + C) / m)
- ``"mec_taylor"``: mec_loss(Z1, Z2, eps, order) / m           (order-n Taylor form)
- ``"moe"``:        -(L_moe(Z1) + L_moe(Z2)) / (2 m)           (mixture-of-experts coding length)

each a quantity to minimise that maximises the coding length (entropy) of the features.
Every gradient is closed form: no autodiff anywhere.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data as mdata
from . import losses, nn, optim, regularizers, runlog, schemes
from .backend import (MecrefError, array_module, backend_name, get_xp,
                      scipy_blas_single_thread, to_backend, to_host)
from .checkpoint import CheckpointError, load_checkpoint, run_folder, save_checkpoint
from .validate import check_bits, check_choice, check_int, check_positive, values_trusted

__all__ = ["TrainConfig", "TrainResult", "TrainingDivergedError", "train_small_cnn",
           "loss_and_grads", "evaluate", "QUANTIZERS", "REGULARIZERS"]

PLACEMENTS = ("features", "blocks")
DEFAULT_REG = "mec_taylor"   # the regulariser of a quantized run that names none
TAPS = {"features": (), "blocks": ("pool1", "pool2")}  # inner block outputs the term also reads


class _Registered(Sequence):
    """``(first, *registered names)``, read afresh from a registry on each use."""

    def __init__(self, first, registry):
        self._first, self._registry = first, registry

    def _names(self):
        return (self._first,) + self._registry.names()

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self):
        return len(self._names())

    def __repr__(self):
        return repr(self._names())


QUANTIZERS = _Registered("fp32", schemes)        # "fp32" and every registered scheme
REGULARIZERS = _Registered(None, regularizers)  # None and every registered regulariser


class TrainingDivergedError(MecrefError, FloatingPointError):
    """The loss or a gradient became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run; ``TrainConfig(**result.config)`` rebuilds it."""
    quantizer: str = "lsq"          # "fp32" (full precision) or a name in mecref.schemes.REGISTRY
    w_bits: int = 2                 # weight bits of the inner layers (1..8)
    a_bits: int = 2                 # activation bits of the inner layers (1..8)
    first_last_bits: int = 8        # bits of the first conv and the last linear (32 = FP)
    reg: str | None = "default"     # None or a name in mecref.regularizers.REGISTRY; by
    #                                 default mec_taylor, and None for quantizer="fp32"
    reg_weight: float = 0.2         # beta (defaults: the sweep in docs/results.md)
    eps: float = 8.0                # distortion epsilon (not squared) of the coding length
    order: int = 4                  # Taylor order for reg="mec_taylor"
    experts: int = 4                # K for reg="moe"
    epochs: int = 6
    batch_size: int = 128           # images per view; the network sees 2 * batch_size
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    dataset: str = "bundled"        # "bundled" | "fashion-mnist" | "idx"
    data_dir: str | None = None
    val_size: int = 0               # images held out of train for choosing hyperparameters
    train_limit: int | None = None  # use only the first n training images (smoke runs)
    seed: int = 0
    backend: str = "numpy"
    width: tuple = (16, 32, 64)
    init_from: str | None = None    # FP32 checkpoint to start QAT from
    pretrain_epochs: int = 0        # >0: FP32 epochs first, then this run starts from them
    pretrain_lr: float = 0.1        # the peak learning rate of that FP32 pretraining
    reg_at: str = "features"        # "features", or "blocks": also the inner blocks' outputs

    def __post_init__(self):
        # a full-precision run has no regulariser unless one is asked for; any other run has
        # the main job's (the Taylor form); "none" is None's spelling on the command line
        if self.reg == "default":
            self.reg = None if self.quantizer == "fp32" else DEFAULT_REG
        elif isinstance(self.reg, str) and self.reg.lower() == "none":
            self.reg = None

    def validate(self):
        check_choice("quantizer", self.quantizer, tuple(QUANTIZERS))
        check_choice("reg", self.reg, tuple(REGULARIZERS))
        if self.reg is not None:
            missing = [p for p in regularizers.get(self.reg).params if not hasattr(self, p)]
            if missing:
                raise MecrefError(f"regulariser {self.reg!r} reads fields TrainConfig lacks: {missing}")
        check_choice("reg_at", self.reg_at, PLACEMENTS)
        check_int("pretrain_epochs", self.pretrain_epochs, 0)
        check_positive("pretrain_lr", self.pretrain_lr)
        if self.quantizer != "fp32":
            check_bits("w_bits", self.w_bits)
            check_bits("a_bits", self.a_bits)
        check_bits("first_last_bits", self.first_last_bits, allowed=list(range(1, 9)) + [32])
        check_positive("reg_weight", self.reg_weight, allow_zero=True)
        check_positive("eps", self.eps)
        check_int("order", self.order, 1, 64)
        check_int("experts", self.experts, 1, 64)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 2)
        check_positive("lr", self.lr)
        if (isinstance(self.momentum, bool) or not isinstance(self.momentum, numbers.Real)
                or not 0.0 <= float(self.momentum) < 1.0):
            raise MecrefError(f"momentum must be in [0, 1), got {self.momentum!r}")
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        if isinstance(self.epochs, int) and self.warmup_epochs > self.epochs:
            raise MecrefError(f"warmup_epochs ({self.warmup_epochs!r}) must be at most epochs "
                              f"({self.epochs}): the learning rate would never reach lr")
        check_int("val_size", self.val_size, 0)
        check_choice("dataset", self.dataset, ("bundled", "fashion-mnist", "idx"))
        for name in ("data_dir", "init_from"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path (str or path-like) or None, got "
                                f"{type(v).__name__} {v!r}")
        if self.train_limit is not None:
            check_int("train_limit", self.train_limit, 1)
        check_int("seed", self.seed, 0)
        get_xp(self.backend)
        if (not isinstance(self.width, (tuple, list)) or len(self.width) != 3
                or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.width)):
            raise MecrefError(f"width must be three positive ints, got {self.width!r}")
        self.width = tuple(int(w) for w in self.width)
        return self

    def model_config(self) -> dict:
        fp = self.quantizer == "fp32"
        return dict(quantizer=None if fp else self.quantizer,
                    w_bits=32 if fp else int(self.w_bits), a_bits=32 if fp else int(self.a_bits),
                    first_last_bits=32 if fp else int(self.first_last_bits),
                    width=list(self.width), num_classes=10)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["width"] = list(self.width)
        return d

    def pretrain_config(self) -> "TrainConfig":
        """The FP32 run this one starts from when ``pretrain_epochs > 0`` (the standard QAT
        protocol): the same data, split, seed, width, batch and optimiser, no quantizer, no
        regulariser, ``pretrain_epochs`` epochs at ``pretrain_lr``; every other field at its
        default, so all the methods of a seed share one pretraining."""
        if not self.pretrain_epochs:
            raise MecrefError("pretrain_config: this run has pretrain_epochs=0 (no pretraining)")
        keep = ("dataset", "data_dir", "val_size", "train_limit", "seed", "backend", "width",
                "batch_size", "momentum", "weight_decay", "warmup_epochs")
        return TrainConfig(**{k: getattr(self, k) for k in keep}, quantizer="fp32", reg=None,
                           epochs=int(self.pretrain_epochs), lr=float(self.pretrain_lr)).validate()


@dataclass
class TrainResult:
    """What a run returns: its config, per-epoch history, final accuracies and the model."""
    config: dict
    history: list
    test_acc: float
    val_acc: float | None
    model: object = field(repr=False)
    checkpoint: str | None = None
    seconds: float = 0.0
    out: str | None = None          # the run folder, when one was asked for (``out=``)
    files: dict = field(default_factory=dict)  # what was written there: name -> path

    def headline(self) -> str:
        """One line: the method and its settings, the final accuracy, epochs and time."""
        return runlog.summary_line(self.config, self.history, self.seconds)

    def summary(self) -> str:
        """A Markdown table of the per-epoch history."""
        cols = ["epoch", "loss", "ce", "reg", "train_acc", "val_acc", "test_acc", "seconds", "samples_per_s"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for h in self.history:
            cells = []
            for c in cols:
                v = h.get(c)
                cells.append("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def train_small_cnn(config: TrainConfig | None = None, *, progress=True, out=None,
                    checkpoint_dir=None, resume=False, overwrite=False,
                    dataset: "mdata.Dataset | None" = None, **overrides) -> TrainResult:
    """Train the small CNN with quantization-aware training and an entropy regulariser.

    ``train_small_cnn(w_bits=2, a_bits=2, quantizer="lsq", reg="mec")``; any
    :class:`TrainConfig` field can be passed by name (``quantizer="fp32"`` without ``reg``
    trains without a regulariser).

    Nothing is written unless asked. With ``out`` (a folder) the run folder of
    :mod:`mecref.runlog` is written there: config, history (CSV and JSON) and curves (PNG)
    after every epoch, the checkpoint, and a one-line summary at the end; ``result.files``
    names each. With ``checkpoint_dir`` only the checkpoint is written (``last.npz``, after
    every epoch, atomically). With ``resume=True`` a run picks up from the checkpoint in
    either folder and ends with the same parameters as an uninterrupted run (NumPy backend).
    The folder is held for the run (:func:`mecref.checkpoint.run_folder`): checked writable
    first, locked against a second run, and a checkpoint already there is refused without
    ``resume`` unless ``overwrite``. The configuration is checked before the folder is made.

    progress : bool or callable
        True: a progress bar on stderr when it is a terminal, else a plain line every
        ``MECREF_PROGRESS_SECONDS`` seconds (default 30) and one per epoch; a callable gets
        each epoch's history row instead; False: silent.

    Returns
    -------
    TrainResult
    """
    if out is not None and checkpoint_dir is not None:
        raise MecrefError("give out (the run folder) or checkpoint_dir (the checkpoint alone), "
                          f"not both; got out={out!r}, checkpoint_dir={checkpoint_dir!r}")
    folder = out if out is not None else checkpoint_dir
    if resume and folder is None:
        raise MecrefError("resume=True needs checkpoint_dir (or out), the folder of the run to continue")
    cfg, dataset = _resolve_config(config, dataset, overrides)
    with scipy_blas_single_thread(), run_folder(folder, resume, overwrite):
        return _train(cfg, progress, folder, resume, dataset, run_files=out is not None)


def _resolve_config(config, dataset, overrides):
    """The validated TrainConfig of a call, and the Dataset given (or None)."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (or give its fields by name: "
                        f"train_small_cnn(**{{...}})), got {type(config).__name__}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"train_small_cnn got unknown arguments {sorted(unknown)}")
    if isinstance(dataset, str):  # a name is TrainConfig's field of the same name ("bundled", ...)
        overrides, dataset = dict(overrides, dataset=dataset), None
    elif dataset is not None and not isinstance(dataset, mdata.Dataset):
        raise TypeError(f"dataset must be a mecref.data.Dataset or a dataset name, got "
                        f"{type(dataset).__name__}")
    # without a config, the fields given build one (so quantizer="fp32" alone means no
    # regulariser); a config given keeps its own fields where no override names them
    cfg = TrainConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
    cfg.validate()
    get_xp(cfg.backend)  # an unavailable backend is refused here, before any data is read
    return cfg, dataset


def _train(cfg, progress, checkpoint_dir, resume, dataset, run_files=False) -> TrainResult:
    report = _Progress(progress)

    ds = dataset if dataset is not None else mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    x_train, y_train = ds.x_train, ds.y_train
    x_val = y_val = None
    if cfg.val_size:
        if cfg.val_size >= len(x_train):
            raise MecrefError(f"val_size ({cfg.val_size}) must be smaller than the training data "
                              f"({len(x_train)} images)")
        (x_train, y_train), (x_val, y_val) = mdata.train_val_split(ds, cfg.val_size, seed=cfg.seed)
    if cfg.train_limit is not None:
        x_train, y_train = x_train[:cfg.train_limit], y_train[:cfg.train_limit]
    if cfg.batch_size > len(x_train):
        raise MecrefError(f"batch_size ({cfg.batch_size}) is larger than the training data "
                          f"({len(x_train)} images)")

    model = nn.small_cnn(**cfg.model_config(), backend=cfg.backend, seed=cfg.seed)
    opt = optim.SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # the images move to the backend once per run (uint8: a quarter of the float32 size), not
    # once per epoch or per evaluation; a no-op on NumPy
    x_train, y_train = _on(cfg.backend, x_train, y_train)
    x_test, y_test = _on(cfg.backend, ds.x_test, ds.y_test)
    if x_val is not None:
        x_val, y_val = _on(cfg.backend, x_val, y_val)
    steps_per_epoch = len(x_train) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    run_meta = dict(config=cfg.as_dict(), model_config=model.config)
    ckpt_path = Path(checkpoint_dir) / "last.npz" if checkpoint_dir is not None else None
    files = {}
    if run_files:
        files["config"] = str(runlog.write_config(checkpoint_dir, run_meta["config"], model.config))
    history, start_epoch, step = [], 0, 0
    if resume and ckpt_path is not None and ckpt_path.exists():
        m_state, o_state, meta = load_checkpoint(ckpt_path, expect_config=run_meta,
                                                 keys=("config", "model_config"))
        _check_progress(meta, ckpt_path, cfg.epochs, steps_per_epoch)
        _check_ready(m_state, ckpt_path)
        try:  # each load checks everything before it copies anything in
            model.load_state_dict(m_state)
            opt.load_state_dict(o_state)
        except MecrefError as exc:
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} does not fit the model: {exc}") from None
        history, start_epoch, step = meta["history"], meta["epoch"], meta["step"]
        report.line(f"resumed from {ckpt_path} after epoch {start_epoch}")
        if meta["config"].get("backend") != cfg.backend:  # same math, another device: allowed
            report.line(f"the checkpoint was written on backend={meta['config'].get('backend')!r}, "
                        f"this run continues on backend={cfg.backend!r}")
    elif cfg.init_from:
        _load_fp_weights(model, cfg.init_from)
    elif cfg.pretrain_epochs:
        pre_dir = Path(checkpoint_dir) / "pretrain" if checkpoint_dir is not None else None
        report.line(f"FP32 pretraining: {cfg.pretrain_epochs} epochs")
        pre = _train(cfg.pretrain_config(), progress, pre_dir, resume, ds)
        _copy_fp_weights(model, pre.model.state_dict(), "the FP32 pretraining")

    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])  # one stream per epoch: resumable
        t0 = time.perf_counter()
        sums = dict(loss=0.0, ce=0.0, reg=0.0, correct=0, seen=0)
        batches = mdata.iterate_batches(x_train, y_train, cfg.batch_size, rng, shuffle=True,
                                        drop_last=True, backend=cfg.backend)
        for i, (xb, yb) in enumerate(batches):
            opt.lr = optim.cosine_lr(step, total_steps, cfg.lr, warmup_steps)
            try:
                parts = train_step(model, opt, xb, yb, rng, cfg, step)
            except TrainingDivergedError as exc:
                raise TrainingDivergedError(f"{exc} (epoch {epoch + 1}, batch {i + 1}); "
                                            f"{_kept(ckpt_path, history)}") from None
            step += 1
            for k in ("loss", "ce", "reg"):
                sums[k] += parts[k]
            sums["correct"] += parts["correct"]
            sums["seen"] += parts["seen"]
            report.step(epoch, cfg.epochs, i + 1, steps_per_epoch, sums, time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        bad = _nonfinite_state(model)
        if bad is not None:  # an update overflowed: never evaluate or checkpoint such a model
            raise TrainingDivergedError(f"{bad} after step {step - 1} (epoch {epoch + 1}); "
                                        f"{_kept(ckpt_path, history)}")
        n = max(i + 1, 1)
        row = dict(epoch=epoch + 1, loss=sums["loss"] / n, ce=sums["ce"] / n, reg=sums["reg"] / n,
                   train_acc=sums["correct"] / max(sums["seen"], 1),
                   val_acc=evaluate(model, x_val, y_val) if x_val is not None else None,
                   test_acc=evaluate(model, x_test, y_test), lr=float(opt.lr),
                   seconds=seconds, samples_per_s=sums["seen"] / seconds, backend=cfg.backend)
        history.append(row)
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, model.state_dict(), opt.state_dict(),
                            dict(run_meta, epoch=epoch + 1, step=step, history=history))
        if run_files:
            _write_run_files(checkpoint_dir, history, cfg, files)
        report.epoch_end(row, cfg.epochs)
    last = history[-1]
    result = TrainResult(config=cfg.as_dict(), history=history, test_acc=last["test_acc"],
                         val_acc=last["val_acc"], model=model,
                         checkpoint=str(ckpt_path) if ckpt_path else None,
                         seconds=time.perf_counter() - t_run)
    if run_files:
        if ckpt_path is not None:
            files["checkpoint"] = str(ckpt_path)
        if start_epoch >= cfg.epochs:  # a resumed run that had finished: nothing written yet
            _write_run_files(checkpoint_dir, history, cfg, files)
        files["summary"] = str(runlog.write_summary(checkpoint_dir, result.headline()))
        result.out, result.files = str(checkpoint_dir), files
    report.close()
    return result


def _write_run_files(folder, history, cfg, files):
    """The run folder's history (CSV, JSON) and curves, rewritten after each epoch."""
    csv_path, json_path = runlog.write_history(folder, history)
    files["history_csv"], files["history_json"] = str(csv_path), str(json_path)
    files["curves"] = str(runlog.plot_curves(history, Path(folder) / runlog.FILES["curves"],
                                             title=runlog.method_text(cfg.as_dict())))


def time_step(cfg: TrainConfig, dataset: "mdata.Dataset | None" = None, steps: int = 2) -> tuple:
    """Measure a run before starting it: ``(seconds per step, steps per epoch)`` of ``cfg``
    on its data, the fastest of ``steps`` training steps after one warm-up step (which also
    initialises the quantizers). Nothing is written; the data is loaded unless given."""
    cfg = cfg.validate()
    ds = dataset if dataset is not None else mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    n = len(ds.x_train) - cfg.val_size
    if cfg.train_limit is not None:
        n = min(n, cfg.train_limit)
    n_batch = min(cfg.batch_size, n)
    model = nn.small_cnn(**cfg.model_config(), backend=cfg.backend, seed=cfg.seed)
    opt = optim.SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    xb, yb = _on(cfg.backend, ds.x_train[:n_batch], ds.y_train[:n_batch])
    rng = np.random.default_rng(cfg.seed)
    times = []
    with scipy_blas_single_thread():
        for k in range(1 + steps):
            t0 = time.perf_counter()
            train_step(model, opt, mdata.normalize(xb, array_module(xb)), yb, rng, cfg, k)
            times.append(time.perf_counter() - t0)
    return min(times[1:]), max(n // cfg.batch_size, 1)


def train_step(model, opt, xb, yb, rng, cfg: TrainConfig, step: int) -> dict:
    """One step: two views forward, CE + beta * L_reg, closed-form backward, SGD update.

    The batch comes from a dataset checked when it was loaded, so the layers, the loss and the
    regulariser run with their value checks off (``validate.values_trusted``) and the step
    reads the device once: the loss parts, the correct count and the gradients' squared norm,
    in one small array (on a GPU every read is a host sync). A non-finite loss or gradient is
    then located, with more reads, before any update.
    """
    x1, x2 = mdata.two_views(xb, rng)
    parts = loss_and_grads(model, x1, x2, yb, cfg, step)
    opt.step()
    return dict(loss=parts["loss"], ce=parts["ce"], reg=parts["reg"], correct=parts["correct"],
                seen=int(2 * xb.shape[0]))


def loss_and_grads(model, x1, x2, yb, cfg: TrainConfig, step: int = 0) -> dict:
    """The objective of T1 on two views ``x1, x2`` (B, C, H, W) of a batch with labels ``yb``
    (B,), and its closed-form gradient: fills every layer's ``grads`` (no update).

    .. math:: \\mathcal{L} = \\mathrm{CE}(f_q([x_1; x_2]), [y; y]) + \\beta\\, L_{reg}(Z_1, Z_2)

    Returns ``dict(loss, ce, reg, correct, logits, y)`` (host floats and the correct count;
    ``logits`` (2B, classes) and ``y`` (2B,) of the concatenated batch); raises
    :class:`TrainingDivergedError` on NaN or inf.
    """
    xp = array_module(x1)
    B = x1.shape[0]
    x = xp.concatenate([x1, x2], axis=0)
    y = xp.concatenate([yb, yb], axis=0)
    try:
        with values_trusted():
            logits, feats, taps = model.forward(x, train=True, taps=_taps(cfg))
            ce, ce_cache = losses.softmax_cross_entropy(logits, y)
            reg, dfeats, dtaps = _regularizer(feats, taps, B, cfg)
            model.backward(losses.softmax_cross_entropy_backward(ce_cache, 1.0), dfeats, dtaps)
    except (MecrefError, np.linalg.LinAlgError) as exc:  # the regulariser is undefined
        # (det(I + C) <= 0) or its Gram matrix lost positive definiteness in floating point
        # (a tiny per-expert eps); a NaN on the way may be the cause
        where = _locate_nonfinite(model, x)
        if where is None:
            raise TrainingDivergedError(f"{exc} (at training step {step})") from exc
        raise TrainingDivergedError(f"{where} at step {step}") from exc
    named = list(model.named_params())
    grad_sq = sum(xp.sum(layer.grads[key] * layer.grads[key]) for _, layer, key in named)
    correct = (logits.argmax(axis=1) == y).sum()
    parts = [ce, grad_sq, correct] + ([] if reg is None else [reg])
    host = to_host(xp.stack([xp.asarray(v, dtype=np.float64) for v in parts]))  # the one read
    ce_h, grad_sq_h, correct_h = float(host[0]), float(host[1]), int(host[2])
    reg_h = 0.0 if reg is None else float(host[3])
    loss = ce_h + cfg.reg_weight * reg_h
    if not (math.isfinite(loss) and math.isfinite(grad_sq_h)):
        # a non-finite activation explains both (a quantizer clips inf to a finite code, so
        # the loss can stay finite while the step's gradient does not)
        where = _locate_nonfinite(model, x)
        if where is not None:
            raise TrainingDivergedError(f"{where} at step {step}")
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"loss is {loss} (ce={ce_h}, reg={reg_h}) at step {step}")
        _check_grads(model, step)
    return dict(loss=loss, ce=ce_h, reg=reg_h, correct=correct_h, logits=logits, y=y)


def _taps(cfg: TrainConfig) -> tuple:
    """The inner layers whose outputs the regulariser also reads (``reg_at``)."""
    if cfg.reg is None or cfg.reg_weight == 0.0:
        return ()
    return TAPS[cfg.reg_at]


def _regularizer(feats, taps, B, cfg: TrainConfig):
    """L_reg's value (before beta: a float64 0-d array on the features' backend, or None
    without a regulariser) and beta times its gradients: w.r.t. the (2B, d) penultimate
    features, and w.r.t. each tapped block output (derivations T1, T3)."""
    if cfg.reg is None or cfg.reg_weight == 0.0:
        return None, None, None
    reg = regularizers.get(cfg.reg)
    params = {p: getattr(cfg, p) for p in reg.params}
    value, dfeats = _regularize_rows(reg, feats, B, cfg.eps, cfg.reg_weight, params)
    dtaps = {}
    for name, h in taps.items():  # the same strength d/eps^2 at every place (derivations T3)
        rows = h.reshape(h.shape[0], -1)
        eps_b = cfg.eps * math.sqrt(rows.shape[1] / feats.shape[1])
        v, drows = _regularize_rows(reg, rows, B, eps_b, cfg.reg_weight, params)
        value = value + v
        dtaps[name] = drows.reshape(h.shape)
    return value, dfeats, dtaps


def _regularize_rows(reg, rows, B, eps, beta, params):
    """L_reg(Z1, Z2) / B on the (2B, d) rows of the two views (a float64 0-d array on their
    backend), and beta times its gradient."""
    xp = array_module(rows)
    # a sample whose ReLU features are all zero has no direction: give it a tiny constant row
    # (direction 1/sqrt(d)), see T1; a select, not a branch on the host
    dead = (rows == 0).all(axis=1)
    rows = xp.where(dead[:, None], xp.finfo(rows.dtype).tiny ** 0.25, rows)
    Z1, Z2 = rows[:B], rows[B:]
    L, cache = reg.forward(Z1, Z2, eps, **params)
    dZ1, dZ2 = reg.backward(cache, beta / B)
    value = xp.asarray(L, dtype=np.float64) / B
    return value, xp.concatenate([dZ1, dZ2], axis=0).astype(rows.dtype, copy=False)


def _check_grads(model, step):
    """After a non-finite squared gradient norm: name the first parameter whose gradient holds
    NaN or inf, or say the norm overflowed."""
    for name, layer, key in model.named_params():
        xp = array_module(layer.grads[key])
        if not bool(xp.isfinite(layer.grads[key]).all()):
            raise TrainingDivergedError(f"non-finite gradient in {name} at step {step}")
    raise TrainingDivergedError(f"gradient norm overflowed at step {step}")


def _on(backend, x, y):
    """uint8 images and int64 labels on a backend."""
    return to_backend(x, backend), to_backend(y, backend, dtype=np.int64)


def _nonfinite_state(model):
    """'<param> holds NaN or inf' for the first such parameter or buffer, else None."""
    for name, v in model.state_dict().items():
        if not np.isfinite(v).all():
            return f"{name} holds NaN or inf"
    return None


def _locate_nonfinite(model, x):
    """After a failed forward: the first parameter or buffer, or else the first layer output
    (a train-mode re-run, layer by layer), that holds NaN or inf; None if there is none."""
    bad = _nonfinite_state(model)
    if bad is not None:
        return bad
    xp, h = array_module(x), x
    for name, layer in zip(model.names, model.layers):
        try:
            h = layer.forward(h, train=True)
        except MecrefError as exc:
            return f"{name} refused its input ({exc})"
        if not bool(xp.isfinite(h).all()):
            return f"output of {name} is NaN or inf (every parameter finite)"
    return None


def _kept(ckpt_path, history):
    if ckpt_path is None:
        return "no checkpoint_dir was given"
    if not history:
        return "no checkpoint was written yet"
    return f"the last good checkpoint {str(ckpt_path)!r} (epoch {len(history)}) is kept"


def _check_progress(meta, path, epochs, steps_per_epoch):
    """A resumed checkpoint's epoch, step and history must agree with each other and the run."""
    epoch, step, history = meta.get("epoch"), meta.get("step"), meta.get("history")
    ok = (isinstance(epoch, int) and not isinstance(epoch, bool) and 1 <= epoch <= epochs
          and step == epoch * steps_per_epoch and isinstance(history, list) and len(history) == epoch)
    if not ok:
        raise CheckpointError(f"checkpoint {str(path)!r} has inconsistent progress (epoch {epoch!r}, "
                              f"step {step!r}, {len(history) if isinstance(history, list) else 'no'} "
                              f"history rows) for a run of {epochs} epochs of {steps_per_epoch} steps")


def _check_ready(m_state, path):
    """A checkpoint is written after an epoch, when every quantizer has initialised itself
    (``ready`` = 1); a 0 would make the next forward re-initialise the trained steps."""
    unready = sorted(k for k, v in m_state.items() if k.endswith(".ready") and not np.all(v == 1))
    if unready:
        raise CheckpointError(f"checkpoint {str(path)!r} has {unready[0]} = "
                              f"{float(np.ravel(m_state[unready[0]])[0])!r}, expected 1 after an "
                              f"epoch of training")


def evaluate(model, x_uint8, y, batch_size: int = 1000) -> float:
    """Test accuracy of a model (eval mode) on uint8 images (N, H, W) and integer labels, on
    the host or on the model's backend (then nothing is copied); one read of the device."""
    correct = 0
    backend = _model_backend(model)
    in_order = np.random.default_rng(0)  # unused: shuffle=False keeps the data's order
    with values_trusted():               # normalised uint8 images are finite
        for xb, yb in mdata.iterate_batches(x_uint8, y, min(batch_size, len(x_uint8)), in_order,
                                            shuffle=False, drop_last=False, backend=backend):
            logits, _ = model.forward(xb, train=False)
            correct = correct + (logits.argmax(axis=1) == yb).sum()
    return int(to_host(correct)) / len(x_uint8)


def _model_backend(model) -> str:
    """'numpy' or 'cupy': where the model's parameters live."""
    _, layer, key = next(iter(model.named_params()))
    return backend_name(array_module(layer.params[key]))


def _load_fp_weights(model, path):
    """Start QAT from an FP32 checkpoint: copy every entry both models share (weights,
    biases, BatchNorm); quantizer parameters keep their data-driven initialisation."""
    fp_state, _, meta = load_checkpoint(path)
    if not isinstance(meta.get("model_config"), dict) or "width" not in meta["model_config"]:
        raise CheckpointError(f"init_from {str(path)!r} has no model_config with a width: not "
                              f"a training checkpoint")
    if meta["model_config"]["width"] != model.config["width"]:
        raise CheckpointError(f"init_from {str(path)!r}: width {meta['model_config']['width']} "
                              f"differs from this model's {model.config['width']}")
    _copy_fp_weights(model, fp_state, f"init_from {str(path)!r}")


def _copy_fp_weights(model, fp_state, source):
    own = model.state_dict()
    fp_keys = nn.small_cnn(width=model.config["width"], num_classes=model.config["num_classes"],
                           backend="numpy").state_dict()
    absent = sorted(k for k in fp_keys if k in own and k not in fp_state)
    if absent:   # a layer would silently keep its random initialisation
        raise CheckpointError(f"{source} lacks arrays this model needs: {absent[:5]}")
    shared = {k: v for k, v in fp_state.items() if k in own}
    missing = [k for k in fp_state if k not in own]
    if missing or not shared:
        raise CheckpointError(f"{source} does not fit this model (entries it lacks: {missing[:5]})")
    for k, v in shared.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {v.shape}, model expects {own[k].shape}")
    own.update(shared)
    model.load_state_dict(own)


class _Progress:
    """Progress of a run on stderr (results go to stdout): on a terminal a tqdm bar per epoch
    (steps, ETA, loss, accuracy, samples/s); elsewhere (a log file, a pipe, a batch job) a
    plain line every ``MECREF_PROGRESS_SECONDS`` seconds (default 30) within an epoch; and one
    line per finished epoch. ``progress`` False is silent; a callable gets each epoch's row."""

    def __init__(self, progress):
        self.fn = progress if callable(progress) else None
        self.on = bool(progress) and self.fn is None
        self.tty = self.on and sys.stderr.isatty()
        self.every = progress_seconds()
        self._bar, self._last = None, time.perf_counter()

    def line(self, text):
        if self.on:
            self._print(text)

    def _print(self, text):
        if self.tty:   # above every open bar (a grid's too), which tqdm redraws below it
            from tqdm import tqdm
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def step(self, epoch, epochs, i, n, sums, elapsed):
        if not self.on:
            return
        stats = (f"loss {sums['loss'] / i:.4f} acc {sums['correct'] / max(sums['seen'], 1):.3f} "
                 f"{sums['seen'] / max(elapsed, 1e-9):.0f} samples/s")
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                                 file=sys.stderr, leave=False, dynamic_ncols=True)
            self._bar.set_postfix_str(stats, refresh=False)
            self._bar.update(i - self._bar.n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every and i < n:
            self._last = now
            left = elapsed / i * (n - i)
            print(f"epoch {epoch + 1}/{epochs} step {i}/{n} ({100 * i // n}%) {stats}, "
                  f"~{left:.0f} s left in the epoch", file=sys.stderr, flush=True)

    def epoch_end(self, row, epochs):
        if self.fn is not None:
            self.fn(row)
        if not self.on:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._last = time.perf_counter()
        val = f" val {row['val_acc']:.4f}" if row["val_acc"] is not None else ""
        self._print(f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} (ce {row['ce']:.4f} "
                    f"reg {row['reg']:.4f}) train {row['train_acc']:.4f}{val} test "
                    f"{row['test_acc']:.4f} {row['seconds']:.1f}s {row['samples_per_s']:.0f} samples/s")

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_seconds() -> float:
    """Seconds between plain progress lines off a terminal: ``MECREF_PROGRESS_SECONDS``
    (a number >= 0; 0 prints a line at every step), default 30."""
    text = os.environ.get("MECREF_PROGRESS_SECONDS", "30")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or not math.isfinite(value):
        raise MecrefError(f"MECREF_PROGRESS_SECONDS must be a number of seconds >= 0, got {text!r}")
    return value
