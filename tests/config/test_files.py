"""Configuration files: a YAML of defaults that the command line overrides, strategy included."""

import pytest
from transformers import HfArgumentParser

from hf_freeze import FreezeConfigError, FreezeTrainingArguments
from hf_freeze.config import parse_args_with_config_file


@pytest.fixture
def bottom_yaml(tmp_path):
    path = tmp_path / "main.yaml"
    path.write_text(f"output_dir: {tmp_path}\nfreeze_strategy: bottom\nfreeze_layers: 0.5\nfreeze_embeddings: false\n")
    return str(path)


def _parse(*argv):
    (args,) = parse_args_with_config_file(HfArgumentParser(FreezeTrainingArguments), list(argv))
    return args


@pytest.mark.parametrize("strategy", ["none", "lisa", "bitfit"])
def test_changing_the_strategy_on_the_command_line_drops_the_files_options_for_its_strategy(bottom_yaml, strategy, capsys):
    args = _parse(bottom_yaml, "--freeze_strategy", strategy)
    assert args.freeze_strategy == strategy and args.freeze_layers is None
    assert args.freeze_embeddings is False  # an option every strategy reads is kept
    assert "dropped the file's freeze_layers" in capsys.readouterr().err


def test_options_the_new_strategy_reads_are_kept(bottom_yaml):
    assert _parse(bottom_yaml, "--freeze_strategy=top").freeze_layers == 0.5


def test_an_option_given_on_the_command_line_is_never_dropped(bottom_yaml):
    with pytest.raises(FreezeConfigError, match="'none' does not use `freeze_layers`"):
        _parse(bottom_yaml, "--freeze_strategy", "none", "--freeze_layers", "2")


@pytest.mark.parametrize("misspelled", [["--freeze_stratgy", "bottom"], ["--freeze-stratgy=bottom"]])
def test_a_misspelled_option_on_the_command_line_is_named_before_the_others_are_judged(tmp_path, misspelled):
    """Without the misspelled `freeze_strategy`, `freeze_layers` would be refused as unused by 'none': the user
    must hear about the misspelling, with the name they meant."""
    parser = HfArgumentParser(FreezeTrainingArguments)
    with pytest.raises(FreezeConfigError, match=r"'freeze_stratgy' \(did you mean 'freeze_strategy'\?\)") as error:
        parse_args_with_config_file(parser, ["--output_dir", str(tmp_path), *misspelled, "--freeze_layers", "1"])
    assert error.value.fields == ("freeze_stratgy",)
