"""What every benchmark shares: optional imports, thread set-up, interleaved A/B timing,
the machine description and plain-text tables."""
from __future__ import annotations

import cProfile
import importlib
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mecref.backend import cpu_model as _cpu_model

from . import THREAD_SETUP

REPO = Path(__file__).resolve().parent.parent

# Tests set this to exercise the "torch is missing" paths on a machine that has torch.
DISABLE_TORCH = os.environ.get("MECREF_BENCH_NO_TORCH", "") not in ("", "0")


# ----------------------------------------------------------------------------- optional parts
def load_torch():
    """The torch module, or None when it is not installed (or disabled for a test)."""
    if DISABLE_TORCH:
        return None
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def torch_missing_reason():
    if DISABLE_TORCH:
        return "torch disabled (MECREF_BENCH_NO_TORCH is set)"
    return "torch is not installed: `python3 -m pip install torch==2.13.0 threadpoolctl`"


def mecref_missing(*modules):
    """Names of the mecref modules (e.g. "nn", "optim") that cannot be imported, with why."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(f"mecref.{name}")
        except Exception as exc:  # ImportError, or a module that fails while importing
            missing.append(f"mecref.{name} ({type(exc).__name__}: {exc})")
    return missing


# ----------------------------------------------------------------------------- threads
def blas_pools():
    """threadpoolctl's view of the loaded thread pools (BLAS and OpenMP), or [] without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "num_threads", "version", "architecture", "filepath",
            "threading_layer")
    return [{k: p.get(k) for k in keep if k in p} for p in threadpool_info()]


def numpy_blas_threads():
    """Threads of NumPy's own BLAS (threadpoolctl), else the CPUs this process may use."""
    for p in blas_pools():
        path = str(p.get("filepath", ""))
        if p.get("user_api") == "blas" and ("numpy" in path or "scipy_openblas64" in path):
            return int(p["num_threads"]), "threadpoolctl (numpy's OpenBLAS)"
    return len(os.sched_getaffinity(0)), "os.sched_getaffinity (threadpoolctl not installed)"


def setup_threads(torch=None):
    """Give torch as many intra-op threads as NumPy's BLAS has; return what was done."""
    n, source = numpy_blas_threads()
    info = dict(THREAD_SETUP)
    info.update(numpy_blas_threads=n, numpy_blas_threads_from=source,
                OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE", "unset"),
                OPENBLAS_L2_SIZE=os.environ.get("OPENBLAS_L2_SIZE", "unset"),
                OPENBLAS_THREAD_TIMEOUT=os.environ.get("OPENBLAS_THREAD_TIMEOUT", "unset"),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "unset"),
                OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "unset"))
    if torch is not None:
        torch.set_num_threads(n)
        info["torch_threads"] = f"torch.set_num_threads({n}) -> {torch.get_num_threads()} intra-op"
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    return info


def describe_threads(info):
    lines = [f"threads: numpy BLAS {info['numpy_blas_threads']} ({info['numpy_blas_threads_from']}); "
             f"OPENBLAS_THREAD_TIMEOUT {info['openblas_thread_timeout']}"]
    if "torch_threads" in info:
        lines.append(f"         {info['torch_threads']}, {info['torch_interop_threads']} inter-op")
    lines.append(f"         OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']} (left as found), "
                 f"OPENBLAS_L2_SIZE={info['OPENBLAS_L2_SIZE']}, OMP_WAIT_POLICY={info['OMP_WAIT_POLICY']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- timing
def interleave(fns, reps, warmup=2, lead=0.0):
    """Time callables in turn within one process: rep r runs them in order (A, B) for even r
    and reversed (B, A) for odd r, so slow drifts of a shared machine hit both alike.

    Before each timed call, the same callable runs untimed until ``lead`` seconds have passed
    (at least once when ``lead > 0``): the worker threads the other library left spinning go
    idle meanwhile, and the timed call sees the steady state of back-to-back use, as in a
    training loop.

    Parameters
    ----------
    fns : dict name -> callable()  (a GPU callable synchronises before it returns)
    reps : int, timed runs of each callable
    warmup : int, untimed runs of each first
    lead : float, seconds of untimed lead-in runs before each timed run

    Returns
    -------
    dict name -> list of seconds (length reps)
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            fn = fns[n]
            if lead > 0:
                t_end = time.perf_counter() + lead
                fn()
                while time.perf_counter() < t_end:
                    fn()
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return times


def spin_check(torch, reps=21, lead=0.01):
    """The BLAS thread-spin trap, measured: a small NumPy GEMM probe timed alone, right after a
    torch call, and with the lead-in used by the benchmarks (medians in ms)."""
    a = np.random.default_rng(0).standard_normal((192, 192)).astype(np.float32)
    ta = torch.from_numpy(a.copy())

    def probe_np():
        for _ in range(8):
            a @ a

    def probe_torch():
        for _ in range(8):
            ta @ ta

    alone = interleave({"numpy": probe_np}, reps, warmup=3)["numpy"]
    cold = []
    for _ in range(reps):
        probe_torch()
        t0 = time.perf_counter()
        probe_np()
        cold.append(time.perf_counter() - t0)
    led = interleave({"numpy": probe_np, "torch": probe_torch}, reps, warmup=3, lead=lead)
    return dict(probe="8 float32 192x192 GEMMs",
                numpy_alone_ms=stats(alone)["median_ms"],
                numpy_right_after_torch_ms=stats(cold)["median_ms"],
                numpy_interleaved_with_lead_ms=stats(led["numpy"])["median_ms"],
                torch_interleaved_with_lead_ms=stats(led["torch"])["median_ms"], lead_s=lead)


def auto_reps(fns, budget_s, lo, hi):
    """Reps so that one pass over ``fns`` per rep fits ``budget_s``, clamped to [lo, hi]."""
    t = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        fn()
        t += time.perf_counter() - t0
    return int(min(hi, max(lo, budget_s // max(t, 1e-6))))


def stats(ts):
    """Median, quartiles and count of a list of seconds, in milliseconds."""
    q = np.percentile(np.asarray(ts) * 1e3, [25, 50, 75])
    return dict(median_ms=float(q[1]), q1_ms=float(q[0]), q3_ms=float(q[2]), n=len(ts))


def paired_ratio(ts_a, ts_b):
    """Median over reps of t_a / t_b for the runs of the same rep (adjacent in time)."""
    return float(statistics.median(a / b for a, b in zip(ts_a, ts_b)))


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- profiles
def profile(fn, calls, top=10, chunks=3):
    """cProfile of fn: ``chunks`` profiles of ``calls // chunks`` runs each, keeping the one
    with the least total time (a shared machine's load spikes hit some chunks, not all), and
    from it the ``top`` functions by own time, per call (ms)."""
    best = None
    n = max(1, calls // chunks)
    for _ in range(chunks):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            fn()
        prof.disable()
        st = pstats.Stats(prof)
        if best is None or st.total_tt < best.total_tt:
            best = st
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _) in best.stats.items():
        rows.append(dict(function=_short(path, line, func), ncalls=nc / n, tottime_ms=tt * 1e3 / n,
                         cumtime_ms=ct * 1e3 / n))
    rows.sort(key=lambda r: -r["tottime_ms"])
    return dict(calls=n, chunks=chunks, total_ms=best.total_tt * 1e3 / n, sort="tottime", top=rows[:top])


def _short(path, line, func):
    if path == "~":
        return func
    path = path.replace("\\", "/")
    for anchor in ("/mecref/", "/numpy/", "/scipy/", "/benchmarks/"):
        if anchor in path:
            path = anchor.strip("/") + "/" + path.split(anchor, 1)[1]
            break
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{path}:{line}({func})"


def profile_text(prof, unit="call"):
    lines = [f"{'ncalls':>8} {'tottime ms':>11} {'cumtime ms':>11}  function   "
             f"(per {unit}; the quietest of {prof.get('chunks', 1)} profiles of {prof['calls']} {unit}s, "
             f"{prof['total_ms']:.2f} ms/{unit} under cProfile)"]
    for r in prof["top"]:
        lines.append(f"{r['ncalls']:8.0f} {r['tottime_ms']:11.3f} {r['cumtime_ms']:11.3f}  {r['function']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- machine
def cpu_model():
    return _cpu_model() or "unknown"


def cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def numpy_config():
    """numpy.show_config's build section (BLAS/LAPACK) as a dict."""
    try:
        cfg = np.show_config(mode="dicts")
        return cfg.get("Build Dependencies", cfg)
    except TypeError:  # older NumPy: no mode argument
        return {"note": "numpy.show_config(mode='dicts') is not available in this NumPy"}


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(torch=None):
    """CPU, cores, library versions, BLAS configuration and environment of this run."""
    import scipy

    info = dict(cpu=cpu_model(), cpu_flags=cpu_flags(), logical_cpus=os.cpu_count(),
                usable_cpus=len(os.sched_getaffinity(0)), platform=platform.platform(),
                python=sys.version.split()[0], numpy=np.__version__, scipy=scipy.__version__,
                torch=getattr(torch, "__version__", None), numpy_blas=numpy_config(),
                thread_pools=blas_pools(), git_commit=git_commit(),
                memory_gib=_mem_total_gib())
    if torch is not None:
        info["torch_parallel_info"] = torch.__config__.parallel_info()
    try:
        import mecref
        info["mecref"] = mecref.__version__
    except ImportError:
        info["mecref"] = None
    return info


def _mem_total_gib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- output
def table(rows, cols, title=None):
    """A plain-text table: ``cols`` is a list of (header, key, format)."""
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([_fmt(r.get(k), f) for _, k, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = [title] if title else []
    for i, row in enumerate(cells):
        out.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(v, f):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, f)
