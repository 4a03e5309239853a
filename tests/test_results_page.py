"""docs/results.md and the README's results block are rendered from the stored data: a hand
edit or a stale number fails here (regenerate with `python -m mecref.study_report render`)."""
from pathlib import Path

from mecref import study_report

ROOT = Path(__file__).resolve().parents[1]


def test_results_page_is_rendered_from_the_stored_data():
    assert study_report.render(ROOT / "docs") == (ROOT / "docs" / "results.md").read_text()


def test_readme_results_block_is_rendered_from_the_stored_data():
    readme = (ROOT / "README.md").read_text()
    assert study_report.README_START in readme and study_report.README_END in readme
    assert study_report.render_readme(readme, ROOT / "docs") == readme


def test_every_figure_the_page_names_is_committed():
    import re
    text = (ROOT / "docs" / "results.md").read_text()
    for target in re.findall(r"\]\((results/[^)]+\.png)\)", text):
        assert (ROOT / "docs" / target).is_file(), target
