"""Mutation check: does the test suite catch real one-line bugs?

Each mutation below replaces one exact piece of mecref's source with a plausible bug, in a
temporary copy of the repository, and runs only the tests named for it there. A mutation is
*caught* when those tests fail. The check fails unless every mutation is caught, and unless
the same tests pass on the unmutated copy (the baseline), so a failure is the mutation's doing.

    python3 scripts/mutation_check.py              # baseline, then every mutation
    python3 scripts/mutation_check.py --list       # names, what each breaks, where, which tests
    python3 scripts/mutation_check.py --only NAME  # one mutation (repeatable)

Updating a target. A mutation names its target by the exact source text (``old``), not by file
or line, and it is looked for in every ``mecref/**/*.py``: moving code between modules does not
break it, but ``old`` must occur exactly once in the package. When a refactor rewrites the
line, the check stops with "mutation target not found" (or "ambiguous"): find the line that now
does the same job, copy it exactly (indentation included) into ``old``, write the same bug
into ``new``, and run ``--only NAME`` to see the named tests catch it. Never drop a mutation
because its target moved.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis",
                                "*.egg-info", "build", "dist", ".ipynb_checkpoints")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str           # the bug, in words
    old: str            # exact source text, found once in mecref/
    new: str
    tests: tuple        # pytest arguments (files, node ids, -k expressions)


M = Mutation
MUTATIONS = [
    # --- the training objective (docs/derivations.md T1)
    M("reg-grad-dropped", "the regulariser's feature gradient never reaches the network",
      "model.backward(losses.softmax_cross_entropy_backward(ce_cache, 1.0), dfeats, dtaps)",
      "model.backward(losses.softmax_cross_entropy_backward(ce_cache, 1.0), None, dtaps)",
      ("tests/test_objective.py",)),
    M("reg-grad-sign", "the MEC regulariser's gradient has the wrong sign",
      "    return entropy.mec_loss_backward(cache, dL)", "    return entropy.mec_loss_backward(cache, -dL)",
      ("tests/test_objective.py",)),
    M("moe-reg-grad-sign", "the MOE regulariser ascends its loss for the first view",
      "(entropy.moe_coding_length_backward(c1, -dL / 2)[0],",
      "(entropy.moe_coding_length_backward(c1, dL / 2)[0],",
      ("tests/test_objective.py",)),
    # --- optimiser and schedule (N7, N8)
    M("nesterov", "Nesterov's look-ahead uses the velocity twice",
      "p -= lr * (g + mu * v if self.nesterov else v)", "p -= lr * (v + mu * v if self.nesterov else v)",
      ("tests/test_optim_losses.py",)),
    M("no-decay-ignored", "weight decay also shrinks BatchNorm and quantizer params",
      "if wd and key not in layer.no_decay:", "if wd:",
      ("tests/test_optim_losses.py",)),
    M("warmup-off-by-one", "the warm-up starts at lr 0 and never reaches the base rate",
      "return base * (t + 1) / Tw", "return base * t / Tw",
      ("tests/test_optim_losses.py",)),
    M("ce-grad-unscaled", "the cross-entropy gradient is a sum, not the mean's",
      "d *= xp.asarray(dL, dtype=p.dtype) / N", "d *= xp.asarray(dL, dtype=p.dtype)",
      ("tests/test_optim_losses.py",)),
    # --- quantizers (Q1-Q8)
    M("round-half-up", "codes round half up instead of half to even",
      "xp.rint(code, out=code)", "xp.floor(code + 0.5, out=code)",
      ("tests/test_quant.py",)),
    M("ste-mask-open", "the STE mask drops its upper edge (an open range)",
      "inside = v == code", "inside = (v == code) & (v < Qp)",
      ("tests/test_quant.py",)),
    M("lsq-grad-scale", "LSQ's step gradient scale forgets Qp",
      "g = 1.0 / math.sqrt((x.size // s.size) * Qp)", "g = 1.0 / math.sqrt(x.size // s.size)",
      ("tests/test_quant.py",)),
    M("lsq-init", "LSQ's initial step forgets the square root of Qp",
      "m * (2.0 / math.sqrt(Qp))", "m * (2.0 / Qp)",
      ("tests/test_quant.py", "tests/test_nn.py")),
    M("quant-param-broadcast",
      "a step of the wrong shape is no longer refused (NumPy's broadcast error instead)",
      "ok = np.broadcast_shapes(tuple(p.shape), tuple(x.shape)) == tuple(x.shape)", "ok = True",
      ("tests/test_fuzz_api.py", "-k", "bad_steps")),
    # --- coding length, MEC, Taylor, MOE (E1-E5)
    M("coding-length-mu", "the coding length's mu uses m alone",
      "    mu = (m + d) / 2\n    if _check_flag(\"normalize\", normalize):\n        Zc, r = _unit_rows(Z, \"Z\")",
      "    mu = m / 2\n    if _check_flag(\"normalize\", normalize):\n        Zc, r = _unit_rows(Z, \"Z\")",
      ("tests/test_entropy.py",)),
    M("unit-rows-backward", "the normalisation's backward adds the radial part instead of removing it",
      "dZ -= Z * row_dot(Z, dZ)[:, None]", "dZ += Z * row_dot(Z, dZ)[:, None]",
      ("tests/test_entropy.py",)),
    M("mec-grad-transpose", "the exact MEC gradient uses M^-1 where M^-T belongs (the spec's slip)",
      "dZ1, dZ2 = F.T @ Z2c, F @ Z1c", "dZ1, dZ2 = F @ Z2c, F.T @ Z1c",
      ("tests/test_entropy.py",)),
    M("taylor-neumann-sign", "the Taylor gradient's Neumann sum alternates the wrong way",
      "S += (-1) ** j * P", "S += (-1) ** (j + 1) * P",
      ("tests/test_entropy.py",)),
    M("moe-gate-softmax", "the soft gate's softmax backward adds the mean instead of removing it",
      "dS = pi * (dpi - xp.sum(pi * dpi, axis=1, keepdims=True)) / tau",
      "dS = pi * (dpi + xp.sum(pi * dpi, axis=1, keepdims=True)) / tau",
      ("tests/test_entropy.py",)),
    # --- quantized layers (N9)
    M("layer-act-grad-scale", "a layer's LSQ activation step gradient scale counts the whole batch",
      "return 1.0 / math.sqrt((x.size // x.shape[0]) * Qp)", "return 1.0 / math.sqrt(x.size * Qp)",
      ("tests/test_nn.py", "-k", "by_hand")),
    M("layer-pact-init", "PACT's initial clip is one LSQ step instead of Qp steps",
      'p["alpha"][...] = Qp * quant.lsq_init_step(x, bits, signed=False)',
      'p["alpha"][...] = quant.lsq_init_step(x, bits, signed=False)',
      ("tests/test_nn.py", "-k", "by_hand")),
    # --- layers (N1-N5)
    M("im2col-offsets", "im2col swaps the kernel's row and column offsets",
      "strides=(sC, sH, sW, sN, stride * sH, stride * sW))",
      "strides=(sC, sW, sH, sN, stride * sH, stride * sW))",
      ("tests/test_nn.py",)),
    M("col2im-offsets", "col2im adds a slab at the transposed offset",
      "rows[c, :, i:i + span_h:stride] += slabs[i, j, c]",
      "rows[c, :, i:i + span_h:stride] += slabs[j, i, c]",
      ("tests/test_nn.py",)),
    M("batchnorm-mean-term", "BatchNorm's backward forgets that the mean depends on every input",
      "dx[c] -= (a[c] * dbeta[c] / M)[:, None]", "dx[c] -= (a[c] * dbeta[c] / (M + 1))[:, None]",
      ("tests/test_nn.py",)),
    M("batchnorm-running-var", "BatchNorm's running variance is the biased batch variance",
      "rv += (r * M / (M - 1)) * var.astype(rv.dtype)", "rv += r * var.astype(rv.dtype)",
      ("tests/test_nn.py",)),
    M("maxpool-route", "max pooling sends the gradient of a right-column winner to the left",
      "xp.multiply(mask_right[c], dy5[c], out=dx6[c, ..., 1])",
      "xp.multiply(mask_left[c], dy5[c], out=dx6[c, ..., 1])",
      ("tests/test_nn.py",)),
    M("fused-bn-pool-sign", "the fused BatchNorm + pool pools the max even where gamma < 0",
      "s = xp.where(gamma < 0, -1.0, 1.0)", "s = xp.where(gamma < 0, 1.0, 1.0)",
      ("tests/test_nn.py", "-k", "fused")),
    M("fused-bn-pool-route", "the fused BatchNorm + pool sends a window's gradient to the transposed position",
      "xp.add(dxs[c, a, b], xp.multiply(win[c, a, b], g[c], out=routed[c]),",
      "xp.add(dxs[c, a, b], xp.multiply(win[c, b, a], g[c], out=routed[c]),",
      ("tests/test_nn.py", "-k", "fused")),
    # --- integer export (X4)
    M("export-round-shift", "requantisation rounds ties to odd",
      "q -= tie & ((q & 1) == 1)", "q -= tie & ((q & 1) == 0)",
      ("tests/test_export.py", "-k", "round_shift")),
    M("export-requant-offset", "requantisation subtracts the folded BatchNorm offset",
      "V = M.astype(np.int64) * acc.astype(np.int64) + C ",
      "V = M.astype(np.int64) * acc.astype(np.int64) - C ",
      ("tests/test_export.py", "-k", "untrained")),
    M("export-round-floor", "requantisation truncates instead of rounding",
      "    q = (V + half) >> n\n", "    q = V >> n\n",
      ("tests/test_export.py", "-k", "untrained")),
    # --- checkpoints and resume
    M("resume-drops-momentum", "a resumed run starts with zero momentum",
      "            opt.load_state_dict(o_state)\n", "            pass\n",
      ("tests/test_train.py", "-k", "resume")),
]


def find_target(root: Path, mut: Mutation) -> Path:
    """The one file under root/mecref holding mut.old once; SystemExit otherwise."""
    hits = []
    for path in sorted((root / "mecref").rglob("*.py")):
        n = path.read_text().count(mut.old)
        hits += [path] * n
    if not hits:
        raise SystemExit(f"mutation {mut.name}: mutation target not found in mecref/: {mut.old!r}\n"
                         f"(the code it targets was rewritten: update the target, see this script's "
                         f"docstring)")
    if len(hits) > 1:
        raise SystemExit(f"mutation {mut.name}: target is ambiguous, found {len(hits)} times "
                         f"({', '.join(str(h.relative_to(root)) for h in hits)}): {mut.old!r}")
    return hits[0]


def run_tests(root: Path, tests, timeout: float):
    """pytest on the copy, in file order, stopping at the first failure: (passed, seconds, tail)."""
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "-p", "no:random_order", *tests]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, "timed out (counted as caught only if tests fail)"
    tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
    return out.returncode == 0, time.perf_counter() - t0, "\n".join(tail)


def check_imports_copy(root: Path):
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "import mecref; print(mecref.__file__)"], cwd=root,
                         env=env, capture_output=True, text=True)
    where = Path(out.stdout.strip()).resolve()
    if out.returncode != 0 or root.resolve() not in where.parents:
        raise SystemExit(f"the copy's tests would not import the copy's mecref (got {where}): "
                         f"{out.stderr.strip()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutation")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not first check that the named tests pass unmutated")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    args = ap.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"--only: unknown mutation(s) {unknown}; --list shows them")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    targets = {m.name: find_target(ROOT, m).relative_to(ROOT) for m in chosen}  # fail fast
    if args.list:
        for m in chosen:
            print(f"{m.name:24s} {targets[m.name]}: {m.what}\n{'':24s} tests: {' '.join(m.tests)}")
        return 0

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mecref-mutation-") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(ROOT, root, ignore=IGNORE)
        check_imports_copy(root)
        if not args.skip_baseline:
            groups = sorted({m.tests for m in chosen})
            for tests in groups:
                ok, secs, tail = run_tests(root, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: {'pass' if ok else 'FAIL'} ({secs:.1f} s)", flush=True)
                if not ok:
                    print(tail)
                    print("the named tests fail without any mutation: fix them first")
                    return 1
        missed = []
        for m in chosen:
            path = root / targets[m.name]
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                passed, secs, tail = run_tests(root, m.tests, args.timeout)
            finally:
                path.write_text(original)
            print(f"{'MISSED' if passed else 'caught'}  {m.name:24s} ({secs:5.1f} s)  {m.what}", flush=True)
            if passed:
                missed.append(m.name)
    total = time.perf_counter() - t_start
    print(f"{len(chosen) - len(missed)}/{len(chosen)} mutations caught in {total:.0f} s")
    if missed:
        print(f"not caught (the named tests pass with the bug in): {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
