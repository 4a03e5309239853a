"""Fake quantizers (mecref.quant): gradients against float64 central differences of the
surrogate each straight-through rule defines (docs/derivations.md Q1-Q9), grid properties,
init rules, exact rounding ties (half to even), float32 preservation, argument errors, and the
NumPy/CuPy seam."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mecref.backend import MecrefError, array_module, backend_name, to_backend, to_host
from mecref.quant import (
    dorefa_act_quantize, dorefa_act_quantize_backward,
    dorefa_weight_quantize, dorefa_weight_quantize_backward,
    lsq_init_step, lsq_quantize, lsq_quantize_backward,
    lsqplus_init, lsqplus_quantize, lsqplus_quantize_backward,
    pact_quantize, pact_quantize_backward,
    qrange, ste_quantize, ste_quantize_backward,
)

bits_st = st.integers(1, 8)
seed_st = st.integers(0, 2**32 - 1)
shape_st = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)
scale_st = st.floats(-3.0, 2.0).map(lambda e: 10.0 ** e)


# ----------------------------------------------------------------------------- helpers
def expected_range(bits, signed):
    """(Qn, Qp) written out from the definition (Q1), independent of qrange."""
    if not signed:
        return 0, 2**bits - 1
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def reference_codes(v, Qn, Qp, binary):
    """Codes of v = x/s from the definition: sign (sign(0)=+1) or clip(round(v))."""
    if binary:
        return np.where(v >= 0, 1.0, -1.0)
    return np.clip(np.round(v), Qn, Qp)


def safe_v(rng, shape, Qn, Qp, margin=0.1):
    """v = k + r with k an integer in [Qn-2, Qp+2] and margin <= |r| <= 0.4: at least `margin`
    from every rounding boundary (half-integers; 0 for the binary sign) and clip edge."""
    k = rng.integers(Qn - 2, Qp + 3, size=shape)
    r = rng.uniform(margin, 0.4, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return k + r


def make_step(rng, shape, scale, per_channel):
    """A positive step: a Python float, or (C, 1, ..., 1) per output channel."""
    if not per_channel:
        return float(scale * math.exp(rng.uniform(-1, 1)))
    sshape = (shape[0],) + (1,) * (len(shape) - 1)
    return scale * np.exp(rng.uniform(-1, 1, size=sshape))


def fd_elementwise(f, x, h):
    """Central difference of an elementwise function, per element (h may be an array)."""
    return (f(x + h) - f(x - h)) / (2 * h)


def fd_param(loss, p, h):
    """Central difference of a scalar loss in each entry of a parameter (float or array),
    with step h (a number, or an array of p's shape)."""
    p = np.asarray(p, dtype=np.float64)
    h = np.broadcast_to(np.asarray(h, dtype=np.float64), p.shape)
    grad = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        pp, pm = p.copy(), p.copy()
        pp[i] += h[i]
        pm[i] -= h[i]
        grad[i] = (loss(pp) - loss(pm)) / (2 * h[i])
    return grad


def n_per_step(shape, s):
    """Elements of x that share one step value (Q3)."""
    return int(np.prod(shape)) // int(np.size(s))


# ----------------------------------------------------------------------------- Q1 range
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_qrange(bits, signed):
    Qn, Qp = qrange(bits, signed)
    assert (Qn, Qp) == expected_range(bits, signed)
    levels = 2 if (signed and bits == 1) else Qp - Qn + 1
    assert levels == 2**bits                      # b bits give 2^b levels, binary included


@pytest.mark.parametrize("bits", range(1, 9))
def test_qrange_restricted(bits):
    """Q1: the restricted signed range is symmetric, -Qn = Qp = 2^(b-1) - 1 (b >= 2), one
    level fewer than 2^b; binary unchanged; unsigned refused."""
    Qn, Qp = qrange(bits, True, restricted=True)
    if bits == 1:
        assert (Qn, Qp) == (-1, 1)
    else:
        assert (Qn, Qp) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert Qp - Qn + 1 == 2**bits - 1
        assert qrange(bits, True)[1] == Qp
    with pytest.raises(MecrefError, match="^restricted "):
        qrange(bits, False, restricted=True)


# ----------------------------------------------------------------------------- Q2 STE
@given(shape=shape_st, bits=bits_st, signed=st.booleans(), scale=scale_st,
       per_channel=st.booleans(), seed=seed_st)
def test_ste_backward_matches_fd_of_surrogate(shape, bits, signed, scale, per_channel, seed):
    rng = np.random.default_rng(seed)
    Qn, Qp = expected_range(bits, signed)
    s = make_step(rng, shape, scale, per_channel)
    x = safe_v(rng, shape, Qn, Qp) * s
    dy = rng.normal(size=shape)
    _, cache = ste_quantize(x, s, bits, signed=signed)
    dx = ste_quantize_backward(cache, dy)
    surrogate = lambda z: s * np.clip(z / s, Qn, Qp)       # round taken as identity
    np.testing.assert_allclose(dx, dy * fd_elementwise(surrogate, x, 1e-6 * s * np.ones(shape)),
                               rtol=1e-6, atol=1e-9)


@given(shape=shape_st, bits=bits_st, signed=st.booleans(), scale=scale_st,
       per_channel=st.booleans(), seed=seed_st)
def test_ste_forward_properties(shape, bits, signed, scale, per_channel, seed):
    rng = np.random.default_rng(seed)
    Qn, Qp = expected_range(bits, signed)
    binary = signed and bits == 1
    s = make_step(rng, shape, scale, per_channel)
    x = rng.uniform(Qn - 3, Qp + 3, size=shape) * s
    y, cache = ste_quantize(x, s, bits, signed=signed)
    code = y / s
    # on the grid, inside the range
    np.testing.assert_allclose(code, np.round(code), atol=1e-9)
    assert code.min() >= Qn - 1e-9 and code.max() <= Qp + 1e-9
    if binary:
        assert set(np.unique(np.round(code))) <= {-1.0, 1.0}
    # equal to the definition (random x hits no exact tie)
    np.testing.assert_allclose(y, s * reference_codes(x / s, Qn, Qp, binary), rtol=1e-12)
    # idempotent
    y2, _ = ste_quantize(y, s, bits, signed=signed)
    np.testing.assert_array_equal(y2, y)
    # error at most half a level spacing inside the range (the binary spacing is 2s)
    inside = (x >= Qn * s) & (x <= Qp * s)
    half = (1.0 if binary else 0.5) * s * np.ones(shape)
    assert np.all(np.abs(x - y)[inside] <= half[inside] * (1 + 1e-12))
    # zero input gradient outside
    dx = ste_quantize_backward(cache, np.ones(shape))
    np.testing.assert_array_equal(dx, inside.astype(float))


@pytest.mark.parametrize("bits, signed", [(1, True), (2, True), (3, False), (8, True)])
def test_ste_mask_includes_the_clip_edges(bits, signed):
    """Q2: the STE passes the gradient on the closed range [Qn s, Qp s]."""
    Qn, Qp = expected_range(bits, signed)
    s = 0.125                                   # a power of two: x/s is exact
    x = np.array([Qn * s - s / 16, Qn * s, Qp * s, Qp * s + s / 16])
    _, cache = ste_quantize(x, s, bits, signed=signed)
    np.testing.assert_array_equal(ste_quantize_backward(cache, np.ones(4)), [0, 1, 1, 0])
    _, cache = lsq_quantize(x, s, bits, signed=signed, grad_scale=1.0)
    dx, _ = lsq_quantize_backward(cache, np.ones(4))
    np.testing.assert_array_equal(dx, [0, 1, 1, 0])


def test_binary_sign_of_zero_is_plus():
    x = np.array([-0.5, -0.0, 0.0, 1e-30, 0.7])
    y, _ = ste_quantize(x, 0.25, 1, signed=True)
    np.testing.assert_array_equal(y, [-0.25, 0.25, 0.25, 0.25, 0.25])


# ----------------------------------------------------------------------------- Q3 LSQ
@given(shape=shape_st, bits=bits_st, signed=st.booleans(), scale=scale_st,
       per_channel=st.booleans(), seed=seed_st)
def test_lsq_gradients(shape, bits, signed, scale, per_channel, seed):
    """dx vs FD of the STE surrogate; ds vs the paper's formula, vs FD of the surrogate in s,
    and vs the fixed-code identity d y/ds = code from FD of the true forward (Q3)."""
    rng = np.random.default_rng(seed)
    Qn, Qp = expected_range(bits, signed)
    binary = signed and bits == 1
    s = make_step(rng, shape, scale, per_channel)
    x = safe_v(rng, shape, Qn, Qp) * s
    dy = rng.normal(size=shape)
    y, cache = lsq_quantize(x, s, bits, signed=signed)
    dx, ds = lsq_quantize_backward(cache, dy)
    assert np.shape(ds) == np.shape(s)
    g = 1.0 / math.sqrt(n_per_step(shape, s) * Qp)
    v = x / s
    inside = (v >= Qn) & (v <= Qp)

    # dx: STE
    surrogate_x = lambda z: s * np.clip(z / s, Qn, Qp)
    np.testing.assert_allclose(dx, dy * fd_elementwise(surrogate_x, x, 1e-6 * s * np.ones(shape)),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(dx[~inside], 0.0)

    # ds: the paper's case formula, summed to the shape of s
    code = reference_codes(v, Qn, Qp, binary)
    per_elem = np.where(inside, code - v, np.where(v < Qn, Qn, Qp))
    reduce = lambda a: (a.sum() if np.ndim(s) == 0 else
                        a.reshape(shape[0], -1).sum(1).reshape(np.shape(s)))
    np.testing.assert_allclose(ds, g * reduce(dy * per_elem), rtol=1e-9, atol=1e-12)

    # ds: FD of the surrogate "round(u) = u + frozen rounding error" in each entry of s
    frozen = code - np.clip(v, Qn, Qp)
    loss_sur = lambda sp: np.sum(dy * sp * (np.clip(x / sp, Qn, Qp) + frozen))
    np.testing.assert_allclose(ds, g * fd_param(loss_sur, s, 1e-5 * np.asarray(s)),
                               rtol=1e-5, atol=1e-7)

    # ds: away from rounding boundaries the true forward has d y/ds = code (codes held fixed);
    # the STE adds -v inside, so ds = g * sum(dy * (FD[y](s) - v * inside))
    def y_true(sp):
        return lsq_quantize(x, sp if np.ndim(s) else float(sp), bits, signed=signed)[0]
    h = 1e-7 * np.asarray(s)
    dyds_fixed = (y_true(s + h) - y_true(s - h)) / (2 * h)
    np.testing.assert_allclose(dyds_fixed, code * np.ones(shape), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ds, g * reduce(dy * (dyds_fixed - v * inside)),
                               rtol=1e-5, atol=1e-7)


@given(bits=bits_st, signed=st.booleans(), seed=seed_st, gs=st.floats(0.01, 10.0))
def test_lsq_grad_scale_argument(bits, signed, seed, gs):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 4))
    s = np.full((3, 1), 0.3)
    dy = rng.normal(size=x.shape)
    _, c_default = lsq_quantize(x, s, bits, signed=signed)
    _, c_one = lsq_quantize(x, s, bits, signed=signed, grad_scale=1.0)
    _, c_gs = lsq_quantize(x, s, bits, signed=signed, grad_scale=gs)
    ds_default = lsq_quantize_backward(c_default, dy)[1]
    ds_one = lsq_quantize_backward(c_one, dy)[1]
    ds_gs = lsq_quantize_backward(c_gs, dy)[1]
    Qp = expected_range(bits, signed)[1]
    np.testing.assert_allclose(ds_default, ds_one / math.sqrt(4 * Qp), rtol=1e-12)
    np.testing.assert_allclose(ds_gs, gs * ds_one, rtol=1e-12)


def test_lsq_per_channel_conv_and_linear_shapes(rng):
    for shape, sshape in [((6, 3, 3, 3), (6, 1, 1, 1)), ((5, 7), (5, 1)), ((5, 7), (1, 7))]:
        x = rng.normal(size=shape).astype(np.float32)
        s = np.full(sshape, 0.2, dtype=np.float32)
        y, cache = lsq_quantize(x, s, 3, signed=True)
        dx, ds = lsq_quantize_backward(cache, np.ones_like(x))
        assert y.shape == dx.shape == shape and ds.shape == sshape


def test_lsq_init_step_rule():
    x = np.array([[1.0, -3.0], [0.5, 0.5]])
    # unsigned 2 bits: Qp = 3; mean|x| = 5/4
    assert float(lsq_init_step(x, 2)) == pytest.approx(2 * 1.25 / math.sqrt(3))
    # signed 4 bits: Qp = 7; per channel: rows have mean|x| 2 and 0.5
    s = lsq_init_step(x, 4, signed=True, per_channel=True)
    assert s.shape == (2, 1)
    np.testing.assert_allclose(s[:, 0], [2 * 2 / math.sqrt(7), 2 * 0.5 / math.sqrt(7)])
    # binary: Qp = 1
    assert float(lsq_init_step(x, 1, signed=True)) == pytest.approx(2 * 1.25)
    # conv weight: (C, 1, 1, 1); an all-zero channel still gets a positive step
    w = np.ones((3, 2, 3, 3), dtype=np.float32)
    w[1] = 0
    s = lsq_init_step(w, 2, signed=True, per_channel=True)
    assert s.shape == (3, 1, 1, 1) and s.dtype == np.float32 and np.all(s > 0)
    np.testing.assert_allclose(s[[0, 2]].ravel(), 2.0, rtol=1e-6)


# ----------------------------------------------------------------------------- Q5 LSQ+
@given(shape=shape_st, bits=bits_st, signed=st.booleans(), scale=scale_st,
       per_channel=st.booleans(), seed=seed_st)
def test_lsqplus_gradients(shape, bits, signed, scale, per_channel, seed):
    rng = np.random.default_rng(seed)
    Qn, Qp = expected_range(bits, signed)
    binary = signed and bits == 1
    s = make_step(rng, shape, scale, per_channel)
    beta = float(rng.normal() * scale) if not per_channel else \
        rng.normal(size=np.shape(s)) * scale
    v = safe_v(rng, shape, Qn, Qp)
    x = v * s + beta
    dy = rng.normal(size=shape)
    y, cache = lsqplus_quantize(x, s, beta, bits, signed=signed)
    dx, ds, dbeta = lsqplus_quantize_backward(cache, dy)
    assert np.shape(ds) == np.shape(s) and np.shape(dbeta) == np.shape(beta)
    code = reference_codes(v, Qn, Qp, binary)
    np.testing.assert_allclose(y, s * code + beta, rtol=1e-9, atol=1e-9 * scale)

    g = 1.0 / math.sqrt(n_per_step(shape, s) * Qp)
    frozen = code - np.clip(v, Qn, Qp)
    F = lambda xx, sp, bp: sp * (np.clip((xx - bp) / sp, Qn, Qp) + frozen) + bp
    np.testing.assert_allclose(
        dx, dy * fd_elementwise(lambda z: F(z, s, beta), x, 1e-6 * s * np.ones(shape)),
        rtol=1e-6, atol=1e-9)
    hs = 1e-5 * np.min(s)                     # moves v by at most 1e-5 (Qp + 2)
    np.testing.assert_allclose(ds, g * fd_param(lambda sp: np.sum(dy * F(x, sp, beta)), s, hs),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, g * fd_param(lambda bp: np.sum(dy * F(x, s, bp)), beta, hs),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lsqplus_init(bits, rng):
    x = rng.normal(1.0, 2.0, size=(4, 50))
    # unsigned: min/max, the grid's ends land on min x and max x
    s, beta = lsqplus_init(x, bits)
    Qn, Qp = expected_range(bits, False)
    assert s.shape == beta.shape == ()
    assert float(s) == pytest.approx((x.max() - x.min()) / Qp)
    assert float(beta) == pytest.approx(x.min())
    ends = np.array([x.min(), x.max()])
    np.testing.assert_allclose(lsqplus_quantize(ends, s, beta, bits)[0], ends, rtol=1e-12)
    # signed: the paper's weight rule, beta = 0
    s, beta = lsqplus_init(x, bits, signed=True)
    mu, sigma = x.mean(), x.std()
    rule = max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 2 ** (bits - 1)
    assert float(s) == pytest.approx(rule)
    assert float(beta) == 0.0
    # per channel shapes
    s, beta = lsqplus_init(x, bits, per_channel=True)
    assert s.shape == beta.shape == (4, 1)
    np.testing.assert_allclose(beta[:, 0], x.min(axis=1))


# ----------------------------------------------------------------------------- Q6 PACT
@given(shape=shape_st, bits=bits_st, scale=scale_st, per_channel=st.booleans(), seed=seed_st)
def test_pact(shape, bits, scale, per_channel, seed):
    rng = np.random.default_rng(seed)
    Qp = 2**bits - 1
    alpha = make_step(rng, shape, scale, per_channel)
    s = alpha / Qp
    v = safe_v(rng, shape, 0, Qp)              # x Qp / alpha, off 0, alpha and the half-levels
    x = v * s
    dy = rng.normal(size=shape)
    y, cache = pact_quantize(x, alpha, bits)
    dx, dalpha = pact_quantize_backward(cache, dy)
    assert np.shape(dalpha) == np.shape(alpha)
    code = np.clip(np.round(v), 0, Qp)
    np.testing.assert_allclose(y, code * s, rtol=1e-12)
    above = v >= Qp
    np.testing.assert_allclose(y[above], (alpha * np.ones(shape))[above], rtol=1e-12)

    # the paper's surrogate: y ~ clip(x, 0, alpha)
    sur = lambda xx, a: np.clip(xx, 0, a)
    np.testing.assert_allclose(dx, dy * fd_elementwise(lambda z: sur(z, alpha), x,
                                                       1e-6 * s * np.ones(shape)),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dalpha, fd_param(lambda a: np.sum(dy * sur(x, a)), alpha,
                                                 1e-5 * np.asarray(alpha)),
                               rtol=1e-5, atol=1e-7)
    # the true forward, codes held fixed: d y/d alpha = code/Qp (= 1 above alpha, the part the
    # paper keeps; inside, code/Qp is the dropped term, Q6)
    a = np.asarray(alpha)
    h = 1e-7 * a
    y_true = lambda ap: pact_quantize(x, ap if np.ndim(alpha) else float(ap), bits)[0]
    dyda = (y_true(a + h) - y_true(a - h)) / (2 * h)
    np.testing.assert_allclose(dyda, code / Qp, rtol=1e-6, atol=1e-6)


def test_pact_edges():
    x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0])
    y, cache = pact_quantize(x, 1.0, 2)
    np.testing.assert_allclose(y, [0, 0, 2 / 3, 1, 1])         # round(1.5) = 2 (half to even)
    dx, da = pact_quantize_backward(cache, np.ones(5))
    np.testing.assert_array_equal(dx, [0, 1, 1, 0, 0])          # 0 <= x < alpha
    assert float(da) == 2.0                                     # x >= alpha


# ----------------------------------------------------------------------------- Q7 DoReFa w
def _weights(rng, shape, scale):
    w = rng.normal(size=shape) * scale
    j = np.argmax(np.abs(w))
    w.flat[j] *= 1.25                         # a unique max, 25% clear of the next
    return w


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
       bits=st.integers(2, 8), scale=st.floats(0.05, 2.0), seed=seed_st)
def test_dorefa_weight_backward_matches_fd_through_max(shape, bits, scale, seed):
    rng = np.random.default_rng(seed)
    w = _weights(rng, shape, scale)
    dy = rng.normal(size=shape)
    y, cache = dorefa_weight_quantize(w, bits)
    dw = dorefa_weight_quantize_backward(cache, dy)
    Qp = 2**bits - 1
    t = np.tanh(w)
    M = np.abs(t).max()
    np.testing.assert_allclose(y, 2 * np.round(Qp * (t / (2 * M) + 0.5)) / Qp - 1, atol=1e-12)
    assert np.all(np.abs(y) <= 1 + 1e-12)
    np.testing.assert_allclose(np.abs(y.flat[np.argmax(np.abs(w))]), 1.0)
    surrogate = lambda wf: np.sum(dy * np.tanh(wf) / np.abs(np.tanh(wf)).max())   # q_k = identity
    fd = fd_param(surrogate, w, 1e-6)
    np.testing.assert_allclose(dw, fd, rtol=1e-5, atol=1e-7)


def test_dorefa_weight_two_way_tie_equals_central_difference(rng):
    """At a tie of two maxima the central difference is the mean of the one-sided derivatives,
    which is the equal split of the max's gradient (Q7)."""
    w = rng.normal(size=(3, 4)) * 0.3
    w[0, 0], w[2, 1] = 1.5, -1.5
    dy = rng.normal(size=w.shape)
    _, cache = dorefa_weight_quantize(w, 3)
    dw = dorefa_weight_quantize_backward(cache, dy)
    surrogate = lambda wf: np.sum(dy * np.tanh(wf) / np.abs(np.tanh(wf)).max())
    np.testing.assert_allclose(dw, fd_param(surrogate, w, 1e-6), rtol=1e-5, atol=1e-7)


def test_dorefa_weight_binary(rng):
    w = rng.normal(size=(4, 5))
    w[0, 0] = 0.0
    y, cache = dorefa_weight_quantize(w, 1)
    E = np.abs(w).mean()
    np.testing.assert_allclose(y, np.where(w >= 0, E, -E))
    dy = rng.normal(size=w.shape)
    dw = dorefa_weight_quantize_backward(cache, dy)
    np.testing.assert_array_equal(dw, dy)                       # sign as identity, E constant
    assert dw is not dy


# ----------------------------------------------------------------------------- Q8 DoReFa a
@given(shape=shape_st, bits=bits_st, seed=seed_st)
def test_dorefa_act(shape, bits, seed):
    rng = np.random.default_rng(seed)
    Qp = 2**bits - 1
    x = safe_v(rng, shape, 0, Qp) / Qp
    dy = rng.normal(size=shape)
    y, cache = dorefa_act_quantize(x, bits)
    dx = dorefa_act_quantize_backward(cache, dy)
    np.testing.assert_allclose(y, np.round(Qp * np.clip(x, 0, 1)) / Qp, atol=1e-15)
    np.testing.assert_allclose(y, ste_quantize(x, 1.0 / Qp, bits)[0], atol=1e-12)   # s = 1/Qp
    sur = lambda z: np.clip(z, 0, 1)
    np.testing.assert_allclose(dx, dy * fd_elementwise(sur, x, 1e-6 / Qp), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- dtypes
def _run_all(x, dy, bits=3):
    """Every pair on x (a (4, 2, 3, 3) weight-like array); outputs and gradients, in order."""
    xp_s = x[:, :1, :1, :1] * 0 + 0.25           # per-channel step on x's backend and dtype
    out = []
    y, c = ste_quantize(x, xp_s, bits, signed=True)
    out += [y, ste_quantize_backward(c, dy)]
    y, c = lsq_quantize(x, xp_s, bits, signed=True)
    out += [y, *lsq_quantize_backward(c, dy)]
    y, c = lsqplus_quantize(x, xp_s, 0.1, bits)
    out += [y, *lsqplus_quantize_backward(c, dy)]
    if bits > 1:                                 # the binary quantizer refuses mask="rounded"
        y, c = ste_quantize(x, xp_s, bits, signed=True, mask="rounded", restricted=True)
        out += [y, ste_quantize_backward(c, dy)]
        y, c = lsq_quantize(x, xp_s, bits, signed=True, mask="rounded")
        out += [y, *lsq_quantize_backward(c, dy)]
        y, c = lsqplus_quantize(x, xp_s, 0.1, bits, signed=True, mask="rounded", restricted=True)
        out += [y, *lsqplus_quantize_backward(c, dy)]
    y, c = pact_quantize(x, 1.5, bits)
    out += [y, *pact_quantize_backward(c, dy)]
    y, c = dorefa_weight_quantize(x, bits)
    out += [y, dorefa_weight_quantize_backward(c, dy)]
    y, c = dorefa_weight_quantize(x, 1)
    out += [y, dorefa_weight_quantize_backward(c, dy)]
    y, c = dorefa_act_quantize(x, bits)
    out += [y, dorefa_act_quantize_backward(c, dy)]
    out += [lsq_init_step(x, bits, signed=True, per_channel=True), *lsqplus_init(x, bits)]
    return out


def test_float32_stays_float32(rng):
    x = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    for a in _run_all(x, dy):
        assert a.dtype == np.float32
    # a float64 step does not upcast a float32 input
    y, c = lsq_quantize(x, np.full((4, 1, 1, 1), 0.3), 2, signed=True)
    assert y.dtype == np.float32 and lsq_quantize_backward(c, dy)[1].dtype == np.float32


@pytest.mark.parametrize("bits", [1, 3])
def test_backends_agree(backend, bits, rng):
    x = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    ref = _run_all(x, dy, bits)
    got = _run_all(to_backend(x, backend), to_backend(dy, backend), bits)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert backend_name(array_module(a)) == backend
        np.testing.assert_allclose(to_host(a), b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors
X = np.ones((3, 4))


@pytest.mark.parametrize("call, exc, name", [
    (lambda: ste_quantize([1.0, 2.0], 0.1, 2), TypeError, "x"),
    (lambda: ste_quantize(np.arange(4), 0.1, 2), TypeError, "x"),
    (lambda: ste_quantize(np.array([1.0, np.nan]), 0.1, 2), MecrefError, "x"),
    (lambda: ste_quantize(np.array(1.0), 0.1, 2), MecrefError, "x"),
    (lambda: ste_quantize(X, 0.1, 0), MecrefError, "bits"),
    (lambda: ste_quantize(X, 0.1, 9), MecrefError, "bits"),
    (lambda: ste_quantize(X, 0.1, 32), MecrefError, "bits"),
    (lambda: ste_quantize(X, 0.1, 2.0), MecrefError, "bits"),
    (lambda: ste_quantize(X, 0.1, 2, signed="yes"), TypeError, "signed"),
    (lambda: ste_quantize(X, 0.0, 2), MecrefError, "s"),
    (lambda: ste_quantize(X, -1.0, 2), MecrefError, "s"),
    (lambda: ste_quantize(X, float("inf"), 2), MecrefError, "s"),
    (lambda: ste_quantize(X, "0.1", 2), TypeError, "s"),
    (lambda: ste_quantize(X, np.array([[0.1], [0.0], [0.1]]), 2), MecrefError, "s"),
    (lambda: ste_quantize(X, np.full((4, 1), 0.1), 2), MecrefError, "s"),
    (lambda: ste_quantize(X, np.full((2, 3, 4), 0.1), 2), MecrefError, "s"),
    (lambda: ste_quantize(X, np.full((3, 1), 1), 2), TypeError, "s"),
    (lambda: lsq_quantize(X, 0.1, 2, grad_scale=0.0), MecrefError, "grad_scale"),
    (lambda: lsq_quantize(X, 0.1, 2, grad_scale="a"), TypeError, "grad_scale"),
    (lambda: lsq_init_step(X, 2, per_channel=1), TypeError, "per_channel"),
    (lambda: lsq_init_step(X, 33), MecrefError, "bits"),
    (lambda: lsqplus_quantize(X, 0.1, float("nan"), 2), MecrefError, "beta"),
    (lambda: lsqplus_quantize(X, 0.1, np.zeros((5, 1)), 2), MecrefError, "beta"),
    (lambda: lsqplus_quantize(X, -0.1, 0.0, 2), MecrefError, "s"),
    (lambda: pact_quantize(X, 0.0, 2), MecrefError, "alpha"),
    (lambda: pact_quantize(X, np.array([1.0, -1.0, 1.0, 1.0]), 2), MecrefError, "alpha"),
    (lambda: dorefa_weight_quantize(np.zeros((2, 2)), 2), MecrefError, "w"),
    (lambda: dorefa_weight_quantize(np.array([np.inf, 1.0]), 2), MecrefError, "w"),
    (lambda: dorefa_weight_quantize(X, 9), MecrefError, "bits"),
    (lambda: dorefa_act_quantize(X, -1), MecrefError, "bits"),
    (lambda: qrange(2, None), TypeError, "signed"),
    (lambda: ste_quantize_backward(ste_quantize(X, 0.1, 2)[1], np.ones(3)), MecrefError, "dy"),
    (lambda: lsq_quantize_backward(lsq_quantize(X, 0.1, 2)[1], [1.0]), TypeError, "dy"),
    (lambda: ste_quantize(X, 0.1, 2, mask="code"), MecrefError, "mask"),
    (lambda: lsq_quantize(X, 0.1, 2, mask=None), MecrefError, "mask"),
    (lambda: lsq_quantize(X, 0.1, 1, signed=True, mask="rounded"), MecrefError, "mask"),
    (lambda: lsqplus_quantize(X, 0.1, 0.0, 2, mask="Rounded"), MecrefError, "mask"),
    (lambda: lsq_quantize(X, 0.1, 2, restricted=1), TypeError, "restricted"),
    (lambda: ste_quantize(X, 0.1, 2, signed=False, restricted=True), MecrefError, "restricted"),
])
def test_bad_arguments_raise_naming_them(call, exc, name):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(name + " ")


# ----------------------------------------------------------------------------- exact ties (Q1)
def half_to_even(v):
    """round(v) with ties to the even integer, written out: floor, then up if the fraction is
    above 1/2, or exactly 1/2 and the floor is odd."""
    f = np.floor(v)
    frac = v - f
    up = (frac > 0.5) | ((frac == 0.5) & (np.mod(f, 2) == 1))
    return f + up


HALVES = np.arange(-9, 9) + 0.5   # every half-integer in [-8.5, 8.5]: even and odd floors


@pytest.mark.parametrize("bits, signed", [(2, False), (3, True), (4, True), (8, False)])
@pytest.mark.parametrize("which", ["ste", "lsq", "lsqplus"])
def test_step_quantizers_round_exact_ties_to_even(which, bits, signed):
    Qn, Qp = expected_range(bits, signed)
    s, beta = 0.25, 0.5                                   # dyadic: x / s, (x - beta) / s exact
    x = s * HALVES + (beta if which == "lsqplus" else 0.0)
    assert np.array_equal((x - (beta if which == "lsqplus" else 0.0)) / s, HALVES)  # ties
    if which == "ste":
        y = ste_quantize(x, s, bits, signed)[0]
    elif which == "lsq":
        y = lsq_quantize(x, s, bits, signed)[0]
    else:
        y = lsqplus_quantize(x, s, beta, bits, signed)[0] - beta
    np.testing.assert_array_equal(y, s * np.clip(half_to_even(HALVES), Qn, Qp))
    inside = (HALVES > Qn) & (HALVES < Qp)
    assert (inside & (np.mod(np.floor(HALVES), 2) == 0)).any()  # some ties round down


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_pact_rounds_exact_ties_to_even(bits):
    Qp = 2 ** bits - 1
    alpha = Qp / 4                                        # Qp / alpha = 4: x Qp / alpha exact
    v = HALVES[(HALVES > 0) & (HALVES < Qp)]
    y = pact_quantize(v / 4, alpha, bits)[0]
    np.testing.assert_array_equal(y * (Qp / alpha), half_to_even(v))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_dorefa_act_rounds_exact_ties_to_even(bits):
    Qp = 2 ** bits - 1
    # x with fl(x Qp) exactly a half-integer (checked): 0.5 always, others where division allows
    x = np.array([h / Qp for h in HALVES if 0 < h < Qp and (h / Qp) * Qp == h])
    assert ((x * Qp) == 0.5).any()                        # 0.5 -> 0: the even integer below
    y = dorefa_act_quantize(x, bits)[0]
    np.testing.assert_allclose(y * Qp, half_to_even(x * Qp), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dorefa_weight_rounds_exact_ties_to_even(bits):
    """t = tanh w; the code rounds (2^k - 1)(t / 2M + 1/2). Ties are where t / M = 2n / Qp with
    n odd (then the value is an integer + 1/2 above an even floor); w is searched ulp by ulp
    near arctanh of that t until the scaled value is exactly the half-integer."""
    Qp = 2 ** bits - 1
    w_max = 0.8
    M = np.tanh(w_max)
    ws, targets = [w_max], []
    for n in range(-(Qp // 2), Qp // 2 + 1):
        w = np.arctanh(M * 2 * n / Qp)
        for _ in range(200):
            scaled = np.tanh(w) * (Qp / (2 * M)) + Qp / 2
            if scaled == n + Qp / 2:
                break
            w = np.nextafter(w, np.inf if scaled < n + Qp / 2 else -np.inf)
        else:
            continue
        ws.append(w)
        targets.append(n + Qp / 2)
    assert any(np.mod(np.floor(t), 2) == 0 for t in targets), targets  # a tie that rounds down
    y = dorefa_weight_quantize(np.array(ws), bits)[0]
    np.testing.assert_allclose((y[1:] + 1) * Qp / 2, half_to_even(np.array(targets)),
                               rtol=0, atol=1e-9)


def test_binary_sign_of_zero_is_plus_one():
    s = 0.5
    for y in (ste_quantize(np.array([0.0, -0.0]), s, 1, True)[0],
              lsq_quantize(np.array([0.0, -0.0]), s, 1, True)[0]):
        np.testing.assert_array_equal(y, [s, s])
    w = np.array([0.0, 1.0, -2.0])
    np.testing.assert_array_equal(dorefa_weight_quantize(w, 1)[0], [1.0, 1.0, -1.0])  # E = 1


# ----------------------------------------------------------------------------- Q10: rounded mask
multi_level = st.tuples(bits_st, st.booleans()).filter(lambda bs: not (bs[1] and bs[0] == 1))


@given(shape=shape_st, bs=multi_level, scale=scale_st, per_channel=st.booleans(), seed=seed_st)
def test_rounded_mask_gradients_match_fd_of_the_widened_surrogate(shape, bs, scale, per_channel,
                                                                  seed):
    """mask="rounded" (Q10): dx and ds of STE, LSQ and LSQ+ are central differences of the
    Q2/Q3/Q5 surrogates with the clip edges moved to Qn - 1/2 and Qp + 1/2; the values are
    those of the default mask."""
    bits, signed = bs
    rng = np.random.default_rng(seed)
    Qn, Qp = expected_range(bits, signed)
    lo, hi = Qn - 0.5, Qp + 0.5
    s = make_step(rng, shape, scale, per_channel)
    beta = rng.normal(size=np.shape(s)) * scale if per_channel else float(rng.normal() * scale)
    v = safe_v(rng, shape, Qn, Qp)
    dy = rng.normal(size=shape)
    code = np.clip(np.round(v), Qn, Qp)
    g = 1.0 / math.sqrt(n_per_step(shape, s) * Qp)
    frozen = code - np.clip(v, lo, hi)

    x = v * s
    y, c = ste_quantize(x, s, bits, signed=signed, mask="rounded")
    np.testing.assert_array_equal(y, ste_quantize(x, s, bits, signed=signed)[0])
    surrogate_x = lambda z: s * np.clip(z / s, lo, hi)
    fd_x = fd_elementwise(surrogate_x, x, 1e-6 * s * np.ones(shape))
    np.testing.assert_allclose(ste_quantize_backward(c, dy), dy * fd_x, rtol=1e-6, atol=1e-9)

    y, c = lsq_quantize(x, s, bits, signed=signed, mask="rounded")
    np.testing.assert_array_equal(y, lsq_quantize(x, s, bits, signed=signed)[0])
    dx, ds = lsq_quantize_backward(c, dy)
    np.testing.assert_allclose(dx, dy * fd_x, rtol=1e-6, atol=1e-9)
    loss_sur = lambda sp: np.sum(dy * sp * (np.clip(x / sp, lo, hi) + frozen))
    np.testing.assert_allclose(ds, g * fd_param(loss_sur, s, 1e-5 * np.asarray(s)),
                               rtol=1e-5, atol=1e-7)

    xb = v * s + beta
    y, c = lsqplus_quantize(xb, s, beta, bits, signed=signed, mask="rounded")
    np.testing.assert_array_equal(y, lsqplus_quantize(xb, s, beta, bits, signed=signed)[0])
    dx, ds, dbeta = lsqplus_quantize_backward(c, dy)
    F = lambda xx, sp, bp: sp * (np.clip((xx - bp) / sp, lo, hi) + frozen) + bp
    np.testing.assert_allclose(
        dx, dy * fd_elementwise(lambda z: F(z, s, beta), xb, 1e-6 * s * np.ones(shape)),
        rtol=1e-6, atol=1e-9)
    hs = 1e-5 * np.min(s)
    np.testing.assert_allclose(ds, g * fd_param(lambda sp: np.sum(dy * F(xb, sp, beta)), s, hs),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, g * fd_param(lambda bp: np.sum(dy * F(xb, s, bp)), beta, hs),
                               rtol=1e-5, atol=1e-7)


@given(bs=multi_level, seed=seed_st)
def test_rounded_mask_differs_only_in_the_half_step_bands(bs, seed):
    """Identity (Q10): the two masks give the same dx and per-element dy/ds except where
    v lies in (Qp, Qp + 1/2) or (Qn - 1/2, Qn); there rounded gives dx = dy and round(v) - v."""
    bits, signed = bs
    rng = np.random.default_rng(seed)
    Qn, Qp = expected_range(bits, signed)
    v = safe_v(rng, (64,), Qn, Qp)
    dy = np.ones_like(v)
    band = ((v > Qp) & (v < Qp + 0.5)) | ((v > Qn - 0.5) & (v < Qn))
    _, c_u = lsq_quantize(v, 1.0, bits, signed=signed, grad_scale=1.0)
    _, c_r = lsq_quantize(v, 1.0, bits, signed=signed, grad_scale=1.0, mask="rounded")
    # one element at a time gives the per-element dy/ds
    per = lambda m: np.array([lsq_quantize_backward(
        lsq_quantize(v[i:i + 1], 1.0, bits, signed=signed, grad_scale=1.0, mask=m)[1],
        np.ones(1))[1] for i in range(v.size)])
    dsu, dsr = per("unrounded"), per("rounded")
    dxu, dxr = lsq_quantize_backward(c_u, dy)[0], lsq_quantize_backward(c_r, dy)[0]
    np.testing.assert_array_equal(dxu[~band], dxr[~band])
    np.testing.assert_array_equal(dsu[~band], dsr[~band])
    np.testing.assert_array_equal(dxu[band], 0.0)
    np.testing.assert_array_equal(dxr[band], 1.0)
    np.testing.assert_allclose(dsr[band], np.round(v[band]) - v[band], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(dsu[band], np.where(v[band] > Qp, Qp, Qn))


def test_rounded_mask_worked_example():
    """docs/derivations.md Q10 and docs/conventions.md: 2-bit unsigned, s = 1, g = 1, x = 3.3."""
    x = np.array([3.3])
    for mask, dx_want, ds_want in [("unrounded", 0.0, 3.0), ("rounded", 1.0, -0.3)]:
        y, c = lsq_quantize(x, 1.0, 2, grad_scale=1.0, mask=mask)
        dx, ds = lsq_quantize_backward(c, np.ones(1))
        assert y[0] == 3.0 and dx[0] == dx_want
        assert abs(float(ds) - ds_want) < 1e-12


def test_rounded_mask_ties_follow_round_half_to_even():
    """Q10: v = Qp + 1/2 is inside only for an even Qp, v = Qn - 1/2 only for an even Qn."""
    cases = [(2, False, 3.5, False), (2, True, 1.5, False), (2, True, -2.5, True),
             (3, True, -4.5, True), (1, False, 1.5, False), (1, False, -0.5, True)]
    for bits, signed, v, inside in cases:
        _, c = ste_quantize(np.array([v]), 1.0, bits, signed=signed, mask="rounded")
        assert ste_quantize_backward(c, np.ones(1))[0] == float(inside), (bits, signed, v)


# ----------------------------------------------------------------------------- Q1: restricted range
@given(shape=shape_st, bits=st.integers(2, 8), rounded=st.booleans(), scale=scale_st,
       per_channel=st.booleans(), seed=seed_st)
def test_restricted_range_gradients_match_fd(shape, bits, rounded, scale, per_channel, seed):
    """restricted=True (Q1): Qn = -Qp; values on that grid, and dx, ds (STE, LSQ, LSQ+) central
    differences of the surrogates of Q2/Q3/Q5 (Q10's widened ones with mask="rounded")."""
    rng = np.random.default_rng(seed)
    Qp = 2 ** (bits - 1) - 1
    Qn = -Qp
    w = 0.5 if rounded else 0.0
    lo, hi = Qn - w, Qp + w
    mask = "rounded" if rounded else "unrounded"
    s = make_step(rng, shape, scale, per_channel)
    beta = rng.normal(size=np.shape(s)) * scale if per_channel else float(rng.normal() * scale)
    v = safe_v(rng, shape, Qn, Qp)
    dy = rng.normal(size=shape)
    code = np.clip(np.round(v), Qn, Qp)
    frozen = code - np.clip(v, lo, hi)
    g = 1.0 / math.sqrt(n_per_step(shape, s) * Qp)
    x = v * s

    y, c = ste_quantize(x, s, bits, signed=True, mask=mask, restricted=True)
    np.testing.assert_allclose(y, s * code, rtol=1e-12, atol=1e-12 * scale)
    fd_x = fd_elementwise(lambda z: s * np.clip(z / s, lo, hi), x, 1e-6 * s * np.ones(shape))
    np.testing.assert_allclose(ste_quantize_backward(c, dy), dy * fd_x, rtol=1e-6, atol=1e-9)

    y, c = lsq_quantize(x, s, bits, signed=True, mask=mask, restricted=True)
    dx, ds = lsq_quantize_backward(c, dy)
    np.testing.assert_allclose(dx, dy * fd_x, rtol=1e-6, atol=1e-9)
    loss_sur = lambda sp: np.sum(dy * sp * (np.clip(x / sp, lo, hi) + frozen))
    np.testing.assert_allclose(ds, g * fd_param(loss_sur, s, 1e-5 * np.asarray(s)),
                               rtol=1e-5, atol=1e-7)

    xb = x + beta
    y, c = lsqplus_quantize(xb, s, beta, bits, signed=True, mask=mask, restricted=True)
    dx, ds, dbeta = lsqplus_quantize_backward(c, dy)
    F = lambda xx, sp, bp: sp * (np.clip((xx - bp) / sp, lo, hi) + frozen) + bp
    np.testing.assert_allclose(y, s * code + beta, rtol=1e-9, atol=1e-9 * scale)
    hs = 1e-5 * np.min(s)
    np.testing.assert_allclose(ds, g * fd_param(lambda sp: np.sum(dy * F(xb, sp, beta)), s, hs),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, g * fd_param(lambda bp: np.sum(dy * F(xb, s, bp)), beta, hs),
                               rtol=1e-5, atol=1e-7)


def test_restricted_range_differs_only_below_minus_qp(rng):
    """Identity (Q1): restricted and full signed ranges give the same y, dx, ds for v >= -Qp."""
    for bits in (2, 3, 8):
        Qp = 2 ** (bits - 1) - 1
        v = safe_v(rng, (200,), -Qp - 1, Qp)
        r = lsq_quantize(v, 1.0, bits, signed=True, grad_scale=1.0, restricted=True)
        f = lsq_quantize(v, 1.0, bits, signed=True, grad_scale=1.0)
        keep = v >= -Qp
        assert (~keep).any()
        np.testing.assert_array_equal(r[0][keep], f[0][keep])
        np.testing.assert_array_equal(r[0][~keep], -Qp)
        for m in (keep, ~keep):
            dy = m * 1.0
            (dxr, dsr), (dxf, dsf) = lsq_quantize_backward(r[1], dy), lsq_quantize_backward(f[1], dy)
            if m is keep:
                np.testing.assert_array_equal(dxr, dxf)
                np.testing.assert_allclose(dsr, dsf, rtol=1e-12)
            else:
                np.testing.assert_array_equal(dxr, 0.0)
                assert float(dsr) == -Qp * m.sum()


@pytest.mark.parametrize("call, name", [
    (lambda x: lsq_quantize(x, 1e-300, 2, signed=True), "s"),        # rounds to 0 in float32
    (lambda x: lsq_quantize(x, 1e-40, 2, signed=True), "s"),         # a float32 subnormal
    (lambda x: lsq_quantize(x, np.full((8, 1, 1, 1), 1e300), 2), "s"),  # overflows to inf
    (lambda x: pact_quantize(x, 1e-300, 2), "alpha"),
    (lambda x: pact_quantize(x, 1e300, 2), "alpha"),
    (lambda x: lsqplus_quantize(x, 0.1, 1e300, 2), "beta"),
    (lambda x: lsqplus_quantize(x, 1e-300, 0.0, 2), "s"),
])
def test_parameters_checked_after_the_cast_to_x_dtype(call, name):
    """A step, clip level or offset that is finite and positive as a float64 but rounds to 0,
    a subnormal or inf in x's float32 would give NaN gradients or inf outputs: refused."""
    x = np.ones((8, 4, 3, 3), np.float32)
    with pytest.raises(MecrefError, match=rf"^{name} must lie in .* float32"):
        call(x)


def test_tiny_step_is_fine_in_float64():
    """The same 1e-300 is a normal float64: LSQ runs and its gradients are finite."""
    x = np.linspace(-1, 1, 32).reshape(8, 4)
    y, cache = lsq_quantize(x, 1e-300, 2, signed=True)
    dx, ds = lsq_quantize_backward(cache, np.ones_like(y))
    assert np.isfinite(y).all() and np.isfinite(dx).all() and np.isfinite(ds).all()
