"""The README's example runs, its commands are the ones CI runs, and its links and the site's pages exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import hf_freeze

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str):
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def test_the_readme_example_trains_with_the_bottom_half_frozen(tmp_path):
    (example,) = _blocks("python")
    script = tmp_path / "example.py"
    script.write_text(example)
    # Outside the source tree, as a user would run it; the checkout's hf_freeze is the one on the path.
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frozen layers: 2/4" in result.stderr + result.stdout  # the callback's summary line, from its log
    assert (tmp_path / "outputs" / "readme").is_dir()


def test_the_readme_test_command_is_what_ci_runs():
    commands = [line for block in _blocks("bash") for line in block.splitlines()]
    test_command = next(line for line in commands if "pytest" in line)
    assert test_command == 'pip install -q -c constraints.txt -e ".[dev]" && python -m pytest -q -n 2 -p no:cacheprovider'
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci
    assert "mkdocs build --strict" in ci
    quick_start = next(line for line in commands if "run_classification.py" in line)
    assert quick_start.endswith("python examples/run_classification.py configs/main.yaml --compare_full_finetuning")


def test_every_readme_link_to_a_file_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert "docs/options.md" in local and "LICENSE" in local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def _nav_pages(entries):
    for entry in entries:
        value = entry if isinstance(entry, str) else next(iter(entry.values()))
        if isinstance(value, list):
            yield from _nav_pages(value)
        else:
            yield value


def test_every_page_is_in_the_site_navigation_and_the_api_page_lists_the_public_api():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = set(_nav_pages(config["nav"]))
    pages = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").glob("*.md")}
    assert pages == nav, (pages - nav, nav - pages)
    api, tools = (ROOT / "docs" / "api.md").read_text(encoding="utf-8").split("## Hyperparameter search")
    documented = set(re.findall(r"^::: hf_freeze\.[\w.]*\.(\w+)$", api, re.MULTILINE))
    assert documented == set(hf_freeze.__all__)
    assert set(re.findall(r"^::: (hf_freeze\.tools\.\w+)\.(\w+)$", tools, re.MULTILINE)) == {
        ("hf_freeze.tools.hpo", "run_search"), ("hf_freeze.tools.hpo_stages", "LayerFidelityStages")}
