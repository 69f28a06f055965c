"""Learning rates per part and per layer in a real `Trainer`: at every step, every group trains at its base rate x
its factor x the scheduler's multiplier (linear with warm-up, cosine), the optimizer really applies it, a layer
unfrozen mid-training starts at its scheduled rate, and a resumed run is bit-identical to an uninterrupted one."""

from __future__ import annotations

import io
import math

import pytest
import torch
from tiny import SaveAt, build, snapshot, trainer_for, training_kwargs
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfigError, LayerFreezer, TrainingProgress
from hf_freeze.integrations.backends import DistributedSetup
from hf_freeze.integrations.support import PolicyFacts, check_support

BASE = 1e-3
STEPS = 6
WARMUP = 2
SCHEDULES = {
    "linear": lambda step: step / WARMUP if step < WARMUP else max(0.0, (STEPS - step) / (STEPS - WARMUP)),
    "cosine": lambda step: step / WARMUP if step < WARMUP
    else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))),
}
DECAY = 0.5
LAYERS = 4
POLICY = dict(freeze_strategy="bottom", freeze_layers=1, freeze_layer_lr_decay=DECAY,
              freeze_learning_rates={"classifier": 5e-3})


def _expected_base(group: str) -> float:
    """Base rate x factor of a group of `POLICY` on a 4-layer BERT, computed here from the definition."""
    if group.startswith("layer."):
        return BASE * DECAY ** (LAYERS - 1 - int(group.split(".")[1]))
    return {"classifier": 5e-3, "base": BASE}[group]


class StepRecorder(TrainerCallback):
    """Per optimizer step: each group's rate, and (with ``updates``) whether every trainable parameter moved by
    exactly -rate x (gradient + its group's weight decay x weight) (plain SGD)."""

    def __init__(self, updates: bool = False):
        self.rates, self.updates, self.mismatches, self.trainable = [], updates, [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.rates.append({group["hf_freeze_group"]: group["lr"] for group in optimizer.param_groups})
        self.trainable.append({name for name, p in model.named_parameters() if p.requires_grad})
        if self.updates:
            rate = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
            self.before = {name: (p.detach().clone(), p.grad.detach().clone(), *rate[id(p)])
                           for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.updates:
            return
        parameters = dict(model.named_parameters())
        for name, (before, grad, rate, weight_decay) in self.before.items():  # SGD: decay joins the gradient
            if not torch.allclose(parameters[name].detach(), before - rate * (grad + weight_decay * before), rtol=1e-5, atol=1e-9):
                self.mismatches.append((state.global_step, name))


def _train(tmp_path, schedule, callbacks=(), optim="adamw_torch", **policy):
    model = build("bert", num_hidden_layers=LAYERS)
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=STEPS, warmup_steps=WARMUP, lr_scheduler_type=schedule,
                                               learning_rate=BASE, optim=optim, weight_decay=0.01))
    trainer = trainer_for(model, args, callbacks=[FreezeCallback(**(policy or POLICY)), *callbacks])
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_group_trains_at_base_times_factor_times_the_schedule(tmp_path, schedule):
    recorder = StepRecorder(updates=True)
    trainer, _ = _train(tmp_path, schedule, [recorder], optim="sgd")
    assert len(recorder.rates) == STEPS
    groups = set(recorder.rates[0])
    assert groups == {"base", "classifier", "layer.1", "layer.2", "layer.3"}  # layer 0 and the embeddings are frozen
    for step, rates in enumerate(recorder.rates):
        for group, rate in rates.items():
            assert rate == pytest.approx(_expected_base(group) * SCHEDULES[schedule](step), rel=1e-12, abs=0), (step, group)
    # The optimizer applied those rates: plain SGD moved every trainable parameter by exactly -rate x gradient.
    assert not recorder.mismatches, recorder.mismatches[:5]
    # `freeze/lr/<group>` is the rate of the logged step, as the Trainer's own `learning_rate`.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logged:
        step = entry["step"] - 1
        assert entry["learning_rate"] == pytest.approx(BASE * SCHEDULES[schedule](step), rel=1e-12)
        for group in groups:
            assert entry[f"freeze/lr/{group}"] == recorder.rates[step][group]


def test_a_layer_unfrozen_mid_training_starts_at_its_scheduled_rate(tmp_path):
    """Gradual unfreezing, one layer per step from the top: each layer's group follows the schedule before it is
    unfrozen, and its first step moves it by exactly its decayed rate x the scheduler's multiplier then."""
    recorder = StepRecorder(updates=True)
    policy = dict(freeze_strategy="gradual_unfreezing", freeze_layers=LAYERS, freeze_schedule_unit="step",
                  freeze_schedule_every=1, freeze_layer_lr_decay=DECAY)
    _train(tmp_path, "linear", [recorder], optim="sgd", **policy)
    first_trainable = {}
    for step, trainable in enumerate(recorder.trainable):
        for index in range(LAYERS):
            if any(name.startswith(f"bert.encoder.layer.{index}.") for name in trainable):
                first_trainable.setdefault(index, step)
    assert first_trainable == {3: 1, 2: 2, 1: 3, 0: 4}  # unfrozen top-down, one per step
    for step, rates in enumerate(recorder.rates):
        for index in range(LAYERS):  # no jump, no gap: the group follows the schedule, frozen or not
            expected = BASE * DECAY ** (LAYERS - 1 - index) * SCHEDULES["linear"](step)
            assert rates[f"layer.{index}"] == pytest.approx(expected, rel=1e-12, abs=0), (step, index)
    assert not recorder.mismatches, recorder.mismatches[:5]


def test_a_resumed_run_is_bit_identical(tmp_path):
    straight, _ = _train(tmp_path / "a", "cosine", [SaveAt(3)])
    reference = {name: p.detach().clone() for name, p in straight.model.named_parameters()}
    groups = [(g["hf_freeze_group"], g["lr"], g["initial_lr"], len(g["params"])) for g in straight.optimizer.param_groups]
    model = build("bert", num_hidden_layers=LAYERS, seed=1)  # other weights: the checkpoint's must be loaded
    args = TrainingArguments(**training_kwargs(tmp_path / "a", max_steps=STEPS, warmup_steps=WARMUP,
                                               lr_scheduler_type="cosine", learning_rate=BASE, weight_decay=0.01))
    recorder = StepRecorder()
    resumed = trainer_for(model, args, callbacks=[FreezeCallback(**POLICY), recorder])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for step, rates in zip(range(3, STEPS), recorder.rates):
        for group, rate in rates.items():
            assert rate == pytest.approx(_expected_base(group) * SCHEDULES["cosine"](step), rel=1e-12, abs=0)
    assert [(g["hf_freeze_group"], g["lr"], g["initial_lr"], len(g["params"])) for g in resumed.optimizer.param_groups] == groups
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach(), reference[name]), name
    # Other rates than the checkpoint's are refused before anything is loaded (torch would restore the saved ones).
    other = TrainingArguments(**training_kwargs(tmp_path / "a", max_steps=STEPS, learning_rate=BASE))
    refused = trainer_for(build("bert", num_hidden_layers=LAYERS), other,
                          callbacks=[FreezeCallback(**dict(POLICY, freeze_layer_lr_decay=0.8))])
    with pytest.raises(FreezeConfigError, match="other learning-rate groups or rates") as error:
        refused.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert "freeze_layer_lr_decay" in error.value.fields


def test_an_optimizer_the_rates_cannot_reach_is_refused(tmp_path):
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=1))
    model = build("bert", num_hidden_layers=LAYERS)
    given = torch.optim.AdamW(model.parameters())
    with pytest.raises(FreezeConfigError, match="was given its optimizer") as error:
        Trainer(model=model, args=args, optimizers=(given, None), callbacks=[FreezeCallback(**POLICY)])
    assert error.value.fields == ("freeze_learning_rates", "freeze_layer_lr_decay")
    # Added after the Trainer was built, the callback cannot reach the optimizer the Trainer builds: refused.
    late = trainer_for(build("bert", num_hidden_layers=LAYERS), args)
    late.add_callback(FreezeCallback(**POLICY))
    with pytest.raises(FreezeConfigError, match="built without their param groups"):
        late.train()


def test_rates_run_on_every_engine_and_lora_is_refused_where_parameters_are_sharded():
    """The rates on FSDP2 and DeepSpeed ZeRO-2/3 are trained end to end in tests/integrations/test_sharded_engines.py
    (`lisa_layer_lr_decay`: the same group rates and weights as DDP's)."""
    rates = PolicyFacts("bottom", dynamic=False, trainable=10, frozen=5, add_ons=("learning_rates",))
    lora = PolicyFacts("bottom", dynamic=False, trainable=10, frozen=5, add_ons=("lora",))
    for setup in (DistributedSetup("deepspeed", world_size=2, zero_stage=3),
                  DistributedSetup("fsdp", world_size=2, fsdp_version=2)):
        assert check_support(setup, rates) is None
        assert "`freeze_lora` cannot run under" in check_support(setup, lora)
    for setup in (DistributedSetup("ddp", world_size=2, find_unused_parameters=False),
                  DistributedSetup("deepspeed", world_size=2, zero_stage=2)):  # whole parameters: the adapter saves
        assert check_support(setup, lora) is None


def test_a_plain_loop_gets_the_same_rates_and_resumes_bit_identically():
    """`LayerFreezer.parameter_groups` for any optimizer, with transformers' cosine schedule; interrupted at step 3
    and resumed "in a fresh process" (new model, freezer, optimizer, scheduler; the four states loaded)."""
    from transformers import get_cosine_schedule_with_warmup

    options = dict(freeze_strategy="gradual_unfreezing", freeze_layers=3, freeze_schedule_unit="step",
                   freeze_schedule_every=2, freeze_layer_lr_decay=0.7)
    data = torch.randint(1, 128, (STEPS, 4, 8), generator=torch.Generator().manual_seed(0))

    def build_run():
        model = build("gpt2", n_layer=LAYERS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no random draws
        freezer = LayerFreezer(model, **options)
        freezer.prepare()
        optimizer = torch.optim.AdamW(freezer.parameter_groups(BASE, weight_decay=0.01))
        return model, freezer, optimizer, get_cosine_schedule_with_warmup(optimizer, WARMUP, STEPS)

    def steps(run, start, stop, rates=None):
        model, freezer, optimizer, scheduler = run
        for step in range(start, stop):
            freezer.update(TrainingProgress(step=step, max_steps=STEPS), optimizer)
            model(input_ids=data[step], labels=data[step]).loss.backward()
            freezer.before_optimizer_step()
            optimizer.step()
            freezer.after_optimizer_step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if rates is not None:
                rates.append(dict(freezer.metrics()))

    straight, rates = build_run(), []
    steps(straight, 0, STEPS, rates)
    for step, metrics in enumerate(rates):
        for index in range(LAYERS):
            expected = BASE * 0.7 ** (LAYERS - 1 - index) * SCHEDULES["cosine"](step)
            assert metrics[f"freeze/lr/layer.{index}"] == pytest.approx(expected, rel=1e-12, abs=0), (step, index)
    first = build_run()
    steps(first, 0, 3)
    buffer = io.BytesIO()  # the four states, through bytes as a new process would read them
    model, freezer, optimizer, scheduler = first
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "freezer": freezer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    second = build_run()
    model, freezer, optimizer, scheduler = second
    model.load_state_dict(state["model"])
    freezer.load_state_dict(state["freezer"], step=3)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    steps(second, 3, STEPS)
    for (name, expected), (_, got) in zip(straight[0].named_parameters(), model.named_parameters()):
        assert torch.equal(expected, got), name


def test_with_model_init_the_groups_hold_the_model_train_builds(tmp_path):
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=2, learning_rate=BASE))
    trainer = Trainer(model_init=lambda: build("bert", num_hidden_layers=LAYERS), args=args,
                      train_dataset=trainer_for(build("bert"), args).train_dataset, callbacks=[FreezeCallback(**POLICY)])
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trained = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trained <= in_optimizer  # the model `train()` built, not the one `Trainer.__init__` built
    rates = {group["hf_freeze_group"]: group["initial_lr"] for group in trainer.optimizer.param_groups}
    # `train()` builds the optimizer before the callback freezes the new model (`on_train_begin`): the groups of the
    # layers frozen then exist too, and their parameters never get a gradient.
    expected = {group: _expected_base(group) for group in ("base", "classifier", "layer.1", "layer.2", "layer.3")}
    assert rates == {**expected, "layer.0": BASE * DECAY ** 3, "embeddings": BASE * DECAY ** 4}
    assert not trainer.model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
