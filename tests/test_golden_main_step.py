"""The default main job's training step (W2A2 LSQ, two views, order-4 Taylor MEC, SGD) gives
the numbers recorded in tests/data/golden_main_step.npz (written by
tests/data/make_golden_main_step.py; the code before the layers' speed-ups, bb3e1d0, gives the
same bits), within float64 round-off."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mecref import threads

DATA = Path(__file__).parent / "data"
# The generator first checks that no decision of the step (a quantizer's round or clip, a
# max-pool winner, a ReLU's sign) sits within 1e-9 of its tie. Then another BLAS kernel or
# thread count differs by round-off alone: float64 sums in another order differ by a few ulps
# per term, and relative to each array's norm 1e-10 is ~1e6 ulps (measured across OpenBLAS's
# Haswell, SkylakeX, Sandybridge and Prescott kernels at 1 and 2 threads: at most 1e-14),
# while a wrong gradient formula moves an array by O(1), and flipped max-pool winners by
# per cents (3-17 % in conv1's and bn1's gradients between kernels, before the check)
RTOL = 1e-10


def _gen():
    spec = importlib.util.spec_from_file_location("make_golden_main_step", DATA / "make_golden_main_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n_threads", [1, 2])
def test_main_step_matches_the_recorded_step(n_threads, monkeypatch):
    monkeypatch.setattr(threads, "MIN_ELEMENTS", 0)      # split even these small arrays
    old = threads.set_num_threads(n_threads)
    try:
        now = _gen().main_step()                         # raises TieError on a decision near a tie
    finally:
        threads.set_num_threads(old)
    golden = np.load(DATA / "golden_main_step.npz")
    keys = [k for k in golden.files if k != "commit"]
    assert set(keys) == set(now)
    for k in keys:
        a, ref = np.asarray(now[k], dtype=np.float64), golden[k].astype(np.float64)
        assert a.shape == ref.shape, k
        err = np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err <= RTOL, f"{k}: relative difference {err:.2e} > {RTOL:.0e}"
