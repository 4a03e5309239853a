#!/usr/bin/env python3
"""Measure the figures of docs/export.md and docs/data.md into JSON, and render the pages'
measured blocks from that JSON.

    nice -n 15 python3 scripts/doc_figures.py export     # -> docs/results/export.json (a few minutes)
    nice -n 15 python3 scripts/doc_figures.py data       # -> docs/results/data.json (under a minute)
    nice -n 15 python3 scripts/doc_figures.py first-hour # -> docs/results/first_hour.json (the README's
                                                         #    two commands, timed: ~15 min on 2 cores)
    python3 scripts/doc_figures.py render                # rewrites the blocks in docs/export.md,
                                                         # docs/data.md and README.md
    python3 scripts/doc_figures.py render --check        # exit 1 if a page differs from its rendering

A page's measured block sits between ``<!-- rendered: NAME ... -->`` and
``<!-- end rendered: NAME -->``; ``render`` replaces what is between them and nothing else, so
the prose around it stays hand-written and the numbers come only from the JSON.
``tests/test_docs_rendered.py`` checks that each committed page equals its rendering.

``export`` trains the small CNN at each of W8A8, W4A4, W2A2 with TrainConfig's defaults (the
default MEC-Quant settings) for a short budget, exports it (:func:`mecref.export.export_checkpoint`,
as ``mecref export``) and compares the integer model with the fake-quant one
(:func:`mecref.export.evaluate_int`, as ``mecref eval-int --checkpoint``); it also measures the
tiny models of ``tests/test_export.py`` on the whole bundled test set. ``data`` measures the
bundled subset (class counts, pixel statistics, how many images reach the border), the full
Fashion-MNIST training set's pixel statistics where the data is installed, and the speed of the
augmentation and the batching. Both record the CPU model, the git commit and the wall times.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # this checkout's mecref, installed or not
from mecref.backend import MALLOC_ENV  # noqa: E402  (the allocator settings timed in `data`)
EXPORT_JSON = ROOT / "docs" / "results" / "export.json"
DATA_JSON = ROOT / "docs" / "results" / "data.json"
EXPORT_MD = ROOT / "docs" / "export.md"
DATA_MD = ROOT / "docs" / "data.md"
FIRST_HOUR_JSON = ROOT / "docs" / "results" / "first_hour.json"
README_MD = ROOT / "README.md"

# The tiny models of tests/test_export.py (TINY, WHOLE_SET, OTHERS), plus the DoReFa+PACT model
# with an 8-bit first and last layer: (quantizer, w_bits, a_bits, first_last_bits, train_limit).
TINY = dict(epochs=1, batch_size=64, lr=0.2, warmup_epochs=0.0, reg="mec", reg_weight=0.5,
            eps=0.5, width=(8, 16, 16))
TINY_MODELS = [("lsq", 8, 8, 8, 1024), ("lsq", 4, 4, 8, 1024), ("lsq", 2, 2, 8, 1024),
               ("ste", 4, 4, 8, 512), ("lsqplus", 2, 2, 8, 512), ("dorefa_pact", 2, 2, 4, 512),
               ("lsq", 1, 1, 1, 512), ("dorefa_pact", 2, 2, 8, 512)]
SCHEME_NAMES = dict(lsq="LSQ", ste="STE", lsqplus="LSQ+", dorefa_pact="DoReFa+PACT")
EDGE_THRESHOLD = 50      # a pixel above this value (of 255) counts as part of the item


# ============================================================================ machine
def machine() -> dict:
    import numpy
    from mecref.backend import cpu_model as _cpu_model
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return dict(cpu=_cpu_model(), logical_cpus=os.cpu_count(),
                usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                python=platform.python_version(), numpy=numpy.__version__, git=commit,
                started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                env={k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                    "MECREF_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")})


def _write(path, doc):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def _agreement(res) -> dict:
    keep = ("n", "pred_equal", "acc_int", "acc_fake", "stages", "chain")
    return {k: res[k] for k in keep if k in res}


# ============================================================================ export
def measure_export(out=EXPORT_JSON, epochs=1, train_limit=None, work=None) -> dict:
    """Train, export and compare; returns (and writes) the document."""
    from mecref.data import load_bundled
    from mecref.export import compare_int, evaluate_int, export_checkpoint, export_int_model
    from mecref.train import TrainConfig, train_small_cnn

    t_all = time.perf_counter()
    doc = dict(command="python3 scripts/doc_figures.py export"
               + (f" --epochs {epochs}" if epochs != 1 else "")
               + (f" --train-limit {train_limit}" if train_limit else ""),
               machine=machine())
    ds = load_bundled()
    x, y = ds.x_test, ds.y_test

    tiny_rows = []
    for q, w, a, fl, limit in TINY_MODELS:
        t0 = time.perf_counter()
        res = train_small_cnn(quantizer=q, w_bits=w, a_bits=a, first_last_bits=fl,
                              train_limit=limit, progress=False, **TINY)
        imodel = export_int_model(res.model)
        cmp = compare_int(res.model, imodel, x)
        row = dict(quantizer=q, w_bits=w, a_bits=a, first_last_bits=fl, train_limit=limit,
                   acc_int=float((cmp["pred_int"] == y).mean()),
                   acc_fake=float((cmp["pred_fake"] == y).mean()),
                   seconds=round(time.perf_counter() - t0, 2), **_agreement(cmp))
        tiny_rows.append(row)
        print(f"tiny {q} W{w}A{a} first/last {fl}: {row['pred_equal']}/{row['n']} predictions equal")
    doc["tiny"] = dict(config=dict(TINY, width=list(TINY["width"])), rows=tiny_rows)

    d = TrainConfig()
    settings = dict(quantizer=d.quantizer, reg=d.reg, reg_weight=d.reg_weight, eps=d.eps,
                    order=d.order, lr=d.lr, epochs=epochs, train_limit=train_limit,
                    first_last_bits=d.first_last_bits, width=list(d.width), seed=d.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(work) if work else Path(tmp)
        for B in (8, 4, 2):
            run = base / f"w{B}a{B}"
            t0 = time.perf_counter()
            res = train_small_cnn(w_bits=B, a_bits=B, epochs=epochs, train_limit=train_limit,
                                  checkpoint_dir=run, progress=False)
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, int_path = export_checkpoint(run / "last.npz", run / "int.npz")
            t_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = evaluate_int(int_path, checkpoint=run / "last.npz")
            t_eval = time.perf_counter() - t0
            row = dict(w_bits=B, a_bits=B, train_seconds=round(t_train, 1),
                       export_seconds=round(t_export, 2), eval_int_seconds=round(t_eval, 1),
                       test_acc_history=[h["test_acc"] for h in res.history], **_agreement(ev))
            rows.append(row)
            print(f"W{B}A{B}: acc int {row['acc_int']:.4f} fake {row['acc_fake']:.4f}, "
                  f"train {t_train:.0f} s, eval-int {t_eval:.0f} s")
    doc["default"] = dict(settings=settings, rows=rows)
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    if out:
        _write(out, doc)
    return doc


# ============================================================================ data
_TIMING = r"""
import json, sys, time
import numpy as np
from mecref.data import augment, iterate_batches, load_bundled, normalize
what, reps = sys.argv[1], int(sys.argv[2])
ds = load_bundled()
rng = np.random.default_rng(0)
if what == "augment_float32":
    x = np.ascontiguousarray(normalize(ds.x_train[:128]))
    f = lambda: augment(x, rng)
elif what == "augment_uint8":
    x = np.ascontiguousarray(ds.x_train[:128])
    f = lambda: augment(x, rng)
else:
    def f():
        for _ in iterate_batches(ds.x_train, ds.y_train, 128, rng):
            pass
for _ in range(max(3, reps // 10)):
    f()
t = []
for _ in range(reps):
    t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
print(json.dumps(dict(median_ms=float(np.median(t)) * 1e3, reps=reps)))
"""


def _time(what, reps, extra_env=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(extra_env or {}, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _TIMING, what, str(reps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _edges(x, thr=EDGE_THRESHOLD) -> dict:
    """Share of images with a pixel above thr in the top or bottom row, and in any border row
    or column."""
    top_bottom = (x[:, 0, :] > thr).any(axis=1) | (x[:, -1, :] > thr).any(axis=1)
    sides = (x[:, :, 0] > thr).any(axis=1) | (x[:, :, -1] > thr).any(axis=1)
    return dict(n=int(len(x)), top_or_bottom=float(top_bottom.mean()),
                any_edge=float((top_bottom | sides).mean()))


def _pixel_stats(x) -> dict:
    import numpy as np
    v = x.astype(np.float64) / 255.0
    return dict(n=int(len(x)), mean=float(v.mean()), std=float(v.std()))


def measure_data(out=DATA_JSON, reps=200) -> dict:
    import numpy as np
    from mecref import data
    from mecref.backend import MecrefError
    t_all = time.perf_counter()
    doc = dict(command="python3 scripts/doc_figures.py data", machine=machine(),
               edge_threshold=EDGE_THRESHOLD)
    ds = data.load_bundled()
    npz = Path(data.__file__).parent / "_datafiles" / "fashion_mnist_subset.npz"
    doc["bundled"] = dict(
        npz_bytes=npz.stat().st_size,
        train_per_class=[int(c) for c in np.bincount(ds.y_train, minlength=ds.n_classes)],
        test_per_class=[int(c) for c in np.bincount(ds.y_test, minlength=ds.n_classes)],
        train_pixels=_pixel_stats(ds.x_train), train_edges=_edges(ds.x_train))
    try:
        full = data.load_dataset("fashion-mnist")
        doc["full"] = dict(source=data.DEBIAN_FASHION_MNIST_DIR, train_pixels=_pixel_stats(full.x_train),
                           train_edges=_edges(full.x_train))
    except MecrefError as e:
        doc["full"] = dict(missing=str(e))
    doc["timings"] = dict(
        augment_float32_default=_time("augment_float32", reps),
        augment_float32_malloc=_time("augment_float32", reps, MALLOC_ENV),
        augment_uint8_default=_time("augment_uint8", reps),
        epoch_batches=dict(_time("epoch", max(5, reps // 10)), batch_size=128,
                           batches=len(ds.x_train) // 128),
        malloc_env=MALLOC_ENV)
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    if out:
        _write(out, doc)
    return doc


# ============================================================================ render
def _int(n):
    return f"{n:,}"


def _codes_where(stages):
    nd = sum(s["n_diff"] for s in stages.values())
    size = sum(s["size"] for s in stages.values())
    where = ", ".join(f"{t} {s['n_diff']}" for t, s in stages.items() if s["n_diff"])
    return f"{nd} of {_int(size)}" + (f" ({where})" if where else "")


def _code_stages(res, key):
    return {t: s for t, s in res[key].items() if t != "logits"}


def _max_code(res, key):
    return max(int(s["max_diff"]) for s in _code_stages(res, key).values())


def _model_name(r):
    name = f"{SCHEME_NAMES[r['quantizer']]} W{r['w_bits']}A{r['a_bits']}"
    return name + f", first/last {r['first_last_bits']} bit"


def render_export_blocks(doc) -> dict:
    """The Markdown of each rendered block of docs/export.md, by name."""
    m = doc["machine"]
    cfg = doc["tiny"]["config"]
    tiny = [f"The tests' tiny models (width ({', '.join(map(str, cfg['width']))}), "
            f"{cfg['epochs']} epoch, batch {cfg['batch_size']}, lr {cfg['lr']}, MEC regulariser "
            f"with weight {cfg['reg_weight']} and eps {cfg['eps']}), each compared on the whole "
            f"bundled test set ({_int(doc['tiny']['rows'][0]['n'])} images):", "",
            "| model | training images | identical predictions | codes differing, isolated "
            "(all stages) | end to end | max code difference (isolated / end to end) |",
            "|---|---|---|---|---|---|"]
    for r in doc["tiny"]["rows"]:
        tiny.append(f"| {_model_name(r)} | {_int(r['train_limit'])} | {r['pred_equal']}/{r['n']} "
                    f"| {_codes_where(_code_stages(r, 'stages'))} "
                    f"| {_codes_where(_code_stages(r, 'chain'))} "
                    f"| {_max_code(r, 'stages')} / {_max_code(r, 'chain')} |")

    s = doc["default"]["settings"]
    data = (f"{s['epochs']} epoch{'s' if s['epochs'] != 1 else ''} on "
            + ("the 12,000 bundled training images" if not s["train_limit"]
               else f"the first {_int(s['train_limit'])} bundled training images"))
    flags = f"--epochs {s['epochs']}" + (f" --train-limit {s['train_limit']}" if s["train_limit"] else "")
    rows = doc["default"]["rows"]
    n = rows[0]["n"]
    default = [f"**Default network** (width ({', '.join(map(str, s['width']))}), first and last "
               f"layer {s['first_last_bits']} bits) at the default MEC-Quant settings "
               f"(`mecref.train.TrainConfig`: `{s['quantizer']}` with `{s['reg']}`, order "
               f"{s['order']}, weight {s['reg_weight']}, eps {s['eps']}, lr {s['lr']}), {data}, "
               f"on the {_int(n)} bundled test images:", "",
               "```bash", "for B in 8 4 2; do",
               f"  mecref train --w-bits $B --a-bits $B {flags} --checkpoint-dir runs/w${{B}}a${{B}} --quiet",
               "  mecref export runs/w${B}a${B}/last.npz --out runs/w${B}a${B}/int.npz",
               "  mecref eval-int runs/w${B}a${B}/int.npz --checkpoint runs/w${B}a${B}/last.npz",
               "done", "```", "",
               "| model | test accuracy, integer / fake-quant | identical predictions | codes differing, "
               "isolated (all stages) | end to end | logits, max difference, isolated / end to end "
               "| `eval-int` time |",
               "|---|---|---|---|---|---|---|"]
    for r in rows:
        lg = f"{r['stages']['logits']['max_diff']:.2f} S / {r['chain']['logits']['max_diff']:.2f} S"
        default.append(f"| W{r['w_bits']}A{r['a_bits']} | {r['acc_int']:.4f} / {r['acc_fake']:.4f} "
                       f"| {r['pred_equal']}/{r['n']} | {_codes_where(_code_stages(r, 'stages'))} "
                       f"| {_codes_where(_code_stages(r, 'chain'))} | {lg} "
                       f"| {r['eval_int_seconds']:.0f} s |")
    default += ["", f"Measured by `{doc['command']}` (writes `docs/results/export.json`, which "
                f"also holds each stage's figures; {doc['seconds']:.0f} s in all, training "
                f"included) at git {str(m['git'])[:7]} on {m['cpu']} ({m['logical_cpus']} logical "
                f"CPUs, shared with other work{_threads(m)}). The accuracies are those of these short runs; "
                f"the match is what the table shows. End to end, a code that differs upstream "
                f"moves the logits by whole weight steps, which are many logit steps S; fed with "
                f"the fake model's `fc.in` codes (isolated), the integer logits differ by the last "
                f"shift's rounding (half an S at most) plus the fake model's own float32 rounding "
                f"of its logits."]
    return {"export-tiny": "\n".join(tiny), "export-default": "\n".join(default)}


def _codes_onnx(codes, n_images=None):
    nd = sum(c["n_diff"] for c in codes.values())
    if not nd:
        return "0"
    where = ", ".join(f"{t} {c['n_diff']}" for t, c in codes.items() if c["n_diff"])
    return f"{nd} ({where}" + (f"; {n_images} images)" if n_images is not None else ")")


def render_onnx_blocks(doc) -> dict:
    """The ONNX agreement and file-size tables of docs/export.md, from onnx_agreement.json."""
    rows = doc["rows"]
    o0 = rows[0]["onnx"]["narrow"]
    size = sum(c["size"] for c in o0["codes"].values())
    head = [f"ONNX Runtime {doc['versions']['onnxruntime']} (onnx {doc['versions']['onnx']}) on the "
            f"{_int(o0['n'])} bundled test images; made by `{doc['command']}`"
            + (f" ({doc['seconds']:.0f} s, git {str(doc['machine']['git'])[:7]}, "
               f"{doc['machine']['cpu']})" if "machine" in doc else "")
            + f". \"Codes\" are the codes of the {len(o0['codes'])} quantized layer inputs "
              f"({_int(size)} per model).", "",
            "| model | ONNX form | opset | accuracy ONNX / fake-quant / integer | identical predictions "
            "vs fake-quant, vs integer | codes differing vs fake-quant | logits vs fake-quant, max abs "
            "diff: all images / images with every code equal | codes differing vs integer | logits vs "
            "integer on images with every code equal, max diff (units of S) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r["model_config"]
        for form, o in r["onnx"].items():
            if form == "wide" and o["types"] == r["onnx"]["narrow"]["types"]:
                continue            # the same graph as the narrow form
            label = ("`--wide`" if form == "wide" else
                     "/".join(dict.fromkeys([o["types"]["conv2.input"], o["types"]["conv2.weight"]])))
            lg, li, n = o["logits"], o["logits_int"], o["n"]
            clean = "" if lg["clean"] == n else f" ({_int(lg['clean'])} images)"
            head.append(f"| W{cfg['w_bits']}A{cfg['a_bits']} | {label} | {o['opset']} "
                        f"| {o['acc_onnx']:.4f} / {o['acc_fake']:.4f} / {o['acc_int']:.4f} "
                        f"| {o['pred_equal']}/{n}, {o['pred_equal_int']}/{n} "
                        f"| {_codes_onnx(o['codes'], n - lg['clean'])} "
                        f"| {lg['max_abs']:.2g} / {lg['clean_max_abs']:.2g}{clean} "
                        f"| {_codes_onnx(o['codes_int'])} | {li['clean_max']:.2f} |")
    sizes = ["| model | ONNX, 2/4-bit types | ONNX, `--wide` | integer `.npz` (+ `.json` beside it) |",
             "|---|---|---|---|"]
    for r in rows:
        cfg = r["model_config"]
        sizes.append(f"| W{cfg['w_bits']}A{cfg['a_bits']} | {_int(r['onnx']['narrow']['bytes'])} B "
                     f"| {_int(r['onnx']['wide']['bytes'])} B | {_int(r['int_bytes'])} B "
                     f"(+ {_int(r['int_json_bytes'])} B) |")
    return {"export-onnx": "\n".join(head), "export-onnx-sizes": "\n".join(sizes)}


def _threads(m):
    """', OPENBLAS_NUM_THREADS=1' where the run set it, else ''."""
    v = (m.get("env") or {}).get("OPENBLAS_NUM_THREADS")
    return f", OPENBLAS_NUM_THREADS={v}" if v else ""


def _pct(v):
    return f"{100 * v:.1f} %"


def render_data_blocks(doc) -> dict:
    """The Markdown of each rendered block of docs/data.md, by name."""
    b = doc["bundled"]
    per_tr, per_te = set(b["train_per_class"]), set(b["test_per_class"])
    balance = (f"{_int(per_tr.pop())} training and {_int(per_te.pop())} test images for each of the "
               f"{len(b['train_per_class'])} classes" if len(per_tr) == 1 and len(per_te) == 1 else
               f"training images per class {b['train_per_class']}, test images {b['test_per_class']}")
    subset = (f"The subset holds {balance}; the `.npz` file is {b['npz_bytes'] / 1e6:.1f} MB "
              f"(`python3 scripts/doc_figures.py data`, `docs/results/data.json`).")
    bp, full = b["train_pixels"], doc["full"]
    stats = (f"Measured by `{doc['command']}` (`docs/results/data.json`): all pixels of the "
             f"bundled training set ({_int(bp['n'])} images) have mean {bp['mean']:.4f} and "
             f"standard deviation {bp['std']:.4f}")
    if "train_pixels" in full:
        fp = full["train_pixels"]
        stats += (f"; the full Fashion-MNIST training set ({_int(fp['n'])} images, "
                  f"`{full['source']}`) {fp['mean']:.4f} and {fp['std']:.4f}.")
    else:
        stats += "; the full training set was not installed when it ran."
    e = b["train_edges"]
    edges = (f"Measured by `{doc['command']}`: of the {_int(e['n'])} bundled training images, "
             f"{_pct(e['top_or_bottom'])} have a "
             f"pixel above {doc['edge_threshold']} (of 255) in the top or bottom row and "
             f"{_pct(e['any_edge'])} in some border row or column")
    if "train_edges" in full:
        fe = full["train_edges"]
        edges += (f"; of the full training set's {_int(fe['n'])}, {_pct(fe['top_or_bottom'])} and "
                  f"{_pct(fe['any_edge'])}")
    edges += "."
    t, m = doc["timings"], doc["machine"]
    env = " ".join(f"{k}={v}" for k, v in t["malloc_env"].items())
    speed = (f"Speed (`{doc['command']}`, medians of {t['augment_float32_default']['reps']} calls "
             f"({t['epoch_batches']['reps']} for the epoch), each measurement in its own process; "
             f"{m['cpu']}, {m['logical_cpus']} logical CPUs shared with "
             f"other work{_threads(m)}, git {str(m['git'])[:7]}): one view of a (128, 1, 28, 28) float32 batch "
             f"{t['augment_float32_default']['median_ms']:.2f} ms with the default allocator and "
             f"{t['augment_float32_malloc']['median_ms']:.2f} ms with `{env}` (which keeps glibc from "
             f"mapping each fresh buffer of that size anew); a (128, 28, 28) uint8 "
             f"batch {t['augment_uint8_default']['median_ms']:.2f} ms. One epoch of "
             f"`iterate_batches` over the bundled training set ({t['epoch_batches']['batches']} "
             f"batches of {t['epoch_batches']['batch_size']}) takes "
             f"{t['epoch_batches']['median_ms']:.1f} ms.")
    return {"data-subset": subset, "data-stats": stats, "data-edges": edges, "data-speed": speed}


# ============================================================================ the first hour
def measure_first_hour(out=FIRST_HOUR_JSON, only=None) -> dict:
    """Run the README's two commands as a new user would (``mecref train`` in an empty folder;
    ``python3 -m pytest`` in the repository), timed as whole processes, and keep what the main
    job printed last and wrote. The installs are not timed (they depend on the network).
    ``only="main_job"`` or ``"suite"`` measures one and keeps the other from ``out``."""
    t0 = time.perf_counter()
    doc = json.loads(Path(out).read_text()) if only and Path(out).is_file() else {}
    doc.update(command="python3 scripts/doc_figures.py first-hour", machine=machine())
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if only in (None, "main_job"):
        doc["main_job"] = _measure_main_job(env)
    if only in (None, "suite"):
        doc["suite"] = _measure_suite(env)
    doc["wall_s"] = time.perf_counter() - t0
    _write(out, doc)
    return doc


def _measure_main_job(env) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "mecref", "train"], cwd=tmp,
                           env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        (run,) = Path(tmp, "runs").iterdir()      # its default run folder, runs/<date-time>
        history = json.loads((run / "history.json").read_text())
        return dict(command="mecref train", wall_s=wall,
                    last_lines=r.stdout.rstrip().splitlines()[-2:],
                    summary=(run / "summary.txt").read_text().strip(), epochs=len(history),
                    final=history[-1], machine=machine(),
                    files=sorted(p.name for p in run.iterdir() if not p.name.startswith(".")))


def _measure_suite(env) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    tail = r.stdout.rstrip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", tail)
    return dict(command="python3 -m pytest", wall_s=time.perf_counter() - t, returncode=r.returncode,
                last_line=tail, passed=int(passed.group(1)) if passed else None, machine=machine())


def _minutes(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _where(m):
    load = m.get("load_average")
    return (f"commit {str(m['git'])[:7]}; {m['cpu']}, {m['usable_cpus']} cores"
            + (f", load average {load[0]:.1f} at the start" if load else ""))


def render_readme_blocks(doc) -> dict:
    job = doc["main_job"]
    lines = [f"Measured by `{doc['command']}` ({_where(job['machine'])}): `{job['command']}` "
             f"took {_minutes(job['wall_s'])} of wall time and ended with", "",
             "```", *job["last_lines"], "```", "",
             f"The run folder held {', '.join(job['files'])}."]
    suite = doc.get("suite")
    if suite:
        lines += ["", f"`{suite['command']}` (the test command, after its install; "
                  f"{_where(suite['machine'])}) took {_minutes(suite['wall_s'])} and ended with "
                  f"`{suite['last_line']}`."]
    return {"first-hour": "\n".join(lines)}


def render_readme(text, doc) -> str:
    return render_page(text, render_readme_blocks(doc))


_BLOCK = re.compile(r"(<!-- rendered: (?P<name>[\w-]+)[^\n]*-->\n)(?P<body>.*?)(<!-- end rendered: (?P=name) -->)",
                    re.S)


def render_page(text, blocks) -> str:
    """``text`` with the body of each marked block replaced by ``blocks[name]``; every name in
    ``blocks`` must be marked in the page exactly once, and every marked block must be known."""
    found = [m.group("name") for m in _BLOCK.finditer(text)]
    if sorted(found) != sorted(blocks):
        raise ValueError(f"the page's rendered blocks {sorted(found)} are not {sorted(blocks)}")
    return _BLOCK.sub(lambda m: m.group(1) + blocks[m.group("name")] + "\n" + m.group(4), text)


def render_export(text, doc, onnx_doc) -> str:
    return render_page(text, {**render_export_blocks(doc), **render_onnx_blocks(onnx_doc)})


def render_data(text, doc) -> str:
    return render_page(text, render_data_blocks(doc))


ONNX_JSON = ROOT / "docs" / "results" / "onnx_agreement.json"
PAGES = ((EXPORT_MD, (EXPORT_JSON, ONNX_JSON), render_export), (DATA_MD, (DATA_JSON,), render_data),
         (README_MD, (FIRST_HOUR_JSON,), render_readme))


def render_all(check=False) -> int:
    stale = 0
    for page, data, fn in PAGES:
        text = page.read_text()
        new = fn(text, *(json.loads(d.read_text()) for d in data))
        if new != text:
            stale += 1
            if check:
                print(f"{page.relative_to(ROOT)} differs from its rendering from "
                      + ", ".join(str(d.relative_to(ROOT)) for d in data))
            else:
                page.write_text(new)
                print(f"rendered {page.relative_to(ROOT)}")
    return 1 if check and stale else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("export", help="train, export and compare; write docs/results/export.json")
    e.add_argument("--epochs", type=int, default=1)
    e.add_argument("--train-limit", type=int, default=None)
    e.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder)")
    e.add_argument("--out", default=str(EXPORT_JSON))
    d = sub.add_parser("data", help="measure the data pages' figures; write docs/results/data.json")
    d.add_argument("--reps", type=int, default=200)
    d.add_argument("--out", default=str(DATA_JSON))
    f = sub.add_parser("first-hour", help="time the README's two commands; write docs/results/first_hour.json")
    f.add_argument("--only", choices=("main_job", "suite"), default=None,
                   help="measure one of the two; keep the other from --out")
    f.add_argument("--out", default=str(FIRST_HOUR_JSON))
    r = sub.add_parser("render", help="rewrite the measured blocks of docs/export.md and docs/data.md")
    r.add_argument("--check", action="store_true", help="only report pages that differ (exit 1)")
    args = p.parse_args(argv)
    if args.what == "export":
        measure_export(args.out, args.epochs, args.train_limit, args.work)
    elif args.what == "data":
        measure_data(args.out, args.reps)
    elif args.what == "first-hour":
        measure_first_hour(args.out, args.only)
    else:
        return render_all(args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
