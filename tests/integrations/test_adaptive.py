"""Adaptive freezing in a real Trainer: probe then select, re-selection, the memory a probe holds, the same
selection whether the probe trains or only measures, resume in the middle of a probe, a probe as long as training
refused, a probe whose measurements are missing."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfigError
from hf_freeze.apply import optimizer_state_bytes
from hf_freeze.report import TIMELINE_JSON, TIMELINE_PNG

from tiny import SaveAt, TokenClassificationData, snapshot, tiny_bert, trainer_for, training_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quality_meter import CostMeter  # noqa: E402  (the quality study's tensor-by-tensor peak accounting)


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


@pytest.mark.parametrize("mode", ["measure", "train"])
def test_probe_then_select_in_a_real_trainer(tmp_path, mode):
    steps = Steps()
    options = dict(freeze_probe_mode=mode) if mode == "train" else {}  # 'measure' is the default
    callback = FreezeCallback(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=3, **options)
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=8, logging_steps=2))
    trainer = trainer_for(tiny_bert(), args, [callback, steps])
    trainer.train()
    data = json.loads((tmp_path / TIMELINE_JSON).read_text())
    (selection,) = data["selections"]
    scores, chosen = selection["scores"], selection["frozen_layers"]
    assert selection["step"] == 3 and chosen == sorted(sorted(range(4), key=scores.__getitem__)[:2])
    # 'measure' withholds the probe's optimizer steps: nothing moves; 'train': every layer trains.
    assert steps.moved[:3] == ([[]] if mode == "measure" else [[0, 1, 2, 3]]) * 3
    assert all(moved == sorted(set(range(4)) - set(chosen)) for moved in steps.moved[3:])  # then the selection holds
    change = data["changes"][-1]
    assert change["step"] == 3 and change["frozen_layers"] == chosen
    assert (change["released_optimizer_state_bytes"] > 0) == (mode == "train")  # a measuring probe held none
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


# -- the memory a probe holds ---------------------------------------------------------------------------------------


class StateBytes(TrainerCallback):
    """The optimizer's state at the end of every step."""

    def __init__(self):
        self.trainer, self.bytes = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.bytes.append(optimizer_state_bytes(self.trainer.optimizer))


def _peaks(tmp_path, name, options, max_steps=10):
    """Per step: the peak training memory counted tensor by tensor (the quality study's `CostMeter`) and the
    optimizer's state."""
    meter, state = CostMeter(), StateBytes()
    args = TrainingArguments(**training_kwargs(tmp_path / name, max_steps=max_steps))
    trainer = trainer_for(tiny_bert(), args, [FreezeCallback(**options), meter, state])
    meter.trainer = state.trainer = trainer
    trainer.train()
    return meter.peaks, state.bytes


def test_a_measuring_probe_holds_no_optimizer_state_and_no_later_probe_holds_more_than_the_first(tmp_path):
    adaptive = dict(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=2, freeze_reselect_every=5)
    full, _ = _peaks(tmp_path, "full", dict(freeze_strategy="none"))
    measured, measured_state = _peaks(tmp_path, "measure", adaptive)
    trained, trained_state = _peaks(tmp_path, "train", dict(adaptive, freeze_probe_mode="train"))
    probe_steps, selected_steps = [0, 1, 5, 6], [2, 3, 4, 7, 8, 9]
    # Measuring: no optimizer state while a probe runs (the state of the layers that trained in round 0 is released
    # when round 1's probe begins), so the re-selection's probe holds what the first one held, below full fine-tuning.
    assert [measured_state[step] for step in probe_steps] == [0, 0, 0, 0]
    assert all(measured_state[step] > 0 for step in selected_steps)
    assert measured[5] == measured[6] == measured[0] == measured[1] < max(full)
    assert max(measured) < max(full)
    # Training: every probe holds full fine-tuning's optimizer state and peak, the re-selection's too.
    assert [trained_state[step] for step in probe_steps] == [trained_state[0]] * 4 and trained_state[0] > 0
    assert max(trained[step] for step in probe_steps) == max(full)


# -- the same selection, measured or trained --------------------------------------------------------------------------


def _structured_bert():
    """Layers that differ plainly: their weights scaled (weight change under Adam is about lr / |w|) and their
    gradients scaled (gradient norms), so that any faithful probe ranks them the same."""
    model = tiny_bert()
    with torch.no_grad():
        for index, scale in enumerate((1.0, 3.0, 0.5, 2.0)):
            for name, parameter in model.bert.encoder.layer[index].named_parameters():
                if name.endswith("weight") and parameter.dim() == 2:
                    parameter.mul_(scale)
    for index, scale in enumerate((0.2, 1.0, 5.0, 0.5)):
        for parameter in model.bert.encoder.layer[index].parameters():
            parameter.register_hook(lambda grad, scale=scale: grad * scale)
    return model


@pytest.mark.parametrize("score, expected", [("weight_change", [1, 3]), ("grad_norm", [0, 3])])
def test_a_measuring_probe_selects_the_layers_a_training_probe_selects(tmp_path, score, expected):
    chosen = {}
    for mode in ("train", "measure"):
        options = dict(freeze_strategy="adaptive", freeze_layers=2, freeze_score=score, freeze_probe_steps=3,
                       freeze_probe_mode=mode)
        args = TrainingArguments(**training_kwargs(tmp_path / mode, max_steps=5, weight_decay=0.01))
        trainer_for(_structured_bert(), args, [FreezeCallback(**options)]).train()
        (selection,) = json.loads((tmp_path / mode / TIMELINE_JSON).read_text())["selections"]
        chosen[mode] = selection["frozen_layers"]
    assert chosen == {"train": expected, "measure": expected}


# -- resume ---------------------------------------------------------------------------------------------------------


def _run(output_dir, options, resume=None, **overrides):
    model = tiny_bert()
    args = TrainingArguments(**training_kwargs(output_dir, max_steps=9, weight_decay=0.1, seed=3, **overrides))
    callbacks = [FreezeCallback(**options)] + ([] if resume else [SaveAt(5)])
    trainer_for(model, args, callbacks, data=TokenClassificationData(size=16)).train(resume_from_checkpoint=resume)
    return snapshot(model), json.loads((output_dir / TIMELINE_JSON).read_text())


@pytest.mark.parametrize("score, mode", [("weight_change", None), ("weight_change", "train"), ("grad_norm", None),
                                         ("grad_norm_change", None), ("snr", None)])
def test_a_run_resumed_in_the_middle_of_a_probe_matches_the_uninterrupted_one(tmp_path, score, mode):
    # Rounds of 4 steps: probe 4-6 of the second round is running when the checkpoint at step 5 is taken.
    options = dict(freeze_strategy="adaptive", freeze_layers=2, freeze_score=score, freeze_reselect_every=4)
    if score != "snr":
        options.update(freeze_probe_steps=3, freeze_probe_mode=mode)
    weights, timeline = _run(tmp_path / "full", options)
    assert len(timeline["selections"]) == 3 if score == "snr" else 2
    if score == "weight_change":  # the checkpoint holds the probe's withheld update so far, when it withholds
        saved = (tmp_path / "full" / "checkpoint-5" / "trainer_state.json").read_text()
        assert ('"withheld"' in saved) == (mode is None)
    for restore_flag in (False, True) if score == "weight_change" and mode is None else (False,):
        resumed_weights, resumed = _run(
            tmp_path / f"resumed-{restore_flag}", options, resume=str(tmp_path / "full" / "checkpoint-5"),
            restore_callback_states_from_checkpoint=restore_flag,
        )
        assert resumed["changes"] == timeline["changes"]
        assert resumed["selections"] == timeline["selections"]  # the same scores, bit for bit
        for name, value in weights.items():
            assert torch.equal(resumed_weights[name], value), (restore_flag, name)
