"""The CuPy stand-in (tests/fakecupy) is as strict as CuPy where mecref depends on it.

Each check here is a behaviour of the real CuPy 14 (its source and docs), so that a test
passing on the stand-in says something about the GPU: NumPy arrays do not mix with device
arrays, implicit conversion to NumPy raises, host syncs are counted, only CuPy's names and
keywords exist, and failed factorisations do not raise unless asked to.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

import fakecupy
from mecref import backend as B
from mecref import nn, threads

ROOT = Path(__file__).resolve().parents[1]
API = json.loads((ROOT / "tests" / "fakecupy" / "cupy_api.json").read_text())
cp = fakecupy.cupy


def test_snapshot_records_cupys_version_and_source():
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", API["cupy_version"])
    assert API["distribution"].startswith("cupy-cuda")
    assert "scripts/cupy_api_snapshot.py" in API["regenerate"]
    for mod in ("cupy", "cupy.linalg", "cupy.lib.stride_tricks", "cupyx", "cupyx.scipy.linalg"):
        assert len(API["modules"][mod]) > 3
    # facts of CuPy's API the stand-in relies on
    assert "asnumpy" in API["modules"]["cupy"] and "get" in API["ndarray"]
    assert "solve_triangular" in API["modules"]["cupyx.scipy.linalg"]
    assert "errstate" in API["modules"]["cupyx"]


def test_snapshot_matches_the_installed_cupy():
    """Where the real CuPy is installed (the GPU extra), the snapshot is its API."""
    cupy = pytest.importorskip("cupy")
    if cupy.__version__ != API["cupy_version"]:
        pytest.skip(f"installed CuPy {cupy.__version__}, snapshot of {API['cupy_version']}: "
                    "regenerate with scripts/cupy_api_snapshot.py")
    got = {n for n in dir(cupy) if not n.startswith("_")}
    assert got == set(API["modules"]["cupy"])


def test_arrays_refuse_to_mix_with_numpy():
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    h = np.ones((2, 3))
    for op in (lambda: a + h, lambda: h + a, lambda: a * h, lambda: h @ a.T, lambda: a < h,
               lambda: cp.maximum(a, h), lambda: np.maximum(a, h), lambda: cp.concatenate([a, h]),
               lambda: cp.where(a > 0, a, h), lambda: a.dot(h.T)):
        with pytest.raises(TypeError):
            op()
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(a)
    with pytest.raises(TypeError):
        scipy.linalg.cho_factor(a)
    with pytest.raises(TypeError):
        np.zeros(3) + a[0]
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        a[...] = h                        # CuPy 14: basic-index assignment of host data
    # host scalars and NumPy scalars are fine; NumPy functions dispatch to CuPy's
    assert isinstance(a * 2.0 + np.float32(1), fakecupy.ndarray)
    assert isinstance(np.exp(a), fakecupy.ndarray) and isinstance(np.sum(a), fakecupy.ndarray)
    with pytest.raises(TypeError):        # a NumPy function CuPy lacks: no dispatch
        np.insert(a, 0, 1.0)


def test_results_stay_on_the_device_as_0d_arrays():
    a = cp.asarray(np.arange(6.0, dtype=np.float32))
    for r in (a.sum(), cp.sum(a), a.max(), a[2], cp.trace(a.reshape(2, 3)[:, :2]),
              cp.linalg.slogdet(cp.eye(2))[1]):
        assert isinstance(r, fakecupy.ndarray) and r.ndim == 0


def test_host_syncs_are_counted():
    fakecupy.reset_counters()
    a = cp.asarray(np.arange(4.0))
    assert fakecupy.uploads["count"] == 1 and fakecupy.uploads["bytes"] == 32
    assert fakecupy.sync_count() == 0
    float(a.sum()), bool(a.all()), int(a[1]), a.get(), a.item(1), cp.asnumpy(a), a.tolist()
    a[a > 1]                              # a boolean mask sizes its result on the host
    cp.flatnonzero(a)
    assert dict(fakecupy.syncs) == dict(float=1, bool=1, int=1, get=2, item=1, tolist=1,
                                        mask=1, flatnonzero=1)
    fakecupy.reset_counters()
    b = a * 2 + cp.sqrt(a)                # arithmetic stays on the device
    b[1:3] = 0.0
    b @ a
    assert fakecupy.sync_count() == 0


def test_only_cupy_names_and_keywords():
    numpy_only = sorted(n for n in dir(np) if not n.startswith("_")
                        and n not in API["modules"]["cupy"])
    assert "insert" in numpy_only and "errstate" in numpy_only
    for name in numpy_only:
        with pytest.raises(AttributeError, match="not in CuPy"):
            getattr(cp, name)
    a = cp.asarray(np.ones((2, 2)))
    with pytest.raises(AttributeError, match="not in CuPy"):
        a.ctypes
    with pytest.raises(TypeError, match="signature"):
        cp.zeros(3, like=a)               # NumPy's keyword; CuPy's zeros takes none such
    with pytest.raises(TypeError, match="signature"):
        cp.clip(a, 0, 1, casting="unsafe")
    with pytest.raises(ValueError, match="stable"):
        cp.argsort(a, kind="quicksort")   # CuPy sorts stably, kind None or "stable" only
    names = set()
    for mod in (cp, cp.linalg, cp.lib.stride_tricks, fakecupy.cupyx, fakecupy.scipy_linalg):
        for n in list(vars(mod)):
            if not n.startswith("_"):
                names.add((mod.__name__, n))
    for mod_name, n in names:
        assert n in API["modules"][mod_name] or n == "__version__", (mod_name, n)


def test_mecref_device_code_names_only_cupy_api():
    """Every ``xp.<name>`` and ``xp.linalg.<name>`` in mecref is in CuPy's snapshot (the
    code paths the tests do not reach included)."""
    used = set()
    for p in (ROOT / "mecref").glob("*.py"):
        used |= set(re.findall(r"\bxp\.([A-Za-z_][\w.]*)", p.read_text()))
    assert used, "no xp.<name> found"
    for dotted in sorted(used):
        parts = dotted.split(".")
        if parts[0] in ("linalg",) and len(parts) > 1:
            assert parts[1] in API["modules"]["cupy.linalg"], dotted
        elif parts[:2] == ["lib", "stride_tricks"] and len(parts) > 2:
            assert parts[2] in API["modules"]["cupy.lib.stride_tricks"], dotted
        elif parts[0] == "strides":   # export.py's padded NumPy array is named xp
            continue
        else:
            assert parts[0] in API["modules"]["cupy"], dotted


def test_linalg_does_not_raise_unless_asked():
    bad = cp.asarray(np.array([[1.0, 2.0], [2.0, 1.0]]))   # symmetric, not positive definite
    L = cp.linalg.cholesky(bad)
    assert bool(cp.isnan(L).any())
    singular = cp.asarray(np.ones((2, 2)))
    assert bool(cp.isnan(cp.linalg.solve(singular, cp.asarray(np.ones(2)))).any())
    fakecupy.reset_counters()
    with fakecupy.cupyx.errstate(linalg="raise"):
        with pytest.raises(np.linalg.LinAlgError):
            cp.linalg.cholesky(bad)
        x = fakecupy.scipy_linalg.solve_triangular(cp.asarray(np.zeros((2, 2))),
                                                   cp.asarray(np.ones(2)))
        assert bool(cp.isnan(x).any())    # cuBLAS trsm never checks, in any mode
        good = cp.linalg.cholesky(cp.asarray(np.eye(2) * 4.0))
    assert fakecupy.syncs["linalg_status"] == 2      # raise mode reads cuSOLVER's status
    np.testing.assert_array_equal(good.get(), np.eye(2) * 2.0)
    assert fakecupy.cupyx.geterr()["linalg"] == "ignore"


def test_seam_makes_cupy_the_stand_in_and_restores(fake_cupy):
    assert B.get_xp("cupy") is fakecupy.cupy and B.cupy_usable()
    a = B.to_backend(np.arange(3.0), "cupy")
    assert isinstance(a, fakecupy.ndarray) and B.array_module(a) is fakecupy.cupy
    assert B.backend_name(B.array_module(a)) == "cupy"
    with pytest.raises(B.MecrefError, match="different backends"):
        B.array_module(a, np.zeros(3))
    np.testing.assert_array_equal(B.to_host(a), np.arange(3.0))


def test_seam_is_off_outside_the_block():
    with B.cupy_stand_in(fakecupy.cupy, fakecupy.cupyx):
        assert B.get_xp("cupy") is fakecupy.cupy
    assert B.array_module(fakecupy.ndarray._of(np.zeros(2))) is np   # not a device array now
    if not B.cupy_usable():
        with pytest.raises(B.BackendUnavailableError):
            B.get_xp("cupy")


def test_threads_guard_catches_device_work_handed_to_numpy(fake_cupy):
    """The backend fixture's guard fails a split of device arrays, and sees the layers'
    device calls: a conv layer's forward and backward on the device go through it."""
    a = fake_cupy.cupy.zeros((4, 3))

    def kernel(c):
        a[c] = 1.0

    with pytest.raises(AssertionError, match="split device arrays"):
        threads.over_channels(kernel, 4, a.size, np)
    layer = nn.Conv2d(2, 3, padding=1, backend="cupy")
    x = B.to_backend(np.ones((2, 2, 5, 5), np.float32), "cupy")
    layer.backward(layer.forward(x) * 1.0)
    assert fake_cupy.threads_calls["device"] >= 2 and fake_cupy.threads_calls["host"] == 0
