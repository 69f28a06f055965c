"""Schedules in a real Trainer: optimizer-correct unfreezing and freezing, grad norm, resume, timeline files."""

import json

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_freeze import FreezeCallback, FreezeTrainingArguments, LayerFreezer, TrainingProgress
from hf_freeze.apply import optimizer_state_bytes
from hf_freeze import discover_layout
from hf_freeze.report import TIMELINE_JSON, TIMELINE_PNG, simulate_timeline

from tiny import SaveAt, TokenClassificationData, snapshot, tiny_bert, trainer_for, training_kwargs

LAYER = "bert.encoder.layer.{}.attention.self.query.weight"


class StepProbe(TrainerCallback):
    """Watches parameters around each optimizer step: grad, update, and the learning rate of their param group."""

    def __init__(self, *names):
        self.names = names
        self.steps = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.registered = {id(p) for group in optimizer.param_groups for p in group["params"]}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        parameters = dict(model.named_parameters())
        self.before = {name: parameters[name].detach().clone() for name in self.names}
        self.grads = {name: _clone(parameters[name].grad) for name in self.names}
        self.frozen_grads = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        self.trainable_norm = torch.norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.requires_grad and p.grad is not None])
        ).item()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        parameters = dict(model.named_parameters())
        record = {"step": state.global_step, "frozen_grads": self.frozen_grads, "trainable_norm": self.trainable_norm}
        for name in self.names:
            parameter = parameters[name]
            groups = [i for i, g in enumerate(optimizer.param_groups) if any(q is parameter for q in g["params"])]
            record[name] = {"grad": self.grads[name], "delta": parameter.detach() - self.before[name]}
            if groups:  # the rate of this step: the scheduler steps after on_optimizer_step
                record[name].update(
                    group_lr=optimizer.param_groups[groups[0]]["lr"], scheduled_lr=lr_scheduler.get_last_lr()[groups[0]]
                )
        self.steps.append(record)


def _clone(tensor):
    return None if tensor is None else tensor.detach().clone()


def test_layer_unfrozen_mid_run_is_updated_at_the_schedulers_rate_times_its_factor(tmp_path):
    names = [LAYER.format(3), LAYER.format(2), "classifier.weight"]
    probe = StepProbe(*names)
    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path, max_steps=9, optim="sgd", learning_rate=0.05, weight_decay=0.0),
        freeze_strategy="gradual_unfreezing", freeze_schedule_unit="step", freeze_schedule_every=3,
        freeze_unfreeze_lr_factor=0.1, freeze_unfreeze_lr_growth=2.0,
    )
    model = tiny_bert()
    trainer = trainer_for(model, args, [FreezeCallback(), probe])
    trainer.train()
    # Everything the schedule will train was in the optimizer (so in DDP) from the start, though frozen then.
    assert probe.registered == {id(p) for p in model.parameters()}

    # Layer 3 unfreezes at step 3 and its factor doubles every step after (Lightning's growth, here per step) up to
    # 1; layer 2 unfreezes at step 6; the head always trains.
    expected_factor = {
        names[0]: lambda step: None if step < 3 else min(1.0, 0.1 * 2 ** (step - 3)),
        names[1]: lambda step: None if step < 6 else min(1.0, 0.1 * 2 ** (step - 6)),
        names[2]: lambda step: 1.0,
    }
    for record in probe.steps:
        for name in names:
            seen, factor = record[name], expected_factor[name](record["step"])
            assert seen["group_lr"] == seen["scheduled_lr"] > 0  # in a Trainer-built group the scheduler drives
            if factor is None:
                assert seen["grad"] is None and torch.count_nonzero(seen["delta"]) == 0, (name, record["step"])
                continue
            assert torch.count_nonzero(seen["delta"]) > 0, (name, record["step"])
            expected = -seen["scheduled_lr"] * factor * seen["grad"]
            torch.testing.assert_close(seen["delta"], expected, rtol=1e-4, atol=1e-8)


def test_unfreezing_a_parameter_the_users_optimizer_never_saw(tmp_path):
    """The fallback path: an optimizer built by the user while the layer was frozen; the applier adds it to a group."""
    model = tiny_bert()
    for parameter in model.bert.encoder.layer[3].parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    name = LAYER.format(3)
    probe = StepProbe(name)
    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path, max_steps=5),
        freeze_strategy="gradual_unfreezing", freeze_schedule_unit="step", freeze_schedule_every=2,
        freeze_respect_existing=False,  # layer 3 was frozen by hand: let the schedule unfreeze it
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenClassificationData(), callbacks=[FreezeCallback(), probe],
                      optimizers=(optimizer, None))
    trainer.train()
    for record in probe.steps:
        seen = record[name]
        if record["step"] < 2:
            assert seen["grad"] is None and torch.count_nonzero(seen["delta"]) == 0
        else:
            torch.testing.assert_close(seen["delta"], -seen["scheduled_lr"] * seen["grad"], rtol=1e-4, atol=1e-8)
    assert len(optimizer.param_groups) == 1  # no new group: the LambdaLR scheduler kept working


class StateProbe(TrainerCallback):
    """At each step's start (after FreezeCallback applied the step's set): a parameter's value and optimizer state."""

    def __init__(self, names):
        self.names = names
        self.at_step = {}
        self.state_before_step = {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        parameters = dict(model.named_parameters())
        inner = optimizer.optimizer
        self.at_step[state.global_step] = {
            "values": {name: parameters[name].detach().clone() for name in self.names},
            "has_state": {name: parameters[name] in inner.state for name in self.names},
            "state_bytes": optimizer_state_bytes(optimizer),
        }

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        parameters = dict(model.named_parameters())
        inner = optimizer.optimizer
        self.state_before_step[state.global_step] = {
            name: sum(v.numel() * v.element_size() for v in inner.state[p].values() if torch.is_tensor(v))
            for name, p in parameters.items()
            if p in inner.state
        }


def test_layer_frozen_mid_run_stops_changing_and_releases_its_optimizer_state(tmp_path):
    model = tiny_bert()
    layout = discover_layout(model)
    layer_0 = set(layout.blocks[1].parameters) | set(layout.blocks[0].parameters)  # layer 0 and the embeddings
    watched = [LAYER.format(0), "bert.embeddings.word_embeddings.weight", LAYER.format(3)]
    probe = StateProbe(watched)
    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path, max_steps=8, weight_decay=0.1, gradient_accumulation_steps=2),
        freeze_strategy="progressive", freeze_start=0.0, freeze_level=0.5,
    )
    trainer = trainer_for(model, args, [FreezeCallback(), probe])
    trainer.train()
    final = snapshot(model)

    # freeze_level 0.5 of 4 layers, linear from step 0: layer 0 (with the embeddings) freezes at step 4, nothing else.
    for name in watched[:2]:
        assert not torch.equal(probe.at_step[0]["values"][name], probe.at_step[4]["values"][name])  # it trained
        assert probe.at_step[3]["has_state"][name] and not probe.at_step[4]["has_state"][name]
        for step in range(4, 8):  # from the next step on: bit-identical (no weight decay, no momentum drift)
            assert torch.equal(probe.at_step[step]["values"][name], final[name]), (name, step)
            assert not probe.at_step[step]["has_state"][name]
    assert not torch.equal(probe.at_step[4]["values"][watched[2]], final[watched[2]])  # layer 3 kept training

    released = sum(size for name, size in probe.state_before_step[4].items() if name in layer_0)
    assert released >= 2 * 4 * sum(layout.parameter_sizes[name] for name in layer_0)  # AdamW's two fp32 moments
    assert probe.at_step[4]["state_bytes"] == sum(probe.state_before_step[4].values()) - released  # the memory drop
    changes = json.loads((tmp_path / TIMELINE_JSON).read_text())["changes"]
    assert [(c["step"], c["frozen_layers"]) for c in changes] == [(0, []), (4, [0])]
    assert changes[1]["released_optimizer_state_bytes"] == released


def test_adamw_moves_a_parameter_with_a_zero_grad_and_skips_one_with_none():
    """The fact the applier relies on when it sets `.grad = None` on freezing."""
    zero, none = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([zero, none], lr=0.1, weight_decay=0.1)
    zero.grad, none.grad = torch.zeros(3), None
    optimizer.step()
    assert not torch.equal(zero.detach(), torch.ones(3)) and torch.equal(none.detach(), torch.ones(3))


@pytest.mark.parametrize("max_grad_norm", [1e9, 0.05])
def test_grad_norm_and_clipping_see_only_trainable_parameters(tmp_path, max_grad_norm):
    probe = StepProbe("classifier.weight")
    recorded = []

    class ClippedNorm(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            recorded.append(torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item())

    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path, max_steps=6, max_grad_norm=max_grad_norm),
        freeze_strategy="lisa", freeze_active_layers=1, freeze_schedule_every=2,
    )
    trainer = trainer_for(tiny_bert(), args, [FreezeCallback(), probe, ClippedNorm()])
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged) == 6
    for record, norm in zip(probe.steps, logged):
        assert record["frozen_grads"] == []  # frozen parameters have no grad at step time
    if max_grad_norm > 1:
        assert logged == pytest.approx([record["trainable_norm"] for record in probe.steps], rel=1e-5)
    else:
        assert min(logged) > max_grad_norm
        assert recorded == pytest.approx([max_grad_norm] * 6, rel=1e-4)  # clipped to exactly the bound


# -- resume -----------------------------------------------------------------------------------------------------

RESUME_CASES = {
    "progressive": dict(freeze_start=0.25),
    "gradual_unfreezing": dict(freeze_unfreeze_lr_factor=0.1),  # epoch unit: 2 steps per epoch, resumed mid-epoch
    "lisa": dict(freeze_active_layers=1, freeze_schedule_every=2),
    "badam": dict(freeze_schedule_every=2, freeze_block_order="random"),
}


def _run(output_dir, options, resume=None, **overrides):
    model = tiny_bert()
    args = TrainingArguments(**training_kwargs(output_dir, max_steps=8, weight_decay=0.1, seed=3, **overrides))
    callbacks = [FreezeCallback(**options)] + ([] if resume else [SaveAt(5)])
    trainer = trainer_for(model, args, callbacks, data=TokenClassificationData(size=16))
    trainer.train(resume_from_checkpoint=resume)
    return snapshot(model), json.loads((output_dir / TIMELINE_JSON).read_text())


@pytest.mark.parametrize("strategy", list(RESUME_CASES))
def test_resumed_run_matches_the_uninterrupted_one(tmp_path, strategy):
    options = dict(freeze_strategy=strategy, **RESUME_CASES[strategy])
    weights, timeline = _run(tmp_path / "full", options)
    steps = [entry["step"] for entry in timeline["changes"]]
    assert min(steps[1:]) < 5 < max(steps)  # changes on both sides of the checkpoint
    # The Trainer's own restore flag rebuilds the callback from its saved state: schedule-independent, so two suffice.
    for restore_flag in (False, True) if strategy in ("gradual_unfreezing", "lisa") else (False,):
        resumed_weights, resumed_timeline = _run(
            tmp_path / f"resumed-{restore_flag}", options, resume=str(tmp_path / "full" / "checkpoint-5"),
            restore_callback_states_from_checkpoint=restore_flag,
        )
        assert resumed_timeline["changes"] == timeline["changes"]  # the same sequence of frozen sets
        for name, value in weights.items():
            assert torch.equal(resumed_weights[name], value), (restore_flag, name)


# -- timeline files -----------------------------------------------------------------------------------------------


def test_timeline_json_matches_the_policy_and_the_chart_is_written(tmp_path):
    model = tiny_bert()
    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path, max_steps=9, save_strategy="steps", save_steps=4),
        freeze_strategy="badam", freeze_schedule_every=2, freeze_block_order="descending",
    )
    trainer_for(model, args, [FreezeCallback()]).train()
    data = json.loads((tmp_path / TIMELINE_JSON).read_text())
    assert data["strategy"] == "badam" and data["max_steps"] == 9 and data["end_step"] == 9
    assert data["options"]["freeze_block_order"] == "descending"
    assert [block["name"] for block in data["blocks"]][:2] == ["bert.embeddings", "bert.encoder.layer.0"]
    expected = simulate_timeline(discover_layout(model), args, max_steps=9, steps_per_epoch=8, seed=0).changes
    keys = ("step", "epoch", "frozen_blocks", "frozen_layers", "trainable_params")
    assert [{k: c[k] for k in keys} for c in data["changes"]] == [{k: c[k] for k in keys} for c in expected]
    assert [c["frozen_layers"] for c in data["changes"]] == [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3], [0, 1, 2]]
    assert all(c["released_optimizer_state_bytes"] > 0 for c in data["changes"][1:])
    png = (tmp_path / TIMELINE_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_static_strategies_write_no_timeline(tmp_path):
    args = FreezeTrainingArguments(**training_kwargs(tmp_path, max_steps=2), freeze_strategy="bottom", freeze_layers=2)
    trainer_for(tiny_bert(), args, [FreezeCallback()]).train()
    assert not (tmp_path / TIMELINE_JSON).exists()


def test_a_schedule_in_a_plain_pytorch_loop():
    model = tiny_bert()
    freezer = LayerFreezer(model, freeze_strategy="progressive", freeze_start=0.0)
    freezer.prepare()  # before the optimizer: everything the schedule may train is trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    data = TokenClassificationData(size=8)
    batch = {key: torch.stack([data[i][key] for i in range(8)]) for key in ("input_ids", "labels")}
    values = []
    for step in range(6):
        freezer.update(TrainingProgress(step=step, max_steps=6), optimizer)
        model(**batch).loss.backward()
        freezer.before_optimizer_step()
        optimizer.step()
        freezer.after_optimizer_step()
        optimizer.zero_grad(set_to_none=False)  # zero tensors, not None: AdamW would move a frozen one
        values.append(model.bert.encoder.layer[0].attention.self.query.weight.detach().clone())
    assert [c["frozen_layers"] for c in freezer.timeline.changes] == [[], [0], [0, 1], [0, 1, 2]]
    frozen_from = freezer.timeline.changes[1]["step"]
    assert all(torch.equal(values[frozen_from - 1], value) for value in values[frozen_from:])
    assert not torch.equal(values[0], values[frozen_from - 1])


def test_schedule_demo_runs_a_shipped_config(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "schedule_demo.py"
    spec = importlib.util.spec_from_file_location("schedule_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = Path(__file__).resolve().parents[2] / "configs" / "progressive.yaml"
    demo.main([str(config), "--tiny", "--max_steps", "6", "--output_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "progressive: 3 frozen sets over 6 steps" in printed and (tmp_path / TIMELINE_PNG).exists()
