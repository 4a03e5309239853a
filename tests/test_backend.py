import numpy as np
import pytest

from mecref import backend as B
from mecref.validate import check_array, check_bits, check_choice, check_int, check_positive


def test_numpy_backend_and_array_module():
    assert B.get_xp("numpy") is np
    assert B.array_module(np.zeros(3)) is np
    assert B.array_module(1.0, np.zeros(2)) is np
    assert B.backend_name(np) == "numpy"


def test_unknown_backend_names_the_argument():
    with pytest.raises(B.MecrefError, match="backend must be one of .*'torch'"):
        B.get_xp("torch")
    with pytest.raises(B.MecrefError, match="backend"):
        B.get_xp(None)


def test_cupy_without_gpu_raises_one_clear_error():
    if B.cupy_usable():
        pytest.skip("a GPU is usable here")
    with pytest.raises(B.BackendUnavailableError, match=r"backend='cupy'.*(pip install|backend='numpy')"):
        B.get_xp("cupy")
    # the verdict is cached and the same exception type comes back every time
    with pytest.raises(B.BackendUnavailableError):
        B.to_backend(np.zeros(2), "cupy")


def test_only_backend_imports_cupy():
    import pathlib
    pkg = pathlib.Path(B.__file__).parent
    offenders = [p.name for p in pkg.rglob("*.py")
                 if p.name != "backend.py" and "import cupy" in p.read_text()]
    assert offenders == []


def test_round_trip_host(backend):
    x = np.arange(6.0).reshape(2, 3)
    y = B.to_backend(x, backend, dtype=np.float32)
    assert B.backend_name(B.array_module(y)) == backend
    np.testing.assert_array_equal(B.to_host(y), x.astype(np.float32))


def test_checks_name_argument_expected_and_given():
    with pytest.raises(TypeError, match="x must be a numpy/cupy array, got list"):
        check_array("x", [1.0])
    with pytest.raises(B.MecrefError, match=r"x must be 2-dimensional, got shape \(3,\)"):
        check_array("x", np.zeros(3), ndim=2)
    with pytest.raises(B.MecrefError, match="x must be finite"):
        check_array("x", np.array([1.0, np.nan]))
    with pytest.raises(TypeError, match="x must be a floating-point array, got dtype int64"):
        check_array("x", np.zeros(3, dtype=np.int64))
    with pytest.raises(B.MecrefError, match="must not be empty"):
        check_array("x", np.zeros((0, 3)))
    for bad in (0, 9, 2.0, True, "4"):
        with pytest.raises(B.MecrefError, match="bits must be an integer in 1..8"):
            check_bits("bits", bad)
    assert check_bits("bits", np.int64(3)) == 3
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(B.MecrefError, match="eps must be finite and > 0"):
            check_positive("eps", bad)
    with pytest.raises(TypeError, match="eps must be a real number"):
        check_positive("eps", "1")
    with pytest.raises(B.MecrefError, match=r"gate must be one of \('norm', 'soft'\), got 'x'"):
        check_choice("gate", "x", ("norm", "soft"))
    with pytest.raises(B.MecrefError, match=r"experts must be an integer in \[1, 4\], got 5"):
        check_int("experts", 5, 1, 4)
