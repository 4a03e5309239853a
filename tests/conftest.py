import contextlib
import os
import sys
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Deterministic property tests: the same examples every run, no timing flakiness.
settings.register_profile(
    "mecref", derandomize=True, deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("MECREF_HYPOTHESIS_PROFILE", "mecref"))


def _cupy_usable():
    from mecref.backend import cupy_usable
    return cupy_usable()


BACKEND_PARAMS = [
    "numpy",
    pytest.param("cupy", marks=pytest.mark.gpu),
]


def _closed_over(fn):
    """The values a closure holds (a variable not assigned yet is left out)."""
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:
            pass
    return out


@contextlib.contextmanager
def cupy_stand_in():
    """backend="cupy" on the stand-in tests/fakecupy (docs/design.md), its counters reset.

    mecref.threads must not split device work: every call of ``over_channels`` is checked,
    and one whose kernel closes over a device array but is handed NumPy as its array module
    (so it would be split over threads) fails the test; ``fakecupy.threads_calls`` counts the
    calls seen on device and host arrays.
    """
    import fakecupy
    from mecref import backend as B
    import mecref.nn  # noqa: F401  (loads the layer modules, which import over_channels)
    from mecref import threads

    real = threads.over_channels
    fakecupy.threads_calls = calls = {"device": 0, "host": 0}

    def guarded(kernel, channels, elements, xp=np):
        on_device = any(isinstance(v, fakecupy.ndarray) for v in _closed_over(kernel))
        if on_device and xp is np:
            raise AssertionError("mecref.threads was asked to split device arrays over threads")
        calls["device" if on_device else "host"] += 1
        return real(kernel, channels, elements, xp)

    users = [m for name, m in sorted(sys.modules.items())      # every module that imported it
             if name.startswith("mecref") and getattr(m, "over_channels", None) is real]
    with contextlib.ExitStack() as stack:
        stack.enter_context(B.cupy_stand_in(fakecupy.cupy, fakecupy.cupyx))
        for m in users:
            stack.enter_context(mock.patch.object(m, "over_channels", guarded))
        fakecupy.reset_counters()
        yield fakecupy


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """Run a test on each backend: "cupy" on the real CuPy where a GPU is usable, else on the
    stand-in tests/fakecupy (no skip)."""
    if request.param == "cupy" and not _cupy_usable():
        with cupy_stand_in():
            yield "cupy"
    else:
        yield request.param


@pytest.fixture
def fake_cupy():
    """The stand-in itself, active (backend="cupy" is it inside the test)."""
    with cupy_stand_in() as fc:
        yield fc


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module", autouse=True)
def _environ_restored():
    """Each test module gives back the process environment it found. Some libraries change it
    and leave it changed (a Dask LocalCluster's nannies set OMP_NUM_THREADS,
    OPENBLAS_NUM_THREADS=1 and kin); a later test's subprocess would then run its BLAS on
    another thread count than this process and lose bit-identity with it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
