"""Integer export and integer-only inference against the fake-quantized float model.

Oracles: the float model's own forward (predictions, logits), each quantized layer's input
codes recomputed in this file from the layer's quantizer parameters (not by compare_int), each
quantized layer's forward rebuilt from the exported codes and scales, numpy.rint for the
fixed-point rounding, and the float64 value of each fixed-point multiplier.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mecref import nn
from mecref.data import load_bundled, normalize
from mecref.export import (ExportError, IntModel, _fixed_point, _round_shift, compare_int,
                           export_int_model, fake_quant_trace, int_forward, int_predict,
                           int_run, load_int_model, save_int_model)
from mecref.train import train_small_cnn

TINY = dict(epochs=1, train_limit=1024, batch_size=64, lr=0.2, warmup_epochs=0.0, reg="mec",
            reg_weight=0.5, eps=0.5, width=(8, 16, 16), progress=False)
# (quantizer, w_bits, a_bits, first_last_bits)
WHOLE_SET = [("lsq", 8, 8, 8), ("lsq", 4, 4, 8), ("lsq", 2, 2, 8)]
OTHERS = [("ste", 4, 4, 8), ("lsqplus", 2, 2, 8), ("dorefa_pact", 2, 2, 4), ("lsq", 1, 1, 1)]


@pytest.fixture(scope="module")
def test_set():
    ds = load_bundled()
    return ds.x_test, ds.y_test


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny trained model per configuration (1-2 s each; the other schemes on 512 images)."""
    out = {}
    for q, w, a, fl in WHOLE_SET + OTHERS:
        d = tmp_path_factory.mktemp(f"{q}{w}{a}{fl}")
        limit = dict(train_limit=512) if (q, w, a, fl) in OTHERS else {}
        res = train_small_cnn(quantizer=q, w_bits=w, a_bits=a, first_last_bits=fl,
                              checkpoint_dir=d, **dict(TINY, **limit))
        out[(q, w, a, fl)] = (res.model, d / "last.npz")
    return out


def _fake_predictions(model, x):
    return np.concatenate([model.forward(normalize(x[i:i + 500]), train=False)[0].argmax(axis=1)
                           for i in range(0, len(x), 500)])


def _check_agreement(res, model, x, imodel):
    """Every stage fed with the float model's codes lands within one code of them; logits
    within one logit step plus the float model's own float32 rounding."""
    assert np.array_equal(res["pred_fake"], _fake_predictions(model, x))
    for t, s in res["stages"].items():
        if t == "logits":
            continue
        assert s["max_diff"] <= 1, (t, s)
        assert s["n_diff"] <= 1e-4 * s["size"], (t, s)
    assert res["stages"][next(iter(res["stages"]))]["max_diff"] == 0   # the pixel table is exact
    fake = fake_quant_trace(model, x[:500])
    S = imodel.tensors["logits"]["scale"]
    got = int_run(imodel, {"fc.in": fake["fc.in"]}, ["logits"])["logits"] * S
    assert np.abs(got - fake["logits"]).max() <= S + 1e-5 * np.abs(fake["logits"]).max()


def _qrange(bits, signed):
    """(Qn, Qp) from the definition (derivations Q1), not from mecref.quant."""
    if not signed:
        return 0, 2 ** bits - 1
    return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _input_codes(layer, h):
    """The integer code of each input of a quantized layer, from its params and the rules of
    derivations N9 (not from mecref.export): LSQ clip(rint(h / s)), LSQ+ clip(rint((h - beta) / s)),
    STE s = a_max / Qp, PACT rint(clip(h, 0, alpha) Qp / alpha); signed inputs of a
    dorefa_pact layer use the STE quantizer. The binary signed case is sign(h), sign(0) = +1."""
    h = np.asarray(h, np.float64)
    Qn, Qp = _qrange(layer.a_bits, layer.a_signed)
    kind = "ste" if layer.scheme == "dorefa_pact" and layer.a_signed else layer.scheme
    if kind == "dorefa_pact":
        alpha = np.float64(layer.params["alpha"].reshape(()))
        return np.rint(np.clip(h, 0, alpha) * Qp / alpha).astype(np.int64)
    if kind == "ste":
        s = np.float64(layer.buffers["a_max"].reshape(())) / Qp
        v = h / s
    elif kind == "lsq":
        v = h / np.float64(layer.params["s_a"].reshape(()))
    else:
        v = (h - np.float64(layer.params["beta_a"].reshape(()))) / np.float64(layer.params["s_a"].reshape(()))
    if layer.a_bits == 1 and layer.a_signed:
        return np.where(v >= 0, 1, -1)
    return np.clip(np.rint(v), Qn, Qp).astype(np.int64)


def _check_against_recomputed(model, imodel, x, min_pred_agreement=1.0):
    """The integer model's codes at every quantized layer's input, and its logits, against the
    float model's own forward with the codes recomputed above (no compare_int): every code
    within one of the recomputed one and at most 1e-3 of them off (float32 ties); every
    prediction equal (or the given share); the logits within 2 % of their range."""
    logits_int, codes = int_forward(imodel, x, return_codes=True)
    h = normalize(x)
    for name, layer in zip(model.names, model.layers):
        if isinstance(layer, (nn.QuantConv2d, nn.QuantLinear)) and f"{name}.in" in codes:
            want = _input_codes(layer, h).reshape(codes[f"{name}.in"].shape)
            diff = np.abs(codes[f"{name}.in"].astype(np.int64) - want)
            assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (name, diff.max(), (diff > 0).mean())
        h = layer.forward(h, train=False)
    fake = np.asarray(h, np.float64)
    got = logits_int * imodel.tensors["logits"]["scale"]
    assert (got.argmax(axis=1) == fake.argmax(axis=1)).mean() >= min_pred_agreement
    assert np.abs(got - fake).max() <= 0.02 * (fake.max() - fake.min())


def _quick_model(q, w, a, fl, seed=0):
    """An untrained quantized model whose quantizers and BatchNorm statistics have been set by
    a few train-mode forwards on bundled images, and whose BatchNorm affine is random."""
    model = nn.small_cnn(quantizer=q, w_bits=w, a_bits=a, first_last_bits=fl, width=(4, 8, 8), seed=seed)
    rng = np.random.default_rng(seed)
    for bn in (model.layers[1], model.layers[4], model.layers[7]):
        bn.momentum = 1.0   # running statistics = the last batch's
        C = bn.params["gamma"].shape
        bn.params["gamma"][...] = rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)
        bn.params["beta"][...] = rng.uniform(-0.3, 0.3, bn.params["beta"].shape)
    x = load_bundled().x_train
    for i in range(3):
        model.forward(normalize(x[i * 200:(i + 1) * 200]), train=True)
    return model


@pytest.mark.parametrize("cfg", WHOLE_SET + OTHERS, ids=lambda c: f"{c[0]}-W{c[1]}A{c[2]}-FL{c[3]}")
def test_integer_path_of_an_untrained_model_matches_codes_recomputed_from_the_float_model(cfg, test_set):
    """Fast (no training, no compare_int): the integer model against the float model's forward
    and each input code recomputed from the layer's own quantizer parameters."""
    model = _quick_model(*cfg)
    imodel = export_int_model(model)
    _check_against_recomputed(model, imodel, test_set[0][:300],
                              min_pred_agreement=0.98 if cfg[0] == "dorefa_pact" else 1.0)


@pytest.mark.parametrize("cfg", WHOLE_SET, ids=lambda c: f"{c[0]}-W{c[1]}A{c[2]}")
def test_integer_path_reproduces_fake_quant_predictions_on_the_whole_test_set(models, test_set, cfg):
    model, _ = models[cfg]
    x, _ = test_set
    imodel = export_int_model(model)
    res = compare_int(model, imodel, x)
    assert res["n"] == 2000 and res["pred_equal"] == 2000
    _check_agreement(res, model, x, imodel)
    _check_against_recomputed(model, imodel, x)


@pytest.mark.parametrize("cfg", OTHERS, ids=lambda c: f"{c[0]}-W{c[1]}A{c[2]}-FL{c[3]}")
def test_other_schemes_and_binary_layers_export(models, test_set, cfg):
    model, _ = models[cfg]
    x = test_set[0][:500]
    imodel = export_int_model(model)
    res = compare_int(model, imodel, x)
    _check_agreement(res, model, x, imodel)
    # DoReFa's float32 levels 2k/Qp - 1 sit up to ~4e-5 of a code off the grid (derivations
    # X6), so near-ties round differently more often; the others must agree on every image
    assert res["pred_equal"] >= (0.99 if cfg[0] == "dorefa_pact" else 1.0) * res["n"]
    _check_against_recomputed(model, imodel, x, 0.99 if cfg[0] == "dorefa_pact" else 1.0)


def test_exported_codes_and_scales_rebuild_every_quantized_layer(models, test_set):
    """(codes * s + beta) through the layer's plain op with (Wc * sw) equals the layer's own
    fake-quantized forward: the export reads each quantizer as the layer runs it."""
    model, _ = models[("lsqplus", 2, 2, 8)]
    imodel = export_int_model(model)
    h = normalize(test_set[0][:64])
    for name, layer in zip(model.names, model.layers):
        if isinstance(layer, (nn.QuantConv2d, nn.QuantLinear)):
            codes = fake_quant_trace(model, test_set[0][:64])[f"{name}.in"]
            t = imodel.tensors[f"{name}.in"]
            xq = (codes * t["scale"] + t["offset"]).astype(np.float64)
            Wc = imodel.arrays[f"{name}.w"].astype(np.float64)
            sw = imodel.arrays[f"{name}.w_scale"].astype(np.float64)
            Wq = Wc * sw.reshape((-1,) + (1,) * (Wc.ndim - 1))
            if isinstance(layer, nn.QuantConv2d):
                plain = nn.Conv2d(Wc.shape[1], Wc.shape[0], 3, 1, 1, bias=False).astype(np.float64)
            else:
                plain = nn.Linear(Wc.shape[1], Wc.shape[0]).astype(np.float64)
                plain.params["b"][...] = layer.params["b"]
            plain.params["W"][...] = Wq
            want = layer.forward(h, train=False)
            got = plain.forward(xq.reshape(want.shape[:1] + xq.shape[1:]), train=False)
            assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()), name
        h = layer.forward(h, train=False)


def test_negative_batchnorm_gamma_keeps_the_match(models, test_set):
    """A negative BN factor makes the requantisation decreasing; pooling the requantised
    codes is still the fake model's ReLU-maxpool-quantize (derivations X4)."""
    src, _ = models[("lsq", 4, 4, 8)]
    model = nn.small_cnn(**src.config)
    model.load_state_dict(src.state_dict())
    for bn in (model.layers[1], model.layers[4], model.layers[7]):
        bn.params["gamma"][::2] *= -1
    x = test_set[0][:300]
    imodel = export_int_model(model)
    res = compare_int(model, imodel, x)
    assert res["pred_equal"] == res["n"]
    _check_agreement(res, model, x, imodel)


@given(st.integers(-2 ** 52, 2 ** 52), st.integers(1, 30))
def test_round_shift_is_rint_of_the_quotient(V, n):
    got = _round_shift(np.array([V], np.int64), np.array([n], np.int64))[0]
    assert got == np.rint(V / 2.0 ** n)    # exact: |V| < 2^53, ties to even as numpy.rint


def test_round_shift_ties_go_to_even():
    V = np.array([4, 12, 20, -4, -12, 5, -5], np.int64)   # /8: .5, 1.5, 2.5, -.5, -1.5, ...
    assert _round_shift(V, np.int64(3)).tolist() == [0, 2, 2, 0, -2, 1, -1]


@given(st.floats(1e-7, 1e6), st.floats(-1e4, 1e4), st.integers(1, 2 ** 24))
def test_fixed_point_multiplier_is_accurate_and_cannot_overflow(m, c, bound):
    M, n, C = _fixed_point(np.array([m]), np.array([c]), np.array([float(bound)]), terms=49)
    M, n, C = int(M[0]), int(n[0]), int(C[0])
    assert 1 <= n <= 62 and abs(M) < 2 ** 31
    assert 49 * (abs(M) * bound + abs(C)) < 2 ** 62
    assert abs(M / 2.0 ** n - m) <= max(m * 2.0 ** -29, 2.0 ** -n)
    assert abs(C / 2.0 ** n - c) <= 2.0 ** -n


def test_save_load_round_trip(models, test_set, tmp_path):
    model, _ = models[("lsq", 2, 2, 8)]
    imodel = export_int_model(model)
    p = save_int_model(imodel, tmp_path / "int.npz")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["int.json", "int.npz"]
    doc = json.loads((tmp_path / "int.json").read_text())
    assert doc["graph"] == imodel.graph and doc["model_config"]["w_bits"] == 2
    back = load_int_model(p)
    x = test_set[0][:200]
    assert np.array_equal(int_forward(back, x), int_forward(imodel, x))
    assert int_predict(back, x).shape == (200,)
    w = back.arrays["conv2.w"]
    assert w.dtype == np.int8 and w.min() >= -2 and w.max() <= 1       # 2-bit signed codes
    assert back.arrays["conv2.M"].dtype == np.int32


def test_corrupt_or_foreign_files_are_refused(models, tmp_path):
    model, ckpt = models[("lsq", 2, 2, 8)]
    imodel_ref = export_int_model(model)
    p = save_int_model(imodel_ref, tmp_path / "int.npz")
    raw = p.read_bytes()
    for i, bad in enumerate((raw[: len(raw) // 2], b"", b"garbage" * 50)):
        q = tmp_path / f"bad{i}.npz"
        q.write_bytes(bad)
        with pytest.raises(ExportError, match="truncated or corrupt"):
            load_int_model(q)
    with pytest.raises(ExportError, match="no graph"):
        load_int_model(ckpt)
    with pytest.raises(ExportError, match="does not exist"):
        load_int_model(tmp_path / "missing.npz")
    rng = np.random.default_rng(0)
    for off in rng.integers(0, len(raw), 150):                     # any flipped bit: refused,
        bad = bytearray(raw)                                       # or read back identical
        bad[off] ^= 1 << int(rng.integers(8))
        try:
            got = load_int_model(_write(tmp_path / "flip.npz", bytes(bad)))
        except ExportError:
            continue
        assert got.graph == imodel_ref.graph and got.tensors == imodel_ref.tensors
        assert all(np.array_equal(got.arrays[k], imodel_ref.arrays[k]) for k in imodel_ref.arrays)
    imodel = load_int_model(p)
    imodel.graph[1]["stride"] = "1"
    with pytest.raises(ExportError, match="stride an int"):
        save_int_model(imodel, tmp_path / "x.npz")
    imodel = load_int_model(p)
    imodel.graph[3]["op"] = "softmax"
    with pytest.raises(ExportError, match="unknown op"):
        save_int_model(imodel, tmp_path / "x.npz")
    imodel = load_int_model(p)
    imodel.arrays["conv2.n"] = imodel.arrays["conv2.n"] * 0
    with pytest.raises(ExportError, match="shift"):
        save_int_model(imodel, tmp_path / "x.npz")


def _write(p, data):
    p.write_bytes(data)
    return p


def test_models_that_cannot_be_exported_are_refused():
    with pytest.raises(ExportError, match=r"\['conv1', 'fc'\] run in full precision"):
        export_int_model(nn.small_cnn("lsq", 4, 4, first_last_bits=32, width=(4, 4, 4)))
    with pytest.raises(ExportError, match="full precision"):
        export_int_model(nn.small_cnn(None, width=(4, 4, 4)))
    with pytest.raises(ExportError, match="never initialised"):
        export_int_model(nn.small_cnn("lsq", 4, 4, width=(4, 4, 4)))
    with pytest.raises(TypeError, match="model must be a mecref.nn.SmallCNN"):
        export_int_model("model.npz")


def test_bad_inputs_to_integer_inference(models):
    imodel = export_int_model(models[("lsq", 2, 2, 8)][0])
    for bad in (np.zeros((2, 28, 28), np.float32), np.zeros((2, 27, 28), np.uint8),
                np.zeros((0, 28, 28), np.uint8), np.zeros((28, 28), np.uint8)):
        with pytest.raises(ValueError, match="images must be a non-empty uint8 array"):
            int_forward(imodel, bad)
    with pytest.raises(TypeError, match="images must be a numpy array"):
        int_forward(imodel, [[0] * 28] * 28)
    with pytest.raises(ValueError, match="unknown tensor 'conv9.in'"):
        int_run(imodel, {"conv9.in": np.zeros((1, 8, 14, 14), np.uint8)}, ["logits"])
    with pytest.raises(ValueError, match=r"feeds\['conv2.in'\] must have shape \(N, 8, 14, 14\)"):
        int_run(imodel, {"conv2.in": np.zeros((1, 8, 7, 7), np.uint8)}, ["logits"])
    with pytest.raises(TypeError, match=r"feeds\['conv2.in'\] must be an integer array"):
        int_run(imodel, {"conv2.in": np.zeros((1, 8, 14, 14), np.float32)}, ["logits"])
    with pytest.raises(TypeError, match="imodel must be an IntModel"):
        int_forward({"graph": []}, np.zeros((1, 28, 28), np.uint8))
    assert isinstance(imodel, IntModel)


def test_cli_export_then_eval_int(models, tmp_path):
    _, ckpt = models[("lsq", 4, 4, 8)]
    out = tmp_path / "w4a4_int.npz"
    r = subprocess.run([sys.executable, "-m", "mecref", "export", str(ckpt), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| conv2.requant | requant | conv2.q | 0..15 (4 bit)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mecref", "eval-int", str(out), "--checkpoint",
                        str(ckpt), "--limit", "300"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "identical predictions: 300/300" in r.stdout


@pytest.mark.parametrize("args", [["export", "nope.npz", "--out", "x.npz"], ["export", "x.npz"],
                                  ["eval-int", "nope.npz"], ["eval-int", "m.npz", "--limit", "zero"]])
def test_cli_bad_arguments_exit_2_with_one_line(args, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mecref", *args], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
