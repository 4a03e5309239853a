# %% [markdown]
# # 5. The same code on a GPU
#
# mecref has one code path for the CPU and the GPU. Every function takes its array module from
# the arrays it is given, `xp = array_module(x)` (NumPy for NumPy arrays, CuPy for CuPy
# arrays), and writes its body once against `xp`. Only `mecref/backend.py` imports CuPy, lazily,
# so the package installs and runs without it. The seam has four pieces:
#
# - `get_xp("numpy" | "cupy")`: the array module for a backend name; it raises
#   `BackendUnavailableError` with the reason (no CuPy, or no usable CUDA device) and how to
#   install it;
# - `array_module(*arrays)`: the module that owns the arrays;
# - `to_backend(a, backend)` and `to_host(a)`: move arrays to a backend and back to host NumPy,
#   which is what plotting, printing and saving need;
# - `backend="cupy"` in `train_small_cnn` (and `small_cnn`, `iterate_batches`): the model's
#   parameters, the batches and every intermediate live on the GPU.
#
# This notebook asks for the GPU, says clearly when there is none, and then runs everything on
# whichever backend it got: a quantizer and its gradient, the coding length, a short training
# run, and, only when a GPU is there, a timing table against NumPy. It runs top to bottom on a
# machine without a GPU (the tests run it that way).

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before NumPy loads: one BLAS thread
# %matplotlib inline
import time

import matplotlib.pyplot as plt
import numpy as np

from mecref import diagnostics, entropy, quant
from mecref.backend import (BackendUnavailableError, array_module, backend_name, get_xp,
                            to_backend, to_host)
from mecref.data import load_bundled
from mecref.plotting import use_style
from mecref.train import train_small_cnn

SMOKE = os.environ.get("MECREF_SMOKE") == "1"   # the tests run every notebook small
use_style()
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Asking for the GPU
#
# `get_xp("cupy")` imports CuPy and touches the device once; the verdict is cached, so asking
# again costs nothing. Where it fails we keep its message, which names what is missing, and
# fall back to NumPy.

# %%
try:
    xp = get_xp("cupy")
    BACKEND = "cupy"
    print(f"GPU found: CuPy {xp.__version__}, {xp.cuda.runtime.getDeviceCount()} CUDA device(s). "
          f"This notebook runs on backend='cupy'.")
except BackendUnavailableError as exc:
    xp = get_xp("numpy")
    BACKEND = "numpy"
    print("No usable GPU here: this notebook runs the NumPy path (backend='numpy').")
    print(f"Why, in mecref.backend's words:\n  {exc}")
GPU = BACKEND == "cupy"


def sync():
    """Wait for the GPU's queued work (a no-op on NumPy), so that a timer measures the work."""
    if GPU:
        xp.cuda.Device().synchronize()


# %% [markdown]
# ## 2. One code path: a quantizer and its gradient on the backend
#
# Arrays are created on the host (NumPy, with a seeded generator) and moved once with
# `to_backend`; every result then stays where its inputs are. Here is LSQ's quantizer (Q3)
# and its backward from `mecref.quant`, called on backend arrays, next to a function written
# the way the library writes them: `xp = array_module(x)` on the first line, then one body for
# both libraries. It is the straight-through derivative of the quantizer with respect to its
# step, $\partial q/\partial s$ = $\mathrm{round}(v) - v$ inside the range and $Q_n$ or $Q_p$
# outside it, $v = x/s$. With a step array of the input's own shape and
# `grad_scale=1.0`, `lsq_quantize_backward` returns exactly that per element: the two must
# agree.

# %%
def dq_ds(x, s, bits, signed):
    """LSQ's dq/ds at every element of x (derivations Q3), on x's backend."""
    xp = array_module(x)
    Qn, Qp = quant.qrange(bits, signed)
    v = x / s
    inside = (v >= Qn) & (v <= Qp)
    return xp.clip(xp.rint(v), Qn, Qp) - v * inside


bits, s0 = 2, 0.5
x = to_backend(np.linspace(-2.0, 2.0, 801, dtype=np.float32), BACKEND)
s = to_backend(np.full(x.shape, s0, dtype=np.float32), BACKEND)   # per element: ds is dq/ds
y, cache = quant.lsq_quantize(x, s, bits, signed=True, grad_scale=1.0)
dx, ds = quant.lsq_quantize_backward(cache, xp.ones_like(y))
mine = dq_ds(x, s, bits, signed=True)

for name, a in (("x", x), ("y", y), ("dx", dx), ("ds", ds), ("dq_ds(x)", mine)):
    print(f"{name:9s} lives on {backend_name(array_module(a)):5s}  {type(a).__module__}.{type(a).__name__}"
          f" {a.dtype} {a.shape}")
gap = float(xp.abs(ds - mine).max())          # a 0-d array; float() brings it to the host
print(f"max |ds - dq_ds| = {gap:.1e}")
assert gap < 1e-6

# plotting needs host arrays: to_host is a no-op on NumPy and a copy from the GPU on CuPy
xh, yh, dxh, dsh = (to_host(a) for a in (x, y, dx, ds))
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
axes[0].plot(xh, xh, color="0.6", ls=":", lw=1, label="identity")
axes[0].plot(xh, yh, label=f"q(x), LSQ, {bits} bits signed, s = {s0}")
axes[0].set(xlabel="x (units of x)", ylabel="q(x) (units of x)", title=f"forward, computed on {BACKEND}")
axes[1].plot(xh, dxh, label="∂q/∂x (straight-through)")
axes[1].plot(xh, dsh, label="∂q/∂s")
axes[1].set(xlabel="x (units of x)", ylabel="derivative", title=f"backward, computed on {BACKEND}")
for ax in axes:
    ax.legend()
plt.show()

# %% [markdown]
# ## 3. The coding length on the backend
#
# The entropy terms follow the same rule. `coding_length` factors the Gram matrix on its
# smaller side by Cholesky, with SciPy's LAPACK on NumPy and `xp.linalg` on CuPy; its value comes
# back as a 0-d array of the input's backend and dtype, and `float(L)` copies it to the host.
# The features below are random, drawn on the host and moved once (the library's own rule:
# random numbers come from NumPy generators, so a seed gives the same numbers on both
# backends).

# %%
m, d = (64, 16) if SMOKE else (512, 64)
U = rng.standard_normal((m, d)).astype(np.float32)
Z = to_backend(U, BACKEND)
L, cache = entropy.coding_length(Z, 0.5)
dZ = entropy.coding_length_backward(cache)
L_host, _ = entropy.coding_length(U, 0.5)   # the same on NumPy, for comparison
print(f"L on {backend_name(array_module(L))}: {float(L):.4f} nats  (NumPy: {float(L_host):.4f});"
      f" dZ: {backend_name(array_module(dZ))} {dZ.dtype} {dZ.shape}")

# %% [markdown]
# ## 4. Training on the backend
#
# `train_small_cnn(..., backend=BACKEND)` builds the model on the backend, moves the uint8
# images there once and draws each batch on the device; only the per-step numbers (loss,
# correct count) come back to the host for the history. The trained model's parameters stay
# on the backend; `model.state_dict()` gives host copies (what checkpoints save), and
# `diagnostics.collect_features` returns host arrays ready to plot. Here: LSQ with the MEC
# regulariser at W2A2, as in notebook 4, for a short run.

# %%
ds = load_bundled()
run = dict(quantizer="lsq", reg="mec", w_bits=2, a_bits=2, seed=0,
           epochs=1 if SMOKE else 2, train_limit=512 if SMOKE else None,
           width=(8, 16, 32) if SMOKE else (16, 32, 64))


def report(row):
    print(f"  epoch {row['epoch']}: loss {row['loss']:.4f}, test acc {row['test_acc']:.4f}, "
          f"{row['seconds']:.1f} s, {row['samples_per_s']:.0f} samples/s")


res = train_small_cnn(**run, backend=BACKEND, progress=report)
conv2 = dict(zip(res.model.names, res.model.layers))["conv2"]
W = conv2.params["W"]
print(f"conv2.params['W'] lives on {backend_name(array_module(W))}; "
      f"state_dict()['conv2.W'] is {type(res.model.state_dict()['conv2.W']).__module__}")

n = 500 if SMOKE else len(ds.x_test)
Zf, pred = diagnostics.collect_features(res.model, ds.x_test[:n], ds.y_test[:n])   # host float64
Zf = Zf[np.sum(Zf * Zf, axis=1) > 0]                  # drop rows of zeros (no direction)
lam = diagnostics.feature_covariance_spectrum(Zf)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
k = np.arange(1, lam.size + 1)
axes[0].semilogy(k[lam > 0], lam[lam > 0], ".-",
                 label=f"effective rank {diagnostics.effective_rank(lam):.1f}")
axes[0].set(xlabel="eigenvalue index k (descending)", ylabel="eigenvalue of the feature covariance",
            title=f"features of the model trained on {BACKEND}")
axes[0].legend()
v = to_host(W / conv2.params["s_w"]).ravel()         # computed on the backend, moved to plot
Qn, Qp = quant.qrange(conv2.w_bits, signed=True)
window = (Qn - 2, Qp + 2)
outside = np.mean((v < window[0]) | (v > window[1]))
axes[1].hist(v, bins=np.linspace(*window, 81), color="C2",
             label=f"{100 * outside:.1f}% of the weights lie outside this window")
for level in range(Qn, Qp + 1):
    axes[1].axvline(level, color="0.3", ls="--", lw=1)
axes[1].set(xlabel="latent weight / its channel's step, W / s_w (steps)", ylabel="weights",
            title="conv2 weights and their 2-bit levels (dashed)")
axes[1].legend()
plt.show()
print(f"test accuracy on the first {n} test images: {np.mean(pred == ds.y_test[:n]):.4f}")

# %% [markdown]
# ## 5. How much faster? (only with a GPU)
#
# Where a GPU answers, two measurements on both backends, in float32:
#
# - the coding length's value and gradient (`coding_length` + `coding_length_backward`) for a
#   few batch sizes $m$ at $d = 64$ and $d = 512$, best of several calls after a warm-up (the
#   first CuPy call compiles its kernels), the GPU synchronised before each clock reading;
# - training throughput: images per second (two views each) over the second epoch of a short
#   LSQ + MEC run at batch size 128 and 512; the first epoch carries the warm-up.
#
# NumPy runs on one BLAS thread here (set in the first cell), so the speed-up is against one
# CPU core; unset `OPENBLAS_NUM_THREADS` before the first cell to compare with all cores.
# The small CNN is small: at batch size 128 a GPU mostly waits on kernel launches and on the
# per-step copies of the loss to the host, so expect a larger gain from larger batches and
# from the entropy term at large $m$ and $d$. Without a GPU this section prints why it was
# skipped. `docs/benchmarks.md` compares against PyTorch on both devices.

# %%
def best_ms(f, repeat):
    """Best wall time of f() in milliseconds, the GPU synchronised around each call."""
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


if not GPU:
    print("Skipped: no usable GPU, so there is nothing to compare NumPy with.")
else:
    repeat = 2 if SMOKE else 10
    print(f"coding length, value + gradient, float32 (ms, best of {repeat} calls; "
          f"NumPy on {os.environ.get('OPENBLAS_NUM_THREADS', 'all')} BLAS thread(s))")
    print(f"{'m':>6s} {'d':>5s} {'numpy':>9s} {'cupy':>9s} {'speed-up':>9s}")
    for d_t in ((64,) if SMOKE else (64, 512)):
        for m_t in ((128,) if SMOKE else (128, 512, 2048)):
            U = rng.standard_normal((m_t, d_t)).astype(np.float32)
            t = {}
            for b in ("numpy", "cupy"):
                Zb = to_backend(U, b)
                f = lambda: entropy.coding_length_backward(entropy.coding_length(Zb, 0.5)[1])  # noqa: E731
                f()                                    # warm-up: kernels compile on first use
                t[b] = best_ms(f, repeat)
            print(f"{m_t:6d} {d_t:5d} {t['numpy']:9.2f} {t['cupy']:9.2f} {t['numpy'] / t['cupy']:9.1f}x")

    print("\ntraining LSQ + MEC at W2A2, second epoch (images per second, two views each)")
    print(f"{'batch':>6s} {'numpy':>9s} {'cupy':>9s} {'speed-up':>9s}")
    limit = 1024 if SMOKE else 6144
    for batch in (128, 512):
        rate = {}
        for b in ("numpy", "cupy"):
            r = train_small_cnn(**dict(run, epochs=2, train_limit=limit), batch_size=batch,
                                backend=b, progress=False)
            rate[b] = r.history[-1]["samples_per_s"] / 2   # samples count both views
        print(f"{batch:6d} {rate['numpy']:9.0f} {rate['cupy']:9.0f} {rate['cupy'] / rate['numpy']:9.1f}x")
