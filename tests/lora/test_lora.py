"""Freeze + LoRA in one policy (`freeze_lora`): adapters on the frozen layers, the rest trained fully, saved as one
peft adapter that plain `PeftModel.from_pretrained` reloads to the trained model's logits; refusals before training."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import SaveAt, build, snapshot, trainer_for, training_kwargs
from transformers import TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfigError, LayerFreezer
from hf_freeze.tools.validate import check_config

LORA = {"r": 4, "alpha": 8, "on": "frozen"}
POLICY = dict(freeze_strategy="bottom", freeze_layers=0.5, freeze_lora=LORA)
INPUTS = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


def _reloaded_logits(model_type, folder, **overrides):
    base = build(model_type, **overrides)  # the same initial weights as the model that trained
    return _logits(PeftModel.from_pretrained(base, folder))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_a_trainer_run_saves_an_adapter_that_reloads_to_the_same_logits(tmp_path, checkpointing):
    model = build("llama")
    before = snapshot(model)
    reentrant = {"gradient_checkpointing_kwargs": {"use_reentrant": True}} if checkpointing else {}
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=3, gradient_checkpointing=checkpointing, **reentrant))
    trainer = trainer_for(model, args, callbacks=[FreezeCallback(**POLICY), SaveAt(2)])
    trainer.train()
    after = dict(model.named_parameters())
    adapters = {name: p for name, p in after.items() if ".lora_" in name}
    assert {name.split(".")[2] for name in adapters} == {"0", "1"}  # the frozen bottom half, every linear module
    assert all(p.requires_grad for p in adapters.values())
    # The adapters trained (lora_B starts at zero), even under checkpointing, where the frozen prefix is not cut.
    assert all(p.detach().abs().sum() > 0 for name, p in adapters.items() if ".lora_B." in name)
    for name, value in before.items():
        current = after.get(name) if name in after else after[name.replace(".weight", ".base_layer.weight")]
        frozen = name.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
        assert torch.equal(current.detach(), value) == frozen, name  # frozen unchanged, trained blocks moved
    trained = _logits(model)
    assert torch.equal(_reloaded_logits("llama", tmp_path / "lora_adapter"), trained)
    assert not torch.equal(_logits(build("llama")), trained)
    assert os.path.isfile(tmp_path / "checkpoint-2" / "lora_adapter" / "adapter_model.safetensors")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["freeze/lora_params"] == sum(p.numel() for p in adapters.values())


def test_a_resumed_run_with_adapters_is_bit_identical(tmp_path):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = build("llama")
    trainer_for(straight, TrainingArguments(**training_kwargs(tmp_path / "a", **args)), callbacks=[FreezeCallback(**POLICY)]).train()
    resumed = build("llama", seed=3)
    trainer = trainer_for(resumed, TrainingArguments(**training_kwargs(tmp_path / "a", **args)), callbacks=[FreezeCallback(**POLICY)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (name, expected), (_, got) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(expected, got), name


def test_a_plain_loop_with_patterns_on_gpt2(tmp_path):
    """`on: [patterns]` puts adapters only on the matching frozen modules; `save_add_ons` writes the adapter."""
    overrides = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = build("gpt2", **overrides)
    freezer = LayerFreezer(model, freeze_strategy="layers", freeze_layer_indices=[0, 1],
                           freeze_lora={"r": 2, "on": [r"transformer\.h\.[01]\.attn\.c_attn"]}, freeze_layer_lr_decay=0.9)
    freezer.apply()
    assert "adapter" in freezer.table().splitlines()[0]
    adapters = [name for name, _ in model.named_parameters() if ".lora_" in name]
    assert {name.rsplit(".lora_", 1)[0] for name in adapters} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    optimizer = torch.optim.AdamW(freezer.parameter_groups(1e-2))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert rates[id(named["transformer.h.0.attn.c_attn.lora_A.default.weight"])] == 1e-2 * 0.9 ** 3  # its layer's rate
    data = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model.train()
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    written = freezer.save_add_ons(str(tmp_path))
    assert written == [str(tmp_path / "lora_adapter")]
    assert torch.equal(_reloaded_logits("gpt2", written[0], **overrides), _logits(model))


def test_lora_on_a_model_that_already_has_an_adapter_is_refused():
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(FreezeConfigError, match="already carries a PEFT adapter") as error:
        LayerFreezer(model, **POLICY)
    assert error.value.fields == ("freeze_lora",)
    problems = check_config({"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_lora": LORA}, model=model)
    assert [problem.fields for problem in problems] == [("freeze_lora",)]


@pytest.mark.parametrize("options, expected, fields", [
    (dict(freeze_strategy="lisa", freeze_lora=LORA), "needs a static strategy", ("freeze_lora", "freeze_strategy")),
    (dict(freeze_lora=LORA), "freezes nothing", ("freeze_lora", "freeze_strategy")),
    (dict(POLICY, freeze_lora={"rank": 4}), "one of 'r', 'alpha', 'dropout', 'on'", ("freeze_lora",)),
    (dict(POLICY, freeze_lora={"r": 0}), "'r' is the rank", ("freeze_lora",)),
    (dict(POLICY, freeze_lora={"dropout": 1.0}), "'dropout' is", ("freeze_lora",)),
    (dict(POLICY, freeze_lora={"on": "somewhere"}), "nowhere to go", ("freeze_lora",)),
    (dict(POLICY, freeze_cache_prefix=True, freeze_frozen_modules_eval=True), "cannot be combined with `freeze_cache_prefix`",
     ("freeze_lora", "freeze_cache_prefix")),
])
def test_what_lora_cannot_do_is_refused_before_training(options, expected, fields):
    with pytest.raises(FreezeConfigError, match=expected) as error:
        LayerFreezer(build("llama"), **options)
    assert error.value.fields == fields


def test_an_unquoted_yaml_on_key_is_read_as_on(tmp_path):
    from hf_freeze import FreezeArguments

    arguments = FreezeArguments(freeze_strategy="bottom", freeze_layers=0.5, freeze_lora={"r": 4, True: "frozen"})
    assert arguments.freeze_lora == {"r": 4, "on": "frozen"}


def test_plan_shows_the_mix(tmp_path):
    from hf_freeze.config import FreezeArguments
    from hf_freeze.tools.plan import make_plan
    from hf_freeze.tools.plan_report import format_plan, plan_as_dict

    model = build("llama")
    plain = make_plan(model, FreezeArguments(freeze_strategy="bottom", freeze_layers=0.5))
    mixed = make_plan(model, FreezeArguments(**POLICY))
    # 2 frozen layers x (q, k, v, o, gate, up, down): r x (in + out) each.
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    expected = 2 * sum(4 * (inputs + outputs) for inputs, outputs in shapes)
    assert mixed.adapter_parameters == expected
    assert mixed.policy_memory.weights - plain.policy_memory.weights == 4 * expected
    assert mixed.policy_memory.optimizer_states - plain.policy_memory.optimizer_states == 2 * 4 * expected
    assert plan_as_dict(mixed)["totals"]["freeze/lora_params"] == expected
    text = format_plan(mixed)
    assert "lora r=4" in text and f"LoRA adapter params: {expected:,}" in text


def test_layers_with_adapters_are_not_a_frozen_prefix():
    """The backward pass must reach the adapters: the layers that carry them are not cut off as a frozen prefix
    under activation checkpointing (only the embeddings are), while the same policy without adapters cuts both."""
    with_adapters = LayerFreezer(build("llama"), **POLICY)
    with_adapters.apply()
    without = LayerFreezer(build("llama"), freeze_strategy="bottom", freeze_layers=0.5)
    without.apply()
    assert without.applier.prefix_hooks.prefix.layers == ("model.layers.0", "model.layers.1")
    assert with_adapters.applier.prefix_hooks.prefix.layers == ()
