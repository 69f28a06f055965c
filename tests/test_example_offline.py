"""The examples run offline unless the command names a Hub model, and an `HF_HUB_OFFLINE` set by the user wins."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROBE = "import os, sys; from offline import offline_unless_hub_model; offline_unless_hub_model(sys.argv[1:]); " \
        "print(os.environ.get('HF_HUB_OFFLINE'))"


def hub_offline(*argv, **env):
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], cwd=EXAMPLES, env=environment,
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


@pytest.mark.parametrize("form", ["separate", "equals", "yaml"])
def test_a_hub_model_id_leaves_the_network_on_and_a_local_model_turns_it_off(tmp_path, form):
    def argv(model):
        if form == "separate":
            return ["--model_name_or_path", model, "--output_dir", "out"]
        if form == "equals":
            return [f"--model_name_or_path={model}"]
        config = tmp_path / "run.yaml"
        config.write_text(f"model_name_or_path: {model}\noutput_dir: out\n")
        return [config, "--learning_rate", "1e-4"]

    assert hub_offline(*argv("sentence-transformers/all-MiniLM-L6-v2")) == "None"
    assert hub_offline(*argv(tmp_path)) == "1"


def test_no_model_given_runs_offline_and_the_users_setting_wins(tmp_path):
    assert hub_offline("--output_dir", "out") == "1"  # the default models are local
    assert hub_offline("--output_dir", "out", HF_HUB_OFFLINE="0") == "0"
    assert hub_offline("--model_name_or_path", "org/model", HF_HUB_OFFLINE="1") == "1"
