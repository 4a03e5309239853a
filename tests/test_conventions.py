"""mecref against the implementations users compare it with (docs/conventions.md), one test per
row: each reference's convention is written out again here, independently, from the formula or
the autograd graph of the cited file (NumPy, float64), and compared with mecref called with the
mapped arguments. A torch version of a row runs when torch is installed (skipped otherwise).

Gradients of a reference that is an autograd graph with stop-gradients (``detach``,
``stop_gradient``, ``torch.no_grad``) are taken by central differences of the same graph with
every stopped quantity frozen at its value at the evaluation point: that is exactly what
autograd differentiates. Points lie at least 0.1 (in units of the step) from every rounding
boundary and clip edge, so the differences are exact up to round-off (docs/derivations.md Q9).
"""
import importlib.util
import math

import numpy as np
import pytest

from mecref.entropy import (
    coding_length, coding_length_backward, mec_loss, mec_loss_backward,
    moe_coding_length, moe_coding_length_backward,
)
from mecref.quant import (
    dorefa_act_quantize, dorefa_act_quantize_backward,
    dorefa_weight_quantize, dorefa_weight_quantize_backward,
    lsq_init_step, lsq_quantize, lsq_quantize_backward,
    lsqplus_quantize, lsqplus_quantize_backward,
    pact_quantize, pact_quantize_backward, ste_quantize, ste_quantize_backward,
)

HAS_TORCH = importlib.util.find_spec("torch") is not None
NEEDS_TORCH = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (python3 -m pip install torch==2.13.0): the "
                          "torch versions of the conventions rows are skipped; the NumPy ones ran")


# ----------------------------------------------------------------------------- helpers
def safe_v(rng, shape, Qn, Qp):
    """v = k + r, k an integer in [Qn - 2, Qp + 2], 0.1 <= |r| <= 0.4: away from every
    half-integer (rounding) and integer (clip edges), covering both outsides and the
    half-step bands where PyTorch's and the LSQ paper's masks differ."""
    k = rng.integers(Qn - 2, Qp + 3, size=shape)
    return k + rng.uniform(0.1, 0.4, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def fd(loss, p, h):
    """Central differences of a scalar loss in every entry of p (float or array)."""
    p = np.array(p, dtype=np.float64)
    g = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        pp, pm = p.copy(), p.copy()
        pp[i] += h
        pm[i] -= h
        g[i] = (loss(pp) - loss(pm)) / (2 * h)
    return g


def unit_rows(U):
    return U / np.linalg.norm(U, axis=1, keepdims=True)


def close(a, b, rtol=1e-7, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=rtol, atol=atol)


# ============================================================================= 1. PyTorch
# pytorch/pytorch aten/src/ATen/native/quantized/FakeQuantPerTensorAffine.cpp and the
# learnable-gradient kernels (cpu/kernels/QuantizedOpKernels.cpp, cuda/FakeQuantizeCore.cu);
# torch/ao/quantization/_learnable_fake_quantize.py for grad_factor.
def torch_rule(x, s, z, qmin, qmax, grad_factor, dy):
    """PyTorch's learnable per-tensor affine fake quantizer, written out: the integer code is
    rounded first (half to even) and then tested against the range; the step's gradient is
    (q_min - z), (q_max - z) outside and (x_fq - x)/s inside; the zero point's is -s outside;
    both times grad_factor; dx is dy where the rounded code is inside."""
    xq = np.rint(x * (1.0 / s)) + z
    inside = (xq >= qmin) & (xq <= qmax)
    y = (np.clip(xq, qmin, qmax) - z) * s
    dx = dy * inside
    dyds = np.where(xq < qmin, qmin - z, np.where(xq > qmax, qmax - z, (y - x) / s))
    dydz = np.where(inside, 0.0, -s)
    return y, dx, grad_factor * np.sum(dy * dyds), grad_factor * np.sum(dy * dydz)


@pytest.mark.parametrize("bits, signed", [(2, False), (4, False), (2, True), (3, True)])
def test_pytorch_fake_quantize_rule(bits, signed):
    rng = np.random.default_rng(bits + 10 * signed)
    Qn, Qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    s, gf = 0.37, 0.21
    x = safe_v(rng, (200,), Qn, Qp) * s
    dy = rng.normal(size=x.shape)
    y_t, dx_t, ds_t, _ = torch_rule(x, s, 0, Qn, Qp, gf, dy)

    # fake_quantize_per_tensor_affine: ste_quantize with the rounded-code mask
    y, c = ste_quantize(x, s, bits, signed=signed, mask="rounded")
    close(y, y_t, atol=1e-12)
    close(ste_quantize_backward(c, dy), dx_t)
    # _fake_quantize_learnable_per_tensor_affine, z = 0: LSQ, mask="rounded", g = grad_factor
    y, c = lsq_quantize(x, s, bits, signed=signed, grad_scale=gf, mask="rounded")
    dx, ds = lsq_quantize_backward(c, dy)
    close(y, y_t, atol=1e-12)
    close(dx, dx_t)
    close(ds, ds_t)
    # the default (LSQ paper) mask differs exactly in the half-step bands
    v = x / s
    band = ((v > Qp) & (v < Qp + 0.5)) | ((v > Qn - 0.5) & (v < Qn))
    assert band.any()
    dx_paper = lsq_quantize_backward(lsq_quantize(x, s, bits, signed=signed)[1], dy)[0]
    close(dx_paper[~band], dx_t[~band])
    assert np.all(dx_paper[band] == 0) and np.all(dx_t[band] != 0)
    # _LearnableFakeQuantize's grad_factor 1/sqrt(numel q_max) is mecref's per-tensor default
    _, c = lsq_quantize(x, s, bits, signed=signed, mask="rounded")
    close(lsq_quantize_backward(c, dy)[1],
          torch_rule(x, s, 0, Qn, Qp, 1 / math.sqrt(x.size * Qp), dy)[2])


def test_pytorch_affine_zero_point_is_lsqplus():
    """An integer zero point z: beta = -z s in lsqplus_quantize (mask="rounded"), and
    ds_torch = ds - z dbeta, dz_torch = -s dbeta (both with grad_scale = grad_factor)."""
    rng = np.random.default_rng(7)
    Qn, Qp, bits = 0, 15, 4
    s, gf = 0.25, 0.5
    for z in (0, 3, 9):
        x = (safe_v(rng, (300,), Qn, Qp) - z) * s
        dy = rng.normal(size=x.shape)
        y_t, dx_t, ds_t, dz_t = torch_rule(x, s, z, Qn, Qp, gf, dy)
        y, c = lsqplus_quantize(x, s, -z * s, bits, grad_scale=gf, mask="rounded")
        dx, ds, dbeta = lsqplus_quantize_backward(c, dy)
        close(y, y_t, atol=1e-12)
        close(dx, dx_t)
        close(ds - z * dbeta, ds_t)
        close(-s * dbeta, dz_t)


def test_pytorch_worked_examples():
    """docs/conventions.md, row PyTorch: the two worked examples, by hand."""
    # 2-bit unsigned, s = 1, x = 3.3: torch dx = 1, ds = 3 - 3.3; mecref default dx = 0, ds = 3
    _, dx_t, ds_t, _ = torch_rule(np.array([3.3]), 1.0, 0, 0, 3, 1.0, np.ones(1))
    assert dx_t[0] == 1.0 and ds_t == pytest.approx(-0.3, abs=1e-12)
    dx, ds = lsq_quantize_backward(lsq_quantize(np.array([3.3]), 1.0, 2, grad_scale=1.0)[1],
                                   np.ones(1))
    assert dx[0] == 0.0 and float(ds) == 3.0
    # 2-bit unsigned, s = 1, z = 2, x = 5.2: code 7 > 3: torch ds = 3 - 2 = 1, dz = -1
    _, dx_t, ds_t, dz_t = torch_rule(np.array([5.2]), 1.0, 2, 0, 3, 1.0, np.ones(1))
    assert (dx_t[0], ds_t, dz_t) == (0.0, 1.0, -1.0)
    _, c = lsqplus_quantize(np.array([5.2]), 1.0, -2.0, 2, grad_scale=1.0, mask="rounded")
    _, ds, dbeta = lsqplus_quantize_backward(c, np.ones(1))
    assert (float(ds), float(dbeta)) == (3.0, 1.0)           # LSQ+: Qp, and 1 outside
    assert float(ds) - 2 * float(dbeta) == 1.0 and -1.0 * float(dbeta) == -1.0


@NEEDS_TORCH
@pytest.mark.parametrize("bits, signed", [(2, False), (3, True), (8, False)])
def test_pytorch_fake_quantize_ops(bits, signed):
    """The ops themselves (float32 only: the learnable backward refuses other dtypes), against
    mecref in float64 on the same float32 inputs."""
    import torch
    rng = np.random.default_rng(bits)
    Qn, Qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    s = np.float32(0.37)
    x = (safe_v(rng, (6, 5, 3, 3), Qn, Qp) * s).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    x64, dy64, s64 = x.astype(np.float64), dy.astype(np.float64), float(s)

    xt = torch.tensor(x, requires_grad=True)
    yt = torch.fake_quantize_per_tensor_affine(xt, float(s), 0, Qn, Qp)
    yt.backward(torch.tensor(dy))
    y, c = ste_quantize(x64, s64, bits, signed=signed, mask="rounded")
    close(yt.detach().numpy(), y, rtol=1e-6, atol=1e-6)
    close(xt.grad.numpy(), ste_quantize_backward(c, dy64), rtol=1e-6, atol=1e-6)

    gf = 1.0 / math.sqrt(x.size * Qp)        # _LearnableFakeQuantize(use_grad_scaling=True)
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor([s], requires_grad=True)
    zt = torch.tensor([0.0], requires_grad=True)
    yt = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, Qn, Qp, gf)
    yt.backward(torch.tensor(dy))
    y, c = lsq_quantize(x64, s64, bits, signed=signed, mask="rounded")   # default g = gf
    dx, ds = lsq_quantize_backward(c, dy64)
    close(yt.detach().numpy(), y, rtol=1e-6, atol=1e-6)
    close(xt.grad.numpy(), dx, rtol=1e-6, atol=1e-6)
    close(st.grad.numpy()[0], ds, rtol=1e-4, atol=1e-6)

    # per channel (axis 0): grad_factor still counts the whole tensor, so mecref needs
    # grad_scale = 1/sqrt(numel Qp); its default 1/sqrt(numel/C Qp) is sqrt(C) larger
    sc = (s * np.exp(rng.uniform(-0.5, 0.5, size=6))).astype(np.float32)
    x = (safe_v(rng, x.shape, Qn, Qp) * sc[:, None, None, None]).astype(np.float32)
    x64 = x.astype(np.float64)
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(sc, requires_grad=True)
    zt = torch.zeros(6, requires_grad=True)
    yt = torch._fake_quantize_learnable_per_channel_affine(xt, st, zt, 0, Qn, Qp, gf)
    yt.backward(torch.tensor(dy))
    s4 = sc.astype(np.float64)[:, None, None, None]
    y, c = lsq_quantize(x64, s4, bits, signed=signed, grad_scale=gf, mask="rounded")
    dx, ds = lsq_quantize_backward(c, dy64)
    close(yt.detach().numpy(), y, rtol=1e-6, atol=1e-6)
    close(xt.grad.numpy(), dx, rtol=1e-6, atol=1e-6)
    close(st.grad.numpy(), ds.ravel(), rtol=1e-4, atol=1e-6)
    ds_default = lsq_quantize_backward(lsq_quantize(x64, s4, bits, signed=signed,
                                                    mask="rounded")[1], dy64)[1]
    close(ds_default, math.sqrt(6) * ds, rtol=1e-12)


# ============================================================================= 2. lsq-net
# zhutmost/lsq-net quan/quantizer/lsq.py (LsqQuan): s scaled by grad_scale(s, 1/sqrt(thd_pos
# numel)) through a detach, x/s clamped to [thd_neg, thd_pos], round_pass (detach), times s.
def lsqnet_graph(x, s, thd_neg, thd_pos, x0, s0):
    """LsqQuan's forward graph with its two stopped quantities frozen at (x0, s0): value at
    (x0, s0) is the forward, derivative is what autograd gives."""
    g = 1.0 / math.sqrt(thd_pos * x0.size)        # the same for per_channel True and False
    s_eff = s * g + (s0 - s0 * g)                 # grad_scale: value s, gradient g
    u0 = np.clip(x0 / s0, thd_neg, thd_pos)
    u = np.clip(x / s_eff, thd_neg, thd_pos)
    return (u + (np.round(u0) - u0)) * s_eff      # round_pass: value round(u), gradient 1


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits, all_positive", [(2, True), (4, True), (3, False), (8, False)])
def test_lsqnet(bits, all_positive, per_channel):
    rng = np.random.default_rng(bits)
    Qn, Qp = (0, 2 ** bits - 1) if all_positive else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    C = 4
    shape = (C, 3, 2, 2)
    s = (0.3 * np.exp(rng.uniform(-0.5, 0.5, size=(C, 1, 1, 1))) if per_channel
         else np.asarray(0.3))
    x = safe_v(rng, shape, Qn, Qp) * s
    dy = rng.normal(size=shape)
    loss_x = lambda xx: np.sum(dy * lsqnet_graph(xx, s, Qn, Qp, x, s))
    loss_s = lambda ss: np.sum(dy * lsqnet_graph(x, ss, Qn, Qp, x, s))
    dx_ref = fd(loss_x, x, 1e-6 * float(np.min(s)))
    ds_ref = fd(loss_s, s, 1e-3 * float(np.min(s)))     # s_eff moves by g times this
    y_ref = lsqnet_graph(x, s, Qn, Qp, x, s)

    g_lsqnet = 1.0 / math.sqrt(Qp * x.size)
    y, c = lsq_quantize(x, s, bits, signed=not all_positive, grad_scale=g_lsqnet)
    dx, ds = lsq_quantize_backward(c, dy)
    close(y, y_ref, atol=1e-12)
    close(dx, dx_ref, rtol=1e-6, atol=1e-8)
    close(ds, ds_ref, rtol=1e-6, atol=1e-8)
    # the default gradient scale counts the elements per step: the same per tensor, sqrt(C)
    # larger per channel
    ds_default = lsq_quantize_backward(lsq_quantize(x, s, bits, signed=not all_positive)[1], dy)[1]
    close(ds_default, (math.sqrt(C) if per_channel else 1.0) * ds, rtol=1e-12)
    # init_from: 2 mean|x| / sqrt(thd_pos), over all axes but 0 per channel
    mean_abs = (np.abs(x).reshape(C, -1).mean(1).reshape(C, 1, 1, 1) if per_channel
                else np.abs(x).mean())
    close(lsq_init_step(x, bits, signed=not all_positive, per_channel=per_channel),
          2 * mean_abs / math.sqrt(Qp), rtol=1e-12)


def test_lsqnet_symmetric_range():
    """LsqQuan(symmetric=True) uses [-(2^(b-1) - 1), 2^(b-1) - 1]: mecref's restricted=True.
    Worked example (3 bits, s = 1, g = 1, x = -3.8): lsq-net -3, dx 0, ds -3; mecref's full
    signed range -4, dx 1, ds -4 + 3.8 = -0.2."""
    x, s = np.array([-3.8]), np.asarray(1.0)
    g = math.sqrt(3 * 1)                            # undo lsq-net's g for a readable ds
    y_ref = lsqnet_graph(x, s, -3, 3, x, s)
    ds_ref = g * fd(lambda ss: np.sum(lsqnet_graph(x, ss, -3, 3, x, s)), s, 1e-7)
    dx_ref = fd(lambda xx: np.sum(lsqnet_graph(xx, s, -3, 3, x, s)), x, 1e-7)
    close(y_ref, [-3.0])
    close(dx_ref, [0.0], atol=1e-8)
    close(ds_ref, -3.0, rtol=1e-6)
    y, c = lsq_quantize(x, 1.0, 3, signed=True, grad_scale=1.0)
    dx, ds = lsq_quantize_backward(c, np.ones(1))
    assert y[0] == -4.0 and dx[0] == 1.0
    close(ds, -0.2, rtol=1e-12)
    y, c = lsq_quantize(x, 1.0, 3, signed=True, grad_scale=1.0, restricted=True)
    dx, ds = lsq_quantize_backward(c, np.ones(1))
    assert y[0] == -3.0 and dx[0] == 0.0 and float(ds) == -3.0

    # the whole quantizer, per channel, 2..4 bits
    rng = np.random.default_rng(11)
    for bits in (2, 3, 4):
        Qp = 2 ** (bits - 1) - 1
        s = 0.3 * np.exp(rng.uniform(-0.5, 0.5, size=(3, 1)))
        x = safe_v(rng, (3, 20), -Qp, Qp) * s
        dy = rng.normal(size=x.shape)
        g = 1.0 / math.sqrt(Qp * x.size)
        y, c = lsq_quantize(x, s, bits, signed=True, grad_scale=g, restricted=True)
        dx, ds = lsq_quantize_backward(c, dy)
        close(y, lsqnet_graph(x, s, -Qp, Qp, x, s), atol=1e-12)
        close(dx, fd(lambda xx: np.sum(dy * lsqnet_graph(xx, s, -Qp, Qp, x, s)), x, 1e-7),
              rtol=1e-6, atol=1e-8)
        close(ds, fd(lambda ss: np.sum(dy * lsqnet_graph(x, ss, -Qp, Qp, x, s)), s, 1e-3 * 0.3),
              rtol=1e-6, atol=1e-8)


@NEEDS_TORCH
def test_lsqnet_torch_autograd():
    """LsqQuan's graph in torch (written here from the file), float64, per channel."""
    import torch
    rng = np.random.default_rng(3)
    bits, Qn, Qp, C = 3, -4, 3, 5
    s = 0.2 * np.exp(rng.uniform(-0.5, 0.5, size=(C, 1)))
    x = safe_v(rng, (C, 7), Qn, Qp) * s
    dy = rng.normal(size=x.shape)
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(s, requires_grad=True)
    g = 1.0 / math.sqrt(Qp * x.size)
    s_eff = (st - st * g).detach() + st * g
    u = torch.clamp(xt / s_eff, Qn, Qp)
    y = ((u.round() - u).detach() + u) * s_eff
    y.backward(torch.tensor(dy))
    yy, c = lsq_quantize(x, s, bits, signed=True, grad_scale=g)
    dx, ds = lsq_quantize_backward(c, dy)
    close(y.detach().numpy(), yy, atol=1e-12)
    close(xt.grad.numpy(), dx, atol=1e-12)
    close(st.grad.numpy(), ds, rtol=1e-10)


# ============================================================================= 3. MEC (official)
# xinliu20/MEC main_pretrain.py (loss_func, train: the loss and the lamda warm-up) and
# mec/builder.py (the teacher branch under torch.no_grad).
def mec_official_trace(p, z, lamda_inv, order=4):
    """loss_func: rows l2-normalised, c = p z^T / lamda_inv, trace of sum_k (-1)^(k+1) c^k / k."""
    p, z = unit_rows(p), unit_rows(z)
    c = p @ z.T / lamda_inv
    P, S = c, np.zeros_like(c)
    for k in range(1, order + 1):
        if k > 1:
            P = P @ c
        S += (1 if k % 2 else -1) * P / k
    return np.trace(S)


def mec_official_loss(z1, z2, p1, p2, eps_arg, warm=1.0):
    """The training loss of main_pretrain.py: with m the batch, d = dim, lamda =
    1/(m eps_arg/d) (eps_arg is the squared epsilon), lamda_inv = warm/lamda during warm-up
    (warm from 8 to 1): -lamda_inv (T(p1, z2) + T(p2, z1)) / 2 / m."""
    m, d = z1.shape
    lamda_inv = warm * m * eps_arg / d
    t = (mec_official_trace(p1, z2, lamda_inv) + mec_official_trace(p2, z1, lamda_inv)) * 0.5 / m
    return -t * lamda_inv, t * (m + d) / 2          # (loss, the logged per-sample "MEC")


@pytest.mark.parametrize("m, d, eps_arg, warm", [(6, 4, 64.0, 1.0), (5, 9, 36.0, 8.0),
                                                 (8, 8, 100.0, 3.5)])
def test_mec_official(m, d, eps_arg, warm):
    rng = np.random.default_rng(m + d)
    z1, z2 = rng.normal(size=(m, d)), rng.normal(size=(m, d))
    p1, p2 = z1 + 0.3 * rng.normal(size=(m, d)), z2 + 0.3 * rng.normal(size=(m, d))
    eps = math.sqrt(eps_arg * warm)               # mecref's eps: the square root, warm-up included
    lam, mu = d / (m * eps ** 2), (m + d) / 2
    L12, c12 = mec_loss(p1, z2, eps, order=4)
    L21, c21 = mec_loss(p2, z1, eps, order=4)
    loss, logged = mec_official_loss(z1, z2, p1, p2, eps_arg, warm)
    close(loss, 0.5 * (float(L12) + float(L21)) / (mu * lam * m), rtol=1e-12)
    close(logged, -0.5 * (float(L12) + float(L21)) / m, rtol=1e-12)

    # the student gets the gradient; the teacher's p is a constant (torch.no_grad)
    dz2_ref = fd(lambda zz: mec_official_loss(z1, zz, p1, p2, eps_arg, warm)[0], z2, 1e-6)
    dz1_ref = fd(lambda zz: mec_official_loss(zz, z2, p1, p2, eps_arg, warm)[0], z1, 1e-6)
    close(0.5 * mec_loss_backward(c12)[1] / (mu * lam * m), dz2_ref, rtol=1e-6, atol=1e-9)
    close(0.5 * mec_loss_backward(c21)[1] / (mu * lam * m), dz1_ref, rtol=1e-6, atol=1e-9)

    # teacher = student (p = z): the same value as mecref's symmetric loss, half its gradient
    loss_same = mec_official_loss(z1, z2, z1, z2, eps_arg, warm)[0]
    L, c = mec_loss(z1, z2, eps, order=4)
    close(loss_same, float(L) / (mu * lam * m), rtol=1e-12)
    dZ1, dZ2 = mec_loss_backward(c, 1.0 / (mu * lam * m))
    close(fd(lambda zz: mec_official_loss(z1, zz, z1, z2, eps_arg, warm)[0], z2, 1e-6),
          0.5 * dZ2, rtol=1e-6, atol=1e-9)
    close(fd(lambda zz: mec_official_loss(zz, z2, z1, z2, eps_arg, warm)[0], z1, 1e-6),
          0.5 * dZ1, rtol=1e-6, atol=1e-9)


def test_mec_official_worked_example():
    """docs/conventions.md, row MEC: --eps 64 is eps = 8; at m = 256, d = 64 the factors are
    lam = 1/256, mu = 160, mu lam m = 160 and mecref's training term L/m = (5/8) MEC's loss."""
    m, d, eps = 256, 64, math.sqrt(64)
    lam, mu = d / (m * eps ** 2), (m + d) / 2
    assert (lam, mu, mu * lam * m, mu * lam) == (1 / 256, 160, 160, 0.625)
    rng = np.random.default_rng(0)
    Z1, Z2 = rng.normal(size=(m, d)), rng.normal(size=(m, d))
    L = float(mec_loss(Z1, Z2, eps, order=4)[0])
    close(L / m, 0.625 * mec_official_loss(Z1, Z2, Z1, Z2, 64.0)[0], rtol=1e-12)


@NEEDS_TORCH
def test_mec_official_torch_autograd():
    """The official loss in torch, float64, teacher outputs detached: autograd on the student
    is half mecref's gradient of L / (mu lam m) when the teacher equals the student."""
    import torch
    import torch.nn.functional as F
    m, d, eps_arg = 6, 5, 49.0
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(m, d)), rng.normal(size=(m, d))
    t1, t2 = torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)
    lamda_inv = m * eps_arg / d

    def trace(p, z):
        c = F.normalize(p) @ F.normalize(z).T / lamda_inv
        P, S = c, torch.zeros_like(c)
        for k in range(1, 5):
            if k > 1:
                P = P @ c
            S = S + (1 if k % 2 else -1) * P / k
        return torch.trace(S)
    loss = -(trace(t1.detach(), t2) + trace(t2.detach(), t1)) * 0.5 / m * lamda_inv
    loss.backward()
    eps = math.sqrt(eps_arg)
    lam, mu = d / (m * eps ** 2), (m + d) / 2
    L, c = mec_loss(z1, z2, eps, order=4)
    dZ1, dZ2 = mec_loss_backward(c, 1.0 / (mu * lam * m))
    close(loss.item(), float(L) / (mu * lam * m), rtol=1e-12)
    close(t1.grad.numpy(), 0.5 * dZ1, rtol=1e-9, atol=1e-12)
    close(t2.grad.numpy(), 0.5 * dZ2, rtol=1e-9, atol=1e-12)


# ============================================================================= 4. MCR^2
# ryanchankh/mcr2 loss.py (MaximalCodingRateReduction, the empirical losses) and
# train_func.py (label_to_membership: one diagonal 0/1 matrix per class).
def mcr2_losses(X, Y, K, eps_arg, gam1=1.0, gam2=1.0):
    """W = X^T (p features x m samples); R = 1/2 logdet(I + gam1 p/(m eps) W W^T);
    Rc = sum_j tr(Pi_j)/m * 1/2 logdet(I + p/(tr(Pi_j) eps) W Pi_j W^T), tr(Pi_j) + 1e-8;
    total = -gam2 R + Rc (minimised)."""
    W = X.T
    p, m = W.shape
    R = 0.5 * np.linalg.slogdet(np.eye(p) + gam1 * p / (m * eps_arg) * W @ W.T)[1]
    Rc = 0.0
    for j in range(K):
        pi = (Y == j).astype(np.float64)
        tr = pi.sum() + 1e-8
        Rc += tr / m * 0.5 * np.linalg.slogdet(np.eye(p) + p / (tr * eps_arg) * (W * pi) @ W.T)[1]
    return R, Rc, -gam2 * R + Rc


@pytest.mark.parametrize("m, d, K, eps_arg, gam1", [(12, 5, 3, 0.5, 1.0), (9, 16, 3, 0.01, 2.0),
                                                    (20, 8, 4, 0.1, 1.0)])
def test_mcr2(m, d, K, eps_arg, gam1):
    rng = np.random.default_rng(m)
    Z = unit_rows(rng.normal(size=(m, d)))            # MCR^2 normalises in the network
    Y = np.arange(m) % K
    R, Rc, _ = mcr2_losses(Z, Y, K, eps_arg, gam1)
    eps = math.sqrt(eps_arg / gam1)                   # eps^2 for eps, gam1 folded in
    L, c = coding_length(Z, eps, normalize=False)
    close(R, float(L) / (m + d), rtol=1e-10)
    dR = fd(lambda ZZ: mcr2_losses(ZZ, Y, K, eps_arg, gam1)[0], Z, 1e-6)
    close(coding_length_backward(c) / (m + d), dR, rtol=1e-6, atol=1e-7 * np.abs(dR).max())
    # Rc: per-class coding lengths weighted by m_k / (m (m_k + d)), at gam1 = 1 always
    parts = [(int((Y == k).sum()), coding_length(Z[Y == k], math.sqrt(eps_arg), normalize=False))
             for k in range(K)]
    close(Rc, sum(mk / (m * (mk + d)) * float(Lk) for mk, (Lk, _) in parts), rtol=1e-7)
    dRc = fd(lambda ZZ: mcr2_losses(ZZ, Y, K, eps_arg, gam1)[1], Z, 1e-6)
    ours = np.zeros_like(Z)
    for k, (mk, (_, ck)) in enumerate(parts):
        ours[Y == k] = coding_length_backward(ck) * mk / (m * (mk + d))
    close(ours, dRc, rtol=1e-6, atol=1e-7 * np.abs(dRc).max())


def test_mcr2_rc_is_moe_coding_length_without_the_membership_term():
    """With one-hot gates (the classes) and a common eps, moe_coding_length is the sum of the
    per-class coding lengths plus sum_k -m_k log(m_k/m); for K equal classes
    Rc = (L_moe - m log K) / (m + K d). The classes are made the norm quantiles of the raw rows
    (gate="norm"); expert_eps fixes eps_k = eps; the rows are normalised as in MCR^2's network."""
    rng = np.random.default_rng(5)
    m, d, K, eps_arg = 12, 5, 3, 0.5
    Y = np.repeat(np.arange(K), m // K)
    U = unit_rows(rng.normal(size=(m, d))) * (1 + Y + rng.uniform(0.1, 0.5, size=m))[:, None]
    L, c = moe_coding_length(U, math.sqrt(eps_arg), experts=K,
                             expert_eps=np.full(K, math.sqrt(eps_arg)))
    Rc_of = lambda UU: mcr2_losses(unit_rows(UU), Y, K, eps_arg)[1]
    close(Rc_of(U), (float(L) - m * math.log(K)) / (m + K * d), rtol=1e-7)
    dU = moe_coding_length_backward(c)[0] / (m + K * d)
    close(dU, fd(Rc_of, U, 1e-6), rtol=1e-6, atol=1e-9)


def test_mcr2_worked_example():
    """docs/conventions.md, row MCR^2: eps = 0.5 there is eps = sqrt(0.5) here; at m = 1000,
    d = 128, R = L / 1128, and a class of 100 samples weighs 100 / (1000 * 228) in Rc."""
    m, d = 1000, 128
    assert m + d == 1128 and math.isclose(100 / (m * (100 + d)), 1 / 2280)
    rng = np.random.default_rng(2)
    Z = unit_rows(rng.normal(size=(m, d)))
    R = mcr2_losses(Z, np.zeros(m, dtype=int), 1, 0.5)[0]
    close(R, float(coding_length(Z, math.sqrt(0.5))[0]) / 1128, rtol=1e-10)


@NEEDS_TORCH
def test_mcr2_torch_autograd():
    import torch
    m, d, K, eps_arg = 10, 4, 2, 0.5
    rng = np.random.default_rng(4)
    Z = unit_rows(rng.normal(size=(m, d)))
    Y = np.arange(m) % K
    Zt = torch.tensor(Z, requires_grad=True)
    W = Zt.T
    R = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (m * eps_arg) * W @ W.T)
    R.backward()
    L, c = coding_length(Z, math.sqrt(eps_arg), normalize=False)
    close(R.item(), float(L) / (m + d), rtol=1e-12)
    close(Zt.grad.numpy(), coding_length_backward(c) / (m + d), rtol=1e-9, atol=1e-12)


# ============================================================================= 5. DoReFa
# tensorpack/tensorpack examples/DoReFa-Net/dorefa.py (fw, fa, quantize) and alexnet-dorefa.py
# (activations: quantize(clip_by_value(x, 0, 1))); IntelLabs/distiller
# distiller/quantization/clipped_linear.py (dorefa_quantize_param) computes the same.
def dorefa_fw_graph(w, k, w0):
    """fw for k >= 2 with round's identity gradient frozen at w0: the max is NOT stopped."""
    n = 2 ** k - 1
    r = lambda ww: np.tanh(ww) / np.max(np.abs(np.tanh(ww))) * 0.5 + 0.5
    r0 = r(w0)
    return 2 * (r(w) + (np.round(r0 * n) / n - r0)) - 1


@pytest.mark.parametrize("k", [2, 3, 8])
def test_dorefa(k):
    rng = np.random.default_rng(k)
    w = rng.normal(size=(4, 3, 2, 2)) * 0.5
    w.flat[np.argmax(np.abs(w))] *= 1.25                        # a unique max
    dy = rng.normal(size=w.shape)
    y, c = dorefa_weight_quantize(w, k)
    close(y, dorefa_fw_graph(w, k, w), atol=1e-12)
    close(dorefa_weight_quantize_backward(c, dy),
          fd(lambda ww: np.sum(dy * dorefa_fw_graph(ww, k, w)), w, 1e-6), rtol=1e-6, atol=1e-9)
    # fa after clip_by_value(x, 0, 1): TF's clip gradient passes on the closed interval
    x = np.concatenate([rng.uniform(-1, 2, size=50), [0.0, 1.0]])
    n = 2 ** k - 1
    ya, ca = dorefa_act_quantize(x, k)
    close(ya, np.round(np.clip(x, 0, 1) * n) / n, atol=1e-12)
    close(dorefa_act_quantize_backward(ca, np.ones_like(x)), ((x >= 0) & (x <= 1)) * 1.0)


def test_dorefa_binary():
    """bitW = 1: E = stop_gradient(mean|w|), sign with sign(0) = +1 (tf.where on 0),
    identity gradient."""
    w = np.array([0.5, -0.25, 0.0, 1.0])
    y, c = dorefa_weight_quantize(w, 1)
    E = np.abs(w).mean()
    close(y, np.where(w == 0, 1.0, np.sign(w)) * E, atol=1e-15)
    assert E == 0.4375 and y.tolist() == [0.4375, -0.4375, 0.4375, 0.4375]   # the worked example
    dy = np.array([1.0, -2.0, 3.0, 0.5])
    close(dorefa_weight_quantize_backward(c, dy), dy)


@NEEDS_TORCH
def test_dorefa_torch_autograd():
    """fw in torch with a detach for round; amax shares the max's gradient like TF's max."""
    import torch
    rng = np.random.default_rng(9)
    k, n = 3, 7
    w = rng.normal(size=(5, 4))
    w.flat[np.argmax(np.abs(w))] *= 1.25
    dy = rng.normal(size=w.shape)
    wt = torch.tensor(w, requires_grad=True)
    t = torch.tanh(wt)
    r = t / torch.amax(torch.abs(t)) * 0.5 + 0.5
    q = r + (torch.round(r * n) / n - r).detach()
    (2 * q - 1).backward(torch.tensor(dy))
    y, c = dorefa_weight_quantize(w, k)
    close((2 * q - 1).detach().numpy(), y, atol=1e-12)
    close(wt.grad.numpy(), dorefa_weight_quantize_backward(c, dy), rtol=1e-9, atol=1e-12)


# ============================================================================= 6. PACT
# IntelLabs/distiller distiller/quantization/clipped_linear.py
# (LearnedClippedLinearQuantization: relu, where(x < clip_val, x, clip_val), scale and zero
# point under no_grad) and q_utils.py (asymmetric_linear_quantization_params: scale =
# (2^b - 1)/clip_val, zero point 0 here; LinearQuantizeSTE: round with identity gradient).
def pact_distiller_graph(x, alpha, bits, x0, alpha0):
    """The graph with the no_grad scale and the rounding error frozen at (x0, alpha0)."""
    k0 = (2 ** bits - 1) / alpha0                     # distiller's "scale" is 1/step
    t0 = np.where(np.maximum(x0, 0) < alpha0, np.maximum(x0, 0), alpha0)
    t = np.where(np.maximum(x, 0) < alpha, np.maximum(x, 0), alpha)
    return (t * k0 + (np.round(t0 * k0) - t0 * k0)) / k0


@pytest.mark.parametrize("bits", [2, 4])
def test_pact_distiller(bits):
    rng = np.random.default_rng(bits)
    alpha = 1.7
    Qp = 2 ** bits - 1
    x = safe_v(rng, (120,), 0, Qp) * alpha / Qp     # away from 0, alpha and rounding edges
    dy = rng.normal(size=x.shape)
    y, c = pact_quantize(x, alpha, bits)
    dx, dalpha = pact_quantize_backward(c, dy)
    close(y, pact_distiller_graph(x, alpha, bits, x, alpha), atol=1e-12)
    close(dx, fd(lambda xx: np.sum(dy * pact_distiller_graph(xx, alpha, bits, x, alpha)), x,
                 1e-7), rtol=1e-6, atol=1e-9)
    close(dalpha, fd(lambda aa: np.sum(dy * pact_distiller_graph(x, aa, bits, x, alpha)), alpha,
                     1e-7), rtol=1e-6, atol=1e-9)


def test_pact_distiller_worked_example_at_zero():
    """At x = 0 exactly (common after a ReLU) PyTorch's relu passes no gradient, so distiller's
    dx is 0 where mecref's closed mask 0 <= x < alpha passes dy: multiply by 1[x != 0] to
    reproduce it. Elsewhere (x = alpha included: dalpha, no dx) the two agree."""
    x = np.array([0.0, 0.5, 1.0, 1.5])
    _, c = pact_quantize(x, 1.0, 2)
    dx, dalpha = pact_quantize_backward(c, np.ones(4))
    assert dx.tolist() == [1.0, 1.0, 0.0, 0.0] and float(dalpha) == 2.0
    assert (dx * (x != 0)).tolist() == [0.0, 1.0, 0.0, 0.0]


@NEEDS_TORCH
def test_pact_distiller_torch_autograd():
    import torch
    import torch.nn.functional as F
    bits, alpha = 3, 1.3
    x = np.array([-0.4, 0.0, 0.2, 0.61, 1.0, 1.3, 2.0])
    xt = torch.tensor(x, requires_grad=True)
    at = torch.tensor([alpha], dtype=torch.float64, requires_grad=True)
    t = F.relu(xt)
    t = torch.where(t < at, t, at)
    with torch.no_grad():
        k = (2 ** bits - 1) / at
    u = t * k
    y = (u + (torch.round(u) - u).detach()) / k
    dy = np.linspace(0.5, 2.0, x.size)
    y.backward(torch.tensor(dy))
    yy, c = pact_quantize(x, alpha, bits)
    dx, dalpha = pact_quantize_backward(c, dy)
    close(y.detach().numpy(), yy, atol=1e-12)
    close(at.grad.numpy()[0], dalpha, rtol=1e-12)
    nonzero = x != 0
    close(xt.grad.numpy()[nonzero], dx[nonzero], atol=1e-12)
    assert xt.grad.numpy()[~nonzero].tolist() == [0.0] and dx[~nonzero].tolist() == [dy[1]]
