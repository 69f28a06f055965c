"""Freezing under activation checkpointing: the frozen prefix runs forward once, gradients stay exactly right."""

import warnings

import pytest
import torch

from hf_freeze import FreezeArguments, FreezeCallback, LayerFreezer, ModelLayout, decide
from hf_freeze.apply import frozen_prefix
from tiny import build, snapshot, trainer_for, training_kwargs

from transformers import TrainingArguments

NO_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": {},
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "t5": dict(dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0),
}


def _inputs(model_type):
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    if model_type == "bert":
        return dict(input_ids=ids, labels=torch.tensor([0, 1]))
    if model_type == "t5":
        return dict(input_ids=ids, labels=ids.flip(1))
    return dict(input_ids=ids, labels=ids)


def _layers(model, freezer):
    return [model.get_submodule(block.name) for block in freezer.layout.layers]


def _count_layer_runs(model, freezer):
    """Count how often each layer's feed-forward part runs (checkpoint recomputation included)."""
    runs = {}
    for index, layer in enumerate(_layers(model, freezer)):
        inner = next(m for m in layer.modules() if m is not layer and not isinstance(m, torch.nn.ModuleList))
        original = inner.forward

        def counted(*args, _index=index, _original=original, **kwargs):
            runs[_index] = runs.get(_index, 0) + 1
            return _original(*args, **kwargs)

        inner.forward = counted
    return runs


def _gradients(model_type, layers_frozen, checkpointing=None, with_hooks=True):
    model = build(model_type, **NO_DROPOUT[model_type])
    if checkpointing is not None:
        model.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=layers_frozen)
    freezer.apply()
    if not with_hooks:
        freezer.applier.prefix_hooks.restore()
    runs = _count_layer_runs(model, freezer)
    model.train()
    model(**_inputs(model_type)).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return grads, runs


# -- the pure part -------------------------------------------------------------------------------------------------


def test_prefix_is_the_leading_run_of_frozen_blocks():
    layout = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, norm=2, head=3)
    prefix = frozen_prefix(layout, decide(layout, FreezeArguments(freeze_strategy="bottom", freeze_layers=2)).frozen)
    assert prefix.blocks == ("embeddings", "layers.0", "layers.1")
    assert prefix.layers == ("layers.0", "layers.1") and prefix.first_trainable_layer == "layers.2"
    # Trainable embeddings need the backward pass through every layer: nothing to cut.
    assert not frozen_prefix(layout, {"layers.0.weight", "layers.1.weight"}).active
    # Frozen top layers are no prefix either.
    top = decide(layout, FreezeArguments(freeze_strategy="top", freeze_layers=2)).frozen
    assert not frozen_prefix(layout, top | {"embeddings.weight"}).active


# -- gradients -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("layers_frozen", [1, 2, 3])
def test_same_gradients_as_without_checkpointing(model_type, layers_frozen, mode):
    reference, _ = _gradients(model_type, layers_frozen)
    grads, runs = _gradients(model_type, layers_frozen, checkpointing=mode)
    assert grads.keys() == reference.keys()
    for name, gradient in reference.items():
        assert gradient.abs().sum() > 0, name
        assert torch.equal(grads[name], gradient), name
    # The frozen prefix ran once; the trainable layers are recomputed when checkpointed reentrantly or not.
    assert [runs[i] for i in range(layers_frozen)] == [1] * layers_frozen
    assert all(runs[i] == 2 for i in range(layers_frozen, 4))


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_without_the_hooks_the_frozen_layers_are_recomputed(mode):
    # What the hooks remove: transformers' input-require-grads hook drags the frozen prefix into the graph.
    _, runs = _gradients("llama", 2, checkpointing=mode, with_hooks=False)
    assert runs == {0: 2, 1: 2, 2: 2, 3: 2}


@pytest.mark.parametrize("layers_frozen", [1, 3])
def test_encoder_decoder_gradients(layers_frozen):
    # T5 here: 2 encoder + 2 decoder layers; 3 frozen layers reach into the decoder.
    reference, _ = _gradients("t5", layers_frozen)
    grads, runs = _gradients("t5", layers_frozen, checkpointing="reentrant")
    assert grads.keys() == reference.keys()
    for name, gradient in reference.items():
        # Bit-exact for the decoder-only and encoder-only models above; T5 under checkpointing (hooks or not)
        # differs from the plain run in the last bits, so compare at float32 precision.
        torch.testing.assert_close(grads[name], gradient, msg=name)
    assert [runs[i] for i in range(layers_frozen)] == [1] * layers_frozen


def test_prefix_follows_a_changing_frozen_set():
    model = build("gpt2", **NO_DROPOUT["gpt2"])
    model.activation_checkpointing_enable({"use_reentrant": True})
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=3)
    freezer.apply()
    layers = _layers(model, freezer)
    assert [layer.gradient_checkpointing for layer in layers] == [False, False, False, True]
    # A schedule unfreezes two layers: they are checkpointed again and the gradients are those of bottom-1.
    freezer.apply(decision=decide(freezer.layout, FreezeArguments(freeze_strategy="bottom", freeze_layers=1)))
    assert freezer.applier.prefix_hooks.prefix.layers == ("transformer.h.0",)
    assert [layer.gradient_checkpointing for layer in layers] == [False, True, True, True]
    model.train()
    model(**_inputs("gpt2")).loss.backward()
    reference, _ = _gradients("gpt2", 1)
    for name, gradient in reference.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, gradient), name
    # Everything trainable again: no prefix, transformers' own hook does its job for reentrant checkpointing.
    model.zero_grad(set_to_none=True)
    freezer.apply(decision=decide(freezer.layout, FreezeArguments(freeze_strategy="none")))
    assert not freezer.applier.prefix_hooks.prefix.active
    assert all(layer.gradient_checkpointing for layer in layers)
    model(**_inputs("gpt2")).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_embedding_output_stays_out_of_the_graph():
    # transformers' input-require-grads hook, registered after the policy was applied, is neutralised again by the
    # next application (the Trainer re-applies in on_train_begin, after it switched checkpointing on).
    model = build("gpt2", **NO_DROPOUT["gpt2"])
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2)
    freezer.apply()
    model.activation_checkpointing_enable({"use_reentrant": True})
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad), prepend=True)
    model.train()
    model(**_inputs("gpt2"))
    freezer.apply()
    model(**_inputs("gpt2")).loss.backward()
    assert seen == [True, False]
    assert model.transformer.h[2].mlp.c_fc.weight.grad is not None


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradients_of_trainable_inputs_embeds_still_flow(mode):
    # A soft prompt, or any trainable input passed as `inputs_embeds`, needs the backward pass through the frozen
    # layers: the prefix only cuts what requires grad because of transformers' embedding hook.
    def input_gradient(checkpointing, with_hooks):
        model = build("llama")
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": mode == "reentrant"})
        freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2)
        freezer.apply()
        if not with_hooks:
            freezer.applier.prefix_hooks.restore()
        ids = _inputs("llama")["input_ids"]
        soft_prompt = torch.nn.Parameter(torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1)))
        embeds = torch.cat([soft_prompt, model.get_input_embeddings()(ids)], dim=1)
        model.train()
        model(inputs_embeds=embeds, labels=torch.cat([ids[:, :3], ids], dim=1)).loss.backward()
        return soft_prompt.grad

    reference = input_gradient(checkpointing=False, with_hooks=False)
    assert reference is not None and reference.abs().sum() > 0
    torch.testing.assert_close(input_gradient(checkpointing=True, with_hooks=True), reference)
    torch.testing.assert_close(input_gradient(checkpointing=False, with_hooks=True), reference)


def test_model_with_hooks_can_be_copied_and_pickled():
    import copy
    import pickle

    model = build("llama")
    LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2).apply()
    model(**_inputs("llama"))  # the hooks hold per-forward state now
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        clone(**_inputs("llama")).loss.backward()
        assert clone.model.layers[3].mlp.up_proj.weight.grad is not None


def test_checkpointing_enabled_after_the_freezer():
    # A plain loop may switch checkpointing on after applying the policy: the prefix still runs once.
    model = build("llama")
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2)
    freezer.apply()
    model.activation_checkpointing_enable({"use_reentrant": True})
    runs = _count_layer_runs(model, freezer)
    model.train()
    model(**_inputs("llama")).loss.backward()
    assert runs == {0: 1, 1: 1, 2: 2, 3: 2}
    assert model.model.layers[2].mlp.up_proj.weight.grad is not None


# -- a real Trainer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_trainer_with_gradient_checkpointing(tmp_path, use_reentrant):
    model = build("llama")
    before = snapshot(model)
    freezer_args = dict(freeze_strategy="bottom", freeze_layers=0.5)
    args = TrainingArguments(
        **training_kwargs(
            tmp_path, max_steps=3, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
        )
    )
    callback = FreezeCallback(**freezer_args)
    trainer = trainer_for(model, args, callbacks=[callback])
    layers = list(model.model.layers)
    runs = _count_layer_runs(model, callback.freezer)
    prefix_output_requires_grad, prefix_input_requires_grad = [], []
    layers[1].register_forward_hook(lambda module, args, output: prefix_output_requires_grad.append(output.requires_grad))
    layers[0].register_forward_pre_hook(lambda m, a: prefix_input_requires_grad.append(a[0].requires_grad), prepend=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert model.is_activation_checkpointing
    assert runs == {0: 3, 1: 3, 2: 6, 3: 6}  # 3 steps: the prefix once per step, the rest recomputed
    assert prefix_output_requires_grad == [False] * 3
    assert prefix_input_requires_grad == [False] * 3  # not even the embeddings are recorded
    after = snapshot(model)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == parameter.requires_grad, name
    assert any(name.startswith("model.layers.2.") and p.requires_grad for name, p in model.named_parameters())
    assert not [w for w in caught if "requires_grad" in str(w.message)]


def _vlm_gradients(checkpointing=None, freeze_vision_tower=None):
    from tiny import tiny_llava

    model = tiny_llava()
    if checkpointing is not None:
        model.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2, freeze_vision_tower=freeze_vision_tower)
    freezer.apply()
    runs = _count_layer_runs(model, freezer)  # the language model's layers: the counted ones
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((2, 16), 127), torch.randint(1, 120, (2, 8), generator=generator)], dim=1)
    model.train()
    model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32, generator=generator), labels=ids).loss.backward()
    # LLaVA reads the vision tower's second-to-last layer: its last layer and final norm get no gradient.
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return grads, runs, freezer


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_vision_language_model_frozen_prefix_spans_the_vision_tower(mode):
    # With the vision tower and projector frozen (they follow the frozen embeddings), the prefix runs from the
    # vision tower through the language model's frozen layers: they run forward once, gradients are unchanged.
    reference, _, _ = _vlm_gradients()
    grads, runs, freezer = _vlm_gradients(checkpointing=mode)
    prefix = freezer.applier.prefix_hooks.prefix
    assert prefix.blocks[0].startswith("model.vision_tower.") and prefix.first_trainable_layer == "model.language_model.layers.2"
    assert grads.keys() == reference.keys()
    for name, gradient in reference.items():
        torch.testing.assert_close(grads[name], gradient, msg=name)
    assert runs == {0: 1, 1: 1, 2: 2}
    # A trainable vision tower needs the backward pass through every language layer: no prefix to cut.
    _, runs, freezer = _vlm_gradients(checkpointing=mode, freeze_vision_tower=False)
    assert not freezer.applier.prefix_hooks.prefix.active and runs == {0: 2, 1: 2, 2: 2}
