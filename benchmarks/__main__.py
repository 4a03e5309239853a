"""python -m benchmarks [--quick] [--only step,main,entropy,memory,gemm,gpu] [--json out.json] [--report]

Runs the benchmarks of mecref against PyTorch and prints a table for each; ``--json`` writes
every figure with the machine and the command; ``--report`` also writes docs/benchmarks.md
(and its plot) from them, as ``python -m benchmarks.report out.json`` does.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

from . import common

BENCHMARKS = ("step", "main", "entropy", "memory", "gemm", "gpu")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few reps (smoke test)")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--report", action="store_true",
                   help="also write docs/benchmarks.md and docs/img/bench_*.png from the results")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in BENCHMARKS]
    if bad or not only:
        p.error(f"--only takes names from {','.join(BENCHMARKS)}, got {args.only!r}")
    args.only = [b for b in BENCHMARKS if b in only]
    return args


def run(argv=None, log=print):
    """Run the selected benchmarks; returns the results document (a JSON-ready dict)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python -m benchmarks" + ("" if not argv else " " + " ".join(argv))
    t_start = time.perf_counter()
    torch = common.load_torch()
    threads = common.setup_threads(torch)
    machine = common.machine_info(torch)
    log(f"$ {command}")
    log(f"machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs; numpy {machine['numpy']}, "
        f"torch {machine['torch'] or '(not installed)'}; load average {common.loadavg()}")
    log(common.describe_threads(threads))
    doc = dict(command=command, quick=args.quick, only=args.only,
               started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               machine=machine, threads=threads, loadavg_start=common.loadavg(), results={})
    if torch is not None:
        doc["spin_check"] = common.spin_check(torch)
        s = doc["spin_check"]
        log(f"spin check ({s['probe']}): numpy alone {s['numpy_alone_ms']:.2f} ms, right after a "
            f"torch call {s['numpy_right_after_torch_ms']:.2f} ms, with the {s['lead_s'] * 1e3:.0f} ms "
            f"lead-in the benchmarks use {s['numpy_interleaved_with_lead_ms']:.2f} ms")
    else:
        log(f"torch: {common.torch_missing_reason()}; the torch columns are skipped")
    for name in args.only:
        log("")
        t0 = time.perf_counter()
        try:
            rec = _run_one(name, torch, args.quick, doc["results"], log)
        except Exception:
            rec = dict(error=traceback.format_exc())
            log(f"{name} benchmark failed:\n{rec['error']}")
        if "skipped" in rec:
            log(f"{name} benchmark skipped: {rec['skipped']}")
        rec["seconds"] = time.perf_counter() - t0
        rec["command"] = "python -m benchmarks --only " + name + (" --quick" if args.quick else "")
        doc["results"][name] = rec
    doc["loadavg_end"] = common.loadavg()
    doc["seconds"] = time.perf_counter() - t_start

    from . import report
    doc["targets"] = report.targets(doc)
    log("")
    log(report.targets_text(doc["targets"]))
    log(f"total {doc['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log(f"wrote {args.json}")
    if args.report:
        for path in report.write(doc, json_path=args.json):
            log(f"wrote {path}")
    return doc


def _run_one(name, torch, quick, results, log):
    if name == "step":
        from . import step
        return step.run(torch, quick=quick, log=log)
    if name == "main":
        from . import main_job
        return main_job.run(torch, quick=quick, log=log)
    if name == "entropy":
        from . import entropy_terms
        return entropy_terms.run(torch, quick=quick, log=log)
    if name == "memory":
        from . import memory
        return memory.run(torch, quick=quick, log=log)
    if name == "gemm":
        from . import gemm
        return gemm.run(torch, quick=quick, step_result=results.get("step"), log=log)
    from . import gpu
    return gpu.run(torch, quick=quick, log=log)


if __name__ == "__main__":
    run()
