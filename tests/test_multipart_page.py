"""docs/multi-part.md opens with the usual setups as YAML: each does what its comment says, on a tiny LLaVA (3
language layers, a 2-layer CLIP tower) or a tiny Qwen3-MoE (4 layers)."""

from pathlib import Path

import yaml

import tiny
from hf_freeze import FreezeCallback, LayerFreezer

PAGE = Path(__file__).resolve().parents[1] / "docs" / "multi-part.md"


def _setups():
    opening = PAGE.read_text().split("\n## ")[0]
    return [yaml.safe_load(block.split("```")[0]) for block in opening.split("```yaml\n")[1:]]


def _trainable(options, model):
    LayerFreezer(model, **options).apply()
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _under(names, prefix):
    return {name for name in names if name.startswith(prefix)}


def test_the_usual_setups_do_what_the_page_says():
    projector_only, freeze_tuning, bottom_half, moe = _setups()
    llava = tiny.tiny_llava()
    every = {name for name, _ in llava.named_parameters()}
    vision, projector = _under(every, "model.vision_tower."), _under(every, "model.multi_modal_projector.")
    layer = lambda index: _under(every, f"model.language_model.layers.{index}.")  # noqa: E731

    assert _trainable(projector_only, tiny.tiny_llava()) == projector

    trained = _trainable(freeze_tuning, tiny.tiny_llava())
    assert trained == layer(1) | layer(2)  # the last 2 of 3 language layers; tower, projector and the rest frozen

    trained = _trainable(bottom_half, tiny.tiny_llava())
    assert vision | projector | layer(2) <= trained  # half of 3 layers rounds to 2 frozen
    assert not trained & (layer(0) | layer(1) | _under(every, "model.language_model.embed_tokens"))

    model = tiny.build("qwen3_moe")
    trained = _trainable(moe, model)
    routers = {name for name, _ in model.named_parameters() if name.endswith("mlp.gate.weight")}
    assert len(routers) == 4 and not trained & routers
    assert {f"model.layers.{index}.mlp.experts.down_proj" for index in (2, 3)} <= trained
    assert "model.layers.1.mlp.experts.down_proj" not in trained

    FreezeCallback(freeze_vision_tower=True, freeze_language_model=True, freeze_multi_modal_projector=False)
