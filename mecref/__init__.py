"""mecref: MEC-Quant, maximum entropy coding for low-bit quantization-aware training,
in NumPy with hand-derived gradients (and the same code on CuPy).

Start with :func:`mecref.train_small_cnn`; the math lives in :mod:`mecref.quant` and
:mod:`mecref.entropy`, each function a forward/backward pair derived in docs/derivations.md.
"""
import os as _os
import sys as _sys

if "numpy" not in _sys.modules:
    # OpenBLAS's idle workers spin for ~0.1 s after each BLAS call (its default timeout), on the
    # core that mecref's element-wise threads need next: a step of the small CNN took 26 ms
    # instead of 20. A short timeout lets them sleep at once; it only takes effect when set
    # before NumPy loads OpenBLAS, and a value already in the environment is kept
    # (docs/design.md, "Threads").
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .backend import BackendUnavailableError, MecrefError  # noqa: E402



def _package_version() -> str:
    """The installed distribution's version (pyproject.toml is its one source); "unknown"
    when mecref is imported from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mecref")
    except PackageNotFoundError:
        return "unknown"


__version__ = _package_version()


def train_small_cnn(*args, **kwargs):
    """Train the small quantized CNN; see :func:`mecref.train.train_small_cnn`."""
    from .train import train_small_cnn as _train
    return _train(*args, **kwargs)


__all__ = ["train_small_cnn", "MecrefError", "BackendUnavailableError", "__version__"]
