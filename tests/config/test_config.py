"""Configuration: YAML and CLI parsing, and every class of bad value refused before training."""

import textwrap

import pytest
from transformers import HfArgumentParser

from hf_freeze import FreezeArguments, FreezeCallback, FreezeConfigError, FreezeTrainingArguments
from hf_freeze.policies import STRATEGIES

from tiny import build, trainer_for, training_kwargs


def parse_yaml(tmp_path, text, dataclass=FreezeTrainingArguments):
    path = tmp_path / "args.yaml"
    path.write_text(textwrap.dedent(text))
    return HfArgumentParser(dataclass).parse_yaml_file(str(path))[0]


def test_one_yaml_file_holds_training_args_and_freeze_fields(tmp_path):
    args = parse_yaml(
        tmp_path,
        f"""
        output_dir: {tmp_path}/out
        learning_rate: 3.0e-4
        freeze_strategy: bottom
        freeze_layers: 2
        freeze_head: false
        """,
    )
    assert isinstance(args, FreezeTrainingArguments)
    assert args.learning_rate == 3e-4
    assert (args.freeze_strategy, args.freeze_layers, args.freeze_head) == ("bottom", 2, False)
    assert isinstance(args.freeze_layers, int)


def test_command_line_parsing_with_lists_and_fractions():
    (args,) = HfArgumentParser(FreezeArguments).parse_args_into_dataclasses(
        ["--freeze_strategy", "layers", "--freeze_layer_indices", "0", "-1", "--freeze_embeddings", "false"]
    )
    assert args.freeze_layer_indices == [0, -1] and args.freeze_embeddings is False
    (args,) = HfArgumentParser(FreezeArguments).parse_args_into_dataclasses(
        ["--freeze_strategy", "top", "--freeze_layers", "0.25"]
    )
    assert args.freeze_layers == 0.25
    (args,) = HfArgumentParser(FreezeArguments).parse_args_into_dataclasses(
        ["--freeze_strategy", "top", "--freeze_layers", "3"]
    )
    assert args.freeze_layers == 3 and isinstance(args.freeze_layers, int)


def test_every_field_has_help_text():
    import dataclasses

    for field in dataclasses.fields(FreezeArguments):
        assert field.name.startswith("freeze_")
        assert len(field.metadata.get("help", "")) > 20, field.name


def test_unknown_yaml_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match="freeze_stratgy"):
        parse_yaml(tmp_path, "output_dir: out\nfreeze_stratgy: bottom\n")


def test_unknown_constructor_options_suggest_the_right_name():
    with pytest.raises(FreezeConfigError, match=r"'freeze_layer'.*did you mean 'freeze_layers'"):
        FreezeCallback(freeze_strategy="bottom", freeze_layer=2)


BAD_VALUES = [
    (dict(freeze_strategy="bottm"), r"`freeze_strategy` must be one of 'none', 'bottom', .* \(got 'bottm'\)"),
    (dict(freeze_strategy="bottom"), r"`freeze_layers` must be set"),
    (dict(freeze_strategy="bottom", freeze_layers=1.5), r"`freeze_layers` must be .*fraction in \(0, 1\) \(got 1\.5\)"),
    (dict(freeze_strategy="bottom", freeze_layers=-2), r"`freeze_layers` must be .* \(got -2\)"),
    (dict(freeze_strategy="bottom", freeze_layers="half"), r"`freeze_layers` must be a number.*\(got 'half'\)"),
    (dict(freeze_strategy="interval", freeze_interval=0), r"`freeze_interval` must be an integer >= 1 \(got 0\)"),
    (dict(freeze_strategy="interval", freeze_interval=2, freeze_interval_offset=2), r"`freeze_interval_offset` must be between 0 and"),
    (dict(freeze_strategy="bottom", freeze_layers=2, freeze_interval=3), r"'bottom' does not use `freeze_interval`.*read by \['interval'\]"),
    (dict(freeze_strategy="layers"), r"`freeze_layer_indices` must be a non-empty list"),
    (dict(freeze_strategy="layers", freeze_layer_indices="0,1"), r"`freeze_layer_indices` must be a list of integers"),
    (dict(freeze_strategy="pattern"), r"needs `freeze_patterns`.*or both"),
    (dict(freeze_strategy="pattern", freeze_patterns=["model.(layers"]), r"`freeze_patterns` must be a valid regular expression"),
    (dict(freeze_strategy="pattern", freeze_patterns=["a.*"], freeze_head=True), r"`freeze_head` cannot be set with `freeze_strategy` 'pattern'"),
    (dict(freeze_strategy="head_only", freeze_head=False), r"`freeze_head` cannot be set with `freeze_strategy` 'head_only'"),
    (dict(freeze_strategy="trlx", freeze_num_layers_unfrozen=-2), r"`freeze_num_layers_unfrozen` must be -1 .* \(got -2\)"),
    (dict(freeze_strategy="llama_factory", freeze_trainable_layers=0), r"`freeze_trainable_layers` must be a non-zero integer"),
    (dict(freeze_strategy="top", freeze_layers=1, freeze_embeddings="yes"), r"`freeze_embeddings` must be true, false or unset \(got 'yes'\)"),
]


@pytest.mark.parametrize("options,message", BAD_VALUES, ids=[str(i) for i in range(len(BAD_VALUES))])
def test_bad_values_fail_at_configuration_time(options, message):
    with pytest.raises(FreezeConfigError, match=message):
        FreezeArguments(**options)


def test_bad_values_in_yaml_fail_when_the_file_is_parsed(tmp_path):
    with pytest.raises(FreezeConfigError, match=r"`freeze_strategy` must be one of .* \(got 'bottm'\)"):
        parse_yaml(tmp_path, "output_dir: out\nfreeze_strategy: bottm\n")


MODEL_DEPENDENT = [
    (dict(freeze_strategy="bottom", freeze_layers=9), r"`freeze_layers` must be between 0 and the model's 4 layers \(got 9\)"),
    (dict(freeze_strategy="layers", freeze_layer_indices=[0, 4]), r"`freeze_layer_indices` must be indices between -4 and 3"),
    (dict(freeze_strategy="layers", freeze_layer_indices=[1, -3]), r"name each layer at most once"),
    (dict(freeze_strategy="pattern", freeze_trainable_patterns=["encoder.*"]), r"`freeze_trainable_patterns` must be a pattern that matches at least one parameter.*\(got 'encoder\.\*'\)"),
    (dict(freeze_strategy="interval", freeze_interval=8, freeze_interval_offset=5), r"`freeze_interval_offset` must be smaller than the model's 4 layers"),
    (dict(freeze_strategy="bottom", freeze_layers=0.1), r"selects at least one of the 4 layers"),
    (dict(freeze_strategy="trlx", freeze_num_layers_unfrozen=5), r"at most the model's 4 layers"),
    (dict(freeze_layer_paths=["bert.encoder.layers"]), r"`freeze_layer_paths` entry 'bert.encoder.layers' is not a submodule"),
]


@pytest.mark.parametrize("options,message", MODEL_DEPENDENT, ids=[str(i) for i in range(len(MODEL_DEPENDENT))])
def test_model_dependent_errors_are_raised_when_the_trainer_is_built(tmp_path, options, message):
    with pytest.raises(FreezeConfigError, match=message):
        trainer_for(build("bert"), FreezeTrainingArguments(**training_kwargs(tmp_path), **options), [FreezeCallback()])


def test_tied_embeddings_and_head_cannot_be_set_apart(tmp_path):
    with pytest.raises(FreezeConfigError, match=r"`freeze_embeddings` \(True\) and `freeze_head` \(False\) contradict"):
        trainer_for(
            build("gpt2"), FreezeTrainingArguments(**training_kwargs(tmp_path)),
            [FreezeCallback(freeze_strategy="top", freeze_layers=1, freeze_embeddings=True, freeze_head=False)],
        )


def test_policy_given_twice_differently_is_refused(tmp_path):
    args = FreezeTrainingArguments(**training_kwargs(tmp_path), freeze_strategy="bottom", freeze_layers=2)
    with pytest.raises(FreezeConfigError, match=r"given twice.*`freeze_strategy`: 'top' vs 'bottom'"):
        trainer_for(build("bert"), args, [FreezeCallback(freeze_strategy="top", freeze_layers=2)])


def test_registry_lists_every_documented_strategy():
    assert {"none", "bottom", "top", "interval", "layers", "pattern", "bitfit", "head_only", "trlx", "llama_factory"} <= set(STRATEGIES)
