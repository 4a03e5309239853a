"""Feature diagnostics against closed forms on constructed features (docs/derivations.md, D)."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mecref import MecrefError
from mecref.diagnostics import (coding_length_per_sample, collect_features, effective_rank,
                                feature_covariance_spectrum, per_class_spread, plot_diagnostics,
                                plot_spectra, unit_rows)


def _orthonormal(rng, d, k):
    """k orthonormal rows in R^d (a random rotation's first k rows)."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return Q[:k]


def _plus_minus(E, scale=1.0):
    """Rows +e_j and -e_j for every row e_j of E: mean 0, covariance (1/k) sum e_j e_j^T."""
    return scale * np.concatenate([E, -E])


# ---------------------------------------------------------------------------- spectrum, erank

@given(k=st.integers(1, 12), d=st.integers(12, 20), seed=st.integers(0, 2**16))
def test_k_equal_orthonormal_directions_have_effective_rank_k(k, d, seed):
    rng = np.random.default_rng(seed)
    Z = _plus_minus(_orthonormal(rng, d, k), scale=rng.uniform(0.1, 10))
    lam = feature_covariance_spectrum(Z)
    np.testing.assert_allclose(lam[:k], 1.0 / k, atol=1e-12)
    np.testing.assert_allclose(lam[k:], 0.0, atol=1e-12)
    assert effective_rank(lam) == pytest.approx(k, rel=1e-9)
    assert effective_rank(Z) == pytest.approx(k, rel=1e-9)


def test_a_single_direction_has_effective_rank_one(rng):
    v = _orthonormal(rng, 8, 1)
    signs = rng.choice([-1.0, 1.0], size=(50, 1))
    Z = signs * v * rng.uniform(0.5, 2.0, size=(50, 1))  # same direction, any length and sign
    assert effective_rank(Z) == pytest.approx(1.0, abs=1e-9)
    collapsed = np.repeat(v, 30, axis=0)  # all rows equal: no variance once centred
    assert effective_rank(collapsed, center=False) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(MecrefError, match="all-zero spectrum"):
        effective_rank(collapsed)


def test_effective_rank_of_a_two_level_spectrum_is_the_closed_form():
    # p = (a, a, b, b, b) with 2a + 3b = 1: erank = exp(-2 a log a - 3 b log b)
    lam = np.array([0.3, 0.3, 0.4 / 3, 0.4 / 3, 0.4 / 3, 0.0])
    expected = math.exp(-2 * 0.3 * math.log(0.3) - 0.4 * math.log(0.4 / 3))
    assert effective_rank(lam) == pytest.approx(expected, rel=1e-12)
    assert effective_rank(7.5 * lam) == pytest.approx(expected, rel=1e-12)  # scale-free
    assert effective_rank(list(lam)) == pytest.approx(expected, rel=1e-12)


@given(m=st.integers(2, 40), d=st.integers(1, 12), seed=st.integers(0, 2**16),
       center=st.booleans())
def test_spectrum_matches_svd_of_unit_rows_and_erank_is_bounded(m, d, seed, center):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((m, d)) * rng.uniform(0.1, 10, size=(m, 1))
    lam = feature_covariance_spectrum(Z, center=center)
    # independent oracle: squared singular values of the (centred) unit rows over m
    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    if center:
        Zn = Zn - Zn.mean(axis=0)
    sv = np.linalg.svd(Zn, compute_uv=False)
    ref = np.zeros(d)
    ref[:sv.size] = sv ** 2 / m
    np.testing.assert_allclose(lam, ref, atol=1e-12)
    assert np.all(np.diff(lam) <= 1e-15) and np.all(lam >= 0)
    if not center:
        assert lam.sum() == pytest.approx(1.0, rel=1e-12)  # tr of the covariance of unit rows
    if lam.sum() > 1e-9:
        rank = int(np.sum(lam > 1e-12 * lam.max()))
        assert 1.0 - 1e-9 <= effective_rank(lam) <= rank + 1e-9


def test_spectrum_and_erank_refuse_bad_input(rng):
    with pytest.raises(MecrefError, match="zero row"):
        feature_covariance_spectrum(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(MecrefError, match="2-dimensional"):
        feature_covariance_spectrum(np.ones(4))
    with pytest.raises(MecrefError, match="finite"):
        unit_rows(np.array([[np.nan, 1.0]]))
    with pytest.raises(MecrefError, match="non-negative"):
        effective_rank(np.array([0.5, -0.1]))
    with pytest.raises(MecrefError, match="all-zero"):
        effective_rank(np.zeros(3))
    with pytest.raises(TypeError, match="array"):
        unit_rows([[1.0, 2.0]])


# ----------------------------------------------------------------------- coding length per row

@pytest.mark.parametrize("m,d,eps", [(8, 16, 0.5), (16, 16, 1.0), (5, 32, 0.25)])
def test_coding_length_per_sample_orthonormal_rows(rng, m, d, eps):
    Z = _orthonormal(rng, d, m) * rng.uniform(0.5, 3.0, size=(m, 1))  # lengths do not matter
    mu, lam = (m + d) / 2, d / (m * eps ** 2)
    assert coding_length_per_sample(Z, eps) == pytest.approx(mu * math.log1p(lam), rel=1e-10)


@pytest.mark.parametrize("m,d,eps", [(8, 16, 0.5), (64, 16, 1.0), (33, 4, 2.0)])
def test_coding_length_per_sample_collapsed_rows(rng, m, d, eps):
    v = _orthonormal(rng, d, 1)
    Z = np.repeat(v, m, axis=0) * rng.uniform(0.5, 3.0, size=(m, 1))
    mu, lam = (m + d) / 2, d / (m * eps ** 2)
    assert coding_length_per_sample(Z, eps) == pytest.approx(mu * math.log1p(lam * m) / m,
                                                             rel=1e-10)


def test_coding_length_per_sample_rises_with_spread_and_validates(rng):
    spread = rng.standard_normal((64, 16))
    collapsed = np.repeat(spread[:1], 64, axis=0) + 1e-3 * rng.standard_normal((64, 16))
    assert coding_length_per_sample(spread, 0.5) > 3 * coding_length_per_sample(collapsed, 0.5)
    with pytest.raises(MecrefError, match="eps"):
        coding_length_per_sample(spread, 0.0)


# ------------------------------------------------------------------------------ class spread

@pytest.mark.parametrize("K,per_class,theta", [(2, 2, 0.3), (5, 4, 0.8), (10, 6, 1.2)])
def test_per_class_spread_on_constructed_clusters(rng, K, per_class, theta):
    # class c: unit rows cos(t) e_c + sin(t) (+-f_c or +-g_c), all e, f, g orthonormal.
    # Class mean cos(t) e_c, W_c = sin(t)^2; B = cos(t)^2 (1 - 1/K).
    E = _orthonormal(rng, 3 * K + 1, 3 * K)
    e, f, g = E[:K], E[K:2 * K], E[2 * K:]
    rows, labels = [], []
    offsets = [1, -1, 1, -1, 1, -1]
    for c in range(K):
        for j in range(per_class):
            side = (f if j % 4 < 2 else g)[c]
            rows.append(math.cos(theta) * e[c] + math.sin(theta) * offsets[j] * side)
            labels.append(c)
    perm = rng.permutation(len(rows))
    Z = 2.5 * np.array(rows)[perm]
    y = np.array(labels)[perm]
    s = per_class_spread(Z, y)
    W, B = math.sin(theta) ** 2, math.cos(theta) ** 2 * (1 - 1 / K)
    assert s["classes"] == list(range(K)) and s["counts"] == [per_class] * K
    np.testing.assert_allclose(s["within"], W, rtol=1e-10)
    assert s["within_mean"] == pytest.approx(W, rel=1e-10)
    assert s["between"] == pytest.approx(B, rel=1e-10)
    assert s["ratio"] == pytest.approx(B / W, rel=1e-10)
    assert s["total"] == pytest.approx(W + B, rel=1e-10)


@given(m=st.integers(3, 50), d=st.integers(2, 8), K=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_total_spread_is_within_plus_between(m, d, K, seed):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((m, d))
    y = rng.integers(0, K, size=m)
    s = per_class_spread(Z, y)
    assert s["total"] == pytest.approx(s["within_mean"] + s["between"], rel=1e-10, abs=1e-12)
    assert sum(s["counts"]) == m


def test_collapsed_classes_have_infinite_ratio_and_labels_are_checked():
    Z = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    s = per_class_spread(Z, np.array([0, 0, 1, 1]))
    assert s["within_mean"] == 0.0 and s["ratio"] == math.inf and s["between"] == pytest.approx(0.5)
    with pytest.raises(MecrefError, match=r"shape \(4,\)"):
        per_class_spread(Z, np.array([0, 1]))
    with pytest.raises(MecrefError, match="integer"):
        per_class_spread(Z, np.array([0.0, 0, 1, 1]))


# --------------------------------------------------------------------------------------- plots

def test_plots_write_images(tmp_path, rng):
    lam = feature_covariance_spectrum(rng.standard_normal((40, 6)))
    lam[-1] = 0.0  # zeros are skipped on the log axis
    p = plot_spectra({"a": lam, "b": lam[::-1].copy()[::-1] * 0.5}, tmp_path / "s.png")
    assert p.stat().st_size > 1000
    table = [dict(bits="FP32", method="FP32", effective_rank=5.0, coding_length_per_sample=9.0,
                  between_within=2.0)]
    for b in ("W4A4", "W2A2"):
        for meth, er in (("LSQ", 3.0), ("MEC-Quant (Taylor n=4)", 4.0)):
            table.append(dict(bits=b, method=meth, effective_rank=er,
                              coding_length_per_sample=er * 2, between_within=None))
    p = plot_diagnostics(table, tmp_path / "sub" / "d.png")
    assert p.stat().st_size > 1000
    with pytest.raises(MecrefError):
        plot_spectra({}, tmp_path / "x.png")


# ------------------------------------------------------------------- models: features, the CLI

SMALL = dict(epochs=1, train_limit=128, batch_size=32, width=(4, 8, 8), progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mecref.train import train_small_cnn
    d = tmp_path_factory.mktemp("ckpt")
    return train_small_cnn(quantizer="lsq", w_bits=2, a_bits=2, reg="mec", checkpoint_dir=d,
                           **SMALL)


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    return tiny_run.model


def test_a_model_rebuilt_from_its_checkpoint_gives_the_same_features(tiny_run):
    from mecref.data import load_bundled
    from mecref.experiments import model_from_checkpoint
    ds = load_bundled()
    model, meta = model_from_checkpoint(tiny_run.checkpoint)
    assert meta["config"] == tiny_run.config
    Z, pred = collect_features(model, ds.x_test[:100], ds.y_test[:100])
    Z0, pred0 = collect_features(tiny_run.model, ds.x_test[:100], ds.y_test[:100])
    assert np.array_equal(Z, Z0) and np.array_equal(pred, pred0)


def test_collect_features_is_batch_independent_and_matches_evaluate(tiny_model):
    from mecref.data import load_bundled
    from mecref.train import evaluate
    ds = load_bundled()
    x, y = ds.x_test[:300], ds.y_test[:300]
    Z, pred = collect_features(tiny_model, x, y, batch_size=500)
    Z7, pred7 = collect_features(tiny_model, x, y, batch_size=7)
    assert Z.shape == (300, 8) and Z.dtype == np.float64 and pred.shape == (300,)
    np.testing.assert_allclose(Z7, Z, rtol=1e-5, atol=1e-6)
    assert np.mean(pred == y) == pytest.approx(evaluate(tiny_model, x, y))
    assert np.mean(pred7 == pred) > 0.99


def test_diagnose_cli_trains_measures_and_reuses_cells(tmp_path, capsys):
    from mecref.cli import main
    argv = ["diagnose", "--out", str(tmp_path), "--bits", "W2A2", "--epochs", "1",
            "--train-limit", "128", "--batch-size", "32", "--width", "4", "8", "8",
            "--n-samples", "200", "--workers", "1", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| W2A2 | MEC-Quant (Taylor n=4) |" in out and "| FP32 | FP32 |" in out
    res = json.loads((tmp_path / "diagnostics.json").read_text())
    assert [(r["bits"], r["method"]) for r in res["table"]] == [
        ("FP32", "FP32"), ("W2A2", "LSQ"), ("W2A2", "MEC-Quant (Taylor n=4)")]
    assert [r["name"] for r in res["table"]] == ["FP32", "W2A2 LSQ", "W2A2 MEC-Quant (Taylor n=4)"]
    for r in res["table"]:
        assert 1.0 <= r["effective_rank"] <= r["d"] and r["m"] + r["zero_rows"] == 200
        assert r["coding_length_per_sample"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        assert len(res["spectra"][r["name"]]) == 8
    assert (tmp_path / "spectra_W2A2.png").is_file() and (tmp_path / "diagnostics.png").is_file()
    runs = sorted((tmp_path / "runs").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in runs]
    assert len(runs) == 3
    assert main(argv) == 0  # second call: loads the checkpoints, trains nothing
    assert [p.stat().st_mtime_ns for p in runs] == mtimes
