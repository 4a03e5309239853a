"""Element-wise work on every core: split over channels, one block per thread.

NumPy runs each ufunc and each copy on one core, but releases the GIL while it does. The
layers keep activations channel-major, ``(C, N, H, W)`` in memory (mecref.nn), so channels
``lo:hi`` are one contiguous slab and the element-wise passes of a layer (im2col and col2im
copies, max-pool masks, BatchNorm) are independent per channel. :func:`over_channels` calls a
layer's kernel once per block of channels, the blocks on a small thread pool; the kernel is the
same code that runs on all channels at once, and the result does not depend on the split (each
channel is computed by one thread, in the same order).

CuPy arrays are never split: the GPU parallelises inside each kernel, so there the kernel runs
once over all channels. NumPy arrays smaller than :data:`MIN_ELEMENTS` are not split either
(handing a block to a thread costs some 20-50 us).

The number of threads is ``MECREF_NUM_THREADS`` from the environment when set, else the number
of CPUs this process may run on; :func:`set_num_threads` changes it. The grid runner's worker
processes use one thread each (they already share the cores).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backend import MecrefError

__all__ = ["num_threads", "set_num_threads", "over_channels", "MIN_ELEMENTS"]

MIN_ELEMENTS = 1 << 17          # below ~0.5 MB of float32 one thread is as fast

_state = {"n": None, "pool": None, "size": 0}    # size: the pool's workers
_lock = threading.Lock()


def _default_threads():
    env = os.environ.get("MECREF_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise MecrefError(f"MECREF_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def num_threads() -> int:
    """Threads that :func:`over_channels` uses for NumPy arrays."""
    if _state["n"] is None:
        _state["n"] = _default_threads()
    return _state["n"]


def set_num_threads(n: int) -> int:
    """Set the thread count (an int >= 1); returns the previous one."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MecrefError(f"the number of threads must be an int >= 1, got {n!r}")
    with _lock:
        old = num_threads()
        _state["n"] = n
    return old


def _forget_pool_in_child():
    """A forked child has none of the parent's pool threads: start a fresh pool on first use
    (the old one would queue blocks that no thread ever runs)."""
    global _lock
    _lock = threading.Lock()
    _state["pool"], _state["size"] = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool(n):
    """A pool with at least n - 1 workers (the calling thread is the n-th); a smaller one is
    replaced, a larger one kept (idle workers cost nothing)."""
    with _lock:
        pool, size = _state["pool"], _state["size"]
        if pool is None or size < n - 1:
            if pool is not None:
                pool.shutdown(wait=True)
            _state["pool"] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="mecref")
            _state["size"] = n - 1
        return _state["pool"]


def over_channels(kernel, channels, elements, xp=np):
    """Run ``kernel(sl)`` for slices ``sl`` of ``range(channels)`` that cover it once.

    Parameters
    ----------
    kernel : callable(slice) -> None
        Writes the results of channels ``sl`` (into arrays it closes over); it must not
        write anything that another block reads.
    channels : int, the number of channels C
    elements : int, the size of the largest array the kernel touches (decides the split)
    xp : the array module of the arrays (numpy: split over threads; cupy: one call)

    The calling thread runs the first block itself; an exception in any block is raised
    here after every block has finished.
    """
    n = min(num_threads(), channels) if xp is np and elements >= MIN_ELEMENTS else 1
    if n <= 1:
        kernel(slice(0, channels))
        return
    bounds = [channels * i // n for i in range(n + 1)]
    pool = _pool(n)
    futures = [pool.submit(kernel, slice(lo, hi)) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        kernel(slice(bounds[0], bounds[1]))
    finally:
        for f in futures:
            f.result()
