"""A Trainer built with `model_init` builds a new model in every `train()`: the policy must apply to that model."""

import torch
from transformers import Trainer

from hf_freeze import FreezeCallback, FreezeTrainingArguments

from tiny import TokenClassificationData, snapshot, tiny_bert, training_kwargs


def test_the_model_that_trains_is_the_one_frozen(tmp_path):
    built = []

    def model_init():
        built.append(tiny_bert())
        return built[-1]

    args = FreezeTrainingArguments(**training_kwargs(tmp_path, freeze_strategy="bottom", freeze_layers=2))
    trainer = Trainer(model_init=model_init, args=args, train_dataset=TokenClassificationData(size=32),
                      callbacks=[FreezeCallback()])
    for run in range(2):  # a second train() builds another model again
        trainer.train()
        trained = built[-1]
        assert trainer.model is trained and len(built) == 2 + run
        before = snapshot(tiny_bert())  # model_init's weights (same seed)
        after = snapshot(trained)
        for name, value in after.items():
            frozen = name.startswith(("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1."))
            assert torch.equal(value, before[name]) == frozen, name
            assert next(p for n, p in trained.named_parameters() if n == name).requires_grad != frozen, name


def test_a_pickled_callback_carries_the_policy_not_the_model(tmp_path):
    import pickle

    args = FreezeTrainingArguments(**training_kwargs(tmp_path))
    callback = FreezeCallback(freeze_strategy="bottom", freeze_layers=2)
    Trainer(model=tiny_bert(), args=args, train_dataset=TokenClassificationData(size=8), callbacks=[callback])
    assert callback.freezer is not None
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.freezer is None and copy._given.freeze_options() == callback._given.freeze_options()
    # Trained elsewhere (a Ray Tune worker), the copy sets itself up for that process's model.
    model = tiny_bert()
    Trainer(model=model, args=args, train_dataset=TokenClassificationData(size=8), callbacks=[copy]).train()
    assert not model.bert.encoder.layer[1].output.dense.weight.requires_grad
    assert model.bert.encoder.layer[2].output.dense.weight.requires_grad
