# %% [markdown]
# # 3. The mixture-of-experts coding length
#
# The MEC-Quant abstract promises a "mixture of experts" form of the entropy term that is
# faster and copes with long-tailed value distributions. The paper's text is not public, so
# `mecref` fixes a reading (`docs/derivations.md`: E5 derives it, E6 says what is the paper's
# and what is this project's; this notebook's own choices are marked as such): the coding
# length of *mixed* data of Ma, Derksen, Hong and Wright (2007). $K$ experts each code the
# samples routed to them with their own Gaussian codebook, and pay for saying which expert a
# sample belongs to:
#
# $$L_{moe}(Z) = \sum_{k=1}^{K} \Big[ \frac{m_k + d}{2} \log\det\Big(I_d + \frac{d}{m_k \epsilon_k^2} Z^T \Pi_k Z\Big)
#    - m_k \log\frac{m_k}{m} \Big],$$
#
# with $\Pi_k = \mathrm{diag}(\pi_k(z_1), \dots, \pi_k(z_m))$ the gates ($\sum_k \pi_k = 1$),
# $m_k = \operatorname{tr}\Pi_k$ the expert's share of the batch, and
# $\epsilon_k = \epsilon\,\bar r_k / \bar r$ each expert's distortion, scaled to the mean norm
# $\bar r_k$ of its samples. The gates are either hard, routing by the sample's norm
# (`gate="norm"`, equal-sized experts by norm quantile), or soft,
# $\pi = \mathrm{softmax}(Z W_g / \tau)$ with a learnable $W_g$ (`gate="soft"`).
#
# The story: why one codebook fails on long-tailed features and experts by norm do not; that
# $K = 1$ is the plain coding length; Fischer's inequality, which says what the experts drop;
# the speed-up this buys as the batch grows; and soft gates learned with their closed-form
# gradient. Timings run on one BLAS thread (set before NumPy loads).

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before NumPy loads: one BLAS thread
# %matplotlib inline
import time
from itertools import permutations

import matplotlib.pyplot as plt
import numpy as np

from mecref.entropy import (
    coding_length, coding_length_backward, moe_coding_length, moe_coding_length_backward,
)
from mecref.plotting import use_style

SMOKE = os.environ.get("MECREF_SMOKE") == "1"   # the tests run every notebook small
use_style()
rng = np.random.default_rng(0)


def unit_rows(A):
    """Rows scaled to unit length."""
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def best_time_ms(f, repeat):
    """Best wall time of f() over `repeat` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


# %% [markdown]
# ## 1. Long-tailed features: where one codebook fails
#
# Features of a network before any normalisation (activations, or the penultimate layer of a
# quantized network) often have long-tailed norms: most samples are small, a few are huge.
# Here the norms $r_i$ follow a Pareto law with tail index 1.5 (infinite variance), and the
# directions come in two versions: the *bulk* (the 90% smallest norms) either collapsed around
# one direction or spread uniformly, while the tail (the 10% largest) is spread in both.
# A regulariser should see the difference, and push the collapsed bulk apart.
#
# The features are coded as they are (`normalize=False`), at a resolution $\epsilon$ of half
# the mean norm. One codebook (`coding_length`) has one resolution for everyone: the tail's
# energy fills its log-determinant, and the bulk is below its resolution. The experts by norm
# (`moe_coding_length`, hard gates) code each norm range at its own resolution
# $\epsilon_k = \epsilon\,\bar r_k/\bar r$.

# %%
m, d = (128, 16) if SMOKE else (512, 32)
r = 1 + rng.pareto(1.5, m)                            # long-tailed norms, r >= 1
tail = r > np.quantile(r, 0.9)
spread_dirs = unit_rows(rng.standard_normal((m, d)))
bulk_collapsed = unit_rows(unit_rows(rng.standard_normal((1, d))) + 0.15 * rng.standard_normal((m, d)))
features = {"bulk collapsed": r[:, None] * np.where(tail[:, None], spread_dirs, bulk_collapsed),
            "bulk spread": r[:, None] * spread_dirs}
eps = 0.5 * r.mean()                                  # in the features' own units
experts = (2, 4, 8)


def code(Z, K):
    """(L, dL/dZ) of one codebook (K = 0) or of K experts routed by norm."""
    if K == 0:
        L, cache = coding_length(Z, eps, normalize=False)
        return float(L), coding_length_backward(cache)
    L, cache = moe_coding_length(Z, eps, experts=K, normalize=False, scale_grad=True)
    return float(L), moe_coding_length_backward(cache)[0]


def direction_grad(Z, dZ):
    """|dL/d(direction)| per row: r_i (I - z_i z_i^T) dL/du_i, the push that turns a sample."""
    z = unit_rows(Z)
    tangent = dZ - z * np.sum(z * dZ, axis=1, keepdims=True)
    return np.linalg.norm(tangent, axis=1) * np.linalg.norm(Z, axis=1)


names = ["one codebook"] + [f"K = {K} experts" for K in experts]
L = {name: {k: code(Z, K)[0] for k, Z in features.items()} for name, K in zip(names, (0,) + experts)}
gap = [L[n]["bulk spread"] / L[n]["bulk collapsed"] - 1 for n in names]
push = {n: direction_grad(features["bulk collapsed"], code(features["bulk collapsed"], K)[1])
        for n, K in zip(names, (0,) + experts)}

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
ax = axes[0]
ax.hist(r, bins=np.geomspace(1, r.max(), 40), color="C0", alpha=0.7, label="norms r_i")
for q in np.quantile(r, np.arange(1, 4) / 4):
    ax.axvline(q, color="C1", ls="--", lw=1)
ax.plot([], [], color="C1", ls="--", lw=1, label="expert boundaries, K = 4")
ax.set(xscale="log", yscale="log", xlabel="norm r_i (feature units)", ylabel="samples",
       title=f"Pareto(1.5) norms, m = {m}")
ax.legend()
ax = axes[1]
ax.bar(names, 100 * np.array(gap), color=["C0"] + ["C2"] * len(experts))
ax.set(ylabel="L(bulk spread) / L(bulk collapsed) − 1  (%)",
       title="does L see the bulk collapse?")
ax.tick_params(axis="x", labelrotation=15)
ax = axes[2]
for n, marker in ((names[0], "o"), (names[2], "s")):
    ax.plot(r, push[n], marker, ms=3, alpha=0.6, label=n)
ax.axvline(np.quantile(r, 0.9), color="0.5", ls=":", lw=1, label="tail: the 10% largest")
ax.set(xscale="log", yscale="log", xlabel="norm r_i (feature units)",
       ylabel="|∂L/∂ direction of u_i|", title="the push on each sample's direction (collapsed bulk)")
ax.legend()
plt.show()

for n in names:
    ratio = np.median(push[n][~tail]) / np.median(push[n][tail])
    print(f"{n:16s} L(collapsed) = {L[n]['bulk collapsed']:9.1f} nats, L(spread) = "
          f"{L[n]['bulk spread']:9.1f} nats; median push, bulk / tail = {ratio:.3f}")

# %% [markdown]
# One codebook barely notices whether 90% of the samples have collapsed, and the push it gives
# a bulk sample's direction is a small fraction of a tail sample's: its gradient would spend
# itself on the few largest features. Experts by norm see the collapse clearly, and push a
# bulk sample's direction several times to tens of times harder relative to the tail (as
# hard as a tail sample, or harder, from $K = 4$ on), because each norm range is coded at its own
# scale.

# %% [markdown]
# ## 2. One expert is the plain coding length
#
# With $K = 1$: $\Pi_1 = I$, $m_1 = m$, $\epsilon_1 = \epsilon$, and the routing term
# $m \log(m/m) = 0$, so $L_{moe} = L$. The same holds for the gradients, and for either gate
# (a softmax over one expert is 1).

# %%
Z = rng.standard_normal((96, 24)) * (1 + rng.pareto(1.5, 96))[:, None]
for normalize in (True, False):
    L1, c1 = coding_length(Z, 0.5, normalize=normalize)
    for gate, W_g in (("norm", None), ("soft", rng.standard_normal((24, 1)))):
        Lk, ck = moe_coding_length(Z, 0.5, experts=1, gate=gate, W_g=W_g, normalize=normalize)
        dZ_gap = np.abs(moe_coding_length_backward(ck)[0] - coding_length_backward(c1)).max()
        print(f"normalize={normalize!s:5}  gate={gate}:  L = {float(L1):.10f},  L_moe = {float(Lk):.10f},"
              f"  max |dZ_moe - dZ| = {dZ_gap:.1e}")
        assert np.isclose(float(Lk), float(L1), rtol=1e-12) and dZ_gap < 1e-9

# %% [markdown]
# ## 3. Fischer's inequality: what the experts leave out
#
# Sort the samples by expert. The $m \times m$ matrix $G = I_m + \lambda Z Z^T$ then has one
# diagonal block $G_{kk} = I_{m_k} + \lambda Z_k Z_k^T$ per expert, and off-diagonal blocks
# $\lambda Z_k Z_l^T$ for the similarity *between* experts. For a positive definite matrix,
# Fischer's inequality says
#
# $$\log\det G \;\le\; \sum_k \log\det G_{kk},$$
#
# with equality when the off-diagonal blocks vanish. The experts code only the diagonal
# blocks: the gap is the information shared between experts (the cross-expert correlation),
# which the mixture does not pay for, and which is also why it is cheaper. Below, on the
# long-tailed features of section 1 with the collapsed bulk (unit rows): the bulk's shared
# direction fills the off-diagonal blocks between the bulk's experts, and each expert pays
# for that direction again, so the gap grows with $K$. (Shown with one $\lambda$ for all
# blocks; the mixture then gives each block its own $a_k = d/(m_k \epsilon_k^2)$ and weight
# $(m_k + d)/2$.)

# %%
Zn = unit_rows(features["bulk collapsed"])
order = np.argsort(r, kind="stable")                  # experts by norm: sorted, then cut in K
lam = d / (m * 0.5 ** 2)
G = np.eye(m) + lam * Zn[order] @ Zn[order].T
whole = np.linalg.slogdet(G)[1]
Ks = (1, 2, 4, 8) if SMOKE else (1, 2, 4, 8, 16, 32)
blocks = []
for K in Ks:
    cuts = np.array_split(np.arange(m), K)
    blocks.append(sum(np.linalg.slogdet(G[np.ix_(c, c)])[1] for c in cuts))

fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
ax = axes[0]
shown = np.abs(G - np.eye(m))[::4, ::4]                # every 4th sample, to keep the image small
im = ax.imshow(shown, cmap="magma", extent=(0, m, m, 0), interpolation="nearest")
for b in np.cumsum([len(c) for c in np.array_split(np.arange(m), 4)])[:-1]:
    ax.axhline(b - 0.5, color="w", lw=1)
    ax.axvline(b - 0.5, color="w", lw=1)
fig.colorbar(im, ax=ax, label="|λ z_i · z_j|")
ax.set(title="|λ Z Zᵀ| (every 4th sample), sorted by norm; K = 4", xlabel="sample j (by norm)",
       ylabel="sample i (by norm)")
ax.grid(False)
ax = axes[1]
ax.plot(Ks, blocks, "o-", label="Σ_k log det G_kk (experts' blocks)")
ax.axhline(whole, color="C1", ls="--", label="log det G (whole)")
ax.set(xscale="log", xticks=Ks, xticklabels=[str(k) for k in Ks], xlabel="experts K",
       ylabel="log det (nats)", title="Fischer: the blocks bound the whole from above")
ax.legend()
plt.show()
for K, s in zip(Ks, blocks):
    print(f"K = {K:2d}: sum of block log dets - log det G = {s - whole:8.3f} nats")
    assert s >= whole - 1e-9 * abs(whole)

# %% [markdown]
# ## 4. The speed-up as the batch grows
#
# For a batch of $m$ samples in $d$ dimensions, the plain coding length factors the smaller
# side: about $\min(m^2 d + m^3/3,\; m d^2 + d^3/3)$ multiply-adds for the Gram matrix and its
# Cholesky factor. $K$ equal experts do the same on $m/K$ samples each, $K$ times. While an
# expert's batch is below $d$ this is $m^2 d/K + m^3/(3K^2)$: a speed-up of up to $K$ (more for
# the factorisation). Once $m/K > d$ every expert works on the $d \times d$ side, costs
# $m d^2/K + d^3/3$ each, and the gain is gone.
#
# Measured below: the value and the gradient (`coding_length` + `coding_length_backward`
# against `moe_coding_length` + `moe_coding_length_backward`, hard gates), float32, best of a
# few runs, with the model's speed-up dashed.

# %%
d_t = 32 if SMOKE else 1024
batch = [16, 32, 64] if SMOKE else [128, 256, 512, 1024, 2048]
repeat = 1 if SMOKE else 5


def flops(m, d):
    """Gram matrix + Cholesky on the cheaper side."""
    return min(m * m * d + m ** 3 / 3, m * d * d + d ** 3 / 3)


times = {0: [], **{K: [] for K in experts}}
for m_ in batch:
    Z = rng.standard_normal((m_, d_t)).astype(np.float32)
    Z *= (1 + rng.pareto(1.5, m_)).astype(np.float32)[:, None]
    times[0].append(best_time_ms(lambda: coding_length_backward(coding_length(Z, 0.5)[1]), repeat))
    for K in experts:
        times[K].append(best_time_ms(
            lambda: moe_coding_length_backward(moe_coding_length(Z, 0.5, experts=K)[1]), repeat))

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
axes[0].plot(batch, times[0], "ko-", label="coding_length (one codebook)")
for K in experts:
    line, = axes[0].plot(batch, times[K], "o-", label=f"moe_coding_length, K = {K}")
    speedup = np.array(times[0]) / np.array(times[K])
    axes[1].plot(batch, speedup, "o-", color=line.get_color(), label=f"K = {K} measured")
    model = [flops(m_, d_t) / (K * flops(m_ / K, d_t)) for m_ in batch]
    axes[1].plot(batch, model, ls="--", lw=1, color=line.get_color(), label=f"K = {K} model")
axes[0].axvline(d_t, color="0.5", ls=":", lw=1)
axes[0].set(xscale="log", yscale="log", xlabel="batch size m", ylabel="time, value + gradient (ms)",
            title=f"d = {d_t}, float32, 1 thread")
axes[1].axhline(1, color="0.5", ls=":", lw=1)
axes[1].set(xscale="log", yscale="log", xlabel="batch size m",
            ylabel="speed-up: t(one codebook) / t(K experts)", title="speed-up of the experts")
for ax in axes:
    ax.set_xticks(batch, labels=[str(m_) for m_ in batch])
    ax.set_xticks([], minor=True)
axes[0].legend()
axes[1].legend(ncol=2)
plt.show()
print("batch m      " + "".join(f"{m_:>9d}" for m_ in batch))
for K in experts:
    print(f"speed-up K={K}" + "".join(f"{t0 / tk:9.2f}" for t0, tk in zip(times[0], times[K])))

# %% [markdown]
# The model is an upper bound: the experts' speed-up needs batches large enough for the Gram
# products to dominate. At small $m$ every call does the same per-sample work either way (the
# row norms, the normalisation and its gradient, the routing) plus one factorisation per
# expert, so the measured gain stays far below the model's. As $m$ grows towards $d$ the
# products take over and the measured speed-up rises towards the model's (for $K = 2$ and
# $K = 4$ it levels off from $m = d/2$), largest for $K = 8$ from the second batch size on. At
# $m = 2d$ it falls again for every $K$, as the model does: the plain form has switched to its
# $d \times d$ side while experts of $m/K \le d$ samples still work on theirs. The printed rows
# under the figure give the measured speed-ups.

# %% [markdown]
# ## 5. Soft gates, learned
#
# With `gate="soft"` the gates are $\pi = \mathrm{softmax}(Z W_g/\tau)$ and $W_g$ ($d \times K$)
# has a closed-form gradient: through each expert's log-determinant, its size $m_k$ and
# distortion $\epsilon_k$, and the routing term, back through the softmax
# (`moe_coding_length_backward` returns it as `dW_g`). This section and section 2 take the full
# derivative, `scale_grad=True`; the library's default holds each expert's scale constant in the
# gradient, as training does (derivations E5). A check against central differences along a
# random direction first:

# %%
m_s, d_s, K_s = (96, 8, 4) if SMOKE else (192, 16, 4)
centres = unit_rows(rng.standard_normal((K_s, d_s)))
labels = np.repeat(np.arange(K_s), m_s // K_s)
Zs = unit_rows(centres[labels] + 0.1 * rng.standard_normal((m_s, d_s)))   # K_s clusters
tau, eps_s = 0.5, 0.5

W = 0.1 * rng.standard_normal((d_s, K_s))
V = rng.standard_normal(W.shape)
h = 1e-6
_, cache = moe_coding_length(Zs, eps_s, experts=K_s, gate="soft", W_g=W, tau=tau, scale_grad=True)
dW = moe_coding_length_backward(cache)[1]
plus = float(moe_coding_length(Zs, eps_s, experts=K_s, gate="soft", W_g=W + h * V, tau=tau)[0])
minus = float(moe_coding_length(Zs, eps_s, experts=K_s, gate="soft", W_g=W - h * V, tau=tau)[0])
fd = (plus - minus) / (2 * h)
print(f"closed form <dL/dW_g, V> = {np.sum(dW * V):.8f}")
print(f"central difference       = {fd:.8f}   (relative gap {abs(fd - np.sum(dW * V)) / abs(fd):.1e})")

# %% [markdown]
# What should the gates learn? This notebook's choice follows Ma et al. (2007), who segment
# data by *minimising* the mixed coding length: the partition that codes the data in the
# fewest nats tends to put similar samples together. So here $W_g$ descends $L_{moe}$
# (plain gradient descent, closed-form `dW_g`) on four clusters of points on the sphere,
# while the features stay fixed (in training the features themselves *climb* the coding
# length).
#
# The objective is not convex in the partition. From near-uniform random gates the descent
# often lets two clusters share one expert and leaves another empty: a local minimum, since
# fewer, larger experts pay less for routing. So, as k-means++ does, each expert starts from
# a sample, the $K$ samples chosen far apart (each the least similar to those already
# chosen), scaled down so that the gates start soft. Two measures of the gates: the share of
# samples whose most likely expert is their cluster's (best one-to-one matching of experts to
# clusters), and the gates' confidence, the mean of $\max_k \pi_{ik}$ ($1/K$ for uniform gates).

# %%
steps = 20 if SMOKE else 100
lr = 0.003
L_plain = float(coding_length(Zs, eps_s)[0])


def distant_samples(Z, K):
    """K rows of Z, each the least similar (cosine) to those already chosen; the first at random."""
    chosen = [int(rng.integers(len(Z)))]
    while len(chosen) < K:
        chosen.append(int(np.argmin((Z @ Z[chosen].T).max(axis=1))))
    return Z[chosen]


W = 0.2 * distant_samples(Zs, K_s).T                   # (d, K): expert k starts at one sample


def gates(W):
    """pi = softmax(Z W / tau), row-wise (what gate="soft" computes), for the plots."""
    logits = Zs @ W / tau
    pi = np.exp(logits - logits.max(axis=1, keepdims=True))
    return pi / pi.sum(axis=1, keepdims=True)


def matched(pi):
    """Share of samples whose most likely expert is their cluster's, under the best one-to-one
    matching of experts to clusters."""
    top = pi.argmax(axis=1)
    return max(np.mean(np.asarray(perm)[labels] == top) for perm in permutations(range(K_s)))


history = {"L": [], "matched": [], "confidence": []}
pi_before = gates(W)
for _ in range(steps + 1):
    L, cache = moe_coding_length(Zs, eps_s, experts=K_s, gate="soft", W_g=W, tau=tau,
                                 scale_grad=True)
    history["L"].append(float(L))
    pi = gates(W)
    history["matched"].append(matched(pi))
    history["confidence"].append(pi.max(axis=1).mean())
    W = W - lr * moe_coding_length_backward(cache)[1]
pi_after = gates(W)

fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), gridspec_kw={"width_ratios": [3, 3, 1.2, 1.2]})
axes[0].plot(history["L"], label="L_moe, soft gates")
axes[0].axhline(L_plain, color="0.5", ls="--", lw=1, label="L, one codebook")
axes[0].set(xlabel="gradient step on W_g", ylabel="coding length (nats)", title="descending L_moe in W_g")
axes[0].legend()
axes[1].plot(history["matched"], label="samples in their cluster's expert")
axes[1].plot(history["confidence"], ls="--", label="mean max_k π_ik (gate confidence)")
axes[1].axhline(1 / K_s, color="0.5", ls=":", lw=1)
axes[1].set(xlabel="gradient step on W_g", ylabel="share", ylim=(0, 1.05),
            title="the gates: cluster match and confidence")
axes[1].legend(loc="lower right")
for ax, P, name in ((axes[2], pi_before, "gates before"), (axes[3], pi_after, "gates after")):
    ax.imshow(P, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set(title=name, xlabel="expert k", ylabel="sample i (by cluster)", xticks=range(K_s))
    ax.grid(False)
plt.show()
print(f"L_moe: {history['L'][0]:.1f} -> {history['L'][-1]:.1f} nats (one codebook: {L_plain:.1f}); "
      f"samples in their cluster's expert {history['matched'][0]:.2f} -> {history['matched'][-1]:.2f}, "
      f"gate confidence {history['confidence'][0]:.2f} -> {history['confidence'][-1]:.2f}")

# %% [markdown]
# From the seeded start the most likely experts already point at the clusters; the descent
# turns the soft gates into confident ones and lowers the mixed coding length by hundreds of
# nats, one expert per cluster in this run. Whether the mixture ends below one codebook
# depends on the data: the routing term costs $m \log K$ nats for equal experts, and
# separate codebooks earn it back only when the clusters are far apart and of low dimension.
# The same closed-form `dW_g` is what a training loop would use to learn the gates next to
# the network.
