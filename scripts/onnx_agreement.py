"""Export training checkpoints to mecref's integer format and to ONNX (2/4-bit types and the
wide int8/uint8 form), run each ONNX file with ONNX Runtime on the bundled test set, and write
the agreement with the fake-quant and the integer model, and the file sizes, as JSON.

    python scripts/onnx_agreement.py runs/w8a8/last.npz runs/w4a4/last.npz runs/w2a2/last.npz \\
        --work runs/onnx --out docs/results/onnx_agreement.json

Prints a Markdown table of the same figures; docs/export.md renders its ONNX tables from the
JSON (`python3 scripts/doc_figures.py render`). The JSON records the CPU model, the git commit
and the wall time of the run (the exports and evaluations, not the training).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from mecref.backend import cpu_model as _cpu_model
from mecref.export import export_checkpoint
from mecref.onnx_export import evaluate_onnx, export_checkpoint_onnx


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(checkpoint, work):
    """One checkpoint: both exports, both ONNX forms evaluated against fake-quant and integer."""
    work.mkdir(parents=True, exist_ok=True)
    imodel, int_path = export_checkpoint(checkpoint, work / "int.npz")
    cfg = imodel.meta["model_config"]
    row = dict(checkpoint=str(checkpoint), model=f"W{cfg['w_bits']}A{cfg['a_bits']} {cfg['quantizer']}",
               model_config=cfg, int_bytes=int_path.stat().st_size,
               int_json_bytes=int_path.with_suffix(".json").stat().st_size, onnx={})
    for form, narrow in (("narrow", True), ("wide", False)):
        proto, path = export_checkpoint_onnx(checkpoint, work / f"{form}.onnx", narrow=narrow)
        res = evaluate_onnx(path, checkpoint=checkpoint, int_model=int_path)
        types = json.loads({p.key: p.value for p in proto.metadata_props}["mecref.quantizers"])
        row["onnx"][form] = dict(
            bytes=path.stat().st_size, opset=res["opset"], n=res["n"],
            acc_onnx=res["acc_onnx"], acc_fake=res["acc_fake"], acc_int=res["acc_int"],
            pred_equal=res["pred_equal"], pred_equal_int=res["pred_equal_int"],
            logits=res["logits"], logits_int=res["logits_int"],
            codes=res["codes"], codes_int=res["codes_int"],
            types={f"{t['layer']}.{t['tensor']}": t["type"] + (" + Clip" if t["clip"] else "") for t in types})
    return row


def _codes(codes):
    nd = sum(c["n_diff"] for c in codes.values())
    where = ", ".join(f"{t} {c['n_diff']}" for t, c in codes.items() if c["n_diff"])
    return f"{nd} of {sum(c['size'] for c in codes.values()):,}" + (f" ({where})" if where else "")


def markdown(rows):
    """Two tables: agreement per model and ONNX form, and file sizes."""
    out = ["| model | ONNX form | opset | accuracy ONNX / fake-quant / integer | identical predictions (vs fake-quant, vs integer) "
           "| codes differing vs fake-quant | logits vs fake-quant, max abs diff: all images / images with every code equal "
           "| codes differing vs integer | logits vs integer, max diff in units of S, images with every code equal |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for form, o in r["onnx"].items():
            lg, li = o["logits"], o["logits_int"]
            out.append(f"| {r['model']} | {form} | {o['opset']} | {o['acc_onnx']:.4f} / {o['acc_fake']:.4f} / {o['acc_int']:.4f} "
                       f"| {o['pred_equal']}/{o['n']}, {o['pred_equal_int']}/{o['n']} | {_codes(o['codes'])} "
                       f"| {lg['max_abs']:.2g} / {lg['clean_max_abs']:.2g} ({lg['clean']}) | {_codes(o['codes_int'])} "
                       f"| {li['clean_max']:.2f} ({li['clean']}) |")
    out += ["", "| model | ONNX, 2/4-bit types | ONNX, int8/uint8 (--wide) | integer .npz (+ .json) |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['onnx']['narrow']['bytes']:,} B | {r['onnx']['wide']['bytes']:,} B "
                   f"| {r['int_bytes']:,} B (+ {r['int_json_bytes']:,} B) |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="training checkpoints (last.npz)")
    p.add_argument("--work", required=True, help="folder for the exported files, one subfolder per checkpoint")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    import onnx
    import onnxruntime
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    rows = [measure(Path(c), Path(args.work) / Path(c).parent.name) for c in args.checkpoints]
    doc = dict(command="python scripts/onnx_agreement.py " + " ".join(args.checkpoints)
               + f" --work {args.work} --out {args.out}",
               versions=dict(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
                             python=platform.python_version()),
               machine=dict(cpu=_cpu_model(), logical_cpus=os.cpu_count(), git=_git_commit(),
                            started=started.isoformat(timespec="seconds")),
               seconds=round(time.perf_counter() - t0, 1), rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(markdown(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
