"""Write tests/data/golden_main_step.npz: one step of the default main job, in float64, to pin
the layers' results across speed-ups (tests/test_golden_main_step.py compares against it).

The step is what ``mecref train`` runs by default (``TrainConfig()``: W2A2 LSQ with 8-bit
first and last layers, cross-entropy on two augmented views, order-4 Taylor MEC with weight
0.2, SGD with momentum): ``mecref.train.train_step`` on 8 bundled training images, after one
forward that initialises the LSQ steps, from seed 5; the steps are then rounded to powers of
two (golden_setup.py: the quantized GEMMs become exact, so no max-pool winner is left to the
BLAS kernel's rounding). Recorded: the two views, the loss parts, every parameter gradient and
every parameter after the update. It uses only the public API, so it can be run on an older
checkout to record that version's outputs::

    PYTHONPATH=/path/to/checkout python3 tests/data/make_golden_main_step.py --out tests/data/golden_main_step.npz

Float64, not the job's float32: the quantizers' rounding and masks are knife-edge decisions,
and in float32 the round-off of a BLAS with another thread count or kernel is ~1e-7, not far
below their distances to a tie (golden_setup.MARGIN: 1e-9 in float64, ~1e6 times the round-off).

The file in the repository was recorded on commit 57d8219 (key ``commit``). Run on bb3e1d0,
before the speed-ups of issue 17, this script gives the same bits (on one machine with
OpenBLAS's Haswell kernel).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_setup  # noqa: E402


def main_step(n=8, seed=5, power_of_two=True):
    """The default main job's first step; returns a dict of arrays. Raises
    golden_setup.TieError when a decision sits within golden_setup.MARGIN of its tie."""
    from mecref import data, nn, optim, train
    cfg = train.TrainConfig(seed=seed).validate()
    xb, yb = golden_setup.bundled_batch(n, seed)
    model = nn.small_cnn(**cfg.model_config(), seed=seed).astype(np.float64)
    opt = optim.SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.forward(np.concatenate([xb, xb]), train=True)         # LSQ step init, as training does
    if power_of_two:
        golden_setup.power_of_two_steps(model)
    x1, x2 = (v.astype(np.float64) for v in data.two_views(xb, np.random.default_rng(seed + 1)))
    golden_setup.assert_clear(golden_setup.decisions(model, np.concatenate([x1, x2])))
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
    golden_setup.write(args.out, main_step())


if __name__ == "__main__":
    main()
