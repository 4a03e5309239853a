"""Coding-length (entropy) terms: forward/backward pairs with closed-form gradients.

::

    L, cache = coding_length(Z, eps)                  # E1: mu logdet(I + lam Z Z^T)
    dZ = coding_length_backward(cache, dL)
    L, cache = mec_loss(Z1, Z2, eps, order=None)      # E3, E4: -mu logdet(I + lam Z1 Z2^T), or
    dZ1, dZ2 = mec_loss_backward(cache, dL)           #         its order-n Taylor form
    L, cache = moe_coding_length(Z, eps, experts=K)   # E5: mixture-of-experts coding length
    dZ, dW_g = moe_coding_length_backward(cache, dL)

The E-numbers point to the sections of ``docs/derivations.md`` that derive each formula.

Conventions
-----------
- ``Z`` is ``(m, d)``: m samples, one per ROW, d features. Rows are l2-normalised first
  (``normalize=True``, the default), and the gradient goes back through the normalisation (E2).
- ``eps`` is the distortion epsilon itself, NOT its square (MEC's code passes eps^2):
  ``lam = d / (m eps^2)``, ``mu = (m + d) / 2``.
- Every log-determinant of a Gram matrix is taken on its smaller side (Sylvester,
  ``logdet(I_m + lam Z Z^T) = logdet(I_d + lam Z^T Z)``), by Cholesky; gradients use triangular
  solves with that factor, never an explicit inverse. On NumPy, SciPy's LAPACK wrappers do the
  factorisations; on CuPy, ``cupy.linalg`` and ``cupyx.scipy.linalg.solve_triangular``. A Gram
  matrix that is not positive definite in floating point raises ``numpy.linalg.LinAlgError``
  on both (CuPy checks the solver's status only under ``cupyx.errstate(linalg="raise")``,
  which costs one host sync per factorisation).
- Work happens in the input dtype (float32 in training, float64 in the tests). Values are
  returned as 0-d scalars of Z's backend and dtype; ``float(L)`` gives a Python number.
- ``dL`` (the gradient of the caller's loss w.r.t. L) is a real number.
- Caches are opaque tuples: pass them to the matching ``*_backward`` only.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from .backend import MecrefError, array_module, cupyx_module, row_dot, to_host
from .validate import check_array, check_choice, check_int, check_positive, values_checked

__all__ = [
    "ConvergenceWarning",
    "coding_length", "coding_length_backward",
    "mec_loss", "mec_loss_backward",
    "moe_coding_length", "moe_coding_length_backward",
]

GATES = ("norm", "soft")
MAX_ORDER = 1024  # Taylor orders beyond this cost time and add nothing (the terms shrink as rho^n)


class ConvergenceWarning(UserWarning):
    """The Taylor series of logdet(I + C) diverges: the spectral radius of C is >= 1."""


class _NotPositiveDefinite(Exception):
    """I + a X X^T lost its positive definiteness to rounding (turned into MecrefError by the
    public functions, which know eps)."""


# ----------------------------------------------------------------------------- linear algebra
def _add_identity(G):
    """G + I in place for a square, C-contiguous G."""
    n = G.shape[0]
    diag = G.reshape(-1)[:: n + 1]
    diag += 1
    return G


def _chol_logdet(G):
    """Cholesky factor of a symmetric positive-definite G (overwritten) and ``logdet G``
    ``= 2 sum log diag(chol G)`` (E1). Returns ``(factor, logdet)``."""
    xp = array_module(G)
    if xp is np:
        # G is symmetric, so G.T is the same matrix in Fortran order: factored in place
        try:
            fac, _ = scipy.linalg.cho_factor(G.T, lower=True, overwrite_a=True,
                                             check_finite=False)
        except np.linalg.LinAlgError as e:
            raise _NotPositiveDefinite(str(e)) from None
        return fac, 2.0 * np.log(np.diagonal(fac)).sum()
    # CuPy reads cuSOLVER's status (one host sync) and raises only in "raise" mode; without
    # it a G that is not positive definite gives a NaN or wrong log det instead of an error
    try:
        with cupyx_module().errstate(linalg="raise"):
            L = xp.linalg.cholesky(G)
    except np.linalg.LinAlgError as e:
        raise _NotPositiveDefinite(str(e)) from None
    return L, 2.0 * xp.log(xp.diagonal(L)).sum()


def _gram(X, a):
    """The smaller Gram matrix of X (n, d) (E1): ``G = I_n + a X X^T`` when ``n <= d``, else
    ``G = I_d + a X^T X`` (same determinant)."""
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
    G *= a
    return _add_identity(G)


def _gram_logdet(X, a):
    """Factor and log-determinant of the smaller Gram matrix of X (n, d) (E1)."""
    return _chol_logdet(_gram(X, a))


def _chol_logdets(Gs):
    """``[(factor, logdet)]`` of :func:`_chol_logdet` for each matrix of a list (E5). On CuPy,
    matrices of one shape are factored in one batched call: one kernel and one read of the
    solver's status for all of them."""
    xp = array_module(Gs[0])
    if xp is np or len(Gs) == 1 or len({tuple(G.shape) for G in Gs}) > 1:
        return [_chol_logdet(G) for G in Gs]
    try:
        with cupyx_module().errstate(linalg="raise"):
            L = xp.linalg.cholesky(xp.stack(Gs))
    except np.linalg.LinAlgError as e:
        raise _NotPositiveDefinite(str(e)) from None
    logdets = 2.0 * xp.log(xp.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
    return [(L[k], logdets[k]) for k in range(len(Gs))]


def _chol_solve(fac, B, right=False):
    """``G^{-1} B``, or ``B G^{-1}`` with ``right``, for a factor from :func:`_chol_logdet`.

    Two triangular solves (BLAS trsm) with ``G = L L^T``, on either backend. On NumPy a
    Fortran-ordered B (the transpose of a C-ordered array) is used in place and the result is
    Fortran-ordered, so callers pass ``X.T`` and get back a C-ordered ``.T`` without copies.
    """
    xp = array_module(fac)
    if xp is np:
        trsm = scipy.linalg.blas.get_blas_funcs("trsm", (fac,))
        if right:  # B L^{-T} L^{-1}
            W = trsm(1.0, fac, B, side=1, lower=1, trans_a=1)
            return trsm(1.0, fac, W, side=1, lower=1, trans_a=0, overwrite_b=1)
        W = trsm(1.0, fac, B, side=0, lower=1, trans_a=0)  # L^{-T} L^{-1} B
        return trsm(1.0, fac, W, side=0, lower=1, trans_a=1, overwrite_b=1)
    if right:  # B G^{-1} = (G^{-1} B^T)^T, G symmetric
        return _chol_solve(fac, B.T).T
    solve_triangular = cupyx_module().scipy.linalg.solve_triangular
    W = solve_triangular(fac, B, lower=True)                  # L^{-1} B
    return solve_triangular(fac, W, trans=1, lower=True)      # L^{-T} L^{-1} B


def _gram_solve(fac, X):
    """``(I_n + a X X^T)^{-1} X = X (I_d + a X^T X)^{-1}`` (push-through), (n, d), with the
    factor from :func:`_gram_logdet` on either side (E1)."""
    if X.shape[0] > X.shape[1]:  # d x d side: (G^{-1} X^T)^T
        return _chol_solve(fac, X.T).T
    return _chol_solve(fac, X.T, right=True).T  # (X^T G^{-1})^T = G^{-1} X, G symmetric


def _lu_logdet(M):
    """LU factor of a square M (overwritten), the sign of det M and log|det M| (E3)."""
    xp = array_module(M)
    if xp is np:
        lu, piv = scipy.linalg.lu_factor(M, overwrite_a=True, check_finite=False)
        u = np.diagonal(lu)
        swaps = int(np.count_nonzero(piv != np.arange(piv.size)))
        sign = (-1.0) ** swaps * float(np.prod(np.sign(u)))
        return (lu, piv), sign, np.log(np.abs(u)).sum()
    sign, logabsdet = xp.linalg.slogdet(M)
    return M, float(sign), logabsdet


def _lu_solve(fac, B, trans=False):
    """M^{-1} B, or M^{-T} B with ``trans``, for a factor from :func:`_lu_logdet`."""
    if isinstance(fac, tuple):
        return scipy.linalg.lu_solve(fac, B, trans=int(trans), check_finite=False)
    xp = array_module(fac)
    return xp.linalg.solve(fac.T if trans else fac, B)


# ----------------------------------------------------------------------------- rows
def _check_rows(name, Z):
    """A finite (m, d) float32 or float64 array: float16 cannot hold lam |z|^2 nor a
    log-determinant of a few hundred rows (it gives NaN), so it is refused."""
    check_array(name, Z, ndim=2)
    if Z.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {Z.dtype} (too few bits for "
                        f"the log-determinant): cast it with {name}.astype(np.float32)")
    return Z


def _pd_error(eps, lam, dtype):
    return MecrefError(
        f"I + lam Z Z^T is not positive definite in {np.dtype(dtype).name} at eps = {eps!r} "
        f"(lam = d / (m eps^2) = {lam:.4g}): rounding swamps the identity when the rows are "
        f"(nearly) rank-deficient and lam is this large; use a larger eps, or float64 rows")


def _check_unnormalized(name, Z, lam):
    """With normalize=False, lam |z_i|^2 bounds the entries of lam Z Z^T: it must be finite
    (a host read, skipped inside a training step)."""
    if not values_checked():
        return
    xp = array_module(Z)
    top = float(to_host(xp.abs(Z).max()))
    bound = lam * top * top * Z.shape[1]     # >= lam |z_i|^2 (a float: inf on overflow)
    if not bound < float(np.finfo(Z.dtype).max):
        raise MecrefError(f"{name} has entries up to {top:.4g}: with normalize=False, lam |z|^2 "
                          f"(lam = {lam:.4g}) overflows {Z.dtype}; rescale {name}, or use "
                          f"normalize=True")


def _check_eps(eps, m, d, dtype):
    """eps > 0 such that lam = d / (m eps^2) is a finite positive number in ``dtype``."""
    eps = check_positive("eps", eps)
    e2 = eps * eps
    lam = d / (m * e2) if e2 > 0 else math.inf
    if not 0 < lam < float(np.finfo(dtype).max):
        raise MecrefError(f"eps = {eps!r} gives lam = d / (m eps^2) = {lam!r}, which is not a "
                          f"finite positive {np.dtype(dtype).name} (m = {m}, d = {d})")
    return eps


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _unit_rows(U, name):
    """Row norms r (m,) and unit rows U / r; a zero row is an error (E2).

    When a squared norm would overflow or lose digits to underflow (|u| beyond about
    sqrt(tiny) 2^26 .. sqrt(max)), each row is first divided by its largest |entry| a_i, and
    ``r_i = a_i |u_i / a_i|`` (the same unit rows; r may then overflow to inf, which sends the
    gradient through the norm to 0, its rounded value)."""
    xp = array_module(U)
    r = xp.sqrt(row_dot(U, U))
    if not values_checked():                # inside a training step: no host read
        return U / r[:, None], r
    if bool(xp.all(xp.isfinite(r) & (r >= math.sqrt(np.finfo(U.dtype).tiny) * 2.0 ** 26))):
        return U / r[:, None], r
    a = xp.abs(U).max(axis=1)
    if not bool(xp.all(a > 0)):
        i = int(xp.argmin(a))
        raise MecrefError(f"{name} has a zero row (row {i}), which cannot be l2-normalised: "
                          f"give rows with non-zero norm, or normalize=False")
    V = U / a[:, None]
    n = xp.sqrt(row_dot(V, V))
    V /= n[:, None]
    with np.errstate(over="ignore"):
        r = a * n
    return V, r


def _unit_rows_backward(Z, r, dZ):
    """E2: through z = u/|u| row-wise, dL/du = (I - z z^T) dL/dz / |u| (overwrites dZ)."""
    dZ -= Z * row_dot(Z, dZ)[:, None]
    dZ /= r[:, None]
    return dZ


# ----------------------------------------------------------------------------- E1: coding length
def coding_length(Z, eps, normalize=True):
    r"""Coding length of the rows of Z (Ma et al. 2007; MEC Eq. 2): derivations E1, E2.

    .. math::

        L(Z) = \mu \log\det(I_m + \lambda Z Z^T) = \mu \log\det(I_d + \lambda Z^T Z),
        \qquad \mu = \frac{m + d}{2}, \quad \lambda = \frac{d}{m \epsilon^2}

    computed by Cholesky on the smaller side (m x m when m <= d, else d x d).

    Parameters
    ----------
    Z : array (m, d)
        One sample per row, floating, finite.
    eps : float > 0
        Distortion epsilon, NOT squared (eps^2 is the allowed squared decoding error).
    normalize : bool
        l2-normalise the rows first (default); zero rows are then an error.

    Returns
    -------
    L : 0-d scalar of Z's backend and dtype
    cache : tuple for :func:`coding_length_backward`
    """
    _check_rows("Z", Z)
    eps = _check_eps(eps, *Z.shape, Z.dtype)
    m, d = Z.shape
    lam = d / (m * eps ** 2)
    mu = (m + d) / 2
    if _check_flag("normalize", normalize):
        Zc, r = _unit_rows(Z, "Z")
    else:
        _check_unnormalized("Z", Z, lam)
        Zc, r = Z, None
    try:
        fac, logdet = _gram_logdet(Zc, lam)
    except _NotPositiveDefinite:
        raise _pd_error(eps, lam, Z.dtype) from None
    return mu * logdet, (Zc, r, fac, lam, mu)


def coding_length_backward(cache, dL=1.0):
    r"""Gradient of :func:`coding_length` (derivations E1, E2).

    .. math::

        \frac{\partial L}{\partial Z} = 2\mu\lambda\,(I_m + \lambda Z Z^T)^{-1} Z
                                      = 2\mu\lambda\, Z (I_d + \lambda Z^T Z)^{-1}

    then, with ``normalize``, row-wise through ``z = u/|u|``:
    ``dL/du = (I - z z^T) dL/dz / |u|``. (eps is NOT squared: lam = d/(m eps^2).)

    Returns
    -------
    dZ : array (m, d), same dtype as Z.
    """
    Zc, r, fac, lam, mu = cache
    dZ = _gram_solve(fac, Zc)
    dZ *= 2.0 * mu * lam * float(dL)
    return dZ if r is None else _unit_rows_backward(Zc, r, dZ)


# ----------------------------------------------------------------------------- E3, E4: two-view MEC
def mec_loss(Z1, Z2, eps, order=None, normalize=True, strict=False):
    r"""Two-view MEC objective (MEC Eq. 3), exact or in Taylor form: derivations E3, E4.

    .. math::

        C = \lambda Z_1 Z_2^T \ (m \times m), \qquad
        L_{MEC} = -\mu \log\det(I_m + C) \quad (\text{order=None}), \qquad
        L_{MEC} \approx -\mu\, T_n(C) = -\mu \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k} \operatorname{tr}(C^k)
        \quad (\text{order}=n)

    with ``lam = d/(m eps^2)``, ``mu = (m+d)/2`` (eps NOT squared). Both forms are taken on the
    smaller side: ``det(I_m + lam Z1 Z2^T) = det(I_d + lam Z2^T Z1)`` and
    ``tr((Z1 Z2^T)^k) = tr((Z2^T Z1)^k)``. The value is symmetric in the two views
    (``det A = det A^T``), so MEC's mean over the two view orders equals it (E3).

    Scaling: this is the plain ``-mu logdet`` (or ``-mu T_n``), a loss to minimise. MEC's own
    training loss is ``L_MEC / (mu lam m)``; the training loop divides this one by m.

    Parameters
    ----------
    Z1, Z2 : arrays (m, d)
        The two views, one sample per row; row i of Z1 and of Z2 are the same image.
    eps : float > 0
        Distortion epsilon, NOT squared.
    order : None or int in [1, 1024]
        None: exact log-determinant (LU of the non-symmetric ``I + C``). n: the order-n series.
    normalize : bool
        l2-normalise the rows of both views first (default).
    strict : bool
        For ``order=n``, when the spectral radius rho of C is >= 1 (the series diverges):
        False warns with :class:`ConvergenceWarning`, True raises MecrefError. The message gives
        rho and the eps that would make the series converge.

    Returns
    -------
    L : 0-d scalar of the views' backend and dtype
    cache : tuple for :func:`mec_loss_backward`

    Raises
    ------
    MecrefError
        for bad arguments; for the exact form when ``det(I + C) <= 0`` (log undefined).
    """
    _check_rows("Z1", Z1)
    _check_rows("Z2", Z2)
    if Z2.shape != Z1.shape:
        raise MecrefError(f"Z2 must have the shape of Z1 {tuple(Z1.shape)}, got {tuple(Z2.shape)}")
    if Z2.dtype != Z1.dtype:
        raise TypeError(f"Z2 must have the dtype of Z1 ({Z1.dtype}), got {Z2.dtype}: cast one "
                        f"view so that the gradients come back in one dtype")
    eps = _check_eps(eps, *Z1.shape, Z1.dtype)
    if order is not None:
        order = check_int("order", order, lo=1, hi=MAX_ORDER)
    strict = _check_flag("strict", strict)
    m, d = Z1.shape
    lam = d / (m * eps ** 2)
    mu = (m + d) / 2
    if _check_flag("normalize", normalize):
        (Z1c, r1), (Z2c, r2) = _unit_rows(Z1, "Z1"), _unit_rows(Z2, "Z2")
    else:
        _check_unnormalized("Z1", Z1, lam)
        _check_unnormalized("Z2", Z2, lam)
        Z1c, r1, Z2c, r2 = Z1, None, Z2, None
    # the smaller side: C = lam Z1 Z2^T (m, m), or lam Z2^T Z1 (d, d): same traces of powers
    C = Z1c @ Z2c.T if m <= d else Z2c.T @ Z1c
    C *= lam
    if order is None:
        M = _add_identity(C)
        fac, sign, logdet = _lu_logdet(M)
        if sign <= 0:
            raise _det_error(Z1c, Z2c, lam, eps, sign)
        return -mu * logdet, ("exact", m <= d, r1, r2, Z1c, Z2c, fac, lam, mu)
    T, S, bound = _taylor(C, order)
    if bound >= 1.0:
        _check_convergence(C, order, eps, strict)
    return -mu * T, ("taylor", m <= d, r1, r2, Z1c, Z2c, S, lam, mu)


def _det_error(Z1c, Z2c, lam, eps, sign):
    """Why det(I + C) <= 0: recomputed in float64, a positive determinant means rounding in
    the views' dtype (a large lam on rank-deficient views), else the views are anti-aligned."""
    what = f"det(I + C) = det(I + lam Z1 Z2^T) is {'zero' if sign == 0 else 'negative'}"
    where = f"eps = {eps!r}, lam = {lam:.4g}"
    if Z1c.dtype != np.float64:
        A = np.asarray(to_host(Z1c), dtype=np.float64)
        B = np.asarray(to_host(Z2c), dtype=np.float64)
        C = lam * (A @ B.T if A.shape[0] <= A.shape[1] else B.T @ A)
        if np.linalg.slogdet(np.eye(C.shape[0]) + C)[0] > 0:
            return MecrefError(f"{what} in {Z1c.dtype} ({where}) but positive in float64: rounding "
                               f"swamps the identity at this eps on (nearly) rank-deficient views; "
                               f"use a larger eps, or float64 views")
    return MecrefError(f"{what} ({where}): its logarithm is undefined; the views are "
                       "anti-aligned (C has a real eigenvalue <= -1); use a larger eps")


def _taylor(C, n):
    """T_n(C), the truncated Neumann sum S_n = sum_{j<n} (-C)^j, and an upper bound on rho(C).

    Uses the powers C^1 .. C^{n-1} once each; tr(C^n) = sum(C^{n-1} * C^T). Gelfand:
    rho(C) <= ||C^j||_F^{1/j} for every j, so the bound is the least of these (E4).
    """
    xp = array_module(C)
    S = _add_identity(xp.zeros_like(C))
    T = xp.trace(C)
    P = C
    norms = [xp.sqrt(xp.sum(C * C))]
    for j in range(1, n):
        if j > 1:
            P = P @ C
            T = T + (-1) ** (j + 1) / j * xp.trace(P)
            norms.append(xp.sqrt(xp.sum(P * P)) ** (1.0 / j))
        S += (-1) ** j * P
    if n > 1:
        T = T + (-1) ** (n + 1) / n * xp.sum(P * C.T)
    bound = float(to_host(xp.min(xp.stack(norms))))
    return T, S, bound


def _check_convergence(C, order, eps, strict):
    """Warn (or raise with strict) when the spectral radius of C is >= 1 (E4)."""
    rho = float(np.max(np.abs(np.linalg.eigvals(np.asarray(to_host(C), dtype=np.float64)))))
    if rho < 1.0:
        return
    msg = (f"the order-{order} Taylor series of logdet(I + C) diverges: the spectral radius of "
           f"C = lam Z1 Z2^T is {rho:.4g} >= 1 at eps={eps!r}; rho scales as 1/eps^2, so "
           f"eps > {eps * math.sqrt(rho):.4g} makes it converge (eps > sqrt(d) does for any "
           "unit rows), or use the exact form (order=None)")
    if strict:
        raise MecrefError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=3)


def mec_loss_backward(cache, dL=1.0):
    r"""Gradients of :func:`mec_loss` w.r.t. both views (derivations E3, E4).

    Exact form, with ``M = I + C``, ``C = lam Z1 Z2^T``:

    .. math::

        \frac{\partial L}{\partial Z_1} = -\mu\lambda\, M^{-T} Z_2, \qquad
        \frac{\partial L}{\partial Z_2} = -\mu\lambda\, M^{-1} Z_1

    Taylor form: the same with ``M^{-1}`` replaced by the truncated Neumann sum
    ``S_n = sum_{j=0}^{n-1} (-C)^j``. Then through the row normalisation of each view (E2).
    (eps is NOT squared: lam = d/(m eps^2).)

    Returns
    -------
    dZ1, dZ2 : arrays (m, d)
    """
    form, m_side, r1, r2, Z1c, Z2c, F, lam, mu = cache
    xp = array_module(Z1c)
    # F is S_n or the LU factor of M; on the d side M = I_d + lam Z2^T Z1, and by transposition
    # dZ1 = -mu lam Z2 M^{-T}, dZ2 = -mu lam Z1 M^{-1} (E3, E4)
    if form == "taylor" and m_side:
        dZ1, dZ2 = F.T @ Z2c, F @ Z1c
    elif form == "taylor":
        dZ1, dZ2 = Z2c @ F.T, Z1c @ F
    elif m_side:  # LAPACK returns Fortran order: make it C for the row-wise steps below
        dZ1 = xp.ascontiguousarray(_lu_solve(F, Z2c, trans=True))
        dZ2 = xp.ascontiguousarray(_lu_solve(F, Z1c))
    else:
        dZ1, dZ2 = _lu_solve(F, Z2c.T).T, _lu_solve(F, Z1c.T, trans=True).T
    coef = -mu * lam * float(dL)
    dZ1 *= coef
    dZ2 *= coef
    if r1 is not None:
        dZ1 = _unit_rows_backward(Z1c, r1, dZ1)
        dZ2 = _unit_rows_backward(Z2c, r2, dZ2)
    return dZ1, dZ2


# ----------------------------------------------------------------------------- E5: mixture of experts
def moe_coding_length(Z, eps, experts=1, gate="norm", W_g=None, tau=1.0, normalize=True,
                      scale_grad=False, expert_eps=None):
    r"""Coding length of a mixture of K experts (this project's reading of MEC-Quant's MOE
    form; the coding length of mixed data of Ma et al. 2007): derivations E5.

    .. math::

        L_{moe} = \sum_{k=1}^{K} \Big[ c_k \log\det(I_d + a_k Z^T \Pi_k Z)
                  - m_k \log\frac{m_k}{m} \Big], \quad
        \Pi_k = \operatorname{diag}(\pi_{1k}, \dots, \pi_{mk}), \quad m_k = \sum_i \pi_{ik},

        c_k = \frac{m_k + d}{2}, \quad a_k = \frac{d}{m_k \epsilon_k^2}, \quad
        \epsilon_k = \epsilon\, \frac{\bar r_k}{\bar r}, \quad
        \bar r_k = \frac{\sum_i \pi_{ik} r_i}{m_k}, \quad \bar r = \frac{1}{m}\sum_i r_i

    where ``r_i = |u_i|`` are the norms of the rows as given (before normalisation). So each
    expert's distortion is relative to its own scale. ``expert_eps`` replaces the computed
    eps_k by given constants. Gates ``pi`` (m, K):

    - ``gate="norm"`` (hard): sort the samples by ``r_i``; expert k takes ranks
      ``[ceil(k m/K), ceil((k+1) m/K))``, so the experts are equal in size (within one) and the
      largest norms (a heavy tail) get an expert of their own. Piecewise constant: the routing
      gets no gradient (eps_k gets one only with ``scale_grad=True``). Each expert is coded on its own smaller
      side (m_k x m_k when m_k <= d).
    - ``gate="soft"``: ``pi = softmax(Z W_g / tau)`` row-wise, ``Z`` the coded (normalised) rows.

    With K = 1 both reduce to :func:`coding_length` exactly (eps_1 = eps).

    Gradient of the scales (E5): by default (``scale_grad=False``) the eps_k are statistics of
    the batch held constant in the gradient (a stop-gradient): the value is the same, but the
    backward drops every term through eps_k and through the norms r_i that define it. With
    ``normalize=True`` the gradient then acts on the directions of the rows only
    (``dL/du_i . u_i = 0``), like :func:`coding_length`. Differentiating the scales rewards
    shrinking an expert's raw norms (smaller eps_k, larger a_k, larger logdet), which collapses
    training (E5); ``scale_grad=True`` keeps that full derivative.

    Parameters
    ----------
    Z : array (m, d)
        One sample per row.
    eps : float > 0
        Distortion epsilon, NOT squared.
    experts : int in [1, m]
        K.
    gate : "norm" or "soft"
    W_g : array (d, K), only for gate="soft"
        Gating weights (learnable).
    tau : float > 0
        Softmax temperature (gate="soft").
    normalize : bool
        l2-normalise the rows before coding and gating (default).
    scale_grad : bool
        Differentiate eps_k (through the norms r_i and, for gate="soft", through pi). Default
        False: eps_k is held constant in the gradient.
    expert_eps : array (K,) > 0, optional, only for gate="norm"
        Per-expert epsilons (NOT squared) used instead of ``eps * rbar_k / rbar``, expert k
        being the k-th norm range from the smallest. They are constants, so ``scale_grad``
        has nothing to differentiate.

    Returns
    -------
    L : 0-d scalar of Z's backend and dtype
    cache : tuple for :func:`moe_coding_length_backward`
    """
    _check_rows("Z", Z)
    normalize = _check_flag("normalize", normalize)
    scale_grad = _check_flag("scale_grad", scale_grad)
    eps = _check_eps(eps, *Z.shape, Z.dtype)
    m, d = Z.shape
    K = check_int("experts", experts, lo=1, hi=m)
    check_choice("gate", gate, GATES)
    tau = check_positive("tau", tau)
    if gate == "soft":
        if W_g is None:
            raise MecrefError(f"W_g must be a (d, K) = ({d}, {K}) array for gate='soft', got None")
        check_array("W_g", W_g, ndim=2)
        if W_g.shape != (d, K):
            raise MecrefError(f"W_g must have shape (d, K) = ({d}, {K}), got {tuple(W_g.shape)}")
    elif W_g is not None:
        raise MecrefError("W_g is used only with gate='soft'; got an array with gate='norm'")
    if expert_eps is not None:
        if gate != "norm":
            raise MecrefError(f"expert_eps is used only with gate='norm'; got an array with "
                              f"gate={gate!r}")
        check_array("expert_eps", expert_eps, ndim=1)
        if expert_eps.shape != (K,):
            raise MecrefError(f"expert_eps must have shape (K,) = ({K},), got "
                              f"{tuple(expert_eps.shape)}")
        if not bool(array_module(expert_eps).all(expert_eps > 0)):
            raise MecrefError(f"expert_eps must be > 0, got {to_host(expert_eps).tolist()!r}")
    xp = array_module(Z, W_g, expert_eps)

    if normalize:
        Zc, r = _unit_rows(Z, "Z")
    else:
        _check_unnormalized("Z", Z, d / (m * eps ** 2))
        Zc, r = Z, xp.sqrt(row_dot(Z, Z))
    if gate == "norm":
        # stable, so ties keep the row order (CuPy's argsort is always stable and older
        # versions take no kind)
        order = xp.argsort(r, kind="stable") if xp is np else xp.argsort(r)
        bounds = [-(-k * m // K) for k in range(K + 1)]
        groups = [xp.sort(order[bounds[k]:bounds[k + 1]]) for k in range(K)]
        pi = xp.zeros((m, K), dtype=Z.dtype)
        for k, idx in enumerate(groups):
            pi[idx, k] = 1
    else:
        logits = (Zc @ W_g) / tau
        if not bool(xp.isfinite(logits).all()):
            raise MecrefError(f"tau = {tau!r} is too small: Z W_g / tau overflows {Z.dtype}")
        pi = xp.exp(logits - logits.max(axis=1, keepdims=True))
        pi /= pi.sum(axis=1, keepdims=True)
        groups = None
    mk = pi.sum(axis=0)                      # (K,)
    R = rbar = None
    if expert_eps is None:
        R = pi.T @ r                         # (K,)  R_k = sum_i pi_ik r_i = m_k rbar_k
        if values_checked() and not bool(xp.all(R > 0)):
            raise MecrefError("an expert's rows all have zero norm, so its eps_k = eps * rbar_k "
                              "/ rbar is 0: give rows with non-zero norm")
        Rsum = R.sum()                       # = sum_i r_i, since sum_k pi_ik = 1
        rbar = Rsum / m
        ratio = (R * m) / (mk * Rsum)        # eps_k / eps = rbar_k / rbar (exactly 1 for K = 1)
        a = (d / (m * eps ** 2)) * (m / mk) / ratio ** 2   # a_k = d / (m_k eps_k^2)
    else:
        ek = xp.asarray(expert_eps, dtype=Z.dtype)
        with np.errstate(divide="ignore", over="ignore"):   # refused just below
            a = d / (mk * ek ** 2)
        if not bool(xp.all(xp.isfinite(a) & (a > 0))):
            raise MecrefError(f"expert_eps = {to_host(expert_eps).tolist()!r} gives a_k = "
                              f"d / (m_k eps_k^2) that are not finite positive {Z.dtype} numbers")
        scale_grad = False                   # given constants: nothing to differentiate
    c = (mk + d) / 2
    try:
        X, Kz, facs, logdets = _moe_factors(gate, Zc, pi, groups, a, K)
    except _NotPositiveDefinite:
        raise _pd_error(eps, float(to_host(a.max())), Z.dtype) from None
    ell = xp.stack(logdets)                  # (K,) logdet(I_d + a_k Z^T Pi_k Z)
    L = (c * ell).sum() - (mk * xp.log(mk / m)).sum()
    return L, (gate, Zc, r, normalize, scale_grad, pi, groups, X, Kz, facs, ell, mk, R, rbar, a, c,
               W_g, tau)


def _moe_factors(gate, Zc, pi, groups, a, K):
    """The experts' factors and log-determinants (E5), on the smaller side of each."""
    xp = array_module(Zc)
    m, d = Zc.shape
    X = Kz = None
    if gate == "norm":                       # expert k codes its own rows Z_k (m_k, d)
        X = [Zc[idx] for idx in groups]
        facs, logdets = zip(*_chol_logdets([_gram(X[k], a[k]) for k in range(K)]))
    elif m > d:                              # d x d side: I_d + a_k Z^T Pi_k Z
        X = [xp.sqrt(pi[:, k:k + 1]) * Zc for k in range(K)]
        facs, logdets = zip(*_chol_logdets([_gram(X[k], a[k]) for k in range(K)]))
    else:                                    # m x m side: I_m + a_k Pi_k^1/2 Z Z^T Pi_k^1/2
        Kz = Zc @ Zc.T
        s = xp.sqrt(pi)
        facs, logdets = zip(*_chol_logdets([_add_identity(Kz * (a[k] * s[:, k:k + 1] * s[:, k]))
                                            for k in range(K)]))
    return X, Kz, facs, logdets


def moe_coding_length_backward(cache, dL=1.0):
    r"""Gradients of :func:`moe_coding_length` (derivations E5).

    With ``B_k = I_d + a_k Z^T Pi_k Z``, ``V_k = Z B_k^{-1}`` (m, d), ``q_ik = z_i^T B_k^{-1} z_i``
    and ``gamma_k = dlogdet B_k / da_k = sum_i pi_ik q_ik``:

    .. math::

        \frac{\partial L}{\partial Z}\Big|_{\pi, r} = \sum_k 2 c_k a_k \Pi_k V_k, \qquad
        \frac{\partial L}{\partial r_i} = \sum_k 2 c_k \gamma_k a_k
              \Big(\frac{1}{m \bar r} - \frac{\pi_{ik}}{R_k}\Big),

        \frac{\partial L}{\partial \pi_{ik}} = c_k a_k q_{ik}
              + c_k \gamma_k a_k \Big(\frac{1}{m_k} - \frac{2 r_i}{R_k}\Big)
              + \frac{\ell_k}{2} - \log\frac{m_k}{m} - 1

    (``R_k = sum_i pi_ik r_i``, ``ell_k = logdet B_k``). These are the full derivatives
    (``scale_grad=True``). By default (``scale_grad=False``, or with ``expert_eps``) eps_k is
    held constant: ``dL/dr_i = 0`` and the middle term of ``dL/dpi_ik`` is
    ``-c_k gamma_k a_k / m_k`` (only ``a_k = d / (m_k eps_k^2)`` through m_k). Soft gating goes on through the softmax,
    ``dS = pi * (dpi - sum_k pi_k dpi_k)``, ``S = Z W_g / tau``:
    ``dW_g = Z^T dS / tau`` and ``dZ += dS W_g^T / tau``. Hard routing is piecewise constant:
    no gradient through pi. Finally through the normalisation (E2) and, with ``scale_grad``,
    the norms ``r_i = |u_i|`` (``dr_i/du_i = u_i / r_i``). (eps is NOT squared.)

    Returns
    -------
    dZ : array (m, d)
    dW_g : array (d, K) for gate="soft", None for gate="norm"
    """
    (gate, Zc, r, normalize, scale_grad, pi, groups, X, Kz, facs, ell, mk, R, rbar, a, c, W_g,
     tau) = cache
    xp = array_module(Zc)
    m, d = Zc.shape
    K = pi.shape[1]
    if gate == "norm":
        dZ = xp.empty_like(Zc)                        # the experts partition the rows
        gamma = []
        for k in range(K):
            V = _gram_solve(facs[k], X[k])            # Z_k B_k^{-1}, (m_k, d)
            gamma.append(xp.sum(X[k] * V))
            dZ[groups[k]] = (2 * c[k] * a[k]) * V
        gamma = xp.stack(gamma)
    elif Kz is None:                                  # d x d side: V_k = Z B_k^{-1}
        dZ = xp.zeros_like(Zc)
        q = xp.empty_like(pi)
        for k in range(K):
            V = _chol_solve(facs[k], Zc.T).T
            q[:, k] = row_dot(Zc, V)
            dZ += (2 * c[k] * a[k]) * pi[:, k:k + 1] * V
        gamma = xp.sum(pi * q, axis=0)
    else:  # m x m side: V_k = Z - a_k Kz H_k Z, H_k = Pi_k^1/2 G_k^{-1} Pi_k^1/2 (Woodbury)
        q = xp.empty_like(pi)
        M = xp.zeros_like(Kz)
        for k in range(K):
            s = xp.sqrt(pi[:, k])
            H = s[:, None] * _chol_solve(facs[k], xp.diag(s))
            KH = Kz @ H
            q[:, k] = xp.diagonal(Kz) - a[k] * row_dot(KH, Kz)
            M += (2 * c[k] * a[k] ** 2) * pi[:, k:k + 1] * KH
        gamma = xp.sum(pi * q, axis=0)
        dZ = (2 * pi @ (c * a))[:, None] * Zc - M @ Zc
    w = c * gamma * a                                  # (K,) dL/d(log a_k)
    dW_g = None
    if gate == "soft":                                 # d log a_k / d pi_ik (eps_k held or not)
        dloga = 1 / mk - 2 * r[:, None] / R if scale_grad else -1 / mk
        dpi = c * a * q + w * dloga + ell / 2 - xp.log(mk / m) - 1
        dS = pi * (dpi - xp.sum(pi * dpi, axis=1, keepdims=True)) / tau
        dW_g = Zc.T @ dS
        dZ += dS @ W_g.T
    if normalize:
        dZ = _unit_rows_backward(Zc, r, dZ)
    if scale_grad:                                     # through eps_k and the norms r_i
        dr = 2 * (w.sum() / (m * rbar) - pi @ (w / R))     # (m,)
        if normalize:
            dZ += dr[:, None] * Zc
        else:
            safe = xp.where(r > 0, r, 1)
            dZ += (dr / safe)[:, None] * Zc
    dL = float(dL)
    dZ *= dL
    if dW_g is not None:
        dW_g *= dL
    return dZ, dW_g
