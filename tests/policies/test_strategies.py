"""Each strategy's selection: pure layouts first, then the trlx / LLaMA-Factory semantics on real models."""

import re

import pytest

from hf_freeze import STRATEGIES, FreezeArguments, FreezeConfigError, LayerFreezer, ModelLayout, decide, discover_layout

from tiny import build

LAYOUT = ModelLayout.from_layer_sizes([10] * 8, embeddings=5, norm=2, head=3)


def frozen_layers(options, layout=LAYOUT):
    decision = decide(layout, FreezeArguments(**options))
    return decision.frozen_layers(layout), decision


def test_bottom_freezes_the_first_layers_and_the_embeddings():
    layers, decision = frozen_layers(dict(freeze_strategy="bottom", freeze_layers=3))
    assert layers == [0, 1, 2]
    assert "embeddings.weight" in decision.frozen
    assert not decision.frozen & {"norm.weight", "head.weight", "head.bias"}


def test_fractions_are_rounded_to_the_nearest_count():
    assert frozen_layers(dict(freeze_strategy="bottom", freeze_layers=0.5))[0] == [0, 1, 2, 3]
    assert frozen_layers(dict(freeze_strategy="bottom", freeze_layers=0.25))[0] == [0, 1]
    assert frozen_layers(dict(freeze_strategy="top", freeze_layers=0.75))[0] == [2, 3, 4, 5, 6, 7]


def test_top_freezes_the_last_layers_and_keeps_embeddings_trainable():
    layers, decision = frozen_layers(dict(freeze_strategy="top", freeze_layers=2))
    assert layers == [6, 7]
    assert "embeddings.weight" not in decision.frozen


def test_interval_freezes_every_nth_layer_from_the_offset():
    assert frozen_layers(dict(freeze_strategy="interval"))[0] == [0, 2, 4, 6]
    assert frozen_layers(dict(freeze_strategy="interval", freeze_interval=3, freeze_interval_offset=1))[0] == [1, 4, 7]


def test_layers_accepts_negative_indices():
    assert frozen_layers(dict(freeze_strategy="layers", freeze_layer_indices=[0, -1, 3]))[0] == [0, 3, 7]


def test_non_layer_overrides_apply_on_top_of_the_strategy():
    _, decision = frozen_layers(dict(freeze_strategy="bottom", freeze_layers=2, freeze_embeddings=False, freeze_head=True))
    assert "embeddings.weight" not in decision.frozen
    assert {"head.weight", "head.bias"} <= decision.frozen


def test_head_only_and_bitfit_on_a_classifier():
    model = build("bert")
    layout = discover_layout(model)
    head_only = decide(layout, FreezeArguments(freeze_strategy="head_only"))
    assert set(layout.parameter_names) - head_only.frozen == {"classifier.weight", "classifier.bias"}

    bitfit = decide(layout, FreezeArguments(freeze_strategy="bitfit"))
    trainable = set(layout.parameter_names) - bitfit.frozen
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(name.endswith("bias") for name in trainable - {"classifier.weight"})
    assert "bert.encoder.layer.0.attention.self.query.bias" in trainable


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(FreezeConfigError, match="no bias parameters"):
        LayerFreezer(build("llama"), freeze_strategy="bitfit").apply()


def test_head_only_refuses_a_head_tied_to_the_embeddings():
    with pytest.raises(FreezeConfigError, match=r"tied to the input embeddings"):
        LayerFreezer(build("gpt2"), freeze_strategy="head_only").apply()


def test_pattern_is_anchored_with_literal_dots_and_trainable_patterns_win():
    layout = discover_layout(build("llama"))
    only_layer_3 = decide(layout, FreezeArguments(freeze_strategy="pattern", freeze_trainable_patterns=["model.layers.3."]))
    trainable = set(layout.parameter_names) - only_layer_3.frozen
    assert trainable and all(name.startswith("model.layers.3.") for name in trainable)

    # Anchored: "layers.0" alone matches nothing because names start with "model.".
    with pytest.raises(FreezeConfigError, match=r"`freeze_patterns` must be a pattern that matches.*got 'layers\.0'"):
        decide(layout, FreezeArguments(freeze_strategy="pattern", freeze_patterns=["layers.0"]))
    # Literal dots: "model.layers.0.mlp" does not match "model_layers_0_mlp"-like names, ".*" keeps its meaning.
    both = decide(
        layout,
        FreezeArguments(freeze_strategy="pattern", freeze_patterns=["model.layers.*"],
                        freeze_trainable_patterns=["model.layers.3.mlp.*"]),
    )
    assert "model.layers.3.mlp.up_proj.weight" not in both.frozen
    assert "model.layers.3.self_attn.q_proj.weight" in both.frozen
    assert "lm_head.weight" not in both.frozen


# ------------------------------------------------------------------------------------------------------------------
# Reference implementations, transcribed from the tools' own code, to prove users get the same trainable set.


def trlx_reference(model, num_layers_unfrozen):
    """trlx `freeze_bottom_causal_layers` (trlx/utils/modeling.py)."""
    hidden_layers = list(discover_layout(model).layers)
    modules = dict(model.named_modules())
    hidden = [modules[block.name] for block in hidden_layers]
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if num_layers_unfrozen == 0:
        to_freeze = hidden + [model.get_input_embeddings(), model.get_output_embeddings()]
    elif num_layers_unfrozen > 0:
        to_freeze = hidden[:-num_layers_unfrozen] + [model.get_input_embeddings()]
        if model.config.tie_word_embeddings:
            to_freeze += [model.get_output_embeddings()]
    else:
        to_freeze = []
    for module in to_freeze:
        module.requires_grad_(False)
    return {name for name, p in model.named_parameters() if p.requires_grad}


def llama_factory_reference(model, freeze_trainable_layers):
    """LLaMA-Factory `_setup_freeze_tuning` with freeze_trainable_modules='all' and no extra modules."""
    num_layers = model.config.num_hidden_layers
    if freeze_trainable_layers > 0:
        ids = range(max(0, num_layers - freeze_trainable_layers), num_layers)
    else:
        ids = range(min(-freeze_trainable_layers, num_layers))
    trainable_layers = [".{:d}.".format(idx) for idx in ids]
    return {name for name, _ in model.named_parameters() if any(t in name for t in trainable_layers)}


def trainable_after(model, **options):
    LayerFreezer(model, **options).apply()
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "gpt_neox"])
@pytest.mark.parametrize("unfrozen", [-1, 0, 1, 3])
def test_trlx_semantics_match_trlx(model_type, unfrozen):
    expected = trlx_reference(build(model_type), unfrozen)
    assert trainable_after(build(model_type), freeze_strategy="trlx", freeze_num_layers_unfrozen=unfrozen) == expected


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("count", [1, 2, -1, -3])
def test_llama_factory_semantics_match_llama_factory(model_type, count):
    expected = llama_factory_reference(build(model_type), count)
    assert trainable_after(build(model_type), freeze_strategy="llama_factory", freeze_trainable_layers=count) == expected


def test_every_registered_strategy_decides_on_a_real_model():
    """Generic: a strategy that lands in the registry is exercised here the day it lands."""
    model = build("bert")
    layout = discover_layout(model)
    example_options = {
        "bottom": dict(freeze_layers=1), "top": dict(freeze_layers=1), "layers": dict(freeze_layer_indices=[1]),
        "pattern": dict(freeze_patterns=["bert.embeddings.*"]), "trlx": dict(freeze_num_layers_unfrozen=2),
        "llama_factory": dict(freeze_trainable_layers=2), "llama_pro": dict(freeze_num_new_blocks=2),
    }
    for name in STRATEGIES:
        strategy = STRATEGIES.get(name)
        if strategy.dynamic:
            continue
        decision = decide(layout, FreezeArguments(freeze_strategy=name, **example_options.get(name, {})))
        assert decision.frozen <= set(layout.parameter_names), name
        if name != "none":
            assert decision.frozen, f"{name} froze nothing"
        assert re.match(r"^[a-z_]+$", name)
