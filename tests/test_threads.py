"""mecref.threads: the channel split gives the same numbers as one thread, the layers still
match float64 finite differences when split, and one training step still gives the outputs
recorded before the layers were optimised (tests/data/golden_step.npz)."""
import os
from pathlib import Path

import numpy as np
import pytest

from mecref import nn, threads
from mecref.backend import MecrefError
from mecref.losses import softmax_cross_entropy, softmax_cross_entropy_backward
from test_nn import check_layer  # float64 central differences of dx and every param grad

GOLDEN = Path(__file__).parent / "data" / "golden_step.npz"


@pytest.fixture
def split_always(monkeypatch):
    """Split every array, however small, over 3 threads (so odd block sizes occur)."""
    monkeypatch.setattr(threads, "MIN_ELEMENTS", 0)
    old = threads.set_num_threads(3)
    yield
    threads.set_num_threads(old)


def test_over_channels_covers_every_channel_once(split_always):
    seen = np.zeros(7, dtype=int)

    def kernel(c):
        seen[c] += 1

    threads.over_channels(kernel, 7, 10 ** 9)
    np.testing.assert_array_equal(seen, 1)
    hits = []
    threads.over_channels(lambda c: hits.append((c.start, c.stop)), 2, 10 ** 9)  # fewer channels than threads
    assert sorted(hits) == [(0, 1), (1, 2)]


def test_over_channels_raises_a_block_error(split_always):
    def kernel(c):
        if c.start > 0:
            raise RuntimeError(f"block {c.start}")

    with pytest.raises(RuntimeError, match="block"):
        threads.over_channels(kernel, 6, 10 ** 9)


def test_small_arrays_and_one_thread_do_not_split():
    calls = []
    threads.over_channels(calls.append, 8, threads.MIN_ELEMENTS - 1)
    assert calls == [slice(0, 8)]
    old = threads.set_num_threads(1)
    try:
        calls.clear()
        threads.over_channels(calls.append, 8, 10 ** 9)
        assert calls == [slice(0, 8)]
    finally:
        threads.set_num_threads(old)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_counts(bad):
    with pytest.raises(MecrefError, match="threads"):
        threads.set_num_threads(bad)


def test_env_sets_the_default(monkeypatch):
    monkeypatch.setenv("MECREF_NUM_THREADS", "3")
    assert threads._default_threads() == 3
    monkeypatch.setenv("MECREF_NUM_THREADS", "two")
    with pytest.raises(MecrefError, match="MECREF_NUM_THREADS"):
        threads._default_threads()
    monkeypatch.delenv("MECREF_NUM_THREADS")
    assert threads._default_threads() >= 1


def _step(model, x, y, R):
    logits, feats = model.forward(x, train=True)
    _, cache = softmax_cross_entropy(logits, y)
    dx = model.backward(softmax_cross_entropy_backward(cache), R)
    grads = {name: layer.grads[key].copy() for name, layer, key in model.named_params()}
    return logits, feats, dx, grads


@pytest.mark.parametrize("quantizer", [None, "lsq"])
def test_split_step_is_bitwise_the_one_thread_step(quantizer, monkeypatch):
    """float32, real sizes: the split changes no bit of any output or gradient."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    R = rng.standard_normal((32, 64)).astype(np.float32)
    kw = dict(quantizer=quantizer) if quantizer is None else dict(quantizer=quantizer, w_bits=2, a_bits=2)
    results = []
    for n in (1, 3):
        monkeypatch.setattr(threads, "MIN_ELEMENTS", 0)
        old = threads.set_num_threads(n)
        try:
            model = nn.small_cnn(**kw, seed=1)
            model.layers[0].input_grad = True
            model.forward(x, train=True)
            results.append(_step(model, x, y, R))
        finally:
            threads.set_num_threads(old)
    (l1, f1, d1, g1), (l3, f3, d3, g3) = results
    np.testing.assert_array_equal(l1, l3)
    np.testing.assert_array_equal(f1, f3)
    np.testing.assert_array_equal(d1, d3)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g3[k], err_msg=k)


@pytest.mark.parametrize("layer_factory, shape", [
    (lambda: nn.Conv2d(5, 3, 3, 1, 1, seed=2), (2, 5, 6, 6)),
    (lambda: nn.Conv2d(4, 3, 3, 2, 1, seed=2), (2, 4, 7, 7)),
    (lambda: nn.MaxPool2d(relu=True), (2, 5, 6, 7)),
    (lambda: nn.BatchNorm2d(5), (3, 5, 4, 4)),
])
def test_split_layers_match_finite_differences(layer_factory, shape, split_always):
    check_layer(layer_factory().astype(np.float64), np.random.default_rng(4).standard_normal(shape))


@pytest.mark.parametrize("variant", ["fp32", "w4a4_lsq"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_step_matches_the_outputs_recorded_before_optimisation(variant, n_threads, monkeypatch):
    """tests/data/make_golden_step.py recorded one float64 step (on the layers of 57d8219;
    those of 5b0c9e3, before the threaded element-wise passes, give the same bits); today's
    layers give the same numbers. The generator raises golden_setup.TieError first if a
    decision of the step (a quantizer's round or clip, a max-pool winner, a ReLU's sign) sits
    within 1e-9 of its tie, where another BLAS kernel's round-off could flip it; with none
    there, kernels differ by round-off alone: rtol 1e-12 is ~1e4 ulps (measured across
    OpenBLAS's Haswell, SkylakeX, Sandybridge and Prescott kernels at 1 and 2 threads: every
    element within 1e-14 + 4e-16 |value|)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "make_golden_step", Path(__file__).parent / "data" / "make_golden_step.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(threads, "MIN_ELEMENTS", 0)
    old = threads.set_num_threads(n_threads)
    try:
        now = gen.step_outputs(variant)
    finally:
        threads.set_num_threads(old)
    golden = np.load(GOLDEN)
    keys = [k.split("/", 1)[1] for k in golden.files if k.startswith(variant + "/")]
    assert set(keys) == set(now)
    for k in keys:
        np.testing.assert_allclose(now[k], golden[f"{variant}/{k}"], rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_working_pool(split_always):
    """The parent's pool threads do not exist in a forked child; the child must not wait on them."""
    import signal
    import time
    threads.set_num_threads(2)          # one pool worker: it is idle, so a submit would not start another
    threads.over_channels(lambda c: None, 6, 10 ** 9)          # the parent's pool exists now
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:                                                # child
        code = 2
        try:
            out = np.zeros(6)
            threads.over_channels(lambda c: out.__setitem__(c, 1.0), 6, 10 ** 9)
            code = 0 if out.sum() == 6 else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in over_channels")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
