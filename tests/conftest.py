import os

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


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """Run a test on each backend; the cupy case skips where no GPU is usable."""
    if request.param == "cupy" and not _cupy_usable():
        pytest.skip("no usable CuPy/CUDA device here")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
