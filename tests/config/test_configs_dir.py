"""Every training YAML shipped in configs/ parses as a FreezeTrainingArguments file."""

from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser

from hf_freeze import FreezeTrainingArguments

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAINING_YAMLS = sorted(
    path for path in CONFIGS.rglob("*.yaml")
    # accelerate launch configs live beside them and are read by accelerate, not by HfArgumentParser; search
    # spaces are read by `hf-freeze hpo` (tests/tools/test_hpo.py)
    if "compute_environment" not in yaml.safe_load(path.read_text()) and path.parent.name != "search_spaces"
)


def test_the_shipped_search_space_loads():
    from hf_freeze.tools.hpo_space import load_search_space

    load_search_space(str(CONFIGS / "search_spaces" / "hpo_space.yaml"))


@pytest.mark.parametrize("path", TRAINING_YAMLS, ids=[p.name for p in TRAINING_YAMLS])
def test_config_parses(path):
    (args,) = HfArgumentParser(FreezeTrainingArguments).parse_yaml_file(str(path))
    assert args.freeze_strategy != "none"
