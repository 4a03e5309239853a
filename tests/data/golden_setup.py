"""Set-up shared by the golden-step generators (make_golden_step.py, make_golden_main_step.py
beside this file): the batch, the steps rounded to powers of two, the check that no decision
of the step sits near a tie, and the writer of the .npz file.

Why the check. A golden step pins a step's outputs to 1e-10 or so, but a step of a quantized
network makes discrete decisions: a quantizer's round (at v = k + 1/2) and clip (at Qn, Qp),
a max pool's winner in each 2x2 window, a ReLU's sign. A decision that sits within round-off
of its tie is made by the BLAS kernel's summation order, and one flipped max-pool winner
moves conv1's gradient by several per cent. Seen with LSQ's data-driven steps: the codes of
the quantized operands are integers, so two outputs of a quantized convolution in one pool
window are often equal in exact arithmetic (the same integer dot product), and the GEMM
then rounds them apart by an ulp, one way under OpenBLAS's Haswell kernel, the other way
under Prescott's or Sandybridge's. So:

- :func:`power_of_two_steps` rounds every LSQ step to a power of two. A fake-quantized value
  is then ``code * 2^e`` exactly, every product of two of them is exact, and every partial
  sum is an integer times one power of two far below 2^53: a quantized layer's GEMM is exact,
  in any summation order, and outputs equal in exact arithmetic are equal in every kernel
  (given the same codes, which the check below makes sure of): exact ties, which the
  first-match rule of the max pool decides the same everywhere.
- :func:`decisions` runs the step's forward layer by layer and measures every decision's
  distance to its tie: each quantizer input ``v = x / s`` (weights and activations) at least
  ``MARGIN`` steps from every half-integer and from Qn and Qp (exact zeros excepted: a ReLU's
  output, the same in every kernel); in each max-pool window, every value below the max at
  least ``MARGIN`` times the layer's largest |value| below it, or else bit-equal to it and out
  of an exact GEMM (BatchNorm between them maps equal values to equal values: the same
  subtraction and multiply-add per element); each ReLU input, and each window max of a ReLU
  pool, at least that far from 0. Another BLAS kernel or thread count moves these float64
  values by ~1e-15 relative (the windows that flipped between kernels with LSQ's own steps
  were 5e-16 of the layer's largest value apart at most), far inside ``MARGIN``, so no
  decision can flip: the check, passing on one machine, shows that the step is the same
  under every kernel.
"""
import subprocess
import sys

import numpy as np

# 1e6 times the round-off of one float64 value; the ~3e5 continuous decisions of a step
# fall within it by chance with probability ~1e-3
MARGIN = 1e-9


class TieError(AssertionError):
    """A decision of the golden step within MARGIN of its tie."""


def bundled_batch(n, seed, noise=0.0):
    """``n`` normalised bundled training images (float64) and labels, chosen by ``seed``; with
    ``noise`` > 0, plus N(0, noise^2) per pixel (from the next seed)."""
    from mecref import data
    ds = data.load_bundled()
    idx = np.random.default_rng(seed).choice(len(ds.y_train), n, replace=False)
    x = np.ascontiguousarray(data.normalize(ds.x_train[idx])).astype(np.float64)
    if noise:
        x += noise * np.random.default_rng(seed + 1).standard_normal(x.shape)
    return x, ds.y_train[idx].astype(np.int64)


def power_of_two_steps(model):
    """Round every LSQ step (``s_w``, ``s_a``) of ``model`` to the nearest power of two in
    log scale, in place (the optimiser keeps its references)."""
    for layer in model.layers:
        for key in ("s_w", "s_a"):
            if key in layer.params:
                s = layer.params[key]
                s[...] = np.exp2(np.round(np.log2(s)))


def _is_power_of_two(s):
    return bool(np.all(np.frexp(np.asarray(s))[0] == 0.5))


def _quantizer_margin(v, Qn, Qp):
    """Smallest distance of ``v`` (in steps) to a half-integer, Qn or Qp; exact zeros skipped."""
    v = v[v != 0]
    if v.size == 0:
        return np.inf
    half = np.abs(v - (np.floor(v) + 0.5))
    return float(min(half.min(), np.abs(v - Qn).min(), np.abs(v - Qp).min()))


def _pool_margins(x, relu):
    """For one max pool's input x (N, C, H, W): the smallest gap between a window's max and a
    value below it, relative to max |x|; whether a window has a bit-equal tie at its max; and
    for a ReLU pool the smallest |max| (relative), the sign that decides if a window passes."""
    N, C, H, W = x.shape
    win = x[:, :, :H // 2 * 2, :W // 2 * 2].reshape(N, C, H // 2, 2, W // 2, 2)
    win = win.transpose(0, 1, 2, 4, 3, 5).reshape(-1, 4)
    scale = float(np.abs(x).max())
    top = win.max(axis=1, keepdims=True)
    sign = float(np.abs(top).min()) / scale if relu else np.inf
    if relu:                                 # a window with max <= 0 passes nothing
        live = top[:, 0] > 0
        win, top = win[live], top[live]
    gap = top - win                          # >= 0, and 0 at the max itself
    ties = bool(((gap == 0).sum(axis=1) > 1).any())
    near = float(gap[gap > 0].min()) / scale if (gap > 0).any() else np.inf
    return near, ties, sign


def decisions(model, x):
    """Measure each decision of a train-mode forward of ``x`` through ``model`` (see the
    module's docstring): ``x`` goes through ``model.layers`` one at a time, as the step's own
    forward does; where that forward runs a BatchNorm and its max pool fused (pooling
    ``sign(gamma) (x - mu)``, then ``|A| m + beta``), its windows tie where these do and its
    gaps are these times ``|A|``, so the relative margins are the same. Changes only the
    BatchNorms' running statistics, which the step does not read. Returns rows ``(layer, what,
    margin, ok)``, one per quantizer, pool and ReLU."""
    from mecref import nn, quant
    names = getattr(model, "names", [f"layer{i}" for i in range(len(model.layers))])
    rows, exact = [], True                   # the images: the same bits on every machine
    for name, layer in zip(names, model.layers):
        params = layer.params
        if "s_w" in params:
            Qn, Qp = quant.qrange(layer.w_bits, True)
            m = _quantizer_margin(params["W"] / params["s_w"], Qn, Qp)
            rows.append((name, "weight codes: steps to a half-integer or clip point", m, m >= MARGIN))
        if "s_a" in params:
            Qn, Qp = quant.qrange(layer.a_bits, layer.a_signed)
            m = _quantizer_margin(x / params["s_a"], Qn, Qp)
            rows.append((name, "input codes: steps to a half-integer or clip point", m, m >= MARGIN))
        if isinstance(layer, nn.MaxPool2d):
            near, ties, sign = _pool_margins(x, layer.relu)
            rows.append((name, "window max above the next value (relative)", near, near >= MARGIN))
            if ties:
                rows.append((name, "bit-equal ties at a window max, out of exact GEMMs" if exact
                             else "bit-equal ties at a window max, out of a rounded GEMM", 0.0, exact))
            if layer.relu:
                rows.append((name, "|window max| (relative): the ReLU's sign", sign, sign >= MARGIN))
        if isinstance(layer, nn.ReLU):
            m = float(np.abs(x).min() / np.abs(x).max())
            rows.append((name, "|input| (relative): the ReLU's sign", m, m >= MARGIN))
        if "W" in params:                    # a conv or linear layer: is its output exact?
            exact = "s_w" in params and "s_a" in params and all(
                _is_power_of_two(params[k]) for k in ("s_w", "s_a"))
        x = layer.forward(x, True)
    return rows


def assert_clear(rows):
    """Raise :class:`TieError` naming every decision of ``rows`` within MARGIN of its tie."""
    bad = [f"{name}: {what} {m:.1e}" for name, what, m, ok in rows if not ok]
    if bad:
        raise TieError(f"{len(bad)} decision(s) of the golden step within {MARGIN:.0e} of a tie "
                       "(so a BLAS kernel's summation order could flip them): " + "; ".join(bad))


def write(out, arrays):
    """Save ``arrays`` and the commit of the mecref that made them (``-dirty`` when its
    folder has uncommitted changes) to ``out``."""
    import mecref
    where = mecref.__path__[0]
    git = ["git", "-C", where]
    rev = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if rev and subprocess.run(git + ["status", "--porcelain", "."], capture_output=True,
                              text=True).stdout.strip():
        rev += "-dirty"
    np.savez_compressed(out, commit=np.asarray(rev), **{k: np.asarray(a) for k, a in arrays.items()})
    print(f"wrote {out} from mecref at {where} (commit {rev or 'unknown'})", file=sys.stderr)
