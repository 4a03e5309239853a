#!/usr/bin/env python3
"""Build the tutorial notebooks from their plain-Python sources, and optionally run them.

    python3 scripts/build_notebooks.py                      # all: notebooks/src/*.py -> notebooks/*.ipynb
    python3 scripts/build_notebooks.py --execute            # ... and run each at full size, with outputs
    python3 scripts/build_notebooks.py --execute 02_coding_length

A source ``notebooks/src/NN_name.py`` is a Python file cut into cells by markers (the "percent"
format of jupytext, read here by a few lines of code):

- ``# %% [markdown]`` starts a markdown cell; each of its lines is a comment, ``# text`` (or a
  bare ``#`` for an empty line), and the comment marks are stripped;
- ``# %%`` (optionally followed by a title) starts a code cell, copied as it is, except that a
  commented IPython line magic (``# %matplotlib inline``; also ``%timeit``, ``%time``,
  ``%load_ext``, ``%autoreload``, ``%config``) loses its comment mark, so the source stays
  valid Python;
- blank lines around a cell are dropped; nothing but blank lines may come before the first marker.

The notebook ``notebooks/NN_name.ipynb`` (nbformat 4) gets the cells in order, with fixed cell
ids so that a rebuild changes nothing that did not change. ``--execute`` runs it with nbclient
in a fresh ``python3`` kernel, in ``notebooks/``, at FULL size (``MECREF_SMOKE`` removed from the
environment, ``MPLBACKEND`` too, so the kernel's inline backend draws the figures), saves it with
its outputs, and prints each notebook's run time. ``tests/test_notebooks.py`` runs every
notebook at smoke size and checks that each .ipynb holds its source's cells.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
KERNEL = "python3"

_MARKER = re.compile(r"^# %%(?!%)(.*)$")
_MAGIC = re.compile(r"^# (%(?:matplotlib|timeit|time|load_ext|autoreload|config)\b.*)$")


def parse_source(text, name="<source>"):
    """Cut a percent-format source into cells.

    Returns
    -------
    list of (cell_type, source) with cell_type "markdown" or "code" and source a str.
    """
    cells, kind, lines = [], None, []

    def close():
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if kind is not None:
            cells.append((kind, "\n".join(lines)))
        lines.clear()

    for lineno, line in enumerate(text.splitlines(), 1):
        marker = _MARKER.match(line)
        if marker:
            close()
            kind = "markdown" if "[markdown]" in marker.group(1) else "code"
            continue
        if kind is None:
            if line.strip():
                raise ValueError(f"{name}:{lineno}: text before the first cell marker "
                                 f"('# %%' or '# %% [markdown]'): {line!r}")
            continue
        if kind == "markdown":
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"{name}:{lineno}: a markdown cell's lines must be comments "
                                 f"('# text' or '#'), got {line!r}")
            line = line[2:] if line.startswith("# ") else line[1:]
        else:
            magic = _MAGIC.match(line)
            if magic:
                line = magic.group(1)
        lines.append(line)
    close()
    if not cells:
        raise ValueError(f"{name}: no cells (a source is cut into cells by '# %%' markers)")
    return cells


def build(source):
    """The notebook (nbformat 4 node, no outputs) of one source file."""
    path = Path(source)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, text) in enumerate(parse_source(path.read_text(), path.name)):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(text, id=f"cell-{i:02d}"))
    nbformat.validate(nb)
    return nb


def execute(nb, workdir=NOTEBOOKS, timeout=600):
    """Run ``nb`` in place in a fresh kernel started in ``workdir`` (the current process's
    environment); a cell that raises stops the run with nbclient's CellExecutionError."""
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def _sources(names):
    every = sorted(SOURCES.glob("[0-9][0-9]_*.py"))
    if not names:
        return every
    chosen = []
    for name in names:
        stem = Path(name).stem
        hits = [p for p in every if p.stem == stem]
        if not hits:
            known = ", ".join(p.stem for p in every)
            raise SystemExit(f"no notebook source named {name!r} in {SOURCES} (have: {known})")
        chosen += hits
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*",
                        help="notebooks to build, e.g. 01_quantizers (default: all in notebooks/src)")
    parser.add_argument("--execute", action="store_true",
                        help="run each notebook at full size and save it with its outputs")
    args = parser.parse_args(argv)
    if args.execute:
        os.environ.pop("MECREF_SMOKE", None)
        os.environ.pop("MPLBACKEND", None)
    for source in _sources(args.names):
        nb = build(source)
        target = NOTEBOOKS / f"{source.stem}.ipynb"
        if args.execute:
            t0 = time.perf_counter()
            execute(nb)
            print(f"{target.name}: ran in {time.perf_counter() - t0:.1f} s", flush=True)
        nbformat.write(nb, target)
        print(f"wrote {target.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
