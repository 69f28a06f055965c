"""Adaptive freezing in a real Trainer: probe then select, re-selection, resume in the middle of a probe, a probe
as long as training refused, a probe whose measurements are missing."""

import json

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfigError
from hf_freeze.report import TIMELINE_JSON, TIMELINE_PNG

from tiny import SaveAt, TokenClassificationData, snapshot, tiny_bert, trainer_for, training_kwargs


def test_a_probe_as_long_as_training_is_refused_before_the_first_step(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    callback = FreezeCallback(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=4)
    trainer = trainer_for(model, TrainingArguments(**training_kwargs(tmp_path, max_steps=4)), [callback])
    with pytest.raises(FreezeConfigError, match=r"`freeze_probe_steps` \(4, 4 steps\) is not shorter than training \(4 steps\)"):
        trainer.train()
    assert all(torch.equal(value, dict(model.named_parameters())[name]) for name, value in before.items())


# -- scores with known answers -------------------------------------------------------------------------------------


class Steps(TrainerCallback):
    """Which layers changed in each optimizer step."""

    def __init__(self):
        self.moved = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        after = dict(model.named_parameters())
        self.moved.append(sorted({
            int(name.split(".")[3]) for name, value in self.before.items()
            if name.startswith("bert.encoder.layer.") and not torch.equal(value, after[name])
        }))


def test_probe_then_select_in_a_real_trainer(tmp_path):
    steps = Steps()
    callback = FreezeCallback(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=3)
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=8, logging_steps=2))
    trainer = trainer_for(tiny_bert(), args, [callback, steps])
    trainer.train()
    data = json.loads((tmp_path / TIMELINE_JSON).read_text())
    (selection,) = data["selections"]
    scores, chosen = selection["scores"], selection["frozen_layers"]
    assert selection["step"] == 3 and chosen == sorted(sorted(range(4), key=scores.__getitem__)[:2])
    assert steps.moved[:3] == [[0, 1, 2, 3]] * 3  # the probe trains every layer
    assert all(moved == sorted(set(range(4)) - set(chosen)) for moved in steps.moved[3:])  # then the selection holds
    change = data["changes"][-1]
    assert change["step"] == 3 and change["frozen_layers"] == chosen and change["released_optimizer_state_bytes"] > 0
    logged = [entry for entry in trainer.state.log_history if "freeze/score_layer_0" in entry]
    assert logged and all(logged[-1][f"freeze/score_layer_{i}"] == scores[i] for i in range(4))
    assert logged[-1]["freeze/probe_scoring_seconds"] > 0
    assert (tmp_path / TIMELINE_PNG).read_bytes()[:4] == b"\x89PNG"


def test_reselection_probes_again_every_round(tmp_path):
    options = dict(freeze_strategy="adaptive", freeze_layers=1, freeze_score="grad_norm", freeze_probe_steps=2,
                   freeze_reselect_every=4)
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=10))
    trainer_for(tiny_bert(), args, [FreezeCallback(**options)]).train()
    data = json.loads((tmp_path / TIMELINE_JSON).read_text())
    assert [(s["round"], s["probe_start_step"], s["step"]) for s in data["selections"]] == [(0, 0, 2), (1, 4, 6)]
    changes = [(c["step"], c["frozen_layers"]) for c in data["changes"]]
    assert [step for step, _ in changes] == [0, 2, 4, 6, 8]
    assert [layers for step, layers in changes if step in (0, 4, 8)] == [[], [], []]  # every probe trains all layers
    assert changes[1][1] == data["selections"][0]["frozen_layers"] and changes[3][1] == data["selections"][1]["frozen_layers"]


# -- resume ---------------------------------------------------------------------------------------------------------


def _run(output_dir, options, resume=None, **overrides):
    model = tiny_bert()
    args = TrainingArguments(**training_kwargs(output_dir, max_steps=9, weight_decay=0.1, seed=3, **overrides))
    callbacks = [FreezeCallback(**options)] + ([] if resume else [SaveAt(5)])
    trainer_for(model, args, callbacks, data=TokenClassificationData(size=16)).train(resume_from_checkpoint=resume)
    return snapshot(model), json.loads((output_dir / TIMELINE_JSON).read_text())


@pytest.mark.parametrize("score", ["weight_change", "grad_norm", "grad_norm_change", "snr"])
def test_a_run_resumed_in_the_middle_of_a_probe_matches_the_uninterrupted_one(tmp_path, score):
    # Rounds of 4 steps: probe 4-6 of the second round is running when the checkpoint at step 5 is taken.
    options = dict(freeze_strategy="adaptive", freeze_layers=2, freeze_score=score, freeze_reselect_every=4)
    if score != "snr":
        options["freeze_probe_steps"] = 3
    weights, timeline = _run(tmp_path / "full", options)
    assert len(timeline["selections"]) == 3 if score == "snr" else 2
    for restore_flag in (False, True) if score == "weight_change" else (False,):
        resumed_weights, resumed = _run(
            tmp_path / f"resumed-{restore_flag}", options, resume=str(tmp_path / "full" / "checkpoint-5"),
            restore_callback_states_from_checkpoint=restore_flag,
        )
        assert resumed["changes"] == timeline["changes"]
        assert resumed["selections"] == timeline["selections"]  # the same scores, bit for bit
        for name, value in weights.items():
            assert torch.equal(resumed_weights[name], value), (restore_flag, name)
