"""The parts of a multi-part model, and the components inside mixture-of-experts layers, found from the structure.

A general rule, not a table of model names:

* a vision (or audio) encoder is the outermost module whose ``config`` is the model's ``config.vision_config``
  (``config.audio_config``), as transformers builds it; failing that, a module held as ``vision_tower``,
  ``visual``, ``vision_model`` (``audio_tower``, ...) by the model or its base model;
* the language model is the module whose ``config`` is ``config.text_config``; failing that ``language_model``,
  ``text_model`` or ``get_decoder()``;
* the projector is what joins them: a module held as ``multi_modal_projector``, ``connector``, ``merger`` (inside
  the vision encoder, as in Qwen2-VL, where freezing the encoder must not freeze it), ``mm_projector``,
  ``aligner``, plus every other parameter of the base model outside the encoders and the language model; the
  task head belongs to the language model;
* inside a mixture-of-experts layer, the routed experts are a module named ``experts``; the router is the sibling
  module whose weight has one row per expert (``gate``, ``router``); the shared experts are siblings whose name
  starts with ``shared`` (``shared_experts``, Qwen2-MoE's ``shared_expert`` and ``shared_expert_gate``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..errors import LayerDiscoveryError, few
from .layout import (
    AUDIO,
    COMPONENT_KEYS,
    LANGUAGE,
    LAYER,
    PARTS,
    PROJECTOR,
    ROUTED_EXPERTS,
    ROUTER,
    SHARED_EXPERTS,
    VISION,
    Block,
    ModelLayout,
    inside,
)
from .stacks import Stack, find_stacks, has_parameters

__all__ = ["base_model_prefix", "find_moe_components", "find_part_stacks", "find_parts", "part_of", "with_parts"]

_ENCODER_ATTRIBUTES = {
    VISION: ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder"),
    AUDIO: ("audio_tower", "audio_model", "audio_encoder"),
}
_ENCODER_CONFIGS = {VISION: "vision_config", AUDIO: "audio_config"}
_LANGUAGE_ATTRIBUTES = ("language_model", "text_model")
_PROJECTOR_ATTRIBUTES = ("multi_modal_projector", "connector", "merger", "mm_projector", "aligner", "audio_projector")


def find_parts(model: nn.Module, part_paths: Optional[Dict[str, List[str]]] = None) -> List[Tuple[str, str]]:
    """``[(part, module path), ...]`` in forward order (encoders, projectors, language model); ``[]`` for a
    single-part model. A part may be named by several paths (two projectors). ``part_paths`` (the
    ``freeze_component_paths`` option, checked by `check_component_paths`) names parts by hand; the others are
    found by the rule."""
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    given = _given_parts(model, modules, part_paths or {})
    encoders: Dict[str, str] = {part: paths[0] for part, paths in given.items() if part in (VISION, AUDIO)}
    language: Optional[str] = given[LANGUAGE][0] if LANGUAGE in given else None
    for path, module in modules.items():
        module_config = getattr(module, "config", None)
        if module_config is None or module is model:
            continue
        for part, key in _ENCODER_CONFIGS.items():
            if part not in encoders and module_config is getattr(config, key, None):
                encoders[part] = path
        if language is None and module_config is getattr(config, "text_config", None):
            language = path
    bases = [""] + ([model.base_model_prefix] if isinstance(getattr(model, "base_model_prefix", None), str) else [])
    for part, attributes in _ENCODER_ATTRIBUTES.items():
        if part not in encoders:
            encoders.update({part: path for path in _attribute_paths(modules, bases, attributes)[:1]})
    if language is None and (encoders or given):
        found = _attribute_paths(modules, bases, _LANGUAGE_ATTRIBUTES)
        language = found[0] if found else _decoder_path(model, modules)
        if language is not None and any(inside(path, language) for path in encoders.values()):
            language = None  # `get_decoder()` of some models returns the whole base model, encoders included
    says_multi_part = getattr(config, "text_config", None) is not None and any(
        getattr(config, key, None) is not None for key in _ENCODER_CONFIGS.values()
    )
    if (given or says_multi_part) and (not encoders or language is None):
        missing = "language model" if encoders else "vision or audio encoder"
        raise LayerDiscoveryError(
            f"{type(model).__name__} is a multi-part model (its config has "
            f"{'sub-configs for each part' if says_multi_part else 'parts named in `freeze_component_paths`'}), but "
            f"its {missing} could not be found. Name the parts with `freeze_component_paths`, e.g. "
            "`{vision_tower: model.vision_tower, projector: model.multi_modal_projector, language_model: "
            "model.language_model}`, and the layer containers with `freeze_layer_paths` if they are not found either. "
            f"Top-level modules: {few(_top_modules(model), 8)}.",
            fields=["freeze_component_paths", "freeze_layer_paths"],
        )
    if not encoders:
        return []
    if PROJECTOR in given:
        projectors = list(given[PROJECTOR])
    else:
        projectors = [
            path
            for path in _attribute_paths(modules, bases + list(encoders.values()), _PROJECTOR_ATTRIBUTES)
            if not inside(path, language) and has_parameters(modules[path])
        ]
    ordered = [(part, encoders[part]) for part in (AUDIO, VISION) if part in encoders]
    return ordered + [(PROJECTOR, path) for path in projectors] + [(LANGUAGE, language)]


def _given_parts(model: nn.Module, modules: Dict[str, nn.Module], part_paths: Dict[str, List[str]]):
    """``freeze_component_paths`` as ``{part: [paths]}``, each path checked to be a module with parameters."""
    given: Dict[str, List[str]] = {}
    for key, paths in part_paths.items():
        for path in paths:
            if path not in modules or not has_parameters(modules[path]):
                what = "is not a module of" if path not in modules else "holds no parameters in"
                raise LayerDiscoveryError(
                    f"`freeze_component_paths` entry {key}: {path!r} {what} {type(model).__name__}. "
                    f"Top-level modules: {few(_top_modules(model), 8)}.",
                    fields=["freeze_component_paths"],
                )
        given[COMPONENT_KEYS[key]] = list(paths)
    return given


def _top_modules(model: nn.Module) -> List[str]:
    """The module paths two levels down, where the parts of a multi-part model usually are."""
    return [path for path, _ in model.named_modules() if path and path.count(".") <= 1]


def _attribute_paths(modules: Dict[str, nn.Module], bases: Sequence[str], attributes: Sequence[str]) -> List[str]:
    found = []
    for base in bases:
        for attribute in attributes:
            path = f"{base}.{attribute}" if base else attribute
            if path in modules and has_parameters(modules[path]) and path not in found:
                found.append(path)
    return found


def _decoder_path(model: nn.Module, modules: Dict[str, nn.Module]) -> Optional[str]:
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model:
        return None
    return next((path for path, module in modules.items() if module is decoder), None)


def part_of(parameter_name: str, parts: Sequence[Tuple[str, str]], base_prefix: Optional[str]) -> str:
    """The part a parameter belongs to: the most specific part module around it; other parameters of the base
    model are the projector's (the glue between the encoders and the language model), the rest (the task head)
    the language model's."""
    best, best_length = None, -1
    for part, path in parts:
        if inside(parameter_name, path) and len(path) > best_length:
            best, best_length = part, len(path)
    if best is not None:
        return best
    if base_prefix and inside(parameter_name, base_prefix) and any(part == PROJECTOR for part, _ in parts):
        return PROJECTOR
    return LANGUAGE


def find_moe_components(model: nn.Module, layer_paths: Sequence[str]) -> Dict[str, Tuple[str, ...]]:
    """Parameter names of the routers, shared experts and routed experts inside the given layers; ``{}`` for
    dense layers."""
    components: Dict[str, List[str]] = {ROUTER: [], SHARED_EXPERTS: [], ROUTED_EXPERTS: []}
    for layer_path in layer_paths:
        layer = model.get_submodule(layer_path)
        for path, module in layer.named_modules(prefix=layer_path):
            experts = module._modules.get("experts")
            if experts is None or not has_parameters(experts):
                continue
            count = _expert_count(experts)
            for name, child in module.named_children():
                if child is None or not has_parameters(child):
                    continue
                names = [f"{path}.{name}.{parameter}" for parameter, _ in child.named_parameters()]
                if name == "experts":
                    components[ROUTED_EXPERTS] += names
                elif name.startswith("shared"):
                    components[SHARED_EXPERTS] += names
                elif count and any(p.dim() == 2 and p.shape[0] == count for p in child.parameters()):
                    components[ROUTER] += names
    return {key: tuple(names) for key, names in components.items() if names}


def _expert_count(experts: nn.Module) -> Optional[int]:
    if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        return len(experts)
    # transformers 5 fuses the routed experts into 3-D tensors: (experts, out, in).
    fused = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
    count = getattr(experts, "num_experts", None)
    return count if isinstance(count, int) else (fused[0].shape[0] if fused else None)


def base_model_prefix(model: nn.Module) -> Optional[str]:
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    return prefix if isinstance(base, nn.Module) and base is not model else None


def find_part_stacks(model: nn.Module, parts) -> Tuple[List[Stack], List[str]]:
    """Each encoder and the language model has its own layers, found inside it alone: a vision encoder is often a
    tenth of the language model's size, which the size rule of `_find_stacks` would drop."""
    stacks: List[Stack] = []
    notes: List[str] = []
    for part, path in parts:
        if part in PARTS and part != "projector":
            found, found_notes = find_stacks(model, path)
            stacks += found
            notes += found_notes
    if not any(inside(stack.path, path) for stack in stacks for part, path in parts if part == LANGUAGE):
        raise LayerDiscoveryError(
            f"{type(model).__name__} is a multi-part model ({', '.join(f'{part} at {path}' for part, path in parts)}), "
            "and no layers were found in its language model. Name the layer containers with `freeze_layer_paths`, "
            "in forward order.",
            fields=["freeze_layer_paths"],
        )
    return stacks, notes


def with_parts(model: nn.Module, layout: ModelLayout, parts, counted) -> ModelLayout:
    """Tag every block with its part (splitting a block that spans two), order the parts as the data flows, count
    the ``counted`` parts' layers, and record the mixture-of-experts components of every layer."""
    components = find_moe_components(model, [block.name for block in layout.blocks if block.kind == LAYER])
    if not parts:
        return replace(layout, components=components)
    base_prefix = base_model_prefix(model)
    blocks: List[Block] = []
    for block in layout.blocks:
        by_part: Dict[str, List[int]] = {}
        for position, name in enumerate(block.parameters):
            by_part.setdefault(part_of(name, parts, base_prefix), []).append(position)
        for part, positions in by_part.items():
            names = tuple(block.parameters[i] for i in positions)
            name = block.name if len(by_part) == 1 else _common_prefix(names)
            blocks.append(replace(block, name=name, parameters=names, sizes=tuple(block.sizes[i] for i in positions), part=part))
    order = {part: index for index, part in enumerate(PARTS)}
    blocks.sort(key=lambda block: order[block.part])
    return replace(layout, blocks=tuple(blocks), components=components).counting(counted)


def _common_prefix(names: Sequence[str]) -> str:
    split = [name.split(".") for name in names]
    common = []
    for segments in zip(*split):
        if len(set(segments)) > 1:
            break
        common.append(segments[0])
    return ".".join(common) or names[0]
