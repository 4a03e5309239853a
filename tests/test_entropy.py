"""Tests of mecref.entropy: every backward against float64 central differences, and the
identities of docs/derivations.md E1-E5 against independent NumPy references."""
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mecref import entropy as E
from mecref.backend import MecrefError, to_backend, to_host
from mecref.entropy import (ConvergenceWarning, coding_length, coding_length_backward,
                            mec_loss, mec_loss_backward, moe_coding_length,
                            moe_coding_length_backward)


# ----------------------------------------------------------------------------- helpers
def numgrad(f, X, h=1e-6):
    """Central differences of the scalar f at X, entry by entry (float64)."""
    G = np.zeros_like(X)
    for i in np.ndindex(X.shape):
        Xp, Xm = X.copy(), X.copy()
        Xp[i] += h
        Xm[i] -= h
        G[i] = (float(f(Xp)) - float(f(Xm))) / (2 * h)
    return G


def assert_grad(g, g_num):
    scale = max(1.0, float(np.abs(g_num).max()))
    np.testing.assert_allclose(g, g_num, rtol=1e-5, atol=1e-6 * scale)


def unit(U):
    return U / np.linalg.norm(U, axis=1, keepdims=True)


def consts(m, d, eps):
    return d / (m * eps ** 2), (m + d) / 2  # lam, mu


def quiet(f, *args, **kw):
    """Call f with the Taylor ConvergenceWarning silenced (finite differences of divergent series)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return f(*args, **kw)


SIDES = ["m<d", "m>d", "m=d"]


@st.composite
def features(draw, side=None, max_dim=6):
    """(m, d, seed) with the row side smaller, larger or equal (drawn unless given)."""
    side = side or draw(st.sampled_from(SIDES))
    a = draw(st.integers(1, max_dim - 1))
    b = draw(st.integers(a + 1, max_dim))
    m, d = {"m<d": (a, b), "m>d": (b, a), "m=d": (b, b)}[side]
    return m, d, draw(st.integers(0, 2 ** 16))


eps_st = st.floats(0.3, 3.0)


def two_views(m, d, seed, noise=0.4):
    rng = np.random.default_rng(seed)
    U1 = rng.standard_normal((m, d))
    U2 = (U1 + noise * rng.standard_normal((m, d))) * rng.uniform(0.5, 2.0, (m, 1))
    return U1, U2


def det_margin(U1, U2, eps):
    """det(I + lam Z1 Z2^T) for the unit rows, by NumPy directly."""
    m, d = U1.shape
    lam, _ = consts(m, d, eps)
    return np.linalg.det(np.eye(m) + lam * unit(U1) @ unit(U2).T)


def spaced_norms(U, gap=1e-3):
    r = np.sort(np.linalg.norm(U, axis=1))
    return r.size < 2 or np.diff(r).min() > gap


# ----------------------------------------------------------------------------- gradients vs finite differences
@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=25)
@given(shape=st.data(), eps=eps_st, normalize=st.booleans(), dL=st.floats(-2.0, 2.0))
def test_coding_length_gradient(side, shape, eps, normalize, dL):
    m, d, seed = shape.draw(features(side), label="shape")
    U = np.random.default_rng(seed).standard_normal((m, d))
    L, cache = coding_length(U, eps, normalize=normalize)
    g = coding_length_backward(cache, dL)
    assert g.shape == U.shape and g.dtype == U.dtype
    assert_grad(g, dL * numgrad(lambda X: coding_length(X, eps, normalize=normalize)[0], U))


@pytest.mark.parametrize("order", [None, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=12)
@given(shape=st.data(), eps=eps_st, normalize=st.booleans())
def test_mec_loss_gradient(order, side, shape, eps, normalize):
    m, d, seed = shape.draw(features(side), label="shape")
    U1, U2 = two_views(m, d, seed)
    if order is None:  # the exact form needs det(I + C) > 0, away from 0 for the differences
        assume(det_margin(U1, U2, eps) > 0.05)
    f = lambda A, B: quiet(mec_loss, A, B, eps, order=order, normalize=normalize)[0]
    _, cache = quiet(mec_loss, U1, U2, eps, order=order, normalize=normalize)
    g1, g2 = mec_loss_backward(cache, 0.7)
    assert_grad(g1, 0.7 * numgrad(lambda X: f(X, U2), U1))
    assert_grad(g2, 0.7 * numgrad(lambda X: f(U1, X), U2))


@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=25)
@given(data=st.data(), eps=eps_st, normalize=st.booleans())
def test_moe_hard_gradient(side, data, eps, normalize):
    m, d, seed = data.draw(features(side), label="shape")
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((m, d)) * rng.lognormal(0.0, 1.0, (m, 1))
    assume(spaced_norms(U))  # a perturbation of 1e-6 must not change the routing
    K = data.draw(st.integers(1, m), label="experts")
    kw = dict(experts=K, normalize=normalize, scale_grad=True)   # the full derivative
    f = lambda X: moe_coding_length(X, eps, **kw)[0]
    _, cache = moe_coding_length(U, eps, **kw)
    dZ, dW = moe_coding_length_backward(cache, -1.3)
    assert dW is None
    assert_grad(dZ, -1.3 * numgrad(f, U))


@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=25)
@given(data=st.data(), eps=eps_st, normalize=st.booleans())
def test_moe_hard_gradient_scales_held(side, data, eps, normalize):
    """Default scale_grad=False: the gradient is that of L at the fixed eps_k of the batch."""
    m, d, seed = data.draw(features(side), label="shape")
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((m, d)) * rng.lognormal(0.0, 1.0, (m, 1))
    assume(spaced_norms(U))  # a perturbation of 1e-6 must not change the routing
    K = data.draw(st.integers(1, m), label="experts")
    ek = moe_eps_k(U, eps, K, normalize=normalize)
    L, cache = moe_coding_length(U, eps, experts=K, normalize=normalize)
    Lf = moe_coding_length(U, eps, experts=K, normalize=normalize, expert_eps=ek)[0]
    np.testing.assert_allclose(Lf, L, rtol=1e-12)          # same value at the batch's eps_k
    f = lambda X: moe_coding_length(X, eps, experts=K, normalize=normalize, expert_eps=ek)[0]
    dZ, dW = moe_coding_length_backward(cache, -1.3)
    assert dW is None
    assert_grad(dZ, -1.3 * numgrad(f, U))


@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=25)
@given(data=st.data(), eps=eps_st, normalize=st.booleans(), tau=st.floats(0.3, 2.0))
def test_moe_soft_gradient(side, data, eps, normalize, tau):
    m, d, seed = data.draw(features(side), label="shape")
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((m, d)) * rng.lognormal(0.0, 1.0, (m, 1))
    K = data.draw(st.integers(1, m), label="experts")
    W = rng.standard_normal((d, K))
    kw = dict(experts=K, gate="soft", tau=tau, normalize=normalize, scale_grad=True)
    _, cache = moe_coding_length(U, eps, W_g=W, **kw)
    dZ, dW = moe_coding_length_backward(cache, 0.9)
    assert_grad(dZ, 0.9 * numgrad(lambda X: moe_coding_length(X, eps, W_g=W, **kw)[0], U))
    assert_grad(dW, 0.9 * numgrad(lambda X: moe_coding_length(U, eps, W_g=X, **kw)[0], W))


@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=25)
@given(data=st.data(), eps=eps_st, normalize=st.booleans(), tau=st.floats(0.3, 2.0))
def test_moe_soft_gradient_scales_held(side, data, eps, normalize, tau):
    """Default scale_grad=False, soft gates: the gradient is that of the reference L with
    eps_k frozen at its value for U (pi still moves with Z and W_g)."""
    m, d, seed = data.draw(features(side), label="shape")
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((m, d)) * rng.lognormal(0.0, 1.0, (m, 1))
    K = data.draw(st.integers(1, m), label="experts")
    W = rng.standard_normal((d, K))
    ek = moe_eps_k(U, eps, K, "soft", W, tau, normalize)
    kw = dict(experts=K, gate="soft", tau=tau, normalize=normalize)
    _, cache = moe_coding_length(U, eps, W_g=W, **kw)
    dZ, dW = moe_coding_length_backward(cache, 0.9)
    ref = lambda A, B: moe_reference(A, eps, K, "soft", B, tau, normalize, eps_k=ek)
    assert_grad(dZ, 0.9 * numgrad(lambda X: ref(X, W), U))
    assert_grad(dW, 0.9 * numgrad(lambda X: ref(U, X), W))


@pytest.mark.parametrize("gate", ["norm", "soft"])
@settings(max_examples=20)
@given(features(max_dim=8), eps_st, st.data())
def test_moe_scales_held_acts_on_directions(gate, shape, eps, data):
    """scale_grad=False, normalize=True: L depends on the directions only, so dL/du_i . u_i = 0."""
    m, d, seed = shape
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((m, d)) * rng.lognormal(0.0, 1.0, (m, 1))
    K = data.draw(st.integers(1, m), label="experts")
    W = rng.standard_normal((d, K)) if gate == "soft" else None
    dZ, _ = moe_coding_length_backward(moe_coding_length(U, eps, experts=K, gate=gate, W_g=W)[1])
    radial = np.einsum("ij,ij->i", dZ, U)
    np.testing.assert_allclose(radial, 0.0, atol=1e-9 * max(1.0, np.abs(dZ).max() * np.abs(U).max()))


@pytest.mark.parametrize("gate", ["norm", "soft"])
def test_moe_scale_grad_is_radial(gate, rng):
    """scale_grad=True adds a radial part (through the norms): dL/du_i . u_i != 0, and it is
    exactly the difference between the two gradients (the directional parts agree for hard
    gates)."""
    m, d, K = 8, 5, 2
    U = rng.standard_normal((m, d)) * np.geomspace(0.2, 20.0, m)[:, None]
    W = rng.standard_normal((d, K)) if gate == "soft" else None
    kw = dict(experts=K, gate=gate, W_g=W)
    held = moe_coding_length_backward(moe_coding_length(U, 0.7, **kw)[1])[0]
    full = moe_coding_length_backward(moe_coding_length(U, 0.7, scale_grad=True, **kw)[1])[0]
    assert np.abs(np.einsum("ij,ij->i", full, U)).max() > 1e-3 * np.abs(full).max()
    if gate == "norm":
        diff = full - held
        np.testing.assert_allclose(diff - unit(U) * np.einsum("ij,ij->i", diff, unit(U))[:, None],
                                   0.0, atol=1e-12 * np.abs(full).max())


# ----------------------------------------------------------------------------- E1 identities
@settings(max_examples=30)
@given(features(max_dim=9), eps_st)
def test_sylvester_both_sides(shape, eps):
    m, d, seed = shape
    U = np.random.default_rng(seed).standard_normal((m, d))
    Z = unit(U)
    lam, mu = consts(m, d, eps)
    row_side = np.linalg.slogdet(np.eye(m) + lam * Z @ Z.T)[1]
    col_side = np.linalg.slogdet(np.eye(d) + lam * Z.T @ Z)[1]
    np.testing.assert_allclose(row_side, col_side, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(coding_length(U, eps)[0], mu * row_side, rtol=1e-12, atol=1e-12)
    # the private core on either side of the same matrix
    np.testing.assert_allclose(E._gram_logdet(Z, lam)[1], E._gram_logdet(Z.T.copy(), lam)[1],
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=30)
@given(features(max_dim=9), eps_st)
def test_coding_length_bounds(shape, eps):
    """Unit rows: mu log(1 + lam m) <= L <= mu r log(1 + lam m / r), r = min(m, d); the lower
    bound is reached by collapsed rows, the upper (for m <= d) by orthonormal rows."""
    m, d, seed = shape
    rng = np.random.default_rng(seed)
    lam, mu = consts(m, d, eps)
    r = min(m, d)
    lo, hi = mu * np.log1p(lam * m), mu * r * np.log1p(lam * m / r)
    L = float(coding_length(rng.standard_normal((m, d)), eps)[0])
    assert lo * (1 - 1e-12) <= L <= hi * (1 + 1e-12)
    collapsed = rng.uniform(0.5, 3.0, (m, 1)) * rng.standard_normal((1, d))
    np.testing.assert_allclose(coding_length(collapsed, eps)[0], lo, rtol=1e-12)
    if m <= d:
        Q = np.linalg.qr(rng.standard_normal((d, m)))[0].T  # m orthonormal rows
        np.testing.assert_allclose(coding_length(Q, eps)[0], mu * m * np.log1p(lam), rtol=1e-12)


def random_rotation(d, rng):
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    return Q * np.sign(np.diag(R))


@settings(max_examples=20)
@given(features(), eps_st)
def test_rotation_and_permutation(shape, eps):
    """Every term depends on Z through Z Z^T and the row norms: invariant under Z -> P Z Q;
    the gradients move with it (dZ -> P dZ Q)."""
    m, d, seed = shape
    rng = np.random.default_rng(seed)
    U1, U2 = two_views(m, d, seed)
    U1 = U1 * rng.lognormal(0.0, 1.0, (m, 1))
    Q, perm = random_rotation(d, rng), rng.permutation(m)
    move = lambda X: (X @ Q)[perm]
    W = rng.standard_normal((d, 2))
    K = min(2, m)
    forwards = [
        lambda A, B, W: coding_length(A, eps),
        lambda A, B, W: quiet(mec_loss, A, B, eps, order=3),
        lambda A, B, W: mec_loss(A, B, eps) if det_margin(U1, U2, eps) > 0.05 else None,
        lambda A, B, W: moe_coding_length(A, eps, experts=K),
        lambda A, B, W: moe_coding_length(A, eps, experts=K, gate="soft", W_g=W[:, :K]),
    ]
    for fwd in forwards:
        out = fwd(U1, U2, W)
        if out is None:
            continue
        moved = fwd(move(U1), move(U2), Q.T @ W)  # the soft gate's weights rotate too
        np.testing.assert_allclose(moved[0], out[0], rtol=1e-10, atol=1e-10)
    # gradients
    g = coding_length_backward(coding_length(U1, eps)[1])
    np.testing.assert_allclose(coding_length_backward(coding_length(move(U1), eps)[1]), move(g),
                               rtol=1e-9, atol=1e-12)
    g1, g2 = mec_loss_backward(quiet(mec_loss, U1, U2, eps, order=3)[1])
    h1, h2 = mec_loss_backward(quiet(mec_loss, move(U1), move(U2), eps, order=3)[1])
    np.testing.assert_allclose(h1, move(g1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(h2, move(g2), rtol=1e-9, atol=1e-12)
    dZ, dW = moe_coding_length_backward(moe_coding_length(U1, eps, experts=K, gate="soft", W_g=W[:, :K])[1])
    eZ, eW = moe_coding_length_backward(moe_coding_length(move(U1), eps, experts=K, gate="soft",
                                                          W_g=Q.T @ W[:, :K])[1])
    np.testing.assert_allclose(eZ, move(dZ), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(eW, Q.T @ dW, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- E3, E4 identities
@settings(max_examples=25)
@given(features(), eps_st, st.floats(0.5, 3.0))
def test_order_one_is_cosine_alignment(shape, eps, scale):
    """-mu T_1(C) = -mu lam sum_i cos(u1_i, u2_i); MEC's loss L / (mu lam m) is then
    -(1/m) sum_i cos, independent of eps."""
    m, d, seed = shape
    U1, U2 = two_views(m, d, seed)
    lam, mu = consts(m, d, eps)
    cos = np.sum(unit(U1) * unit(U2), axis=1)
    L = quiet(mec_loss, scale * U1, U2, eps, order=1)[0]
    np.testing.assert_allclose(L, -mu * lam * cos.sum(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L / (mu * lam * m), -cos.mean(), rtol=1e-12, atol=1e-12)


@settings(max_examples=25)
@given(features(), eps_st, st.sampled_from([None, 1, 2, 4, 5]))
def test_mec_symmetric_in_views(shape, eps, order):
    """det(A) = det(A^T) and tr(C^k) = tr((C^T)^k): MEC's mean over the two view orders is the
    value itself, and the gradients swap with the views."""
    m, d, seed = shape
    U1, U2 = two_views(m, d, seed)
    if order is None:
        assume(det_margin(U1, U2, eps) > 0.05)
    L12, c12 = quiet(mec_loss, U1, U2, eps, order=order)
    L21, c21 = quiet(mec_loss, U2, U1, eps, order=order)
    np.testing.assert_allclose(L12, L21, rtol=1e-10, atol=1e-10)
    g1, g2 = mec_loss_backward(c12)
    h2, h1 = mec_loss_backward(c21)
    np.testing.assert_allclose(g1, h1, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(g2, h2, rtol=1e-9, atol=1e-10)


@settings(max_examples=20)
@given(features(), st.floats(0.1, 0.9))
def test_taylor_converges_within_bound(shape, rho_target):
    """For rho = rho(C) < 1, r = min(m, d), n = order (E4):
    |L_n - L| <= mu r rho^(n+1) / ((n+1)(1-rho)),
    ||dZ1_n - dZ1||_F <= mu lam ||C^n||_2 ||(I+C)^{-1}||_2 ||Z2||_F (and the same for Z2)."""
    m, d, seed = shape
    U1, U2 = two_views(m, d, seed)
    Z1, Z2 = unit(U1), unit(U2)
    rho1 = np.max(np.abs(np.linalg.eigvals(consts(m, d, 1.0)[0] * Z1 @ Z2.T)))
    assume(rho1 > 1e-3)
    eps = float(np.sqrt(rho1 / rho_target))  # rho scales as 1/eps^2
    lam, mu = consts(m, d, eps)
    C = lam * Z1 @ Z2.T
    rho = np.max(np.abs(np.linalg.eigvals(C)))
    Minv = np.linalg.inv(np.eye(m) + C)  # reference only
    L, cache = mec_loss(Z1, Z2, eps, normalize=False)
    g1, g2 = mec_loss_backward(cache)
    r = min(m, d)
    for n in [*range(1, 9), 20, 60]:   # the bound goes to 0 with n: convergence
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)  # rho < 1: no warning
            Ln, cache = mec_loss(Z1, Z2, eps, order=n, normalize=False)
        h1, h2 = mec_loss_backward(cache)
        bound = mu * r * rho ** (n + 1) / ((n + 1) * (1 - rho))
        assert abs(Ln - L) <= bound * (1 + 1e-9) + 1e-12
        gbound = mu * lam * np.linalg.norm(np.linalg.matrix_power(C, n), 2) * np.linalg.norm(Minv, 2)
        assert np.linalg.norm(h1 - g1) <= gbound * np.linalg.norm(Z2) * (1 + 1e-9) + 1e-12
        assert np.linalg.norm(h2 - g2) <= gbound * np.linalg.norm(Z1) * (1 + 1e-9) + 1e-12


@settings(max_examples=40)
@given(features(max_dim=8), eps_st, st.floats(0.1, 3.0))
def test_mec_exact_matches_slogdet(shape, eps, noise):
    """The exact form is -mu log det(I_m + lam Z1 Z2^T) on whichever side it is computed, and
    raises exactly when that determinant is not positive (strongly disagreeing views)."""
    m, d, seed = shape
    U1, U2 = two_views(m, d, seed, noise)
    lam, mu = consts(m, d, eps)
    sign, logdet = np.linalg.slogdet(np.eye(m) + lam * unit(U1) @ unit(U2).T)
    if sign > 0:
        np.testing.assert_allclose(mec_loss(U1, U2, eps)[0], -mu * logdet, rtol=1e-9, atol=1e-9)
    else:
        with pytest.raises(MecrefError, match=r"det\(I \+ C\)"):
            mec_loss(U1, U2, eps)


def test_taylor_gradient_is_truncated_neumann(rng):
    """S_n = (I - (-C)^n)(I + C)^{-1} exactly: the order-n gradient differs from the exact one
    by -mu lam ((-C)^n (I+C)^{-1})^T Z2, whatever rho."""
    m, d, eps = 5, 7, 0.6
    Z1, Z2 = unit(rng.standard_normal((m, d))), unit(rng.standard_normal((m, d)))
    lam, mu = consts(m, d, eps)
    C = lam * Z1 @ Z2.T
    Minv = np.linalg.inv(np.eye(m) + C)
    g1, _ = mec_loss_backward(mec_loss(Z1, Z2, eps, normalize=False)[1])
    for n in (1, 3, 6):
        h1, _ = mec_loss_backward(quiet(mec_loss, Z1, Z2, eps, order=n, normalize=False)[1])
        R = np.linalg.matrix_power(-C, n) @ Minv
        np.testing.assert_allclose(g1 - h1, -mu * lam * R.T @ Z2, rtol=1e-9, atol=1e-9)


def test_convergence_warning_and_strict(rng):
    """Collapsed views: C = lam 1 1^T, rho = lam m = d / eps^2."""
    m, d = 6, 4
    v = rng.standard_normal((1, d))
    Z = np.repeat(v, m, axis=0)
    eps = 1.0                       # rho = 4
    with pytest.warns(ConvergenceWarning, match=r"spectral radius .* is 4 >= 1") as rec:
        mec_loss(Z, Z, eps, order=4)
    assert "eps > 2 makes it converge" in str(rec[0].message)
    with pytest.raises(MecrefError, match="spectral radius"):
        mec_loss(Z, Z, eps, order=4, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mec_loss(Z, Z, 2.01, order=4, strict=True)  # the suggested eps converges
        mec_loss(Z, Z, eps, order=None, strict=True)  # the exact form has no series


@pytest.mark.parametrize("lam_value,warns", [(0.9, False), (1.1, True)])
def test_convergence_check_uses_the_spectral_radius(lam_value, warns, rng):
    """Orthonormal rows, Z1 = Z2: C = lam I_m has ||C^j||_F^(1/j) = lam m^(1/2j) > 1 for
    lam = 0.9 (the cheap bound fails), but rho = lam: warn only when lam >= 1."""
    m, d = 4, 6
    Z = np.linalg.qr(rng.standard_normal((d, m)))[0].T
    eps = float(np.sqrt(d / (m * lam_value)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mec_loss(Z, Z, eps, order=4)
    assert any(issubclass(w.category, ConvergenceWarning) for w in rec) == warns


def test_exact_form_rejects_nonpositive_determinant(rng):
    v = rng.standard_normal((1, 3))
    Z = np.repeat(v, 5, axis=0)
    with pytest.raises(MecrefError, match=r"det\(I \+ C\).*negative"):
        mec_loss(Z, -Z, 0.5)    # C = -lam 1 1^T, det = 1 - lam m < 0


# ----------------------------------------------------------------------------- E5 identities
def moe_gates(U, K, gate, W_g, tau, normalize):
    """Unit (or raw) rows Z, norms r and gates pi (m, K), routing written differently (E5)."""
    m, d = U.shape
    r = np.linalg.norm(U, axis=1)
    Z = U / r[:, None] if normalize else U
    if gate == "norm":
        rank = np.empty(m, dtype=int)
        rank[np.argsort(r, kind="stable")] = np.arange(m)
        pi = np.zeros((m, K))
        pi[np.arange(m), rank * K // m] = 1.0        # rank j goes to expert floor(j K / m)
    else:
        S = Z @ W_g / tau
        pi = np.exp(S - S.max(axis=1, keepdims=True))
        pi /= pi.sum(axis=1, keepdims=True)
    return Z, r, pi


def moe_eps_k(U, eps, K, gate="norm", W_g=None, tau=1.0, normalize=True):
    """eps_k = eps * rbar_k / rbar, (K,)."""
    _, r, pi = moe_gates(U, K, gate, W_g, tau, normalize)
    return eps * (pi.T @ r / pi.sum(axis=0)) / r.mean()


def moe_reference(U, eps, K, gate="norm", W_g=None, tau=1.0, normalize=True, eps_k=None):
    """L_moe by NumPy directly on the d x d side, routing written differently (E5); eps_k
    (K,) given are used as constants instead of eps * rbar_k / rbar."""
    m, d = U.shape
    Z, r, pi = moe_gates(U, K, gate, W_g, tau, normalize)
    if eps_k is None:
        eps_k = moe_eps_k(U, eps, K, gate, W_g, tau, normalize)
    L = 0.0
    for k in range(K):
        mk = pi[:, k].sum()
        a_k = d / (mk * eps_k[k] ** 2)
        B = np.eye(d) + a_k * Z.T @ (pi[:, k:k + 1] * Z)
        L += (mk + d) / 2 * np.linalg.slogdet(B)[1] - mk * np.log(mk / m)
    return L


@settings(max_examples=30)
@given(features(max_dim=8), eps_st, st.data(), st.sampled_from(["norm", "soft"]), st.booleans())
def test_moe_matches_reference(shape, eps, data, gate, normalize):
    m, d, seed = shape
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((m, d)) * rng.lognormal(0.0, 1.0, (m, 1))
    K = data.draw(st.integers(1, m), label="experts")
    W = rng.standard_normal((d, K)) if gate == "soft" else None
    L = moe_coding_length(U, eps, experts=K, gate=gate, W_g=W, normalize=normalize)[0]
    np.testing.assert_allclose(L, moe_reference(U, eps, K, gate, W, 1.0, normalize),
                               rtol=1e-10, atol=1e-10)


@settings(max_examples=25)
@given(features(), eps_st, st.booleans())
def test_moe_single_expert_is_coding_length(shape, eps, normalize):
    m, d, seed = shape
    U = np.random.default_rng(seed).standard_normal((m, d)) * 3.0
    L, cache = coding_length(U, eps, normalize=normalize)
    g = coding_length_backward(cache)
    for scale_grad in (False, True):           # K = 1: eps_1 = eps, the scale term vanishes
        hard = moe_coding_length(U, eps, experts=1, normalize=normalize, scale_grad=scale_grad)
        soft = moe_coding_length(U, eps, experts=1, gate="soft", W_g=np.ones((d, 1)),
                                 normalize=normalize, scale_grad=scale_grad)
        fixed = moe_coding_length(U, eps, experts=1, normalize=normalize, expert_eps=np.array([eps]))
        assert hard[0] == L and soft[0] == L and fixed[0] == L   # the same numbers, not just close
        dZ, _ = moe_coding_length_backward(hard[1])
        eZ, eW = moe_coding_length_backward(soft[1])
        fZ, _ = moe_coding_length_backward(fixed[1])
        np.testing.assert_allclose(dZ, g, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(eZ, g, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fZ, g, rtol=1e-10, atol=1e-12)
        assert np.all(eW == 0)                 # one expert: the gate is constant


@settings(max_examples=30)
@given(features(max_dim=9), st.floats(0.01, 10.0), st.data())
def test_fischer_inequality_hard_routing(shape, a, data):
    """For a partition of the samples (hard routing) and one common a:
    sum_k logdet(I_d + a Z^T Pi_k Z) >= logdet(I_d + a Z^T Z)  (Fischer, on the m x m side,
    whose diagonal blocks are the experts' I + a Z_k Z_k^T)."""
    m, d, seed = shape
    rng = np.random.default_rng(seed)
    Z = unit(rng.standard_normal((m, d)))
    K = data.draw(st.integers(1, m), label="experts")
    groups = np.array_split(np.argsort(np.linalg.norm(rng.standard_normal((m, d)), axis=1)), K)
    parts = sum(float(E._gram_logdet(Z[g], a)[1]) for g in groups)
    whole = float(E._gram_logdet(Z, a)[1])
    assert parts >= whole - 1e-10 * max(1.0, abs(whole))


def test_hard_routing_gives_heavy_tail_its_own_expert(rng):
    """m = 6, K = 2: rows 0, 2, 4 (norms 10, 20, 30) form one expert, rows 1, 3, 5 (norms 1,
    2, 3) the other, each with eps_k = eps * (its mean norm) / (mean norm)."""
    m, d, eps = 6, 4, 0.8
    Z = unit(rng.standard_normal((m, d)))
    norms = np.array([10.0, 1.0, 20.0, 2.0, 30.0, 3.0])
    U = norms[:, None] * Z
    expected = 0.0
    for rows in ([1, 3, 5], [0, 2, 4]):
        mk = len(rows)
        eps_k = eps * norms[rows].mean() / norms.mean()
        a_k = d / (mk * eps_k ** 2)
        expected += (mk + d) / 2 * np.linalg.slogdet(np.eye(mk) + a_k * Z[rows] @ Z[rows].T)[1]
        expected -= mk * np.log(mk / m)
    np.testing.assert_allclose(moe_coding_length(U, eps, experts=2)[0], expected, rtol=1e-12)


def test_moe_rejects_an_all_zero_expert():
    U = np.zeros((4, 3))
    U[2:] = 1.0
    with pytest.raises(MecrefError, match="zero norm"):
        moe_coding_length(U, 1.0, experts=2, normalize=False)


# ----------------------------------------------------------------------------- dtype and backends
def all_pairs(eps, K):
    """Every forward (called as fwd(Z1, Z2, W_g)) with its backward (returning a tuple)."""
    return [
        (lambda A, B, W: coding_length(A, eps), lambda c: (coding_length_backward(c),)),
        (lambda A, B, W: mec_loss(A, B, eps), mec_loss_backward),
        (lambda A, B, W: quiet(mec_loss, A, B, eps, order=4), mec_loss_backward),
        (lambda A, B, W: moe_coding_length(A, eps, experts=K), moe_coding_length_backward),
        (lambda A, B, W: moe_coding_length(A, eps, experts=K, gate="soft", W_g=W), moe_coding_length_backward),
    ]


@pytest.mark.parametrize("m,d", [(32, 16), (16, 32)])
def test_float32_in_float32_out(m, d, rng):
    U1, U2 = two_views(m, d, 3)
    W = rng.standard_normal((d, 3))
    for fwd, bwd in all_pairs(2.0, 3):
        L32, c32 = fwd(U1.astype(np.float32), U2.astype(np.float32), W.astype(np.float32))
        L64, c64 = fwd(U1, U2, W)
        assert L32.dtype == np.float32
        np.testing.assert_allclose(float(L32), float(L64), rtol=1e-4)
        for a, b in zip(bwd(c32), bwd(c64)):
            if b is None:
                assert a is None
                continue
            assert a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * np.abs(b).max())


@pytest.mark.parametrize("m,d", [(6, 4), (4, 6)])
def test_backends_agree(backend, m, d, rng):
    """Each pair, and the options of the MOE form, on to_backend(Z, backend) against the
    float64 NumPy result, on both sides of the Gram matrix (m > d and m < d)."""
    U1, U2 = two_views(m, d, 11)
    W = rng.standard_normal((d, 2))
    on = lambda X: to_backend(X, backend)
    same_place = lambda X, A: X if isinstance(A, np.ndarray) else on(X)
    moe = moe_coding_length
    options = [
        (lambda A, B, W: moe(A, 1.5, experts=2, scale_grad=True), moe_coding_length_backward),
        (lambda A, B, W: moe(A, 1.5, experts=2, normalize=False), moe_coding_length_backward),
        (lambda A, B, W: moe(A, 1.5, experts=2, gate="soft", W_g=W, scale_grad=True),
         moe_coding_length_backward),
        (lambda A, B, W: moe(A, 1.5, experts=2, expert_eps=same_place(np.array([1.0, 2.0]), A)),
         moe_coding_length_backward),
        (lambda A, B, W: mec_loss(A, B, 1.5, normalize=False), mec_loss_backward),
        (lambda A, B, W: coding_length(A, 1.5, normalize=False),
         lambda c: (coding_length_backward(c),)),
    ]
    for fwd, bwd in all_pairs(1.5, 2) + options:
        L, c = fwd(on(U1), on(U2), on(W))
        L0, c0 = fwd(U1, U2, W)
        np.testing.assert_allclose(float(L), float(L0), rtol=1e-10)
        for a, b in zip(bwd(c), bwd(c0)):
            if b is None:
                assert a is None
            else:
                np.testing.assert_allclose(to_host(a), b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- bad input
Z0 = np.random.default_rng(0).standard_normal((5, 3))
W0 = np.ones((3, 2))
_nan = Z0.copy()
_nan[1, 2] = np.nan
_zero = Z0.copy()
_zero[3] = 0.0

BAD = [
    (lambda: coding_length(Z0[0], 1.0), MecrefError, "Z must be 2-dimensional"),
    (lambda: coding_length(Z0[None], 1.0), MecrefError, "Z must be 2-dimensional"),
    (lambda: coding_length(Z0.tolist(), 1.0), TypeError, "Z must be a numpy/cupy array"),
    (lambda: coding_length(Z0.astype(int), 1.0), TypeError, "Z must be a floating-point"),
    (lambda: coding_length(_nan, 1.0), MecrefError, "Z must be finite"),
    (lambda: coding_length(Z0, 0.0), MecrefError, "eps must be finite and > 0"),
    (lambda: coding_length(Z0, -1.0), MecrefError, "eps must be"),
    (lambda: coding_length(Z0, "1"), TypeError, "eps must be a real number"),
    (lambda: coding_length(_zero, 1.0), MecrefError, r"Z has a zero row \(row 3\)"),
    (lambda: coding_length(Z0, 1.0, normalize="yes"), TypeError, "normalize must be True or False"),
    (lambda: mec_loss(Z0, Z0[:4], 1.0), MecrefError, r"Z2 must have the shape of Z1 \(5, 3\), got \(4, 3\)"),
    (lambda: mec_loss(Z0, Z0.T, 1.0), MecrefError, "Z2 must have the shape"),
    (lambda: mec_loss(Z0[0], Z0, 1.0), MecrefError, "Z1 must be 2-dimensional"),
    (lambda: mec_loss(Z0, _nan, 1.0), MecrefError, "Z2 must be finite"),
    (lambda: mec_loss(_zero, Z0, 1.0), MecrefError, "Z1 has a zero row"),
    (lambda: mec_loss(Z0, _zero, 1.0), MecrefError, "Z2 has a zero row"),
    (lambda: mec_loss(Z0, Z0, 0.0), MecrefError, "eps must be"),
    (lambda: mec_loss(Z0, Z0, 1.0, order=0), MecrefError, "order must be an integer in"),
    (lambda: mec_loss(Z0, Z0, 1.0, order=2.0), TypeError, "order must be an integer"),
    (lambda: mec_loss(Z0, Z0, 1.0, order=2, strict=1), TypeError, "strict must be True or False"),
    (lambda: moe_coding_length(Z0, 1.0, experts=0), MecrefError, r"experts must be an integer in \[1, 5\], got 0"),
    (lambda: moe_coding_length(Z0, 1.0, experts=6), MecrefError, r"experts must be an integer in \[1, 5\], got 6"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2.0), TypeError, "experts must be an integer"),
    (lambda: moe_coding_length(Z0, 1.0, gate="hard"), MecrefError, "gate must be one of"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, gate="soft"), MecrefError, r"W_g must be a \(d, K\)"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, gate="soft", W_g=W0.T), MecrefError,
     r"W_g must have shape \(d, K\) = \(3, 2\), got \(2, 3\)"),
    (lambda: moe_coding_length(Z0, 1.0, experts=3, gate="soft", W_g=W0), MecrefError, "W_g must have shape"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, gate="soft", W_g=W0[0]), MecrefError, "W_g must be 2-dimensional"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, W_g=W0), MecrefError, "W_g is used only with gate='soft'"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, gate="soft", W_g=W0, tau=0.0), MecrefError, "tau must be"),
    (lambda: moe_coding_length(_zero, 1.0, experts=2), MecrefError, "Z has a zero row"),
    (lambda: moe_coding_length(_nan, 1.0), MecrefError, "Z must be finite"),
    (lambda: moe_coding_length(Z0, np.inf), MecrefError, "eps must be"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, scale_grad=1), TypeError,
     "scale_grad must be True or False"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, expert_eps=np.ones(3)), MecrefError,
     r"expert_eps must have shape \(K,\) = \(2,\), got \(3,\)"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, expert_eps=np.ones((2, 1))), MecrefError,
     "expert_eps must be 1-dimensional"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, expert_eps=np.array([1.0, 0.0])), MecrefError,
     r"expert_eps must be > 0, got \[1.0, 0.0\]"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, expert_eps=np.array([1.0, -2.0])), MecrefError,
     "expert_eps must be > 0"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, expert_eps=np.array([1.0, np.nan])), MecrefError,
     "expert_eps must be finite"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, expert_eps=np.array([1.0, 1e-200])), MecrefError,
     "expert_eps = .* gives a_k"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, expert_eps=[1.0, 1.0]), TypeError,
     "expert_eps must be a numpy/cupy array"),
    (lambda: moe_coding_length(Z0, 1.0, experts=2, gate="soft", W_g=W0, expert_eps=np.ones(2)),
     MecrefError, "expert_eps is used only with gate='norm'"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------- extreme scales
@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_normalised_rows_are_scale_free_at_extreme_scales(scale, rng):
    """Rows are l2-normalised, so Z * scale codes exactly like Z even when |u|^2 overflows or
    underflows the dtype; the gradient through the norm scales as 1/scale (E2)."""
    Z = rng.standard_normal((16, 8))
    ref, cache = coding_length(Z, 0.5)
    got, cache_s = coding_length(Z * scale, 0.5)
    assert got == pytest.approx(float(ref), rel=1e-12)
    ref1, _ = mec_loss(Z, Z + 0.1 * rng.standard_normal(Z.shape), 0.5)
    Z32 = Z.astype(np.float32)
    ref32, _ = mec_loss(Z32, 1.01 * Z32, 0.5)
    got32, _ = mec_loss(Z32 * np.float32(1e25), Z32 * np.float32(1.01e25), 0.5)
    assert float(got32) == pytest.approx(float(ref32), rel=1e-5) and float(got32) < 0
    if scale == 1e-200:   # the gradient, 1/scale times that of Z, is representable here
        dZ = coding_length_backward(cache)
        dZs = coding_length_backward(cache_s)
        np.testing.assert_allclose(dZs * scale, dZ, rtol=1e-10, atol=1e-12)


def test_unnormalised_overflow_is_refused_naming_the_view(rng):
    Z = rng.standard_normal((16, 8))
    with pytest.raises(MecrefError, match=r"^Z has entries up to .* normalize=False.*overflows float64"):
        coding_length(Z * 1e200, 0.5, normalize=False)
    Z32 = Z.astype(np.float32) * np.float32(1e25)
    with pytest.raises(MecrefError, match=r"^Z1 has entries up to .*overflows float32"):
        mec_loss(Z32, Z32, 0.5, normalize=False)
    with pytest.raises(MecrefError, match=r"^Z has entries up to"):
        moe_coding_length(Z * 1e200, 0.5, experts=2, normalize=False)


def test_half_precision_is_refused(rng):
    """float16 gave NaN from moe_coding_length on (256, 64) rows: refused with the cast to use."""
    Zh = rng.standard_normal((256, 64)).astype(np.float16)
    for call in (lambda: moe_coding_length(Zh, 0.5), lambda: coding_length(Zh, 0.5),
                 lambda: mec_loss(Zh, Zh, 0.5)):
        with pytest.raises(TypeError, match=r"must be float32 or float64, got float16.*astype"):
            call()


def test_mixed_view_dtypes_are_refused(rng):
    Z = rng.standard_normal((16, 8))
    with pytest.raises(TypeError, match=r"^Z2 must have the dtype of Z1 \(float32\), got float64"):
        mec_loss(Z.astype(np.float32), Z, 0.5)


def test_tiny_eps_on_rank_deficient_float32_names_eps(rng):
    """Rank-4 rows at eps = 1e-4 in float32: I + lam Z Z^T loses its identity to rounding.
    Cholesky's LinAlgError and the 'anti-aligned' verdict on identical views become one
    message naming eps and the remedies; float64 computes the same input."""
    Z = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 32))
    Z32 = Z.astype(np.float32)
    with pytest.raises(MecrefError, match=r"not positive definite in float32 at eps = 0\.0001.*larger eps"):
        coding_length(Z32, 1e-4)
    with pytest.raises(MecrefError, match=r"not positive definite in float32 at eps = 0\.0001"):
        moe_coding_length(Z32, 1e-4)
    with pytest.raises(MecrefError, match=r"negative in float32 \(eps = 0\.0001.*positive in float64.*larger eps"):
        mec_loss(Z32, Z32.copy(), 1e-4)
    assert np.isfinite(float(coding_length(Z, 1e-4)[0]))
    assert np.isfinite(float(mec_loss(Z, Z.copy(), 1e-4)[0]))
