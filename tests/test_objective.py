"""The training objective end to end (derivations T1): the gradient that ``train_step`` applies
is the gradient of CE on both views + beta * L_reg, for every regulariser, on a whole network.

The oracles are independent of mecref's loss code: the cross-entropy and each regulariser are
written below from their formulas (T1, E1-E5) with NumPy's ``slogdet`` and matrix powers, and
differentiated by float64 central differences with respect to the network's parameters.
"""
import numpy as np
import pytest

from mecref import data as mdata
from mecref import nn, optim, train

B = 8            # images per view: m = 8 samples, d = 4 features
WIDTH = (2, 3, 4)
EPS = 2.5        # d / eps^2 = 0.64 < 1: the Taylor series converges for any features (E4)
BETA = 5.0       # large, so the regulariser's share of every gradient is far above tolerance
ORDER = 4
EXPERTS = 2
H = 1e-6         # central-difference step (float64)


# ------------------------------------------------------------------ independent oracles
def _ce(logits, y):
    """Mean cross-entropy: log sum_k exp(l_k) - l_y, averaged over rows."""
    z = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def _unit(Z):
    return Z / np.linalg.norm(Z, axis=1, keepdims=True)


def _mec_terms(Z1, Z2, eps):
    m, d = Z1.shape
    lam, mu = d / (m * eps ** 2), (m + d) / 2
    return lam * _unit(Z1) @ _unit(Z2).T, mu, m


def _reg_mec(Z1, Z2, frozen):
    """(1/m) L_MEC = -(mu/m) logdet(I_m + lam U1 U2^T)   (T1, E3)"""
    C, mu, m = _mec_terms(Z1, Z2, EPS)
    sign, logdet = np.linalg.slogdet(np.eye(m) + C)
    assert sign > 0
    return -mu * logdet / m


def _reg_mec_taylor(Z1, Z2, frozen):
    """-(mu/m) sum_{k=1}^{n} (-1)^{k+1} tr(C^k) / k   (T1, E4)"""
    C, mu, m = _mec_terms(Z1, Z2, EPS)
    T = sum((-1) ** (k + 1) * np.trace(np.linalg.matrix_power(C, k)) / k for k in range(1, ORDER + 1))
    return -mu * T / m


def _moe_experts(Z):
    """Hard routing by norm rank: the sample of rank j goes to expert floor(j K / m)   (E5)."""
    m = Z.shape[0]
    order = np.argsort(np.linalg.norm(Z, axis=1), kind="stable")
    expert = np.empty(m, dtype=int)
    expert[order] = np.arange(m) * EXPERTS // m
    return [np.flatnonzero(expert == k) for k in range(EXPERTS)]


def _moe_eps(Z):
    """eps_k = eps * mean_k(r) / mean(r), r the raw row norms   (E5)."""
    r = np.linalg.norm(Z, axis=1)
    return [EPS * r[idx].mean() / r.mean() for idx in _moe_experts(Z)]


def _moe_length(Z, eps_k):
    """sum_k (m_k + d)/2 logdet(I_d + d/(m_k eps_k^2) U_k^T U_k) - m_k log(m_k / m)   (E5)."""
    m, d = Z.shape
    U, L = _unit(Z), 0.0
    for idx, e in zip(_moe_experts(Z), eps_k):
        mk = len(idx)
        sign, logdet = np.linalg.slogdet(np.eye(d) + d / (mk * e ** 2) * U[idx].T @ U[idx])
        assert sign > 0
        L += (mk + d) / 2 * logdet - mk * np.log(mk / m)
    return L


def _reg_moe(Z1, Z2, frozen):
    """-(L_moe(Z1) + L_moe(Z2)) / (2m), the eps_k held at the base point's values (E5: the
    default backward treats them as constants of the batch)."""
    return -(_moe_length(Z1, frozen[0]) + _moe_length(Z2, frozen[1])) / (2 * Z1.shape[0])


def _freeze_moe(Z1, Z2):
    return (_moe_eps(Z1), _moe_eps(Z2))


# name -> (L_reg(Z1, Z2, frozen), what to freeze at the base point)
ORACLES = {
    None: (lambda Z1, Z2, frozen: 0.0, lambda Z1, Z2: None),
    "mec": (_reg_mec, lambda Z1, Z2: None),
    "mec_taylor": (_reg_mec_taylor, lambda Z1, Z2: None),
    "moe": (_reg_moe, _freeze_moe),
}


def _oracle(reg):
    if reg not in ORACLES:
        pytest.fail(f"regulariser {reg!r} is registered in mecref.train but has no independent "
                    f"oracle in tests/test_objective.py: write its formula into ORACLES")
    return ORACLES[reg]


# ------------------------------------------------------------------ the setting
def _cfg(reg, quantizer="fp32", beta=BETA):
    return train.TrainConfig(quantizer=quantizer, w_bits=2, a_bits=2, reg=reg, reg_weight=beta,
                             eps=EPS, order=ORDER, experts=EXPERTS, width=WIDTH).validate()


def _model(cfg, seed=3):
    return nn.small_cnn(**cfg.model_config(), seed=seed).astype(np.float64)


def _batch():
    ds = mdata.load_bundled()
    xb = mdata.normalize(ds.x_train[:B]).astype(np.float64)
    return xb, ds.y_train[:B].astype(np.int64)


def _views(xb, seed=0):
    return mdata.two_views(xb, np.random.default_rng(seed))


def _objective(model, x1, x2, yb, reg, beta, frozen):
    """(CE, L_reg) at the model's current parameters, by the oracles above."""
    logits, h = model.forward(np.concatenate([x1, x2]), train=True)
    assert (np.abs(h).sum(axis=1) > 0).all(), "a dead feature row: the objective has a kink there"
    return _ce(logits, np.concatenate([yb, yb])), _oracle(reg)[0](h[:B], h[B:], frozen)


def _frozen(model, x1, x2, reg):
    _, h = model.forward(np.concatenate([x1, x2]), train=True)
    return _oracle(reg)[1](h[:B], h[B:])


def _sample(model, per_param=3, seed=0):
    """(name, layer, key, flat index): a few entries of every parameter."""
    rng = np.random.default_rng(seed)
    out = []
    for name, layer, key in model.named_params():
        size = layer.params[key].size
        for i in rng.choice(size, size=min(per_param, size), replace=False):
            out.append((name, layer, key, int(i)))
    return out


def _central_difference(model, entries, fn):
    """d fn / d p for each sampled entry, by (fn(p + h) - fn(p - h)) / 2h in float64."""
    fd = []
    for _, layer, key, i in entries:
        p = layer.params[key].reshape(-1)
        old = p[i]
        p[i] = old + H
        up = fn()
        p[i] = old - H
        down = fn()
        p[i] = old
        fd.append((up - down) / (2 * H))
    return np.array(fd)


def _grads(model):
    return {name: layer.grads[key].copy() for name, layer, key in model.named_params()}


# ------------------------------------------------------------------ 1. the objective's gradient
@pytest.mark.parametrize("reg", list(train.REGULARIZERS))
def test_train_gradient_is_the_gradient_of_the_whole_objective(reg):
    cfg = _cfg(reg)
    model = _model(cfg)
    xb, yb = _batch()
    x1, x2 = _views(xb)
    frozen = _frozen(model, x1, x2, reg)
    parts = train.loss_and_grads(model, x1, x2, yb, cfg)
    ce, L_reg = _objective(model, x1, x2, yb, reg, BETA, frozen)
    # the loss train reports is the objective of T1, written independently
    assert parts["ce"] == pytest.approx(ce, rel=1e-12)
    assert parts["reg"] == pytest.approx(L_reg, rel=1e-10, abs=1e-14)
    assert parts["loss"] == pytest.approx(ce + BETA * L_reg, rel=1e-10)
    grads = _grads(model)

    entries = _sample(model)
    fd = _central_difference(model, entries, lambda: sum(
        np.array(_objective(model, x1, x2, yb, reg, BETA, frozen)) * [1.0, BETA]))
    analytic = np.array([grads[name].reshape(-1)[i] for name, _, _, i in entries])
    scale = np.abs(fd).max()
    np.testing.assert_allclose(analytic, fd, rtol=1e-5, atol=1e-7 * scale)

    if reg is not None:  # the regulariser's part is far above the tolerance: dropping it fails
        fd_ce = _central_difference(
            model, entries, lambda: _objective(model, x1, x2, yb, reg, BETA, frozen)[0])
        assert np.abs(fd - fd_ce).max() > 1e-2 * scale


# ------------------------------------------------------------------ 2. quantized: it reaches every layer
@pytest.mark.parametrize("reg", [r for r in train.REGULARIZERS if r is not None])
def test_quantized_network_gets_the_regularisers_feature_gradient(reg):
    """A fake-quantized network is piecewise constant in its weights, so no finite differences
    there: the regulariser is smooth in the features h, and T1 says train adds
    beta * dL_reg/dh at h. So grads(beta) - grads(0) = backward(0, beta * dL_reg/dh), with
    dL_reg/dh by central differences of the oracle, and it is non-zero in every layer before h."""
    cfg, cfg0 = _cfg(reg, "lsq"), _cfg(reg, "lsq", beta=0.0)
    model = _model(cfg)
    xb, yb = _batch()
    x1, x2 = _views(xb)
    model.forward(np.concatenate([x1, x2]), train=True)  # initialises the quantizer steps
    train.loss_and_grads(model, x1, x2, yb, cfg0)
    g0 = _grads(model)
    train.loss_and_grads(model, x1, x2, yb, cfg)
    gb = _grads(model)

    logits, h = model.forward(np.concatenate([x1, x2]), train=True)
    fn, freeze = _oracle(reg)
    frozen = freeze(h[:B], h[B:])
    dh = np.zeros_like(h)
    for idx in np.ndindex(*h.shape):
        hp, hm = h.copy(), h.copy()
        hp[idx] += H
        hm[idx] -= H
        dh[idx] = (fn(hp[:B], hp[B:], frozen) - fn(hm[:B], hm[B:], frozen)) / (2 * H)
    model.backward(np.zeros_like(logits), BETA * dh)
    expected = _grads(model)

    for name in gb:
        delta = gb[name] - g0[name]
        if name.startswith("fc."):  # after the features: L_reg does not depend on it
            assert np.array_equal(delta, np.zeros_like(delta)), name
            continue
        # the central differences of dh carry ~1e-10 relative noise, summed by the backward
        np.testing.assert_allclose(delta, expected[name], rtol=1e-6,
                                   atol=1e-6 * np.abs(expected[name]).max(), err_msg=name)
        assert np.abs(delta).max() > 1e-3 * np.abs(gb[name]).max(), name
    assert any(k in gb for k in ("conv2.s_w", "conv2.s_a")), "expected LSQ step parameters"


# ------------------------------------------------------------------ 3. it changes the update
@pytest.mark.parametrize("reg", [r for r in train.REGULARIZERS if r is not None])
def test_regulariser_moves_the_parameters_along_its_own_gradient(reg):
    """One train_step from the same start and the same views, with beta and with beta = 0:
    the first SGD step is p - lr (g + wd p), so the two results differ by exactly
    -lr * beta * dL_reg/dp (central differences of the oracle), and L_reg is lower after it."""
    lr = 0.05
    cfg, cfg0 = _cfg(reg), _cfg(reg, beta=0.0)
    xb, yb = _batch()
    after = {}
    for c in (cfg, cfg0):
        model = _model(c)
        opt = optim.SGD(model, lr=lr, momentum=0.9, weight_decay=5e-4)
        train.train_step(model, opt, xb, yb, np.random.default_rng(7), c, 0)
        after[c.reg_weight] = {name: layer.params[key].copy() for name, layer, key in model.named_params()}

    model = _model(cfg)
    x1, x2 = _views(xb, seed=7)  # the views train_step drew from the same generator
    frozen = _frozen(model, x1, x2, reg)
    entries = _sample(model)
    fd_reg = _central_difference(model, entries, lambda: _objective(model, x1, x2, yb, reg, BETA, frozen)[1])
    delta = np.array([(after[BETA][name] - after[0.0][name]).reshape(-1)[i] for name, _, _, i in entries])
    np.testing.assert_allclose(delta, -lr * BETA * fd_reg, rtol=1e-5,
                               atol=1e-7 * lr * BETA * np.abs(fd_reg).max())
    assert np.abs(delta).max() > 0

    def reg_at(params):
        for name, layer, key in model.named_params():
            layer.params[key][...] = params[name]
        return _objective(model, x1, x2, yb, reg, BETA, frozen)[1]

    assert reg_at(after[BETA]) < reg_at(after[0.0])


# ------------------------------------------------------------------ 4. the placement option (T3)
@pytest.mark.parametrize("reg", [r for r in train.REGULARIZERS if r is not None])
def test_train_gradient_with_the_regulariser_also_at_the_blocks(reg, monkeypatch):
    """reg_at="blocks": CE + beta [L_reg(features; eps) + sum_b L_reg(pool_b rows; eps_b)],
    eps_b = eps sqrt(d_b / d) (T3), written with the same oracles, against central
    differences of every sampled parameter."""
    import sys
    mod, eps0 = sys.modules[__name__], EPS  # the oracles read the module's EPS: set it per place
    cfg = train.TrainConfig(quantizer="fp32", reg=reg, reg_weight=BETA, eps=EPS, order=ORDER,
                            experts=EXPERTS, width=WIDTH, reg_at="blocks").validate()
    model = _model(cfg)
    xb, yb = _batch()
    x1, x2 = _views(xb)
    x = np.concatenate([x1, x2])

    def places():
        logits, h, taps = model.forward(x, train=True, taps=("pool1", "pool2"))
        rows = [h] + [t.reshape(len(t), -1) for t in (taps["pool1"], taps["pool2"])]
        return logits, [(r, eps0 * np.sqrt(r.shape[1] / h.shape[1])) for r in rows]

    def reg_value(rows_eps, frozen):
        total = 0.0
        for (R, eps_b), fr in zip(rows_eps, frozen):
            monkeypatch.setattr(mod, "EPS", eps_b)
            total += _oracle(reg)[0](R[:B], R[B:], fr)
        monkeypatch.setattr(mod, "EPS", eps0)
        return total

    _, rows_eps = places()
    frozen = []
    for R, eps_b in rows_eps:
        monkeypatch.setattr(mod, "EPS", eps_b)
        frozen.append(_oracle(reg)[1](R[:B], R[B:]))
    monkeypatch.setattr(mod, "EPS", eps0)

    def objective():
        logits, rows = places()
        return _ce(logits, np.concatenate([yb, yb])) + BETA * reg_value(rows, frozen)

    parts = train.loss_and_grads(model, x1, x2, yb, cfg)
    assert parts["loss"] == pytest.approx(objective(), rel=1e-10)
    grads = _grads(model)
    entries = _sample(model)
    fd = _central_difference(model, entries, objective)
    analytic = np.array([grads[name].reshape(-1)[i] for name, _, _, i in entries])
    np.testing.assert_allclose(analytic, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())
