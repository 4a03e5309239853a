"""Softmax cross-entropy against finite differences and scipy; SGD against its formula and, over
several steps with a schedule, against its unrolled form; the cosine schedule at its landmarks
(docs/derivations.md N6-N8)."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.special import log_softmax

from mecref import nn
from mecref.backend import MecrefError, get_xp, to_backend, to_host
from mecref.losses import accuracy, softmax_cross_entropy, softmax_cross_entropy_backward
from mecref.optim import SGD, cosine_lr


# ----------------------------------------------------------------------------- cross-entropy
def test_cross_entropy_value_matches_scipy_and_gradient_matches_fd(rng):
    logits = rng.standard_normal((5, 4)) * 3
    y = np.array([0, 3, 1, 1, 2])
    loss, cache = softmax_cross_entropy(logits, y)
    assert math.isclose(float(loss), -np.mean(log_softmax(logits, axis=1)[np.arange(5), y]),
                        rel_tol=1e-13)
    d = softmax_cross_entropy_backward(cache, dL=2.5)
    h, fd = 1e-6, np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        e = np.zeros_like(logits)
        e[idx] = h
        fd[idx] = (float(softmax_cross_entropy(logits + e, y)[0])
                   - float(softmax_cross_entropy(logits - e, y)[0])) / (2 * h)
    np.testing.assert_allclose(d, 2.5 * fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-12)   # softmax - onehot sums to 0


@given(st.floats(-1e4, 1e4), st.integers(0, 2**31 - 1))
def test_cross_entropy_is_stable_for_huge_logits(shift, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((3, 5)).astype(np.float32)
    logits = base * 1e3 + np.float32(shift)
    y = rng.integers(0, 5, 3)
    loss, cache = softmax_cross_entropy(logits, y)
    ref = -np.mean(log_softmax(logits.astype(np.float64), axis=1)[np.arange(3), y])
    assert np.isfinite(float(loss)) and math.isclose(float(loss), ref, rel_tol=1e-4, abs_tol=1e-2)
    assert np.isfinite(softmax_cross_entropy_backward(cache)).all()


def test_accuracy_and_label_checks(rng):
    logits = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [5.0, 4.0]])
    assert accuracy(logits, np.array([1, 0, 0, 1])) == 0.5
    with pytest.raises(MecrefError, match=r"labels in \[0, 1\]"):
        softmax_cross_entropy(logits, np.array([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="integer"):
        softmax_cross_entropy(logits, np.array([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(MecrefError, match=r"y must have shape \(4,\)"):
        accuracy(logits, np.array([0, 1]))
    with pytest.raises(MecrefError, match="logits must be 2-dimensional"):
        softmax_cross_entropy(logits[0], np.array([0, 1]))


# ----------------------------------------------------------------------------- SGD
class Toy(nn.Layer):
    """A layer with a decayed weight, an undecayed bias and a positive step."""

    def __init__(self, rng):
        super().__init__()
        self.params = {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(3),
                       "s": np.array([0.5, 0.2])}
        self.no_decay = {"b", "s"}
        self.positive = {"s"}


def test_sgd_step_equals_the_formula_and_accumulates_momentum(rng):
    layer = Toy(rng)
    opt = SGD([("toy.W", layer, "W"), ("toy.b", layer, "b")], lr=0.1, momentum=0.9,
              weight_decay=0.01)
    W, b = layer.params["W"], layer.params["b"]
    W0, b0 = W.copy(), b.copy()
    g1, g2 = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 3))
    layer.grads = {"W": g1[0], "b": g2[0]}
    opt.step()
    vW, vb = g1[0] + 0.01 * W0, g2[0]                      # v1 = g + wd p (no decay for b)
    np.testing.assert_allclose(W, W0 - 0.1 * vW, rtol=1e-14)
    np.testing.assert_allclose(b, b0 - 0.1 * vb, rtol=1e-14)
    assert layer.params["W"] is W                           # updated in place
    W1, b1 = W.copy(), b.copy()
    layer.grads = {"W": g1[1], "b": g2[1]}
    opt.step()
    vW, vb = 0.9 * vW + g1[1] + 0.01 * W1, 0.9 * vb + g2[1]
    np.testing.assert_allclose(W, W1 - 0.1 * vW, rtol=1e-14)
    np.testing.assert_allclose(b, b1 - 0.1 * vb, rtol=1e-14)


def test_sgd_nesterov_and_no_decay(rng):
    layer = Toy(rng)
    opt = SGD([("W", layer, "W"), ("b", layer, "b")], lr=0.5, momentum=0.8, weight_decay=0.1,
              nesterov=True)
    W0, b0 = layer.params["W"].copy(), layer.params["b"].copy()
    layer.grads = {"W": np.zeros((3, 2)), "b": np.zeros(3)}
    opt.step()
    g = 0.1 * W0                                            # decay only
    np.testing.assert_allclose(layer.params["W"], W0 - 0.5 * (g + 0.8 * g), rtol=1e-14)
    np.testing.assert_array_equal(layer.params["b"], b0)    # no decay on a no_decay key


def test_sgd_keeps_positive_keys_positive(rng):
    layer = Toy(rng)
    opt = SGD([("s", layer, "s")], lr=1.0, momentum=0.0, weight_decay=0.0)
    layer.grads = {"s": np.array([10.0, -1.0])}
    opt.step()
    np.testing.assert_allclose(layer.params["s"], [1e-8, 1.2])


def test_sgd_on_a_model_skips_decay_where_the_layers_say(rng):
    model = nn.small_cnn(quantizer="lsq", w_bits=4, a_bits=4, width=(2, 3, 4))
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    logits, _ = model.forward(x)
    model.backward(np.zeros_like(logits))                  # zero gradients: decay alone moves
    before = model.state_dict()
    SGD(model, lr=0.1, momentum=0.0, weight_decay=0.5).step()
    after = model.state_dict()
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved == {"conv1.W", "conv2.W", "conv3.W", "fc.W"}


def test_sgd_state_dict_round_trip_and_refusals(rng):
    layer = Toy(rng)
    entries = [("W", layer, "W"), ("b", layer, "b")]
    opt = SGD(entries, lr=0.1)
    layer.grads = {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(3)}
    opt.step()
    state = opt.state_dict()
    other = SGD(entries, lr=0.1)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    state["W"][...] = 0                                     # host copy, not a view
    assert np.any(opt.velocity["W"] != 0)
    with pytest.raises(MecrefError, match="missing.*'b'"):
        other.load_state_dict({"W": state["W"]})
    with pytest.raises(MecrefError, match="'W' has shape"):
        other.load_state_dict({"W": np.zeros(2), "b": state["b"]})
    np.testing.assert_array_equal(other.velocity["b"], opt.velocity["b"])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_over_several_steps_matches_the_explicit_sum_form(rng, nesterov):
    """Twelve steps of a schedule with warm-up, on gradients that depend on the params (so an
    error compounds), against the unrolled form written from N7/N8 independently of the
    recurrence: v_t = sum_{j<=t} mu^(t-j) g'_j with g'_j = g_j + wd p_j on decayed keys only,
    p_{t+1} = p_t - eta_t (v_t, or g'_t + mu v_t for Nesterov), floored at 1e-8 on positive
    keys; eta_t = eta_0 (t+1)/T_w in the warm-up, then eta_0 cos^2(pi/2 (t-T_w)/(T-T_w))
    (= eta_0 (1 + cos(pi u)) / 2)."""
    T, Tw, base, mu, wd = 12, 3, 0.3, 0.9, 0.05
    layer = Toy(rng)
    opt = SGD([("W", layer, "W"), ("b", layer, "b"), ("s", layer, "s")], lr=base, momentum=mu,
              weight_decay=wd, nesterov=nesterov)
    A = {k: rng.uniform(0.2, 1.5, v.shape) for k, v in layer.params.items()}
    C = [{k: rng.standard_normal(v.shape) for k, v in layer.params.items()} for _ in range(T)]
    ref = {k: v.copy() for k, v in layer.params.items()}
    history = {k: [] for k in ref}
    floored = False
    for t in range(T):
        eta = base * (t + 1) / Tw if t < Tw else base * math.cos(0.5 * math.pi * (t - Tw) / (T - Tw)) ** 2
        opt.lr = cosine_lr(t, T, base, Tw)
        assert opt.lr == pytest.approx(eta, rel=1e-14)
        layer.grads = {k: A[k] * p + C[t][k] for k, p in layer.params.items()}
        opt.step()
        for k in ref:
            g = A[k] * ref[k] + C[t][k] + (wd * ref[k] if k == "W" else 0.0)
            history[k].append(g)
            v = sum(mu ** (t - j) * history[k][j] for j in range(t + 1))
            ref[k] = ref[k] - eta * (g + mu * v if nesterov else v)
            if k == "s":
                floored |= bool((ref[k] < 1e-8).any())
                ref[k] = np.maximum(ref[k], 1e-8)
        for k in ref:
            np.testing.assert_allclose(layer.params[k], ref[k], rtol=1e-11, atol=1e-12,
                                       err_msg=f"{k} after step {t}")
    assert floored  # the positive floor was exercised too


def test_sgd_argument_errors(rng):
    layer = Toy(rng)
    entries = [("W", layer, "W")]
    with pytest.raises(MecrefError, match="lr must be.*>= 0.*-0.1"):
        SGD(entries, lr=-0.1)
    for m in (1.0, -0.1, 1.5):
        with pytest.raises(MecrefError, match="momentum must be a real in \\[0, 1\\)"):
            SGD(entries, lr=0.1, momentum=m)
    with pytest.raises(MecrefError, match="weight_decay"):
        SGD(entries, lr=0.1, weight_decay=-1e-4)
    with pytest.raises(MecrefError, match="nesterov"):
        SGD(entries, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(MecrefError, match="key in layer.params"):
        SGD([("W", layer, "nope")], lr=0.1)
    opt = SGD(entries, lr=0.1)
    with pytest.raises(MecrefError, match="lr"):
        opt.lr = -1.0
    with pytest.raises(MecrefError, match="no gradient for W"):
        opt.step()


def test_sgd_on_backend(backend, rng):
    model = nn.small_cnn(quantizer="lsq", w_bits=4, a_bits=4, width=(2, 3, 4), backend=backend)
    xp = get_xp(backend)
    x = to_backend(rng.standard_normal((2, 1, 8, 8)).astype(np.float32), backend)
    logits, _ = model.forward(x)
    model.backward(xp.ones_like(logits))
    opt = SGD(model, lr=0.1)
    opt.step()
    assert all(isinstance(v, np.ndarray) for v in opt.state_dict().values())
    assert all(float(to_host(layer.params[k]).min()) > 0
               for _, layer, k in model.named_params() if k in layer.positive)


# ----------------------------------------------------------------------------- cosine schedule
def test_cosine_lr_landmarks():
    T, Tw, base, lo = 110, 10, 0.2, 0.02
    assert math.isclose(cosine_lr(0, T, base, Tw, lo), base / Tw)
    assert math.isclose(cosine_lr(Tw - 1, T, base, Tw, lo), base)       # warm-up end
    assert math.isclose(cosine_lr(Tw, T, base, Tw, lo), base)           # cosine start
    assert math.isclose(cosine_lr(60, T, base, Tw, lo), (base + lo) / 2)  # midpoint
    assert math.isclose(cosine_lr(T, T, base, Tw, lo), lo)              # end
    warm = [cosine_lr(t, T, base, Tw, lo) for t in range(Tw)]
    np.testing.assert_allclose(np.diff(warm), base / Tw)                # linear warm-up
    decay = [cosine_lr(t, T, base, Tw, lo) for t in range(Tw, T + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert cosine_lr(50, 100, 1.0, 0) == pytest.approx(0.5)


def test_cosine_lr_argument_errors():
    with pytest.raises(MecrefError, match="step"):
        cosine_lr(101, 100, 0.1, 10)
    with pytest.raises(MecrefError, match="warmup_steps"):
        cosine_lr(0, 100, 0.1, 101)
    with pytest.raises(MecrefError, match="base_lr"):
        cosine_lr(0, 100, -0.1, 10)
    with pytest.raises(MecrefError, match="min_lr"):
        cosine_lr(0, 100, 0.1, 10, min_lr=0.2)
