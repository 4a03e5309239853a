"""The CuPy path end to end: training, checkpoints, evaluation, export and the GPU notebook on
backend="cupy" (the real CuPy on a GPU machine, else the stand-in tests/fakecupy), each
against the same work on NumPy."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mecref import export
from mecref.backend import array_module, backend_name, get_xp
from mecref.data import load_bundled
from mecref.experiments import model_from_checkpoint
from mecref.train import evaluate, train_small_cnn

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(train_limit=64, batch_size=16, width=(4, 8, 8))     # 4 steps an epoch
# The stand-in computes NumPy's float32 arithmetic; the CuPy path differs from the NumPy path
# only in its factorisations (xp.linalg instead of SciPy's LAPACK), which moves a loss by
# ~1e-8 relative. A GPU sums in another order: scripts/gpu_check.py holds it to 1e-3.
RTOL_STAND_IN = 1e-6


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rtol(fake):
    return RTOL_STAND_IN if fake else 1e-3


@pytest.mark.parametrize("backend", ["cupy"], indirect=True)
@pytest.mark.parametrize("quantizer,reg", [("lsq", "mec"), ("lsq", "mec_taylor"),
                                           ("lsqplus", "moe"), ("dorefa_pact", "mec_taylor"),
                                           ("ste", None), ("fp32", None)])
def test_first_five_steps_equal_numpy(gc, backend, quantizer, reg):
    fake = _on_stand_in()
    res = gc.compare_first_steps(5, "numpy", backend, quantizer=quantizer, reg=reg, **TINY)
    assert len(res["losses_b"]) == 5 and all(np.isfinite(res["losses_b"]))
    assert res["max_rel_diff_compared"] <= _rtol(fake), res["rel_diff"]


def _on_stand_in():
    return get_xp("cupy").ndarray.__module__ == "fakecupy"


@pytest.fixture(scope="module")
def ds():
    return load_bundled()


@pytest.mark.parametrize("backend", ["cupy"], indirect=True)
def test_train_checkpoint_resume_evaluate_export_on_device(backend, tmp_path, ds):
    """train_small_cnn(backend=...) for two epochs: its history is NumPy's; the checkpoint it
    writes rebuilds the model exactly; an interrupted run resumes on the device to the same
    parameters; evaluation and the integer export of the device model are the NumPy model's."""
    kw = dict(TINY, epochs=2, quantizer="lsq", w_bits=2, a_bits=2, reg="mec", progress=False)
    ref = train_small_cnn(**kw)
    dev = train_small_cnn(**kw, backend=backend, checkpoint_dir=tmp_path / "full")
    rtol = _rtol(_on_stand_in())
    for h, r in zip(dev.history, ref.history):
        assert h["loss"] == pytest.approx(r["loss"], rel=rtol)
    W = dev.model.layers[0].params["W"]
    assert backend_name(array_module(W)) == backend

    # the checkpoint holds the device model's state exactly, and loads back onto the device
    state = dev.model.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    again, meta = model_from_checkpoint(tmp_path / "full" / "last.npz", backend=backend)
    assert backend_name(array_module(again.layers[0].params["W"])) == backend
    s2 = again.state_dict()
    assert all(np.array_equal(state[k], s2[k]) for k in state)
    assert meta["config"]["backend"] == backend

    # interrupted after epoch 1, resumed on the device: the same run
    class Stop(Exception):
        pass

    def stop(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train_small_cnn(**dict(kw, progress=stop), backend=backend, checkpoint_dir=tmp_path / "cut")
    resumed = train_small_cnn(**kw, backend=backend, checkpoint_dir=tmp_path / "cut", resume=True)
    s3 = resumed.model.state_dict()
    assert all(np.array_equal(state[k], s3[k]) for k in state)

    # evaluation and export of the device model equal those of its NumPy copy
    host, _ = model_from_checkpoint(tmp_path / "full" / "last.npz", backend="numpy")
    x, y = ds.x_test[:300], ds.y_test[:300]
    assert evaluate(dev.model, x, y) == evaluate(host, x, y)
    im_dev, im_host = export.export_int_model(dev.model), export.export_int_model(host)
    assert im_dev.meta == im_host.meta and im_dev.arrays.keys() == im_host.arrays.keys()
    assert all(np.array_equal(im_dev.arrays[k], im_host.arrays[k]) for k in im_host.arrays)
    cmp = export.compare_int(dev.model, im_dev, x)
    assert cmp["pred_equal"] == cmp["n"] == 300


def test_gpu_notebook_cells_run_on_the_device(fake_cupy, monkeypatch):
    """notebooks/src/05_gpu.py, sections 1-4, in this process with backend="cupy" the
    stand-in (smoke size); section 5 times a real GPU and is left out."""
    import matplotlib
    matplotlib.use("Agg")
    spec = importlib.util.spec_from_file_location("build_notebooks",
                                                  ROOT / "scripts" / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    src = ROOT / "notebooks" / "src" / "05_gpu.py"
    cells = [text for kind, text in builder.parse_source(src.read_text(), src.name)
             if kind == "code"]
    cut = next(i for i, text in enumerate(cells) if "def best_ms" in text)
    monkeypatch.setenv("MECREF_SMOKE", "1")
    monkeypatch.chdir(ROOT / "notebooks")
    ns = {"__name__": "__main__"}
    for text in cells[:cut]:
        code = "\n".join(line for line in text.splitlines() if not line.startswith("%"))
        exec(compile(code, str(src), "exec"), ns)          # IPython magics left out
    assert ns["GPU"] and ns["BACKEND"] == "cupy"
    assert isinstance(ns["res"].model.layers[0].params["W"], fake_cupy.ndarray)
    assert json.dumps(ns["res"].history)      # host numbers only in the history
    assert os.environ["MECREF_SMOKE"] == "1"
