"""A real Trainer run per strategy: frozen parameters bit-identical, trainable ones moved, counts logged right."""

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_freeze import FreezeCallback, FreezeTrainingArguments
from hf_freeze import discover_layout

from tiny import build, snapshot, trainer_for, training_kwargs

STRATEGY_CASES = [
    ("bert", dict(freeze_strategy="bottom", freeze_layers=2)),
    ("bert", dict(freeze_strategy="top", freeze_layers=0.5)),
    ("bert", dict(freeze_strategy="interval", freeze_interval=2, freeze_interval_offset=1)),
    ("bert", dict(freeze_strategy="layers", freeze_layer_indices=[0, -1])),
    ("bert", dict(freeze_strategy="pattern", freeze_trainable_patterns=["bert.encoder.layer.3.", "classifier."])),
    ("bert", dict(freeze_strategy="bitfit")),
    ("bert", dict(freeze_strategy="head_only")),
    ("gpt2", dict(freeze_strategy="trlx", freeze_num_layers_unfrozen=2)),
    ("llama", dict(freeze_strategy="llama_factory", freeze_trainable_layers=-2)),
    ("llama", dict(freeze_strategy="bottom", freeze_layers=0.5)),
]


class LogRecorder(TrainerCallback):
    """Stands in for a report_to integration: those are registered before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("model_type,options", STRATEGY_CASES, ids=[o["freeze_strategy"] + "-" + m for m, o in STRATEGY_CASES])
def test_strategy_in_a_real_trainer(tmp_path, model_type, options):
    model = build(model_type)
    before = snapshot(model)
    recorder = LogRecorder()
    args = FreezeTrainingArguments(**training_kwargs(tmp_path), **options)
    trainer = trainer_for(model, args, [recorder, FreezeCallback()])
    trainer.train()

    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "the policy froze nothing"
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, before[name]), f"frozen {name} changed"
    # Every block with a trainable parameter was updated.
    layout = discover_layout(model)
    for block in layout.blocks:
        trainable = [name for name in block.parameters if name not in frozen]
        if trainable:
            assert any(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in trainable), block.name

    # The optimizer was built after freezing: it holds trainable parameters only, and no state for frozen ones.
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}

    real_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    real_total = sum(p.numel() for p in model.parameters())
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert train_logs and all(entry["freeze/trainable_params"] == real_trainable for entry in train_logs)
    assert all(entry["freeze/total_params"] == real_total for entry in train_logs)
    assert train_logs[0]["freeze/trainable_fraction"] == pytest.approx(real_trainable / real_total, abs=1e-6)
    # A reporter registered before FreezeCallback (as TensorBoard/W&B are) receives the metrics too.
    assert recorder.logs and all(log["freeze/trainable_params"] == real_trainable for log in recorder.logs)


def test_policy_from_constructor_with_plain_training_arguments(tmp_path):
    model = build("bert")
    trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)), [FreezeCallback(freeze_strategy="bottom", freeze_layers=4)])
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("bert.encoder."))
    assert model.classifier.weight.requires_grad


def test_table_and_counts_are_logged(tmp_path, capfd):
    model = build("bert")
    trainer_for(model, FreezeTrainingArguments(**training_kwargs(tmp_path), freeze_strategy="bottom", freeze_layers=1), [FreezeCallback()])
    err = capfd.readouterr().err
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable params: {trainable:,} || all params: {total:,}" in err
    assert "bert.encoder.layer.0  layer" in err and "frozen" in err


def test_callback_added_after_init_still_freezes_before_the_first_step(tmp_path):
    model = build("bert")
    before = snapshot(model)
    trainer = trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)))
    trainer.add_callback(FreezeCallback(freeze_strategy="bottom", freeze_layers=2))
    trainer.train()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)
    # The optimizer saw every parameter, but holds no state for the frozen ones.
    frozen_ids = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not frozen_ids & {id(p) for p in trainer.optimizer.state}


def test_peft_model_is_left_untouched_with_a_warning(tmp_path, capfd):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainer = trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)),
                          [FreezeCallback(freeze_strategy="bottom", freeze_layers=2)])
    trainer.train()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    err = capfd.readouterr().err
    assert err.count("freezing is skipped") == 1 and "PeftModel" in err


def test_adapters_loaded_into_a_transformers_model_are_detected(tmp_path, capfd):
    from peft import LoraConfig

    model = build("llama")
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj"]))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)), [FreezeCallback(freeze_strategy="top", freeze_layers=1)])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "adapters were loaded" in capfd.readouterr().err
