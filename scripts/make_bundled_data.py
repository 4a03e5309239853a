"""Build the Fashion-MNIST subset bundled with mecref.

Reads the official Fashion-MNIST IDX files (by default from the Debian package
dataset-fashion-mnist, /usr/share/datasets/fashion-mnist), draws a class-balanced subset with a
fixed seed (1,200 train + 200 test images per class by default), and writes

    mecref/_datafiles/fashion_mnist_subset.npz   x_train, y_train, x_test, y_test (uint8),
                                                 train_index, test_index (rows of the sources)
    mecref/_datafiles/fashion_mnist_subset.json  provenance: source files and their sha256,
                                                 seed, counts per class, array checksums,
                                                 pixel mean/std of the training part
    mecref/_datafiles/FASHION_MNIST_LICENSE.txt  the dataset's copyright and MIT notice

Usage:  python3 scripts/make_bundled_data.py [--src DIR] [--out DIR] [--seed 0]
                                             [--n-train 12000] [--n-test 2000]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from mecref.data import (BUNDLED_JSON, BUNDLED_NPZ, DEBIAN_FASHION_MNIST_DIR,
                         FASHION_MNIST_CLASSES, read_idx)

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_COPYRIGHT = Path("/usr/share/doc/dataset-fashion-mnist/copyright")
FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
         "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def balanced_subset(y, n, n_classes, rng):
    """Indices of n rows of y, n / n_classes per class, drawn without replacement, sorted."""
    if n % n_classes:
        raise SystemExit(f"subset size {n} must be a multiple of the {n_classes} classes")
    per = n // n_classes
    picks = [rng.choice(np.flatnonzero(y == c), size=per, replace=False) for c in range(n_classes)]
    return np.sort(np.concatenate(picks))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=DEBIAN_FASHION_MNIST_DIR, help="folder of the four .gz files")
    ap.add_argument("--out", default=str(ROOT / "mecref" / "_datafiles"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-test", type=int, default=2000)
    args = ap.parse_args(argv)

    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays, sources = {}, {}
    for key, fname in FILES.items():
        path = src / fname
        arrays[key] = read_idx(path)
        sources[key] = {"file": fname, "bytes": path.stat().st_size,
                        "sha256": sha256(path.read_bytes()), "shape": list(arrays[key].shape)}

    k = len(FASHION_MNIST_CLASSES)
    rng = np.random.default_rng(args.seed)
    i_train = balanced_subset(arrays["train_labels"], args.n_train, k, rng)
    i_test = balanced_subset(arrays["test_labels"], args.n_test, k, rng)
    subset = {
        "x_train": arrays["train_images"][i_train], "y_train": arrays["train_labels"][i_train],
        "x_test": arrays["test_images"][i_test], "y_test": arrays["test_labels"][i_test],
        "train_index": i_train.astype(np.int32), "test_index": i_test.astype(np.int32),
    }
    np.savez_compressed(out / BUNDLED_NPZ, **subset)

    px = subset["x_train"].astype(np.float64) / 255.0
    record = {
        "dataset": "Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), class-balanced subset",
        "upstream": "https://github.com/zalandoresearch/fashion-mnist",
        "license": "MIT (Expat), Copyright 2017 Zalando SE; see FASHION_MNIST_LICENSE.txt",
        "made_by": "scripts/make_bundled_data.py",
        "source_dir": str(src),
        "source_files": sources,
        "seed": args.seed,
        "method": ("rng = numpy.random.default_rng(seed); for each class c in 0..9, "
                   "rng.choice(rows of class c, n/10, replace=False), train split first, "
                   "then test; indices sorted, so the source order is kept"),
        "numpy_version": np.__version__,
        "classes": list(FASHION_MNIST_CLASSES),
        "counts": {"train": args.n_train, "test": args.n_test},
        "counts_per_class": {
            "train": np.bincount(subset["y_train"], minlength=k).tolist(),
            "test": np.bincount(subset["y_test"], minlength=k).tolist()},
        "array_sha256": {name: sha256(np.ascontiguousarray(a).tobytes())
                         for name, a in subset.items()},
        "train_pixel_mean": round(float(px.mean()), 6),
        "train_pixel_std": round(float(px.std()), 6),
    }
    (out / BUNDLED_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    notice = DEBIAN_COPYRIGHT.read_text(encoding="utf-8") if DEBIAN_COPYRIGHT.is_file() else None
    if notice is None:
        print(f"warning: {DEBIAN_COPYRIGHT} not found; licence file not rewritten", file=sys.stderr)
    else:
        (out / "FASHION_MNIST_LICENSE.txt").write_text(
            "The images and labels in fashion_mnist_subset.npz are a subset of Fashion-MNIST,\n"
            "https://github.com/zalandoresearch/fashion-mnist, Copyright 2017 Zalando SE,\n"
            "distributed under the MIT (Expat) licence below. This notice is copied from the\n"
            f"Debian package dataset-fashion-mnist ({DEBIAN_COPYRIGHT}).\n\n" + notice,
            encoding="utf-8")
    print(f"wrote {out / BUNDLED_NPZ} ({(out / BUNDLED_NPZ).stat().st_size / 1e6:.2f} MB): "
          f"{args.n_train} train + {args.n_test} test; train pixel mean "
          f"{record['train_pixel_mean']:.6f}, std {record['train_pixel_std']:.6f}")


if __name__ == "__main__":
    main()
