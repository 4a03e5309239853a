"""The grid runner on a Dask cluster (mecref.cluster): a ``distributed.LocalCluster`` of two
worker processes, one thread each, runs a tiny grid whose QAT cells start from an FP32
pretraining; its cache must equal the local process pool's bit for bit, also after Ctrl-C and
a resume, and after a worker is killed in the middle of a cell."""
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed: "
    "`python3 -m pip install -e \".[cluster]\"` (the `test` extra has it) runs these tests")

from mecref import MecrefError                                      # noqa: E402
from mecref.cluster import _write_files, connect                    # noqa: E402
from mecref.experiments import cell_key, run_grid                   # noqa: E402

TINY = dict(train_limit=96, batch_size=32, epochs=2, width=(4, 8, 8), pretrain_epochs=1)
CONFIGS = [dict(TINY, quantizer="lsq", reg=None), dict(TINY, quantizer="lsq", reg="mec")]
SEEDS = [0, 1]
# what differs from one run of a cell to the next: where and when it ran, and how long it took
def _load_bench():
    spec = importlib.util.spec_from_file_location("cluster_bench",
                                                  Path(__file__).parents[1] / "scripts" / "cluster_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a grid folder's cache without what may differ between two runs (shared with the benchmark)
_bench = _load_bench()
_stable, _cache = _bench._stable, _bench._cache


@pytest.fixture(scope="module")
def pool_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    run_grid(CONFIGS, SEEDS, d, workers=2, progress=False)
    return _cache(d)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _our_tasks(dask_scheduler):
    return [str(k) for k in dask_scheduler.tasks if str(k).startswith("mecref-cell")]


def _assert_no_cells_left(client):
    """The scheduler forgets cancelled cells at once; a few round trips let it catch up."""
    for _ in range(100):
        if not client.run_on_scheduler(_our_tasks):
            break
        distributed.wait([client.submit(sum, [1], pure=False)])  # a round trip, no sleep
    assert client.run_on_scheduler(_our_tasks) == []


def test_cluster_cache_equals_the_local_pool_after_ctrl_c_and_a_resume(pool_cache, client,
                                                                       tmp_path):
    assert len(pool_cache) == 6 * 3   # 2 pretrainings + 4 cells: a record, last.npz, last.json

    def interrupt(rec, done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_grid(CONFIGS, SEEDS, tmp_path, progress=interrupt, client=client)
    # the grid's cells are gone from the scheduler, the cluster is still up
    _assert_no_cells_left(client)
    assert len(client.nthreads()) == 2
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1

    seen = []
    records = run_grid(CONFIGS, SEEDS, tmp_path, client=client,
                       progress=lambda r, k, n: seen.append(r["key"]))
    assert [r["from_cache"] for r in records] == [False] * 4
    assert len(seen) == 5          # the one pretraining cached before Ctrl-C is not sent again
    assert {r["blas_threads"] for r in records} == {1}
    assert _cache(tmp_path) == pool_cache

    again = run_grid(CONFIGS, SEEDS, tmp_path, client=client, progress=False)
    assert all(r["from_cache"] for r in again)

    # a lost run file of a cell trained on the cluster is rebuilt here from its checkpoint,
    # without training (the checkpoint's init_from names the worker's scratch copy)
    lost = tmp_path / "runs" / f"{cell_key(CONFIGS[1], 0)}.json"
    timed = json.loads(lost.read_text())["seconds_per_epoch"]
    lost.unlink()
    (rebuilt,) = [r for r in run_grid(CONFIGS, SEEDS, tmp_path, workers=1, progress=False)
                  if not r["from_cache"]]
    assert rebuilt["key"] == cell_key(CONFIGS[1], 0)
    assert rebuilt["seconds_per_epoch"] == timed      # the epochs timed on the worker
    # (rebuilt in this process, which records the caller's BLAS thread count)
    drop = lambda rec: {k: v for k, v in rec.items() if k != "blas_threads"}  # noqa: E731
    assert drop(_stable(json.loads(lost.read_text()))) == drop(pool_cache[f"runs/{lost.name}"])


class _KillOnFirstSave(distributed.WorkerPlugin):
    """Kills its worker process (SIGKILL) right after the first epoch's checkpoint of the cell
    ``key`` is written on that worker: the cell is half done there. Once per ``flag`` file,
    which records the killed process's pid."""

    def __init__(self, key, flag):
        self.key, self.flag = key, str(flag)

    def setup(self, worker):
        from mecref import train
        real, key, flag = train.save_checkpoint, self.key, self.flag

        def save_then_die(path, *args, **kwargs):
            out = real(path, *args, **kwargs)
            if key in str(path):
                try:
                    fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return out
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        train.save_checkpoint = save_then_die


def test_a_worker_killed_mid_cell_leaves_a_correct_cache_after_the_retry(pool_cache, client,
                                                                         tmp_path):
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    key = cell_key(CONFIGS[1], 1)
    flag = tmp_path / "killed.pid"
    out = tmp_path / "grid"
    client.register_plugin(_KillOnFirstSave(key, flag), name="kill-once")
    try:
        records = run_grid(CONFIGS, SEEDS, out, client=client, progress=False)
    finally:
        client.unregister_worker_plugin("kill-once")
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    killed = int(flag.read_text())
    assert {r["key"]: r["status"] for r in records}[key] == "ok"
    assert {r["key"]: r["pid"] for r in records}[key] != killed   # run again elsewhere
    assert _cache(out) == pool_cache
    client.wait_for_workers(2)


def test_a_cell_whose_workers_keep_dying_is_reported_failed_and_not_cached(client, tmp_path):
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    configs, seeds = CONFIGS[:1], [0]
    key = cell_key(configs[0], 0)
    old = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    client.register_plugin(_KillOnFirstSave(key, tmp_path / "killed.pid"), name="kill-once")
    try:
        records = run_grid(configs, seeds, tmp_path / "grid", client=client, progress=False)
    finally:
        client.unregister_worker_plugin("kill-once")
        client.run_on_scheduler(lambda dask_scheduler, n=old: setattr(
            dask_scheduler, "allowed_failures", n))
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    (rec,) = records
    assert rec["status"] == "failed" and "KilledWorker" in rec["error"]
    assert not (tmp_path / "grid" / "runs" / f"{key}.json").exists()
    assert not (tmp_path / "grid" / "checkpoints" / key).exists()
    # its FP32 pretraining finished and is cached: the next run sends the cell alone
    assert len(list((tmp_path / "grid" / "runs").glob("*.json"))) == 1
    client.wait_for_workers(2)


def test_a_cell_that_fails_on_a_worker_stops_the_grid_with_its_error(client, tmp_path):
    # a data folder the workers do not have: the configuration is valid, reading the data
    # fails on the worker, and the runner raises that error and cancels the other cells
    missing = dict(TINY, pretrain_epochs=0, quantizer="lsq", reg=None, dataset="idx",
                   data_dir=str(tmp_path / "not-on-the-workers"))
    with pytest.raises(MecrefError, match="not-on-the-workers.* does not exist"):
        run_grid([missing], SEEDS, tmp_path / "grid", client=client, progress=False)
    assert not list((tmp_path / "grid" / "runs").glob("*.json"))
    _assert_no_cells_left(client)


def test_a_result_may_only_write_under_checkpoints(tmp_path):
    for bad in ("runs/x.json", "../x", "/tmp/x", "checkpoints/../../x"):
        with pytest.raises(MecrefError, match="under checkpoints/"):
            _write_files(tmp_path, {bad: b"x"})
    _write_files(tmp_path, {"checkpoints/k/last.npz": b"x"})
    assert (tmp_path / "checkpoints" / "k" / "last.npz").read_bytes() == b"x"


def test_connect_refuses_a_bad_address_and_says_why_when_nothing_answers():
    with pytest.raises(MecrefError, match="tcp://HOST:8786"):
        connect("localhost:8786")
    with pytest.raises(TypeError, match="scheduler must be a str"):
        connect(8786)
    with pytest.raises(MecrefError, match="no Dask scheduler answered"):
        connect("tcp://127.0.0.1:9", timeout=1)


def _without_seconds(table):
    """A Markdown results table without its last column (seconds per epoch)."""
    return [line.rsplit("|", 2)[0] for line in table.splitlines() if line.startswith("|")]


def test_cli_table_on_the_scheduler_reproduces_the_local_pool_table(client, tmp_path, capsys):
    from mecref.cli import main
    argv = ["table", "--bits", "W2A2", "--forms", "exact", "--seeds", "0", "--epochs", "1",
            "--train-limit", "64", "--batch-size", "32", "--width", "4", "8", "8", "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "pool"), "--workers", "2"]) == 0
    pool = capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "cluster"),
                        "--scheduler", client.scheduler.address]) == 0
    on_cluster = capsys.readouterr().out
    assert len(_without_seconds(pool)) == 2 + 6    # FP32, STE, DoReFa+PACT, LSQ, LSQ+, exact
    assert _without_seconds(on_cluster) == _without_seconds(pool)
