"""`hf-freeze` starts fast: `--help` imports neither torch nor transformers, `plan --help` no torch, and `validate`
without `--model` only what reading `TrainingArguments` needs, never the Trainer or a model's code.

Each command runs in a fresh interpreter, which reports the modules it imported (issue 18, item 4).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs `main(argv)` with its output silenced, then prints the imported module names as JSON.
RUNNER = """
import contextlib, io, json, sys
from hf_freeze.tools.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        status = main(sys.argv[1:])
    except SystemExit as exit:
        status = exit.code
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def _imported(*argv: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["status"], set(report["modules"])


def _heavy(modules, *names):
    return sorted(name for name in modules if name.split(".")[0] in names)


def test_help_imports_neither_torch_nor_transformers():
    status, modules = _imported("--help")
    assert status == 0
    assert "hf_freeze.tools.cli" in modules  # the worktree's package ran
    assert not _heavy(modules, "torch", "transformers"), _heavy(modules, "torch", "transformers")[:10]


@pytest.mark.parametrize("command", ["plan", "validate", "expand"])
def test_a_command_help_imports_no_torch(command):
    status, modules = _imported(command, "--help")
    assert status == 0
    assert not _heavy(modules, "torch"), _heavy(modules, "torch")[:10]


def _modeling(modules):
    return {name for name in modules if name.startswith("transformers.models.") and ".modeling_" in name}


def test_validate_without_a_model_imports_neither_the_trainer_nor_model_code():
    status, modules = _imported("validate", str(ROOT / "configs" / "adaptive.yaml"))
    assert status == 0
    assert "transformers.trainer" not in modules
    assert not [name for name in modules if name.startswith(("hf_freeze.integrations", "hf_freeze.model.discovery"))]
    # TrainingArguments itself imports some modeling code (transformers 5: auto and bloom): nothing beyond it.
    script = "import json, sys, transformers.training_args; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert _modeling(modules) <= _modeling(json.loads(result.stdout.strip().splitlines()[-1]))


def test_import_hf_freeze_is_light_and_knows_the_built_in_scores():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    script = (
        "import sys, hf_freeze; from hf_freeze.config import FreezeArguments; "
        "FreezeArguments(freeze_strategy='adaptive', freeze_layers=0.5, freeze_score='snr'); "
        "print(hf_freeze.SCORES.names(), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['weight_change',", "'grad_norm',", "'grad_norm_change',", "'snr']", "False"]
