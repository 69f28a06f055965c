"""The documentation site publishes the repository files its pages link to outside docs/ (docs/hooks/), so that
`mkdocs build --strict` (`.ci/run`) checks those links and the quality page shows its chart."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location("repository_files", ROOT / "docs" / "hooks" / "repository_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linked_benchmark_results_are_published_and_the_links_point_at_them():
    hook = _hook()
    published = hook._linked_files(ROOT / "docs")
    # The quality page's chart and result files, the performance and search pages' charts and tables.
    for path in ("benchmarks/results/quality/quality.png", "benchmarks/results/quality/runs.jsonl",
                 "benchmarks/results/quality/timing.json", "benchmarks/results/step_time.png",
                 "benchmarks/results/hpo_fidelity.md", "configs/search_spaces/hpo_space.yaml"):
        assert path in published, path
    page = SimpleNamespace(file=SimpleNamespace(src_uri="quality.md"))
    markdown = ("![chart](../benchmarks/results/quality/quality.png) [runs](../benchmarks/results/quality/runs.jsonl)"
                " [gone](../benchmarks/results/missing.png) [page](performance.md)")
    rewritten = hook.on_page_markdown(markdown, page, {"docs_dir": str(ROOT / "docs")}, None)
    assert rewritten == ("![chart](benchmarks/results/quality/quality.png) [runs](benchmarks/results/quality/runs.jsonl)"
                         " [gone](../benchmarks/results/missing.png) [page](performance.md)")  # a broken link stays broken
    nested = SimpleNamespace(file=SimpleNamespace(src_uri="guide/quality.md"))
    assert hook.on_page_markdown("![c](../../benchmarks/results/step_time.png)", nested,
                                 {"docs_dir": str(ROOT / "docs")}, None) == "![c](../benchmarks/results/step_time.png)"
