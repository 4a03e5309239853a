"""Bad input everywhere public: malformed arguments to the public API are refused with
mecref's own error (MecrefError, a ValueError) or a TypeError raised by mecref, whose message
names the argument as a word; never another exception (NumPy's own errors included), a hang
(each call has a time limit), or a result.

Layers trust the VALUES of their inputs (NaN flows through a plain conv as in any array
library; the model, the quantizers, the losses and the entropy terms check finiteness at their
boundary), so the layer targets below throw shapes and dtypes at them, not NaN.
"""
import contextlib
import io
import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mecref
from mecref import MecrefError, data, entropy, export, losses, nn, optim, quant, schemes
from mecref.checkpoint import load_checkpoint
from mecref.cli import main
from mecref.train import train_small_cnn


# ------------------------------------------------------------------------------ the oracle
class _Hang(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    def on_alarm(*_):
        raise _Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


MECREF_DIR = Path(mecref.__file__).resolve().parent


def _names_argument(msg, name):
    """``name`` as a whole word of ``msg`` (not part of a longer identifier, a path or a
    possessive: "s" is not found in "the model's" or "steps"; "bitz" is in "['bitz']")."""
    return re.search(rf"(?<![\w./-])(?<!\w'){re.escape(name)}(?![\w/-])", msg) is not None


def _raised_in_mecref(exc):
    """True when the innermost frame of the exception's traceback is mecref's own code."""
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return MECREF_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def refused(call, *names, seconds=20):
    """``call()`` must be refused for the right reason: mecref's own MecrefError, or a
    TypeError raised by mecref's code (not NumPy's, SciPy's or Python's), whose message names
    the argument (one of ``names``) as a word. Anything else fails the test: another exception
    (it propagates), a result, or an answer that takes more than ``seconds``."""
    with _time_limit(seconds):
        try:
            value = call()
        except (MecrefError, TypeError) as exc:
            msg = str(exc)
            assert isinstance(exc, MecrefError) or _raised_in_mecref(exc), \
                f"a TypeError from outside mecref, not a refusal: {msg}"
            assert any(_names_argument(msg, n) for n in names), \
                f"{type(exc).__name__} names none of {names}: {msg}"
            return exc
    pytest.fail(f"bad input accepted, returned {type(value).__name__}")


# ------------------------------------------------------------------------------ bad values
NOT_ARRAYS = st.sampled_from([None, "x", 3.0, 7, [[1.0, 2.0]], {"a": 1}, (1.0,)])
BAD_DTYPES = st.sampled_from([np.int64, np.int8, np.uint8, np.bool_, np.complex128, np.str_])
NONFINITE = st.sampled_from([np.nan, np.inf, -np.inf])


def _poisoned(shape):
    """A float array of ``shape`` with NaN or inf at one random place."""
    return st.tuples(NONFINITE, st.integers(0, int(np.prod(shape)) - 1),
                     st.sampled_from([np.float32, np.float64])).map(
        lambda t: _put(np.ones(shape, t[2]), t[1], t[0]))


def _put(a, i, v):
    a.reshape(-1)[i] = v
    return a


def bad_arrays(shape, finite=True, dtype=np.float64):
    """Non-arrays, wrong dtypes (``dtype`` is the right one; any float when it is float),
    empty arrays, wrong ndim and (with ``finite``) NaN/inf."""
    ndim = len(shape)
    wrong_ndim = hnp.array_shapes(min_dims=0, max_dims=5, min_side=1, max_side=3).filter(
        lambda s: len(s) != ndim)
    options = [NOT_ARRAYS,
               BAD_DTYPES.filter(lambda d: d != dtype).map(lambda d: np.zeros(shape, dtype=d)),
               st.integers(0, ndim - 1).map(lambda ax: np.zeros(shape[:ax] + (0,) + shape[ax + 1:], dtype)),
               wrong_ndim.map(lambda s: np.ones(s, dtype))]
    if finite:
        options.append(_poisoned(shape))
    return st.one_of(*options)


def bad_bits(allow_full=False):
    """Bit-widths outside 1..8 (and 32 unless ``allow_full``), huge, zero, non-integers."""
    ints = st.one_of(st.integers(max_value=0), st.integers(9, 2 ** 70)).filter(
        lambda b: not (allow_full and b == 32))
    return st.one_of(ints, st.floats(allow_nan=True), st.booleans(), st.text(max_size=3),
                     st.none(), st.just(np.int64(12)))


def bad_positive(allow_zero=False):
    """Reals that are not finite and > 0 (>= 0), and non-reals."""
    nonpos = st.floats(max_value=0.0, exclude_max=allow_zero, allow_nan=False)
    return st.one_of(nonpos, st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=4),
                     st.none(), st.booleans(), st.complex_numbers(), st.just([1.0]))


def bad_ints(lo, hi=None):
    outside = st.integers(max_value=lo - 1) if hi is None else st.one_of(
        st.integers(max_value=lo - 1), st.integers(min_value=hi + 1, max_value=2 ** 70))
    return st.one_of(outside, st.floats(allow_nan=True), st.booleans(), st.text(max_size=3),
                     st.none())


def bad_names(valid):
    return st.one_of(st.text(max_size=8), st.none(), st.integers(), st.sampled_from(
        [v.upper() for v in valid if isinstance(v, str)] + [v + " " for v in valid if isinstance(v, str)])
    ).filter(lambda v: v not in valid)


X4 = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
Z = np.random.default_rng(1).standard_normal((6, 4))


# ------------------------------------------------------------------------------ quant
QUANTIZERS = {
    "ste_quantize": lambda x: quant.ste_quantize(x, 0.1, 4),
    "lsq_quantize": lambda x: quant.lsq_quantize(x, 0.1, 4),
    "lsqplus_quantize": lambda x: quant.lsqplus_quantize(x, 0.1, 0.0, 4),
    "pact_quantize": lambda x: quant.pact_quantize(x, 1.0, 4),
    "dorefa_weight_quantize": lambda x: quant.dorefa_weight_quantize(x, 4),
    "dorefa_act_quantize": lambda x: quant.dorefa_act_quantize(x, 4),
    "lsq_init_step": lambda x: quant.lsq_init_step(x, 4),
    "lsqplus_init": lambda x: quant.lsqplus_init(x, 4),
}


@pytest.mark.parametrize("name", QUANTIZERS)
@given(x=st.one_of(NOT_ARRAYS, st.tuples(BAD_DTYPES).map(lambda t: np.zeros((3, 2), t[0])),
                   st.just(np.zeros((0, 3))), st.just(np.array(1.0)), _poisoned((3, 4))))
def test_quantizers_refuse_bad_inputs(name, x):
    refused(lambda: QUANTIZERS[name](x), "w" if name == "dorefa_weight_quantize" else "x")


@given(bits=bad_bits(), which=st.sampled_from(["qrange", "ste", "lsq", "lsqplus", "pact",
                                                 "dorefa_w", "dorefa_a", "init"]))
def test_quantizers_refuse_bad_bit_widths(bits, which):
    call = dict(qrange=lambda: quant.qrange(bits, True),
                ste=lambda: quant.ste_quantize(X4, 0.1, bits),
                lsq=lambda: quant.lsq_quantize(X4, 0.1, bits, signed=True),
                lsqplus=lambda: quant.lsqplus_quantize(X4, 0.1, 0.0, bits),
                pact=lambda: quant.pact_quantize(X4, 1.0, bits),
                dorefa_w=lambda: quant.dorefa_weight_quantize(X4, bits),
                dorefa_a=lambda: quant.dorefa_act_quantize(X4, bits),
                init=lambda: quant.lsq_init_step(X4, bits))[which]
    refused(call, "bits")


@given(s=st.one_of(bad_positive(), st.just(np.zeros((1, 1, 1, 1), np.float32)),
                   st.just(-np.ones((3, 1, 1), np.float32)), st.just(np.ones((5, 1, 1, 1), np.float32)),
                   st.just(np.full((1,), np.nan, np.float32))),
       which=st.sampled_from(["s", "alpha", "grad_scale", "signed"]))
def test_quantizers_refuse_bad_steps_clips_and_flags(s, which):
    if which == "s":
        refused(lambda: quant.lsq_quantize(X4, s, 4), "s")
    elif which == "alpha":
        refused(lambda: quant.pact_quantize(X4, s, 4), "alpha")
    elif which == "grad_scale":
        assume(s is not None)                         # None is the default: g = 1/sqrt(N Qp)
        refused(lambda: quant.lsq_quantize(X4, 0.1, 4, grad_scale=s), "grad_scale")
    else:
        assume(not isinstance(s, (bool, np.bool_)))
        refused(lambda: quant.ste_quantize(X4, 0.1, 4, signed=s), "signed")


# ------------------------------------------------------------------------------ entropy
def _other_view(Z1):
    """A valid second view for mec_loss: Z's rows reversed, in Z1's dtype where Z1 has a
    floating one (two views of different dtypes are refused before eps is looked at)."""
    dtype = getattr(Z1, "dtype", None)
    ok = dtype is not None and np.issubdtype(dtype, np.floating) and dtype != np.float16
    return Z[::-1].astype(dtype if ok else Z.dtype)


ENTROPY = {
    "coding_length": lambda Z, eps: entropy.coding_length(Z, eps),
    "mec_loss": lambda Z1, eps: entropy.mec_loss(Z1, _other_view(Z1), eps),
    "mec_taylor": lambda Z, eps: entropy.mec_loss(Z, Z, eps, order=4),
    "moe_coding_length": lambda Z, eps: entropy.moe_coding_length(Z, eps, experts=2),
}


ENTROPY_ARG = {"coding_length": "Z", "mec_loss": "Z1", "mec_taylor": "Z1", "moe_coding_length": "Z"}


@pytest.mark.parametrize("name", ENTROPY)
@given(Z_bad=st.one_of(bad_arrays((6, 4)), st.just(np.zeros((6, 4)))))   # zero rows: no direction
def test_entropy_terms_refuse_bad_features(name, Z_bad):
    refused(lambda: ENTROPY[name](Z_bad, 0.5), ENTROPY_ARG[name])


@pytest.mark.parametrize("name", ENTROPY)
@given(eps=st.one_of(bad_positive(), st.floats(0.0, 1e-160, exclude_min=True), st.floats(1e160, 1e308)),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_entropy_terms_refuse_bad_eps(name, eps, dtype):
    """eps <= 0, NaN, inf, or so small (large) that lam = d / (m eps^2) overflows (is 0)."""
    refused(lambda: ENTROPY[name](Z.astype(dtype), eps), "eps")


@given(order=bad_ints(1, 1024), experts=bad_ints(1, 6), gate=bad_names(("norm", "soft")),
       tau=bad_positive(), which=st.sampled_from(["order", "experts", "gate", "tau", "W_g"]))
def test_entropy_terms_refuse_bad_options(order, experts, gate, tau, which):
    if which == "order":
        assume(order is not None)                     # None is the exact form
        refused(lambda: entropy.mec_loss(Z, Z, 8.0, order=order), "order")
    elif which == "experts":
        refused(lambda: entropy.moe_coding_length(Z, 0.5, experts=experts), "experts")
    elif which == "gate":
        refused(lambda: entropy.moe_coding_length(Z, 0.5, experts=2, gate=gate), "gate")
    elif which == "tau":
        refused(lambda: entropy.moe_coding_length(Z, 0.5, 2, gate="soft", W_g=np.ones((4, 2)), tau=tau), "tau")
    else:
        refused(lambda: entropy.moe_coding_length(Z, 0.5, 2, gate="soft", W_g=np.ones((4, 3))), "W_g")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # numpy's overflow warning before the refusal
def test_tiny_tau_and_huge_order_do_not_hang_or_return_nan():
    refused(lambda: entropy.moe_coding_length(Z, 0.5, 2, gate="soft", W_g=np.ones((4, 2)), tau=1e-320), "tau")
    refused(lambda: entropy.mec_loss(Z, Z, 8.0, order=10 ** 9), "order", seconds=5)


# ------------------------------------------------------------------------------ layers, model
@given(v=bad_ints(1), which=st.sampled_from(["in_channels", "out_channels", "kernel_size", "stride"]))
def test_layer_constructors_refuse_bad_sizes(v, which):
    kw = dict(in_channels=2, out_channels=2, kernel_size=3, stride=1)
    refused(lambda: nn.Conv2d(**dict(kw, **{which: v})), which)


@given(bits=bad_bits(allow_full=True), scheme=bad_names(schemes.names()), flag=st.one_of(st.none(), st.text(max_size=2), st.integers()),
       momentum=st.one_of(bad_positive(allow_zero=True), st.floats(1.0, 1e9, exclude_min=True)),
       eps=bad_positive(), which=st.sampled_from(["w_bits", "a_bits", "scheme", "a_signed", "relu", "momentum", "eps", "padding"]))
def test_quantized_layers_batchnorm_and_pool_refuse_bad_options(bits, scheme, flag, momentum, eps, which):
    call = dict(w_bits=lambda: nn.QuantConv2d(2, 2, w_bits=bits),
                a_bits=lambda: nn.QuantLinear(2, 2, a_bits=bits),
                scheme=lambda: nn.QuantConv2d(2, 2, scheme=scheme),
                a_signed=lambda: nn.QuantConv2d(2, 2, a_signed=flag),
                relu=lambda: nn.MaxPool2d(relu=flag),
                momentum=lambda: nn.BatchNorm2d(3, momentum=momentum),
                eps=lambda: nn.BatchNorm2d(3, eps=eps),
                padding=lambda: nn.Conv2d(2, 2, padding=-1 if isinstance(flag, str) else flag))[which]
    assume(not (which == "padding" and isinstance(flag, int) and flag >= 0))
    refused(call, which)


LAYERS = {
    "Conv2d": (nn.Conv2d(3, 2, padding=1), (2, 3, 4, 4)),
    "QuantConv2d": (nn.QuantConv2d(3, 2, padding=1), (2, 3, 4, 4)),
    "Linear": (nn.Linear(3, 2), (2, 3)),
    "QuantLinear": (nn.QuantLinear(3, 2), (2, 3)),
    "BatchNorm2d": (nn.BatchNorm2d(3), (2, 3, 4, 4)),
    "MaxPool2d": (nn.MaxPool2d(), (2, 3, 4, 4)),
    "GlobalAvgPool2d": (nn.GlobalAvgPool2d(), (2, 3, 4, 4)),
    "ReLU": (nn.ReLU(), (2, 3)),
}


@pytest.mark.parametrize("name", LAYERS)
@given(data=st.data())
def test_layers_refuse_bad_input_shapes_and_dtypes(name, data):
    layer, shape = LAYERS[name]
    x = data.draw(st.one_of(
        NOT_ARRAYS,
        st.tuples(BAD_DTYPES).map(lambda t: np.zeros(shape, t[0])),
        # wrong channels / features on axis 1, or an image too small for the kernel or pool
        st.integers(1, 5).filter(lambda c: c != shape[1]).map(lambda c: np.ones(shape[:1] + (c,) + shape[2:], np.float32)),
        st.just(np.ones((2, 3, 1, 1), np.float32)) if len(shape) == 4 and name == "MaxPool2d" else st.nothing(),
        st.just(np.ones(shape[:-1], np.float32)) if name not in ("ReLU",) else st.nothing()))
    assume(not (name == "ReLU" and hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating)))
    assume(not (name in ("MaxPool2d", "GlobalAvgPool2d") and hasattr(x, "dtype")
                and np.issubdtype(x.dtype, np.floating) and x.ndim == 4 and x.shape[2] >= 2))
    refused(lambda: layer.forward(x, train=False), "x")


def test_layer_backward_before_forward_or_with_a_bad_gradient():
    conv = nn.Conv2d(3, 2, padding=1)
    refused(lambda: conv.backward(np.ones((2, 2, 4, 4), np.float32)), "forward")
    conv.forward(X4, train=True)
    for dy in (np.ones((2, 2, 3, 4), np.float32), None, [1.0]):
        refused(lambda: conv.backward(dy), "dy")


@given(q=bad_names(schemes.names() + (None,)), bits=bad_bits(allow_full=True),
       width=st.one_of(st.none(), st.text(max_size=3), st.lists(st.integers(-2, 4), max_size=4).filter(
           lambda w: len(w) != 3 or min(w) < 1), st.just((2.0, 2, 2)), st.just((True, 2, 2))),
       n=bad_ints(2), backend=bad_names(("numpy", "cupy")),
       which=st.sampled_from(["quantizer", "w_bits", "first_last_bits", "width", "num_classes", "seed",
                              "backend", "fp_bits"]))
def test_small_cnn_refuses_bad_configurations(q, bits, width, n, backend, which):
    kw = dict(quantizer="lsq", w_bits=4, a_bits=4, width=(2, 2, 2))
    bad = dict(quantizer=dict(quantizer=q), w_bits=dict(w_bits=bits), first_last_bits=dict(first_last_bits=bits),
               width=dict(width=width), num_classes=dict(num_classes=n),
               seed=dict(seed=n if not isinstance(n, int) else -abs(n) - 1), backend=dict(backend=backend),
               fp_bits=dict(quantizer=None))[which]
    refused(lambda: nn.small_cnn(**dict(kw, **bad)), which if which != "fp_bits" else "quantizer=None")


@given(x=st.one_of(bad_arrays((2, 1, 28, 28)), st.just(np.zeros((2, 1, 28, 28), np.float64)),
                   st.just(np.zeros((2, 3, 28, 28), np.float32))))
def test_model_forward_refuses_bad_images(x):
    model = _tiny_model()
    refused(lambda: model.forward(x, train=False), "x", "channels")


_MODEL = {}


def _tiny_model():
    if "m" not in _MODEL:
        _MODEL["m"] = nn.small_cnn("lsq", 4, 4, width=(2, 2, 2))
        _MODEL["m"].forward(np.zeros((2, 1, 28, 28), np.float32) + 0.1, train=True)
    return _MODEL["m"]


def test_load_state_dict_refuses_bad_states():
    model = _tiny_model()
    good = model.state_dict()
    for bad in (None, [1, 2], {**good, "conv9.W": np.ones(1)}, {k: v for k, v in good.items() if k != "fc.b"},
                {**good, "fc.W": good["fc.W"][:1]}, {**good, "fc.W": np.full_like(good["fc.W"], np.nan)},
                {**good, "fc.W": "weights"}):
        refused(lambda: model.load_state_dict(bad), "state")


# ------------------------------------------------------------------------------ losses, optim
@given(logits=bad_arrays((4, 3)), y=st.one_of(NOT_ARRAYS, st.just(np.zeros(4)), st.just(np.array([0, 1, 2, 3])),
                                               st.just(np.array([0, -1, 0, 0])), st.just(np.zeros(5, np.int64)),
                                               st.just(np.zeros((4, 1), np.int64))),
       which=st.sampled_from(["logits", "y"]))
def test_cross_entropy_refuses_bad_logits_and_labels(logits, y, which):
    if which == "logits":
        refused(lambda: losses.softmax_cross_entropy(logits, np.zeros(4, np.int64)), "logits")
    else:
        refused(lambda: losses.softmax_cross_entropy(np.zeros((4, 3)), y), "y")


@given(lr=bad_positive(allow_zero=True), mom=st.one_of(bad_positive(allow_zero=True), st.floats(1.0, 10.0)),
       which=st.sampled_from(["lr", "momentum", "weight_decay", "nesterov", "positive_floor", "lr_setter"]))
def test_sgd_refuses_bad_hyperparameters(lr, mom, which):
    model = _tiny_model()
    if which == "lr_setter":
        opt = optim.SGD(model, lr=0.1)

        def call():
            opt.lr = lr
        refused(call, "lr")
        return
    kw = dict(lr=0.1)
    kw[which] = dict(lr=lr, momentum=mom, weight_decay=lr, nesterov="yes", positive_floor=lr)[which]
    if which == "positive_floor":
        assume(kw[which] != 0)
        kw[which] = kw[which] if kw[which] is not None else 0.0
    refused(lambda: optim.SGD(model, **kw), which)


@given(step=st.integers(-5, 20), total=st.integers(-2, 10), warm=st.integers(-2, 12),
       base=st.one_of(st.floats(0.0, 1.0), bad_positive(allow_zero=True)), lo=st.floats(0.0, 2.0))
def test_cosine_schedule_refuses_inconsistent_arguments(step, total, warm, base, lo):
    ok = (1 <= total and 0 <= step <= total and 0 <= warm <= total and isinstance(base, float)
          and math.isfinite(base) and base >= 0 and lo <= base)
    if ok:                                            # warm-up climbs from base / T_w
        v = optim.cosine_lr(step, total, base, warm, lo)
        assert 0 <= v <= base + 1e-12 and (step < warm or v >= lo - 1e-12)
    else:
        refused(lambda: optim.cosine_lr(step, total, base, warm, lo), "step", "total_steps",
                "warmup_steps", "base_lr", "min_lr")


# ------------------------------------------------------------------------------ data
IMGS, LABELS = np.zeros((5, 6, 6), np.uint8), np.arange(5) % 2


@given(x=bad_arrays((5, 6, 6), finite=False, dtype=np.uint8), bs=bad_ints(1, 5), rng=st.sampled_from([None, 0, "seed", np.random.RandomState(0)]),
       y=st.sampled_from([np.zeros(4, np.int64), np.zeros(5), None, np.zeros((5, 1), np.int64)]),
       which=st.sampled_from(["x", "batch_size", "rng", "y", "normalize"]))
def test_batching_refuses_bad_arguments(x, bs, rng, y, which):
    # normalize is elementwise: an empty batch of well-formed images maps to an empty batch
    assume(not (which == "normalize" and getattr(x, "dtype", None) == np.uint8 and getattr(x, "ndim", 0) == 3))
    call = dict(x=lambda: list(data.iterate_batches(x, LABELS, 2, np.random.default_rng(0))),
                batch_size=lambda: list(data.iterate_batches(IMGS, LABELS, bs, np.random.default_rng(0))),
                rng=lambda: list(data.iterate_batches(IMGS, LABELS, 2, rng)),
                y=lambda: list(data.iterate_batches(IMGS, y, 2, np.random.default_rng(0))),
                normalize=lambda: data.normalize(x))[which]
    refused(call, which if which != "normalize" else "x")


@given(pad=bad_ints(0, 5), dy=st.sampled_from([np.zeros(4, np.int64), np.zeros(5), None, 3]),
       n_val=bad_ints(1, 11999), name=bad_names(("bundled", "fashion-mnist", "idx")),
       which=st.sampled_from(["pad", "dy", "n_val", "name"]))
def test_augmentation_split_and_loading_refuse_bad_arguments(pad, dy, n_val, name, which):
    call = dict(pad=lambda: data.augment(IMGS, np.random.default_rng(0), pad=pad),
                dy=lambda: data.shift_flip(IMGS, dy, np.zeros(5, np.int64), np.zeros(5, bool)),
                n_val=lambda: data.train_val_split(_bundled(), n_val, 0),
                name=lambda: data.load_dataset(name))[which]
    refused(call, which)


def _bundled():
    if "ds" not in _MODEL:
        _MODEL["ds"] = data.load_bundled()
    return _MODEL["ds"]


@given(raw=st.binary(max_size=64))
def test_read_idx_refuses_arbitrary_bytes(raw, tmp_path_factory):
    p = tmp_path_factory.mktemp("idx") / "f-idx1-ubyte"
    p.write_bytes(raw)
    try:
        a = data.read_idx(p)
    except MecrefError as exc:
        assert str(p) in str(exc)
        return
    # a well-formed IDX file by chance: then its size matches its header exactly
    assert a.nbytes == len(raw) - 4 - 4 * a.ndim


# ------------------------------------------------------------------------------ training
TINY = dict(epochs=1, train_limit=64, batch_size=32, width=(2, 2, 2), progress=False)
TRAIN_BAD = {
    "quantizer": bad_names(("fp32", "ste", "dorefa_pact", "lsq", "lsqplus")),
    "reg": bad_names((None, "mec", "mec_taylor", "moe")),
    "w_bits": bad_bits(), "a_bits": bad_bits(), "first_last_bits": bad_bits(allow_full=True),
    "reg_weight": bad_positive(allow_zero=True), "eps": bad_positive(), "order": bad_ints(1, 64),
    "experts": bad_ints(1, 64), "epochs": bad_ints(1), "batch_size": bad_ints(2),
    "lr": bad_positive(), "momentum": st.one_of(bad_positive(allow_zero=True), st.floats(1.0, 1e9)),
    "weight_decay": bad_positive(allow_zero=True), "warmup_epochs": bad_positive(allow_zero=True),
    "dataset": bad_names(("bundled", "fashion-mnist", "idx")).filter(lambda v: v is not None),
    "val_size": st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=2)),
    "train_limit": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=2)),
    "seed": st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=2)),
    "backend": bad_names(("numpy", "cupy")), "init_from": st.sampled_from([3, ["a"], "/no/such/file.npz"]),
    "data_dir": st.sampled_from([3, ["a"]]),
    "width": st.sampled_from([(0, 2, 2), (2, 2), "2", (2.0, 2, 2), None, (True, 2, 2)]),
}


@pytest.mark.parametrize("field", TRAIN_BAD)
@given(data=st.data())
def test_train_refuses_each_bad_setting_before_any_work(field, data):
    v = data.draw(TRAIN_BAD[field])
    if field == "quantizer":
        assume(v is not None)
    # a path that does not exist is named by the message (the path, not the field's name)
    path = (str(v),) if field in ("init_from", "data_dir") and isinstance(v, str) else ()
    refused(lambda: train_small_cnn(**dict(TINY, **{field: v})), field, *path)


def test_train_refuses_batches_larger_than_the_data_and_unknown_names():
    refused(lambda: train_small_cnn(**dict(TINY, batch_size=65)), "batch_size")
    refused(lambda: train_small_cnn(**dict(TINY, val_size=12000)), "val_size")
    refused(lambda: train_small_cnn(**TINY, bitz=3), "bitz")
    refused(lambda: train_small_cnn(**dict(TINY, eps=1e-30)), "eps")   # lam overflows float32


# ------------------------------------------------------------------------------ files, export
@given(raw=st.binary(max_size=200), which=st.sampled_from(["checkpoint", "int_model"]))
def test_files_of_arbitrary_bytes_are_refused(raw, which, tmp_path_factory):
    p = tmp_path_factory.mktemp("f") / "f.npz"
    p.write_bytes(raw)
    if which == "checkpoint":
        refused(lambda: load_checkpoint(p), "checkpoint")
    else:
        refused(lambda: export.load_int_model(p), "integer model", "not a mecref")


@given(path=st.one_of(st.none(), st.integers(), st.binary(max_size=4), st.just(["a"])),
       which=st.sampled_from(["checkpoint", "int_model", "export"]))
def test_paths_that_are_not_paths_are_refused(path, which):
    call = dict(checkpoint=lambda: load_checkpoint(path), int_model=lambda: export.load_int_model(path),
                export=lambda: export.export_checkpoint(path, "out.npz"))[which]
    refused(call, "path")


@given(images=st.one_of(bad_arrays((3, 28, 28), finite=False, dtype=np.uint8), st.just(np.zeros((3, 1, 28, 28), np.uint8)),
                        st.just(np.zeros((3, 27, 28), np.uint8))),
       batch=bad_ints(1), which=st.sampled_from(["images", "batch_size", "model"]))
def test_integer_inference_refuses_bad_arguments(images, batch, which):
    imodel = _int_model()
    call = dict(images=lambda: export.int_forward(imodel, images),
                batch_size=lambda: export.int_predict(imodel, np.zeros((2, 28, 28), np.uint8), batch_size=batch),
                model=lambda: export.export_int_model(images))[which]
    refused(call, dict(images="images", batch_size="batch_size", model="model")[which])


def _int_model():
    if "int" not in _MODEL:
        _MODEL["int"] = export.export_int_model(_tiny_model())
    return _MODEL["int"]


# ------------------------------------------------------------------------------ CLI
def _not_int_in(lo, hi):
    def ok(t):
        try:
            return not lo <= int(t) <= hi
        except ValueError:
            return True
    above = st.nothing() if hi == math.inf else st.integers(hi + 1, hi + 10 ** 30).map(str)
    return st.one_of(st.integers(-10 ** 6, lo - 1).map(str), above, st.text(max_size=4)).filter(lambda t: not t.startswith("-") or t[1:].isdigit()).filter(ok)


def _not_positive_float():
    def ok(t):
        try:
            return not (0 < float(t) < math.inf)
        except ValueError:
            return True
    return st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "-inf", "x", "", "1e400"]),
                     st.text(max_size=4)).filter(lambda t: not t.startswith("-") or t[1:].replace(".", "").isdigit()).filter(ok)


CLI_BAD = st.one_of(
    st.tuples(st.sampled_from(["--w-bits", "--a-bits"]), _not_int_in(1, 8)).map(lambda t: ["train", *t]),
    st.tuples(st.just("--first-last-bits"), _not_int_in(1, 8).filter(lambda t: t.strip() != "32")).map(lambda t: ["train", *t]),
    st.tuples(st.sampled_from(["--lr", "--eps"]), _not_positive_float()).map(lambda t: ["train", *t]),
    st.tuples(st.just("--epochs"), _not_int_in(1, math.inf)).map(lambda t: ["train", *t]),   # any count >= 1 trains
    st.tuples(st.just("--batch-size"), _not_int_in(2, 12000)).map(lambda t: ["train", *t]),
    st.tuples(st.sampled_from(["--quantizer", "--reg", "--dataset", "--backend"]), st.text(max_size=6)).map(
        lambda t: ["train", *t]).filter(lambda a: a[2] not in ("fp32", "ste", "dorefa_pact", "lsq", "lsqplus",
                                                                "mec", "mec_taylor", "moe", "bundled", "numpy")
                                        and a[2].strip().lower() != "none"),   # --reg none or None
    st.sampled_from([[], ["nope"], ["train", "--nope"], ["export"], ["export", "a.npz"], ["eval-int"],
                     ["export", "/no/such.npz", "--out", "x.npz"], ["eval-int", "/no/such.npz"],
                     ["eval-int", "/no/such.npz", "--limit", "0"], ["table"], ["sweep", "--out"],
                     ["diagnose", "--out", "d", "--bits", "W9"], ["table", "--out", "d", "--grid", "big"]]),
)


@given(argv=CLI_BAD)
def test_cli_bad_arguments_exit_2_with_one_line(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), _time_limit(20):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (argv, err.getvalue())
    assert len(lines) == 1 and "error" in lines[0], (argv, err.getvalue())
