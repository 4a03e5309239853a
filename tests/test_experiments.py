"""The grid runner (caching, resuming, workers), the summaries and the canonical grids."""
import copy
import csv
import importlib.util
import json
import shutil

import numpy as np
import pytest

from mecref import MecrefError
from mecref.experiments import (best_settings, cell_config, cell_key, group_key, main_grid,
                                markdown_table, method_label, plot_sweep, run_grid,
                                settings_from_sweep, summarize, sweep_grid, taylor_eps,
                                write_results)

TINY = dict(train_limit=128, batch_size=32, epochs=1, width=(4, 8, 8))
CONFIGS = [dict(TINY, quantizer="lsq", reg=None), dict(TINY, quantizer="lsq", reg="mec")]
SEEDS = [0, 1]


def _mtimes(d):
    return {p.name: p.stat().st_mtime_ns for p in sorted((d / "runs").glob("*.json"))}


@pytest.fixture(scope="module")
def grid_once(tmp_path_factory):
    """The grid, run once per module (the runs are the slow part)."""
    d = tmp_path_factory.mktemp("grid")
    seen = []
    records = run_grid(CONFIGS, SEEDS, d, workers=1, progress=lambda r, k, n: seen.append((k, n)))
    return d, records, seen


@pytest.fixture
def grid(grid_once, tmp_path):
    """A fresh copy of the grid's folder for each test: tests delete and rebuild files in it,
    so none may see another's changes (the suite runs in random order)."""
    src, records, seen = grid_once
    d = tmp_path / "grid"
    shutil.copytree(src, d)
    return d, copy.deepcopy(records), list(seen)


# ------------------------------------------------------------------------------ the runner

def test_grid_runs_every_cell_once_and_writes_the_files(grid):
    d, records, seen = grid
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [(r["config"]["reg"], r["seed"]) for r in records] == [
        (None, 0), (None, 1), ("mec", 0), ("mec", 1)]
    assert all(not r["from_cache"] and r["status"] == "ok" for r in records)
    files = sorted((d / "runs").glob("*.json"))
    assert sorted(p.stem for p in files) == sorted(r["key"] for r in records)
    for r in records:
        stored = json.loads((d / "runs" / f"{r['key']}.json").read_text())
        assert stored["config"] == cell_config(CONFIGS[r["config"]["reg"] == "mec"], r["seed"])
        assert stored["test_acc"] == r["test_acc"] and 0.0 <= r["test_acc"] <= 1.0
        assert len(stored["history"]) == 1 and len(stored["seconds_per_epoch"]) == 1
        assert (d / r["checkpoint"]).is_file()
    assert not list((d / "runs").glob("*.tmp"))  # atomic writes leave no temporaries

    rows = write_results(d)
    assert [r["label"] for r in rows] == ["LSQ", "MEC-Quant (exact)"]
    for row, recs in zip(rows, (records[:2], records[2:])):
        accs = [r["test_acc"] for r in recs]
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        assert row["test_acc_mean"] == pytest.approx(np.mean(accs))
        assert row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
        assert row["sec_per_epoch"] == pytest.approx(np.mean([r["seconds_per_epoch"][0] for r in recs]))
        assert row["val_acc_mean"] is None
    with open(d / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and table[1]["reg"] == "mec" and table[0]["width"] == "4x8x8"
    assert float(table[0]["test_acc_mean"]) == pytest.approx(rows[0]["test_acc_mean"])
    assert json.loads((d / "results.json").read_text())["rows"] == rows
    assert "| W2A2 | MEC-Quant (exact) |" in markdown_table(rows)


def test_a_second_call_recomputes_nothing(grid):
    d, records, _ = grid
    before = _mtimes(d)
    calls = []
    again = run_grid(CONFIGS, SEEDS, d, workers=1, progress=lambda *a: calls.append(a))
    assert calls == [] and _mtimes(d) == before
    run_grid(CONFIGS[1:], SEEDS, d, workers=1, progress=False)  # a sub-grid keeps the order
    assert [r["label"] for r in summarize(d)] == ["LSQ", "MEC-Quant (exact)"]
    assert all(r["from_cache"] for r in again)
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in records]


def test_a_lost_run_file_is_rebuilt_from_its_checkpoint_without_training(grid):
    d, records, _ = grid
    lost = records[1]
    (d / "runs" / f"{lost['key']}.json").unlink()
    before = _mtimes(d)
    again = run_grid(CONFIGS, SEEDS, d, workers=1, progress=False)
    after = _mtimes(d)
    assert [r["from_cache"] for r in again] == [True, False, True, True]
    assert {k: v for k, v in after.items() if k in before} == before
    assert again[1]["history"] == lost["history"] and again[1]["test_acc"] == lost["test_acc"]


def test_interrupted_cells_rerun_in_two_worker_processes(grid):
    d, records, _ = grid
    lost = [records[0], records[3]]
    for r in lost:  # as if the grid was stopped before these cells began
        (d / "runs" / f"{r['key']}.json").unlink()
        shutil.rmtree(d / "checkpoints" / r["key"])
    before = _mtimes(d)
    again = run_grid(CONFIGS, SEEDS, d, workers=2, progress=False)
    assert [r["from_cache"] for r in again] == [False, True, True, False]
    after = _mtimes(d)
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == 4
    ran = [again[0], again[3]]
    assert all(r["status"] == "ok" for r in ran)
    if importlib.util.find_spec("threadpoolctl"):  # measured in the worker
        assert all(r["blas_threads"] == 1 for r in ran)
    assert len({r["pid"] for r in ran} | {records[0]["pid"]}) >= 2  # not this process
    for old, new in zip(lost, ran):  # same seed, same run (up to BLAS summation order)
        assert new["history"][0]["loss"] == pytest.approx(old["history"][0]["loss"], rel=1e-3)


def test_a_diverged_cell_is_cached_and_counted(tmp_path, monkeypatch):
    import mecref.train as train

    def diverge(*a, **k):
        raise train.TrainingDivergedError("loss is nan at step 3")

    monkeypatch.setattr(train, "train_small_cnn", diverge)
    recs = run_grid([CONFIGS[0]], [0], tmp_path, workers=1, progress=False)
    assert recs[0]["status"] == "diverged" and "nan" in recs[0]["error"]
    again = run_grid([CONFIGS[0]], [0], tmp_path, workers=1, progress=False)
    assert again[0]["from_cache"]
    rows = summarize(tmp_path)
    assert rows[0]["n"] == 0 and rows[0]["n_diverged"] == 1 and rows[0]["test_acc_mean"] is None
    assert "| - | 0 (+1 diverged) | - |" in markdown_table(rows)


def test_bad_grids_fail_before_anything_runs(tmp_path):
    with pytest.raises(MecrefError, match="seed"):
        run_grid([dict(TINY, seed=3)], [0], tmp_path)
    with pytest.raises(TypeError, match="unknown TrainConfig fields"):
        run_grid([CONFIGS[0], dict(TINY, quantiser="lsq")], [0], tmp_path)
    with pytest.raises(MecrefError, match="w_bits"):
        run_grid([CONFIGS[0], dict(TINY, w_bits=0)], [0], tmp_path)
    with pytest.raises(MecrefError, match="twice"):
        run_grid([CONFIGS[0], CONFIGS[0]], [0], tmp_path)
    with pytest.raises(MecrefError, match="seeds"):
        run_grid(CONFIGS, [], tmp_path)
    with pytest.raises(MecrefError, match="workers"):
        run_grid(CONFIGS, [0], tmp_path, workers=0)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_cell_keys_are_stable_and_tell_cells_apart():
    a = cell_key(dict(quantizer="lsq", width=(4, 8, 8)), 0)
    from mecref.train import TrainConfig
    d = TrainConfig()  # writing a default out explicitly gives the same cell
    assert a == cell_key(dict(quantizer="lsq", width=[4, 8, 8], reg=d.reg, w_bits=d.w_bits), 0)
    assert a != cell_key(dict(quantizer="lsq", width=(4, 8, 8)), 1)
    assert a != cell_key(dict(quantizer="lsq", width=(4, 8, 8), eps=0.25), 0)
    assert len(a) == 16 and int(a, 16) >= 0
    full0, full1 = cell_config(dict(quantizer="ste"), 0), cell_config(dict(quantizer="ste"), 5)
    assert group_key(full0) == group_key(full1)


# ------------------------------------------------------------------------- summaries, table

def _fake_runs(d, specs):
    """Run files as run_grid writes them: (config, seed, test_acc, val_acc, seconds/epoch)."""
    from mecref.experiments import _digest, bits_label
    (d / "runs").mkdir(parents=True)
    for config, seed, acc, val, secs in specs:
        full = cell_config(config, seed)
        rec = dict(key=_digest(full), group=group_key(full), label=method_label(full),
                   bits=bits_label(full), seed=seed, config=full, status="ok", test_acc=acc,
                   val_acc=val, seconds_per_epoch=secs, history=[])
        (d / "runs" / f"{rec['key']}.json").write_text(json.dumps(rec))


def test_summary_and_markdown_table_format(tmp_path):
    fp = dict(quantizer="fp32", reg=None)
    mec = dict(quantizer="lsq", w_bits=4, a_bits=4, reg="mec", reg_weight=0.5, eps=0.5)
    _fake_runs(tmp_path, [(fp, 0, 0.90, None, [2.0, 4.0]), (fp, 1, 0.92, None, [3.0, 3.0]),
                          (mec, 0, 0.8512, None, [10.0]), (mec, 1, 0.8, None, [12.0]),
                          (mec, 2, 0.81, None, [11.0])])
    rows = summarize(tmp_path, configs=[fp, mec])
    assert rows[0]["test_acc_mean"] == pytest.approx(0.91)
    assert rows[0]["test_acc_std"] == pytest.approx(np.std([0.9, 0.92], ddof=1))
    assert rows[0]["sec_per_epoch"] == pytest.approx(3.0)
    assert rows[1]["n"] == 3 and rows[1]["seeds"] == [0, 1, 2]
    assert markdown_table(rows).splitlines() == [
        "| bits | method | reg_weight | eps | test acc (%) | seeds | s/epoch |",
        "|---|---|---|---|---:|---:|---:|",
        "| FP32 | FP32 | - | - | 91.00 ± 1.41 | 2 | 3.0 |",
        "| W4A4 | MEC-Quant (exact) | 0.5 | 0.5 | 82.04 ± 2.71 | 3 | 11.0 |"]
    assert [r["label"] for r in summarize(tmp_path, configs=[mec])] == ["MEC-Quant (exact)"]
    assert markdown_table([]) == "(no finished runs)"


def test_markdown_table_shows_swept_columns_validation_and_single_seeds(tmp_path):
    base = dict(quantizer="lsq", val_size=100)
    a, b = dict(base, reg="mec", eps=0.25), dict(base, reg="mec", eps=1.0)
    _fake_runs(tmp_path, [(a, 0, 0.7, 0.71, [1.0]), (b, 0, 0.75, 0.7623, [1.0])])
    lines = markdown_table(summarize(tmp_path, configs=[a, b])).splitlines()
    assert lines[0] == "| bits | method | eps | test acc (%) | val acc (%) | seeds | s/epoch |"
    assert lines[3] == "| W2A2 | MEC-Quant (exact) | 1 | 75.00 | 76.23 | 1 | 1.0 |"


def _sweep_rows():
    """Summary-like rows of a small sweep: val accuracy rises with beta and eps."""
    rows = [dict(reg=None, eps=0.5, reg_weight=0.5, order=4, experts=4, bits="W2A2",
                 label="LSQ", val_acc_mean=0.69, val_acc_std=None)]
    for reg, k, eps_list in (("mec", 4, (1.0, 2.0)), ("mec_taylor", 4, (8.0, 16.0)),
                             ("moe", 2, (1.0, 2.0)), ("moe", 4, (1.0, 2.0))):
        for eps in eps_list:
            for b in (0.1, 0.5, 2.0):
                rows.append(dict(reg=reg, eps=eps, reg_weight=b, order=4, experts=k, bits="W2A2",
                                 label=reg, val_acc_mean=0.7 + 0.01 * b + 0.001 * eps + 0.0001 * k,
                                 val_acc_std=0.01))
    return rows


def test_best_settings_choose_by_validation_accuracy_per_form():
    best = best_settings(_sweep_rows())
    assert best == {"exact": dict(reg="mec", reg_weight=2.0, eps=2.0),
                    "Taylor n=4": dict(reg="mec_taylor", reg_weight=2.0, eps=16.0, order=4),
                    "MOE K=2": dict(reg="moe", reg_weight=2.0, eps=2.0, experts=2),
                    "MOE K=4": dict(reg="moe", reg_weight=2.0, eps=2.0, experts=4)}
    grid = main_grid(epochs=1, bits=[(2, 2)], settings=best)
    assert {(c["reg"], c.get("eps"), c.get("experts")) for c in grid if c["reg"]} == {
        ("mec", 2.0, None), ("mec_taylor", 16.0, None), ("moe", 2.0, 2), ("moe", 2.0, 4),
        ("moe", 8.0, 8)}  # MOE K=8 had no sweep row: its default setting
    assert [method_label(c) for c in main_grid(epochs=1, bits=[(2, 2)], settings=best,
                                               forms=["MOE K=2"])][-1] == "MEC-Quant (MOE K=2)"
    with pytest.raises(MecrefError, match="no regularised sweep row"):
        best_settings(_sweep_rows()[:1])
    with pytest.raises(MecrefError, match="does not read"):
        main_grid(settings={"mec": {"order": 3}})
    with pytest.raises(MecrefError, match="unknown form"):
        main_grid(settings={"MOE K=3": {"eps": 1.0}})


def test_plot_sweep_writes_an_image(tmp_path):
    rows = _sweep_rows()
    p = plot_sweep(rows, tmp_path / "sweep.png")
    assert p.stat().st_size > 5000
    with pytest.raises(MecrefError, match="no regularised row"):
        plot_sweep(rows[:1], tmp_path / "none.png")


# --------------------------------------------------------------------------- canonical grids

def test_main_grid_has_every_method_at_every_bit_width_with_one_budget():
    grid = main_grid(epochs=3, batch_size=64)
    assert len(grid) == 1 + 4 * 9
    fulls = [cell_config(c, 0) for c in grid]  # every configuration is valid
    assert len({group_key(f) for f in fulls}) == len(grid)
    labels = [(f"W{c['w_bits']}A{c['a_bits']}" if c["quantizer"] != "fp32" else "FP32",
               method_label(c)) for c in fulls]
    assert labels[0] == ("FP32", "FP32")
    for bits in ("W4A4", "W3A3", "W2A2", "W2A4"):
        assert [m for b, m in labels if b == bits] == [
            "STE", "DoReFa+PACT", "LSQ", "LSQ+", "MEC-Quant (exact)", "MEC-Quant (Taylor n=4)",
            "MEC-Quant (MOE K=2)", "MEC-Quant (MOE K=4)", "MEC-Quant (MOE K=8)"]
    budget = {(f["epochs"], f["batch_size"], f["lr"], f["warmup_epochs"], f["val_size"]) for f in fulls}
    assert budget == {(3, 64, fulls[0]["lr"], fulls[0]["warmup_epochs"], 0)}
    lsq = next(f for f in fulls if f["quantizer"] == "lsq" and f["reg"] is None)
    mec = next(f for f in fulls if f["reg"] == "mec" and f["w_bits"] == lsq["w_bits"]
               and f["a_bits"] == lsq["a_bits"])
    assert {k for k in lsq if lsq[k] != mec[k]} == {"reg"}  # the regulariser is the only change


def test_sweep_grid_gives_every_form_one_strength_grid():
    assert len(sweep_grid()) == 82 and taylor_eps() == 8.0
    forms = [{"reg": "mec"}, {"reg": "mec_taylor", "order": 4}, {"reg": "moe", "experts": 2}]
    grid = sweep_grid(epochs=2, reg_weights=(0.1, 1.0), eps_values=(1.0, 2.0, 4.0, 8.0),
                      forms=forms, width=(4, 8, 16))
    fulls = [cell_config(c, 0) for c in grid]
    assert len({group_key(f) for f in fulls}) == len(fulls) == 1 + 2 * 4 + 2 * 2 + 2 * 4
    assert all(f["val_size"] == 2000 and (f["w_bits"], f["a_bits"]) == (2, 2) for f in fulls)
    assert all(f["epochs"] == 2 and f["width"] == [4, 8, 16] for f in fulls)
    grid_of = {reg: {(f["reg_weight"], f["eps"]) for f in fulls if f["reg"] == reg}
               for reg in ("mec", "mec_taylor", "moe")}
    product = {(b, e) for b in (0.1, 1.0) for e in (1.0, 2.0, 4.0, 8.0)}
    assert grid_of["mec"] == grid_of["moe"] == product
    # the Taylor series is defined for eps >= sqrt(d) = 4 with d = 16
    assert grid_of["mec_taylor"] == {(b, e) for b, e in product if e >= 4.0}
    with pytest.raises(MecrefError, match="val_size"):
        sweep_grid(val_size=0)
    with pytest.raises(MecrefError, match="eps_values"):
        sweep_grid(eps_values=())


# -------------------------------------------------------------------------------------- CLI

def test_cli_table_dry_run_lists_the_main_grid(tmp_path, capsys):
    from mecref.cli import main
    assert main(["table", "--grid", "main", "--out", str(tmp_path), "--seeds", "0", "1",
                 "--epochs", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3] == "74 cells: 0 cached, 74 to run" and out[-2].startswith("estimated time: ~")
    assert any("W2A4 MEC-Quant (MOE K=4) seed 1" in line for line in out)
    assert main(["table", "--grid", "sweep", "--out", str(tmp_path), "--bits", "W2A2"]) == 2


def test_cli_sweep_runs_a_tiny_sweep_end_to_end(tmp_path, capsys):
    from mecref.cli import main
    sweep = tmp_path / "sweep"
    argv = ["sweep", "--out", str(sweep), "--epochs", "1", "--train-limit", "128",
            "--batch-size", "32", "--width", "4", "8", "9", "--val-size", "200",
            "--reg-weights", "0.5", "--eps-values", "1.0", "3.0", "--orders", "4",
            "--experts", "4", "--workers", "1", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| W2A2 | MEC-Quant (Taylor n=4) |" in out and "val acc (%)" in out
    rows = json.loads((sweep / "results.json").read_text())["rows"]
    # LSQ; exact and MOE at eps 1 and 3; Taylor only at 3 (sqrt(9) = 3 is its smallest eps)
    assert len(rows) == 6 and all(r["val_acc_mean"] is not None for r in rows)
    best = json.loads((sweep / "best_settings.json").read_text())
    assert best["Taylor n=4"] == dict(reg="mec_taylor", reg_weight=0.5, eps=3.0, order=4)
    exact = max((r for r in rows if r["reg"] == "mec"), key=lambda r: r["val_acc_mean"])
    assert f"best exact by validation accuracy: reg=mec reg_weight=0.5 eps={exact['eps']:g}" in out
    assert (sweep / "sweep.png").is_file() and (sweep / "results.csv").is_file()
    # the main grid takes its MEC-Quant settings from the sweep
    assert main(["table", "--out", str(tmp_path / "main"), "--from-sweep", str(sweep),
                 "--seeds", "0", "--dry-run", "--width", "4", "8", "9"]) == 0
    out = capsys.readouterr().out
    assert '"Taylor n=4": {"reg": "mec_taylor", "reg_weight": 0.5, "eps": 3.0, "order": 4}' in out
    assert settings_from_sweep(sweep, {"exact": {"eps": 2.0}})["exact"] == dict(
        reg="mec", reg_weight=0.5, eps=2.0)
