"""Benchmark 1: one training step of the small CNN, mecref (NumPy) against PyTorch (CPU).

Variants: FP32, and W4A4 LSQ (inner layers 4-bit weights and activations, first conv and last
linear 8-bit). For each, "forward" is the train-mode forward pass alone (batch statistics;
mecref caches for backward, torch records the autograd graph), and "step" is forward + softmax
cross-entropy + backward + SGD update (momentum 0.9, weight decay 5e-4). The torch model gets
mecref's initial weights and LSQ steps, and the first loss and gradients of the two are
compared before any timing (``check``).
"""
from __future__ import annotations

import time

import numpy as np

from . import common
from . import torch_ref

VARIANTS = {
    "fp32": dict(label="FP32", mecref=dict(quantizer=None),
                 torch=dict(w_bits=32, a_bits=32, first_last_bits=32)),
    "w4a4_lsq": dict(label="W4A4 LSQ", mecref=dict(quantizer="lsq", w_bits=4, a_bits=4, first_last_bits=8),
                     torch=dict(w_bits=4, a_bits=4, first_last_bits=8)),
}
LR = 0.01  # small: the timed steps repeat one batch, and must stay finite for 100+ updates


def batch(n, seed=0):
    """n normalised images (n, 1, 28, 28) float32 and labels from the bundled Fashion-MNIST
    subset (random images when the data module is missing)."""
    try:
        from mecref import data
        ds = data.load_bundled()
        idx = np.random.default_rng(seed).choice(len(ds.y_train), n, replace=False)
        return np.ascontiguousarray(data.normalize(ds.x_train[idx])), ds.y_train[idx].astype(np.int64)
    except Exception:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n)


def mecref_model(variant, x, y, backend="numpy"):
    """mecref model (LSQ steps initialised by one forward on x), its SGD, and the
    (forward, step) callables on (x, y)."""
    from mecref import losses, nn, optim

    model = nn.small_cnn(**VARIANTS[variant]["mecref"], backend=backend, seed=0)
    model.forward(x, train=True)
    opt = optim.SGD(model, lr=LR, momentum=0.9, weight_decay=5e-4)

    def forward():
        model.forward(x, train=True)

    def step():
        logits, _ = model.forward(x, train=True)
        _, cache = losses.softmax_cross_entropy(logits, y)
        model.backward(losses.softmax_cross_entropy_backward(cache, 1.0))
        opt.step()

    return model, forward, step


def torch_model(torch, variant, model, x, y, device="cpu"):
    """The torch twin of a mecref model (its weights copied) and its (forward, step)."""
    F = torch.nn.functional
    tmodel = torch_ref.torch_small_cnn(torch, **VARIANTS[variant]["torch"]).to(device)
    torch_ref.load_from_mecref(torch, tmodel, model)
    tmodel.train()
    sgd = torch_ref.torch_sgd(torch, tmodel, lr=LR)
    tx, ty = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)

    def forward():
        tmodel(tx)

    def step():
        sgd.optimizer.zero_grad(set_to_none=True)
        logits, _ = tmodel(tx)
        F.cross_entropy(logits, ty).backward()
        sgd()

    return tmodel, forward, step


def check(torch, variant, n, seed=1):
    """First loss and gradients of mecref and torch from the same weights and batch, in
    float64 on random-normal images (real images have constant backgrounds, whose exact ties in
    max pooling each library may break at a different position)."""
    from mecref import losses
    from mecref.backend import to_host

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 28, 28))
    y = rng.integers(0, 10, n)
    model, _, _ = mecref_model(variant, x.astype(np.float32), y)
    tmodel, _, _ = torch_model(torch, variant, model, x.astype(np.float32), y)
    model.astype(np.float64)
    tmodel.double()
    logits, _ = model.forward(x, train=True)
    loss, cache = losses.softmax_cross_entropy(logits, y)
    model.backward(losses.softmax_cross_entropy_backward(cache, 1.0))
    tlogits, _ = tmodel(torch.as_tensor(x))
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.as_tensor(y))
    tloss.backward()
    tparams = dict(tmodel.named_parameters())
    rel = {}
    for name, layer, key in model.named_params():
        tname = torch_ref._PARAM_MAP[(name.rsplit(".", 1)[0], key)]
        g = to_host(layer.grads[key]).reshape(-1)
        tg = tparams[tname].grad.numpy().reshape(-1)
        rel[name] = float(np.linalg.norm(g - tg) / max(np.linalg.norm(tg), 1e-300))
    worst = max(rel, key=rel.get)
    return dict(dtype="float64", images="random normal", batch=n,
                loss_mecref=float(loss), loss_torch=float(tloss.detach()),
                logits_max_abs_diff=float(np.abs(to_host(logits) - tlogits.detach().numpy()).max()),
                grad_rel_diff_median=float(np.median(list(rel.values()))),
                grad_rel_diff_worst=rel[worst], grad_rel_diff_worst_param=worst)


def train_units(model, x):
    """(name, unit) in the order a train step runs them, as the model's own train forward on
    ``x`` planned them: each layer, and each BatchNorm with the max pool after it as the one
    fused unit SmallCNN runs (derivations N11)."""
    model.forward(x, train=True)
    return [(model.names[s[0]], model.layers[s[0]]) if len(s) == 1 else
            ("+".join(model.names[i] for i in s), model._fused[s[0]]) for s in model._plan] \
        + [(model.names[-1], model.layers[-1])]


def layer_times(model, x, y, reps):
    """Median time of each unit's train-mode forward and backward inside a step (a layer, or
    a fused BatchNorm + pool), on the activations and gradients of one real step (each
    backward timed right after an untimed forward of that unit, which sets its cache)."""
    from mecref import losses

    units = train_units(model, x)
    acts, h = [], x
    for _, unit in units:
        acts.append(h)
        h = unit.forward(h, train=True)
    _, cache = losses.softmax_cross_entropy(h, y)
    douts, d = [None] * len(units), losses.softmax_cross_entropy_backward(cache, 1.0)
    for i in reversed(range(len(units))):
        douts[i] = d
        units[i][1].forward(acts[i], train=True)
        d = units[i][1].backward(d)
        if d is None:
            break
    rows = []
    for (name, unit), a, g in zip(units, acts, douts):
        fwd, bwd = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            unit.forward(a, train=True)
            t1 = time.perf_counter()
            unit.backward(g)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        rows.append(dict(layer=name, kind=type(unit).__name__, forward=common.stats(fwd),
                         backward=common.stats(bwd)))
    return rows


def threads_ab(step, reps, warmup, lead):
    """The mecref step with its element-wise passes on one thread against all of
    mecref.threads' threads (interleaved A/B in this process); the GEMMs keep their BLAS threads."""
    from mecref import threads

    n = threads.num_threads()

    def one_thread():
        old = threads.set_num_threads(1)
        try:
            step()
        finally:
            threads.set_num_threads(old)

    times = common.interleave({"one": one_thread, "all": step}, reps, warmup=warmup, lead=lead)
    return dict(threads=n, one=common.stats(times["one"]), all=common.stats(times["all"]),
                ratio=common.paired_ratio(times["one"], times["all"]))


def run(torch, quick=False, lead=0.001, log=print):
    """Time every variant; returns the JSON-ready record."""
    missing = common.mecref_missing("nn", "losses", "optim")
    if missing:
        return dict(skipped="mecref modules missing: " + "; ".join(missing))
    n = 8 if quick else 128
    reps, warmup = (3, 1) if quick else (40, 5)
    lead = min(lead, 0.002) if quick else lead
    x, y = batch(n)
    out = dict(batch=n, image="1x28x28 float32 (bundled Fashion-MNIST, normalised)", reps=reps,
               warmup=warmup, lead_s=lead, lr=LR, variants={},
               ratio="median over reps of t_mecref / t_torch of the same rep (interleaved A/B)")
    if torch is None:
        out["torch"] = common.torch_missing_reason()
    rows = []
    for variant, spec in VARIANTS.items():
        rec = dict(label=spec["label"])
        model, m_fwd, m_step = mecref_model(variant, x, y)
        fns = {"mecref_forward": m_fwd, "mecref_step": m_step}
        if torch is not None:
            rec["check"] = check(torch, variant, n)
            _, t_fwd, t_step = torch_model(torch, variant, model, x, y)
            fns.update(torch_forward=t_fwd, torch_step=t_step)
        rec["loadavg_before"] = common.loadavg()
        times = common.interleave(fns, reps, warmup=warmup, lead=lead)
        rec["loadavg_after"] = common.loadavg()
        for part in ("forward", "step"):
            r = dict(mecref=common.stats(times[f"mecref_{part}"]))
            if torch is not None:
                r["torch"] = common.stats(times[f"torch_{part}"])
                r["ratio"] = common.paired_ratio(times[f"mecref_{part}"], times[f"torch_{part}"])
            rec[part] = r
            rows.append(dict(variant=spec["label"], part=part, mecref=r["mecref"]["median_ms"],
                             torch=r.get("torch", {}).get("median_ms"), ratio=r.get("ratio")))
        rec["profile"] = common.profile(m_step, 3 if quick else 30)
        rec["layers"] = layer_times(model, x, y, 3 if quick else 30)
        rec["threads_ab"] = threads_ab(m_step, reps // 2 if not quick else reps, warmup, lead)
        out["variants"][variant] = rec
    log(common.table(rows, [("variant", "variant", "s"), ("part", "part", "s"),
                            ("mecref ms", "mecref", ".2f"), ("torch ms", "torch", ".2f"),
                            ("mecref/torch", "ratio", ".2f")],
                     title=f"training step, batch {n}, medians of {reps} interleaved reps"))
    for variant, rec in out["variants"].items():
        if "check" in rec:
            c = rec["check"]
            log(f"  {rec['label']} check (float64): loss {c['loss_mecref']:.10f} (mecref) vs {c['loss_torch']:.10f} "
                f"(torch); gradient rel. diff median {c['grad_rel_diff_median']:.1e}, worst "
                f"{c['grad_rel_diff_worst']:.1e} ({c['grad_rel_diff_worst_param']})")
        ab = rec["threads_ab"]
        log(f"  {rec['label']} step, element-wise passes on 1 thread: {ab['one']['median_ms']:.2f} ms, on "
            f"{ab['threads']}: {ab['all']['median_ms']:.2f} ms (1-thread / {ab['threads']}-thread {ab['ratio']:.2f})")
        log(f"  {rec['label']} per layer (forward, backward ms): " + ", ".join(
            f"{r['layer']} {r['forward']['median_ms']:.2f}/{r['backward']['median_ms']:.2f}" for r in rec["layers"]))
        log(f"  cProfile of the mecref {rec['label']} step, top {len(rec['profile']['top'])} by own time:")
        log("    " + common.profile_text(rec["profile"], "step").replace("\n", "\n    "))
    if torch is not None:
        from . import blas_timeout
        out["blas_timeout_default"] = blas_timeout.measure("step", quick, log)
    return out

