"""LLaMA-Factory's freeze tuning as two static strategies: 'llama_factory' (`freeze_trainable_layers`) and
'llama_pro' (LLaMA Pro's block expansion, `use_llama_pro`). Both train the chosen submodules of some layers and the
extra modules named by text, and freeze everything else.

The strategies are registered by `hf_freeze.policies.static`, after the other static ones, so that lists of valid
names keep their order.
"""

from __future__ import annotations

import re

from ..errors import invalid
from ..model.layout import ModelLayout
from .common import require_layers
from .core import Selection, Strategy

__all__ = ["LLAMA_FACTORY", "LLAMA_PRO", "llama_pro_layers"]


def _llama_factory_trains(layout: ModelLayout, options):
    count, total = options.freeze_trainable_layers, layout.num_layers
    chosen = range(total - count, total) if count > 0 else range(-count)
    return _trained_in_layers(layout, options, chosen)


def llama_pro_layers(num_layers: int, num_new_blocks: int) -> range:
    """The layers LLaMA Pro's block expansion added, in a model of ``num_layers`` layers that gained
    ``num_new_blocks``: the last layer of each of the ``num_new_blocks`` equal groups (LLaMA-Factory's
    `use_llama_pro`, what `hf-freeze expand` writes).

    Example:

    ```python
    >>> from hf_freeze.policies.llama_factory import llama_pro_layers
    >>> list(llama_pro_layers(6, 2))  # 4 layers expanded by 2: a copy after layers 1 and 3 of the original
    [2, 5]
    ```
    """
    if num_new_blocks < 1 or num_layers % num_new_blocks or num_layers // num_new_blocks < 2:
        raise invalid(
            "freeze_num_new_blocks", num_new_blocks,
            f"a divisor of the model's {num_layers} layers that leaves at least one original layer per group: "
            f"{', '.join(map(str, _new_block_counts(num_layers))) or 'none'}",
            hint="LLaMA Pro adds one block after every k original layers, so the expanded model has a multiple of "
            "k + 1 layers; give the number of blocks `hf-freeze expand --num-new-blocks` added.",
        )
    stride = num_layers // num_new_blocks
    return range(stride - 1, num_layers + stride - 1, stride)


def _new_block_counts(num_layers: int):
    return [count for count in range(1, num_layers // 2 + 1) if num_layers % count == 0]


def _llama_pro_trains(layout: ModelLayout, options):
    chosen = llama_pro_layers(layout.num_layers, options.freeze_num_new_blocks)
    return _trained_in_layers(layout, options, chosen)


def _trained_in_layers(layout: ModelLayout, options, chosen) -> list:
    """What LLaMA-Factory's freeze tuning trains: the chosen submodules of the chosen layers, and every parameter
    whose name contains one of `freeze_extra_modules` (a substring, as there: 'norm' also trains every layer's
    `input_layernorm` and `post_attention_layernorm`)."""
    modules = options.freeze_trainable_modules or ["all"]
    _refuse_unknown("freeze_trainable_modules", [m for m in modules if m != "all"], _layer_submodules(layout))
    trainable = []
    for block in layout.layers:
        if block.layer_index not in chosen:
            continue
        for name in block.parameters:
            relative = _relative_name(block, name)
            # LLaMA-Factory matches '.<index>.<module>' inside the name: the module is a prefix of what follows.
            if "all" in modules or any(relative.startswith(module) for module in modules):
                trainable.append(name)
    extra = options.freeze_extra_modules or []
    _refuse_unknown("freeze_extra_modules", extra, _non_layer_modules(layout))
    trainable += [name for name in layout.parameter_names if any(module in name for module in extra)]
    return trainable


def _relative_name(block, name: str) -> str:
    return name[len(block.name) + 1:] if name.startswith(block.name + ".") else ""


def _layer_submodules(layout: ModelLayout) -> set:
    """The names of the layers' direct submodules ('self_attn', 'mlp', 'input_layernorm'), what
    `freeze_trainable_modules` may name."""
    return {
        relative.split(".")[0]
        for block in layout.layers
        for relative in (_relative_name(block, name) for name in block.parameters)
        if "." in relative
    }


def _non_layer_modules(layout: ModelLayout) -> set:
    """What `freeze_extra_modules` may name, by LLaMA-Factory's rule: for each parameter whose name has no
    '.<number>.' part, the name of the module that holds it ('embed_tokens', 'norm', 'lm_head')."""
    return {name.split(".")[-2] for name in layout.parameter_names if "." in name and not _INDEXED.search(name)}


_INDEXED = re.compile(r"\.\d+\.")


def _refuse_unknown(field_name: str, names, known: set) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        expected = ("'all' or " if field_name == "freeze_trainable_modules" else "") + "names from this model: " + (
            ", ".join(repr(name) for name in sorted(known)) or "none"
        )
        raise invalid(field_name, list(names), expected, hint=f"{', '.join(map(repr, unknown))} is not one of them.")


def _check_llama_factory(options) -> None:
    value = options.freeze_trainable_layers
    if value is None or value == 0:
        raise invalid("freeze_trainable_layers", value, "a non-zero integer: N > 0 trains the last N, N < 0 the first |N|")
    _check_module_lists(options)


def _check_module_lists(options) -> None:
    for field_name in ("freeze_trainable_modules", "freeze_extra_modules"):
        names = getattr(options, field_name)
        if names is not None and (not names or not all(names)):
            raise invalid(field_name, names, "a non-empty list of module names (e.g. ['mlp'] or ['norm'])")


def _llama_factory(layout: ModelLayout, options, progress) -> Selection:
    total = require_layers(layout, "llama_factory")
    count = options.freeze_trainable_layers
    if abs(count) > total:
        raise invalid("freeze_trainable_layers", count, f"between -{total} and {total} for this model's {total} layers")
    trainable = set(_llama_factory_trains(layout, options))
    # Everything else is frozen, embeddings, norms and head included (LLaMA-Factory's default); the strategy decides
    # them itself rather than through defaults, so that `freeze_extra_modules` can train them.
    return [name for name in layout.parameter_names if name not in trainable], []


def _check_llama_pro(options) -> None:
    value = options.freeze_num_new_blocks
    if value is None or value < 1:
        raise invalid(
            "freeze_num_new_blocks", value, "the number of blocks LLaMA Pro's expansion added (an integer >= 1)",
            hint="`hf-freeze expand MODEL_DIR --num-new-blocks N OUTPUT_DIR` writes such a model.",
        )
    _check_module_lists(options)


def _llama_pro(layout: ModelLayout, options, progress) -> Selection:
    require_layers(layout, "llama_pro")
    trainable = set(_llama_pro_trains(layout, options))
    return [name for name in layout.parameter_names if name not in trainable], []


# What both modes read besides their choice of layers, and LLaMA-Factory's own defaults on a vision-language model
# (`freeze_vision_tower`, `freeze_multi_modal_projector`: true; `freeze_language_model`: false).
_MODULE_OPTIONS = ("freeze_trainable_modules", "freeze_extra_modules")
_DEFAULTS = {"freeze_vision_tower": True, "freeze_multi_modal_projector": True}

LLAMA_FACTORY = Strategy(
    name="llama_factory",
    select=_llama_factory,
    options=("freeze_trainable_layers", *_MODULE_OPTIONS),
    defaults=_DEFAULTS,
    check=_check_llama_factory,
    trains=_llama_factory_trains,
    description=(
        "LLaMA-Factory's freeze tuning (`freeze_trainable_layers`, `freeze_trainable_modules`, "
        "`freeze_extra_modules`): only the chosen layers' modules and the extra modules train."
    ),
)
LLAMA_PRO = Strategy(
    name="llama_pro",
    select=_llama_pro,
    options=("freeze_num_new_blocks", *_MODULE_OPTIONS),
    defaults=_DEFAULTS,
    check=_check_llama_pro,
    trains=_llama_pro_trains,
    description=(
        "LLaMA Pro (LLaMA-Factory's `use_llama_pro`): only the `freeze_num_new_blocks` blocks added by "
        "`hf-freeze expand` train (and `freeze_extra_modules`)."
    ),
)
