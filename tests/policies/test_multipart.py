"""Policies on multi-part layouts (hand-written, no torch): part options, their aliases, `freeze_layer_stack`, MoE."""

from types import SimpleNamespace

import pytest

from hf_freeze import Block, FreezeArguments, ModelLayout, decide
from hf_freeze.errors import FreezeConfigError
from hf_freeze.policies import registration_decision


def _block(name, kind, part, layer_index=None, stack=None):
    return Block(name, kind, (f"{name}.w",), (10,), layer_index, stack, part)


def vlm_layout():
    blocks = [
        _block("vision.embed", "embeddings", "vision", stack="vision.layers"),
        _block("vision.layers.0", "layer", "vision", stack="vision.layers"),
        _block("vision.layers.1", "layer", "vision", stack="vision.layers"),
        _block("projector", "embeddings", "projector", stack="text.layers"),
        _block("text.embed", "embeddings", "language", stack="text.layers"),
        *[_block(f"text.layers.{i}", "layer", "language", i, "text.layers") for i in range(4)],
        _block("text.norm", "norm", "language", stack="text.layers"),
        _block("lm_head", "head", "language", stack="text.layers"),
    ]
    return ModelLayout(tuple(blocks), input_embedding_parameters=("text.embed.w",), layer_parts=("language",)).counting(
        ("language",)
    )


def moe_layout():
    layout = ModelLayout.from_layer_sizes([10, 10], embeddings=5, head=3)
    return ModelLayout(
        layout.blocks, input_embedding_parameters=layout.input_embedding_parameters,
        components={"router": ("layers.0.gate.w",), "routed_experts": ("layers.0.experts.w",)},
    )


def _frozen_blocks(layout, **options):
    frozen = decide(layout, FreezeArguments(**options)).frozen
    return [block.name for block in layout.blocks if set(block.parameters) <= frozen]


def test_layer_strategies_count_the_language_model():
    assert _frozen_blocks(vlm_layout(), freeze_strategy="layers", freeze_layer_indices=[0]) == ["text.layers.0"]
    assert _frozen_blocks(vlm_layout(), freeze_strategy="top", freeze_layers=1) == ["text.layers.3"]


def test_llama_factory_freezes_vision_and_projector_by_default():
    frozen = _frozen_blocks(vlm_layout(), freeze_strategy="llama_factory", freeze_trainable_layers=-1)
    assert "text.layers.0" not in frozen and {"vision.layers.0", "projector", "text.layers.1"} <= set(frozen)
    trained = _frozen_blocks(
        vlm_layout(), freeze_strategy="llama_factory", freeze_trainable_layers=-1, freeze_vision_tower=False,
        freeze_multi_modal_projector=False,
    )
    assert not {"vision.embed", "vision.layers.0", "projector"} & set(trained)


def test_unset_parts_follow_the_input_embeddings():
    # 'bottom' freezes the token embedding: the vision tower and projector below it freeze too.
    frozen = _frozen_blocks(vlm_layout(), freeze_strategy="bottom", freeze_layers=1)
    assert frozen == ["vision.embed", "vision.layers.0", "vision.layers.1", "projector", "text.embed", "text.layers.0"]
    # An explicit part option wins.
    frozen = _frozen_blocks(vlm_layout(), freeze_strategy="bottom", freeze_layers=1, freeze_vit=False)
    assert "vision.layers.0" not in frozen and "projector" in frozen


def test_part_options_with_strategy_none_train_only_the_projector():
    frozen = _frozen_blocks(vlm_layout(), freeze_vision_tower=True, freeze_llm=True)
    assert "projector" not in frozen and len(frozen) == len(vlm_layout().blocks) - 1


def test_layer_stack_vision_and_all():
    assert _frozen_blocks(vlm_layout(), freeze_strategy="layers", freeze_layer_indices=[1], freeze_layer_stack="vision") == [
        "vision.layers.1"
    ]
    assert _frozen_blocks(vlm_layout(), freeze_strategy="layers", freeze_layer_indices=[2], freeze_layer_stack="all") == [
        "text.layers.0"
    ]


def test_alias_and_name_contradict():
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(freeze_vision_tower=True, freeze_vit=False)
    assert set(error.value.fields) == {"freeze_vision_tower", "freeze_vit"}
    assert FreezeArguments(freeze_aligner=True, freeze_multi_modal_projector=True).freeze_aligner is True


@pytest.mark.parametrize(
    "option, words", [("freeze_vision_tower", "no vision tower"), ("freeze_vit", "no vision tower"),
                      ("freeze_multi_modal_projector", "no multi-modal projector"), ("freeze_llm", "no separate language model")],
)
def test_part_option_refused_on_a_text_only_model(option, words):
    with pytest.raises(FreezeConfigError) as error:
        decide(ModelLayout.from_layer_sizes([10, 10]), FreezeArguments(**{option: True}))
    assert words in str(error.value) and option in error.value.fields


def test_layer_stack_vision_refused_without_vision_tower():
    with pytest.raises(FreezeConfigError) as error:
        decide(ModelLayout.from_layer_sizes([10, 10]), FreezeArguments(freeze_strategy="top", freeze_layers=1, freeze_layer_stack="vision"))
    assert error.value.fields == ("freeze_layer_stack",) or list(error.value.fields) == ["freeze_layer_stack"]


def test_bad_layer_stack_and_adaptive_refused():
    with pytest.raises(FreezeConfigError):
        FreezeArguments(freeze_layer_stack="text")
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(freeze_strategy="adaptive", freeze_layers=1, freeze_layer_stack="all")
    assert "freeze_layer_stack" in error.value.fields


def test_pattern_refuses_part_options():
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(freeze_strategy="pattern", freeze_patterns=["x"], freeze_vision_tower=True)
    assert "freeze_vision_tower" in error.value.fields


def test_router_and_shared_experts():
    layout = moe_layout()
    assert "layers.0.gate.w" in decide(layout, FreezeArguments(freeze_router=True)).frozen
    # false trains the router of a frozen layer
    frozen = decide(layout, FreezeArguments(freeze_strategy="bottom", freeze_layers=1, freeze_router=False)).frozen
    assert "layers.0.weight" in frozen and "layers.0.gate.w" not in frozen
    with pytest.raises(FreezeConfigError) as error:
        decide(layout, FreezeArguments(freeze_shared_experts=True))
    assert list(error.value.fields) == ["freeze_shared_experts"]
    with pytest.raises(FreezeConfigError) as error:
        decide(ModelLayout.from_layer_sizes([10, 10]), FreezeArguments(freeze_router=False))
    assert "dense model" in str(error.value) and list(error.value.fields) == ["freeze_router"]


def test_registration_keeps_followed_parts_trainable_for_schedules():
    # A schedule may freeze layer 0 later: until then the vision tower trains, so the optimizer must see it.
    options = FreezeArguments(freeze_strategy="progressive", freeze_start=0.5)
    assert not registration_decision(vlm_layout(), options).frozen
    assert "vision.layers.0.w" in registration_decision(vlm_layout(), FreezeArguments(freeze_vision_tower=True)).frozen


def test_options_as_a_plain_namespace():
    # Policies read options from any object: the new options may be missing altogether.
    options = SimpleNamespace(
        freeze_strategy="top", freeze_layers=1, freeze_embeddings=None, freeze_norm=None, freeze_head=None,
        freeze_respect_existing=None,
    )
    assert decide(vlm_layout(), options).frozen == {"text.layers.3.w"}
