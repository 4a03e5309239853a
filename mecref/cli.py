"""Command line: ``mecref train ...`` (also ``python -m mecref``). Parsing only; the work is
done by library functions that Python code can call the same way."""
from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .backend import MecrefError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_train(sub):
    from . import regularizers
    from .train import PLACEMENTS, QUANTIZERS, TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train the small CNN with QAT and an entropy regulariser",
                       description="Train the small CNN on the bundled Fashion-MNIST subset (or a "
                       "full IDX dataset) with quantization-aware training and the MEC-Quant "
                       "regulariser. Progress goes to stderr; the per-epoch table, a summary line and "
                       "where the run folder went (runs/<date-time> by default) to stdout.")
    from . import schemes
    p.add_argument("--quantizer", choices=list(QUANTIZERS), default=d.quantizer,
                   help="fake quantizer: fp32 (none); "
                        + "; ".join(f"{q.name}: {q.help}" for q in schemes.REGISTRY.values())
                        + " (default: %(default)s)")
    p.add_argument("--w-bits", type=int, default=d.w_bits, help="weight bits of the inner layers, 1..8 (default: %(default)s)")
    p.add_argument("--a-bits", type=int, default=d.a_bits, help="activation bits of the inner layers, 1..8 (default: %(default)s)")
    p.add_argument("--first-last-bits", type=int, default=d.first_last_bits,
                   help="bits of the first conv and the last linear layer, 1..8 or 32 (default: %(default)s)")
    p.add_argument("--reg", choices=["none", *regularizers.names()], default=None, type=_none_spelling,
                   help="entropy regulariser on the penultimate features of two views: none (or "
                        "None); " + "; ".join(f"{r.name}: {r.help}" for r in regularizers.REGISTRY.values())
                        + f" (default: {d.reg}; with --quantizer fp32: none, a full-precision "
                        "run has no regulariser unless one is asked for)")
    p.add_argument("--reg-at", choices=PLACEMENTS, default=d.reg_at,
                   help="where the regulariser acts: features (the penultimate features), or "
                        "blocks (also the pooled outputs of the two inner conv blocks, at the "
                        "same strength d/eps^2) (default: %(default)s)")
    p.add_argument("--reg-weight", type=float, default=d.reg_weight, help="beta, the regulariser's weight (default: %(default)s)")
    p.add_argument("--eps", type=float, default=d.eps, help="distortion epsilon of the coding length, not squared (default: %(default)s)")
    p.add_argument("--order", type=int, default=d.order, help="Taylor order for --reg mec_taylor (default: %(default)s)")
    p.add_argument("--experts", type=int, default=d.experts, help="number of experts K for --reg moe (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per view and step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the cosine schedule (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length in epochs (default: %(default)s)")
    p.add_argument("--dataset", choices=["bundled", "fashion-mnist", "idx"], default=d.dataset,
                   help="bundled: the 12k/2k Fashion-MNIST subset inside the package; fashion-mnist: "
                        "the full set from --data-dir or the Debian path; idx: any IDX folder (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder with train/t10k IDX files (gzipped or not)")
    p.add_argument("--val-size", type=int, default=d.val_size, help="training images held out for validation (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed: the same seed gives the same run (default: %(default)s)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=d.backend, help="numpy (CPU) or cupy (GPU) (default: %(default)s)")
    p.add_argument("--init-from", default=None, help="FP32 checkpoint to start quantization-aware training from")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs,
                   help="first train FP32 for this many epochs, then start from it (the standard "
                        "QAT protocol; 0: from scratch) (default: %(default)s)")
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr,
                   help="peak learning rate of that FP32 pretraining (default: %(default)s)")
    p.add_argument("--out", "--checkpoint-dir", dest="out", default=None, metavar="DIR",
                   help="the run folder: config.json, history.csv/.json and curves.png (after "
                        "every epoch), the checkpoint last.npz, summary.txt (default: "
                        "runs/<--name>, or runs/<date-time> without a name)")
    p.add_argument("--name", default=None, help="name of the run: its folder is runs/NAME")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (or runs/--name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in the run folder (without it, refused)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output on stderr (the results still go to stdout)")
    p.set_defaults(func=_run_train)


def _none_spelling(text):
    """'none' and Python's 'None' both mean no regulariser."""
    return "none" if text.strip().lower() == "none" else text


_TRAIN_FIELDS = ("quantizer", "w_bits", "a_bits", "first_last_bits", "reg_weight", "eps", "order",
                 "experts", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                 "warmup_epochs", "dataset", "data_dir", "val_size", "train_limit", "seed",
                 "backend", "init_from", "pretrain_epochs", "pretrain_lr", "reg_at")


def _run_train(args):
    from . import runlog
    from .train import TrainConfig, _resolve_config, train_small_cnn
    if args.out is not None and args.name is not None:
        raise MecrefError(f"give --out DIR or --name NAME (the folder runs/NAME), not both; "
                          f"got --out {args.out} --name {args.name}")
    if args.resume and args.out is None and args.name is None:
        raise MecrefError("--resume needs --out DIR (or --name NAME), the folder of the run to continue")
    fields = {k: getattr(args, k) for k in _TRAIN_FIELDS}
    if args.reg is not None:        # not given: TrainConfig's default (none for fp32)
        fields["reg"] = None if args.reg == "none" else args.reg
    _check_data_flags(args.dataset, args.data_dir)
    cfg, _ = _resolve_config(TrainConfig(**fields), None, {})   # checked before any folder is made
    out = Path(args.out) if args.out is not None else runlog.default_run_dir(args.name)
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        result = train_small_cnn(cfg, progress=not args.quiet, out=out, resume=args.resume,
                                 overwrite=args.overwrite)
    except BaseException:
        for p in made:              # a run that failed before writing anything leaves no folder
            try:
                p.rmdir()
            except OSError:
                break
        raise
    print(result.summary())
    print()
    print(result.headline())
    names = [Path(p).name for p in result.files.values()]
    print(f"run folder: {out} ({', '.join(names)})")
    return 0


def _check_data_flags(dataset, data_dir):
    """The data flags together, in the command's words (before anything is read)."""
    from .data import DEBIAN_FASHION_MNIST_DIR
    if dataset == "bundled" and data_dir is not None:
        raise MecrefError(f"--dataset bundled reads the subset inside the package and takes no "
                          f"--data-dir, got --data-dir {data_dir}; use --dataset fashion-mnist "
                          f"or --dataset idx with it")
    if dataset == "idx" and data_dir is None:
        raise MecrefError("--dataset idx needs --data-dir DIR, a folder with the four IDX files "
                          "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                          "t10k-labels-idx1-ubyte, each may be .gz)")
    if dataset == "fashion-mnist" and data_dir is None and not Path(DEBIAN_FASHION_MNIST_DIR).is_dir():
        raise MecrefError(f"--dataset fashion-mnist needs --data-dir DIR, a folder with the four "
                          f"Fashion-MNIST IDX files (docs/data.md says where to get them), or the "
                          f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR}), "
                          f"which is not installed")


def _bits_pair(text):
    """'W2A4' (or '2,4') -> (2, 4): weight bits, activation bits."""
    t = text.strip().upper()
    try:
        if t.startswith("W") and "A" in t:
            w, a = t[1:].split("A")
        else:
            w, a = t.split(",")
        return int(w), int(a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit-width like W2A4 or 2,4, got {text!r}") from None


def _add_grid_common(p, seeds):
    """Options every grid verb shares; unset ones keep TrainConfig's defaults."""
    p.add_argument("--out", required=True, help="folder for runs/, checkpoints/ and the results files")
    p.add_argument("--seeds", type=int, nargs="+", default=seeds, help="seeds per configuration (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of every cell (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes running cells, each with 1 BLAS thread; 1 runs in this process (default: %(default)s)")
    p.add_argument("--dataset", choices=["bundled", "fashion-mnist", "idx"], default=None,
                   help="bundled (default), fashion-mnist or idx (with --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder with train/t10k IDX files")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None, help="numpy (default) or cupy")
    p.add_argument("--batch-size", type=int, default=None, help="images per view and step (default: TrainConfig's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: TrainConfig's)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--width", type=int, nargs=3, default=None, metavar=("C1", "C2", "C3"),
                   help="channels of the three conv layers (default: TrainConfig's)")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="standard QAT protocol: every cell starts from an FP32 run of this many "
                        "epochs, one per seed, cached and shared (default: 0, from scratch)")
    p.add_argument("--pretrain-lr", type=float, default=None,
                   help="peak learning rate of that FP32 pretraining (default: TrainConfig's)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the cells on the Dask cluster of this scheduler, e.g. tcp://HOST:8786, "
                        "instead of --workers local processes (extra `cluster`; docs/cluster.md)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


@contextmanager
def _cluster_client(args):
    """A client of ``--scheduler`` for the command (None without it, or on a dry run); closing
    it at the end (or on Ctrl-C) disconnects and leaves the cluster up."""
    if args.scheduler is None or getattr(args, "dry_run", False):
        yield None
        return
    from .cluster import connect
    client = connect(args.scheduler)
    try:
        yield client
    finally:
        client.close()


def _grid_common(args) -> dict:
    if len(set(args.seeds)) != len(args.seeds):
        raise MecrefError(f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}")
    if getattr(args, "workers", 1) < 1:
        raise MecrefError(f"--workers must be at least 1, got {args.workers}")
    _check_data_flags(args.dataset or "bundled", args.data_dir)
    names = ("dataset", "data_dir", "backend", "batch_size", "lr", "train_limit", "width",
             "pretrain_epochs", "pretrain_lr")
    common = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if "width" in common:
        common["width"] = tuple(common["width"])
    return common


def _add_table(sub):
    p = sub.add_parser("table", help="run (or resume) the main grid or the sweep and print the results table",
                       description="Run every (configuration, seed) cell of a grid that is not "
                       "cached in --out/runs yet (an interrupted grid resumes), then write "
                       "results.csv and results.json and print a Markdown table of test accuracy "
                       "(mean ± std over seeds) and seconds per epoch.")
    p.add_argument("--grid", choices=["main", "sweep"], default="main",
                   help="main: FP32, STE, DoReFa+PACT, LSQ, LSQ+, MEC-Quant (exact, Taylor, MOE) at "
                        "each bit-width; sweep: MEC-Quant hyperparameters at W2A2 on a validation split")
    _add_grid_common(p, seeds=[0, 1, 2])
    p.add_argument("--bits", type=_bits_pair, nargs="+", default=None,
                   help="bit-widths of the main grid, e.g. W4A4 W2A2 (default: W4A4 W3A3 W2A2 W2A4)")
    _add_settings(p)
    p.add_argument("--forms", nargs="+", default=None, metavar="FORM",
                   help='MEC-Quant forms of the main grid, by label (e.g. exact "Taylor n=4" "MOE K=4"; '
                        "default: all of mecref.experiments.FORMS)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells, which are cached, and how long the rest will take (from "
                        "the cached cells' times or a measured step); train and write nothing")
    p.set_defaults(func=_run_table)


def _add_settings(p):
    p.add_argument("--from-sweep", default=None, metavar="DIR",
                   help="use the MEC-Quant settings with the best validation accuracy in this sweep folder")
    p.add_argument("--settings", type=_json_dict, default=None, metavar="JSON",
                   help='MEC-Quant settings per form (label or regulariser name), e.g. '
                        '\'{"mec": {"reg_weight": 1.0, "eps": 4}, "MOE K=2": {"eps": 8}}\' '
                        "(default: mecref.experiments.default_settings)")


def _json_dict(text):
    import json
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _run_table(args):
    from .experiments import run_table
    kw = dict(epochs=args.epochs, **_grid_common(args))
    if args.grid == "main":
        kw.update({k: v for k, v in dict(bits=args.bits, settings=args.settings,
                                         forms=args.forms).items() if v is not None})
    elif args.bits or args.settings or args.from_sweep or args.forms:
        raise MecrefError("--bits, --settings, --forms and --from-sweep belong to --grid main; "
                          "`mecref sweep --help` lists the sweep's options")
    with _cluster_client(args) as client:
        print(run_table(args.grid, args.seeds, args.out, workers=args.workers,
                        progress=not args.quiet, dry_run=args.dry_run, from_sweep=args.from_sweep,
                        client=client, **kw))
    _print_written(args, ["sweep.png", "best_settings.json"] if args.grid == "sweep" else [])
    return 0


def _print_written(args, extra):
    """The last line of a grid verb: where its files went."""
    if args.dry_run:
        return
    names = ", ".join(["results.csv", "results.json", *extra])
    print(f"\nwrote {names} in {args.out} (each cell: runs/<key>.json, checkpoints/<key>/)")


def _add_sweep(sub):
    from .experiments import BETA_GRID, EPS_GRID
    p = sub.add_parser("sweep", help="sweep MEC-Quant's strength (beta x eps) for every form at W2A2 (validation split)",
                       description="Train LSQ + MEC at W2A2 for every form (exact, Taylor at each "
                       "--orders, MOE at each --experts) over ONE grid of reg weights x eps on a "
                       "training split, judge each on a validation split held out of the "
                       "training set, write results.csv/json, sweep.png (accuracy against eps, "
                       "a line per form, a panel per beta) and best_settings.json.")
    _add_grid_common(p, seeds=[0])
    p.add_argument("--val-size", type=int, default=2000, help="training images held out for validation (default: %(default)s)")
    p.add_argument("--reg-weights", type=float, nargs="+", default=list(BETA_GRID), help="betas, every form (default: %(default)s)")
    p.add_argument("--eps-values", type=float, nargs="+", default=list(EPS_GRID),
                   help="eps values, every form (the Taylor form only where its series converges, "
                        "eps >= sqrt(d)) (default: %(default)s)")
    p.add_argument("--orders", type=int, nargs="+", default=[4], help="Taylor orders, a form each (default: %(default)s)")
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="MOE expert counts, a form each (default: %(default)s)")
    p.add_argument("--bits", type=_bits_pair, default=(2, 2), help="bit-width, e.g. W2A4 (default: W2A2)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells, which are cached, and how long the rest will take (from "
                        "the cached cells' times or a measured step); train and write nothing")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args):
    from .experiments import run_table
    forms = ([{"reg": "mec"}] + [{"reg": "mec_taylor", "order": n} for n in args.orders]
             + [{"reg": "moe", "experts": k} for k in args.experts])
    with _cluster_client(args) as client:
        print(run_table("sweep", args.seeds, args.out, workers=args.workers,
                        progress=not args.quiet, dry_run=args.dry_run, epochs=args.epochs,
                        reg_weights=args.reg_weights, eps_values=args.eps_values, forms=forms,
                        w_bits=args.bits[0], a_bits=args.bits[1], val_size=args.val_size,
                        client=client, **_grid_common(args)))
    _print_written(args, ["sweep.png", "best_settings.json"])
    return 0


def _add_diagnose(sub):
    from . import regularizers
    p = sub.add_parser("diagnose", help="feature diagnostics of FP32, LSQ and MEC-Quant models",
                       description="Train (or reuse the cached checkpoints in --out of) FP32, LSQ "
                       "and MEC-Quant models at the given bit-widths, then measure their "
                       "penultimate features on the test images: covariance spectrum, effective "
                       "rank, coding length per sample, class spread. Writes diagnostics.json, "
                       "spectra_<bits>.png and diagnostics.png. With the same --out, --epochs and "
                       "options as `mecref table`, it reuses that table's models.")
    _add_grid_common(p, seeds=[0])
    p.add_argument("--bits", type=_bits_pair, nargs="+", default=[(4, 4), (2, 2)],
                   help="bit-widths, e.g. W4A4 W2A2 (default: W4A4 W2A2)")
    p.add_argument("--reg", choices=list(regularizers.names()), default="mec_taylor",
                   help="MEC-Quant's regulariser (default: %(default)s, as mecref train)")
    _add_settings(p)
    p.add_argument("--diag-eps", type=float, default=0.5, help="eps of the measured coding length (default: %(default)s)")
    p.add_argument("--n-samples", type=int, default=2000, help="test images to measure on (default: %(default)s)")
    p.set_defaults(func=_run_diagnose)


def _run_diagnose(args):
    from .diagnostics import diagnose, markdown_diagnostics
    if len(args.seeds) != 1:
        raise MecrefError(f"diagnose takes one seed, got --seeds {' '.join(map(str, args.seeds))}")
    with _cluster_client(args) as client:
        res = diagnose(args.out, bits=args.bits, epochs=args.epochs, seed=args.seeds[0],
                       workers=args.workers, n_samples=args.n_samples, diag_eps=args.diag_eps,
                       reg=args.reg, settings=args.settings, from_sweep=args.from_sweep,
                       progress=not args.quiet, client=client, **_grid_common(args))
    print(markdown_diagnostics(res["table"]))
    print(f"\nwrote diagnostics.json, diagnostics.png and spectra_*.png in {args.out} "
          f"(each model: runs/<key>.json, checkpoints/<key>/)")
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="export a trained quantized model to integer codes, scales and requantisation",
                       description="Turn a training checkpoint of a quantized small CNN into an "
                       "integer model: weight codes, scales and offsets, bit-widths and the layer "
                       "graph, with BatchNorm, ReLU and each next layer's input quantizer folded "
                       "into a fixed-point requantisation (one .npz, its graph also as .json "
                       "beside it). See docs/export.md.")
    p.add_argument("checkpoint", help="training checkpoint: last.npz in the run folder of `mecref train`")
    p.add_argument("--out", required=True, help="model file to write: .npz (--format int) or .onnx (--format onnx)")
    p.add_argument("--format", choices=["int", "onnx"], default="int",
                   help="int: mecref's integer model; onnx: a standard ONNX graph in QDQ form, "
                        "for ONNX Runtime (default: %(default)s)")
    p.add_argument("--wide", action="store_true",
                   help="onnx: int8/uint8 code containers with a Clip to the true grid instead of "
                        "the 2- and 4-bit ONNX types (opset 13, for runtimes without them)")
    p.set_defaults(func=_run_export)


def _run_export(args):
    if args.format == "onnx":
        from .onnx_export import describe_onnx, export_checkpoint_onnx
        proto, path = export_checkpoint_onnx(args.checkpoint, args.out, narrow=not args.wide)
        print(describe_onnx(proto))
        print(f"\nwrote {path} ({path.stat().st_size} bytes)")
        return 0
    from .export import describe_int_model, export_checkpoint
    imodel, path = export_checkpoint(args.checkpoint, args.out)
    print(describe_int_model(imodel))
    print(f"\nwrote {path} and {path.with_suffix('.json')}")
    return 0


def _add_eval_int(sub):
    p = sub.add_parser("eval-int", help="run an exported integer model on the test set (integer arithmetic only)",
                       description="Classify the test images with the integer model alone (int8 "
                       "codes, int32 accumulators, int64 fixed-point requantisation) and print "
                       "its accuracy; with --checkpoint also run the fake-quantized float model "
                       "it came from and report identical predictions and, per layer, how many "
                       "integer codes differ.")
    p.add_argument("model", help="integer model file from `mecref export`")
    p.add_argument("--checkpoint", default=None, help="the training checkpoint the model was exported from")
    p.add_argument("--dataset", choices=["bundled", "fashion-mnist", "idx"], default="bundled",
                   help="test images: bundled (default), fashion-mnist or idx (with --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder with train/t10k IDX files")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.set_defaults(func=_run_eval_int)


def _run_eval_int(args):
    from .export import evaluate_int, markdown_comparison
    _check_data_flags(args.dataset, args.data_dir)
    print(markdown_comparison(evaluate_int(args.model, checkpoint=args.checkpoint, dataset=args.dataset,
                                           data_dir=args.data_dir, limit=args.limit)))
    return 0


def _add_eval_onnx(sub):
    p = sub.add_parser("eval-onnx", help="run an exported ONNX model with ONNX Runtime on the test set",
                       description="Classify the test images with ONNX Runtime (CPU) and print the "
                       "accuracy; with --checkpoint also the fake-quantized model it came from "
                       "(identical predictions, logit differences, codes differing per quantizer), "
                       "with --int-model also the integer model of the same checkpoint.")
    p.add_argument("model", help="ONNX model file from `mecref export --format onnx`")
    p.add_argument("--checkpoint", default=None, help="the training checkpoint the model was exported from")
    p.add_argument("--int-model", default=None, help="the integer model (.npz) exported from the same checkpoint")
    p.add_argument("--dataset", choices=["bundled", "fashion-mnist", "idx"], default="bundled",
                   help="test images: bundled (default), fashion-mnist or idx (with --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder with train/t10k IDX files")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.set_defaults(func=_run_eval_onnx)


def _run_eval_onnx(args):
    from .onnx_export import evaluate_onnx, markdown_onnx
    _check_data_flags(args.dataset, args.data_dir)
    print(markdown_onnx(evaluate_onnx(args.model, checkpoint=args.checkpoint, int_model=args.int_model,
                                      dataset=args.dataset, data_dir=args.data_dir, limit=args.limit)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mecref", description="MEC-Quant reference: maximum entropy coding for "
                     "low-bit quantization-aware training, in NumPy with hand-derived gradients.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"mecref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_train(sub)
    _add_table(sub)
    _add_sweep(sub)
    _add_diagnose(sub)
    _add_export(sub)
    _add_eval_int(sub)
    _add_eval_onnx(sub)
    for command in sub.choices.values():
        command.set_defaults(flags=_flag_names(command))
    return parser


def _flag_names(parser) -> dict:
    """Python argument name -> the command's flag (``w_bits`` -> ``--w-bits``)."""
    flags = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help", "flags"):
            flags[action.dest] = longs[0]
    if flags.get("out") == "--out":
        flags.setdefault("checkpoint_dir", "--out")
    return flags


def _in_flags(message: str, flags: dict) -> str:
    """A library message in the command's words: an argument's Python name becomes its flag
    where the name is what the message is about (``w_bits must ...``, ``epochs (3)``,
    ``data_dir='x'``, ``resume=True``), so the user reads ``--w-bits must be an integer in
    1..8, got 16``."""
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))

    def flag(m):
        f = flags[m.group(1)]
        value = m.group(2)
        if value == "True":
            return f
        if value == "None":
            return f"no {f}"
        return f"{f} {value.strip(chr(39))}"

    text = re.sub(rf"(?<![\w'\-./])({names})(?:=('[^']*'|[^\s,;)]+))",
                  flag, message)
    text = re.sub(rf"(?<![\w'\-./])({names})(?=( must| \(| needs | takes | '))",
                  lambda m: flags[m.group(1)], text)
    return re.sub(r"\((--[\w-]+), \1\)", r"(\1)", text)


def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a batch system's stop) ends a command as Ctrl-C does: checkpoint
    writes are abandoned cleanly, grid workers stopped, one line and exit status 130."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _sigterm_as_interrupt()
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args):
    try:
        return args.func(args)
    except (MecrefError, TypeError) as exc:
        print(f"mecref: error: {_in_flags(str(exc), getattr(args, 'flags', {}))}", file=sys.stderr)
        return 2
    except OSError as exc:       # a full disk, a read-only folder, ...: one line, no traceback
        print(f"mecref: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mecref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
