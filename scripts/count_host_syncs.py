"""Host syncs per training step on the CuPy path, counted on the test stand-in for CuPy.

    python3 scripts/count_host_syncs.py

Runs a few steps of ``train_step`` (as ``train_small_cnn`` builds them) with backend="cupy"
pointed at ``tests/fakecupy``, which counts every device-to-host read (``.get()``,
``float``/``int``/``bool`` of a device array, boolean masks, ``flatnonzero``, the solver
status reads of ``cupyx.errstate(linalg="raise")``), and prints the reads per step, after the
first two steps (the first initialises the quantizers), for each quantizer and regulariser.
On a GPU each read waits for the device's queue to drain. No GPU is needed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from conftest import cupy_stand_in  # noqa: E402  (tests/conftest.py: the stand-in, guarded)

from mecref.train import TrainConfig  # noqa: E402

CONFIGS = [("lsq", "mec_taylor"), ("lsq", "mec"), ("lsq", "moe"), ("lsq", None),
           ("lsqplus", "mec_taylor"), ("dorefa_pact", "mec_taylor"), ("ste", "mec_taylor"),
           ("fp32", None)]
STEPS = 4


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def syncs_per_step(quantizer, reg, steps=STEPS):
    """(reads per step, reads per step by kind) for steps 3 .. 2 + steps of a small run."""
    gc = _gpu_check()
    cfg = TrainConfig(quantizer=quantizer, reg=reg, backend="cupy", train_limit=256,
                      batch_size=32, width=(4, 8, 8))
    with cupy_stand_in() as fake:
        gc.first_step_losses(cfg, 2)
        head = dict(fake.syncs)
        fake.reset_counters()
        gc.first_step_losses(cfg, 2 + steps)
        tail = dict(fake.syncs)
    kinds = {k: (tail.get(k, 0) - head.get(k, 0)) / steps for k in set(head) | set(tail)}
    kinds = {k: v for k, v in sorted(kinds.items()) if v}
    return sum(kinds.values()), kinds


def main():
    print("| quantizer | regulariser | host syncs per step | by kind |")
    print("|---|---|---|---|")
    for q, reg in CONFIGS:
        n, kinds = syncs_per_step(q, reg)
        by = ", ".join(f"{k} {v:g}" for k, v in kinds.items())
        print(f"| {q} | {reg} | {n:g} | {by} |")


if __name__ == "__main__":
    main()
