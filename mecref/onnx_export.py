"""ONNX export of the small CNN in QDQ form, run by ONNX Runtime (docs/export.md, "ONNX";
derivations X7).

::

    path = to_onnx(model, "model.onnx")                 # checked by onnx.checker + shape inference
    proto = onnx_graph(model)                           # the same, in memory (onnx.ModelProto)
    logits = run_onnx("model.onnx", images)["logits"]   # uint8 (N, 28, 28) -> float32 (N, 10)
    report = compare_onnx("model.onnx", images, model=model, imodel=imodel)  # vs fake-quant, integer

The graph takes the uint8 images and computes, with standard ONNX operators only:

=============================  ===============================================================
mecref layer                   ONNX nodes
=============================  ===============================================================
(input)                        Unsqueeze, Cast, Mul, Sub: ``x / 255`` standardised as
                               :func:`mecref.data.normalize` does it
layer input quantizer          [Sub beta] [Clip] QuantizeLinear -> DequantizeLinear [Add beta]
                               (X7); binary signed inputs: GreaterOrEqual, Where, Cast, DequantizeLinear
quantized weights              integer codes (initializer) -> DequantizeLinear, per-channel
                               ``axis=0`` scales
Conv2d, Linear                 Conv, Gemm (``transB=1``) on the dequantized tensors
BatchNorm2d                    BatchNormalization (eval statistics, kept as a standard op)
ReLU / MaxPool2d(relu=True)    Relu / MaxPool 2x2 -> Relu
GlobalAvgPool2d                GlobalAveragePool -> Flatten
=============================  ===============================================================

Weight codes are held in the narrowest ONNX integer type that holds the quantizer's code range:
int2 (opset 25), int4 (opset 21), int8, int16 (8-bit DoReFa, whose codes ``2k - Qp`` span 9
bits). Activation codes use uint2/int2 and uint4/int4 where the grid fills the type (2 and 4
bits), and uint8/int8 otherwise, with a Clip to the true grid before QuantizeLinear (3, 5, 6, 7
bits, unsigned 1 bit): ONNX Runtime's CPU provider does not load a Clip there with the 2- and
4-bit types (docs/export.md, "ONNX"). ``narrow=False`` puts every code in an int8/uint8
container (int16 for 8-bit DoReFa) with that Clip, for runtimes without the 2- and 4-bit types
(opset 13). The opset is the lowest that holds the types used. A full-precision model (or layer)
exports as the plain float graph.

``onnx`` and ``onnxruntime`` are optional (``pip install mecref[onnx]``); they are imported
when a function here needs them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import nn, quant
from .backend import MecrefError, array_module, to_host
from .data import PIXEL_MEAN, PIXEL_STD, normalize
from .validate import check_int

__all__ = ["to_onnx", "onnx_graph", "run_onnx", "compare_onnx", "evaluate_onnx",
           "describe_onnx", "markdown_onnx", "export_checkpoint_onnx", "BASE_OPSET"]

BASE_OPSET = 13              # per-axis DequantizeLinear, Unsqueeze with an axes input
# ONNX code containers, narrowest first: (TensorProto name, lowest code, highest code, opset)
_CONTAINERS = [("UINT2", 0, 3, 25), ("INT2", -2, 1, 25), ("UINT4", 0, 15, 21), ("INT4", -8, 7, 21),
               ("UINT8", 0, 255, BASE_OPSET), ("INT8", -128, 127, BASE_OPSET),
               ("INT16", -32768, 32767, 21)]
_NARROW = ("UINT2", "INT2", "UINT4", "INT4")


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MecrefError("ONNX export needs the onnx package: pip install onnx onnxruntime "
                          "(or pip install -e \".[onnx]\")") from None
    return onnx


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MecrefError("running an ONNX model needs onnxruntime: pip install onnxruntime "
                          "(or pip install -e \".[onnx]\")") from None
    return onnxruntime


def _container(lo, hi, narrow, exact=False):
    """The narrowest code type holding ``[lo, hi]``: ``(name, type_lo, type_hi, opset)``.
    ``exact``: a 2- or 4-bit type only for codes that fill it (activations: ONNX Runtime
    fails to load MaxPool -> Clip -> a 2- or 4-bit QuantizeLinear; docs/export.md)."""
    for c in _CONTAINERS:
        if exact and c[0] in _NARROW and (lo, hi) != (c[1], c[2]):
            continue
        if (narrow or c[0] not in _NARROW) and c[1] <= lo and hi <= c[2]:
            return c
    raise MecrefError(f"codes in [{lo}, {hi}] fit no ONNX integer type up to int16")


class _Builder:
    """Nodes, initializers and the opset the graph needs, added layer by layer."""

    def __init__(self, onnx, narrow):
        self.onnx, self.h, self.narrow = onnx, onnx.helper, narrow
        self.nodes, self.inits, self.opset, self.layers = [], [], BASE_OPSET, []

    def const(self, name, value, dtype=np.float32):
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def codes(self, name, values, ctype, shape):
        """An integer initializer of ONNX type ``ctype``, stored as raw bytes (2- and 4-bit
        types packed 4 and 2 to a byte, through ml_dtypes, which onnx depends on)."""
        import ml_dtypes
        dt = getattr(ml_dtypes, ctype.lower()) if ctype in _NARROW else np.dtype(ctype.lower())
        a = np.asarray(values, np.int64).reshape(shape).astype(dt)
        self.inits.append(self.onnx.numpy_helper.from_array(a, name))
        return name

    def node(self, op, inputs, output, name, **attrs):
        self.nodes.append(self.h.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def act_qdq(self, lname, layer, x):
        """The input quantizer of a quantized layer as QDQ (X7); returns the tensor that the
        layer's core reads (``<lname>.in``, real values on the quantizer's grid)."""
        from .export import _act_quantizer
        q = _act_quantizer(layer)
        Qn, Qp = q["Qn"], q["Qp"]
        s = np.float32(q["s"].reshape(()))
        beta = np.float32(q["beta"].reshape(()))
        p = f"{lname}.in"
        if beta != 0:                         # an offset grid (LSQ+ activations)
            x = self.node("Sub", [x, self.const(f"{p}.beta", beta)], f"{p}.shifted", f"{p}.sub_beta")
        binary = q["signed"] and q["bits"] == 1
        # binary codes come from Where, which ONNX Runtime runs on 8-bit types, not 2-bit ones
        ctype, tlo, thi, opset = _container(Qn, Qp, self.narrow and not binary, exact=True)
        scale, zp = self.const(f"{p}.scale", s), self.codes(f"{p}.zero_point", [0], ctype, [])
        if binary:                           # code = sign(x), sign(0) = +1 (Q1): not a rounding
            ge = self.node("GreaterOrEqual", [x, self.const(f"{p}.zero", 0.0)], f"{p}.nonneg", f"{p}.sign")
            pm = [self.const(f"{p}.plus_one", 1, np.int32), self.const(f"{p}.minus_one", -1, np.int32)]
            sign = self.node("Where", [ge] + pm, f"{p}.sign32", f"{p}.where")   # int32: every runtime
            codes = self.node("Cast", [sign], f"{p}.q", f"{p}.cast", to=getattr(self.onnx.TensorProto, ctype))
        else:
            # the true grid inside a wider container; PACT's clip at alpha is this clip, or
            # QuantizeLinear's own saturation when [0, Qp] fills the container (X7)
            if (Qn, Qp) != (tlo, thi):
                lo, hi = np.float32(Qn) * s, np.float32(Qp) * s
                x = self.node("Clip", [x, self.const(f"{p}.lo", lo), self.const(f"{p}.hi", hi)],
                              f"{p}.clipped", f"{p}.clip")
            codes = self.node("QuantizeLinear", [x, scale, zp], f"{p}.q", f"{p}.quant")
        y = self.node("DequantizeLinear", [codes, scale, zp], f"{p}.dq", f"{p}.dequant")
        if beta != 0:                         # an offset grid (LSQ+ activations)
            y = self.node("Add", [y, self.const(f"{p}.beta_back", beta)], f"{p}.real", f"{p}.add_beta")
        self.opset = max(self.opset, opset)
        self.layers.append(dict(layer=lname, tensor="input", bits=q["bits"], signed=q["signed"],
                                codes=[Qn, Qp], type=ctype.lower(), clip=not binary and (Qn, Qp) != (tlo, thi),
                                scale=float(s), offset=float(beta), kind=q["kind"],
                                output=f"{p}.q", dequantized=f"{p}.dq"))
        return y

    def weight(self, lname, layer):
        """Weight codes with per-output-channel scales, dequantized (``axis=0``), or the float
        weight of a full-precision layer."""
        W = np.asarray(to_host(layer.params["W"]), np.float32)
        if not isinstance(layer, (nn.QuantConv2d, nn.QuantLinear)) or layer.w_bits == nn.FULL_PRECISION:
            return self.const(f"{lname}.W", W)
        from .export import _weight_codes
        Wc, sw = _weight_codes(layer)
        Wc = Wc.astype(np.int64)
        # the container follows the quantizer's code range, not the codes this model happens
        # to use; DoReFa's codes 2k - Qp span [-Qp, Qp] (mecref.export, X3)
        if layer.w_quant.name == "dorefa" and layer.w_bits > 1:
            lo, hi = -(2 ** layer.w_bits - 1), 2 ** layer.w_bits - 1
        else:
            lo, hi = quant.qrange(layer.w_bits, True)
        ctype, _, _, opset = _container(lo, hi, self.narrow)
        sw32 = sw.astype(np.float32)
        per_channel = not np.all(sw32 == sw32[0])
        scale = sw32 if per_channel else sw32[:1].reshape(())
        zp_shape = list(scale.shape)
        attrs = dict(axis=0) if per_channel else {}
        p = f"{lname}.w"
        codes = self.codes(f"{p}.codes", Wc, ctype, Wc.shape)
        zp = self.codes(f"{p}.zero_point", np.zeros(zp_shape, np.int64), ctype, zp_shape)
        self.opset = max(self.opset, opset)
        self.layers.append(dict(layer=lname, tensor="weight", bits=layer.w_bits, signed=True,
                                codes=[lo, hi], type=ctype.lower(),
                                clip=False, per_channel=bool(per_channel), output=f"{p}.codes"))
        return self.node("DequantizeLinear", [codes, self.const(f"{p}.scale", scale), zp],
                         f"{p}.dq", f"{p}.dequant", **attrs)


def onnx_graph(model, narrow=True, opset=None, input_shape=(28, 28)):
    """The model as an ONNX graph in QDQ form, checked (``onnx.checker`` with full shape
    inference, then strict shape inference: every tensor typed, logits ``(N, K)``).

    Parameters
    ----------
    model : SmallCNN from :func:`mecref.nn.small_cnn`, trained (quantizers initialised), any
        scheme and bit-widths 1..8 or 32 (full-precision layers export as plain float ops).
    narrow : bool
        True: 2- and 4-bit ONNX integer types where the codes fit them; False: int8/uint8
        containers (int16 for 8-bit DoReFa weights) with the true grid's Clip.
    opset : int or None
        ONNX opset of the default domain; None: the lowest that holds the types used
        (13, 21 with 4-bit or int16 codes, 25 with 2-bit codes).
    input_shape : (H, W) of the uint8 images.

    Returns
    -------
    onnx.ModelProto with input ``image`` uint8 ``(N, H, W)`` and output ``logits`` float32
    ``(N, K)``; ``metadata_props`` hold the model config and, as JSON under
    ``mecref.quantizers``, each quantized tensor's bits, code range, ONNX type and clip.
    """
    onnx = _onnx()
    if not isinstance(model, nn.SmallCNN):
        raise TypeError(f"model must be a mecref.nn.SmallCNN (from small_cnn), got {type(model).__name__}")
    if not isinstance(narrow, (bool, np.bool_)):
        raise TypeError(f"narrow must be a bool, got {type(narrow).__name__} {narrow!r}")
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 2:
        raise MecrefError(f"input_shape must be (H, W), got {input_shape!r}")
    H, W = (check_int("input_shape", v, 1) for v in input_shape)
    from .export import ExportError
    b = _Builder(onnx, bool(narrow))
    # input: uint8 (N, H, W) -> float32 (N, 1, H, W), x * (1 / (255 std)) - mean / std
    x = b.node("Unsqueeze", ["image", b.const("channel_axis", [1], np.int64)], "image.nchw", "image.unsqueeze")
    x = b.node("Cast", [x], "image.float", "image.cast", to=onnx.TensorProto.FLOAT)
    x = b.node("Mul", [x, b.const("pixel.scale", np.float32(1.0 / (255.0 * PIXEL_STD)))], "image.scaled", "image.mul")
    x = b.node("Sub", [x, b.const("pixel.shift", np.float32(PIXEL_MEAN / PIXEL_STD))], "image.normalized", "image.sub")
    for name, layer in zip(model.names, model.layers):
        quantized = isinstance(layer, (nn.QuantConv2d, nn.QuantLinear))
        if quantized and "ready" in layer.buffers and not float(to_host(layer.buffers["ready"])):
            raise ExportError(f"layer {name}: its quantizers were never initialised (the model "
                              "has not seen data); train it before export")
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            if quantized and layer.a_bits != nn.FULL_PRECISION:
                x = b.act_qdq(name, layer, x)
            w = b.weight(name, layer)
            ins = [x, w] + ([b.const(f"{name}.b", to_host(layer.params["b"]))] if "b" in layer.params else [])
            if isinstance(layer, nn.Conv2d):
                k, pad = int(layer.params["W"].shape[2]), layer.padding
                x = b.node("Conv", ins, f"{name}.out", name, kernel_shape=[k, k], pads=[pad] * 4,
                           strides=[layer.stride] * 2)
            else:
                x = b.node("Gemm", ins, f"{name}.out", name, transB=1)
        elif isinstance(layer, nn.BatchNorm2d):
            stats = [b.const(f"{name}.{k}", to_host(d[k])) for d, k in
                     ((layer.params, "gamma"), (layer.params, "beta"),
                      (layer.buffers, "running_mean"), (layer.buffers, "running_var"))]
            x = b.node("BatchNormalization", [x] + stats, f"{name}.out", name, epsilon=layer.eps)
        elif isinstance(layer, nn.MaxPool2d):
            # relu(maxpool(x)), in the layer's own order: ONNX Runtime's QDQ propagation would
            # move a QuantizeLinear that follows MaxPool ahead of it and run MaxPool on the
            # codes, which its CPU provider cannot do for 4-bit types (docs/export.md, ONNX)
            x = b.node("MaxPool", [x], f"{name}.pooled" if layer.relu else f"{name}.out", name,
                       kernel_shape=[2, 2], strides=[2, 2])
            if layer.relu:
                x = b.node("Relu", [x], f"{name}.out", f"{name}.relu")
        elif isinstance(layer, nn.ReLU):
            x = b.node("Relu", [x], f"{name}.out", name)
        elif isinstance(layer, nn.GlobalAvgPool2d):
            x = b.node("GlobalAveragePool", [x], f"{name}.pooled", name)
            x = b.node("Flatten", [x], f"{name}.out", f"{name}.flatten", axis=1)
        else:
            raise ExportError(f"layer {name}: {type(layer).__name__} has no ONNX form here")
    b.nodes[-1].output[0] = "logits"
    if opset is None:
        opset = b.opset
    opset = check_int("opset", opset, b.opset)
    if opset > onnx.defs.onnx_opset_version():
        raise MecrefError(f"opset must be at most {onnx.defs.onnx_opset_version()} (this onnx "
                          f"package), got {opset}")
    K = model.config["num_classes"]
    h = onnx.helper
    graph = h.make_graph(
        b.nodes, "mecref_small_cnn",
        [h.make_tensor_value_info("image", onnx.TensorProto.UINT8, ["N", H, W])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", K])], b.inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="mecref",
                         doc_string="mecref small CNN: uint8 images (N, H, W) -> logits (N, K); "
                                    "quantized layers in QDQ form (docs/export.md, ONNX)")
    cfg = {k: v for k, v in model.config.items() if k != "backend"}
    meta = {"mecref.format": "mecref-onnx", "mecref.model_config": json.dumps(cfg, sort_keys=True),
            "mecref.input": json.dumps(dict(dtype="uint8", shape=[H, W], pixel_mean=PIXEL_MEAN,
                                            pixel_std=PIXEL_STD)),
            "mecref.quantizers": json.dumps(b.layers)}
    proto.ir_version = h.find_min_ir_version_for(list(proto.opset_import))   # older runtimes load it
    h.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                 data_prop=True)
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    if [d.dim_param or d.dim_value for d in out] != ["N", K]:
        raise ExportError(f"shape inference gives logits {[d.dim_param or d.dim_value for d in out]}, expected ['N', {K}]")
    typed = {v.name for v in inferred.graph.value_info} | {"logits"}
    untyped = [o for n in inferred.graph.node for o in n.output if o not in typed]
    if untyped:
        raise ExportError(f"shape inference left tensors without a type: {untyped}")
    return proto


def to_onnx(model, path, narrow=True, opset=None, input_shape=(28, 28)) -> Path:
    """Write :func:`onnx_graph` of ``model`` to ``path`` (``.onnx``, atomically); returns the path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise MecrefError(f"path must end in .onnx, got {str(path)!r}")
    proto = onnx_graph(model, narrow=narrow, opset=opset, input_shape=input_shape)
    from .checkpoint import write_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda fh: fh.write(proto.SerializeToString()))
    return path


def export_checkpoint_onnx(checkpoint, out, narrow=True, opset=None) -> tuple:
    """Export a training checkpoint (``last.npz``) to ONNX; returns ``(ModelProto, Path)``."""
    from .export import _model_from_checkpoint
    model = _model_from_checkpoint(checkpoint)
    path = to_onnx(model, out, narrow=narrow, opset=opset)
    return _load(path), path


# ============================================================================ running
def _load(source):
    onnx = _onnx()
    if isinstance(source, onnx.ModelProto):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"model must be an onnx.ModelProto or a path to a .onnx file, got "
                        f"{type(source).__name__}")
    if not Path(source).is_file():
        raise MecrefError(f"ONNX model {str(source)!r} does not exist")
    try:
        proto = onnx.load(str(source))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf's decoder, the checker: any failure means a bad file
        raise MecrefError(f"{str(source)!r} is not a valid ONNX model ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from None
    return proto


def run_onnx(model, images, outputs=("logits",), batch_size=500, threads=None) -> dict:
    """Run an ONNX model (file or ModelProto) with ONNX Runtime's CPU provider on uint8 images.

    ``outputs`` may name inner tensors too (e.g. ``"conv2.in.dq"``, the dequantized input of
    conv2): they are added as graph outputs of a copy. ``threads`` sets ONNX Runtime's
    intra-op threads (None: its default).

    Returns
    -------
    dict[str, ndarray]: each output over all images
    """
    ort = _ort()
    proto = _load(model)
    images = np.asarray(to_host(images))
    if images.dtype != np.uint8 or images.ndim != 3 or not len(images):
        raise MecrefError(f"images must be a non-empty uint8 array (N, H, W), got "
                          f"{images.dtype} {tuple(images.shape)}")
    batch_size = check_int("batch_size", batch_size, 1)
    outputs = list(outputs)
    known = {o for n in proto.graph.node for o in n.output}
    unknown = [o for o in outputs if o not in known]
    if unknown:
        raise MecrefError(f"unknown tensors {unknown}; the graph computes {sorted(known)}")
    extra = [o for o in outputs if o not in {v.name for v in proto.graph.output}]
    if extra:
        onnx = _onnx()
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
        proto.graph.output.extend(inferred[o] for o in extra)
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = check_int("threads", threads, 1)
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    parts = [sess.run(outputs, {"image": images[i:i + batch_size]})
             for i in range(0, len(images), batch_size)]
    return {o: np.concatenate([p[j] for p in parts]) for j, o in enumerate(outputs)}


def _quantizers(proto):
    meta = {p.key: p.value for p in proto.metadata_props}
    return json.loads(meta.get("mecref.quantizers", "[]"))


def _fake_run(model, images, layers, batch_size):
    """The fake-quantized model (eval mode): float logits and the codes of the inputs of
    ``layers``, ``code = (q(x) - beta) / s`` as :func:`mecref.export.fake_quant_trace`."""
    from .export import _act_codes, _act_quantizer
    xp = array_module(model.layers[0].params["W"])
    out = {"logits": []}
    for i in range(0, len(images), batch_size):
        h = normalize(images[i:i + batch_size], xp=xp)
        for name, layer in zip(model.names, model.layers):
            if name in layers:
                out.setdefault(f"{name}.in", []).append(_act_codes(_act_quantizer(layer), to_host(h)))
            h = layer.forward(h, train=False)
        out["logits"].append(np.asarray(to_host(h)))
    return {k: np.concatenate(v) for k, v in out.items()}


def _code_diff(got, want, per_image):
    d = np.abs(got - want.astype(np.int64).reshape(got.shape)).reshape(len(got), -1)
    per_image &= d.max(axis=1) == 0
    return dict(n_diff=int((d > 0).sum()), size=int(d.size), max_diff=int(d.max()))


def compare_onnx(onnx_model, images, model=None, imodel=None, batch_size=500, threads=None) -> dict:
    """ONNX Runtime's run of an exported graph against the fake-quant ``model`` it came from
    and/or the integer model ``imodel`` of :mod:`mecref.export`, on the same uint8 images.

    The logits come from the graph as written; the codes from a copy with each quantizer's
    DequantizeLinear output added, read back as ``round(value / scale)``.

    Returns
    -------
    dict with ``n``, ``pred_onnx`` (N,), ``logits_onnx`` (N, K), ``codes_onnx`` (per
    ``<layer>.in``); with ``model``: ``pred_fake``, ``pred_equal`` (images where both predict
    alike), ``codes`` (per quantized input: ``n_diff``, ``size``, ``max_diff`` vs the fake
    quantizer's codes), ``logits`` (``max_abs``, ``max_rel`` = max_abs / max |fake logit|,
    over all images and over the ``clean`` ones, where every code agrees); with ``imodel``:
    ``pred_int``, ``pred_equal_int``, ``codes_int``, ``logits_int`` (``max`` |ONNX / S -
    integer logits|, S the integer logit step, over all images and over the ``clean`` ones).
    """
    proto = _load(onnx_model)
    acts = [q for q in _quantizers(proto) if q["tensor"] == "input"]
    got = run_onnx(proto, images, ["logits"], batch_size, threads)       # the graph as shipped
    if acts:                          # codes from a copy with the DequantizeLinear outputs added
        got.update(run_onnx(proto, images, [q["dequantized"] for q in acts], batch_size, threads))
    codes = {f"{q['layer']}.in": np.rint(got[q["dequantized"]].astype(np.float64) / q["scale"]).astype(np.int64)
             for q in acts}
    images = np.asarray(to_host(images))
    res = dict(n=len(images), pred_onnx=got["logits"].argmax(axis=1), logits_onnx=got["logits"],
               codes_onnx=codes)
    if model is not None:
        if not isinstance(model, nn.SmallCNN):
            raise TypeError(f"model must be a mecref.nn.SmallCNN, got {type(model).__name__}")
        fake = _fake_run(model, images, {q["layer"] for q in acts}, batch_size)
        clean = np.ones(len(images), bool)
        res["codes"] = {t: _code_diff(c, fake[t], clean) for t, c in codes.items()}
        diff = np.abs(got["logits"].astype(np.float64) - fake["logits"])
        top = float(np.abs(fake["logits"]).max())
        dc = diff[clean] if clean.any() else np.zeros(1)
        res["logits"] = dict(max_abs=float(diff.max()), max_rel=float(diff.max() / top),
                             clean=int(clean.sum()), clean_max_abs=float(dc.max()),
                             clean_max_rel=float(dc.max() / top))
        res["pred_fake"] = fake["logits"].argmax(axis=1)
        res["pred_equal"] = int((res["pred_onnx"] == res["pred_fake"]).sum())
    if imodel is not None:
        from .export import int_forward
        ilog, icodes = int_forward(imodel, images, return_codes=True, batch_size=batch_size)
        S = imodel.tensors["logits"]["scale"]
        clean = np.ones(len(images), bool)
        res["codes_int"] = {t: _code_diff(c, icodes[t], clean) for t, c in codes.items()}
        d = np.abs(got["logits"].astype(np.float64) / S - ilog)
        res["logits_int"] = dict(max=float(d.max()), clean=int(clean.sum()),
                                 clean_max=float(d[clean].max()) if clean.any() else 0.0)
        res["pred_int"] = ilog.argmax(axis=1)
        res["pred_equal_int"] = int((res["pred_onnx"] == res["pred_int"]).sum())
    return res


def evaluate_onnx(onnx_path, checkpoint=None, int_model=None, dataset="bundled", data_dir=None,
                  limit=None, batch_size=500, threads=None) -> dict:
    """Accuracy of an exported ONNX model on a test set and, given the training ``checkpoint``
    it came from and/or the integer model file ``int_model`` of the same checkpoint, its
    agreement with them (:func:`compare_onnx`).

    Returns
    -------
    dict: ``n``, ``acc_onnx``, ``opset``, ``bytes``; with a checkpoint also ``acc_fake`` and the
    fake-quant agreement; with an integer model ``acc_int`` and the integer agreement
    """
    from .data import load_dataset
    proto = _load(onnx_path)
    meta = {p.key: p.value for p in proto.metadata_props}
    cfg = json.loads(meta.get("mecref.model_config", "null"))
    ds = load_dataset(dataset, data_dir=data_dir)
    x, y = ds.x_test, ds.y_test
    if limit is not None:
        limit = check_int("limit", limit, 1)
        x, y = x[:limit], y[:limit]
    model = imodel = None
    if checkpoint is not None:
        from .export import _model_from_checkpoint
        model = _model_from_checkpoint(checkpoint)
        if {k: v for k, v in model.config.items() if k != "backend"} != cfg:
            raise MecrefError(f"checkpoint {str(checkpoint)!r} holds another model than {str(onnx_path)!r}")
    if int_model is not None:
        from .export import load_int_model
        imodel = load_int_model(int_model)
        if imodel.meta["model_config"] != cfg:
            raise MecrefError(f"integer model {str(int_model)!r} comes from another model than {str(onnx_path)!r}")
    res = compare_onnx(proto, x, model=model, imodel=imodel, batch_size=batch_size, threads=threads)
    res.update(acc_onnx=float((res["pred_onnx"] == y).mean()), opset=int(proto.opset_import[0].version),
               bytes=len(proto.SerializeToString()))
    if model is not None:
        res["acc_fake"] = float((res["pred_fake"] == y).mean())
    if imodel is not None:
        res["acc_int"] = float((res["pred_int"] == y).mean())
    return res


def describe_onnx(proto) -> str:
    """A Markdown table of the quantized tensors: layer, bits, codes, ONNX type, clip, scale."""
    proto = _load(proto)
    rows = [f"opset {proto.opset_import[0].version}, {len(proto.graph.node)} nodes", "",
            "| layer | tensor | bits | codes | ONNX type | Clip to the grid | scale |",
            "|---|---|---|---|---|---|---|"]
    for q in _quantizers(proto):
        scale = "per channel" if q.get("per_channel") else (f"{q['scale']:.6g}" if "scale" in q else "per tensor")
        rows.append(f"| {q['layer']} | {q['tensor']} | {q['bits']} | {q['codes'][0]}..{q['codes'][1]} "
                    f"| {q['type']} | {'yes' if q['clip'] else 'no'} | {scale} |")
    if len(rows) == 4:
        rows.append("| (full precision: no quantizers) | | | | | | |")
    return "\n".join(rows)


def markdown_onnx(res) -> str:
    """A Markdown summary of :func:`evaluate_onnx`'s result."""
    lines = [f"ONNX accuracy: {res['acc_onnx']:.4f} on {res['n']} test images "
             f"(opset {res['opset']}, {res['bytes']} bytes)"]
    if "acc_fake" in res:
        lg = res["logits"]
        lines += [f"fake-quant accuracy: {res['acc_fake']:.4f}",
                  f"identical predictions (ONNX vs fake-quant): {res['pred_equal']}/{res['n']}",
                  f"logits, max |ONNX - fake-quant|: {lg['max_abs']:.3g} ({lg['max_rel']:.3g} of the "
                  f"largest logit); on the {lg['clean']} images with every code equal: "
                  f"{lg['clean_max_abs']:.3g}"]
    if "acc_int" in res:
        lines += [f"integer accuracy: {res['acc_int']:.4f}",
                  f"identical predictions (ONNX vs integer): {res['pred_equal_int']}/{res['n']}",
                  f"logits, max |ONNX / S - integer| (S the integer logit step): "
                  f"{res['logits_int']['max']:.3g}; on the {res['logits_int']['clean']} images with "
                  f"every code equal: {res['logits_int']['clean_max']:.3g}"]
    tables = [(k, label) for k, label in (("codes", "fake-quant"), ("codes_int", "integer")) if k in res]
    if tables and res[tables[0][0]]:
        lines += ["", "| tensor | " + " | ".join(f"codes differing vs {l} (max diff)" for _, l in tables) + " |",
                  "|---|" + "---|" * len(tables)]
        for t in res[tables[0][0]]:
            cells = [f"{res[k][t]['n_diff']}/{res[k][t]['size']} ({res[k][t]['max_diff']})" for k, _ in tables]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
