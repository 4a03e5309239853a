"""Write tests/data/golden_main_step.npz: one step of the default main job, in float64, to pin
the layers' results across speed-ups (tests/test_golden_main_step.py compares against it).

The step is what ``mecref train`` runs by default (``TrainConfig()``: W2A2 LSQ with 8-bit
first and last layers, cross-entropy on two augmented views, order-4 Taylor MEC with weight
0.2, SGD with momentum): ``mecref.train.train_step`` on 8 bundled training images, after one
forward that initialises the LSQ steps, from seed 5. Recorded: the two views, the loss parts,
every parameter gradient and every parameter after the update. It uses only the public API,
so it can be run on an older checkout to record that version's outputs::

    PYTHONPATH=/path/to/checkout python3 tests/data/make_golden_main_step.py --out tests/data/golden_main_step.npz

Float64, not the job's float32: the quantizers' rounding and masks are knife-edge decisions, and
in float32 a BLAS with another thread count or kernel flips some of them (seen: 3.5 % in
conv1.W's gradient between one and two OpenBLAS threads); in float64 the rounding noise is
far below any distance to a decision.

The file in the repository was recorded on commit bb3e1d0 (before the gather form of the
convolution input gradient and the other speed-ups of issue 17).
"""
import argparse
import subprocess
import sys

import numpy as np


def main_step(n=8, seed=5):
    """The default main job's first step; returns a dict of arrays."""
    from mecref import data, nn, optim, train
    cfg = train.TrainConfig(seed=seed).validate()
    ds = data.load_bundled()
    idx = np.random.default_rng(seed).choice(len(ds.y_train), n, replace=False)
    xb = np.ascontiguousarray(data.normalize(ds.x_train[idx])).astype(np.float64)
    yb = ds.y_train[idx].astype(np.int64)
    model = nn.small_cnn(**cfg.model_config(), seed=seed).astype(np.float64)
    opt = optim.SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.forward(np.concatenate([xb, xb]), train=True)         # LSQ step init, as training does
    x1, x2 = (v.astype(np.float64) for v in data.two_views(xb, np.random.default_rng(seed + 1)))
    parts = train.loss_and_grads(model, x1, x2, yb, cfg)
    out = {"x1": x1, "x2": x2, "y": yb, "loss": np.asarray(parts["loss"]),
           "ce": np.asarray(parts["ce"]), "reg": np.asarray(parts["reg"]), "logits": parts["logits"]}
    for name, layer, key in model.named_params():
        out[f"grad/{name}"] = np.array(layer.grads[key])
    opt.step()
    for name, layer, key in model.named_params():
        out[f"param/{name}"] = np.array(layer.params[key])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import mecref
    rev = subprocess.run(["git", "-C", mecref.__path__[0], "rev-parse", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    arrays = {"commit": np.asarray(rev)}
    arrays.update({k: np.asarray(a) for k, a in main_step().items()})
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} from mecref at {mecref.__path__[0]} (commit {rev or 'unknown'})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
