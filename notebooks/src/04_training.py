# %% [markdown]
# # 4. Training: FP32, LSQ and MEC-Quant at 2 bits
#
# The first three notebooks took the parts apart: the quantizers, the coding length, its
# mixture-of-experts form. Here they work together. We train the small CNN of the experiments
# (`mecref.nn.small_cnn`: three 3x3 convolutions with BatchNorm, a global average pool and a
# linear classifier) on the bundled Fashion-MNIST subset three times:
#
# - **FP32**: full precision, cross-entropy only;
# - **LSQ**: weights and activations of the inner convolutions at 2 bits (W2A2), learned step
#   sizes, cross-entropy only;
# - **MEC-Quant**: the same LSQ network at W2A2, plus the maximum-entropy-coding regulariser
#   on the penultimate features of two augmented views,
#   $\mathcal L = \mathrm{CE} + \beta\, L_{reg}$ with
#   $L_{reg} = -\mu \log\det(I + \lambda Z_1 Z_2^T) / m$ (`reg="mec"`, derivations T1 and E3).
#
# Then we look at what the regulariser is meant to change: the training curves, the spectrum
# of the features' covariance and its effective rank (derivations D1, D2), the MEC-Quant
# model's confusion matrix, and the weights and activations of one quantized layer against
# the grid they are snapped to.
#
# Each run is short (three epochs at full size), so the numbers here are one seed of a short
# schedule: they show what to look at, not whether MEC-Quant wins. The multi-seed tables, and
# the sweep of the regulariser's weight $\beta$ and distortion $\epsilon$, are in
# `docs/results.md`; this tutorial fixes $\beta = 0.5$, $\epsilon = 2$ for the exact form, a
# strong setting that makes the regulariser's effect easy to see (the strength the study in
# `docs/results.md` chose for the exact form is weaker). BLAS runs on one thread (set before
# NumPy loads), as in notebooks 2 and 3.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before NumPy loads: one BLAS thread
# %matplotlib inline
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from mecref import diagnostics, quant
from mecref.data import load_bundled, normalize
from mecref.plotting import use_style
from mecref.train import TrainConfig, train_small_cnn

SMOKE = os.environ.get("MECREF_SMOKE") == "1"   # the tests run every notebook small
use_style()

ds = load_bundled()
defaults = TrainConfig()
common = dict(w_bits=2, a_bits=2, seed=0, backend="numpy",
              epochs=1 if SMOKE else 3,
              train_limit=512 if SMOKE else None,
              width=(8, 16, 32) if SMOKE else defaults.width)
n_test = 500 if SMOKE else len(ds.x_test)           # test images for the feature diagnostics
print(ds)
mec = dict(reg="mec", reg_weight=0.5, eps=2.0)     # beta and eps of the exact MEC term
print(f"MEC-Quant: {mec}; common settings: {common}")

# %% [markdown]
# ## 1. Three runs
#
# `train_small_cnn` takes any `TrainConfig` field by name and returns a `TrainResult`: the
# run's config, a per-epoch `history` (loss, its cross-entropy and regulariser parts, train
# and test accuracy, seconds) and the trained `model`. The first convolution and the last
# linear layer stay at 8 bits (`first_last_bits`, the usual practice), so "W2A2" means the two
# inner convolutions. A callable `progress` gets each epoch's history row.

# %%
methods = {
    "FP32": dict(quantizer="fp32", reg=None),
    "LSQ W2A2": dict(quantizer="lsq", reg=None),
    "MEC-Quant W2A2": dict(quantizer="lsq", **mec),
}


def report(row):
    print(f"  epoch {row['epoch']}: loss {row['loss']:.4f} (ce {row['ce']:.4f}, reg "
          f"{row['reg']:.4f}), train acc {row['train_acc']:.4f}, test acc {row['test_acc']:.4f}, "
          f"{row['seconds']:.1f} s")


results = {}
for name, kw in methods.items():
    print(name)
    results[name] = train_small_cnn(**common, **kw, progress=report)
    print(f"  {results[name].seconds:.1f} s in all")

# %% [markdown]
# ## 2. Training curves
#
# Left: the training loss per epoch (the mean over the epoch's steps). For MEC-Quant the
# objective is $\mathrm{CE} + \beta L_{reg}$ and $L_{reg}$ is negative (it is minus a coding
# length), so its total loss sits below its cross-entropy, drawn dashed; compare the
# cross-entropies across methods. Right: accuracy on the 2000 test images after each epoch
# (solid), and on the training views during the epoch (dotted: augmented, and measured while
# the weights move).

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for name, res in results.items():
    epochs = [h["epoch"] for h in res.history]
    line, = axes[0].plot(epochs, [h["loss"] for h in res.history], "o-", label=f"{name}: loss")
    if methods[name]["reg"] is not None:
        axes[0].plot(epochs, [h["ce"] for h in res.history], "o--", color=line.get_color(),
                     label=f"{name}: its CE part")
    axes[1].plot(epochs, [h["test_acc"] for h in res.history], "o-", color=line.get_color(),
                 label=f"{name}: test")
    axes[1].plot(epochs, [h["train_acc"] for h in res.history], ":", color=line.get_color(),
                 label=f"{name}: train")
for ax in axes:
    ax.set_xticks(epochs)
axes[0].set(xlabel="epoch", ylabel="training loss (nats per sample)", title="loss")
axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
axes[0].legend()
axes[1].legend(ncol=2)
plt.show()

# %% [markdown]
# In this run MEC-Quant's cross-entropy stays above LSQ's in every epoch and its test accuracy
# ends below LSQ's, while its regulariser term keeps falling (the features keep spreading);
# after the first epoch the two test accuracies were in the other order (the rows printed
# above). At this $\beta$ a good share of each step goes to the entropy. Whether the gap closes over a longer schedule, and at which $\beta$, is what the multi-seed tables in
# `docs/results.md` answer; three epochs of one seed cannot.

# %% [markdown]
# ## 3. Feature spectra and effective rank
#
# The regulariser works on the penultimate features $z_i \in \mathbb R^{d}$ (after the global
# average pool, $d = 64$ at full width). `diagnostics.collect_features` runs a model in eval
# mode over the test images and returns them, with the predictions. A feature row of zeros
# (every ReLU dead) has no direction; such rows are dropped and counted.
#
# The covariance of the unit-length rows has eigenvalues $\lambda_1 \ge \dots \ge \lambda_d$
# summing to at most 1. Features that have collapsed onto a few directions show a few large
# eigenvalues and a steep fall; features that fill the space a flat spectrum. The effective
# rank $\exp(-\sum_k p_k \log p_k)$, $p_k = \lambda_k / \sum_j \lambda_j$, counts the
# directions in use (D1), and the coding length per sample at $\epsilon = 0.5$ (the same $m$ and
# $\epsilon$ for each model) is the entropy MEC measures (D2). The between/within ratio of the
# class spread (D3) says how well the classes separate in that space.

# %%
x_test, y_test = ds.x_test[:n_test], ds.y_test[:n_test]
features, spectra, table = {}, {}, []
for name, res in results.items():
    Z, pred = diagnostics.collect_features(res.model, x_test, y_test)
    alive = np.sum(Z * Z, axis=1) > 0
    Zk, yk = Z[alive], y_test[alive]
    features[name] = (Z, pred)
    spectra[name] = diagnostics.feature_covariance_spectrum(Zk)
    table.append(dict(method=name, accuracy=np.mean(pred == y_test), zero_rows=int(np.sum(~alive)),
                      erank=diagnostics.effective_rank(spectra[name]),
                      L_per_sample=diagnostics.coding_length_per_sample(Zk, 0.5),
                      ratio=diagnostics.per_class_spread(Zk, yk)["ratio"]))

fig, ax = plt.subplots(figsize=(7, 4.5))
for row in table:
    lam = spectra[row["method"]]
    k = np.arange(1, lam.size + 1)
    ax.semilogy(k[lam > 0], lam[lam > 0], ".-", label=f"{row['method']} (effective rank {row['erank']:.1f})")
ax.set(xlabel="eigenvalue index k (descending)", ylabel="eigenvalue of the feature covariance",
       title=f"Penultimate features, {n_test} test images")
ax.legend()
if not SMOKE:   # the full-size figure is the README's picture
    fig.savefig(Path("..") / "docs" / "img" / "readme_w2a2.png")
plt.show()

print(f"{'method':16s} {'test acc':>8s} {'eff. rank':>9s} {'L/m (nats)':>10s} "
      f"{'between/within':>14s} {'zero rows':>9s}")
for r in table:
    print(f"{r['method']:16s} {r['accuracy']:8.4f} {r['erank']:9.2f} {r['L_per_sample']:10.3f} "
          f"{r['ratio']:14.3f} {r['zero_rows']:9d}")

# %% [markdown]
# The regulariser does what it is built to do. MEC-Quant's spectrum is much flatter: its
# effective rank and its coding length per sample are well above those of the other two
# models (the table above), whose few leading eigenvalues hold almost all the variance.
# Without the regulariser the 2-bit LSQ model's spectrum falls a little faster than FP32's: the collapse that
# MEC-Quant sets out to undo, mild in a network this small.
#
# A flat spectrum is not the same as separable classes, though: the between/within ratio
# *falls* under MEC-Quant, because the features also spread within each class. Maximum
# entropy is a prior against collapse, weighed by $\beta$ against the cross-entropy; at this
# $\beta$ and after three epochs the balance leans towards the entropy. (This figure, from the
# full-size run, is the picture in the README.)

# %% [markdown]
# ## 4. Where the MEC-Quant model errs
#
# The confusion matrix of the MEC-Quant model on the test images: row $i$, column $j$ counts
# the images of class $i$ predicted as $j$, coloured by the share of row $i$. On Fashion-MNIST
# the upper-body garments (T-shirt/top, pullover, coat, shirt) are the usual confusions.

# %%
name = "MEC-Quant W2A2"
Z, pred = features[name]
C = np.zeros((ds.n_classes, ds.n_classes), dtype=int)
np.add.at(C, (y_test, pred), 1)
share = C / np.maximum(C.sum(axis=1, keepdims=True), 1)

fig, ax = plt.subplots(figsize=(7, 6))
im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
for i in range(ds.n_classes):
    for j in range(ds.n_classes):
        if C[i, j]:
            ax.text(j, i, str(C[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
ax.set_xticks(range(ds.n_classes), ds.classes, rotation=45, ha="right")
ax.set_yticks(range(ds.n_classes), ds.classes)
ax.set(xlabel="predicted class", ylabel="true class",
       title=f"{name}: test accuracy {np.mean(pred == y_test):.3f}")
ax.grid(False)
fig.colorbar(im, ax=ax, label="share of the true class")
plt.show()

# %% [markdown]
# Trousers, bags, sandals, sneakers and ankle boots are told apart well; the errors gather in
# the upper-body block, with *shirt* the hardest class (mistaken for T-shirt/top, pullover and
# coat) and *coat* often read as *pullover*: the same pattern as full-precision models on
# Fashion-MNIST, only more of it.

# %% [markdown]
# ## 5. One quantized layer against its grid
#
# The second convolution, `conv2`, is a `QuantConv2d` at W2A2 (`mecref.nn`, derivations N9).
# It keeps the latent float weights in `params["W"]` (shape $(C_{out}, C_{in}, 3, 3)$), a
# learned weight step per output channel in `params["s_w"]` ($(C_{out}, 1, 1, 1)$) and one
# learned activation step in `params["s_a"]`. In the forward pass the weights become
# $s_w \cdot \mathrm{clip}(\mathrm{round}(W/s_w), -2, 1)$ (signed 2 bits) and the inputs
# $s_a \cdot \mathrm{clip}(\mathrm{round}(x/s_a), 0, 3)$ (unsigned, after the ReLU).
#
# Left: the latent weights divided by their channel's step, $W/s_w$, so that every channel
# shares one grid; the vertical lines are the four levels, and rounding sends each weight to
# the nearest one inside the range. Right: the layer's input activations on test images
# (`conv1`, `bn1` and the pool with its ReLU run in eval mode), in their own units, with the
# levels $k\,s_a$, $k = 0..3$; values past $3 s_a$ are clipped. Both for the LSQ and the
# MEC-Quant model.

# %%
def layer(model, name):
    return dict(zip(model.names, model.layers))[name]


def layer_input(model, name, x):
    """The input of layer `name` (eval mode): the layers before it, run in order."""
    h = x
    for n, lay in zip(model.names, model.layers):
        if n == name:
            return h
        h = lay.forward(h, train=False)
    raise KeyError(name)


x_img = normalize(ds.x_test[:200 if SMOKE else 1000])   # (N, 1, 28, 28) float32
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
for name in ("LSQ W2A2", "MEC-Quant W2A2"):
    model = results[name].model
    conv2 = layer(model, "conv2")
    Qn_w, Qp_w = quant.qrange(conv2.w_bits, signed=True)
    Qn_a, Qp_a = quant.qrange(conv2.a_bits, signed=False)

    v = (conv2.params["W"] / conv2.params["s_w"]).ravel()
    window = (Qn_w - 2, Qp_w + 2)
    outside = np.mean((v < window[0]) | (v > window[1]))
    axes[0].hist(v, bins=np.linspace(*window, 81), histtype="step", lw=1.5,
                 label=f"{name} ({100 * outside:.1f}% outside this window)")

    x = layer_input(model, "conv2", x_img)
    s_a = conv2.params["s_a"].item()          # shape (1, 1, 1, 1): one step per tensor
    xq, _ = quant.lsq_quantize(x, conv2.params["s_a"], conv2.a_bits)
    codes = np.rint(xq / s_a).astype(int).ravel()
    p = np.bincount(codes, minlength=Qp_a + 1) / codes.size
    H = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    line = axes[1].hist(x.ravel(), bins=np.linspace(0, x.max(), 81), histtype="step", lw=1.5,
                        label=f"{name}: code entropy {H:.2f} of {conv2.a_bits} bits")[2][0]
    for k in range(Qn_a, Qp_a + 1):
        axes[1].axvline(k * s_a, color=line.get_edgecolor(), ls="--", lw=1)
    print(f"{name}: weight codes used (share of weights) "
          + ", ".join(f"{k}: {np.mean(np.clip(np.rint(v), Qn_w, Qp_w) == k):.3f}"
                      for k in range(Qn_w, Qp_w + 1))
          + f"; activation step s_a = {s_a:.4f}, codes 0..{Qp_a}: " + ", ".join(f"{q:.3f}" for q in p))
for k in range(Qn_w, Qp_w + 1):
    axes[0].axvline(k, color="0.3", ls="--", lw=1)
axes[0].set(xlabel="latent weight / its channel's step, W / s_w (steps)", ylabel="weights",
            title="conv2 weights and the 2-bit signed grid (dashed)")
axes[1].set(yscale="log", xlabel="input activation of conv2 (units of the pooled BN output)",
            ylabel="activations (log scale)", title="conv2 inputs and the 2-bit grids k·s_a (dashed)")
axes[0].legend()
axes[1].legend()
plt.show()

# %% [markdown]
# In this run MEC-Quant's latent weights spread wider than LSQ's: more of them reach the outer
# level $-2$, and some lie far beyond the clip range (the legend gives the share outside the
# plotted window), where the straight-through rule passes them no gradient and only weight
# decay pulls them back. Both models keep most of their weights on the three inner levels. The
# activation steps $s_a$ of the two models are nearly the same. The "code entropy" in the legend
# is the entropy of the activation codes' histogram, in bits: 2 bits when all four codes are
# equally used, less when most activations sit at 0 or at the clip. It is a layer-local form of
# the question the regulariser asks of the penultimate features (how much of the code space
# is used?), and here it is *not* higher under MEC-Quant: the regulariser acts on the features
# it sees, and leaves the layers below free to get there however serves.
#
# ## 6. Where to go next
#
# - `mecref table` trains the full grid (FP32, STE, DoReFa+PACT, LSQ, LSQ+ and MEC-Quant in its
#   exact, Taylor and mixture-of-experts forms, at several bit-widths and seeds), `mecref sweep`
#   chooses the regulariser's settings on a validation split, and `mecref diagnose` measures the
#   features as above; `docs/results.md` holds the outcome and the commands.
# - Notebook 5 runs the same training on a GPU with `backend="cupy"`.
