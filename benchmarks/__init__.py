"""Benchmarks of mecref against PyTorch (not part of the test suite).

Run from the repository root::

    python -m benchmarks [--quick] [--only step,entropy,memory,gemm,gpu] [--json out.json]
    python -m benchmarks.report benchmarks/results/latest.json   # writes docs/benchmarks.md

Importing this package sets ``OPENBLAS_THREAD_TIMEOUT=4`` when NumPy is not imported yet, so
that OpenBLAS's worker threads stop spinning soon after each call and do not steal the cores
from PyTorch in interleaved A/B runs (docs/benchmarks.md, "Threads"). What was done is
recorded in :data:`THREAD_SETUP` and printed with every run.
"""
import os
import sys

THREAD_SETUP = {}
if "numpy" in sys.modules:
    THREAD_SETUP["openblas_thread_timeout"] = (
        f"not applied: numpy was imported before benchmarks (OPENBLAS_THREAD_TIMEOUT="
        f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')})")
elif "OPENBLAS_THREAD_TIMEOUT" in os.environ:
    THREAD_SETUP["openblas_thread_timeout"] = (
        f"kept from the environment: OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}")
else:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    THREAD_SETUP["openblas_thread_timeout"] = "set to 4 before numpy was imported"
