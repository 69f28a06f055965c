"""Discovery on multi-part models: the parts of vision-language models and the components of MoE layers."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from hf_freeze import FreezeArguments, decide, discover_layout
from hf_freeze.report.metrics import format_block_table

_TEXT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=128,
             num_key_value_heads=2, max_position_embeddings=64)
_SIGLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)


def _vlm(model_type, **config):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **config))


VLMS = {
    "llava": lambda: _vlm(
        "llava", text_config=dict(_TEXT, model_type="llama"), image_token_index=127,
        vision_config=dict(_SIGLIP, model_type="clip_vision_model", projection_dim=32),
    ),
    "qwen2_vl": lambda: _vlm(
        "qwen2_vl", image_token_id=127, video_token_id=126, vision_start_token_id=125,
        text_config=dict(_TEXT, model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
    ),
    "gemma3": lambda: _vlm(
        "gemma3", mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126,
        text_config=dict(_TEXT, model_type="gemma3_text", head_dim=8, sliding_window=16),
        vision_config=dict(_SIGLIP, model_type="siglip_vision_model"),
    ),
    "idefics3": lambda: _vlm(
        "idefics3", image_token_id=127, scale_factor=2, text_config=dict(_TEXT, model_type="llama"), vision_config=_SIGLIP,
    ),
}
# model type -> (vision tower, projector, language model) module paths discovery must find
EXPECTED_PARTS = {
    "llava": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "qwen2_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "gemma3": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "idefics3": ("model.vision_model", "model.connector", "model.text_model"),
}


def _moe(model_type, **config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **_TEXT, **config))


MOES = {
    "mixtral": lambda: _moe("mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: _moe("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "deepseek_v3": lambda: _moe(
        "deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, n_group=1, topk_group=1,
    ),
}


def _part_of(layout, parameter):
    return layout.block_of()[parameter].part


@pytest.mark.parametrize("model_type", sorted(VLMS))
def test_vision_language_parts(model_type):
    model = VLMS[model_type]()
    layout = discover_layout(model)
    vision, projector, language = EXPECTED_PARTS[model_type]
    assert layout.parts == ["vision", "projector", "language"]
    for name, _ in model.named_parameters():
        expected = (
            "projector" if name.startswith(projector + ".")
            else "vision" if name.startswith(vision + ".")
            else "language"
        )
        assert _part_of(layout, name) == expected, name
    # The layers that policies count are the language model's, numbered from 0; the vision layers are layers too.
    assert [block.name for block in layout.layers] == [f"{language}.layers.{i}" for i in range(3)]
    assert [block.layer_index for block in layout.layers] == [0, 1, 2]
    vision_layers = [b for b in layout.blocks_of_part("vision") if b.kind == "layer"]
    assert len(vision_layers) == 2 and all(b.layer_index is None for b in vision_layers)
    # Forward order: the vision tower, the projector, then the language model.
    parts_in_order = [block.part for block in layout.blocks]
    assert parts_in_order == sorted(parts_in_order, key=["vision", "projector", "language"].index)
    assert "part" in format_block_table(layout, set()).splitlines()[0]


def test_qwen2_vl_vision_tower_option_leaves_the_merger_alone():
    # LLaMA-Factory #6754: freezing the vision tower also froze Qwen2-VL's merger, which sits inside `visual`.
    layout = discover_layout(VLMS["qwen2_vl"]())
    frozen = decide(layout, FreezeArguments(freeze_vision_tower=True, freeze_multi_modal_projector=False)).frozen
    assert "model.visual.blocks.0.attn.qkv.weight" in frozen
    assert not any(name.startswith("model.visual.merger.") for name in frozen)


def test_llava_llama_factory_trains_the_language_models_first_layer():
    layout = discover_layout(VLMS["llava"]())
    decision = decide(layout, FreezeArguments(freeze_strategy="llama_factory", freeze_trainable_layers=-1))
    trainable = [name for name in layout.parameter_names if name not in decision.frozen]
    assert trainable and all(name.startswith("model.language_model.layers.0.") for name in trainable)
    assert "model.vision_tower.encoder.layers.0.mlp.fc1.weight" in decision.frozen


def test_text_only_models_have_no_parts():
    from tiny import build

    layout = discover_layout(build("llama"))
    assert layout.parts == [] and all(block.part is None for block in layout.blocks)
    assert layout.components == {}


@pytest.mark.parametrize("model_type", sorted(MOES))
def test_moe_components(model_type):
    model = MOES[model_type]()
    layout = discover_layout(model)
    names = dict(model.named_parameters())
    routers = layout.components["router"]
    assert routers and all(".mlp.gate." in name for name in routers)
    assert all(names[name].shape[0] == 4 for name in routers)  # one row per expert
    assert all(".mlp.experts." in name for name in layout.components["routed_experts"])
    shared = layout.components.get("shared_experts", ())
    assert bool(shared) == (model_type == "deepseek_v3")
    assert all(".mlp.shared_experts." in name for name in shared)
    # Components are parameter groups inside the layers: the layers themselves are unchanged.
    assert layout.num_layers == 3


class _RenamedVisionLanguageModel(torch.nn.Module):
    """A vision-language model whose parts have names no rule knows (``eye``, ``bridge``, ``brain``)."""

    def __init__(self):
        super().__init__()
        llava = VLMS["llava"]()
        self.eye = llava.model.vision_tower
        self.bridge = llava.model.multi_modal_projector
        self.brain = llava.model.language_model
        self.head = llava.lm_head


def test_component_paths_name_the_parts_discovery_cannot_find():
    model = _RenamedVisionLanguageModel()
    arguments = FreezeArguments(
        freeze_strategy="bottom", freeze_layers=1,
        freeze_component_paths='{"vision_tower": "eye", "projector": ["bridge"], "language_model": "brain"}',
    )
    assert arguments.freeze_component_paths == {"vision_tower": ["eye"], "projector": ["bridge"], "language_model": ["brain"]}
    layout = discover_layout(model, component_paths=arguments.freeze_component_paths)
    assert layout.parts == ["vision", "projector", "language"]
    assert _part_of(layout, "bridge.linear_1.weight") == "projector"
    assert _part_of(layout, "eye.encoder.layers.0.mlp.fc1.weight") == "vision"
    # The counted layers are the language model's: `bottom 1` freezes the brain's first layer, and the vision tower
    # follows the language model's embeddings (frozen with them, as `bottom` freezes the embeddings).
    assert [block.name for block in layout.layers] == [f"brain.layers.{i}" for i in range(3)]
    frozen = decide(layout, arguments).frozen
    assert "brain.layers.0.mlp.up_proj.weight" in frozen and "brain.layers.1.mlp.up_proj.weight" not in frozen


def test_a_multi_part_model_whose_parts_cannot_be_told_apart_is_refused_with_the_fix():
    import copy

    from hf_freeze import LayerDiscoveryError

    model = VLMS["llava"]()
    base = model.model
    # Hide the language model: another attribute name, and a config that is no longer the model's text config.
    base._modules["decoder_stack"] = base._modules.pop("language_model")
    hidden_config = copy.deepcopy(model.config.text_config)
    for module in base.decoder_stack.modules():
        if getattr(module, "config", None) is model.config.text_config:
            module.config = hidden_config
    with pytest.raises(LayerDiscoveryError) as caught:
        discover_layout(model)
    assert set(caught.value.fields) == {"freeze_component_paths", "freeze_layer_paths"}
    assert "language model could not be found" in str(caught.value)
    # The fix the message names works.
    layout = discover_layout(
        model,
        component_paths={"vision_tower": ["model.vision_tower"], "language_model": ["model.decoder_stack"]},
    )
    assert [block.name for block in layout.layers][0] == "model.decoder_stack.layers.0"


def test_component_paths_from_a_yaml_file_and_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(FreezeArguments)
    (arguments,) = parser.parse_args_into_dataclasses(
        ["--freeze_component_paths", "{vision_tower: eye, language_model: brain}"]
    )
    assert arguments.freeze_component_paths == {"vision_tower": ["eye"], "language_model": ["brain"]}
    config = tmp_path / "freeze.yaml"
    config.write_text("freeze_component_paths:\n  vision_tower: eye\n  projector: [bridge, bridge2]\n  language_model: brain\n")
    (arguments,) = parser.parse_yaml_file(str(config))
    assert arguments.freeze_component_paths["projector"] == ["bridge", "bridge2"]


def test_reports_count_the_stack_the_strategy_counts_and_show_every_part():
    from hf_freeze import LayerFreezer

    model = VLMS["llava"]()
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=1, freeze_layer_stack="vision")
    freezer.prepare()
    metrics = freezer.metrics()
    # The vision tower's first layer is frozen: the count is of the vision tower's two layers, not the language model's.
    assert metrics["freeze/frozen_layers"] == 1 and freezer.layout.num_layers == 2
    assert all(name.startswith("model.vision_tower.") for name in freezer.frozen_names() if ".layers." in name)
    sizes = {part: sum(b.num_parameters for b in freezer.layout.blocks_of_part(part)) for part in freezer.layout.parts}
    frozen = set(freezer.frozen_names())
    for part, total in sizes.items():
        trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen and _part_of(freezer.layout, n) == part)
        assert metrics[f"freeze/trainable_params/{part}"] == trainable <= total
    assert metrics["freeze/trainable_params"] == sum(metrics[f"freeze/trainable_params/{p}"] for p in sizes)
    by_part = [line for line in freezer.report_lines() if line.startswith("by part: ")]
    assert by_part and "vision: " in by_part[0] and "frozen layers 1/2" in by_part[0] and "language: " in by_part[0]


def test_freeze_unused_modalities_contradicting_a_part_option_is_refused():
    from hf_freeze import FreezeConfigError

    with pytest.raises(FreezeConfigError) as caught:
        FreezeArguments(freeze_unused_modalities=True, freeze_vit=False)
    assert {"freeze_unused_modalities", "freeze_vit"} <= set(caught.value.fields)
    layout = discover_layout(VLMS["qwen2_vl"]())
    frozen = decide(layout, FreezeArguments(freeze_unused_modalities=True)).frozen
    # Qwen2-VL's merger is the projector, inside the vision tower: both freeze, the language model does not.
    assert {name for name in layout.parameter_names if name.startswith("model.visual.")} <= frozen
    assert not any(name.startswith("model.language_model.") for name in frozen)
