"""`progressive` with `freeze_granularity: module` against Composer's `LayerFreezing`
(composer/algorithms/layer_freezing/layer_freezing.py), transcribed below in our own words.

What Composer does at the end of every epoch, with `elapsed` the fraction of training done:
* it walks the model depth first, in the order the submodules were registered, and lists every module that has no
  submodules and at least one parameter (a module with submodules is never listed, even when it also holds
  parameters of its own; a module reached twice is listed twice);
* the fraction to freeze is 0 while `elapsed` is at most `freeze_start`, else `freeze_level` times
  (elapsed - start) / (1 - start);
* the count is that fraction times the number of listed modules less one, truncated; the list less its last module
  is the candidates, and the first `count` of them get `requires_grad = False` on every parameter (and leave the
  optimizer). Nothing is ever unfrozen; the last listed module is never frozen by the count.
"""

import pytest
import torch
from transformers import TrainerCallback

from hf_freeze import FreezeArguments, FreezeCallback, FreezeTrainingArguments, ModelLayout, TrainingProgress
from hf_freeze import decide, discover_layout

from tiny import TokenClassificationData, build, snapshot, trainer_for, training_kwargs

ARCHITECTURES = ["llama", "qwen3_moe", "gpt2", "bert", "vit", "t5", "gemma2", "phi3"]


def composer_leaves(module):
    children = list(module.children())
    if not children:
        return [module] if list(module.parameters()) else []
    return [leaf for child in children for leaf in composer_leaves(child)]


def composer_fraction(elapsed, freeze_start, freeze_level):
    if elapsed <= freeze_start:
        return 0.0
    return freeze_level * ((elapsed - freeze_start) / (1.0 - freeze_start))


def composer_frozen_names(model, elapsed, freeze_start=0.5, freeze_level=1.0):
    """Freeze a fresh copy of the parameters as Composer would, and read back which names are frozen."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    leaves = composer_leaves(model)
    count = int(composer_fraction(elapsed, freeze_start, freeze_level) * len(leaves[:-1]))
    for leaf in leaves[:-1][:count]:
        for parameter in leaf.parameters():
            parameter.requires_grad_(False)
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def module_args(**options):
    return FreezeArguments(
        freeze_strategy="progressive", freeze_granularity="module", freeze_schedule_unit="epoch", **options
    )


def frozen_at(layout, args, epoch, num_epochs):
    return set(decide(layout, args, TrainingProgress(epoch=float(epoch), num_epochs=float(num_epochs))).frozen)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("freeze_start,freeze_level", [(0.5, 1.0), (0.0, 1.0), (0.3, 0.75), (0.1, 0.5)])
def test_frozen_parameters_after_every_epoch_match_composer(architecture, freeze_start, freeze_level):
    model = build(architecture)
    layout = discover_layout(model)
    args = module_args(freeze_start=freeze_start, freeze_level=freeze_level)
    for num_epochs in (3, 10):
        for done in range(num_epochs + 1):
            expected = composer_frozen_names(model, done / num_epochs, freeze_start, freeze_level)
            assert frozen_at(layout, args, done, num_epochs) == expected, (num_epochs, done)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_leaf_list_is_composers(architecture):
    model = build(architecture)
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    expected = [names[id(leaf)] for leaf in composer_leaves(model)]
    assert [path for path, _ in discover_layout(model).leaf_modules] == expected


def test_llama_leaves_counted_by_hand_and_the_last_never_freezes():
    model = build("llama")
    layout = discover_layout(model)
    # embed_tokens; per layer q, k, v, o, gate, up, down projections and two norms; the final norm; lm_head. The
    # rotary embedding and the activation hold no parameter: not leaves.
    assert len(layout.leaf_modules) == 1 + 4 * 9 + 1 + 1
    frozen = frozen_at(layout, module_args(freeze_start=0.0), 1, 1)
    assert frozen == set(layout.parameter_names) - {"lm_head.weight"}


def test_freezing_stops_inside_a_layer():
    layout = discover_layout(build("llama"))
    args = module_args(freeze_start=0.0)
    # 38 candidates over 19 epochs: two more leaves each epoch. After epoch 2: embed_tokens, q_proj, k_proj, v_proj.
    frozen = frozen_at(layout, args, 2, 19)
    assert int(2 / 19 * 38) == 4
    assert frozen == {
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    }
    assert decide(layout, args, TrainingProgress(epoch=2.0, num_epochs=19.0)).frozen_layers(layout) == []


def test_composers_truncation_of_a_count_just_below_a_whole_number():
    # 6 leaves, so 5 candidates; start 0.5, 10 epochs: after epoch 6 the count is 0.2 * 5 computed as 0.999...,
    # truncated to 0, as in Composer; after epoch 7, 1 (computed as 1.999...).
    layout = ModelLayout.from_layer_sizes([4] * 6)
    counts = [len(frozen_at(layout, module_args(), epoch, 10)) for epoch in range(11)]
    assert counts == [int(composer_fraction(epoch / 10, 0.5, 1.0) * 5) for epoch in range(11)]
    assert counts[5:] == [0, 0, 1, 3, 4, 5]


def test_a_tied_head_freezes_with_the_embeddings_as_in_composer():
    model = build("gpt2")
    layout = discover_layout(model)
    assert layout.leaf_modules[-1] == ("lm_head", ("transformer.wte.weight",))
    # The embedding is the first leaf: freezing it freezes the one tensor the head shares.
    frozen = frozen_at(layout, module_args(freeze_start=0.0), 1, 10)
    assert "transformer.wte.weight" in frozen and frozen == composer_frozen_names(model, 0.1, 0.0, 1.0)


class FrozenAtEpochStart(TrainerCallback):
    def __init__(self, model):
        self.model, self.seen, self.values = model, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % 2 == 0:  # the first step of an epoch (2 steps an epoch)
            self.seen.append({name for name, p in self.model.named_parameters() if not p.requires_grad})
            self.values.append(snapshot(self.model))


def test_a_trainer_run_freezes_what_composer_freezes_after_each_epoch(tmp_path):
    model = build("llama")
    reference = build("llama")
    before = snapshot(model)
    recorder = FrozenAtEpochStart(model)
    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path, max_steps=-1, num_train_epochs=5),
        freeze_strategy="progressive", freeze_granularity="module", freeze_schedule_unit="epoch", freeze_start=0.2,
    )
    data = TokenClassificationData(size=16, causal_lm=True)  # batches of 8: 2 steps an epoch
    trainer_for(model, args, [recorder, FreezeCallback()], data=data).train()
    # What training in epoch k saw is what Composer froze at the end of epoch k - 1.
    expected = [composer_frozen_names(reference, done / 5, 0.2, 1.0) for done in range(5)]
    assert recorder.seen == expected
    assert expected[1] == set() and expected[2] and expected[4] > expected[3]
    # A parameter frozen as epoch k began kept its value to the end; the parameters never frozen moved.
    last = dict(model.named_parameters())
    for epoch, frozen in enumerate(expected):
        assert all(torch.equal(last[name], recorder.values[epoch][name]) for name in frozen), epoch
    assert all(not torch.equal(last[name], before[name]) for name in set(before) - expected[4])
