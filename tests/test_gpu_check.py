"""scripts/gpu_check.py: the parts that run without a GPU.

The comparison machinery is checked on NumPy against NumPy (same seed: bit-identical losses)
and against train_small_cnn's own per-epoch mean loss; the no-GPU path writes its JSON and
exits 0. The GPU path itself runs on a GPU machine (``python3 scripts/gpu_check.py``).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mecref.backend import cupy_usable
from mecref.train import train_small_cnn

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(train_limit=64, batch_size=16, width=(4, 8, 8))  # 4 steps an epoch


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


no_gpu_here = pytest.mark.skipif(cupy_usable(), reason="a GPU is usable here: main() runs the checks")


@no_gpu_here
def test_main_without_gpu_writes_no_gpu_json_and_exits_0(gc, tmp_path, capsys):
    status = gc.main(["--out", str(tmp_path / "o"), "--steps", "3"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "no usable GPU" in printed and "backend='cupy'" in printed
    doc = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert doc["status"] == "no_gpu"
    assert "cupy" in doc["reason"]
    assert doc["tolerance"]["rtol"] == 1e-3 and doc["tolerance"]["steps"] == 5
    assert "1e-03" in doc["tolerance"]["rule"] or "0.001" in doc["tolerance"]["rule"]
    assert doc["machine"]["numpy"] == np.__version__ and doc["machine"]["gpu"] is None
    assert doc["checks"] == {}


@no_gpu_here
def test_script_runs_as_a_command_with_out_from_the_environment(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--skip-tests"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text())["status"] == "no_gpu"
    assert "tolerance:" in proc.stdout


def test_bad_steps_is_a_usage_error(gc, tmp_path):
    with pytest.raises(SystemExit) as exc:
        gc.main(["--out", str(tmp_path), "--steps", "0"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="steps must be a positive int"):
        gc.compare_first_steps(0, "numpy", "numpy", **SMALL)


def test_same_backend_same_seed_gives_bit_identical_losses(gc):
    res = gc.compare_first_steps(3, "numpy", "numpy", **SMALL)
    assert res["losses_a"] == res["losses_b"]
    assert len(res["losses_a"]) == 3 and all(np.isfinite(res["losses_a"]))
    assert res["rel_diff"] == [0.0, 0.0, 0.0]
    assert res["passed"] is True
    assert res["tolerance"]["rtol"] == 1e-3
    assert res["config"]["quantizer"] == "lsq" and res["config"]["reg"] == "mec"
    assert (res["config"]["w_bits"], res["config"]["a_bits"]) == (2, 2)


def test_first_steps_follow_train_small_cnn(gc):
    """The hand-built loop is train_small_cnn's: one epoch's mean of its step losses is the
    loss train_small_cnn reports for that epoch; steps past an epoch continue the same run."""
    cfg = gc.TrainConfig(quantizer="lsq", w_bits=2, a_bits=2, reg="mec", epochs=2, **SMALL)
    losses = gc.first_step_losses(cfg, 8)
    hist = train_small_cnn(cfg, progress=False).history
    assert np.mean(losses[:4]) == pytest.approx(hist[0]["loss"], rel=1e-12)
    assert np.mean(losses[4:]) == pytest.approx(hist[1]["loss"], rel=1e-12)


def test_comparison_fails_beyond_the_tolerance(gc, monkeypatch):
    """Step 3 of backend b is off by 2e-3 relative: the check fails; 5e-4 passes; a
    difference after the first 5 steps is recorded but not judged."""
    def fake(offsets):
        calls = []

        def first_step_losses(cfg, steps):  # the first call is backend a, the second b
            calls.append(cfg)
            base = [2.0 - 0.1 * i for i in range(steps)]
            if len(calls) == 1:
                return base
            return [v * (1 + offsets.get(i, 0.0)) for i, v in enumerate(base)]
        return first_step_losses

    monkeypatch.setattr(gc, "first_step_losses", fake({2: 2e-3}))
    res = gc.compare_first_steps(8, "numpy", "numpy")
    assert not res["passed"] and res["max_rel_diff_compared"] == pytest.approx(2e-3)
    monkeypatch.setattr(gc, "first_step_losses", fake({2: 5e-4, 6: 0.5}))
    res = gc.compare_first_steps(8, "numpy", "numpy")
    assert res["passed"] and max(res["rel_diff"]) == pytest.approx(0.5)


def test_timed_epoch_reports_samples_per_second(gc):
    rec = gc.timed_epoch("numpy", **SMALL)
    assert rec["backend"] == "numpy" and rec["samples_per_s"] > 0
    assert np.isfinite(rec["loss"]) and 0.0 <= rec["test_acc"] <= 1.0


def test_pytest_summary_counts(gc):
    text = "....F\n===== 1 failed, 3 passed, 2 skipped, 1 error, 4 deselected in 2.31s =====\n"
    c = gc._pytest_counts(text)
    assert (c["passed"], c["failed"], c["skipped"], c["errors"]) == (3, 1, 2, 1)
    assert gc._pytest_counts("no tests ran in 0.01s")["passed"] == 0


def test_run_gpu_tests_runs_a_selection_in_a_subprocess(gc):
    res = gc.run_gpu_tests(runs=(("backend_cupy", ["tests/test_backend.py", "-k", "cupy"]),),
                           timeout=120)
    rec = res["runs"]["backend_cupy"]
    assert res["ok"] and rec["returncode"] == 0 and rec["failed"] == 0
    assert rec["passed"] + rec["skipped"] >= 1 and rec["summary"]
