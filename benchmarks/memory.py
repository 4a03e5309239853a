"""Benchmark 3: peak memory of a short training epoch, mecref against torch.

Each measurement runs in its own subprocess (``python -m benchmarks.memory child ...``) so that
neither library's allocations nor imports leak into the other's figure:

- ``rss``: the process's peak resident set during the epoch minus its resident set at the
  baseline (after the imports, the data, the model and the optimiser were set up). The peak is
  the kernel's VmHWM, reset to the current RSS at the baseline (``/proc/self/clear_refs``),
  which ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` also reads; ``ru_maxrss`` alone would
  keep any earlier, higher mark (an import's transient, or the parent's RSS inherited across
  fork), so it is recorded (``maxrss_delta_mib``) but not used. Where the reset is not
  possible, ``ru_maxrss`` after minus ``ru_maxrss`` at the baseline is used (``delta_from``
  says which). Both libraries are measured this way; the target compares these.
- ``tracemalloc`` (mecref only): the peak of the memory NumPy allocated during the epoch, as
  Python's tracemalloc sees it (NumPy reports its array buffers to tracemalloc), in a
  separate subprocess since tracing itself costs memory and time (so over the first 5 steps:
  every step has the same working set).

The epoch: ``steps`` training steps (forward, cross-entropy, backward, SGD) on consecutive
batches of the bundled Fashion-MNIST subset.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from . import common

STEPS, QUICK_STEPS = 20, 2
TRACED_STEPS = 5   # tracemalloc slows Python ~10x; every step has the same working set


def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _proc_status_mib(key):
    """VmRSS / VmHWM of this process from /proc/self/status (None where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(lib, variant, steps, batch_size, mode):
    """Runs inside the subprocess; returns the JSON-ready record."""
    import numpy as np

    from . import step as step_bench

    x_all, y_all = step_bench.batch(steps * batch_size, seed=2)
    batches = [(x_all[i * batch_size:(i + 1) * batch_size], y_all[i * batch_size:(i + 1) * batch_size])
               for i in range(steps)]
    if lib == "mecref":
        from mecref import losses, nn, optim
        model = nn.small_cnn(**step_bench.VARIANTS[variant]["mecref"], seed=0)
        opt = optim.SGD(model, lr=step_bench.LR, momentum=0.9, weight_decay=5e-4)

        def train_step(x, y):
            logits, _ = model.forward(x, train=True)
            _, cache = losses.softmax_cross_entropy(logits, y)
            model.backward(losses.softmax_cross_entropy_backward(cache, 1.0))
            opt.step()
    else:
        import torch

        from . import torch_ref
        common.setup_threads(torch)
        tmodel = torch_ref.torch_small_cnn(torch, **step_bench.VARIANTS[variant]["torch"])
        tmodel.train()
        sgd = torch_ref.torch_sgd(torch, tmodel, lr=step_bench.LR)
        batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]

        def train_step(x, y):
            sgd.optimizer.zero_grad(set_to_none=True)
            logits, _ = tmodel(x)
            torch.nn.functional.cross_entropy(logits, y).backward()
            sgd()
    if mode == "tracemalloc":
        import tracemalloc
        tracemalloc.start()
    base = _maxrss_mib()
    reset = _reset_peak()
    base_rss = _proc_status_mib("VmRSS")
    for x, y in batches:
        train_step(x, y)
    rec = dict(lib=lib, variant=variant, steps=steps, batch=batch_size, mode=mode,
               baseline_maxrss_mib=base, peak_maxrss_mib=_maxrss_mib(),
               baseline_rss_mib=base_rss, peak_hwm_mib=_proc_status_mib("VmHWM"))
    rec["maxrss_delta_mib"] = rec["peak_maxrss_mib"] - base
    if reset and base_rss is not None and rec["peak_hwm_mib"] is not None:
        rec["delta_mib"] = rec["peak_hwm_mib"] - base_rss
        rec["delta_from"] = "VmHWM (reset at the baseline) - VmRSS at the baseline"
    else:
        rec["delta_mib"] = rec["maxrss_delta_mib"]
        rec["delta_from"] = "ru_maxrss - ru_maxrss at the baseline"
    if mode == "tracemalloc":
        rec["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    del np
    return rec


def measure(lib, variant, steps, batch_size, mode, env=None):
    """Run :func:`child` in a fresh interpreter; returns its record (or an error record)."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "child", lib, variant, str(steps),
           str(batch_size), mode]
    proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ if env is None else env))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return dict(lib=lib, variant=variant, mode=mode,
                    error=f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def run(torch, quick=False, log=print):
    missing = common.mecref_missing("nn", "losses", "optim")
    if missing:
        return dict(skipped="mecref modules missing: " + "; ".join(missing))
    from . import step as step_bench

    steps, n = (QUICK_STEPS, 8) if quick else (STEPS, 128)
    env = dict(os.environ)
    if torch is None or common.DISABLE_TORCH:
        env["MECREF_BENCH_NO_TORCH"] = "1"
    method = ("rss: peak RSS during the epoch (VmHWM, reset at the baseline; what ru_maxrss "
              "reads) minus RSS after set-up, each library in its own subprocess; tracemalloc: "
              f"peak traced NumPy allocations during the first {min(steps, TRACED_STEPS)} steps "
              "(mecref only, separate subprocess)")
    out = dict(steps=steps, batch=n, method=method, variants={})
    rows = []
    for variant, spec in step_bench.VARIANTS.items():
        rec = dict(label=spec["label"])
        rec["mecref"] = measure("mecref", variant, steps, n, "rss", env)
        rec["mecref_tracemalloc"] = measure("mecref", variant, min(steps, TRACED_STEPS), n,
                                            "tracemalloc", env)
        if torch is not None:
            rec["torch"] = measure("torch", variant, steps, n, "rss", env)
            if "delta_mib" in rec["mecref"] and "delta_mib" in rec["torch"]:
                rec["ratio"] = rec["mecref"]["delta_mib"] / max(rec["torch"]["delta_mib"], 1e-9)
        else:
            rec["torch"] = dict(skipped=common.torch_missing_reason())
        out["variants"][variant] = rec
        rows.append(dict(variant=spec["label"], m=rec["mecref"].get("delta_mib"),
                         tm=rec["mecref_tracemalloc"].get("tracemalloc_peak_mib"),
                         t=rec["torch"].get("delta_mib"), ratio=rec.get("ratio"),
                         mb=rec["mecref"].get("baseline_rss_mib"),
                         tb=rec["torch"].get("baseline_rss_mib")))
        for k in ("mecref", "mecref_tracemalloc", "torch"):
            if "error" in rec[k]:
                log(f"  {spec['label']} {k}: {rec[k]['error']}")
    log(common.table(rows, [("variant", "variant", "s"), ("mecref MiB", "m", ".1f"),
                            ("mecref traced MiB", "tm", ".1f"), ("torch MiB", "t", ".1f"),
                            ("mecref/torch", "ratio", ".2f"), ("mecref base MiB", "mb", ".0f"),
                            ("torch base MiB", "tb", ".0f")],
                     title=f"peak memory of {steps} training steps (batch {n}) above the set-up "
                           "baseline (peak RSS; traced = tracemalloc peak)"))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "child":
        _, _, lib_, variant_, steps_, batch_, mode_ = sys.argv
        print(json.dumps(child(lib_, variant_, int(steps_), int(batch_), mode_)))
    else:
        sys.exit("usage: python -m benchmarks.memory child mecref|torch VARIANT STEPS BATCH rss|tracemalloc")
