"""The package builds as a wheel and an sdist that `twine check` accepts, and the installed wheel works on its own.

The wheel goes into a fresh virtual environment that sees the system's packages (so torch and transformers are not
downloaded) and runs from a folder outside the source tree, so what is tested is the installed copy.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", "build", "dist", "outputs", "runs", "site", ".venv")

TINY_RUN = textwrap.dedent(
    """
    import sys
    import torch
    import hf_freeze
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from hf_freeze import FreezeCallback

    assert hf_freeze.__file__.startswith(sys.prefix), hf_freeze.__file__  # the installed copy, not a checkout
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(config)
    before = model.bert.encoder.layer[0].output.dense.weight.detach().clone()
    data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    args = TrainingArguments(output_dir="out", max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[FreezeCallback(freeze_strategy="bottom", freeze_layers=0.5)]).train()
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, before)  # frozen: unchanged
    assert model.bert.encoder.layer[3].output.dense.weight.requires_grad
    print("tiny run ok")
    """
)


def _run(command, **kwargs):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # no checkout on the path
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_installs_into_a_fresh_environment_and_runs(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)  # build from a copy: the build writes egg-info next to the code
    dist = tmp_path / "dist"
    # Without isolation the build uses the installed setuptools instead of downloading one.
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(dist), str(source)])
    (wheel,) = dist.glob("hf_freeze-*.whl")
    (sdist,) = dist.glob("hf_freeze-*.tar.gz")
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])

    environment = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(environment)
    python = environment / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    help_text = _run([str(environment / "bin" / "hf-freeze"), "--help"], cwd=work).stdout
    assert "plan" in help_text and "validate" in help_text
    (work / "tiny_run.py").write_text(TINY_RUN)
    assert "tiny run ok" in _run([str(python), "tiny_run.py"], cwd=work).stdout
