"""`freeze_cache_prefix`: training from the stored frozen-prefix states gives the losses and weights of training
without them (frozen modules in eval mode), with the Trainer and in a plain loop; what it cannot serve is refused."""

import logging
import os

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfigError, LayerFreezer
from hf_freeze.prefix_cache.store import META_FILE, STATES_FILE

from prefix_cache_data import VariableLengthData, pad_right
from tiny import build, snapshot, trainer_for, training_kwargs

CACHED = dict(freeze_strategy="bottom", freeze_layers=2, freeze_frozen_modules_eval=True)


def _train_bert(tmp_path, name, cache, **overrides):
    model = build("bert")  # dropout 0.1 in the trainable layers: the cache must not change the random stream
    options = dict(CACHED, freeze_cache_prefix=True) if cache else CACHED
    callback = FreezeCallback(**options)
    kwargs = training_kwargs(
        tmp_path / name, max_steps=-1, num_train_epochs=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        eval_strategy="epoch", per_device_eval_batch_size=5, **overrides,
    )
    trainer = Trainer(
        model=model, args=TrainingArguments(**kwargs), train_dataset=VariableLengthData(), data_collator=pad_right,
        eval_dataset=VariableLengthData(size=10, seed=7), callbacks=[callback],
    )
    trainer.train()
    return model, trainer, callback


def _losses(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_trainer_losses_and_weights_match_an_uncached_run(tmp_path):
    plain, plain_trainer, _ = _train_bert(tmp_path, "plain", cache=False)
    cached, cached_trainer, callback = _train_bert(tmp_path, "cached", cache=True)

    stats = callback.freezer.prefix_cache.stats()
    # Every training example is computed once, in the first epoch, and read in the two others; evaluation (10
    # examples a time, three times) neither reads nor fills the cache.
    assert (stats["misses"], stats["hits"]) == (24, 48)
    assert stats["examples"] == 0  # deleted when training ended
    assert not os.path.exists(tmp_path / "cached" / "frozen_prefix_cache")

    assert len(_losses(cached_trainer, "loss")) == len(_losses(plain_trainer, "loss")) > 0
    torch.testing.assert_close(_losses(cached_trainer, "loss"), _losses(plain_trainer, "loss"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_losses(cached_trainer, "eval_loss"), _losses(plain_trainer, "eval_loss"), rtol=1e-4, atol=1e-5)
    expected = snapshot(plain)
    for name, value in snapshot(cached).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # The trainable layers did train (the comparison is not between two untouched models).
    assert not torch.equal(snapshot(build("bert"))["classifier.weight"], expected["classifier.weight"])


def _plain_loop(cache, epochs=3, model_type="gpt2", checkpointing=False, **options):
    torch.manual_seed(0)
    model = build(model_type, **({"embd_pdrop": 0.0} if model_type == "gpt2" else {}))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": True})
    # The chunked loss is off with the cache: the uncached run computes the loss the same way, to compare exactly.
    freezer = LayerFreezer(model, **CACHED, freeze_chunked_loss=False,
                           **({"freeze_cache_prefix": True, **options} if cache else {}))
    freezer.apply()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = [torch.randint(1, 128, (4, 10), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    losses = []
    model.train()
    for epoch in range(epochs):
        for index in torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist():
            loss = model(data[index], labels=data[index]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return model, freezer, losses


def test_plain_loop_from_disk_matches_and_cleans_up(tmp_path):
    plain, _, plain_losses = _plain_loop(cache=False)
    folder = tmp_path / "cache"
    cached, freezer, cached_losses = _plain_loop(cache=True, freeze_cache_memory_mb=0, freeze_cache_dir=str(folder))
    stats = freezer.prefix_cache.stats()
    assert stats["memory_bytes"] == 0 and stats["disk_bytes"] == 12 * 10 * 32 * 4  # 12 examples, 10 tokens, float32
    assert (stats["misses"], stats["hits"]) == (12, 24)
    assert (folder / STATES_FILE).exists()
    torch.testing.assert_close(cached_losses, plain_losses, rtol=1e-5, atol=1e-6)
    expected = snapshot(plain)
    for name, value in snapshot(cached).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    freezer.close()
    assert not folder.exists()


def test_llama_under_reentrant_checkpointing_matches():
    # Rotary position embeddings and the causal mask are computed by the model itself in every epoch; the first
    # trainable layer, checkpointed, still gets a hidden-state input that carries gradients to its weights.
    plain, _, plain_losses = _plain_loop(cache=False, model_type="llama", checkpointing=True)
    cached, freezer, cached_losses = _plain_loop(cache=True, model_type="llama", checkpointing=True)
    assert freezer.prefix_cache.stats()["hits"] == 24
    torch.testing.assert_close(cached_losses, plain_losses, rtol=1e-5, atol=1e-6)
    expected = snapshot(plain)
    for name, value in snapshot(cached).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_half_precision_storage_is_close_but_rounded():
    _, _, plain_losses = _plain_loop(cache=False)
    _, freezer, half_losses = _plain_loop(cache=True, freeze_cache_dtype="float16")
    assert freezer.prefix_cache.stats()["memory_bytes"] == 12 * 10 * 32 * 2
    # Every epoch, the first included, trains from the stored (rounded) states.
    assert half_losses == pytest.approx(plain_losses, rel=1e-3)
    assert half_losses != plain_losses


def test_kept_folder_is_reused_only_by_the_same_model_and_prefix(tmp_path, caplog):
    folder = str(tmp_path / "kept")
    _, first, _ = _plain_loop(cache=True, epochs=1, freeze_cache_dir=folder, freeze_cache_keep=True)
    first.close()
    assert os.path.exists(os.path.join(folder, META_FILE))
    _, again, _ = _plain_loop(cache=True, epochs=1, freeze_cache_dir=folder, freeze_cache_keep=True)
    assert again.prefix_cache.store.reused == 12 and again.prefix_cache.stats()["misses"] == 0
    again.close()

    logging.getLogger("hf_freeze").addHandler(caplog.handler)
    try:
        model = build("gpt2", embd_pdrop=0.0, seed=1)  # other weights in the frozen prefix
        other = LayerFreezer(model, **CACHED, freeze_cache_prefix=True, freeze_cache_dir=folder)
        other.apply()
    finally:
        logging.getLogger("hf_freeze").removeHandler(caplog.handler)
    assert other.prefix_cache.store.reused == 0 and len(other.prefix_cache.store) == 0
    assert any("is not reused" in record.getMessage() for record in caplog.records)
    assert not os.path.exists(os.path.join(folder, META_FILE))


def test_dropout_before_the_first_trainable_layer_is_refused_at_the_first_step():
    model = build("gpt2")  # `embd_pdrop` 0.1: GPT-2's dropout after the embeddings belongs to no frozen module
    freezer = LayerFreezer(model, **CACHED, freeze_cache_prefix=True)
    freezer.apply()
    batch = torch.randint(1, 128, (2, 6))
    with pytest.raises(FreezeConfigError, match="transformer.drop") as error:
        model.train()(batch, labels=batch)
    assert "freeze_cache_prefix" in error.value.fields


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for index in range(8):
            yield VariableLengthData()[index]


def test_stream_and_random_masking_are_refused_before_training(tmp_path):
    args = TrainingArguments(**training_kwargs(tmp_path / "stream", max_steps=2))
    trainer = trainer_for(build("bert"), args, callbacks=[FreezeCallback(**CACHED, freeze_cache_prefix=True)], data=Stream())
    trainer.data_collator = pad_right
    with pytest.raises(FreezeConfigError, match="iterable"):
        trainer.train()

    class Tokenizer:  # what DataCollatorForLanguageModeling reads of a tokenizer
        mask_token, pad_token, mask_token_id, pad_token_id = "[MASK]", "[PAD]", 3, 0

        def __len__(self):
            return 128

    model = build("bert")
    args = TrainingArguments(**training_kwargs(tmp_path / "mlm", max_steps=2))
    trainer = trainer_for(model, args, callbacks=[FreezeCallback(**CACHED, freeze_cache_prefix=True)])
    trainer.data_collator = DataCollatorForLanguageModeling(Tokenizer(), mlm=True, mlm_probability=0.15)
    with pytest.raises(FreezeConfigError, match="masks tokens at random"):
        trainer.train()
