"""The package builds as a wheel and an sdist that `twine check` accepts, and the installed wheel works on its own.

The wheel goes into a fresh virtual environment that sees the packages of the interpreter running the tests (so
torch and transformers are not downloaded) and runs from a folder outside the source tree, so what is tested is the
installed copy.
"""

import os
import shutil
import site
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


def _environment_with_the_running_packages(environment: Path) -> Path:
    """A new virtual environment whose Python also finds the packages of this one; returns its interpreter.

    `system_site_packages=True` would give it the packages of the base installation, not those of a virtual
    environment the tests run in (where the README's command installs torch). Instead a `.pth` file adds this
    interpreter's site-packages folders as site folders (their own `.pth` files read too, as here), after the
    environment's own: the wheel installed there is the hf_freeze it imports, even next to an editable install.
    """
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    folders = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lines = [f"import site; site.addsitedir({folder!r})" for folder in dict.fromkeys(folders)]
    (Path(purelib) / "running_interpreter_packages.pth").write_text("\n".join(lines) + "\n")
    return python


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
    python = _environment_with_the_running_packages(environment)
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    help_text = _run([str(environment / "bin" / "hf-freeze"), "--help"], cwd=work).stdout
    assert "plan" in help_text and "validate" in help_text
    (work / "tiny_run.py").write_text(TINY_RUN)
    assert "tiny run ok" in _run([str(python), "tiny_run.py"], cwd=work).stdout


def test_every_extra_that_allows_peft_before_0_22_keeps_transformers_below_5_24():
    # transformers 5.24 refuses adapters (`add_adapter`, `load_adapter`) from peft < 0.22: without the cap,
    # `pip install hf_freeze[peft]` picks the newest transformers next to peft 0.21 and adapters fail to load.
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    checked = []
    for extra, requirements in extras.items():
        specifiers = {Requirement(text).name: Requirement(text).specifier for text in requirements}
        if "peft" in specifiers and specifiers["peft"].contains("0.21.2"):
            checked.append(extra)
            assert "transformers" in specifiers and not specifiers["transformers"].contains("5.24.0"), extra
    assert {"peft", "examples", "bench", "dev"} <= set(checked)
