"""mecref: MEC-Quant, maximum entropy coding for low-bit quantization-aware training,
in NumPy with hand-derived gradients (and the same code on CuPy).

Start with :func:`mecref.train_small_cnn`; the math lives in :mod:`mecref.quant` and
:mod:`mecref.entropy`, each function a forward/backward pair derived in docs/derivations.md.
"""
from .backend import BackendUnavailableError, MecrefError

__version__ = "0.1.0"


def train_small_cnn(*args, **kwargs):
    """Train the small quantized CNN; see :func:`mecref.train.train_small_cnn`."""
    from .train import train_small_cnn as _train
    return _train(*args, **kwargs)


__all__ = ["train_small_cnn", "MecrefError", "BackendUnavailableError", "__version__"]
