"""The default main job's training step (W2A2 LSQ, two views, order-4 Taylor MEC, SGD) gives
the numbers recorded in tests/data/golden_main_step.npz (written by
tests/data/make_golden_main_step.py; the code before the layers' speed-ups, bb3e1d0, gives the
same bits), within float64 round-off; and the check that keeps every decision of the golden
steps clear of its tie (tests/data/golden_setup.py) finds the ties it is there for."""
import importlib.util
import sys
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


def test_the_tie_check_finds_the_max_pool_ties_of_lsqs_own_steps():
    """With LSQ's steps as initialised (not powers of two), two outputs of a quantized conv in
    one pool window are equal in exact arithmetic and the GEMM's rounding picks the winner:
    the check must refuse that step (it is what moved conv1's gradient by 12 % between
    OpenBLAS kernels)."""
    gen = _gen()
    with pytest.raises(sys.modules["golden_setup"].TieError, match="pool1: .*rounded GEMM"):
        gen.main_step(power_of_two=False)


def test_the_tie_check_measures_each_kind_of_decision():
    _gen()
    setup = sys.modules["golden_setup"]
    # a quantizer input: distance in steps to k + 1/2, to Qn and to Qp (exact zeros skipped)
    assert setup._quantizer_margin(np.array([0.0, 1.2, 2.5 + 1e-12]), 0, 3) == pytest.approx(1e-12, abs=1e-15)
    assert setup._quantizer_margin(np.array([0.0, 1.2, 3.0 - 1e-11]), 0, 3) == pytest.approx(1e-11, abs=1e-15)
    assert setup._quantizer_margin(np.array([0.0, 1.2, -0.7]), -4, 3) == pytest.approx(0.2)
    # a pool window: the gap below its max (relative to max |x|), bit-equal ties, the sign
    x = np.array([[[[1.0, 0.5], [0.2, 1.0 - 1e-13]], [[-0.5, -0.25], [-1.0, -0.3]]]])   # (1, 2, 2, 2)
    near, ties, sign = setup._pool_margins(x.transpose(1, 0, 2, 3), relu=True)
    assert near == pytest.approx(1e-13, rel=1e-3) and not ties and sign == pytest.approx(0.25)
    near, ties, sign = setup._pool_margins(np.array([[[[2.0, 2.0], [1.0, 0.0]]]]), relu=False)
    assert near == 0.5 and ties and sign == np.inf
