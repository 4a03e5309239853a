"""Write tests/data/golden_step.npz: one training step's outputs of the small CNN, to pin the
layers' results across optimisations (tests/test_threads.py compares against it).

It uses only the public layer API, so it can be run on an older checkout to record that
version's outputs::

    PYTHONPATH=/path/to/older/checkout python3 tests/data/make_golden_step.py --out tests/data/golden_step.npz

Recorded: float64, 6 bundled training images, the default widths; for FP32 and W4A4 LSQ the
logits, the features, the loss and every parameter gradient of one step (the first conv with
its input gradient switched on, so the whole backward path is pinned).
"""
import argparse
import subprocess
import sys

import numpy as np

VARIANTS = {"fp32": dict(quantizer=None),
            "w4a4_lsq": dict(quantizer="lsq", w_bits=4, a_bits=4, first_last_bits=8)}


def step_outputs(variant, n=6, seed=3):
    from mecref import data, losses, nn
    ds = data.load_bundled()
    idx = np.random.default_rng(seed).choice(len(ds.y_train), n, replace=False)
    x = np.ascontiguousarray(data.normalize(ds.x_train[idx])).astype(np.float64)
    y = ds.y_train[idx].astype(np.int64)
    model = nn.small_cnn(**VARIANTS[variant], seed=seed).astype(np.float64)
    model.layers[0].input_grad = True
    model.forward(x, train=True)                     # LSQ step init, as training does
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
    import mecref
    rev = subprocess.run(["git", "-C", mecref.__path__[0], "rev-parse", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    arrays = {"commit": np.asarray(rev)}
    for v in VARIANTS:
        for k, a in step_outputs(v).items():
            arrays[f"{v}/{k}"] = np.asarray(a)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} from mecref at {mecref.__path__[0]} (commit {rev or 'unknown'})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
