"""The figures of docs/performance.md are generated from the committed benchmark results and must match them."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "performance.md"
sys.path.insert(0, str(ROOT / "benchmarks"))

report = pytest.importorskip("report")  # benchmarks/report.py, which needs no GPU and no matplotlib to render text


def test_the_page_matches_the_committed_results():
    text = PAGE.read_text()
    assert report.count_blocks(text) >= 8  # the tables and the figures are generated, not typed
    assert report.render_docs(text) == text, (
        "docs/performance.md differs from benchmarks/results: run `python benchmarks/report.py --docs docs/performance.md`"
    )


def test_every_figure_on_the_page_is_inside_a_generated_block():
    """Outside the generated blocks the page states no measured ratio: a typed figure would go stale unnoticed."""
    outside = re.sub(r"<!-- benchmark .*?<!-- /benchmark -->", "", PAGE.read_text(), flags=re.DOTALL)
    outside = re.sub(r"```.*?```", "", outside, flags=re.DOTALL)  # commands
    assert not re.findall(r"\b0\.\d\d\b", outside)


def test_a_changed_result_is_detected(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    saved = json.loads((results / "results.json").read_text())
    full = next(r for r in saved["results"] if r["config"] == "full" and r.get("status") == "ok")
    full["repeat_step_times"] = [2 * value for value in full["repeat_step_times"]]
    (results / "results.json").write_text(json.dumps(saved))
    text = PAGE.read_text()
    assert report.render_docs(text, root=str(results)) != text


def test_the_quality_page_matches_the_committed_runs():
    page = ROOT / "docs" / "quality.md"
    text = page.read_text()
    assert report.count_blocks(text) >= 2
    assert report.render_docs(text) == text, (
        "docs/quality.md differs from benchmarks/results/quality: run `python benchmarks/report.py --docs docs/quality.md`"
    )


@pytest.mark.parametrize("page", ["README.md", "docs/main-job.md"])
def test_the_main_job_cites_the_quality_study_as_committed(page):
    """The README's main-job section and the main job's page cite the study over seeds, not their single run."""
    text = (ROOT / page).read_text()
    assert "<!-- benchmark quality:headline -->" in text
    assert report.render_docs(text) == text, f"{page} differs from the committed runs: run `python benchmarks/report.py --docs {page}`"
