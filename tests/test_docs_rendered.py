"""The documentation's numbers come from stored data, so that none can drift.

- Every generated page, rendered again from its committed data, equals the committed page:
  docs/export.md and docs/data.md (their measured blocks, `python3 scripts/doc_figures.py
  render` from docs/results/export.json and docs/results/data.json) and docs/benchmarks.md
  (`python -m benchmarks.report benchmarks/results/latest.json`). docs/results.md and the
  README's results block are checked the same way in tests/test_results_page.py. A hand edit
  or a stale number fails here; regenerate the data with the command the page names.
- The notebooks' prose states no measured number (the rule is in
  test_notebook_prose_states_no_measured_number).
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
import tokenize
from pathlib import Path

import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doc_figures = _load_script("doc_figures")


def _json(path):
    return json.loads((ROOT / path).read_text())


# ============================================================================ pages
@pytest.mark.parametrize("page, data, render", [
    ("docs/export.md", ("docs/results/export.json", "docs/results/onnx_agreement.json"),
     doc_figures.render_export),
    ("docs/data.md", ("docs/results/data.json",), doc_figures.render_data),
    ("README.md", ("docs/results/first_hour.json",), doc_figures.render_readme),
], ids=["export", "data", "readme"])
def test_page_is_rendered_from_its_committed_data(page, data, render):
    text = (ROOT / page).read_text()
    assert render(text, *(_json(d) for d in data)) == text, (
        f"{page} differs from its rendering: run `python3 scripts/doc_figures.py render` "
        f"(after remeasuring into {data} if the code changed)")


def test_benchmarks_page_is_rendered_from_its_committed_data():
    from benchmarks import report
    path = "benchmarks/results/latest.json"
    assert report.render(_json(path), json_path=path) == (ROOT / "docs/benchmarks.md").read_text()


def test_a_hand_edited_number_in_a_rendered_block_is_caught():
    """The check can fail: change one figure inside a block and rendering restores it."""
    text = (ROOT / "docs/data.md").read_text()
    doc = _json("docs/results/data.json")
    mean = f"{doc['bundled']['train_pixels']['mean']:.4f}"
    assert mean in text
    edited = text.replace(mean, "0.9999", 1)
    assert doc_figures.render_data(edited, doc) == text != edited


def test_every_block_must_be_marked_once():
    text = (ROOT / "docs/export.md").read_text()
    without = re.sub(r"<!-- rendered: export-tiny.*?<!-- end rendered: export-tiny -->", "", text,
                     flags=re.S)
    with pytest.raises(ValueError, match="export-tiny"):
        doc_figures.render_export(without, _json("docs/results/export.json"),
                                  _json("docs/results/onnx_agreement.json"))


def test_data_records_the_machine_and_the_command():
    for path in ("docs/results/export.json", "docs/results/data.json"):
        doc = _json(path)
        assert doc["command"].startswith("python3 scripts/doc_figures.py ")
        assert doc["machine"]["cpu"] and doc["machine"]["git"] and doc["seconds"] > 0


def test_border_counts_on_constructed_images():
    """Image 0 has a pixel above the threshold in its top row, image 1 in its left column,
    image 2 exactly at the threshold in its bottom row (not above), image 3 only inside."""
    x = np.zeros((4, 28, 28), np.uint8)
    thr = doc_figures.EDGE_THRESHOLD
    x[0, 0, 13], x[1, 20, 0], x[2, 27, 5], x[3, 1:27, 1:27] = thr + 1, 255, thr, 255
    assert doc_figures._edges(x) == dict(n=4, top_or_bottom=0.25, any_edge=0.5)


def test_data_measurement_renders_into_the_page(tmp_path):
    """The whole path at a small size: measure (3 calls per timing), write, render."""
    doc = doc_figures.measure_data(out=tmp_path / "data.json", reps=3)
    assert json.loads((tmp_path / "data.json").read_text()) == doc
    text = doc_figures.render_data((ROOT / "docs/data.md").read_text(), doc)
    assert f"mean {doc['bundled']['train_pixels']['mean']:.4f}" in text
    assert "medians of 3 calls" in text
    assert all(t["median_ms"] > 0 for k, t in doc["timings"].items() if k != "malloc_env")


def test_pixel_constants_are_the_measured_statistics():
    """PIXEL_MEAN and PIXEL_STD are the bundled training set's pixel mean and std, to four
    decimals, as measured into docs/results/data.json and recomputed here from the data."""
    from mecref.data import PIXEL_MEAN, PIXEL_STD, load_bundled
    stored = _json("docs/results/data.json")["bundled"]["train_pixels"]
    v = load_bundled().x_train.astype(np.float64) / 255.0
    assert (round(stored["mean"], 4), round(stored["std"], 4)) == (PIXEL_MEAN, PIXEL_STD)
    assert np.isclose(v.mean(), stored["mean"], rtol=0, atol=1e-12)
    assert np.isclose(v.std(), stored["std"], rtol=0, atol=1e-12)


def test_export_data_is_at_the_default_settings():
    """docs/export.md calls its runs "the default MEC-Quant settings": the stored settings must
    be TrainConfig's."""
    from mecref.train import TrainConfig
    d, s = TrainConfig(), _json("docs/results/export.json")["default"]["settings"]
    for key in ("quantizer", "reg", "reg_weight", "eps", "order", "lr", "first_last_bits", "seed"):
        assert s[key] == getattr(d, key), key
    assert tuple(s["width"]) == d.width


def test_readme_caption_states_the_settings_of_notebook_4():
    """The README's figure comes from notebook 4 at full size; its caption names the settings
    that the notebook's code passes."""
    src = (ROOT / "notebooks/src/04_training.py").read_text()
    mec = re.search(r'mec = dict\(reg="mec", reg_weight=([\d.]+), eps=([\d.]+)\)', src)
    epochs = re.search(r"epochs=1 if SMOKE else (\d+)", src)
    seed = re.search(r"common = dict\(.*seed=(\d+)", src)
    assert mec and epochs and seed
    readme = (ROOT / "README.md").read_text()
    caption = readme[readme.index("](docs/img/readme_w2a2.png)"):]
    caption = caption[:caption.index("\n\n", caption.index("*"))]
    assert f"beta {float(mec.group(1)):g}" in caption
    assert f"eps {float(mec.group(2)):g}" in caption
    assert f"{int(epochs.group(1))} epochs" in caption
    assert f"seed {int(seed.group(1))}" in caption


# ============================================================================ notebooks
# A number in the prose that looks like a measurement: a decimal (0.75), a percentage (90 %),
# or a multiplier (2x, 3 times, 2-fold).
CLAIM = re.compile(r"(?<![\w.])(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>%|per ?cent\b|x\b|×|times\b|-fold\b)"
                   r"|(?<![\w.])(?P<dec>\d+\.\d+)(?![\d.])")
# Definitional constants the prose may state although no code cell writes them, each with the
# check that derives it independently.
DEFINITIONAL = {
    ("01_quantizers", "0.28"): "the minimum of Swish x sigmoid(x), about -0.2785 (checked below)",
}


def _literals(sources):
    """The values of the numeric literals, and the string literals, of some code cells."""
    nums, strings = set(), []
    for src in sources:
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("%"))
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.NUMBER and not tok.string.endswith(("j", "J")):
                nums.add(round(float(tok.string.replace("_", "")), 12))
            elif tok.type == tokenize.STRING:
                strings.append(tok.string)
    return nums, strings


def _claims(path):
    """(cell index, number as written, whether a code cell sets it) for each number the rule
    looks at in the notebook's markdown."""
    nb = nbformat.read(path, as_version=4)
    nums, strings = _literals(c.source for c in nb.cells if c.cell_type == "code")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for m in CLAIM.finditer(cell.source):
            value = float(m.group("num") or m.group("dec"))
            if m.group("unit") in ("%", "per cent", "percent"):
                written = any(re.search(r"(?<![\d.])" + re.escape(m.group(0)), s) for s in strings)
                yield i, m.group(0), round(value / 100, 12) in nums or written
            else:
                yield i, m.group(0), round(value, 12) in nums


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_prose_states_no_measured_number(path):
    """Notebook prose may describe the outputs, but their numbers come from the cells.

    The rule: every decimal number, percentage or multiplier (``0.75``, ``90%``, ``2x``,
    ``3 times``) in a markdown cell, LaTeX included, is either a numeric literal of one of the
    notebook's code cells (an input the code sets, such as ``eps=2.0`` or the quantile
    ``0.9`` behind "the 90% smallest"; a percentage also matches when a code cell's string
    literal writes it) or a definitional constant in DEFINITIONAL, derived by its own test. A
    figure that only an output holds (an accuracy, a speed-up, a share) can therefore not be
    restated in the prose, where a re-run would leave it stale. Integers are not checked
    (bit-widths, sizes, section numbers and years are integers), nor are numbers in words.
    """
    bad = [(i, tok) for i, tok, ok in _claims(path)
           if not ok and (path.stem, tok) not in DEFINITIONAL]
    assert not bad, (f"{path.name}: markdown states numbers no code cell sets (cell, number): "
                     f"{bad}; print them from a cell, or describe without the number")


def test_the_rule_catches_a_restated_output(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("eps = 0.5\nprint(0.3 / eps)"),
                nbformat.v4.new_markdown_cell("At $\\epsilon = 0.5$ the ratio is 0.6, 2x the "
                                              "old one, 40% of the bound; 3x3 kernels.")]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert [(tok, ok) for _, tok, ok in _claims(path)] == [
        ("0.5", True), ("0.6", False), ("2x", False), ("40%", False)]


def test_definitional_constants():
    x = np.linspace(-5, 0, 500001)
    assert round(float(np.min(x / (1 + np.exp(-x)))), 2) == -0.28
    for (stem, tok) in DEFINITIONAL:
        assert any(tok == t for _, t, _ in _claims(ROOT / "notebooks" / f"{stem}.ipynb")), (stem, tok)
