# %% [markdown]
# # 1. Quantizers: staircases, their gradients, and a learned step
#
# Quantization-aware training runs the network with *fake-quantized* weights and activations:
# every value is snapped to one of $2^b$ levels in the forward pass, and training still needs a
# gradient in the backward pass. A quantizer is a staircase, whose true derivative is zero
# almost everywhere, so each method below replaces it by a *straight-through* rule and, where
# the staircase has a parameter (a step $s$, a clipping level $\alpha$), also gives that
# parameter a gradient.
#
# This notebook tells that story with `mecref.quant`, a forward/backward pair per quantizer:
#
# 1. the transfer curve $x \mapsto q(x)$ of each quantizer at 1 to 4 bits;
# 2. its straight-through gradients, $\partial q/\partial x$ and $\partial q/\partial s$ (or
#    $\partial q/\partial\alpha$), plotted against $x$;
# 3. LSQ's learned step during a small fit, with and without LSQ's gradient scale $g$, to see
#    why the scale matters.
#
# The derivations are in `docs/derivations.md`, sections Q1-Q8. Quantized values have no
# physical unit: $x$ and $q(x)$ are in the same (arbitrary) units, and a step $s$ is in the
# units of $x$.

# %%
# %matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np

from mecref.plotting import use_style
from mecref.quant import (
    dorefa_act_quantize, dorefa_weight_quantize, dorefa_weight_quantize_backward, lsq_init_step,
    lsq_quantize, lsq_quantize_backward, lsqplus_init, lsqplus_quantize, pact_quantize,
    pact_quantize_backward, qrange, ste_quantize, ste_quantize_backward,
)

SMOKE = os.environ.get("MECREF_SMOKE") == "1"   # the tests run every notebook small
use_style()
rng = np.random.default_rng(0)
BITS = (1, 2, 3, 4)

# %% [markdown]
# ## The uniform quantizer and its integer range
#
# With a step $s > 0$, an input is divided by the step, rounded, clipped to an integer range
# $[Q_n, Q_p]$ and scaled back (derivations Q1):
#
# $$v = x / s, \qquad q(x) = s \cdot \mathrm{clip}(\mathrm{round}(v), Q_n, Q_p).$$
#
# Activations after a ReLU are unsigned, $Q_n = 0$, $Q_p = 2^b - 1$; weights are signed,
# $Q_n = -2^{b-1}$, $Q_p = 2^{b-1} - 1$, both giving $2^b$ levels. Signed $b = 1$ is the
# binary quantizer: levels $\{-s, +s\}$, $(Q_n, Q_p) = (-1, +1)$.

# %%
print("bits   signed (Qn, Qp)   unsigned (Qn, Qp)")
for b in BITS:
    print(f"{b:4d}   {str(qrange(b, True)):>17}   {str(qrange(b, False)):>17}")

# %% [markdown]
# ## Transfer curves at 1-4 bits
#
# Six quantizers, each drawn for $b = 1, \dots, 4$:
#
# - **uniform (STE)**, signed, with a fixed step $s = 2^{1-b}$ so that every bit-width spans
#   about $[-1, 1]$ (Q2);
# - **LSQ**, the same staircase with a *learned* step, here at LSQ's initial value
#   $s_0 = 2\,\overline{|w|}/\sqrt{Q_p}$ for weights $w \sim \mathcal N(0, 1)$ (Q3); the grey
#   histogram is the weights';
# - **LSQ+**, unsigned with a learned offset $\beta$,
#   $q(x) = s\,\mathrm{clip}(\mathrm{round}((x - \beta)/s), Q_n, Q_p) + \beta$, initialised
#   from the min and max of Swish activations $x\,\sigma(x)$, which dip below zero where a
#   plain unsigned grid would clip them (Q5);
# - **PACT**, activations clipped at a learned level $\alpha$ (here 2) and quantized with
#   $2^b - 1$ steps on $[0, \alpha]$ (Q6);
# - **DoReFa weights**, $q(w) = 2\,q_b\big(\tanh w / (2 \max|\tanh w|) + \tfrac12\big) - 1$:
#   the levels are uniform in $\tanh w$, not in $w$, and at 1 bit $q(w) = E\,\mathrm{sign}(w)$
#   with $E = \overline{|w|}$ (Q7);
# - **DoReFa activations**, $q(x) = q_b(\mathrm{clip}(x, 0, 1))$ (Q8).

# %%
n_grid = 601 if SMOKE else 2001
w_data = rng.standard_normal(4096)                   # weights, for LSQ's initial step
a_pre = rng.standard_normal(4096)
a_data = a_pre / (1 + np.exp(-a_pre))                # Swish activations, for LSQ+'s init

fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))

ax = axes[0, 0]
x = np.linspace(-1.5, 1.5, n_grid)
for b in BITS:
    s = 2.0 ** (1 - b)
    ax.plot(x, ste_quantize(x, s, b, signed=True)[0], label=f"{b} bit, s = {s:g}")
ax.set(title="uniform (STE), signed, fixed step")

ax = axes[0, 1]
x = np.linspace(-3, 3, n_grid)
hist = ax.twinx()
hist.hist(w_data, bins=60, range=(-3, 3), density=True, color="0.85")
hist.set(yticks=[], ylim=(0, 1.6))
hist.grid(False)
ax.set_zorder(hist.get_zorder() + 1)
ax.patch.set_visible(False)
for b in BITS:
    s0 = float(lsq_init_step(w_data, b, signed=True))
    ax.plot(x, lsq_quantize(x, s0, b, signed=True)[0], label=f"{b} bit, $s_0$ = {s0:.3f}")
ax.set(title="LSQ, signed, initial step from w ~ N(0, 1)")

ax = axes[0, 2]
x = np.linspace(-0.6, 3.0, n_grid)
for b in BITS:
    s, beta = lsqplus_init(a_data, b, signed=False)
    ax.plot(x, lsqplus_quantize(x, s, beta, b, signed=False)[0],
            label=f"{b} bit, s = {float(s):.3f}, β = {float(beta):.3f}")
ax.set(title="LSQ+, unsigned with offset β (Swish)")

ax = axes[1, 0]
x = np.linspace(-0.5, 2.5, n_grid)
alpha = 2.0
for b in BITS:
    ax.plot(x, pact_quantize(x, alpha, b)[0], label=f"{b} bit")
ax.axvline(alpha, color="0.4", lw=0.8, ls=":")
ax.set(title=f"PACT, clipping level α = {alpha:g}")

ax = axes[1, 1]
w = np.linspace(-2.5, 2.5, n_grid)
for b in BITS:
    ax.plot(w, dorefa_weight_quantize(w, b)[0], label=f"{b} bit")
ax.plot(w, np.tanh(w) / np.abs(np.tanh(w)).max(), color="0.5", ls="--", lw=1,
        label="tanh w / max|tanh w|")
ax.set(title="DoReFa weights (w in [-2.5, 2.5])", xlabel="weight w", ylabel="quantized weight q(w)")

ax = axes[1, 2]
x = np.linspace(-0.5, 1.5, n_grid)
for b in BITS:
    ax.plot(x, dorefa_act_quantize(x, b)[0], label=f"{b} bit")
ax.set(title="DoReFa activations")

for ax in axes.flat:
    if ax is not axes[1, 1]:
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="0.5", ls="--", lw=1, label="q(x) = x")
        ax.set(xlim=(lo, hi), xlabel="input x", ylabel="quantized q(x)")
    ax.legend(loc="upper left")
fig.suptitle("Transfer curves: each quantizer at 1-4 bits")
plt.show()

# %% [markdown]
# What the curves show:
#
# - More bits give finer steps over a fixed range (uniform) or, for a data-driven step, a range
#   that reaches further into the tails (LSQ: $s_0 \propto 1/\sqrt{Q_p}$, so the range
#   $Q_p s_0 \propto \sqrt{Q_p}$ grows with $b$).
# - Signed 1-bit is binary, $\pm s$; at 2 bits the signed grid is one-sided
#   ($\{-2, -1, 0, 1\}\,s$), so $x = 1$ clips to $0.5$ in the first panel.
# - LSQ+'s offset moves the unsigned grid down to the Swish minimum (about $-0.28$), which a
#   grid starting at 0 would lose.
# - DoReFa's weight levels are equally spaced in $\tanh w$: in $w$ they crowd near 0 and spread
#   out where $\tanh$ saturates.

# %% [markdown]
# ## Straight-through gradients
#
# The backward of each quantizer (derivations Q2, Q3, Q6, Q7):
#
# - STE and LSQ pass the gradient inside the clipping range and block it outside:
#   $\partial q/\partial x = 1[Q_n \le v \le Q_p]$.
# - LSQ's step gradient (per element, before the scale $g$):
#   $$\frac{\partial q}{\partial s} = \begin{cases} \mathrm{round}(v) - v & Q_n \le v \le Q_p \\
#     Q_n & v < Q_n \\ Q_p & v > Q_p, \end{cases}$$
#   a sawtooth inside the range (the step feels the rounding error) and a constant pull
#   outside (a clipped value asks for a larger step).
# - PACT: $\partial q/\partial x = 1[0 \le x < \alpha]$ and
#   $\partial q/\partial\alpha = 1[x \ge \alpha]$: the clipped values push $\alpha$ up.
# - DoReFa weights: straight through $q_b$, exact through $\tanh$ and the normalisation,
#   $\partial q_j/\partial w_j = (1 - t_j^2)/M$ with $t = \tanh w$, $M = \max|t|$, plus a term
#   on the entry that attains the max (the max depends on every $w$).
#
# To plot $\partial q/\partial s$ per element, the step is passed as an array the shape of
# $x$ (one step per element, so nothing is summed) and the scale is switched off with
# `grad_scale=1.0`; $dy = 1$ everywhere.

# %%
x = np.linspace(-2.5, 2.5, n_grid)
ones = np.ones_like(x)
fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))

ax = axes[0]
for b, s in ((2, 0.5), (3, 0.25)):
    _, cache = ste_quantize(x, s, b, signed=True)
    Qn, Qp = qrange(b, True)
    ax.plot(x, ste_quantize_backward(cache, ones),
            label=f"{b} bit, s = {s:g}: range [{Qn * s:g}, {Qp * s:g}]")
ax.set(title="STE / LSQ: ∂q/∂x", xlabel="input x", ylabel="∂q/∂x", ylim=(-0.1, 1.3))

ax = axes[1]
for b, s in ((2, 0.5), (3, 0.25)):
    _, cache = lsq_quantize(x, np.full_like(x, s), b, signed=True, grad_scale=1.0)
    _, dyds = lsq_quantize_backward(cache, ones)
    ax.plot(x, dyds, label=f"{b} bit, s = {s:g}")
ax.set(title="LSQ: ∂q/∂s (per element, g = 1)", xlabel="input x", ylabel="∂q/∂s")

ax = axes[2]
alpha = 1.5
_, cache = pact_quantize(x, np.full_like(x, alpha), 2)
dx, dalpha = pact_quantize_backward(cache, ones)
ax.plot(x, dx, label="∂q/∂x")
ax.plot(x, dalpha, ls="--", label="∂q/∂α")
ax.set(title=f"PACT (α = {alpha:g}, 2 bit)", xlabel="input x", ylabel="gradient", ylim=(-0.1, 1.3))

ax = axes[3]
w = np.linspace(-2.0, 2.5, n_grid)         # not symmetric: the max |tanh w| is at w = 2.5
_, cache = dorefa_weight_quantize(w, 2)
dw = dorefa_weight_quantize_backward(cache, ones)
ax.plot(w[:-1], dw[:-1], label="(1 - tanh² w) / M")
ax.plot(w[-1:], dw[-1:], "o", label=f"the max entry: {dw[-1]:.1f}")
ax.set(title="DoReFa weights (2 bit): ∂L/∂w for dy = 1", xlabel="weight w", ylabel="∂L/∂w")
for ax in axes[:3]:
    ax.legend(loc="upper left")
axes[3].legend(loc="lower left")
plt.show()

# %% [markdown]
# ## How LSQ's step moves during a fit, and why the gradient scale matters
#
# LSQ learns $s$ by gradient descent next to the weights, with the same learning rate. The
# step's gradient is a *sum* over every element that shares it,
# $ds = g \sum_i dy_i\,\partial q_i/\partial s$, so it grows like $\sqrt N$ with the number of
# elements $N$, while each weight's gradient does not. LSQ's gradient scale
# $g = 1/\sqrt{N Q_p}$ undoes that (derivations Q3): Esser et al. argue that training behaves
# when the step's *relative* update is about the weights',
#
# $$R = \frac{|\Delta s| / s}{\lVert \Delta w \rVert / \lVert w \rVert} \approx 1 .$$
#
# A small test: a linear regression $t = X w^*$ ($n$ samples, $N$ weights) fitted with 2-bit
# weights $q(w; s)$, loss $\ell = \frac{1}{2n}\lVert X q(w; s) - t\rVert^2$. The backward is
# closed form: $dq = X^T (X q - t)/n$, then `lsq_quantize_backward` gives $dw$ (straight
# through) and $ds$. Plain SGD updates $w$ and $s$ with one learning rate, once with LSQ's $g$
# and once without ($g = 1$). The step is kept positive (floored at $10^{-6}$) so that the
# quantizer stays defined whatever the update does.

# %%
n, N, bits = (128, 64, 2) if SMOKE else (512, 256, 2)
iters = 40 if SMOKE else 400
lr = 0.5
X = rng.standard_normal((n, N)) / np.sqrt(N)
w_star = 0.5 * rng.standard_normal(N)
t = X @ w_star
w_init = 0.5 * rng.standard_normal(N)
Qn, Qp = qrange(bits, True)


def fit(grad_scale):
    """SGD on (w, s); returns the step, the loss, R and the fraction of weights inside the range."""
    w = w_init.copy()
    s = float(lsq_init_step(w, bits, signed=True))
    hist = {"s": [s], "loss": [], "R": [], "inside": []}
    for _ in range(iters):
        q, cache = lsq_quantize(w, s, bits, signed=True, grad_scale=grad_scale)
        res = X @ q - t
        dq = X.T @ res / n
        dw, ds = lsq_quantize_backward(cache, dq)
        step_w, step_s = lr * dw, lr * float(ds)
        hist["loss"].append(0.5 * np.mean(res ** 2))
        hist["inside"].append(np.mean((w / s >= Qn) & (w / s <= Qp)))
        rel_w = np.linalg.norm(step_w) / np.linalg.norm(w)
        hist["R"].append(abs(step_s) / s / rel_w if rel_w > 0 else np.nan)
        w = w - step_w
        s = max(s - step_s, 1e-6)
        hist["s"].append(s)
    return {k: np.array(v) for k, v in hist.items()}


g_lsq = 1 / np.sqrt(N * Qp)
runs = {f"LSQ scale g = 1/√(N Qp) = {g_lsq:.3f}": fit(None), "no scale, g = 1": fit(1.0)}

fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for label, h in runs.items():
    axes[0].plot(h["s"], label=label)
    axes[1].plot(h["loss"], label=label)
    axes[2].plot(h["R"], label=label)
axes[0].set(title="the learned step", xlabel="iteration", ylabel="step s (units of w)", yscale="log")
axes[1].set(title="regression loss", xlabel="iteration", ylabel="loss ℓ", yscale="log")
axes[2].axhline(1, color="0.5", ls="--", lw=1)
axes[2].set(title="relative update of s vs w", xlabel="iteration",
            ylabel="R = (|Δs|/s) / (‖Δw‖/‖w‖)", yscale="log")
for ax in axes:
    ax.legend()
plt.show()

for label, h in runs.items():
    print(f"{label:28s} R at the first update = {h['R'][0]:.3g}; at the end: s = {h['s'][-1]:.4g}, "
          f"loss = {h['loss'][-1]:.4g}, weights inside the clipping range {100 * h['inside'][-1]:.0f}%")

# %% [markdown]
# With LSQ's scale the step's relative update stays near the weights' ($R \approx 1$): $s$
# drifts smoothly while the weights settle, and the loss keeps falling. Without it, $R$ is one
# to two orders of magnitude above 1 (the factor that $g$ removes is $\sqrt{N Q_p} = 16$ at
# full size): the first few updates throw the step far from its
# initial value, here down to the floor, so every weight falls outside the clipping range,
# the straight-through gradient $1[Q_n \le v \le Q_p]$ blocks all of them, and training stops.
# The same learning rate cannot suit both kinds of parameter unless the step's gradient is
# scaled, which is what $g$ does.
