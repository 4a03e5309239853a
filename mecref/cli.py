"""Command line: ``mecref train ...`` (also ``python -m mecref``). Parsing only; the work is
done by library functions that Python code can call the same way."""
from __future__ import annotations

import argparse
import sys

from .backend import MecrefError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_train(sub):
    from .train import QUANTIZERS, TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train the small CNN with QAT and an entropy regulariser",
                       description="Train the small CNN on the bundled Fashion-MNIST subset (or a "
                       "full IDX dataset) with quantization-aware training and the MEC-Quant "
                       "regulariser; prints a progress line per epoch and a summary table.")
    p.add_argument("--quantizer", choices=QUANTIZERS, default=d.quantizer,
                   help="fake quantizer: fp32 (none), ste (fixed ranges, straight-through), "
                        "dorefa_pact (DoReFa weights, PACT activations), lsq (learned step), "
                        "lsqplus (learned step and offset) (default: %(default)s)")
    p.add_argument("--w-bits", type=int, default=d.w_bits, help="weight bits of the inner layers, 1..8 (default: %(default)s)")
    p.add_argument("--a-bits", type=int, default=d.a_bits, help="activation bits of the inner layers, 1..8 (default: %(default)s)")
    p.add_argument("--first-last-bits", type=int, default=d.first_last_bits,
                   help="bits of the first conv and the last linear layer, 1..8 or 32 (default: %(default)s)")
    p.add_argument("--reg", choices=["none", "mec", "mec_taylor", "moe"], default=d.reg or "none",
                   help="entropy regulariser on the penultimate features of two views: none, mec "
                        "(exact log det), mec_taylor (order-n series), moe (mixture-of-experts "
                        "coding length) (default: %(default)s)")
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
    p.add_argument("--checkpoint-dir", default=None, help="write last.npz (+ .json) here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run_train)


def _run_train(args):
    from .train import train_small_cnn
    result = train_small_cnn(
        quantizer=args.quantizer, w_bits=args.w_bits, a_bits=args.a_bits,
        first_last_bits=args.first_last_bits, reg=None if args.reg == "none" else args.reg,
        reg_weight=args.reg_weight, eps=args.eps, order=args.order, experts=args.experts,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, dataset=args.dataset,
        data_dir=args.data_dir, val_size=args.val_size, train_limit=args.train_limit,
        seed=args.seed, backend=args.backend, init_from=args.init_from,
        progress=not args.quiet, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    print(result.summary())
    c = result.config
    name = "FP32" if c["quantizer"] == "fp32" else f"W{c['w_bits']}A{c['a_bits']} {c['quantizer']}"
    print(f"\n{name} reg={c['reg']}: test accuracy {result.test_acc:.4f} "
          f"({result.seconds:.1f} s, {len(result.history)} epochs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mecref", description="MEC-Quant reference: maximum entropy coding for "
                     "low-bit quantization-aware training, in NumPy with hand-derived gradients.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_train(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MecrefError, TypeError) as exc:
        print(f"mecref: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mecref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
