"""Training a few rows exactly, with a real Trainer: new token embeddings (tied and untied heads) and single experts.

Every frozen row must come out bit-identical under AdamW with weight decay, gradient accumulation and clipping; the
optimizer must hold state for the trainable rows only; checkpoints must be ordinary models that plain
`from_pretrained` loads; resuming must give the same weights as training straight through.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainingArguments

from tiny import SaveAt, TokenClassificationData, assert_same_outputs, build, trainer_for, training_kwargs

from hf_freeze import FreezeCallback, FreezeConfigError, LayerFreezer
from hf_freeze.apply import merge_rows_file, optimizer_state_bytes
from hf_freeze.model import record_vocabulary_size

BASE_VOCABULARY, RESIZED = 128, 136
NEW_TOKENS = list(range(BASE_VOCABULARY, RESIZED))
# Everything but the new tokens' rows frozen: the optimizer state is then the rows' alone.
ONLY_NEW_TOKENS = dict(freeze_strategy="pattern", freeze_patterns=[".*"], freeze_trainable_tokens="new")


def resized_llama(tied: bool, seed: int = 0):
    model = build("llama", seed=seed, tie_word_embeddings=tied)
    record_vocabulary_size(model)
    model.resize_token_embeddings(RESIZED)
    return model


def train(model, output_dir, policy, steps=4, callbacks=(), resume=None, vocab=RESIZED, **training):
    arguments = dict(max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                     gradient_accumulation_steps=2, max_grad_norm=0.5)
    arguments.update(training)
    callback = FreezeCallback(**policy)
    trainer = trainer_for(model, TrainingArguments(**training_kwargs(output_dir, **arguments)),
                          callbacks=[callback, *callbacks], data=TokenClassificationData(vocab=vocab, causal_lm=True))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback.freezer


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("hf_freeze_rows.")}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_new_tokens_train_and_every_other_row_is_bit_identical(tmp_path, tied):
    model = resized_llama(tied)
    before = snapshot(model)
    trainer, freezer = train(model, tmp_path, dict(freeze_strategy="none", freeze_trainable_tokens="new"))
    freezer.applier.rows.merge()
    after = snapshot(model)
    heads = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for name in heads:
        assert torch.equal(after[name][:BASE_VOCABULARY], before[name][:BASE_VOCABULARY]), name
        assert not torch.equal(after[name][BASE_VOCABULARY:], before[name][BASE_VOCABULARY:]), name
    # The rest of the model trained as usual ('none' freezes nothing else).
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert model.model.embed_tokens.weight.grad is None and not model.model.embed_tokens.weight.requires_grad
    metrics = trainer.state.log_history[-1]
    assert metrics["freeze/trainable_rows"] == len(NEW_TOKENS) * len(heads)
    assert metrics["freeze/trainable_row_bytes"] == len(NEW_TOKENS) * len(heads) * model.config.hidden_size * 4


def test_optimizer_state_is_the_rows_alone(tmp_path):
    model = resized_llama(tied=False)
    trainer, freezer = train(model, tmp_path, ONLY_NEW_TOKENS, steps=2)
    rows = freezer.applier.rows.parameters
    assert set(rows) == {"model.embed_tokens.weight", "lm_head.weight"}
    # AdamW: two moments per trainable element, and a step count per parameter.
    hidden = model.config.hidden_size
    expected = sum(2 * p.numel() * 4 + 4 for p in rows.values())
    assert expected == 2 * (2 * len(NEW_TOKENS) * hidden * 4 + 4)
    assert optimizer_state_bytes(trainer.optimizer) == expected


def test_gradient_clipping_norm_covers_only_the_trainable_rows():
    model = resized_llama(tied=False)
    freezer = LayerFreezer(model, **ONLY_NEW_TOKENS)
    freezer.apply()
    ids = torch.tensor([[1, 130, 5, 135, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert sorted(n for n, _ in with_grad) == ["hf_freeze_rows.rows.lm_head__weight", "hf_freeze_rows.rows.model__embed_tokens__weight"]
    rows_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in with_grad]))
    assert torch.equal(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9), rows_norm)
    # Only rows whose token was in the input get a gradient from the input embeddings.
    input_rows = freezer.applier.rows.parameters["model.embed_tokens.weight"].grad
    assert [bool(row.any()) for row in input_rows] == [token in (130, 135) for token in NEW_TOKENS]


def test_checkpoint_is_an_ordinary_model_and_rows_file_merges_into_the_base(tmp_path):
    model = resized_llama(tied=False)
    trainer, freezer = train(model, tmp_path / "run", ONLY_NEW_TOKENS, steps=2, callbacks=[SaveAt(2)])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        assert not [key for key in handle.keys() if "hf_freeze" in key]
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)  # no hf_freeze hooks on this one
    assert not hasattr(plain, "hf_freeze_rows")
    freezer.applier.rows.merge()
    trained = snapshot(model)
    for name, parameter in plain.named_parameters():
        assert torch.equal(parameter, trained[name]), name
    ids = torch.tensor([[3, 129, 131, 7]])
    model.eval()
    assert_same_outputs(plain(ids).logits, model(ids).logits)  # same weights (bit for bit, above), apart

    # Just the rows, with their token ids: a small file that a base model takes in later.
    rows_file = tmp_path / "rows.safetensors"
    size = freezer.save_rows(str(rows_file))
    with safe_open(rows_file, framework="pt") as handle:
        assert json.loads(handle.metadata()["rows"])["lm_head.weight"] == NEW_TOKENS
    assert size < os.path.getsize(checkpoint / "model.safetensors") / 10
    base = resized_llama(tied=False)
    assert merge_rows_file(base, str(rows_file)) == {"model.embed_tokens.weight": 8, "lm_head.weight": 8}
    for name, parameter in base.named_parameters():
        assert torch.equal(parameter, trained[name]), name


def test_resume_is_bit_identical(tmp_path):
    policy = dict(freeze_strategy="bottom", freeze_layers=2, freeze_trainable_tokens="new")
    straight = resized_llama(tied=True)
    train(straight, tmp_path, policy, callbacks=[SaveAt(2)])  # four steps, with a checkpoint after the second
    resumed = resized_llama(tied=True)
    _, freezer = train(resumed, tmp_path / "again", policy, resume=str(tmp_path / "checkpoint-2"))
    # `state_dict` merges the trained rows into their full parameters.
    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert freezer.applier.rows.selection() == {"model.embed_tokens.weight": tuple(NEW_TOKENS)}


def test_resume_refuses_other_rows(tmp_path):
    model = resized_llama(tied=True)
    train(model, tmp_path, dict(freeze_strategy="none", freeze_trainable_tokens=[130, 131]), steps=2, callbacks=[SaveAt(2)])
    again = resized_llama(tied=True)
    with pytest.raises(FreezeConfigError, match="other rows of model.embed_tokens.weight"):
        train(again, tmp_path, dict(freeze_strategy="none", freeze_trainable_tokens=[130]),
              resume=str(tmp_path / "checkpoint-2"))


def test_activation_checkpointing_gives_the_same_rows(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = resized_llama(tied=False)
        _, freezer = train(model, tmp_path / str(checkpointing), dict(freeze_strategy="none", freeze_trainable_tokens="new"),
                           steps=2, gradient_checkpointing=checkpointing)
        results.append({name: p.detach().clone() for name, p in freezer.applier.rows.parameters.items()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name])


def test_experts_train_only_their_slices(tmp_path):
    model = build("qwen3_moe", seed=0)
    before = snapshot(model)
    policy = dict(freeze_strategy="none", freeze_trainable_experts=[1, "3:2"], freeze_router=True)
    trainer, freezer = train(model, tmp_path, policy, steps=3, vocab=BASE_VOCABULARY, gradient_checkpointing=True)
    freezer.applier.rows.merge()
    after = snapshot(model)
    for layer in range(4):
        trained = [1, 2] if layer == 3 else [1]
        for kind in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{kind}"
            for expert in range(4):
                same = torch.equal(after[name][expert], before[name][expert])
                assert same == (expert not in trained), (name, expert)
        assert torch.equal(after[f"model.layers.{layer}.mlp.gate.weight"], before[f"model.layers.{layer}.mlp.gate.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    slices = sum(p.numel() for p in freezer.applier.rows.parameters.values())
    expert_size = before["model.layers.0.mlp.experts.gate_up_proj"][0].numel() + before["model.layers.0.mlp.experts.down_proj"][0].numel()
    assert slices == 5 * expert_size
    assert "1/4 experts of gate_up_proj" in freezer.table()


def test_new_counts_from_the_checkpoint_the_model_was_loaded_from(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(FreezeConfigError, match="never resized"):
        LayerFreezer(AutoModelForCausalLM.from_pretrained(tmp_path), freeze_trainable_tokens="new")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    model.resize_token_embeddings(131)
    freezer = LayerFreezer(model, freeze_trainable_tokens="new")
    freezer.apply()
    assert freezer.applier.rows.selection()["lm_head.weight"] == (128, 129, 130)
    assert freezer.state_dict()["rows"] == {
        "base_vocabulary": 128, "selection": {"model.embed_tokens.weight": [128, 129, 130], "lm_head.weight": [128, 129, 130]}}
