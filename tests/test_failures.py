"""Failure behaviour: each fault an adversarial user can cause ends in the right result or in
mecref's own one-line error naming the argument or file, with nothing lost (docs/design.md,
"Failure behaviour"). Real subprocesses and signals where the fault is a process's."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest

from mecref import MecrefError, cli
from mecref.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mecref.experiments import load_runs, summarize
from mecref.export import ExportError, export_checkpoint
from mecref.train import train_small_cnn

TINY = dict(quantizer="lsq", w_bits=2, a_bits=2, epochs=1, train_limit=256, batch_size=64,
            width=(4, 8, 8), seed=0, progress=False)
CLI_TINY = ["train", "--quantizer", "lsq", "--w-bits", "2", "--a-bits", "2", "--epochs", "1",
            "--train-limit", "256", "--batch-size", "64", "--quiet"]
ENV = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with its checkpoint folder (copied by the tests that change it)."""
    d = tmp_path_factory.mktemp("run") / "ck"
    train_small_cnn(**TINY, checkpoint_dir=d)
    return d


def _copy(trained, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(trained, d)
    return d


def _wait_for(cond, what, limit=120):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, f"{what} did not happen within {limit} s"
        time.sleep(0.05)


def _reap(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


# ------------------------------------------------------------------ 5: invalid state on resume
@pytest.mark.parametrize("entry, change, message", [
    ("conv2.s_w", lambda a: -a, r"conv2\.s_w' must be > 0"),
    ("conv2.s_a", lambda a: 0 * a, r"conv2\.s_a' must be > 0"),
    ("conv2.W", lambda a: np.rint(a * 10).astype(np.int64), r"conv2\.W' has dtype int64"),
    ("bn2.running_var", lambda a: -a, r"bn2\.running_var' must be >= 0"),
    ("conv3.ready", lambda a: np.float32(0) * a, r"conv3\.ready = 0"),
])
def test_resume_refuses_invalid_state_naming_the_array(trained, tmp_path, entry, change, message):
    d = _copy(trained, tmp_path)
    state, opt, meta = load_checkpoint(d / "last.npz")
    state[entry] = change(state[entry])
    del meta["format_version"]
    save_checkpoint(d / "last.npz", state, opt, meta)
    with pytest.raises(CheckpointError, match=message):
        train_small_cnn(**TINY, checkpoint_dir=d, resume=True)


# ------------------------------------------------------------------ 11: crafted, oversized files
def _with_member(src, dst, name, nbytes):
    """src's members plus one named ``name`` declaring ``nbytes`` of zeros (deflated)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        with zout.open(name, "w", force_zip64=True) as fh:
            chunk = bytes(1 << 20)
            for _ in range(nbytes >> 20):
                fh.write(chunk)
    return dst


def test_an_oversized_or_foreign_member_is_refused_before_decompression(trained, tmp_path):
    p = _with_member(trained / "last.npz", tmp_path / "big.npz", "model/conv9.W.npy", 64 << 20)
    assert p.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"big\.npz'.*declare \d+ bytes, more than"):
        load_checkpoint(p)
    p = _with_member(trained / "last.npz", tmp_path / "odd.npz", "payload.bin", 1 << 20)
    with pytest.raises(CheckpointError, match=r"odd\.npz' holds members no checkpoint has: \['payload.bin'\]"):
        load_checkpoint(p)


def test_a_huge_declared_width_is_refused(trained, tmp_path):
    state, opt, meta = load_checkpoint(trained / "last.npz")
    del meta["format_version"]
    p = save_checkpoint(tmp_path / "wide.npz", state, opt,
                        dict(meta, model_config=dict(meta["model_config"], width=[100000] * 3)))
    with pytest.raises(CheckpointError, match=r"width must be three ints in 1\.\.4096, got \[100000"):
        load_checkpoint(p)
    with pytest.raises(MecrefError, match="width must be"):
        export_checkpoint(p, tmp_path / "int.npz")


# ------------------------------------------------------------------ 13: corrupt metadata, caches
def _meta_as(trained, tmp_path, raw):
    p = tmp_path / "m.npz"
    with zipfile.ZipFile(trained / "last.npz") as zin, zipfile.ZipFile(p, "w") as zout:
        for info in zin.infolist():
            if info.filename != "__meta__.npy":
                zout.writestr(info, zin.read(info))
        with zout.open("__meta__.npy", "w") as fh:
            np.lib.format.write_array(fh, raw)
    return p


def test_metadata_that_is_not_a_json_object_is_refused(trained, tmp_path):
    with pytest.raises(CheckpointError, match="metadata must be a JSON object, got list"):
        load_checkpoint(_meta_as(trained, tmp_path, np.frombuffer(b"[1, 2]", np.uint8)))
    with pytest.raises(CheckpointError, match=r"metadata must be a 1-d uint8 array.*<U"):
        load_checkpoint(_meta_as(trained, tmp_path, np.array(["{}"])))


def test_init_from_a_checkpoint_without_model_config_is_refused(trained, tmp_path):
    state, opt, meta = load_checkpoint(trained / "last.npz")
    p = save_checkpoint(tmp_path / "fp.npz", state, opt, {"epoch": 1})
    with pytest.raises(CheckpointError, match=r"fp\.npz' has no model_config"):
        train_small_cnn(**TINY, init_from=str(p))


def test_bad_run_files_are_skipped_naming_them_and_a_bad_grid_json_is_refused(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "list.json").write_text("[1, 2]")
    (runs / "nogroup.json").write_text(json.dumps(dict(config={}, label="x", bits="W2A2", seed=0,
                                                       status="ok")))
    (runs / "cut.json").write_text('{"config": {')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_runs(tmp_path) == []
    said = " ".join(str(w.message) for w in caught)
    for name in ("list.json", "nogroup.json", "cut.json"):
        assert name in said
    (tmp_path / "grid.json").write_text('{"configs": [{"quan')
    with pytest.raises(MecrefError, match=r"grid\.json' is unreadable or malformed"):
        summarize(tmp_path)


# ------------------------------------------------------------------ 4: --init-from with a gap
def test_init_from_missing_an_array_is_refused(tmp_path):
    fp = train_small_cnn(**dict(TINY, quantizer="fp32", w_bits=32, a_bits=32),
                         checkpoint_dir=tmp_path / "fp")
    state, opt, meta = load_checkpoint(fp.checkpoint)
    del state["conv2.W"], meta["format_version"]
    p = save_checkpoint(tmp_path / "gap.npz", state, opt, meta)
    with pytest.raises(CheckpointError, match=r"gap\.npz' lacks arrays this model needs: \['conv2\.W'\]"):
        train_small_cnn(**TINY, init_from=str(p))


# ------------------------------------------------------------------ 3: --resume without a folder
def test_resume_without_checkpoint_dir_is_an_error(capsys):
    with pytest.raises(MecrefError, match="resume=True needs checkpoint_dir"):
        train_small_cnn(**TINY, resume=True)
    assert cli.main(CLI_TINY + ["--resume"]) == 2
    assert "--resume needs --out DIR (or --name NAME)" in capsys.readouterr().err


# ------------------------------------------------------------------ 2: overwrite, lock, export
def test_a_checkpoint_is_not_replaced_unless_asked(trained, tmp_path, capsys):
    d = _copy(trained, tmp_path)
    before = (d / "last.npz").read_bytes()
    assert cli.main(CLI_TINY + ["--checkpoint-dir", str(d), "--seed", "5"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (d / "last.npz").read_bytes() == before
    assert cli.main(CLI_TINY + ["--checkpoint-dir", str(d), "--seed", "5", "--overwrite"]) == 0
    assert load_checkpoint(d / "last.npz")[2]["config"]["seed"] == 5
    assert not (d / ".lock").exists()


def test_export_refuses_its_own_input_as_output(trained, tmp_path):
    d = _copy(trained, tmp_path)
    before = (d / "last.npz").read_bytes()
    with pytest.raises(ExportError, match="is the checkpoint being exported"):
        export_checkpoint(d / "last.npz", str(d / "." / "last.npz"))
    assert (d / "last.npz").read_bytes() == before


HOLDER = r"""
import sys, time
from pathlib import Path
from mecref.checkpoint import run_folder
with run_folder(sys.argv[1]):
    Path(sys.argv[2]).write_text("in")
    time.sleep(300)
"""


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    d, marker = tmp_path / "ck", tmp_path / "holding"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(d), str(marker)], env=ENV,
                             stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: marker.exists() or first.poll() is not None, "the first writer's start")
        assert first.poll() is None, first.stderr.read().decode()
        second = subprocess.run([sys.executable, "-m", "mecref"] + CLI_TINY + ["--checkpoint-dir", str(d)],
                                env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by another run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGKILL)           # its lock is left behind, stale
        first.wait(timeout=30)
        assert (d / ".lock").exists()
        train_small_cnn(**TINY, checkpoint_dir=d)  # a dead run's lock is taken over
        assert (d / "last.npz").exists() and not (d / ".lock").exists()
    finally:
        _reap(first)


# ------------------------------------------------------------------ 7: stale temp files, SIGTERM
PAUSED = r"""
import os, sys, time
from pathlib import Path
import mecref.train as T
from mecref import cli
marker = Path(sys.argv[1])
real = T.train_step
def train_step(model, opt, xb, yb, rng, cfg, step):
    if step == 2:
        marker.write_text(str(os.getpid()))
        time.sleep(300)
    return real(model, opt, xb, yb, rng, cfg, step)
T.train_step = train_step
sys.exit(cli.main(sys.argv[2:]))
"""


def test_stale_temp_files_are_removed_and_sigterm_ends_like_ctrl_c(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    for name in ("last.npz.abc123.tmp", "last.json.x9.tmp"):
        (d / name).write_bytes(b"cut short by a kill")
    marker = tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", PAUSED, str(marker)] + CLI_TINY +
                             ["--checkpoint-dir", str(d)],
                             env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: marker.exists() or child.poll() is not None, "the pause")
        assert child.poll() is None, child.stderr.read()
        # the temp files are gone; the run folder's config is written before the first step
        assert sorted(p.name for p in d.iterdir()) == [".lock", "config.json"]
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        _reap(child)
    assert child.returncode == 130 and err.strip().splitlines()[-1] == "mecref: interrupted"
    assert "Traceback" not in err
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]


# ------------------------------------------------------------------ 6: OS errors, early and clear
def test_a_parent_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    t0 = time.monotonic()
    assert cli.main(CLI_TINY + ["--checkpoint-dir", str(tmp_path / "file" / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mecref: error: --out ") and "is not a writable folder" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs (Linux, root only; skipped elsewhere), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_or_read_only_disk_is_refused_before_training(tmpfs, capsys):
    fd = os.open(tmpfs / "filler", os.O_CREAT | os.O_WRONLY)   # fill the tmpfs to its last byte
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    assert cli.main(CLI_TINY + ["--checkpoint-dir", str(tmpfs / "ck")]) == 2
    err = capsys.readouterr().err
    assert "is not a writable folder: No space left on device" in err, err
    (tmpfs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert cli.main(CLI_TINY + ["--checkpoint-dir", str(tmpfs)]) == 2
    assert "is not a writable folder: Read-only file system" in capsys.readouterr().err


def test_a_failed_sidecar_says_the_checkpoint_was_saved(trained, tmp_path, monkeypatch):
    import mecref.checkpoint as C
    real = C.write_atomic

    def full_for_json(path, write):
        if str(path).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(C, "write_atomic", full_for_json)
    state, opt, meta = load_checkpoint(trained / "last.npz")
    with pytest.raises(CheckpointError, match=r"last\.npz' was saved, but its sidecar .*last\.json' "
                                              r"could not be written: No space left on device"):
        save_checkpoint(tmp_path / "last.npz", state, opt, meta)
    assert load_checkpoint(tmp_path / "last.npz")[2]["epoch"] == 1


# ------------------------------------------------------------------ 1: grid workers and signals
GRID = r"""
import sys
from mecref import cli
from mecref.experiments import run_grid
cli._sigterm_as_interrupt()
tiny = dict(train_limit=256, batch_size=64, epochs=1, width=(4, 8, 8))
configs = [dict(tiny, quantizer="lsq", reg=r) for r in (None, "mec")]
try:
    run_grid(configs, list(range(8)), sys.argv[1], workers=2, progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _spawned_children(pid):
    """Pids of the multiprocessing workers whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmd = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            out.append(int(entry))
    return out


def _gone(pid):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_grid_workers_stop_with_their_runner(tmp_path, sig):
    """SIGTERM: the runner stops its workers at once and exits 130; SIGKILL: each worker sees
    its parent gone and stops by itself. Either way no worker trains on afterwards."""
    out = tmp_path / "grid"
    child = subprocess.Popen([sys.executable, "-c", GRID, str(out)], env=ENV,
                             stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        def training():
            workers[:] = _spawned_children(child.pid)
            return child.poll() is not None or (
                len(workers) == 2 and any((out / "checkpoints").glob("*/.lock")))
        _wait_for(training, "two workers training", limit=300)
        assert child.poll() is None, child.stderr.read()
        child.send_signal(sig)
        child.wait(timeout=60)
        _wait_for(lambda: all(_gone(w) for w in workers), "the workers' end", limit=60)
    finally:
        _reap(child)
        for w in workers:
            if not _gone(w):
                os.kill(w, signal.SIGKILL)
    assert child.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    cells = len(list((out / "runs").glob("*.json"))) if (out / "runs").exists() else 0
    time.sleep(1.0)   # nothing is left to write more cells
    assert (len(list((out / "runs").glob("*.json"))) if (out / "runs").exists() else 0) == cells


# ------------------------------------------------------------------ 12: the integer-model loader
@pytest.fixture(scope="module")
def int_model_file(trained, tmp_path_factory):
    return export_checkpoint(trained / "last.npz", tmp_path_factory.mktemp("int") / "m.npz")[1]


def _node(imodel, name):
    return next(n for n in imodel.graph if n["name"] == name)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.arrays.update({"conv2.w": m.arrays["conv2.w"][:, :3]}), r"conv2d\): weight of shape \(8, 3, 3, 3\) must read 4 input"),
    (lambda m: m.arrays.update({"conv2.w": m.arrays["conv2.w"][:0]}), r"at least one filter"),
    (lambda m: m.arrays.update({"conv2.n": m.arrays["conv2.n"][:0]}), r"shift must be \(8,\)|one row per channel"),
    (lambda m: m.arrays.update({"conv2.C": np.int64(5)}), r"node 5: offset must have 8 rows"),
    (lambda m: _node(m, "conv2.requant").update(qmin=None, qmax=None), r"null only for int64"),
    (lambda m: _node(m, "conv2.requant").update(qmax=300), r"qmin, qmax \(0, 300\) must lie within uint8"),
    (lambda m: m.arrays.update({"conv2.M": m.arrays["conv2.M"].astype(np.int64) * 2 ** 33}), r"multiplier\| must be < 2\^31"),
    (lambda m: m.arrays.update({"conv2.C": m.arrays["conv2.C"] + 2 ** 62}), r"offset\| < 2\^62"),
    (lambda m: _node(m, "conv2").update(padding=100000), r"padding \(100000\) smaller"),
])
def test_the_integer_loader_checks_the_whole_graph(int_model_file, tmp_path, change, message):
    from mecref.export import load_int_model, save_int_model
    imodel = load_int_model(int_model_file)
    change(imodel)
    with pytest.raises(ExportError, match=message):
        save_int_model(imodel, tmp_path / "bad.npz")
        load_int_model(tmp_path / "bad.npz")


# ------------------------------------------------------------------ 14: the smaller ones
def test_output_files_follow_the_umask(tmp_path):
    from mecref.checkpoint import write_atomic
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", lambda fh: fh.write(b"{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_a_plot_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    from matplotlib.figure import Figure
    from mecref.diagnostics import _save
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "spectra.png"
    link.symlink_to(target)
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    _save(fig, link)
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.read_bytes()[:4] == b"\x89PNG"


def test_a_config_mismatch_names_only_the_differing_fields(trained):
    _, _, meta = load_checkpoint(trained / "last.npz")
    want = dict(meta, config=dict(meta["config"], seed=9))
    with pytest.raises(CheckpointError, match=r"\(config: seed checkpoint 0 vs run 9\)$"):
        load_checkpoint(trained / "last.npz", expect_config=want, keys=("config",))


@pytest.mark.parametrize("call, exc, message", [
    (lambda: train_small_cnn(**dict(TINY, warmup_epochs=1e9)), MecrefError, r"warmup_epochs \(1000000000\.0\) must be at most epochs \(1\)"),
    (lambda: train_small_cnn({"epochs": 1}), TypeError, r"config must be a TrainConfig .* got dict"),
    (lambda: train_small_cnn(**TINY, checkpoint_dir=123), TypeError, r"checkpoint_dir must be a str or path-like, got int 123"),
])
def test_confusing_arguments_get_clear_messages(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_from_sweep_of_a_missing_folder_is_refused(tmp_path):
    from mecref.experiments import settings_from_sweep
    with pytest.raises(MecrefError, match=r"sweep_dir '.*nonexistent' holds no sweep"):
        settings_from_sweep(tmp_path / "nonexistent")


@pytest.mark.parametrize("extra, message", [(["--seeds", "0", "0"], "--seeds must be distinct"),
                                            (["--workers", "0"], "--workers must be at least 1")])
def test_dry_run_checks_seeds_and_workers(tmp_path, capsys, extra, message):
    assert cli.main(["table", "--out", str(tmp_path), "--dry-run"] + extra) == 2
    assert message in capsys.readouterr().err
