"""The chunked causal-LM loss: the same loss and gradients as transformers' own, without the full logits."""

import pytest
import torch

from hf_freeze import FreezeCallback, FreezeConfigError, LayerFreezer
from hf_freeze.loss import ChunkedLossHooks, chunked_cross_entropy, chunked_loss_unsupported
from tiny import TokenClassificationData, build, snapshot, trainer_for, training_kwargs

from transformers import TrainingArguments

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": {}}
MODELS = {  # name -> (model type, config overrides): GPT-2's head is tied to its input embeddings, Llama's is not
    "gpt2-tied": ("gpt2", {}),
    "llama-untied": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
}


def _model(name, seed=0):
    model_type, overrides = MODELS[name]
    return build(model_type, seed=seed, **NO_DROPOUT[model_type], **overrides)


def _batch():
    ids = torch.randint(1, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt that is not trained on
    labels[2, -4:] = -100  # padding
    return ids, labels


def _loss_and_gradients(model, ids, labels, num_items_in_batch):
    model.zero_grad()
    output = model(input_ids=ids, labels=labels, num_items_in_batch=num_items_in_batch)
    (2.5 * output.loss).backward()  # a scaled loss, as gradient accumulation and loss scaling hand it over
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, gradients


@pytest.mark.parametrize("num_items_in_batch", [None, 50])
@pytest.mark.parametrize("head_trains", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_and_gradients_equal_the_models_own(name, head_trains, num_items_in_batch):
    model = _model(name)
    model.train()
    if not head_trains:
        model.get_output_embeddings().weight.requires_grad_(False)
    ids, labels = _batch()
    items = None if num_items_in_batch is None else torch.tensor(num_items_in_batch)
    expected, expected_gradients = _loss_and_gradients(model, ids, labels, items)
    head_outputs = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: head_outputs.append(output.shape))
    hooks = ChunkedLossHooks(model, chunk_tokens=7)  # 60 tokens: 9 chunks, the last one short
    output, gradients = _loss_and_gradients(model, ids, labels, items)
    hooks.remove()

    assert output.logits is None and head_outputs == [torch.Size([3, 0, 128])]  # no full logits, ever
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert gradients.keys() == expected_gradients.keys()
    head = next(key for key, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    assert (head in gradients) == head_trains
    for key in gradients:
        torch.testing.assert_close(gradients[key], expected_gradients[key], rtol=1e-4, atol=1e-6)


def test_a_head_with_a_bias():
    hidden = torch.randn(11, 6, requires_grad=True)
    weight = torch.randn(9, 6, requires_grad=True)
    bias = torch.randn(9, requires_grad=True)
    labels = torch.tensor([0, 1, 2, -100, 4, 5, 6, 7, 8, -100, 3])
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), labels)
    expected_gradients = torch.autograd.grad(expected, (hidden, weight, bias))
    loss = chunked_cross_entropy(hidden, weight, bias, labels, chunk_tokens=4)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight, bias)), expected_gradients):
        torch.testing.assert_close(got, want)


def test_calls_that_need_the_logits_get_them():
    model = _model("llama-untied")
    ids, labels = _batch()
    ChunkedLossHooks(model)
    model.train()
    assert model(input_ids=ids).logits.shape == (3, 20, 128)  # no labels: the logits are what is asked for
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits.shape == (3, 20, 128)
    model.eval()
    output = model(input_ids=ids, labels=labels)  # evaluation: `compute_metrics` reads the logits
    assert output.logits.shape == (3, 20, 128) and output.loss is not None


def test_on_by_default_for_causal_lms_and_refused_where_it_cannot_compute_the_loss():
    assert LayerFreezer(_model("gpt2-tied"), freeze_strategy="bottom", freeze_layers=2).add_ons["training_loss"].hooks is not None
    off = LayerFreezer(_model("gpt2-tied"), freeze_strategy="bottom", freeze_layers=2, freeze_chunked_loss=False)
    assert off.add_ons["training_loss"].hooks is None
    # Gemma 2 soft-caps its logits before the loss: left alone by default, refused when asked for.
    gemma = build("gemma2", head_dim=8)
    assert "final_logit_softcapping" in chunked_loss_unsupported(gemma)
    assert LayerFreezer(gemma, freeze_strategy="bottom", freeze_layers=2).add_ons["training_loss"].hooks is None
    with pytest.raises(FreezeConfigError) as error:
        LayerFreezer(build("bert"), freeze_strategy="bottom", freeze_layers=2, freeze_chunked_loss=True)
    assert error.value.fields == ("freeze_chunked_loss",)


def test_one_set_of_hooks_however_many_freezers_and_false_removes_them():
    model = _model("gpt2-tied")
    first = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2).add_ons["training_loss"].hooks
    assert LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2).add_ons["training_loss"].hooks is first
    LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2, freeze_chunked_loss=False)
    ids, labels = _batch()
    model.train()
    assert model(input_ids=ids, labels=labels).logits is not None


class MaskedTokens(TokenClassificationData):
    """Causal-LM data whose first labels are ignored, so that batches count different numbers of tokens."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        item["labels"][: index % 5] = -100
        return item


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-untied"])
def test_trainer_run_matches_the_unchunked_loss(tmp_path, name):
    """A real Trainer with gradient accumulation (it passes `num_items_in_batch`) and checkpointing: the chunked
    loss logs the same losses and ends at the same weights as transformers' own loss."""
    runs = {}
    for chunked in (True, False):
        model = _model(name)
        callback = FreezeCallback(freeze_strategy="bottom", freeze_layers=2, freeze_chunked_loss=chunked)
        args = TrainingArguments(**training_kwargs(
            tmp_path / str(chunked), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            gradient_checkpointing=True,
        ))
        trainer = trainer_for(model, args, [callback], data=MaskedTokens(causal_lm=True))
        trainer.train()
        assert (callback.freezer.add_ons["training_loss"].hooks is not None) == chunked
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[chunked] = (losses, snapshot(model))
    (losses, weights), (expected_losses, expected_weights) = runs[True], runs[False]
    assert len(losses) == 3
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for key in weights:  # AdamW divides by the gradients' size: float rounding of near-zero gradients shows a little
        torch.testing.assert_close(weights[key], expected_weights[key], rtol=1e-4, atol=2e-5)


def test_trainable_head_rows_turn_the_chunked_loss_off_and_asking_for_both_is_refused():
    # The LM head's trainable rows are put in place by a hook on the head's forward, which the chunked loss skips.
    from hf_freeze import FreezeConfigError, LayerFreezer
    from tiny import build

    freezer = LayerFreezer(build("llama"), freeze_strategy="pattern", freeze_patterns=[".*"], freeze_trainable_tokens=[3])
    assert freezer.add_ons["training_loss"].hooks is None
    with pytest.raises(FreezeConfigError) as caught:
        LayerFreezer(build("llama"), freeze_trainable_tokens=[3], freeze_chunked_loss=True)
    assert list(caught.value.fields) == ["freeze_chunked_loss"] and "rows of the LM head" in str(caught.value)


def test_the_prefix_cache_turns_the_chunked_loss_off_and_asking_for_both_is_refused():
    from hf_freeze import FreezeConfigError, LayerFreezer
    from tiny import build

    cached = dict(freeze_strategy="bottom", freeze_layers=2, freeze_cache_prefix=True, freeze_frozen_modules_eval=True)
    assert LayerFreezer(build("llama"), **cached).add_ons["training_loss"].hooks is None
    with pytest.raises(FreezeConfigError) as caught:
        LayerFreezer(build("llama"), **cached, freeze_chunked_loss=True)
    assert "freeze_cache_prefix" in str(caught.value)
