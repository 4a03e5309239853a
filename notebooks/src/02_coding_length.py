# %% [markdown]
# # 2. The coding length: what it measures, how to compute it, how to climb it
#
# MEC-Quant regularises a quantized network by keeping its features' *entropy* high. The
# entropy is measured by the coding length of Ma et al. (2007), the number of nats needed to
# code $m$ samples $z_i \in \mathbb R^d$ (the rows of $Z$, unit length) with a Gaussian
# codebook up to a mean squared error $\epsilon^2$:
#
# $$L(Z; \epsilon) = \mu \log\det(I_d + \lambda Z^T Z), \qquad
#   \mu = \frac{m + d}{2}, \qquad \lambda = \frac{d}{m \epsilon^2}.$$
#
# (`eps` is $\epsilon$ itself, not its square; logarithms are natural, so $L$ is in nats.)
# This notebook follows `mecref.entropy.coding_length` step by step:
#
# 1. what the log-determinant measures: collapsed against spread features, and the role of $\epsilon$;
# 2. Sylvester's identity: the $m \times m$ and $d \times d$ sides agree, and what each costs;
# 3. the Taylor series MEC trains with: when it converges, and the warning when it does not;
# 4. a gradient ascent that spreads points over the sphere, with the closed-form gradient.
#
# Derivations: `docs/derivations.md`, sections E1-E4. The timings below run on one BLAS
# thread (set in the next cell, before NumPy loads), so that they measure the work and not the
# scheduling of a shared machine.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before NumPy loads: one BLAS thread
# %matplotlib inline
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg

from mecref.entropy import ConvergenceWarning, coding_length, coding_length_backward, mec_loss
from mecref.plotting import use_style

SMOKE = os.environ.get("MECREF_SMOKE") == "1"   # the tests run every notebook small
use_style()
rng = np.random.default_rng(0)


def unit_rows(A):
    """Rows scaled to unit length: points on the sphere S^(d-1)."""
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def around(direction, spread, m):
    """m unit vectors scattered around one direction; spread = 0 is a single point."""
    direction = np.asarray(direction, dtype=float)
    return unit_rows(direction + spread * rng.standard_normal((m, direction.size)))


def best_time_ms(f, repeat):
    """Best wall time of f() over `repeat` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


# %% [markdown]
# ## 1. What the log-determinant measures
#
# With $\sigma_1^2, \dots, \sigma_d^2$ the eigenvalues of $Z^T Z$,
#
# $$\log\det(I_d + \lambda Z^T Z) = \sum_{j=1}^{d} \log(1 + \lambda \sigma_j^2),
#   \qquad \sum_j \sigma_j^2 = \operatorname{tr}(Z^T Z) = m \ \text{(unit rows)}.$$
#
# The total $\sum_j \sigma_j^2$ is fixed, and $\log$ is concave, so the sum is largest when the
# energy is spread evenly over all $d$ directions ($\sigma_j^2 = m/d$) and smallest when the
# features collapse onto one direction ($\sigma_1^2 = m$). The coding length measures how
# evenly the features fill the space: exactly what a regulariser against collapse, or against
# the loss of information that quantization causes, should raise.
#
# In two dimensions: points on the unit circle, from collapsed to uniform.

# %%
m2 = 64 if SMOKE else 256
eps = 0.5
sets = {"collapsed": around([1.0, 0.0], 0.05, m2),
        "partly spread": around([1.0, 0.0], 0.6, m2),
        "uniform": unit_rows(rng.standard_normal((m2, 2)))}
fig, axes = plt.subplots(1, 3, figsize=(11, 3.9))
circle = np.linspace(0, 2 * np.pi, 200)
for ax, (name, Z) in zip(axes, sets.items()):
    L = float(coding_length(Z, eps)[0])
    ax.plot(np.cos(circle), np.sin(circle), color="0.8", lw=1)
    ax.plot(Z[:, 0], Z[:, 1], "o", alpha=0.6, label=f"m = {m2} points")
    ax.set(title=f"{name}: L = {L:.0f} nats", xlabel="$z_1$", ylabel="$z_2$", aspect="equal",
           xlim=(-1.3, 1.3), ylim=(-1.3, 1.3))
    ax.legend(loc="lower left")
fig.suptitle(f"Coding length of points on the circle (d = 2, ε = {eps})")
plt.show()

# %% [markdown]
# ### The role of $\epsilon$
#
# $\epsilon$ is the resolution of the code: a distortion $\epsilon^2$ per sample is allowed,
# so structure finer than $\epsilon$ costs nothing. In $d = 16$ dimensions, the next figure
# sweeps the spread of the features for several $\epsilon$ (left), and compares the two
# extremes (right): uniform features against one direction,
#
# $$\frac{L_{\text{uniform}}}{L_{\text{collapsed}}} \approx
#   \frac{d \log(1 + \lambda m / d)}{\log(1 + \lambda m)}
#   \;\longrightarrow\; \begin{cases} d & \epsilon \to 0 \\ 1 & \epsilon \to \infty. \end{cases}$$
#
# A large $\epsilon$ makes $\log(1 + \lambda\sigma^2) \approx \lambda\sigma^2$: the coding length
# becomes $\mu\lambda \operatorname{tr}(Z^T Z) = \mu d/\epsilon^2$ whatever the features look
# like, and stops telling collapsed from spread. A small $\epsilon$ separates them by up to a
# factor of $d$.

# %%
m, d = (64, 16) if SMOKE else (512, 16)
spreads = np.geomspace(0.01, 10, 8 if SMOKE else 25)
eps_values = (0.1, 0.3, 1.0, 3.0)
pole = np.eye(d)[0]
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for e in eps_values:
    Ls = [float(coding_length(around(pole, sp, m), e)[0]) for sp in spreads]
    axes[0].plot(spreads, Ls, "o-", label=f"ε = {e:g}")
axes[0].set(xscale="log", yscale="log", xlabel="spread σ of the features around one direction",
            ylabel="coding length L (nats)", title=f"L against the spread (m = {m}, d = {d})")
axes[0].legend()

eps_sweep = np.geomspace(0.03, 30, 8 if SMOKE else 30)
uniform, collapsed = unit_rows(rng.standard_normal((m, d))), around(pole, 1e-3, m)
measured = [float(coding_length(uniform, e)[0] / coding_length(collapsed, e)[0]) for e in eps_sweep]
lam = d / (m * eps_sweep ** 2)
axes[1].plot(eps_sweep, measured, "o", label="measured")
axes[1].plot(eps_sweep, d * np.log1p(lam * m / d) / np.log1p(lam * m), "-",
             label="d log(1 + λm/d) / log(1 + λm)")
axes[1].axhline(d, color="0.5", ls=":", lw=1)
axes[1].axhline(1, color="0.5", ls=":", lw=1)
axes[1].set(xscale="log", xlabel="ε (distortion, units of the unit-norm features)",
            ylabel="L(uniform) / L(collapsed)", title="how well L tells spread from collapsed")
axes[1].legend()
plt.show()

# %% [markdown]
# ## 2. Sylvester: two sides, one value, different costs
#
# $\det(I_m + \lambda Z Z^T) = \det(I_d + \lambda Z^T Z)$: the $m \times m$ Gram matrix of the
# samples and the $d \times d$ one of the features have the same non-zero eigenvalues. Both
# sides are symmetric positive definite, so each log-determinant is a Cholesky factorisation,
# $\log\det G = 2 \sum_j \log (\mathrm{chol}\,G)_{jj}$. `coding_length` takes the smaller side.
# First, the two sides agree:

# %%
Z = unit_rows(rng.standard_normal((50, 20)))
lam = 20 / (50 * eps ** 2)
side_m = np.linalg.slogdet(np.eye(50) + lam * Z @ Z.T)[1]
side_d = np.linalg.slogdet(np.eye(20) + lam * Z.T @ Z)[1]
L, _ = coding_length(Z, eps)
print(f"logdet(I_m + λ Z Zᵀ) = {side_m:.12f}   (m × m = 50 × 50)")
print(f"logdet(I_d + λ Zᵀ Z) = {side_d:.12f}   (d × d = 20 × 20)")
print(f"μ × logdet = {(50 + 20) / 2 * side_d:.10f},   coding_length = {float(L):.10f}")

# %% [markdown]
# The cost of each side: forming the Gram matrix, $O(m^2 d)$ against $O(m d^2)$, then the
# factorisation, $O(m^3)$ against $O(d^3)$. Measured below with SciPy's Cholesky (best of a
# few runs), once with $d$ fixed as the batch $m$ grows, once with $m$ fixed as $d$ grows;
# `coding_length` (the value, with its checks and the row normalisation) follows the cheaper
# side.

# %%
def logdet_side(Z, lam, side):
    """log det of I + lam Z Z^T (side "m") or I + lam Z^T Z (side "d"), by Cholesky."""
    G = Z @ Z.T if side == "m" else Z.T @ Z
    G *= lam
    G[np.diag_indices_from(G)] += 1
    c, _ = scipy.linalg.cho_factor(G, lower=True, check_finite=False)
    return 2 * np.log(np.diag(c)).sum()


fixed = 16 if SMOKE else 128
sizes = [8, 16, 32] if SMOKE else [16, 32, 64, 128, 256, 512, 1024, 2048]
repeat = 2 if SMOKE else 5
fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, vary in zip(axes, ("m", "d")):
    t = {"m": [], "d": [], "coding_length": []}
    for n_ in sizes:
        m_, d_ = (n_, fixed) if vary == "m" else (fixed, n_)
        Z = unit_rows(rng.standard_normal((m_, d_))).astype(np.float32)
        lam = d_ / (m_ * eps ** 2)
        t["m"].append(best_time_ms(lambda: logdet_side(Z, lam, "m"), repeat))
        t["d"].append(best_time_ms(lambda: logdet_side(Z, lam, "d"), repeat))
        t["coding_length"].append(best_time_ms(lambda: coding_length(Z, eps), repeat))
    ax.plot(sizes, t["m"], "o-", label="m × m side: I + λ Z Zᵀ")
    ax.plot(sizes, t["d"], "s-", label="d × d side: I + λ Zᵀ Z")
    ax.plot(sizes, t["coding_length"], "k.:", label="coding_length (smaller side)")
    ax.axvline(fixed, color="0.5", ls="--", lw=1)
    other = "d" if vary == "m" else "m"
    ax.set(xscale="log", yscale="log", xlabel=f"{'batch size m' if vary == 'm' else 'feature dim d'}",
           ylabel="time (ms)", title=f"vary {vary}, {other} = {fixed} (float32, 1 thread)")
    ax.legend()
plt.show()

# %% [markdown]
# The curves cross where $m = d$ (dashed line): for a batch smaller than the feature
# dimension the $m \times m$ side is the cheap one, and for a larger batch the $d \times d$
# side. The same holds for the gradient,
#
# $$\frac{\partial L}{\partial Z} = 2\mu\lambda\,(I_m + \lambda Z Z^T)^{-1} Z
#   = 2\mu\lambda\, Z (I_d + \lambda Z^T Z)^{-1},$$
#
# which reuses the Cholesky factor of whichever side was taken (one triangular solve pair).

# %% [markdown]
# ## 3. The Taylor series, and when it diverges
#
# MEC trains with two views $Z_1, Z_2$ of the batch and a polynomial instead of the
# log-determinant: with $C = \lambda Z_1 Z_2^T$,
#
# $$\log\det(I + C) = \sum_{k=1}^{\infty} \frac{(-1)^{k+1}}{k} \operatorname{tr}(C^k)
#   \approx T_n(C) = \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k} \operatorname{tr}(C^k),$$
#
# only matrix products, which GPUs like. The series converges if and only if the spectral
# radius $\rho(C) < 1$, and then the error falls like $\rho^n / n$. Because
# $\rho \propto \lambda \propto 1/\epsilon^2$, the choice of $\epsilon$ decides: the value
# $\epsilon_\rho = \epsilon_1 \sqrt{\rho(\epsilon_1)/\rho}$ gives any chosen radius. Below,
# $\rho = 0.5$ and $0.9$ converge (fast, slowly) and $\rho = 1.3$ diverges: the error grows
# with the order, and `mec_loss` says so with a `ConvergenceWarning`. The dotted lines have the
# slope $\rho^n$, drawn through the last point: far enough out, the eigenvalues of largest
# modulus set the rate (the dips are cancellations between complex eigenvalues).
# (`mec_loss` returns $-\mu \log\det(I + C)$, or $-\mu T_n(C)$, a loss to minimise.)

# %%
m, d = (32, 8) if SMOKE else (128, 32)
orders = np.arange(1, 9 if SMOKE else 31)
Z1 = unit_rows(rng.standard_normal((m, d)))
Z2 = unit_rows(Z1 + 0.2 * rng.standard_normal((m, d)))   # a second view: Z1 perturbed
rho_at_1 = np.abs(np.linalg.eigvals(d / m * Z1 @ Z2.T)).max()   # rho at eps = 1
caught, warned = [], {}
fig, ax = plt.subplots(figsize=(7, 4.2))
for rho in (0.5, 0.9, 1.3):
    e = np.sqrt(rho_at_1 / rho)
    exact = float(mec_loss(Z1, Z2, e)[0])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", ConvergenceWarning)
        err = [abs(float(mec_loss(Z1, Z2, e, order=int(n))[0]) - exact) / abs(exact) for n in orders]
    mine = [str(x.message) for x in w if issubclass(x.category, ConvergenceWarning)]
    warned[rho], caught = len(mine), caught + mine
    line, = ax.plot(orders, err, "o-", label=f"ρ(C) = {rho:g} (ε = {e:.3f})")
    ax.plot(orders, err[-1] * rho ** (orders - orders[-1]), color=line.get_color(), ls=":", lw=1)
ax.set(yscale="log", xlabel="order n of the series", ylabel="relative error |T_n − exact| / |exact|",
       title=f"Taylor series of log det(I + λ Z₁ Z₂ᵀ), m = {m}, d = {d} (dotted: slope ρⁿ)")
ax.legend()
plt.show()
print("ConvergenceWarnings (one per order n) for each radius:", warned)
print("the first one says:\n" + caught[0])

# %% [markdown]
# The guarantee behind the warning's advice: for unit rows $\rho(C) \le \lambda \lVert Z_1
# \rVert_2 \lVert Z_2 \rVert_2 \le \lambda m = d / \epsilon^2$, so $\epsilon > \sqrt d$
# converges for any features. Spread features need far less ($\rho \approx 1/\epsilon^2$ when
# the energy is even over the $d$ directions), but the more the features collapse, the larger
# $\epsilon$ must be; MEC starts training with a large $\epsilon$ for this reason.

# %% [markdown]
# ## 4. Climbing the coding length: points spreading over the sphere
#
# The gradient is closed form (E1), and through the row normalisation $z = u / |u|$ it is
# projected onto the sphere's tangent plane, $\partial L/\partial u = (I - z z^T)\,
# \partial L/\partial z / |u|$ (E2). `coding_length_backward` returns it; a check against
# central differences along a random direction $V$ first:

# %%
U = rng.standard_normal((20, 5))
V = rng.standard_normal(U.shape)
L, cache = coding_length(U, eps)
dU = coding_length_backward(cache)
h = 1e-6
fd = (float(coding_length(U + h * V, eps)[0]) - float(coding_length(U - h * V, eps)[0])) / (2 * h)
print(f"closed form <dL/dU, V> = {np.sum(dU * V):.10f}")
print(f"central difference     = {fd:.10f}   (relative gap {abs(fd - np.sum(dU * V)) / abs(fd):.1e})")

# %% [markdown]
# Now $m$ points on the sphere $S^2$, bunched around the north pole, climb $L$: each step
# moves them along the gradient and back onto the sphere,
# $u \leftarrow (u + \eta\,\partial L/\partial u) / |u + \eta\,\partial L/\partial u|$.
# The upper bound is the perfectly even spread, $\mu\, d \log(1 + \lambda m / d)$.

# %%
m3, d3 = (32, 3) if SMOKE else (128, 3)
steps = 15 if SMOKE else 200
lr = 3e-3
U = around([0.0, 0.0, 1.0], 0.15, m3)
start = U.copy()
history = []
for _ in range(steps):
    L, cache = coding_length(U, eps)
    history.append(float(L))
    U = unit_rows(U + lr * coding_length_backward(cache))
history.append(float(coding_length(U, eps)[0]))
lam3 = d3 / (m3 * eps ** 2)
bound = (m3 + d3) / 2 * d3 * np.log1p(lam3 * m3 / d3)

fig = plt.figure(figsize=(13, 4.2))
u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 24), np.linspace(0, np.pi, 13))
for i, (P, name) in enumerate(((start, "before"), (U, f"after {steps} steps"))):
    ax = fig.add_subplot(1, 3, i + 1, projection="3d")
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.5)
    ax.scatter(P[:, 0], P[:, 1], P[:, 2], s=12, color="C0" if i == 0 else "C1", depthshade=False)
    ax.set(title=f"{name}: L = {history[0 if i == 0 else -1]:.1f} nats", xlabel="$z_1$",
           ylabel="$z_2$", zlabel="$z_3$", box_aspect=(1, 1, 1), xticks=[-1, 0, 1],
           yticks=[-1, 0, 1], zticks=[-1, 0, 1])
    ax.view_init(elev=20, azim=-60)
ax = fig.add_subplot(1, 3, 3)
ax.plot(history, label="L during the ascent")
ax.axhline(bound, color="0.5", ls="--", lw=1, label="even spread: μ d log(1 + λm/d)")
ax.set(xlabel="gradient step", ylabel="coding length L (nats)", title=f"m = {m3}, d = 3, ε = {eps}")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# The points leave the pole and spread out, and $L$ rises towards the even-spread bound:
# maximising the coding length pushes features apart in every direction at once, which is
# the effect MEC-Quant wants on the features of a quantized network. Note what "even" means
# here: $L$ depends on the points only through $Z^T Z = \sum_i z_i z_i^T$, which cannot tell
# $z$ from $-z$, so the bound is reached as soon as the second moment is isotropic
# ($Z^T Z = (m/d) I$), for instance by points that cover one hemisphere evenly. A Gaussian
# codebook measures spread in every *direction*, not coverage of the whole sphere.
