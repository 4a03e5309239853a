"""The tutorial notebooks: each runs top to bottom at smoke size, and each committed .ipynb holds
exactly the cells of its source in notebooks/src (scripts/build_notebooks.py builds one from the
other). Also the source parser and the shared figure style."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib as mpl
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOURCES = sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT = 120   # seconds per cell; smoke-size cells take well under one


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks",
                                                  ROOT / "scripts" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_notebooks = _load_builder()


def _ids(paths):
    return [p.stem for p in paths]


# ----------------------------------------------------------------------------- running
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_at_smoke_size(path, monkeypatch):
    """Execute an in-memory copy in a fresh python3 kernel with MECREF_SMOKE=1; any cell that
    raises fails the test. The committed file is never written."""
    monkeypatch.setenv("MECREF_SMOKE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel's inline backend, no display
    before = path.read_bytes()
    nb = nbformat.read(path, as_version=4)
    build_notebooks.execute(nb, workdir=path.parent, timeout=CELL_TIMEOUT)   # raises on an error
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------- sources
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_matches_its_source(path):
    """The .ipynb holds its source's cells (type and text), in order: rebuild with
    `python3 scripts/build_notebooks.py --execute NAME` after editing notebooks/src/NAME.py."""
    source = ROOT / "notebooks" / "src" / f"{path.stem}.py"
    assert source.exists(), f"{path.name} has no source {source.relative_to(ROOT)}"
    want = build_notebooks.parse_source(source.read_text(), source.name)
    nb = nbformat.read(path, as_version=4)
    have = [(c.cell_type, c.source) for c in nb.cells]
    assert [k for k, _ in have] == [k for k, _ in want], "cell types differ"
    for i, ((_, got), (_, expected)) in enumerate(zip(have, want)):
        assert got == expected, f"cell {i} of {path.name} differs from {source.name}"


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_source_is_built_and_reads_the_smoke_flag(source):
    """Every source has its notebook, and its first code cell sets SMOKE from MECREF_SMOKE
    (so the test above runs it small)."""
    assert (ROOT / "notebooks" / f"{source.stem}.ipynb").exists(), \
        f"{source.name} was never built: python3 scripts/build_notebooks.py --execute {source.stem}"
    cells = build_notebooks.parse_source(source.read_text(), source.name)
    first_code = next(text for kind, text in cells if kind == "code")
    assert 'SMOKE = os.environ.get("MECREF_SMOKE") == "1"' in first_code


def test_there_are_notebooks():
    assert NOTEBOOKS and SOURCES


# ----------------------------------------------------------------------------- the parser
def test_parse_source_cuts_cells_and_strips_comment_marks():
    text = ("\n# %% [markdown]\n# # Title\n#\n# Some *text*.\n\n"
            "# %%\n# %matplotlib inline\nx = 1  # a comment\n\n\ny = 2\n\n"
            "# %% a titled code cell\nprint(x + y)\n")
    cells = build_notebooks.parse_source(text)
    assert cells == [("markdown", "# Title\n\nSome *text*."),
                     ("code", "%matplotlib inline\nx = 1  # a comment\n\n\ny = 2"),
                     ("code", "print(x + y)")]


def test_parse_source_keeps_ordinary_comments_in_code():
    cells = build_notebooks.parse_source("# %%\n# %d percent, not a magic\nz = 3\n")
    assert cells == [("code", "# %d percent, not a magic\nz = 3")]


@pytest.mark.parametrize("text, message", [
    ("x = 1\n# %%\ny = 2\n", "before the first cell marker"),
    ("# %% [markdown]\nnot a comment\n", "must be comments"),
    ("\n\n", "no cells"),
])
def test_parse_source_rejects_malformed_sources(text, message):
    with pytest.raises(ValueError, match=message):
        build_notebooks.parse_source(text, "bad.py")


def test_build_gives_a_valid_notebook_with_fixed_cell_ids(tmp_path):
    source = tmp_path / "99_demo.py"
    source.write_text("# %% [markdown]\n# Hello\n\n# %%\nprint('hi')\n")
    nb = build_notebooks.build(source)
    nbformat.validate(nb)
    assert [c.id for c in nb.cells] == ["cell-00", "cell-01"]
    assert [c.cell_type for c in nb.cells] == ["markdown", "code"]
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert build_notebooks.build(source) == nb      # a rebuild changes nothing


# ----------------------------------------------------------------------------- the figure style
def test_style_context_applies_the_style_and_restores_the_settings():
    from mecref.plotting import PALETTE, STYLE, style_context
    before = dict(mpl.rcParams)
    with style_context():
        assert mpl.rcParams["axes.spines.top"] is False
        assert mpl.rcParams["axes.prop_cycle"].by_key()["color"][:2] == list(PALETTE[:2])
        assert mpl.rcParams["legend.frameon"] is STYLE["legend.frameon"]
    assert dict(mpl.rcParams) == before


def test_use_style_sets_every_key():
    from mecref.plotting import STYLE, use_style
    with mpl.rc_context():
        use_style()
        for key, value in STYLE.items():
            if key != "axes.prop_cycle":
                want = list(value) if isinstance(value, tuple) else value
                assert mpl.rcParams[key] == want, key
