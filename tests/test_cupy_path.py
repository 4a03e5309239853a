"""The CuPy path end to end: training, checkpoints, evaluation, export and the GPU notebook on
backend="cupy" (the real CuPy on a GPU machine, else the stand-in tests/fakecupy), each
against the same work on NumPy."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mecref import export
from mecref.backend import array_module, backend_name, get_xp, to_backend
from mecref.checkpoint import load_checkpoint, save_checkpoint
from mecref.data import Dataset, load_bundled
from mecref.experiments import model_from_checkpoint
from mecref.train import evaluate, train_small_cnn

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(train_limit=64, batch_size=16, width=(4, 8, 8))     # 4 steps an epoch
# Tolerances of the first five training steps against NumPy, relative to the loss. The device
# path sums BatchNorm's rows in another order than NumPy's einsum (as a GPU does), which moves
# a float32 loss by ~1e-7 relative. Without quantization that is all: 1e-5. With it, such a
# rounding difference can move a fake-quantized value across a grid point and the runs drift
# apart, measured on the stand-in up to 6.6e-3 by step 4 (dorefa_pact + mec_taylor, this
# tiny net): 1e-2. The device math of each quantizer is held to float64 precision by
# tests/test_nn.py::test_small_cnn_on_backend_matches_numpy instead.
RTOL_FP32 = 1e-4
RTOL_QUANTIZED = 1e-2


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend", ["cupy"], indirect=True)
@pytest.mark.parametrize("quantizer,reg", [("fp32", None), ("fp32", "mec"), ("fp32", "mec_taylor"),
                                           ("fp32", "moe"), ("lsq", "mec"), ("lsqplus", "moe"),
                                           ("dorefa_pact", "mec_taylor"), ("ste", None)])
def test_first_five_steps_equal_numpy(gc, backend, quantizer, reg):
    res = gc.compare_first_steps(5, "numpy", backend, quantizer=quantizer, reg=reg, **TINY)
    assert len(res["losses_b"]) == 5 and all(np.isfinite(res["losses_b"]))
    rtol = RTOL_FP32 if quantizer == "fp32" else RTOL_QUANTIZED
    print(f"{quantizer} + {reg}: largest relative difference {max(res['rel_diff']):.2g}")
    assert max(res["rel_diff"]) <= rtol, res["rel_diff"]


def _on_stand_in():
    return get_xp("cupy").ndarray.__module__ == "fakecupy"


@pytest.fixture(scope="module")
def ds():
    """64 training and 300 test images of the bundled set: evaluation stays cheap."""
    full = load_bundled()
    return Dataset(full.x_train[:64], full.y_train[:64], full.x_test[:300], full.y_test[:300],
                   classes=full.classes, name="bundled-head", source=full.source)


@pytest.mark.parametrize("backend", ["cupy"], indirect=True)
def test_train_checkpoint_resume_evaluate_export_on_device(backend, tmp_path, ds):
    """train_small_cnn(backend=...) for two epochs: its history is NumPy's; the checkpoint it
    writes rebuilds the model exactly; an interrupted run resumes on the device to the same
    parameters; evaluation and the integer export of the device model are the NumPy model's."""
    kw = dict(TINY, epochs=2, quantizer="lsq", w_bits=2, a_bits=2, reg="mec", progress=False,
              dataset=ds)
    ref = train_small_cnn(**kw)
    dev = train_small_cnn(**kw, backend=backend, checkpoint_dir=tmp_path / "full")
    for h, r in zip(dev.history, ref.history):
        assert h["loss"] == pytest.approx(r["loss"], rel=RTOL_QUANTIZED)
    W = dev.model.layers[0].params["W"]
    assert backend_name(array_module(W)) == backend

    # the checkpoint holds the device model's state exactly, and loads back onto the device;
    # save_checkpoint takes device arrays too (it copies them to the host)
    state = dev.model.state_dict()
    direct = {k: to_backend(v, backend) for k, v in state.items()}
    save_checkpoint(tmp_path / "direct.npz", direct, None, dict(note="device arrays"))
    s1, _, _ = load_checkpoint(tmp_path / "direct.npz")
    assert all(np.array_equal(state[k], s1[k]) for k in state)
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
    (tmp_path / "to_cpu").mkdir()
    shutil.copy(tmp_path / "cut" / "last.npz", tmp_path / "to_cpu" / "last.npz")
    resumed = train_small_cnn(**kw, backend=backend, checkpoint_dir=tmp_path / "cut", resume=True)
    s3 = resumed.model.state_dict()
    assert all(np.array_equal(state[k], s3[k]) for k in state)

    # the device checkpoint resumes on the CPU: epoch 2 runs on NumPy, the history says where
    on_cpu = train_small_cnn(**kw, checkpoint_dir=tmp_path / "to_cpu", resume=True)
    assert [h["backend"] for h in on_cpu.history] == [backend, "numpy"]
    timing = ("seconds", "samples_per_s")
    assert {k: v for k, v in on_cpu.history[0].items() if k not in timing} == \
        {k: v for k, v in dev.history[0].items() if k not in timing}
    assert on_cpu.history[1]["loss"] == pytest.approx(dev.history[1]["loss"], rel=RTOL_QUANTIZED)
    assert on_cpu.config["backend"] == "numpy"
    assert backend_name(array_module(on_cpu.model.layers[0].params["W"])) == "numpy"

    # evaluation and export of the device model equal those of its NumPy copy
    host, _ = model_from_checkpoint(tmp_path / "full" / "last.npz", backend="numpy")
    x, y = ds.x_test, ds.y_test
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
    saved = dict(os.environ)       # the notebook sets OPENBLAS_NUM_THREADS=1 for its own kernel:
    try:                           # later tests' subprocesses must not inherit it
        for text in cells[:cut]:
            code = "\n".join(line for line in text.splitlines() if not line.startswith("%"))
            exec(compile(code, str(src), "exec"), ns)      # IPython magics left out
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert ns["GPU"] and ns["BACKEND"] == "cupy"
    assert isinstance(ns["res"].model.layers[0].params["W"], fake_cupy.ndarray)
    assert json.dumps(ns["res"].history)      # host numbers only in the history
    assert os.environ["MECREF_SMOKE"] == "1"


# ----------------------------------------------------------------------------- linear algebra
# Two equal rows and lam = d / (m eps^2) ~ 1e30: in float32, I + lam Z Z^T loses the 1 that
# keeps it positive definite (its second pivot is exactly 0): the factorisation must fail
Z_NOT_PD = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [0, 1, 0, 1]], np.float32)


def test_gram_matrix_not_positive_definite_raises_naming_eps(backend):
    """CuPy's Cholesky does not raise by default (the stand-in imitates it: NaN instead); the
    entropy terms must raise mecref's error naming eps on both backends, as on NumPy."""
    from mecref.backend import MecrefError, to_backend
    from mecref.entropy import coding_length, moe_coding_length
    Z = to_backend(Z_NOT_PD, backend)
    with pytest.raises(MecrefError, match=r"not positive definite .* at eps = 1e-15"):
        coding_length(Z, 1e-15)
    with pytest.raises(MecrefError, match=r"not positive definite .* at eps = 1e-15"):
        moe_coding_length(Z, 1e-15, experts=1)


@pytest.mark.parametrize("backend", ["cupy"], indirect=True)
def test_cholesky_factor_is_reused_for_the_solves(backend, rng):
    """One Cholesky per Gram matrix (one batched call for the experts of the MOE form) and two
    triangular solves per solve; no general LU."""
    import fakecupy
    if not _on_stand_in():
        pytest.skip("counts the stand-in's solver calls")
    from mecref.backend import to_backend, to_host
    from mecref.entropy import (coding_length, coding_length_backward, moe_coding_length,
                                moe_coding_length_backward)
    for m, d in ((12, 5), (5, 12)):                  # the d x d side and the m x m side
        Z = rng.standard_normal((m, d))
        fakecupy.reset_counters()
        L, c = coding_length(to_backend(Z, backend), 0.7)
        dZ = coding_length_backward(c)
        assert dict(fakecupy.solver_calls) == {"cupy.linalg.cholesky": 1,
                                               "cupyx.scipy.linalg.solve_triangular": 2}
        L0, c0 = coding_length(Z, 0.7)
        np.testing.assert_allclose(float(L), float(L0), rtol=1e-12)
        np.testing.assert_allclose(to_host(dZ), coding_length_backward(c0), rtol=1e-10,
                                   atol=1e-13)
        fakecupy.reset_counters()
        L, c = moe_coding_length(to_backend(Z, backend), 0.7, experts=4)
        dZ, _ = moe_coding_length_backward(c)
        # 12 rows: 4 experts of 3 rows, one shape, one batched Cholesky; 5 rows: 2, 1, 1, 1
        assert dict(fakecupy.solver_calls) == {"cupy.linalg.cholesky": 1 if m == 12 else 4,
                                               "cupyx.scipy.linalg.solve_triangular": 8}
        L0, c0 = moe_coding_length(Z, 0.7, experts=4)
        np.testing.assert_allclose(float(L), float(L0), rtol=1e-12)
        np.testing.assert_allclose(to_host(dZ), moe_coding_length_backward(c0)[0], rtol=1e-10,
                                   atol=1e-13)


# ----------------------------------------------------------------------------- host syncs
def _syncs_per_step(fake, **config):
    """Host syncs of steps 3-6 of a run (the first step initialises the quantizers)."""
    from mecref.train import TrainConfig
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    cfg = TrainConfig(**dict(dict(backend="cupy", train_limit=128, batch_size=16, width=(4, 8, 8)),
                             **config))
    fake.reset_counters()
    gc.first_step_losses(cfg, 2)
    before = fake.sync_count()
    fake.reset_counters()
    gc.first_step_losses(cfg, 6)
    return (fake.sync_count() - before) / 4, dict(fake.syncs)


@pytest.mark.parametrize("quantizer,reg,bound", [
    ("lsq", "mec_taylor", 5),        # the default configuration: the target
    ("lsq", "mec", 5), ("lsqplus", "mec_taylor", 5), ("dorefa_pact", "mec_taylor", 5),
    ("ste", None, 5), ("fp32", None, 5),
    ("lsq", "moe", 5),               # + one solver-status read per view (4 experts batched)
])
def test_host_syncs_per_training_step_are_bounded(fake_cupy, quantizer, reg, bound):
    """Per step: one read of the loss parts, correct count and gradient norm, plus the Taylor
    form's convergence bound; value checks run once per batch, not per inner call."""
    per_step, kinds = _syncs_per_step(fake_cupy, quantizer=quantizer, reg=reg)
    assert per_step <= bound, kinds


def test_images_move_to_the_device_once_per_run(fake_cupy):
    """Two epochs with two evaluations: the training and the test images are each copied to
    the device once (every other copy is a small index array of batching and views)."""
    ds = load_bundled()
    small = Dataset(ds.x_train[:256], ds.y_train[:256], ds.x_test[:512], ds.y_test[:512],
                    classes=ds.classes, name="head", source=ds.source)
    train_small_cnn(dataset=small, epochs=2, batch_size=128, width=(2, 2, 2), quantizer="fp32",
                    reg=None, backend="cupy", progress=False)
    big = [n for n in fake_cupy.upload_sizes if n >= 100_000]    # index arrays: < 30 kB each
    assert big == [small.x_train.nbytes, small.x_test.nbytes]
