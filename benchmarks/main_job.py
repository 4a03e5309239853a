"""Benchmark 6: the main job, what ``mecref train`` runs by default, against a PyTorch twin.

The default ``TrainConfig()``: W2A2 LSQ (conv1 and the linear layer at 8 bits), two augmented
views of each batch of 128 run as one batch of 256, cross-entropy on both views plus 0.2 times
the order-4 Taylor MEC of the two views' features, SGD with momentum and weight decay.

- ``step``: :func:`mecref.train.train_step` (augmentation, forward, loss, closed-form
  backward, the finite check that reads the device once, SGD) against the twin: the same
  augmentation (mecref.data.two_views, on the host for both), the same network
  (benchmarks.torch_ref, weights and LSQ steps copied), ``torch_ref.mec_loss`` with autograd,
  ``loss.item()`` as a loop reads it, and the same SGD. Interleaved A/B.
- ``epoch``: a whole epoch on the bundled data from a fresh model: mecref's
  ``train_small_cnn(epochs=1)`` (data order, augmentation, cosine learning rate, test
  evaluation) against the twin's loop over the same batches in the same order, with the same
  learning rates, and the same evaluation. Interleaved A/B.
- ``conv_input_grad``: each conv's input gradient as mecref computes it (scatter fold) and in
  the gather form, at the step's shapes (benchmarks/conv_grad.py).
- ``gemm_layout``: how each conv GEMM's operands reach BLAS (row-major, or a transposed view
  read with BLAS's transpose flag) and the time against row-major copies (benchmarks/gemm_layout.py).
- ``floor``: the GEMM floor of the step: its GEMMs (im2col form, counted as in
  benchmarks/gemm.py, for a batch of 256) run alone as plain NumPy matmuls of the same shapes,
  timed in the same interleaved rounds as the two steps; and how far above it each library's
  step is (paired within a round).

The twin's first loss and gradients are checked against mecref's before any timing (float64,
random-normal images, the same two views).
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from . import common
from . import conv_grad
from . import gemm_layout
from . import gemm as gemm_bench
from . import torch_ref

LR = 0.01  # the timed steps repeat one batch: a small rate keeps 100+ updates finite


def config(**overrides):
    from mecref import train
    return train.TrainConfig(**overrides).validate()


def mecref_setup(cfg, xb, dtype=np.float32):
    """The main job's model (LSQ steps initialised by one forward, as the first step does) and SGD."""
    from mecref import nn, optim
    model = nn.small_cnn(**cfg.model_config(), seed=cfg.seed).astype(dtype)
    model.forward(np.concatenate([xb, xb]).astype(dtype), train=True)
    opt = optim.SGD(model, lr=LR, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return model, opt


def torch_setup(torch, cfg, model):
    """The twin network with mecref's weights and steps, and its SGD (as mecref.optim.SGD)."""
    mc = cfg.model_config()
    tmodel = torch_ref.torch_small_cnn(torch, w_bits=mc["w_bits"], a_bits=mc["a_bits"],
                                       first_last_bits=mc["first_last_bits"], width=tuple(mc["width"]))
    torch_ref.load_from_mecref(torch, tmodel, model)
    tmodel.train()
    return tmodel, torch_ref.torch_sgd(torch, tmodel, lr=LR, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)


def torch_loss(torch, tmodel, cfg, x1, x2, yb):
    """CE on both views + beta * MEC_taylor(Z1, Z2) / B, as mecref.train.loss_and_grads."""
    F = torch.nn.functional
    B = x1.shape[0]
    x = torch.from_numpy(np.concatenate([x1, x2]))
    y = torch.from_numpy(np.concatenate([yb, yb]))
    logits, feats = tmodel(x)
    ce = F.cross_entropy(logits, y)
    reg = torch_ref.mec_loss(torch, feats[:B], feats[B:], cfg.eps, order=cfg.order) / B
    return ce + cfg.reg_weight * reg, logits, y


def torch_step_fn(torch, tmodel, sgd, cfg):
    """One twin step on a batch: views, loss, autograd, SGD; returns (loss, correct) as floats."""
    from mecref import data

    def step(xb, yb, rng):
        x1, x2 = data.two_views(xb, rng)
        sgd.optimizer.zero_grad(set_to_none=True)
        loss, logits, y = torch_loss(torch, tmodel, cfg, x1, x2, yb)
        loss.backward()
        sgd()
        return float(loss.detach()), int((logits.argmax(1) == y).sum())

    return step


def check(torch, cfg, n, seed=1):
    """First loss and gradients of the main job in mecref and in the twin, float64, from the
    same weights and the same two views of random-normal images."""
    from mecref import train
    from mecref.backend import to_host

    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, 1, 28, 28))
    yb = rng.integers(0, 10, n)
    x1, x2 = rng.standard_normal((2, n, 1, 28, 28))
    model, _ = mecref_setup(cfg, xb.astype(np.float32))
    tmodel, _ = torch_setup(torch, cfg, model)
    model.astype(np.float64)
    tmodel.double()
    parts = train.loss_and_grads(model, x1, x2, yb, cfg)
    tloss, _, _ = torch_loss(torch, tmodel, cfg, x1, x2, yb)
    tloss.backward()
    tparams = dict(tmodel.named_parameters())
    rel = {}
    for name, layer, key in model.named_params():
        tname = torch_ref._PARAM_MAP[(name.rsplit(".", 1)[0], key)]
        g, tg = to_host(layer.grads[key]).ravel(), tparams[tname].grad.numpy().ravel()
        rel[name] = float(np.linalg.norm(g - tg) / max(np.linalg.norm(tg), 1e-300))
    worst = max(rel, key=rel.get)
    return dict(dtype="float64", images="random normal", batch=n, loss_mecref=parts["loss"],
                loss_torch=float(tloss.detach()), grad_rel_diff_median=float(np.median(list(rel.values()))),
                grad_rel_diff_worst=rel[worst], grad_rel_diff_worst_param=worst)


def gemm_replay_fn(n):
    """A callable running the step's GEMMs (batch n, im2col form) as plain NumPy matmuls of
    the same shapes on fixed random operands, and the list of those GEMMs."""
    gemms = gemm_bench.step_gemms(n, quantized=True)
    rng = np.random.default_rng(0)
    ops = [(rng.standard_normal((g["m"], g["k"])).astype(np.float32),
            rng.standard_normal((g["k"], g["n"])).astype(np.float32)) for g in gemms]

    def replay():
        for A, B in ops:
            A @ B

    return replay, gemms


def time_steps(torch, cfg, xb, yb, reps, warmup, lead):
    """Interleaved medians of the mecref step, the twin's step and the step's GEMM floor (its
    GEMMs replayed alone) on one batch: the floor is timed in the same rounds as the steps, so
    a load spike of a shared machine hits all three alike."""
    from mecref import train

    model, opt = mecref_setup(cfg, xb)
    rng_m, rng_t = np.random.default_rng(0), np.random.default_rng(0)
    fns = {"mecref": lambda: train.train_step(model, opt, xb, yb, rng_m, cfg, 0)}
    if torch is not None:
        tmodel, sgd = torch_setup(torch, cfg, model)
        t_step = torch_step_fn(torch, tmodel, sgd, cfg)
        fns["torch"] = lambda: t_step(xb, yb, rng_t)
    fns["floor"], gemms = gemm_replay_fn(2 * xb.shape[0])
    times = common.interleave(fns, reps, warmup=warmup, lead=lead)
    rec = {lib: common.stats(times[lib]) for lib in ("mecref", "torch") if lib in times}
    if torch is not None:
        rec["ratio"] = common.paired_ratio(times["mecref"], times["torch"])
    rec["profile"] = common.profile(fns["mecref"], 3 if reps < 10 else 30)
    from . import step as step_bench
    rec["threads_ab"] = step_bench.threads_ab(fns["mecref"], reps if reps < 10 else reps // 2, warmup, lead)
    return rec, floor(gemms, times, 2 * xb.shape[0])


def floor(gemms, times, n):
    """The GEMM floor from the interleaved times: its median, and each step above it as the
    median over rounds of (t_step - t_floor) / t_floor (paired within a round)."""
    flops = sum(g["flops"] for g in gemms)
    t = float(np.median(times["floor"]))
    rec = dict(batch=n, gemm_gflop=flops / 1e9, floor_ms=t * 1e3,
               floor_gflops=flops / t / 1e9, floor_stats=common.stats(times["floor"]), gemms=gemms,
               note="the MEC term's GEMMs ((128 x 64) x (64 x 128) and smaller) are left out: under 0.01 GFLOP",
               above="median over rounds of (t_step - t_floor) / t_floor, the floor timed in the same round")
    for lib in ("mecref", "torch"):
        if lib in times:
            above = [(a - b) / b for a, b in zip(times[lib], times["floor"])]
            rec[f"{lib}_step_ms"] = common.stats(times[lib])["median_ms"]
            rec[f"{lib}_above_floor"] = float(np.median(above))
            rec[f"{lib}_share_above"] = float(np.median([(a - b) / a for a, b in zip(times[lib], times["floor"])]))
    return rec


def epoch_fns(torch, cfg, ds):
    """(mecref epoch, twin epoch): each trains a fresh model for one epoch and evaluates it."""
    from mecref import data, optim, train

    def mecref_epoch():
        return train.train_small_cnn(cfg, progress=False, dataset=ds).test_acc

    if torch is None:
        return mecref_epoch, None
    x_train, y_train = ds.x_train[:cfg.train_limit], ds.y_train[:cfg.train_limit]
    first = next(data.iterate_batches(x_train, y_train, cfg.batch_size, np.random.default_rng([cfg.seed, 0])))
    model, _ = mecref_setup(cfg, first[0])   # mecref's init, its LSQ steps from the first batch
    tmodel, _ = torch_setup(torch, cfg, model)
    start = copy.deepcopy(tmodel.state_dict())

    def torch_epoch():
        tmodel.load_state_dict(start)
        tmodel.train()
        sgd = torch_ref.torch_sgd(torch, tmodel, lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
        step = torch_step_fn(torch, tmodel, sgd, cfg)
        steps = len(x_train) // cfg.batch_size
        warm = int(round(cfg.warmup_epochs * steps))
        rng = np.random.default_rng([cfg.seed, 0])
        for i, (xb, yb) in enumerate(data.iterate_batches(x_train, y_train, cfg.batch_size, rng)):
            for group in sgd.optimizer.param_groups:
                group["lr"] = optim.cosine_lr(i, steps, cfg.lr, warm)
            step(xb, yb, rng)
        tmodel.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in data.iterate_batches(ds.x_test, ds.y_test, min(1000, len(ds.y_test)),
                                               np.random.default_rng(0), shuffle=False, drop_last=False):
                logits, _ = tmodel(torch.from_numpy(xb))
                correct += int((logits.argmax(1) == torch.from_numpy(yb)).sum())
        return correct / len(ds.y_test)

    return mecref_epoch, torch_epoch


def run(torch, quick=False, lead=0.002, log=print):
    missing = common.mecref_missing("train", "data", "nn", "optim")
    if missing:
        return dict(skipped="mecref modules missing: " + "; ".join(missing))
    from mecref import data

    ds = data.load_bundled()
    B = 8 if quick else 128
    reps, warmup = (3, 1) if quick else (30, 5)
    cfg = config(batch_size=B, width=(16, 32, 64))
    idx = np.random.default_rng(0).choice(len(ds.y_train), B, replace=False)
    xb, yb = np.ascontiguousarray(data.normalize(ds.x_train[idx])), ds.y_train[idx].astype(np.int64)
    out = dict(config=cfg.as_dict(), batch=B, network_batch=2 * B, reps=reps, warmup=warmup,
               lead_s=lead, lr=LR, ratio="median over reps of t_mecref / t_torch of the same rep")
    if torch is None:
        out["torch"] = common.torch_missing_reason()
    else:
        out["check"] = check(torch, cfg, 4 if quick else 16)
    out["step"], out["floor"] = time_steps(torch, cfg, xb, yb, reps, warmup, lead)

    out["conv_input_grad"] = conv_grad.run(2 * B, 3 if quick else 21, log=log)
    out["gemm_layout"] = gemm_layout.run(2 * B, 3 if quick else 15, log=log)

    ecfg = config(epochs=1, batch_size=B, train_limit=4 * B if quick else None)
    eds = ds if not quick else dataclasses.replace(ds, x_test=ds.x_test[:100], y_test=ds.y_test[:100])
    m_epoch, t_epoch = epoch_fns(torch, ecfg, eds)
    fns = {"mecref": m_epoch} if t_epoch is None else {"mecref": m_epoch, "torch": t_epoch}
    ereps = 1 if quick else 3
    times = common.interleave(fns, ereps, warmup=0 if quick else 1)
    n_train = len(ds.y_train) if ecfg.train_limit is None else ecfg.train_limit
    out["epoch"] = dict(reps=ereps, train_images=n_train, steps=n_train // B, test_images=len(eds.y_test),
                        **{lib: common.stats(t) for lib, t in times.items()})
    if "torch" in times:
        out["epoch"]["ratio"] = common.paired_ratio(times["mecref"], times["torch"])

    rows = [dict(what=f"main-job step (batch {B} x 2 views)", mecref=out["step"]["mecref"]["median_ms"],
                 torch=out["step"].get("torch", {}).get("median_ms"), ratio=out["step"].get("ratio")),
            dict(what=f"whole epoch ({out['epoch']['steps']} steps + test)", mecref=out["epoch"]["mecref"]["median_ms"],
                 torch=out["epoch"].get("torch", {}).get("median_ms"), ratio=out["epoch"].get("ratio"))]
    log(common.table(rows, [("what", "what", "s"), ("mecref ms", "mecref", ".1f"),
                            ("torch ms", "torch", ".1f"), ("mecref/torch", "ratio", ".2f")],
                     title="the default main job (W2A2 LSQ, two views, order-4 Taylor MEC)"))
    f = out["floor"]
    log(f"  GEMM floor of the step: {f['floor_ms']:.2f} ms ({f['gemm_gflop']:.3f} GFLOP at "
        f"{f['floor_gflops']:.0f} GFLOP/s); above it: " + ", ".join(
            f"{lib} {f[f'{lib}_above_floor']:.2f}x the floor" for lib in ("mecref", "torch")
            if f"{lib}_above_floor" in f))
    if "check" in out:
        c = out["check"]
        log(f"  check (float64): loss {c['loss_mecref']:.10f} (mecref) vs {c['loss_torch']:.10f} (torch); "
            f"gradient rel. diff median {c['grad_rel_diff_median']:.1e}, worst {c['grad_rel_diff_worst']:.1e} "
            f"({c['grad_rel_diff_worst_param']})")
    return out
