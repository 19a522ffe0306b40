"""The figures of the README and the docs: every image they show exists, and the README shows the figures the
comparison and the benchmark draw (AUROC against context; time and memory against length) under the names the
scripts write, so rerunning them redraws what the README shows."""

import re
from pathlib import Path

import pytest

from benchmarks.compare import auroc_figure_name
from benchmarks.report import level_figure_name
from benchmarks.suite import CHECK_LEVEL


ROOT = Path(__file__).resolve().parents[1]
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_image_a_document_shows_exists(document):
    for link in IMAGE.findall(document.read_text(encoding="utf-8")):
        assert (document.parent / link).is_file(), f"{document.name} shows {link}, which does not exist"


def test_the_readme_shows_auroc_against_context_and_time_and_memory_against_length():
    images = IMAGE.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert f"docs/figures/{auroc_figure_name('independent')}" in images
    assert f"docs/figures/{level_figure_name('train')}" in images
    assert f"docs/figures/{level_figure_name(CHECK_LEVEL)}" in images
