"""The PyTorch side of the benchmarks: the small CNN (FP32 and LSQ fake-quantized) and the
entropy terms, written with torch ops and autograd (no hand-written gradients).

Everything here mirrors mecref's definitions:

- :class:`TorchSmallCNN` is :func:`mecref.nn.small_cnn`'s network (docs/derivations.md N10):
  conv3x3(1->16, pad 1, no bias)+BN+ReLU+maxpool2, conv3x3(16->32)+BN+ReLU+maxpool2,
  conv3x3(32->64)+BN+ReLU, global average pool -> features (N, 64), linear(64->10).
  Weights are copied from a mecref model (:func:`load_from_mecref`), so both start equal.
- :func:`lsq` is LSQ (Esser et al. 2020) with the usual grad-scale and round-pass tricks:
  ``s' = s g + (s - s g).detach()`` scales only the gradient of ``s`` by ``g``;
  ``round_pass(v) = v + (round(v) - v).detach()`` rounds forward and passes the gradient.
  Weights: per-output-channel step, ``g = 1/sqrt(C k k Qp)``; inputs: per-tensor step,
  ``g = 1/sqrt(features per sample * Qp)`` (as mecref.nn).
- :func:`coding_length`, :func:`mec_loss`, :func:`moe_coding_length` are the formulas of
  docs/derivations.md E1-E5 (method spec sections 1-3) on the same side (the smaller Gram
  matrix), by Cholesky (``torch.linalg.cholesky``) or LU (``torch.linalg.slogdet``) as mecref,
  after the same row normalisation; their gradients come from autograd.

torch is imported by the caller and passed in, so that this module imports without it.
"""
from __future__ import annotations

import math


# ----------------------------------------------------------------------------- LSQ
def qrange(bits, signed):
    """Integer code range (Qn, Qp), as mecref.quant.qrange for bits >= 2."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def lsq(torch, x, s, bits, signed, g):
    """LSQ fake quantizer ``q = round_pass(clip(x / s', Qn, Qp)) s'`` with ``s' = grad_scale(s, g)``."""
    Qn, Qp = qrange(bits, signed)
    s = s * g + (s - s * g).detach()
    v = torch.clamp(x / s, Qn, Qp)
    v = v + (torch.round(v) - v).detach()
    return v * s


def _make_modules(torch):
    nn = torch.nn
    F = torch.nn.functional

    class QConv(nn.Conv2d):
        """conv3x3 (pad 1, no bias) on LSQ-quantized weight and input (bits 32: plain conv)."""

        def __init__(self, cin, cout, w_bits, a_bits, a_signed):
            super().__init__(cin, cout, 3, padding=1, bias=False)
            self.w_bits, self.a_bits, self.a_signed = w_bits, a_bits, a_signed
            if w_bits != 32:
                self.s_w = nn.Parameter(torch.ones(cout, 1, 1, 1))
            if a_bits != 32:
                self.s_a = nn.Parameter(torch.ones(1, 1, 1, 1))

        def forward(self, x):
            w = self.weight
            if self.a_bits != 32:
                Qp = qrange(self.a_bits, self.a_signed)[1]
                x = lsq(torch, x, self.s_a, self.a_bits, self.a_signed,
                        1.0 / math.sqrt(x[0].numel() * Qp))
            if self.w_bits != 32:
                Qp = qrange(self.w_bits, True)[1]
                w = lsq(torch, w, self.s_w, self.w_bits, True, 1.0 / math.sqrt(w[0].numel() * Qp))
            return F.conv2d(x, w, None, 1, 1)

    class QLinear(nn.Linear):
        """Linear layer on LSQ-quantized weight and unsigned input (bits 32: plain linear)."""

        def __init__(self, cin, cout, bits):
            super().__init__(cin, cout)
            self.bits = bits
            if bits != 32:
                self.s_w = nn.Parameter(torch.ones(cout, 1))
                self.s_a = nn.Parameter(torch.ones(1, 1))

        def forward(self, x):
            w = self.weight
            if self.bits != 32:
                Qp_a, Qp_w = qrange(self.bits, False)[1], qrange(self.bits, True)[1]
                x = lsq(torch, x, self.s_a, self.bits, False, 1.0 / math.sqrt(x[0].numel() * Qp_a))
                w = lsq(torch, w, self.s_w, self.bits, True, 1.0 / math.sqrt(w[0].numel() * Qp_w))
            return F.linear(x, w, self.bias)

    class TorchSmallCNN(nn.Module):
        """mecref.nn.small_cnn's network in PyTorch; forward -> (logits, features)."""

        def __init__(self, w_bits=32, a_bits=32, first_last_bits=32, width=(16, 32, 64),
                     num_classes=10):
            super().__init__()
            c1, c2, c3 = width
            fl = first_last_bits
            self.conv1 = QConv(1, c1, fl, fl, True)
            self.bn1 = nn.BatchNorm2d(c1)
            self.conv2 = QConv(c1, c2, w_bits, a_bits, False)
            self.bn2 = nn.BatchNorm2d(c2)
            self.conv3 = QConv(c2, c3, w_bits, a_bits, False)
            self.bn3 = nn.BatchNorm2d(c3)
            self.fc = QLinear(c3, num_classes, fl)

        def forward(self, x):
            # relu(maxpool(h)) = maxpool(relu(h)), on the 4x smaller array (as mecref)
            h = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
            h = F.relu(F.max_pool2d(self.bn2(self.conv2(h)), 2))
            h = F.relu(self.bn3(self.conv3(h)))
            z = h.mean(dim=(2, 3))
            return self.fc(z), z

    return TorchSmallCNN


_CACHE = {}


def torch_small_cnn(torch, **kwargs):
    """A :class:`TorchSmallCNN` (float32, train mode); kwargs as its constructor."""
    if "cls" not in _CACHE:
        _CACHE["cls"] = _make_modules(torch)
    return _CACHE["cls"](**kwargs)


# mecref layer name, param key -> torch parameter name
_PARAM_MAP = {
    ("conv1", "W"): "conv1.weight", ("conv1", "s_w"): "conv1.s_w", ("conv1", "s_a"): "conv1.s_a",
    ("bn1", "gamma"): "bn1.weight", ("bn1", "beta"): "bn1.bias",
    ("conv2", "W"): "conv2.weight", ("conv2", "s_w"): "conv2.s_w", ("conv2", "s_a"): "conv2.s_a",
    ("bn2", "gamma"): "bn2.weight", ("bn2", "beta"): "bn2.bias",
    ("conv3", "W"): "conv3.weight", ("conv3", "s_w"): "conv3.s_w", ("conv3", "s_a"): "conv3.s_a",
    ("bn3", "gamma"): "bn3.weight", ("bn3", "beta"): "bn3.bias",
    ("fc", "W"): "fc.weight", ("fc", "b"): "fc.bias", ("fc", "s_w"): "fc.s_w", ("fc", "s_a"): "fc.s_a",
}


def load_from_mecref(torch, tmodel, model):
    """Copy every parameter of a mecref SmallCNN into the torch model (same init, same steps).

    Returns the list of (torch name, mecref name) pairs copied; every torch parameter must be
    covered (a missing one raises, so the two models cannot silently differ).
    """
    from mecref.backend import to_host

    params = dict(tmodel.named_parameters())
    done = []
    with torch.no_grad():
        for name, layer, key in model.named_params():
            lname = name.rsplit(".", 1)[0]
            tname = _PARAM_MAP.get((lname, key))
            if tname is None or tname not in params:
                raise KeyError(f"no torch parameter for mecref's {name}")
            src = torch.as_tensor(to_host(layer.params[key]).astype("float32"))
            params[tname].copy_(src.reshape(params[tname].shape))
            done.append((tname, name))
    missing = set(params) - {t for t, _ in done}
    if missing:
        raise KeyError(f"torch parameters with no mecref counterpart: {sorted(missing)}")
    return done


def torch_sgd(torch, tmodel, lr, momentum=0.9, weight_decay=5e-4, positive_floor=1e-8):
    """SGD as mecref.optim.SGD: weight decay on conv/linear weights only (not on biases,
    BatchNorm or quantizer steps), then the steps ``s`` floored at ``positive_floor``.

    Returns ``step()``, a callable that updates every parameter from its ``.grad``.
    """
    decay, no_decay, positive = [], [], []
    for name, p in tmodel.named_parameters():
        (decay if name.endswith(".weight") and not name.startswith("bn") else no_decay).append(p)
        if name.rsplit(".", 1)[-1] in ("s_w", "s_a"):
            positive.append(p)
    opt = torch.optim.SGD([dict(params=decay, weight_decay=weight_decay),
                           dict(params=no_decay, weight_decay=0.0)], lr=lr, momentum=momentum)

    def step():
        opt.step()
        with torch.no_grad():
            for p in positive:
                p.clamp_(min=positive_floor)

    step.optimizer = opt
    return step


# ----------------------------------------------------------------------------- entropy (E1-E5)
def _unit_rows(torch, U):
    r = torch.linalg.vector_norm(U, dim=1)
    return U / r[:, None], r


def _gram_logdet(torch, X, a):
    """logdet of I + a X X^T (n <= d) or I + a X^T X, by Cholesky: 2 sum log diag L."""
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
    G = a * G + torch.eye(G.shape[0], dtype=X.dtype, device=X.device)
    L = torch.linalg.cholesky(G)
    return 2.0 * torch.log(torch.diagonal(L)).sum()


def coding_length(torch, Z, eps):
    """E1: ``mu logdet(I + lam Z Z^T)`` of the l2-normalised rows, on the smaller side."""
    m, d = Z.shape
    Zc, _ = _unit_rows(torch, Z)
    return (m + d) / 2 * _gram_logdet(torch, Zc, d / (m * eps ** 2))


def mec_loss(torch, Z1, Z2, eps, order=None):
    """E3/E4: ``-mu logdet(I + lam Z1 Z2^T)`` (LU, slogdet) or ``-mu T_n(C)``, smaller side."""
    m, d = Z1.shape
    lam, mu = d / (m * eps ** 2), (m + d) / 2
    Z1c, _ = _unit_rows(torch, Z1)
    Z2c, _ = _unit_rows(torch, Z2)
    A, B = (Z1c, Z2c) if m <= d else (Z2c.T, Z1c.T)
    C = lam * (A @ B.T)
    if order is None:
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        return -mu * torch.linalg.slogdet(eye + C)[1]
    T = torch.trace(C)
    P = C
    for k in range(2, order):
        P = P @ C
        T = T + (-1) ** (k + 1) / k * torch.trace(P)
    if order > 1:
        T = T + (-1) ** (order + 1) / order * (P * C.T).sum()   # tr(C^n) without C^n
    return -mu * T


def moe_coding_length(torch, Z, eps, experts):
    """E5 with hard routing by row norm (gate="norm"): K equal groups by the sorted norms,
    ``eps_k = eps rbar_k / rbar`` held constant in the gradient (detached, as mecref's default
    ``scale_grad=False``), each expert on its own smaller side."""
    m, d = Z.shape
    K = experts
    Zc, r = _unit_rows(torch, Z)
    order = torch.argsort(r.detach(), stable=True)
    bounds = [-(-k * m // K) for k in range(K + 1)]
    groups = [torch.sort(order[bounds[k]:bounds[k + 1]]).values for k in range(K)]
    mk = torch.tensor([float(len(g)) for g in groups], dtype=Z.dtype, device=Z.device)
    R = torch.stack([r[g].sum() for g in groups]).detach()
    Rsum = R.sum()
    ratio = (R * m) / (mk * Rsum)
    a = (d / (m * eps ** 2)) * (m / mk) / ratio ** 2
    c = (mk + d) / 2
    ell = torch.stack([_gram_logdet(torch, Zc[g], a[k]) for k, g in enumerate(groups)])
    return (c * ell).sum() - (mk * torch.log(mk / m)).sum()
