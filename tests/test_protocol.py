"""The standard QAT protocol (FP32 pretraining per seed, cached and shared), the placement
option and the regulariser registry, on tiny runs."""
import json

import numpy as np
import pytest

from mecref import MecrefError, regularizers
from mecref.experiments import (cell_config, cell_key, method_label, pretrain_cell, run_grid,
                                sweep_grid)
from mecref.train import REGULARIZERS, TrainConfig, train_small_cnn

def _pre_key(full):
    pre = pretrain_cell(full)
    return cell_key({k: v for k, v in pre.items() if k != "seed"}, pre["seed"])


TINY = dict(epochs=1, train_limit=256, batch_size=64, width=(4, 8, 8), val_size=128)


def test_pretrain_config_keeps_the_data_and_drops_the_method():
    cfg = TrainConfig(**TINY, quantizer="lsq", reg="moe", eps=4.0, lr=0.03, seed=3,
                      pretrain_epochs=2, pretrain_lr=0.2).validate()
    pre = cfg.pretrain_config()
    assert (pre.quantizer, pre.reg, pre.epochs, pre.lr, pre.pretrain_epochs) == ("fp32", None, 2, 0.2, 0)
    assert (pre.seed, pre.train_limit, pre.val_size, pre.width) == (3, 256, 128, (4, 8, 8))
    assert pre.eps == TrainConfig().eps  # method fields at their defaults: one pretraining a seed
    with pytest.raises(MecrefError, match="pretrain_epochs=0"):
        TrainConfig().pretrain_config()


def test_grid_pretrains_once_per_seed_and_every_method_starts_from_it(tmp_path):
    base = dict(TINY, pretrain_epochs=1, w_bits=2, a_bits=2)
    configs = [dict(base, quantizer="lsq", reg=None), dict(base, quantizer="lsq", reg="mec_taylor"),
               dict(base, quantizer="ste", reg=None)]
    seen = []
    recs = run_grid(configs, [0], tmp_path, workers=1, progress=lambda r, d, t: seen.append(r["key"]))
    pre_key = _pre_key(recs[0]["config"])
    assert seen[0] == pre_key and len(seen) == 4  # one pretraining, then the three methods
    assert {r["pretrained_from"] for r in recs} == {f"checkpoints/{pre_key}/last.npz"}
    # the cached path gives what one call of train_small_cnn gives (it pretrains in-process)
    direct = train_small_cnn(TrainConfig(**configs[1], seed=0), progress=False)
    assert recs[1]["test_acc"] == direct.test_acc
    assert recs[1]["history"][0]["loss"] == pytest.approx(direct.history[0]["loss"], rel=1e-6)
    # the QAT run really starts from the pretrained weights (the first conv is unchanged by
    # its quantizer's data-driven init and trained on from there)
    scratch = train_small_cnn(TrainConfig(**dict(configs[1], pretrain_epochs=0), seed=0), progress=False)
    assert direct.test_acc != scratch.test_acc
    # a second seed pretrains once more; a rerun trains nothing
    seen.clear()
    run_grid(configs, [0, 1], tmp_path, workers=1, progress=lambda r, d, t: seen.append(r["key"]))
    assert len(seen) == 4 and seen[0] == _pre_key(dict(recs[0]["config"], seed=1))
    seen.clear()
    assert all(r["from_cache"] for r in run_grid(configs, [0, 1], tmp_path, workers=1, progress=False))


def test_a_diverged_pretraining_is_reported_for_every_cell_that_needs_it(tmp_path, monkeypatch):
    from mecref import gridrun, grids
    real = gridrun._run_cell        # looked up in mecref.gridrun, where run_grid calls it

    def fake(full, out_dir, progress=False, init_from=None):
        if full["quantizer"] == "fp32":
            rec = dict(key=grids._digest(full), group="g", label="FP32", bits="FP32",
                       seed=full["seed"], config=full, status="diverged", error="loss is nan",
                       history=[], test_acc=None, val_acc=None, seconds=None,
                       seconds_per_epoch=[], checkpoint=None)
            return rec
        return real(full, out_dir, progress, init_from)

    monkeypatch.setattr(gridrun, "_run_cell", fake)
    recs = run_grid([dict(TINY, pretrain_epochs=1, quantizer="lsq", reg=None)], [0], tmp_path,
                    workers=1, progress=False)
    assert recs[0]["status"] == "diverged" and "FP32 pretraining" in recs[0]["error"]


def test_new_fields_at_their_neutral_values_keep_earlier_cache_keys():
    import hashlib
    full = cell_config(dict(quantizer="lsq"), 0)
    before = {k: v for k, v in full.items() if k not in ("pretrain_epochs", "pretrain_lr", "reg_at")}
    text = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert cell_key(dict(quantizer="lsq"), 0) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert cell_key(dict(quantizer="lsq", reg_at="blocks"), 0) != cell_key(dict(quantizer="lsq"), 0)
    assert cell_key(dict(quantizer="lsq", pretrain_epochs=2), 0) != cell_key(dict(quantizer="lsq"), 0)


def test_reg_at_blocks_trains_and_is_labelled():
    kw = dict(TINY, quantizer="lsq", reg="mec_taylor", eps=16.0, progress=False)
    a = train_small_cnn(**kw)
    b = train_small_cnn(**kw, reg_at="blocks")
    assert b.history[0]["reg"] != a.history[0]["reg"]
    assert method_label(b.config) == "MEC-Quant (Taylor n=4, at blocks)"
    with pytest.raises(MecrefError, match="reg_at must be one of"):
        TrainConfig(reg_at="everywhere").validate()


def _half_mec():
    """A form that exists only in this test: half the exact MEC loss."""
    from mecref import entropy

    def fwd(Z1, Z2, eps):
        L, cache = entropy.mec_loss(Z1, Z2, eps)
        return 0.5 * L, cache

    def bwd(cache, dL):
        return entropy.mec_loss_backward(cache, 0.5 * dL)

    return regularizers.Regularizer("half_mec", fwd, bwd, label="half exact",
                                    help="half the exact MEC loss (a test form)")


def test_registering_a_form_makes_it_trainable_listed_and_sweepable(capsys):
    from mecref.cli import build_parser
    reg = regularizers.register(_half_mec())
    try:
        assert "half_mec" in REGULARIZERS
        kw = dict(TINY, quantizer="lsq", eps=4.0, progress=False)
        half = train_small_cnn(**kw, reg="half_mec")
        full = train_small_cnn(**kw, reg="mec")
        assert half.history[0]["reg"] == pytest.approx(0.5 * full.history[0]["reg"], rel=0.05)
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--help"])
        assert "half_mec: half the exact MEC loss" in " ".join(capsys.readouterr().out.split())
        grid = sweep_grid(forms=[{"reg": "half_mec"}], eps_values=(2.0, 4.0), reg_weights=(0.1,))
        assert [method_label(c) for c in grid] == ["LSQ"] + ["MEC-Quant (half exact)"] * 2
        with pytest.raises(MecrefError, match="already registered"):
            regularizers.register(_half_mec())
    finally:
        regularizers.unregister("half_mec")
    assert "half_mec" not in REGULARIZERS
    with pytest.raises(MecrefError, match="reg must be one of"):
        TrainConfig(reg="half_mec").validate()


def test_registering_a_scheme_makes_it_trainable_listed_labelled_and_exportable(capsys):
    """A scheme made of existing quantizers (LSQ weights, PACT activations), registered in the
    test only: it trains, `mecref train --help` lists it, tables name it, and the integer
    export reproduces its fake-quantized predictions."""
    from mecref import schemes
    from mecref.cli import build_parser
    from mecref.data import load_bundled
    from mecref.export import export_int_model, int_predict
    from mecref.experiments import main_grid
    from mecref.train import QUANTIZERS
    sch = schemes.register(schemes.Scheme(
        "lsq_pact", schemes.LSQ_WEIGHT, schemes.PACT_ACT, "LSQ+PACT", act_signed=schemes.STE_ACT,
        help="LSQ weights, PACT activations (a test scheme)"))
    try:
        assert "lsq_pact" in QUANTIZERS
        res = train_small_cnn(**dict(TINY, val_size=0), quantizer="lsq_pact", w_bits=4, a_bits=4,
                              reg=None, progress=False)
        conv2 = res.model.layers[3]
        assert set(conv2.params) == {"W", "s_w", "alpha"} and conv2.a_quant is schemes.PACT_ACT
        assert {"s_w", "alpha"} <= conv2.no_decay and {"s_w", "alpha"} <= conv2.positive
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--help"])
        assert "lsq_pact: LSQ weights, PACT activations" in " ".join(capsys.readouterr().out.split())
        assert "LSQ+PACT" in [method_label(c) for c in main_grid(epochs=1, bits=[(2, 2)])]
        ds = load_bundled()
        x = ds.x_test[:300]
        imodel = export_int_model(res.model)
        from mecref.diagnostics import collect_features
        _, pred = collect_features(res.model, x, ds.y_test[:300])
        assert np.mean(int_predict(imodel, x) == pred) >= 0.99
    finally:
        schemes.unregister("lsq_pact")
    assert "lsq_pact" not in QUANTIZERS
    with pytest.raises(MecrefError, match="quantizer must be one of"):
        TrainConfig(quantizer="lsq_pact").validate()
