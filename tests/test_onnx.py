"""ONNX export in QDQ form, run by ONNX Runtime, against the fake-quant and the integer model.

Oracles: the fake-quantized float model's own forward (codes of every quantizer, logits,
predictions), the integer model of mecref.export (integer arithmetic only), the ONNX
reference evaluator (onnx.reference, a second runtime), and the layers' weight quantizers
rebuilt from their parameters. Skipped, with a message, where onnx or onnxruntime is absent
(pip install -e ".[onnx]").
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the ONNX tests need onnx: pip install -e \".[onnx]\"")
pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime: pip install -e \".[onnx]\"")

from onnx import numpy_helper  # noqa: E402

from mecref import nn, quant  # noqa: E402
from mecref.backend import MecrefError  # noqa: E402
from mecref.data import load_bundled, normalize  # noqa: E402
from mecref.export import ExportError, export_int_model, to_onnx  # noqa: E402
from mecref.onnx_export import compare_onnx, evaluate_onnx, onnx_graph, run_onnx  # noqa: E402
from mecref.train import train_small_cnn  # noqa: E402

TINY = dict(epochs=1, train_limit=512, batch_size=64, lr=0.2, warmup_epochs=0.0, reg=None,
            width=(8, 16, 16), progress=False)
# (quantizer, w_bits, a_bits, first_last_bits)
WHOLE_SET = [("lsq", 8, 8, 8), ("lsq", 4, 4, 8), ("lsq", 2, 2, 8)]
OTHERS = [("ste", 4, 4, 8), ("lsqplus", 2, 2, 8), ("dorefa_pact", 2, 2, 4), ("lsq", 1, 1, 1),
          ("lsq", 3, 3, 5), ("lsq", 4, 4, 32), ("fp32", 32, 32, 8)]
# the code type of the inner layers' inputs and weights, and the opset, per bit-width
NARROW = {8: ("uint8", "int8", 13), 4: ("uint4", "int4", 21), 2: ("uint2", "int2", 25)}
# logits: where every code agrees, ONNX and the fake model differ only by float32 rounding
# (the summation order of Conv, Gemm and GlobalAveragePool, BatchNormalization's arithmetic):
# a few units of 2^-24 per term, far below 1e-5 of the largest logit; one differing code of
# the last layer's input would move a logit by s_a |w|, about 1e-2 of it
LOGIT_RTOL = 1e-5
# codes: the two sides' float32 errors are below ~1e-6 of a value (derivations X6), and a value
# is at most Qp = 255 code units (8 bits), so it lies that close to a rounding boundary (one per
# code unit, on either side) for at most a fraction 2 * 1e-6 * 255 of the values
CODE_FLIP_FRACTION = 2 * 1e-6 * 255
# an image holds ~3000 codes (the tiny widths: 784 + 1568 + 784 + 16), so at the flip rates
# seen (~1e-5) a few percent of the images hold a flipped code; the logit check needs 90 % of
# them clean to bite
CLEAN_IMAGES = 0.9


@pytest.fixture(scope="module")
def test_set():
    ds = load_bundled()
    return ds.x_test, ds.y_test


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The whole-set configurations trained briefly, with their checkpoints; the others
    calibrated only (quantizers and BatchNorm statistics set by four training-mode forward
    passes on 256 training images), which is all the export reads."""
    out = {}
    for q, w, a, fl in WHOLE_SET:
        d = tmp_path_factory.mktemp(f"{q}{w}{a}{fl}")
        res = train_small_cnn(quantizer=q, w_bits=w, a_bits=a, first_last_bits=fl,
                              checkpoint_dir=d, **TINY)
        out[(q, w, a, fl)] = (res.model, d / "last.npz")
    x = normalize(load_bundled().x_train[:256])
    for q, w, a, fl in OTHERS:
        model = nn.small_cnn(None if q == "fp32" else q, w, a, fl, width=TINY["width"], seed=1)
        for i in range(0, 256, 64):
            model.forward(x[i:i + 64], train=True)
        out[(q, w, a, fl)] = (model, None)
    return out


def _fake_logits(model, x):
    return np.concatenate([model.forward(normalize(x[i:i + 500]), train=False)[0]
                           for i in range(0, len(x), 500)])


def _types(proto):
    """ONNX element type of every quantizer's codes, by tensor name."""
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    name = onnx.helper.tensor_dtype_to_string
    out = {}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear":
            out[n.input[0]] = name(inits[n.input[2]]).split(".")[-1].lower()
    return out


def _check_agreement(res):
    """Every prediction equal; codes differing on at most CODE_FLIP_FRACTION of the values, by one; logits
    within LOGIT_RTOL on the images (at least CLEAN_IMAGES of them) where every code agrees."""
    assert res["pred_equal"] == res["n"]
    for t, c in res["codes"].items():
        assert c["n_diff"] <= CODE_FLIP_FRACTION * c["size"] and c["max_diff"] <= 1, (t, c)
    lg = res["logits"]
    assert lg["clean"] >= CLEAN_IMAGES * res["n"], lg
    assert lg["clean_max_rel"] <= LOGIT_RTOL, lg


@pytest.mark.parametrize("cfg", WHOLE_SET, ids=lambda c: f"W{c[1]}A{c[2]}")
def test_onnx_runtime_reproduces_fake_quant_and_integer_model_on_the_whole_test_set(models, test_set, cfg):
    model, _ = models[cfg]
    x, y = test_set
    proto = onnx_graph(model)
    bits = cfg[1]
    # the narrow types where they hold the grid, per-channel weight scales
    act_t, w_t, opset = NARROW[bits]
    assert proto.opset_import[0].version == opset
    types = _types(proto)
    for layer in ("conv2", "conv3"):
        assert types[f"{layer}.in.q"] == act_t and types[f"{layer}.w.codes"] == w_t
    assert types["conv1.in.q"] == "int8" and types["fc.in.q"] == "uint8"
    assert "Clip" not in {n.op_type for n in proto.graph.node}
    imodel = export_int_model(model)
    res = compare_onnx(proto, x, model=model, imodel=imodel, threads=1)
    assert res["n"] == 2000
    _check_agreement(res)
    assert np.array_equal(res["pred_fake"], _fake_logits(model, x).argmax(axis=1))
    # against the integer model: the same predictions and codes, logits within one logit
    # step S plus the float32 rounding of the float logits
    assert res["pred_equal_int"] == 2000
    for t, c in res["codes_int"].items():
        assert c["n_diff"] <= CODE_FLIP_FRACTION * c["size"] and c["max_diff"] <= 1, (t, c)
    S = imodel.tensors["logits"]["scale"]
    top = np.abs(res["logits_onnx"]).max()
    assert res["logits_int"]["clean"] >= CLEAN_IMAGES * res["n"]
    assert res["logits_int"]["clean_max"] * S <= S + LOGIT_RTOL * top


def test_wide_containers_compute_the_same_grid(models, test_set):
    """int8/uint8 containers with a Clip to the 2-bit grid give the 2-bit codes (opset 13)."""
    model, _ = models[("lsq", 2, 2, 8)]
    x = test_set[0][:500]
    wide, narrow = onnx_graph(model, narrow=False), onnx_graph(model)
    assert wide.opset_import[0].version == 13
    assert set(_types(wide).values()) <= {"int8", "uint8"}
    clips = {n.output[0]: n for n in wide.graph.node if n.op_type == "Clip"}
    assert set(clips) == {"conv2.in.clipped", "conv3.in.clipped"}
    inits = {t.name: numpy_helper.to_array(t) for t in wide.graph.initializer}
    s = float(inits["conv2.in.scale"])
    assert float(inits[clips["conv2.in.clipped"].input[2]]) == pytest.approx(3 * s, rel=1e-7)
    res_w = compare_onnx(wide, x, model=model, threads=1)
    res_n = compare_onnx(narrow, x, threads=1)
    _check_agreement(res_w)
    for t in res_w["codes_onnx"]:
        assert np.array_equal(res_w["codes_onnx"][t], res_n["codes_onnx"][t])
    assert res_w["codes_onnx"]["conv2.in"].max() == 3      # the grid is used, and clipped at 3
    assert len(wide.SerializeToString()) > len(narrow.SerializeToString())


@pytest.mark.parametrize("cfg", OTHERS, ids=lambda c: f"{c[0]}-W{c[1]}A{c[2]}-FL{c[3]}")
def test_other_schemes_bit_widths_and_full_precision_layers(models, test_set, cfg):
    model, _ = models[cfg]
    x = test_set[0][:500]
    for narrow in (True, False):
        proto = onnx_graph(model, narrow=narrow)
        res = compare_onnx(proto, x, model=model, threads=1)
        # DoReFa's float32 weight levels and PACT's x * (Qp / alpha) sit off the grid by
        # float rounding (derivations X6, X7): a code may differ by one near a tie
        _check_agreement(res)
    ops = [n.op_type for n in proto.graph.node]
    if cfg[0] == "fp32":
        assert not {"QuantizeLinear", "DequantizeLinear", "Clip"} & set(ops)
        assert ops.count("Conv") == 3 and ops.count("Gemm") == 1
    if cfg[3] == 32:        # conv1 and fc in float: no quantizer before them
        assert not any(n.name.startswith(("conv1.", "fc.")) for n in proto.graph.node)
    if cfg == ("lsq", 1, 1, 1):     # binary signed input: sign(x), sign(0) = +1
        assert "Where" in ops and res["codes_onnx"]["conv1.in"].min() == -1
    if cfg == ("lsq", 3, 3, 5):     # 3 and 5 bits: 8-bit containers clipped to the grid
        assert ops.count("Clip") == 4


def test_weights_are_the_layers_own_codes_with_per_channel_scales(models):
    """The initializers hold round(q_w(W) / s_w) with the layer's own s_w per output channel,
    dequantized along axis 0: rebuilt here from the layer's parameters through quant."""
    model, _ = models[("lsq", 4, 4, 8)]
    proto = onnx_graph(model)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for name, layer in zip(model.names, model.layers):
        if not isinstance(layer, (nn.QuantConv2d, nn.QuantLinear)):
            continue
        s = layer.params["s_w"]
        Wq, _ = quant.lsq_quantize(layer.params["W"], s, layer.w_bits, signed=True)
        codes = inits[f"{name}.w.codes"].astype(np.int64)
        assert np.array_equal(codes, np.rint(Wq / s).astype(np.int64)), name
        assert np.array_equal(inits[f"{name}.w.scale"], s.reshape(-1)), name
        axis = [a.i for a in dq[f"{name}.w.dq"].attribute if a.name == "axis"]
        assert axis == [0], name
        Qn, Qp = quant.qrange(layer.w_bits, True)
        assert codes.min() >= Qn and codes.max() <= Qp


def test_reference_evaluator_agrees_with_onnx_runtime(models, test_set):
    """ONNX's own reference implementation (a second runtime, plain NumPy) runs the graph
    to the same codes and logits: the graph means what ONNX says, not what one runtime does."""
    from onnx.reference import ReferenceEvaluator
    model, _ = models[("lsq", 2, 2, 8)]
    proto = onnx_graph(model)
    x = test_set[0][:40]
    ref = ReferenceEvaluator(proto).run(["logits", "conv3.in.dq"], {"image": x})
    got = run_onnx(proto, x, ["logits", "conv3.in.dq"], threads=1)
    assert np.array_equal(ref[1], got["conv3.in.dq"])
    assert np.abs(ref[0] - got["logits"]).max() <= LOGIT_RTOL * np.abs(got["logits"]).max()


def test_graph_validates_and_metadata_describes_it(models, tmp_path):
    model, _ = models[("lsq", 2, 2, 8)]
    path = to_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    dims = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["N", 10]
    inp = proto.graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["mecref.model_config"])["w_bits"] == 2
    q = {(d["layer"], d["tensor"]): d for d in json.loads(meta["mecref.quantizers"])}
    assert q[("conv2", "input")]["codes"] == [0, 3] and q[("conv2", "input")]["type"] == "uint2"
    # 2-bit codes packed four to a byte, 8-bit one to a byte
    inits = {t.name: t for t in proto.graph.initializer}
    for name, per_byte in (("conv2.w.codes", 4), ("conv3.w.codes", 4), ("fc.w.codes", 1)):
        assert len(inits[name].raw_data) == -(-int(np.prod(inits[name].dims)) // per_byte), name
    allowed = {"Unsqueeze", "Cast", "Mul", "Sub", "QuantizeLinear", "DequantizeLinear", "Conv",
               "BatchNormalization", "MaxPool", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}
    assert {n.op_type for n in proto.graph.node} <= allowed


def test_errors(models, tmp_path, monkeypatch):
    model, ckpt = models[("lsq", 4, 4, 8)]
    with pytest.raises(MecrefError, match="must end in .onnx"):
        to_onnx(model, tmp_path / "m.npz")
    with pytest.raises(TypeError, match="SmallCNN"):
        onnx_graph(nn.Sequential(nn.ReLU()))
    with pytest.raises(MecrefError, match="opset"):
        onnx_graph(model, opset=13)                           # 4-bit types need 21
    fresh = nn.small_cnn("lsq", 4, 4, width=(4, 4, 4))
    with pytest.raises(ExportError, match="never initialised"):
        onnx_graph(fresh)
    path = to_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(MecrefError, match="uint8"):
        run_onnx(path, np.zeros((2, 28, 28), np.float32))
    with pytest.raises(MecrefError, match="unknown tensors"):
        run_onnx(path, np.zeros((2, 28, 28), np.uint8), ["nope"])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes()[:500])
    with pytest.raises(MecrefError, match="not a valid ONNX model"):
        run_onnx(bad, np.zeros((2, 28, 28), np.uint8))
    _, other = models[("lsq", 2, 2, 8)]
    with pytest.raises(MecrefError, match="another model"):
        evaluate_onnx(path, checkpoint=other, limit=10)
    monkeypatch.setitem(sys.modules, "onnx", None)           # as if onnx were not installed
    with pytest.raises(MecrefError, match="pip install"):
        onnx_graph(model)


def test_cli_export_and_a_fresh_python_with_only_onnxruntime_and_numpy(models, test_set, tmp_path):
    """`mecref export --format onnx`, then the file alone in a new interpreter that imports
    onnxruntime and numpy only: its predictions are the fake-quant model's."""
    model, ckpt = models[("lsq", 2, 2, 8)]
    x, y = test_set
    env = dict(os.environ)
    out = tmp_path / "w2a2.onnx"
    r = subprocess.run([sys.executable, "-m", "mecref", "export", str(ckpt), "--out", str(out),
                        "--format", "onnx"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "uint2" in r.stdout and out.is_file()
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        x = np.load({str(tmp_path / 'x.npy')!r})
        sess = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
        np.save({str(tmp_path / 'pred.npy')!r}, sess.run(["logits"], {{"image": x}})[0].argmax(axis=1))
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("mecref", "onnx", "torch")))
    """)
    r = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"              # no mecref, no onnx package in that process
    pred = np.load(tmp_path / "pred.npy")
    assert np.array_equal(pred, _fake_logits(model, x).argmax(axis=1))
    r = subprocess.run([sys.executable, "-m", "mecref", "eval-onnx", str(out), "--checkpoint",
                        str(ckpt), "--limit", "300"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    acc = float((pred[:300] == y[:300]).mean())
    assert f"ONNX accuracy: {acc:.4f} on 300 test images" in r.stdout
    assert "identical predictions (ONNX vs fake-quant): 300/300" in r.stdout


def test_cli_bad_arguments_exit_2_with_one_line(models, tmp_path, capsys):
    from mecref.cli import main
    model, ckpt = models[("lsq", 4, 4, 8)]
    good = to_onnx(model, tmp_path / "m.onnx")
    for argv in (["eval-onnx", str(tmp_path / "nope.onnx")],
                 ["eval-onnx", str(good), "--limit", "0"],
                 ["eval-onnx", str(ckpt)],                                  # not an ONNX file
                 ["export", str(ckpt), "--out", str(tmp_path / "x.npz"), "--format", "onnx"],
                 ["export", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--format", "tflite"]):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, argv
        assert len(err) == 1 and "error" in err[0], (argv, err)
