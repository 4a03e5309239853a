"""The step and coding-length A/B comparisons again, under OpenBLAS's default thread timeout.

The main run sets ``OPENBLAS_THREAD_TIMEOUT=4``: OpenBLAS's workers sleep right after each
call, so they cannot spin while torch works (the thread-spin trap), but every BLAS or LAPACK
call of mecref may then pay a wake-up (SciPy's Cholesky, a LAPACK routine made of many small
BLAS calls, suffers most). Here the same comparisons run in a subprocess whose OpenBLAS keeps
its default timeout (``OPENBLAS_THREAD_TIMEOUT=28``: 2^28 cycles, about 0.1 s of spinning), and
the trap is handled by a long lead-in instead: before each timed run, the same library runs
untimed for ``LEAD`` seconds, longer than the other library's workers spin. Fewer reps, same
interleaving and paired ratios.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from . import common

LEAD, QUICK_LEAD = 0.25, 0.005
DEFAULT_TIMEOUT = "28"


def measure(what, quick, log=print):
    """Run the child for ``what`` ("step" or "coding_length"); returns its record."""
    env = dict(os.environ, OPENBLAS_THREAD_TIMEOUT=DEFAULT_TIMEOUT)
    cmd = [sys.executable, "-m", "benchmarks.blas_timeout", what] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        rec = dict(error=f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
        log(f"  {what} under OPENBLAS_THREAD_TIMEOUT={DEFAULT_TIMEOUT} failed: {rec['error']}")
        return rec
    rec = json.loads(lines[-1])
    rows = [dict(what=r["what"], mecref=r["mecref"]["median_ms"], torch=r["torch"]["median_ms"],
                 ratio=r["ratio"]) for r in rec["items"]]
    log(common.table(rows, [("what", "what", "s"), ("mecref ms", "mecref", ".3f"),
                            ("torch ms", "torch", ".3f"), ("mecref/torch", "ratio", ".2f")],
                     title=f"  the same under OPENBLAS_THREAD_TIMEOUT={DEFAULT_TIMEOUT} (OpenBLAS's "
                           f"default), {rec['lead_s'] * 1e3:.0f} ms lead-in, {rec['reps']} reps"))
    return rec


def _child(what, quick):
    from . import entropy_terms
    from . import step as step_bench

    torch = common.load_torch()
    threads = common.setup_threads(torch)
    lead = QUICK_LEAD if quick else LEAD
    items = []
    if what == "step":
        reps = 3 if quick else 15
        n = 8 if quick else 128
        x, y = step_bench.batch(n)
        for variant, spec in step_bench.VARIANTS.items():
            model, _, m_step = step_bench.mecref_model(variant, x, y)
            _, _, t_step = step_bench.torch_model(torch, variant, model, x, y)
            times = common.interleave({"mecref": m_step, "torch": t_step}, reps, warmup=3, lead=lead)
            items.append(_item(variant, f"{spec['label']} step", times))
    else:
        reps = 3 if quick else 9
        ms, ds = ((entropy_terms.QUICK_M, entropy_terms.QUICK_D) if quick
                  else (entropy_terms.GRID_M, entropy_terms.GRID_D))
        for m in ms:
            for d in ds:
                Z1, Z2 = entropy_terms.features(m, d)
                T1 = torch.tensor(Z1, requires_grad=True)
                fns = dict(mecref=entropy_terms.mecref_fn("coding_length", Z1, Z2),
                           torch=entropy_terms.torch_fn(torch, "coding_length", T1, None))
                times = common.interleave(fns, reps, warmup=2, lead=lead)
                rec = _item("coding_length", f"coding_length m={m} d={d}", times)
                rec.update(m=m, d=d, speedup=1.0 / rec["ratio"])
                items.append(rec)
    return dict(OPENBLAS_THREAD_TIMEOUT=os.environ.get("OPENBLAS_THREAD_TIMEOUT"), lead_s=lead,
                reps=reps, threads=threads, items=items,
                ratio="median over reps of t_mecref / t_torch of the same rep (interleaved A/B)")


def _item(key, what, times):
    return dict(key=key, what=what, mecref=common.stats(times["mecref"]),
                torch=common.stats(times["torch"]),
                ratio=common.paired_ratio(times["mecref"], times["torch"]))


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in ("step", "coding_length") or set(args[1:]) - {"--quick"}:
        sys.exit("usage: python -m benchmarks.blas_timeout step|coding_length [--quick]")
    print(json.dumps(_child(args[0], "--quick" in args[1:])))
