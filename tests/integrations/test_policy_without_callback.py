"""A policy in `FreezeTrainingArguments` without a `FreezeCallback` never trains every layer in silence."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer

from hf_freeze import FreezeCallback, FreezeConfigError, FreezeTrainingArguments


def _model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertForSequenceClassification(config)


def _data():
    return [{"input_ids": torch.randint(1, 100, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]


def _arguments(tmp_path, **policy):
    return FreezeTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", **policy,
    )


def test_a_trainer_without_the_callback_refuses_the_first_step(tmp_path):
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, args=_arguments(tmp_path, freeze_strategy="bottom", freeze_layers=1), train_dataset=_data())
    with pytest.raises(FreezeConfigError, match=r"callbacks=\[FreezeCallback\(\)\]") as error:
        trainer.train()
    assert error.value.fields == ("freeze_strategy",)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())  # no step was taken


def test_with_the_callback_the_policy_applies_and_trains(tmp_path):
    model = _model()
    trainer = Trainer(model=model, args=_arguments(tmp_path, freeze_strategy="bottom", freeze_layers=1),
                      train_dataset=_data(), callbacks=[FreezeCallback()])
    trainer.train()
    assert trainer.state.global_step == 2
    assert not model.bert.encoder.layer[0].output.dense.weight.requires_grad


def test_arguments_without_a_policy_need_no_callback(tmp_path):
    trainer = Trainer(model=_model(), args=_arguments(tmp_path), train_dataset=_data())
    trainer.train()
    assert trainer.state.global_step == 2
