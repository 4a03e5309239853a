"""Write tests/data/golden_step.npz: one training step's outputs of the small CNN, to pin the
layers' results across optimisations (tests/test_threads.py compares against it).

It uses only the public layer API, so it can be run on an older checkout to record that
version's outputs::

    PYTHONPATH=/path/to/checkout python3 tests/data/make_golden_step.py --out tests/data/golden_step.npz

Recorded: float64, 6 bundled training images plus N(0, 0.1^2) noise per pixel, the default
widths; for FP32 and W4A4 LSQ the logits, the features, the loss and every parameter gradient
of one step (the first conv with its input gradient switched on, so the whole backward path is
pinned). The step's decisions are checked clear of ties (golden_setup.py): LSQ's steps are
rounded to powers of two after their data-driven init, so the quantized GEMMs are exact, and
the noise leaves no two equal 3x3 patches in the images' flat background, whose FP32
convolutions would otherwise tie in the max pool up to the kernel's round-off.

The file in the repository was recorded on commit 57d8219 (key ``commit``). Run on 5b0c9e3,
before the threaded element-wise passes, this script gives the same bits (on one machine with
OpenBLAS's Haswell kernel).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_setup  # noqa: E402

VARIANTS = {"fp32": dict(quantizer=None),
            "w4a4_lsq": dict(quantizer="lsq", w_bits=4, a_bits=4, first_last_bits=8)}


def step_outputs(variant, n=6, seed=3, power_of_two=True):
    """One step of ``variant``; a dict of arrays. Raises golden_setup.TieError when a decision
    sits within golden_setup.MARGIN of its tie (``power_of_two=False`` keeps LSQ's steps as
    initialised, which leaves exact-arithmetic ties to the GEMM's rounding)."""
    from mecref import losses, nn
    x, y = golden_setup.bundled_batch(n, seed, noise=0.1)
    model = nn.small_cnn(**VARIANTS[variant], seed=seed).astype(np.float64)
    model.layers[0].input_grad = True
    model.forward(x, train=True)                     # LSQ step init, as training does
    if power_of_two:
        golden_setup.power_of_two_steps(model)
    golden_setup.assert_clear(golden_setup.decisions(model, x))
    logits, feats = model.forward(x, train=True)
    loss, cache = losses.softmax_cross_entropy(logits, y)
    R = np.random.default_rng(seed + 1).standard_normal(feats.shape)
    dx = model.backward(losses.softmax_cross_entropy_backward(cache), R)
    out = {"x": x, "y": y, "logits": logits, "features": feats, "loss": np.asarray(loss),
           "dfeatures": R, "dx": dx}
    for name, layer, key in model.named_params():
        out[f"grad/{name}"] = layer.grads[key]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    golden_setup.write(args.out, {f"{v}/{k}": a for v in VARIANTS for k, a in step_outputs(v).items()})


if __name__ == "__main__":
    main()
