"""Smoke test of the benchmark harness (benchmarks/): every benchmark runs at tiny sizes
(``--quick``) with torch absent or present, the results JSON holds what the report needs, and
the report writes its Markdown and plot. The torch comparisons are also checked to compute the
same quantities as mecref (float64 where rounding would blur it). No timing is asserted."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import common, gemm, memory, report  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None
# One BLAS/OpenMP thread in the smoke runs: nothing here is timed, and on a busy shared machine
# two-thread pools can stall each other for seconds at every barrier.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
NEEDS_TORCH = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (pip install torch==2.13.0): "
                                                       "the torch side of the harness is skipped")


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def doc_without_torch(tmp_path_factory):
    """A --quick run of every benchmark with torch disabled (as on a machine without it)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "DISABLE_TORCH", True)
    for k, v in ONE_THREAD.items():
        mp.setenv(k, v)   # for the memory benchmark's subprocesses
    out = tmp_path_factory.mktemp("bench") / "no_torch.json"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    try:
        if threadpool_limits is None:
            cli.run(["--quick", "--json", str(out)], log=_quiet)
        else:
            with threadpool_limits(1):
                cli.run(["--quick", "--json", str(out)], log=_quiet)
    finally:
        mp.undo()
    return json.loads(out.read_text())


def _run_cli(args, env):
    proc = subprocess.run([sys.executable, "-m", "benchmarks"] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def doc_with_torch(tmp_path_factory):
    """A --quick run with torch, as `python -m benchmarks` (in a fresh interpreter, so that
    OPENBLAS_THREAD_TIMEOUT is set before NumPy loads, as the harness requires)."""
    if not HAS_TORCH:
        pytest.skip("torch is not installed: the torch side of the harness is skipped")
    out = tmp_path_factory.mktemp("bench") / "torch.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "MECREF_BENCH_NO_TORCH")}
    env.update(ONE_THREAD)
    _run_cli(["--quick", "--only", "step,main,entropy,gemm,gpu", "--json", str(out)], env)
    return json.loads(out.read_text())


def test_quick_run_without_torch(doc_without_torch):
    doc = doc_without_torch
    assert doc["quick"] and doc["only"] == list(cli.BENCHMARKS)
    assert doc["machine"]["cpu"] and doc["machine"]["numpy"] == np.__version__
    assert doc["machine"]["torch"] is None and "spin_check" not in doc
    res = doc["results"]
    for name in cli.BENCHMARKS:
        assert "error" not in res[name], res[name].get("error")
        assert res[name]["command"] == f"python -m benchmarks --only {name} --quick"
    for v in res["step"]["variants"].values():
        assert v["step"]["mecref"]["median_ms"] > 0 and "torch" not in v["step"]
        assert v["profile"]["top"] and v["profile"]["top"][0]["tottime_ms"] >= 0
    assert all("mecref" in r and "ratio" not in r for r in res["entropy"]["grid"])
    assert res["entropy"]["scaling"]["points"]
    for v in res["memory"]["variants"].values():
        assert v["mecref"]["delta_mib"] >= 0 and v["mecref_tracemalloc"]["tracemalloc_peak_mib"] > 0
        assert "skipped" in v["torch"]
    assert res["gemm"]["numpy_sgemm_gflops"] > 0
    assert res["gemm"]["variants"]["fp32"]["mecref_fraction_of_peak"] > 0
    assert "skipped" in res["gpu"]  # no GPU and no torch here
    main = res["main"]
    assert main["step"]["mecref"]["median_ms"] > 0 and "torch" not in main["step"]
    assert main["epoch"]["steps"] == 4 and main["floor"]["floor_ms"] > 0
    # the gather form of the conv input gradient (benchmarks/conv_grad.py) is the fold's dx
    assert [r["layer"] for r in main["conv_input_grad"]] == ["conv1", "conv2", "conv3"]
    assert all(r["float64_rel_diff"] < 1e-13 and r["offsets"]["median_ms"] > 0 for r in main["conv_input_grad"])
    # every conv GEMM of the step, its operands as the layer hands them to BLAS: none copied
    assert [(r["layer"], r["gemm"]) for r in main["gemm_layout"]["rows"]] == [
        ("conv1", "forward"), ("conv1", "dW"), ("conv2", "forward"), ("conv2", "dW"), ("conv2", "dcols"),
        ("conv3", "forward"), ("conv3", "dW"), ("conv3", "dcols")]
    assert {(r["a"], r["b"]) for r in main["gemm_layout"]["rows"]} == {("C", "C"), ("C", "T")}
    f = main["floor"]   # paired per round: share = above / (1 + above) is monotone, so the
    # medians over an odd number of rounds map onto each other exactly
    assert f["floor_stats"]["n"] % 2 == 1
    assert f["mecref_share_above"] == pytest.approx(f["mecref_above_floor"] / (1 + f["mecref_above_floor"]))
    assert {(p["m"], p["d"]) for p in res["entropy"]["scaling"]["points"]} == {(16, 8), (16, 24), (32, 8), (32, 24)}
    verdicts = {t["key"]: t["met"] for t in doc["targets"]}
    assert verdicts["step_fp32"] is None and verdicts["memory"] is None


@NEEDS_TORCH
def test_quick_run_with_torch(doc_with_torch):
    res = doc_with_torch["results"]
    assert doc_with_torch["machine"]["torch"] and doc_with_torch["spin_check"]["numpy_alone_ms"] > 0
    threads = doc_with_torch["threads"]   # torch gets as many threads as NumPy's BLAS has
    assert threads["torch_threads"] == f"torch.set_num_threads({threads['numpy_blas_threads']}) -> " \
        f"{threads['numpy_blas_threads']} intra-op"
    assert doc_with_torch["threads"]["openblas_thread_timeout"] == "set to 4 before numpy was imported"
    for v in res["step"]["variants"].values():
        assert v["step"]["ratio"] > 0 and v["forward"]["ratio"] > 0
        c = v["check"]   # float64, same weights: the same network
        assert abs(c["loss_mecref"] - c["loss_torch"]) < 1e-10
        assert c["logits_max_abs_diff"] < 1e-10
    assert res["step"]["variants"]["fp32"]["check"]["grad_rel_diff_worst"] < 1e-10
    for r in res["entropy"]["grid"]:   # float32: the same formula, value and gradient
        assert r["check"]["value_rel_diff"] < 1e-4 and r["check"]["grad_rel_diff"] < 1e-3, r
        assert r["speedup"] == pytest.approx(1.0 / r["ratio"])
    main = res["main"]   # the default main job against its twin: the same loss and gradients
    assert abs(main["check"]["loss_mecref"] - main["check"]["loss_torch"]) < 1e-10
    assert main["check"]["grad_rel_diff_median"] < 1e-10
    assert main["step"]["ratio"] > 0 and main["epoch"]["ratio"] > 0
    f = main["floor"]
    assert f["torch_share_above"] == pytest.approx(f["torch_above_floor"] / (1 + f["torch_above_floor"]))
    assert res["gemm"]["torch_sgemm_gflops"] > 0
    assert res["gemm"]["variants"]["w4a4_lsq"]["torch_fraction_of_peak"] > 0
    for name in ("step", "entropy"):   # the rerun under OpenBLAS's default thread timeout
        bt = res[name]["blas_timeout_default"]
        assert bt["OPENBLAS_THREAD_TIMEOUT"] == "28" and all(r["ratio"] > 0 for r in bt["items"])
    verdicts = {t["key"]: t for t in doc_with_torch["targets"]}
    assert verdicts["step_fp32"]["met"] in (True, False)
    assert verdicts["coding_length"]["alt_met"] in (True, False)


@NEEDS_TORCH
def test_torch_memory_child():
    rec = memory.measure("torch", "w4a4_lsq", 1, 4, "rss", env=dict(os.environ, **ONE_THREAD))
    assert "error" not in rec, rec.get("error")
    assert rec["lib"] == "torch" and rec["delta_mib"] >= 0


def test_report_writes_markdown_and_plot(doc_without_torch, tmp_path):
    paths = report.write(doc_without_torch, json_path="results.json", out=tmp_path / "benchmarks.md",
                         img_dir=tmp_path / "img")
    text = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Targets", "## Machine and threads", "## 1. Training step",
                    "## 2. Entropy terms", "## 3. Peak memory", "## 4. How much of the sgemm",
                    "## 5. GPU", "## Where the time goes", "## Reproduce"):
        assert heading in text
    assert "Quick run" in text and "not measured" in text
    assert "python -m benchmarks --only step --quick" in text
    png = tmp_path / "img" / report.SCALING_PNG
    assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"](img/{report.SCALING_PNG})" in text
    assert "## 1b. The main job" in text and "GEMM floor" in text and "operand layouts" in text
    data = json.loads((tmp_path / "img" / report.SCALING_JSON).read_text())
    assert data["command"] == "python -m benchmarks --only entropy --quick" and len(data["points"]) == 4


def test_report_cli_from_json(doc_without_torch, tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(doc_without_torch))
    report.main([str(src), "--out", str(tmp_path / "b.md"), "--img-dir", str(tmp_path / "i")])
    assert (tmp_path / "b.md").read_text().startswith("# Benchmarks: mecref against PyTorch")


def test_targets_met_and_missed():
    """The verdicts follow the thresholds of the issue, on a hand-made results document."""
    def cl(m, d, s):
        return dict(term="coding_length", m=m, d=d, speedup=s, ratio=1 / s)
    doc = dict(results=dict(
        step=dict(variants=dict(fp32=dict(step=dict(ratio=1.2)), w4a4_lsq=dict(step=dict(ratio=1.01)))),
        main=dict(step=dict(ratio=0.99), epoch=dict(ratio=1.02),
                  floor=dict(mecref_above_floor=1.6, torch_above_floor=0.7)),
        entropy=dict(grid=[cl(128, 64, 2.0), cl(2048, 512, 1.49)],
                     scaling=dict(points=[dict(m=2048, d=64, speedup=dict(moe_K4=3.5)),
                                          dict(m=2048, d=512, speedup=dict(moe_K4=3.0)),
                                          dict(m=1024, d=512, speedup=dict(moe_K4=0.1))])),
        memory=dict(variants=dict(a=dict(label="FP32", ratio=1.2), b=dict(label="W4A4", ratio=1.5)))))
    t = {x["key"]: x for x in report.targets(doc)}
    assert t["step_fp32"]["met"] is True and t["step_w4a4"]["met"] is False
    assert t["main_step"]["met"] is True and t["main_epoch"]["met"] is False
    assert t["main_floor"]["met"] is False and t["main_floor"]["where"] == "torch: 0.70"
    assert t["coding_length"]["met"] is False and t["coding_length"]["where"] == "m=2048, d=512"
    assert t["moe_k4"]["met"] is True and t["moe_k4"]["value"] == 3.0
    assert t["memory"]["met"] is True and t["memory"]["value"] == 1.5
    assert all(x["met"] is None for x in report.targets(dict(results={})))


def test_step_gemm_flops_by_hand():
    """conv3x3 'same' on (n, C, H, H) -> F is an (n H H) x 9C x F product, three per layer
    (forward, weight and input gradient) but no input gradient for conv1 in FP32; fc likewise."""
    n = 2
    convs = [(1, 28, 16), (16, 14, 32), (32, 7, 64)]
    per_layer = [2 * n * H * H * 9 * C * F for C, H, F in convs]
    fc = 2 * n * 64 * 10
    fp32 = sum(g["flops"] for g in gemm.step_gemms(n, quantized=False))
    w4a4 = sum(g["flops"] for g in gemm.step_gemms(n, quantized=True))
    assert fp32 == 2 * per_layer[0] + 3 * (per_layer[1] + per_layer[2]) + 3 * fc
    assert w4a4 == fp32 + per_layer[0]


def test_only_rejects_unknown_names():
    with pytest.raises(SystemExit):
        cli.parse_args(["--only", "step,bogus"])
    assert cli.parse_args(["--only", "gemm,step"]).only == ["step", "gemm"]


def test_module_entry_point_sets_thread_timeout(tmp_path):
    """`python -m benchmarks` sets OPENBLAS_THREAD_TIMEOUT before NumPy loads, and says so."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["MECREF_BENCH_NO_TORCH"] = "1"
    env.update(ONE_THREAD)
    out = tmp_path / "g.json"
    proc = _run_cli(["--quick", "--only", "gemm", "--json", str(out)], env)
    doc = json.loads(out.read_text())
    assert doc["threads"]["openblas_thread_timeout"] == "set to 4 before numpy was imported"
    assert doc["threads"]["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert "fraction of the sgemm rate" in proc.stdout
