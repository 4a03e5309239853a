"""Wall time of one small grid on the local process pool and on a 2-worker Dask LocalCluster,
whether the two caches agree bit for bit, and the bytes a cell sends over the wire
(docs/cluster.md).

    PYTHONPATH=$PWD OPENBLAS_NUM_THREADS=1 python3 scripts/cluster_bench.py --out /tmp/cluster_bench

The grid: the main table at W2A2 with MEC-Quant's exact form (FP32, STE, DoReFa+PACT, LSQ,
LSQ+, MEC-Quant) over ``--seeds``, every QAT cell starting from a one-epoch FP32 pretraining of
its seed (the standard protocol), on the bundled data. Each half starts from an empty folder.

Bytes per cell are the pickled sizes (protocol 5, as distributed serialises a dict of bytes) of
what :mod:`mecref.cluster` sends: to the worker, the task's arguments (the cell's configuration,
plus its pretraining's result for a QAT cell); back, the cell's result (its record and every
file of its checkpoint folder), rebuilt from the runner's cache, which holds exactly what came
back.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np


# What may differ between two runs of one cell (when, where, how long; whether it came from
# the cache), left out when two grid folders are compared (tests/test_cluster.py uses these too)
_VOLATILE = {"pid", "finished_at", "seconds", "seconds_per_epoch", "cpu", "from_cache"}
_VOLATILE_EPOCH = {"seconds", "samples_per_s"}


def _stable(rec):
    rec = {k: v for k, v in rec.items() if k not in _VOLATILE}
    rec["history"] = [{k: v for k, v in h.items() if k not in _VOLATILE_EPOCH}
                      for h in rec["history"]]
    if isinstance(rec.get("config"), dict):    # a checkpoint's meta: where init_from was read
        rec["config"] = {k: v for k, v in rec["config"].items() if k != "init_from"}
    return rec


def _cache(d: Path) -> dict:
    """Every file of a grid folder's cache, with what may differ between two runs removed:
    run records (JSON), checkpoint arrays (exact bytes and dtype) and checkpoint metadata."""
    out = {}
    for p in sorted(Path(d).rglob("*")):
        rel = p.relative_to(d).as_posix()
        if not p.is_file() or rel == "grid.json" or p.name.startswith("."):
            continue
        if p.suffix == ".json":
            out[rel] = _stable(json.loads(p.read_text()))
        elif p.suffix == ".npz":
            with np.load(p) as z:
                meta = json.loads(bytes(z["__meta__"]).decode("utf-8"))
                out[rel] = dict(meta=_stable(meta), arrays={
                    k: (str(z[k].dtype), z[k].shape, z[k].tobytes())
                    for k in z.files if k != "__meta__"})
        else:
            out[rel] = p.read_bytes()
    return out


def _result(d: Path, key: str) -> dict:
    """A cell's result as mecref.cluster.train_cell returned it, rebuilt from the cache."""
    rec = json.loads(Path(d, "runs", f"{key}.json").read_text())
    files = {p.relative_to(d).as_posix(): p.read_bytes()
             for p in sorted(Path(d, "checkpoints", key).rglob("*")) if p.is_file()
             and not p.name.startswith(".") and not p.name.endswith(".tmp")}
    return dict(record=rec, files=files)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="empty folder for the two grids")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--environ", nargs="+", choices=["mecref", "dask"], default=["mecref", "dask"],
                    help="the cluster runs, one per environment of its workers: "
                         "mecref.cluster.worker_environ(), or Dask's default (malloc trim at "
                         "64 kB) (default: both, in this order)")
    args = ap.parse_args(argv)
    import dask
    from distributed import Client, LocalCluster

    from mecref.cluster import worker_environ

    from mecref.experiments import _digest, main_grid, pretrain_cell, run_grid
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} must be empty or absent")
    configs = main_grid(epochs=args.epochs, bits=[(2, 2)], forms=["exact"],
                        train_limit=args.train_limit, pretrain_epochs=args.pretrain_epochs)

    load = os.getloadavg()
    t0 = time.perf_counter()
    run_grid(configs, args.seeds, out / "pool", workers=2, progress=False)
    t_pool = time.perf_counter() - t0

    t_start, t_cluster = {}, {}
    for name in args.environ:     # the workers' environment: mecref's, or Dask's default
        environ = {"distributed.nanny.pre-spawn-environ": worker_environ()} if name == "mecref" \
            else {}
        t0 = time.perf_counter()
        with dask.config.set(environ), LocalCluster(n_workers=2, threads_per_worker=1,
                                                    processes=True, dashboard_address=None) \
                as cluster, Client(cluster) as client:
            t_start[name] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            records = run_grid(configs, args.seeds, out / f"cluster-{name}", client=client,
                               progress=False)
            t_cluster[name] = round(time.perf_counter() - t0, 1)

    d = out / f"cluster-{args.environ[0]}"
    sent, back = [], []
    pre_keys = set()
    for rec in records:
        full = rec["config"]
        pre = None
        if full.get("pretrain_epochs"):
            pkey = _digest(pretrain_cell(full))
            pre_keys.add(pkey)
            pre = _result(d, pkey)
        sent.append(len(pickle.dumps((full, pre), protocol=5)))
        back.append(len(pickle.dumps(_result(d, rec["key"]), protocol=5)))
    for pkey in sorted(pre_keys):
        full = json.loads(Path(d, "runs", f"{pkey}.json").read_text())["config"]
        sent.append(len(pickle.dumps((full, None), protocol=5)))
        back.append(len(pickle.dumps(_result(d, pkey), protocol=5)))
    pool = _cache(out / "pool")
    same = all(_cache(out / f"cluster-{name}") == pool for name in args.environ)
    figures = dict(cells=len(sent), pool_s=round(t_pool, 1), cluster_start_s=t_start,
                   cluster_s=t_cluster, caches_equal=same,
                   sent_to_worker_bytes=dict(min=min(sent), max=max(sent)),
                   sent_back_bytes=dict(min=min(back), max=max(back)),
                   total_bytes=sum(sent) + sum(back), cpu=records[0]["cpu"],
                   argv=vars(args), load_before=load, load_after=os.getloadavg())
    print(json.dumps(figures, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
