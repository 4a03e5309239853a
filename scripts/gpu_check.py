"""python3 scripts/gpu_check.py [--out DIR] [--steps N] [--skip-tests] [--bench]

One check of mecref on a machine with a GPU and no network:

1. the machine: GPU name, CuPy, NumPy and CUDA runtime versions;
2. the GPU tests (``pytest -m gpu``) and the backend-parametrised cupy cases (``-k cupy``);
3. N training steps of W2A2 LSQ + reg="mec" on NumPy and on CuPy from the same seed: the loss
   of each of the first 5 steps must agree to a relative difference of 1e-3 (float32, and the
   GPU sums in another order); then one timed epoch on the bundled data on each backend;
4. with ``--bench``, ``python -m benchmarks --only gpu --json DIR/bench_gpu.json``.

Writes ``DIR/gpu_check.json`` (DIR: ``--out``, else ``$OUT``, else ``gpu_check_out``) and prints
a summary. Exit status 0 when every check passed, 1 when one failed. Without a usable GPU it
prints why (mecref.backend.BackendUnavailableError), writes the JSON with status "no_gpu" and
exits 0, so it runs anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without the package installed
    sys.path.insert(0, str(ROOT))

from mecref import data as mdata  # noqa: E402
from mecref import nn, optim  # noqa: E402
from mecref.backend import (BackendUnavailableError, get_xp,  # noqa: E402
                            scipy_blas_single_thread)
from mecref.train import TrainConfig, train_small_cnn, train_step  # noqa: E402

RTOL = 1e-3          # |loss_a - loss_b| / |loss_a| at each compared step
COMPARED_STEPS = 5   # the first steps held to RTOL; later ones are recorded, not judged
TOLERANCE = dict(
    rtol=RTOL, steps=COMPARED_STEPS,
    rule=(f"|loss_a - loss_b| / |loss_a| <= {RTOL:g} at each of the first {COMPARED_STEPS} "
          "training steps (float32; the GPU reduces in a different order, and a rounding "
          "difference can move a fake-quantized value across a grid point, so later steps "
          "are recorded but not judged)"),
)
TEST_RUNS = (("gpu_marked", ["-m", "gpu"]),
             ("cupy_cases", ["-m", "not gpu", "-k", "cupy"]))  # -k cupy, less what -m gpu ran


def machine_info() -> dict:
    """The host, NumPy, CuPy, the CUDA runtime and driver, and the GPU (where one answers)."""
    info = dict(python=platform.python_version(), platform=platform.platform(),
                numpy=np.__version__, cupy=_cupy_distribution(), gpu=None,
                cuda_runtime=None, cuda_driver=None, cupy_error=None)
    try:
        cp = get_xp("cupy")
    except BackendUnavailableError as exc:
        info["cupy_error"] = str(exc)
        return info
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    info.update(cupy=cp.__version__, gpu=name.decode() if isinstance(name, bytes) else str(name),
                gpu_memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
                cuda_runtime=_cuda_version(cp.cuda.runtime.runtimeGetVersion()),
                cuda_driver=_cuda_version(cp.cuda.runtime.driverGetVersion()))
    return info


def _cupy_distribution():
    """'cupy-cuda12x 13.x' from the installed metadata (no import), or None."""
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().startswith("cupy"):
            return f"{name} {dist.version}"
    return None


def _cuda_version(v: int) -> str:
    """CUDA's integer version (12040) as '12.4'."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def run_gpu_tests(timeout: float = 1200.0, runs=TEST_RUNS) -> dict:
    """Run each pytest selection in a subprocess; counts, exit status and the summary line.

    Returns dict(runs={label: dict(args, returncode, passed, failed, errors, skipped, seconds,
    summary)}, ok). pytest's status 5 (nothing selected) counts as passing; a timeout fails.
    """
    out, ok = {}, True
    for label, args in runs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = None, f"timed out after {timeout:g} s\n{exc.stdout or ''}"
        rec = dict(command=" ".join(["python", "-m", "pytest", "-q", *args]), returncode=rc,
                   seconds=round(time.perf_counter() - t0, 1), **_pytest_counts(text))
        rec["ok"] = rc in (0, 5) and rec["failed"] == 0 and rec["errors"] == 0
        if not rec["ok"]:
            rec["tail"] = text[-4000:]
        ok = ok and rec["ok"]
        out[label] = rec
    return dict(runs=out, ok=ok)


def _pytest_counts(text: str) -> dict:
    """passed/failed/errors/skipped from pytest's last summary line ('3 passed, 1 skipped in 2s')."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0, summary=None)
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\d+ \w+.* in [\d.]+s", ln)]
    if not lines:
        return counts
    counts["summary"] = lines[-1].strip("= ")
    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1]):
        counts["errors" if word.startswith("error") else word] += int(n)
    return counts


def first_step_losses(cfg: TrainConfig, steps: int) -> list:
    """Per-step losses of the first ``steps`` steps of a run, built as train_small_cnn does.

    Same model init, optimiser, learning-rate schedule (cosine with warm-up over
    ``cfg.epochs`` epochs), per-epoch batch order and augmentation stream
    (``default_rng([seed, epoch])``); ``cfg.epochs`` is raised to cover ``steps``.
    """
    ds = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    x, y = ds.x_train, ds.y_train
    if cfg.train_limit is not None:
        x, y = x[:cfg.train_limit], y[:cfg.train_limit]
    steps_per_epoch = len(x) // cfg.batch_size
    cfg = dataclasses.replace(cfg, epochs=max(cfg.epochs, math.ceil(steps / steps_per_epoch)))
    cfg.validate()
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    model = nn.small_cnn(**cfg.model_config(), backend=cfg.backend, seed=cfg.seed)
    opt = optim.SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    losses, step = [], 0
    with scipy_blas_single_thread():
        for epoch in range(cfg.epochs):
            rng = np.random.default_rng([cfg.seed, epoch])
            for xb, yb in mdata.iterate_batches(x, y, cfg.batch_size, rng, shuffle=True,
                                                drop_last=True, backend=cfg.backend):
                if step == steps:
                    return losses
                opt.lr = optim.cosine_lr(step, total_steps, cfg.lr, warmup_steps)
                losses.append(train_step(model, opt, xb, yb, rng, cfg, step)["loss"])
                step += 1
    return losses


def compare_first_steps(steps: int = 20, backend_a: str = "numpy", backend_b: str = "cupy",
                        **config) -> dict:
    """Train ``steps`` steps of W2A2 LSQ + reg="mec" on two backends from one seed.

    ``config`` overrides :class:`mecref.train.TrainConfig` fields (e.g. ``train_limit``,
    ``width``, ``batch_size`` for a small run). The first :data:`COMPARED_STEPS` losses must
    satisfy ``|a - b| / |a| <= RTOL``.

    Returns
    -------
    dict(backends, config, losses_a, losses_b, rel_diff (every step), max_rel_diff_compared,
    tolerance, passed)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    base = dict(quantizer="lsq", w_bits=2, a_bits=2, reg="mec", epochs=1, seed=0)
    base.update(config)
    la, lb = (first_step_losses(TrainConfig(**dict(base, backend=b)).validate(), steps)
              for b in (backend_a, backend_b))
    rel = [abs(a - b) / max(abs(a), np.finfo(np.float32).tiny) for a, b in zip(la, lb)]
    judged = rel[:COMPARED_STEPS]
    return dict(backends=[backend_a, backend_b], config=TrainConfig(**base).as_dict(),
                steps=steps, losses_a=la, losses_b=lb, rel_diff=rel,
                max_rel_diff_compared=max(judged), tolerance=TOLERANCE,
                passed=len(la) == len(lb) == steps and max(judged) <= RTOL)


def timed_epoch(backend: str, **config) -> dict:
    """One epoch of W2A2 LSQ + reg="mec" on the bundled data: training samples/s and accuracy."""
    cfg = dict(quantizer="lsq", w_bits=2, a_bits=2, reg="mec", epochs=1, seed=0)
    cfg.update(config)
    res = train_small_cnn(backend=backend, progress=False, **cfg)
    row = res.history[0]
    return dict(backend=backend, samples_per_s=row["samples_per_s"], seconds=row["seconds"],
                loss=row["loss"], test_acc=row["test_acc"])


def run_bench(out_dir: Path, timeout: float = 1800.0) -> dict:
    """``python -m benchmarks --only gpu --json out_dir/bench_gpu.json``; its status and path."""
    path = out_dir / "bench_gpu.json"
    cmd = [sys.executable, "-m", "benchmarks", "--only", "gpu", "--json", str(path)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, text = None, f"timed out after {timeout:g} s"
    rec = dict(command=f"python -m benchmarks --only gpu --json {path}", returncode=rc,
               json=str(path) if path.exists() else None)
    gpu = {}
    if path.exists():
        gpu = json.loads(path.read_text()).get("results", {}).get("gpu", {})
    rec["skipped"] = gpu.get("skipped")
    rec["error"] = gpu.get("error")
    rec["ok"] = rc == 0 and path.exists() and not rec["error"]
    if not rec["ok"]:
        rec["tail"] = text[-4000:]
    return rec


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python3 scripts/gpu_check.py",
                                description=__doc__.split("\n\n")[1])
    p.add_argument("--out", metavar="DIR",
                   help="where gpu_check.json goes (default: $OUT, else gpu_check_out)")
    p.add_argument("--steps", type=int, default=20, help="training steps compared (default 20)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests")
    p.add_argument("--bench", action="store_true", help="also run the GPU benchmark")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    args.out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    return args


def main(argv=None, *, compare_config=None, timed_config=None) -> int:
    """Run the checks, write DIR/gpu_check.json, print a summary; the exit status.

    ``compare_config`` and ``timed_config`` override TrainConfig fields of the comparison and
    the timed epochs (the defaults: full width, batch 128, all bundled images).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc = dict(command="python3 scripts/gpu_check.py" + "".join(f" {a}" for a in argv),
               started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               machine=machine_info(), tolerance=TOLERANCE, checks={})
    try:
        get_xp("cupy")
    except BackendUnavailableError as exc:
        print(f"gpu_check: no usable GPU: {exc}")
        doc.update(status="no_gpu", reason=str(exc))
        return _finish(doc, args.out, t0, 0)

    checks = doc["checks"]
    if not args.skip_tests:
        checks["tests"] = run_gpu_tests()
    checks["first_steps"] = _guarded(lambda: compare_first_steps(args.steps, "numpy", "cupy",
                                                                 **(compare_config or {})))
    checks["timing"] = _guarded(lambda: _timing(timed_config or {}))
    if args.bench:
        checks["bench"] = run_bench(args.out)
    failed = [name for name, rec in checks.items() if not rec.get("ok", rec.get("passed"))]
    doc.update(status="failed" if failed else "passed", failed=failed)
    return _finish(doc, args.out, t0, 1 if failed else 0)


def _timing(config) -> dict:
    """One epoch on each backend and their ratio (CuPy's kernels were compiled by the comparison)."""
    gpu, cpu = timed_epoch("cupy", **config), timed_epoch("numpy", **config)
    return dict(cupy=gpu, numpy=cpu, speedup=gpu["samples_per_s"] / cpu["samples_per_s"], ok=True)


def _guarded(fn) -> dict:
    """Run a check; an exception becomes a failed record carrying its message."""
    try:
        return fn()
    except Exception as exc:  # a check that crashes is a failed check, not a crashed script
        return dict(ok=False, passed=False, error=f"{type(exc).__name__}: {exc}")


def _finish(doc, out_dir: Path, t0: float, status: int) -> int:
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(summary(doc))
    print(f"wrote {path}")
    return status


def summary(doc) -> str:
    """A few lines: the machine, each check, and the verdict."""
    m = doc["machine"]
    lines = [f"machine: {m['gpu'] or 'no GPU'}; numpy {m['numpy']}, cupy {m['cupy']}, "
             f"CUDA runtime {m['cuda_runtime']}, driver {m['cuda_driver']}",
             f"tolerance: {doc['tolerance']['rule']}"]
    checks = doc["checks"]
    for label, rec in checks.get("tests", {}).get("runs", {}).items():
        lines.append(f"tests {label} ({rec['command']}): {rec['summary'] or 'no summary'}"
                     f" -> {'ok' if rec['ok'] else 'FAILED'}")
    fs = checks.get("first_steps")
    if fs:
        if "error" in fs:
            lines.append(f"first steps: FAILED ({fs['error']})")
        else:
            lines.append(f"first steps ({fs['steps']} steps, {fs['backends'][0]} vs "
                         f"{fs['backends'][1]}): max rel diff over the first "
                         f"{COMPARED_STEPS} {fs['max_rel_diff_compared']:.2e} (all steps "
                         f"{max(fs['rel_diff']):.2e}) -> {'ok' if fs['passed'] else 'FAILED'}")
    tm = checks.get("timing")
    if tm:
        lines.append(f"timing: FAILED ({tm['error']})" if "error" in tm else
                     f"one epoch: cupy {tm['cupy']['samples_per_s']:.0f} samples/s, numpy "
                     f"{tm['numpy']['samples_per_s']:.0f} samples/s ({tm['speedup']:.1f}x)")
    bench = checks.get("bench")
    if bench:
        lines.append(f"bench: {'ok' if bench['ok'] else 'FAILED'}"
                     + (f" (skipped: {bench['skipped']})" if bench["skipped"] else "")
                     + (f" -> {bench['json']}" if bench["json"] else ""))
    lines.append(f"status: {doc['status']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
