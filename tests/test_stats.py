"""The paired statistics of the fair test against SciPy and a hand computation."""
import numpy as np
import pytest
from scipy import stats as sps

from mecref import MecrefError
from mecref.stats import paired, paired_summary, plot_forest


def test_t_interval_and_p_value_by_hand():
    # d = 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5); t_{4, 0.975} = 2.776445105
    s = paired_summary([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445105 * np.sqrt(0.5)
    assert s["n"] == 5 and s["mean"] == 3.0 and s["sd"] == pytest.approx(np.sqrt(2.5))
    assert (s["t_low"], s["t_high"]) == pytest.approx((3 - half, 3 + half), rel=1e-9)
    # t = 3 / sqrt(0.5) = 4.2426; two-sided p of Student's t with 4 d.o.f.
    assert s["p"] == pytest.approx(0.013236, abs=2e-6)


def test_against_scipy_on_paired_data():
    rng = np.random.default_rng(3)
    a = rng.normal(80, 1, 7)
    b = a - rng.normal(0.4, 0.5, 7)
    s = paired_summary(a - b, n_resamples=2000, seed=11)
    assert s["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-10)
    lo, hi = sps.t.interval(0.95, 6, loc=np.mean(a - b), scale=sps.sem(a - b))
    assert (s["t_low"], s["t_high"]) == pytest.approx((lo, hi), rel=1e-10)
    boot = sps.bootstrap((a - b,), np.mean, n_resamples=2000, method="percentile",
                         random_state=np.random.default_rng(11)).confidence_interval
    assert (s["boot_low"], s["boot_high"]) == pytest.approx((boot.low, boot.high), rel=1e-12)
    assert np.min(a - b) <= s["boot_low"] < s["boot_high"] <= np.max(a - b)


def test_constant_differences_and_refusals():
    s = paired_summary([0.5, 0.5, 0.5])
    assert s["t_low"] == s["t_high"] == s["boot_low"] == 0.5 and s["p"] == 0.0
    assert paired_summary([0.0, 0.0])["p"] == 1.0
    for bad in ([1.0], [1.0, np.nan], [[1.0, 2.0]]):
        with pytest.raises(MecrefError, match="diffs must be"):
            paired_summary(bad)
    with pytest.raises(MecrefError, match="confidence"):
        paired_summary([1.0, 2.0], confidence=95)


def test_paired_aligns_on_common_seeds():
    seeds, a, b = paired({0: 1.0, 1: 2.0, 3: 4.0}, {1: 0.5, 0: 0.25, 2: 9.0})
    assert seeds == [0, 1] and a.tolist() == [1.0, 2.0] and b.tolist() == [0.25, 0.5]
    with pytest.raises(MecrefError, match="at least 2 common seeds"):
        paired({0: 1.0}, {0: 2.0, 1: 3.0})


def test_forest_plot_writes_an_image(tmp_path):
    import matplotlib.image as mpimg
    e = dict(label="W2A2 exact - LSQ", mean=0.3, t_low=-0.2, t_high=0.8, boot_low=-0.1,
             boot_high=0.6, diffs=[0.1, 0.5, 0.3])
    p = plot_forest([e, dict(e, label="W2A2 MOE K=4 - LSQ", mean=-2, t_low=-3, t_high=-1)],
                    tmp_path / "f.png", title="test")
    assert mpimg.imread(p).shape[2] in (3, 4)
    with pytest.raises(MecrefError, match="no entries"):
        plot_forest([], tmp_path / "g.png")
