"""'staged': explicit stages of bottom layers frozen, as a pure policy, from YAML and the command line, and refused
when malformed."""

import pytest
from transformers import HfArgumentParser

from hf_freeze import FreezeArguments, FreezeConfigError, FreezeTrainingArguments, ModelLayout, TrainingProgress, decide

LAYOUT = ModelLayout.from_layer_sizes([10] * 8, embeddings=5, norm=2, head=3)


def frozen_at(args, step=0, epoch=0.0):
    decision = decide(LAYOUT, args, TrainingProgress(step, 100, epoch, 4.0, 0))
    return decision.frozen_layers(LAYOUT), "embeddings.weight" in decision.frozen


def test_each_stage_freezes_its_bottom_layers_from_its_start_step():
    args = FreezeArguments(freeze_strategy="staged", freeze_stages={0: 6, 10: 0.5, 30: 0, 50: 2})
    assert frozen_at(args, 0) == frozen_at(args, 9) == ([0, 1, 2, 3, 4, 5], True)
    assert frozen_at(args, 10) == frozen_at(args, 29) == ([0, 1, 2, 3], True)  # a fraction of the 8 layers
    assert frozen_at(args, 30) == ([], False)  # nothing frozen: the embeddings train too
    assert frozen_at(args, 50) == frozen_at(args, 99) == ([0, 1], True)  # stages may freeze again


def test_epoch_stages_change_as_an_epoch_begins():
    args = FreezeArguments(freeze_strategy="staged", freeze_schedule_unit="epoch", freeze_stages={0: 4, 2: 1})
    assert frozen_at(args, step=60, epoch=1.99)[0] == [0, 1, 2, 3]
    assert frozen_at(args, step=61, epoch=2.0)[0] == [0]


def test_yaml_and_command_line_give_the_same_stages(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("output_dir: out\nfreeze_strategy: staged\nfreeze_stages: {0: 4, 100: 2, 200: 0}\n")
    (from_yaml,) = HfArgumentParser(FreezeTrainingArguments).parse_yaml_file(str(path))
    (from_cli,) = HfArgumentParser(FreezeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "out", "--freeze_strategy", "staged", "--freeze_stages", '{"0": 4, "100": 2, "200": 0}'])
    assert from_yaml.freeze_stages == from_cli.freeze_stages == {0: 4, 100: 2, 200: 0}


@pytest.mark.parametrize("stages, says", [
    (None, "set for 'staged'"),
    ({}, "a mapping"),
    ({10: 2}, "no stage starts at 0"),
    ({0: 2, -5: 1}, "-5 is not a start"),
    ({0: 2, "ten": 1}, "'ten' is not a start"),
    ({0: 1.5}, "1.5 is not a layer count"),
    ({0: -1}, "-1 is not a layer count"),
    ({0: "all"}, "'all' is not a layer count"),
    ("{0: [1", "a mapping written as JSON or YAML"),
])
def test_malformed_stages_are_refused_naming_the_field(stages, says):
    with pytest.raises(FreezeConfigError, match="freeze_stages") as error:
        FreezeArguments(freeze_strategy="staged", freeze_stages=stages)
    assert says in str(error.value)


def test_a_stage_with_more_layers_than_the_model_is_refused_with_the_count():
    args = FreezeArguments(freeze_strategy="staged", freeze_stages={0: 2, 10: 9})
    frozen_at(args, 0)
    with pytest.raises(FreezeConfigError, match="freeze_stages.*between 0 and the model's 8 layers"):
        frozen_at(args, 10)


def test_schedule_every_does_not_apply():
    with pytest.raises(FreezeConfigError, match="'staged' does not use `freeze_schedule_every`"):
        FreezeArguments(freeze_strategy="staged", freeze_stages={0: 1}, freeze_schedule_every=5)
