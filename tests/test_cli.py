"""`mecref train` as a user meets it: the run folder, progress on stderr and results on stdout,
the defaults, messages in the command's words, --version (tiny runs, seconds each)."""
import csv
import importlib.metadata
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mecref
from mecref import MecrefError, cli
from mecref.train import TrainConfig, train_small_cnn

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
TINY = ["--epochs", "1", "--train-limit", "256", "--batch-size", "64"]
API_TINY = dict(epochs=1, train_limit=256, batch_size=64, width=(4, 8, 8), progress=False)
RUN_FILES = {"config.json", "history.csv", "history.json", "curves.png", "last.npz", "last.json",
             "summary.txt"}


def test_mecref_train_writes_a_run_folder_and_says_where(tmp_path):
    """The README's main job, shortened: a subprocess in a fresh folder, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "mecref", "train", *TINY], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (run,) = list((tmp_path / "runs").iterdir())
    assert {p.name for p in run.iterdir()} == RUN_FILES
    # the last line says where it went; the line above is the summary file's line
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith(f"run folder: runs/{run.name} (") and "curves.png" in lines[-1]
    summary = (run / "summary.txt").read_text().strip()
    assert lines[-2] == summary and summary.startswith("W2A2 lsq + mec_taylor (n=4, beta=0.2, eps=8)")
    # progress on stderr (not a terminal: plain lines), none of it on stdout
    assert "epoch 1/1 loss" in r.stderr and "epoch 1/1" not in r.stdout and "\r" not in r.stderr
    with open(run / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    hist = json.loads((run / "history.json").read_text())
    assert len(rows) == len(hist) == 1 and rows[0]["epoch"] == "1"
    assert float(rows[0]["test_acc"]) == pytest.approx(hist[0]["test_acc"])
    assert f"test accuracy {hist[0]['test_acc']:.4f}" in summary
    conf = json.loads((run / "config.json").read_text())
    assert conf["config"]["reg"] == "mec_taylor" and conf["config"]["train_limit"] == 256
    assert TrainConfig(**conf["config"]).validate().epochs == 1     # the config rebuilds the run
    import matplotlib.image
    img = matplotlib.image.imread(run / "curves.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200
    assert not (run / ".lock").exists()


def test_name_out_resume_and_a_run_never_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY, "--quiet", "--name", "first"]) == 0
    out = capsys.readouterr()
    assert out.err == ""                                     # --quiet: no progress at all
    assert out.out.strip().splitlines()[-1].startswith("run folder: runs/first (")
    before = (tmp_path / "runs/first/last.npz").read_bytes()
    assert cli.main(["train", *TINY, "--quiet", "--name", "first", "--seed", "3"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "runs/first/last.npz").read_bytes() == before
    # a finished run resumed: nothing trained again, the same numbers, the files all there
    assert cli.main(["train", *TINY, "--quiet", "--out", "runs/first", "--resume"]) == 0
    assert (tmp_path / "runs/first/last.npz").read_bytes() == before
    assert {p.name for p in (tmp_path / "runs/first").iterdir()} == RUN_FILES
    assert cli.main(["train", *TINY, "--quiet", "--out", str(tmp_path / "elsewhere" / "r")]) == 0
    assert {p.name for p in (tmp_path / "elsewhere/r").iterdir()} == RUN_FILES


def test_the_python_api_writes_nothing_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = train_small_cnn(**API_TINY)
    assert res.files == {} and res.out is None and list(tmp_path.iterdir()) == []
    res = train_small_cnn(**API_TINY, out=tmp_path / "r")
    assert set(res.files) == {"config", "history_csv", "history_json", "curves", "checkpoint", "summary"}
    assert all(Path(p).is_file() for p in res.files.values()) and res.out == str(tmp_path / "r")
    assert Path(res.files["summary"]).read_text().strip() == res.headline()
    only = train_small_cnn(**API_TINY, checkpoint_dir=tmp_path / "c")
    assert only.files == {} and {p.name for p in (tmp_path / "c").iterdir()} == {"last.npz", "last.json"}
    with pytest.raises(MecrefError, match="give out .* or checkpoint_dir .*not both"):
        train_small_cnn(**API_TINY, out=tmp_path / "a", checkpoint_dir=tmp_path / "b")
    with pytest.raises(MecrefError, match="w_bits must be an integer in 1..8, got 9"):
        train_small_cnn(**API_TINY, out=tmp_path / "bad", w_bits=9)
    assert not (tmp_path / "bad").exists()                  # checked before the folder is made


def test_plain_progress_lines_off_a_terminal(tmp_path):
    env = dict(ENV, MECREF_PROGRESS_SECONDS="0")
    r = subprocess.run([sys.executable, "-m", "mecref", "train", *TINY, "--out", "r"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    steps = [ln for ln in r.stderr.splitlines() if " step " in ln]
    # 256 images, 64 a step: 4 steps, a line after each but the last (the epoch line follows)
    assert [ln.split(" loss")[0] for ln in steps] == [f"epoch 1/1 step {i}/4 ({25 * i}%)" for i in (1, 2, 3)]
    assert all("s left in the epoch" in ln for ln in steps)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar_then_the_epoch_line(monkeypatch):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    train_small_cnn(**dict(API_TINY, progress=True))
    text = err.getvalue()
    assert text.startswith("\repoch 1/1:   0%|") and "| 0/4 [" in text and "step/s]" in text
    last = text.split("\r")[-1]
    assert "epoch 1/1 loss" in last and "test" in last       # the bar is cleared, the line stays


def test_fp32_means_no_regulariser_unless_asked(tmp_path, monkeypatch, capsys):
    assert TrainConfig(quantizer="fp32").reg is None
    assert TrainConfig().reg == "mec_taylor" and TrainConfig(quantizer="ste").reg == "mec_taylor"
    assert TrainConfig(quantizer="fp32", reg="mec").reg == "mec"
    assert TrainConfig(reg="None").reg is None and TrainConfig(reg="none").reg is None
    res = train_small_cnn(**dict(API_TINY, quantizer="fp32"))
    assert res.config["reg"] is None and all(h["reg"] == 0.0 for h in res.history)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY, "--quiet", "--quantizer", "fp32", "--name", "fp"]) == 0
    assert "FP32, no regulariser: test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs/fp/config.json").read_text())["config"]["reg"] is None
    assert cli.main(["train", *TINY, "--quiet", "--quantizer", "fp32", "--reg", "mec", "--name", "fpm"]) == 0
    assert "FP32 + mec (beta=0.2, eps=8): test accuracy" in capsys.readouterr().out
    assert cli.main(["train", *TINY, "--quiet", "--reg", "None", "--name", "n"]) == 0
    assert "W2A2 lsq, no regulariser: test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--w-bits", "16"], "--w-bits must be an integer in 1..8, got 16"),
    (["--first-last-bits", "16"], "--first-last-bits must be an integer in 1..8 or 32, got 16"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--warmup-epochs", "3", "--epochs", "1"], "--warmup-epochs (3.0) must be at most --epochs (1)"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--batch-size", "500", "--train-limit", "256"], "--batch-size (500) is larger than the training data (256 images)"),
    (["--dataset", "idx"], "--dataset idx needs --data-dir DIR, a folder with the four IDX files"),
    (["--dataset", "bundled", "--data-dir", "d"], "--dataset bundled reads the subset inside the package "
                                                  "and takes no --data-dir, got --data-dir d"),
    (["--dataset", "idx", "--data-dir", "nowhere"], "--data-dir 'nowhere' does not exist or is not a folder"),
    (["--resume"], "--resume needs --out DIR (or --name NAME)"),
    (["--name", "a", "--out", "b"], "give --out DIR or --name NAME"),
    (["--name", "a/b"], "--name (of the run) must be a non-empty folder name without '/', got 'a/b'"),
])
def test_messages_name_the_flag_the_rule_and_the_value(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mecref: error: ") and message in err, err
    assert "_" not in err.split(":")[2].split(",")[0]       # no Python argument name before the rule
    assert list(tmp_path.iterdir()) == []                   # a refused run leaves no folder behind


def test_in_flags_leaves_other_words_alone():
    flags = cli._flag_names(cli.build_parser()._subparsers._group_actions[0].choices["train"])
    assert flags["w_bits"] == "--w-bits" and flags["checkpoint_dir"] == "--out"
    text = "checkpoint_dir 'r' already holds a checkpoint: continue it (resume=True, --resume)"
    assert cli._in_flags(text, flags) == "--out 'r' already holds a checkpoint: continue it (--resume)"
    plain = "a run of 6 epochs of 93 steps; the seed is fixed"
    assert cli._in_flags(plain, flags) == plain


def test_version_comes_from_the_package_metadata(capsys):
    assert mecref.__version__ == importlib.metadata.version("mecref")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"mecref {mecref.__version__}"


GRID = ["table", "--bits", "W2A2", "--forms", "exact", "--epochs", "1", "--train-limit", "128",
        "--batch-size", "32", "--width", "4", "8", "8", "--workers", "1"]


def test_a_dry_run_prices_the_grid_and_a_table_says_where_its_files_went(tmp_path, capsys):
    from mecref.experiments import estimate_seconds, load_runs
    out = tmp_path / "grid"
    # before anything ran: every cell priced from a measured step, nothing written
    assert cli.main([*GRID, "--out", str(out), "--seeds", "0", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3] == "6 cells: 0 cached, 6 to run"
    assert lines[-2].startswith("estimated time: ~") and "6 from a measured step" in lines[-2]
    assert lines[-1] == "dry run: nothing was trained or written" and not out.exists()
    assert cli.main([*GRID, "--out", str(out), "--seeds", "0", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert printed.out.strip().splitlines()[-1] == (
        f"wrote results.csv, results.json in {out} (each cell: runs/<key>.json, checkpoints/<key>/)")
    assert (out / "results.csv").is_file() and (out / "results.json").is_file()
    # seed 1 of the same configurations: priced from seed 0's recorded times
    recs = load_runs(out)
    assert len(recs) == 6
    from mecref.experiments import cell_config, main_grid
    cells = [cell_config(c, 1) for c in main_grid(epochs=1, bits=[(2, 2)], forms=["exact"],
                                                  train_limit=128, batch_size=32, width=(4, 8, 8))]
    est = estimate_seconds(cells, out)
    assert est["from_cache"] == 6 and est["measured"] == 0
    assert est["seconds"] == pytest.approx(sum(r["seconds"] for r in recs))
    assert cli.main([*GRID, "--out", str(out), "--seeds", "0", "1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3] == "12 cells: 6 cached, 6 to run" and "6 from cached cells' times" in lines[-2]
    assert f"~{est['seconds']:.0f} s on 1 worker (" in lines[-2]


def test_a_grid_on_a_terminal_gets_a_tqdm_bar_of_cells(tmp_path, monkeypatch):
    from mecref.experiments import main_grid, run_grid
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    configs = main_grid(epochs=1, bits=[(2, 2)], forms=[], train_limit=128, batch_size=32,
                        width=(4, 8, 8))[:2]
    run_grid(configs, [0], tmp_path, workers=1, progress=True)
    text = err.getvalue()
    assert text.startswith("grid: 2 cells, 0 cached, 2 to run (1 worker)\n")
    assert "grid:   0%|" in text and "| 0/2 [" in text and "0 cached" in text
    assert "[2/2] W2A2 STE seed 0: test" in text and "0 left" in text


def test_the_gpu_hint_is_the_install_that_works_from_here(tmp_path, monkeypatch):
    from mecref.backend import install_hint
    monkeypatch.chdir(ROOT)               # mecref is imported from this clone (tests run in it)
    assert 'python3 -m pip install -e ".[gpu]"' in install_hint()
    monkeypatch.chdir(tmp_path)
    assert f'python3 -m pip install -e "{ROOT}[gpu]"' in install_hint()
    flags = cli._flag_names(cli.build_parser()._subparsers._group_actions[0].choices["train"])
    assert cli._in_flags(install_hint(), flags).endswith("or use --backend numpy")


@pytest.mark.parametrize("argv,message", [
    (["table", "--out", "o", "--dataset", "idx", "--dry-run"], "--dataset idx needs --data-dir DIR"),
    (["sweep", "--out", "o", "--data-dir", "d", "--dry-run"], "--dataset bundled reads the subset"),
    (["eval-int", "m.npz", "--dataset", "idx"], "--dataset idx needs --data-dir DIR"),
])
def test_every_verb_checks_its_data_flags_in_its_words(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_the_progress_interval_is_checked(monkeypatch):
    from mecref.train import progress_seconds
    monkeypatch.setenv("MECREF_PROGRESS_SECONDS", "2.5")
    assert progress_seconds() == 2.5
    for bad in ("x", "-1", "nan"):
        monkeypatch.setenv("MECREF_PROGRESS_SECONDS", bad)
        with pytest.raises(MecrefError, match=f"MECREF_PROGRESS_SECONDS must be a number of seconds >= 0, got '{bad}'"):
            progress_seconds()
