"""Static strategies: decided once, from the layout and the options alone."""

from __future__ import annotations

import re

from typing import Optional

from ..errors import FreezeConfigError, invalid
from ..model.layout import HEAD, ModelLayout
from .core import Selection, Strategy, register_strategy
from .parts import MOE_OPTIONS, PART_OPTIONS
from .name_patterns import parse_name_pattern
from .common import bottom_prefix, layer_parameters, require_layers, resolve_count

__all__ = ["check_count", "compile_name_pattern", "llama_pro_layers"]

# axolotl makes every '.' not followed by '+' literal: a regex written for hf_freeze's own rule often matches nothing.
_AXOLOTL_HINT = (
    "In axolotl's syntax every '.' not followed by '+' is a literal dot (so '.*' means 'any number of dots') and "
    "'\\.' is a backslash before any character: write 'model.layers.+mlp' for 'model.layers.' then anything then 'mlp'."
)
_ALIASES = tuple(alias for alias, _, _ in PART_OPTIONS.values())


def compile_name_pattern(pattern: str, field_name: str, syntax: Optional[str] = None) -> "re.Pattern[str]":
    """Compile a parameter-name pattern: anchored at the start, a '.' between name parts is literal.

    ``model.layers.1[0-5].mlp`` matches the dots literally; ``.*``, ``.+`` and ``.?`` keep their regex meaning.
    With ``syntax='axolotl'``, axolotl's rule instead (`hf_freeze.policies.name_patterns`).
    """
    return parse_name_pattern(pattern, field_name, syntax).regex


def check_count(options) -> None:
    if options.freeze_layers is None:
        raise invalid("freeze_layers", None, "set for this strategy: a count of layers or a fraction in (0, 1)")
    value = options.freeze_layers
    if value < 0 or (isinstance(value, float) and not value < 1):
        raise invalid("freeze_layers", value, "a whole count of layers >= 0 or a fraction in (0, 1)")


def _none(layout: ModelLayout, options, progress) -> Selection:
    return [], []


def _bottom(layout: ModelLayout, options, progress) -> Selection:
    count = resolve_count(options.freeze_layers, require_layers(layout, "bottom"))
    return bottom_prefix(layout, options, range(count)), []


def _top(layout: ModelLayout, options, progress) -> Selection:
    total = require_layers(layout, "top")
    count = resolve_count(options.freeze_layers, total)
    return layer_parameters(layout, range(total - count, total)), []


def _check_interval(options) -> None:
    interval = 2 if options.freeze_interval is None else options.freeze_interval
    offset = 0 if options.freeze_interval_offset is None else options.freeze_interval_offset
    if interval < 1:
        raise invalid("freeze_interval", interval, "an integer >= 1")
    if not 0 <= offset < interval:
        raise invalid("freeze_interval_offset", offset, f"between 0 and freeze_interval - 1 = {interval - 1}")


def _interval(layout: ModelLayout, options, progress) -> Selection:
    total = require_layers(layout, "interval")
    interval = 2 if options.freeze_interval is None else options.freeze_interval
    offset = 0 if options.freeze_interval_offset is None else options.freeze_interval_offset
    if offset >= total:
        raise invalid("freeze_interval_offset", offset, f"smaller than the model's {total} layers")
    return layer_parameters(layout, range(offset, total, interval)), []


def _check_indices(options) -> None:
    if not options.freeze_layer_indices:
        raise invalid("freeze_layer_indices", options.freeze_layer_indices, "a non-empty list of layer indices")


def _layers(layout: ModelLayout, options, progress) -> Selection:
    total = require_layers(layout, "layers")
    resolved = []
    for index in options.freeze_layer_indices:
        if not -total <= index < total:
            raise invalid(
                "freeze_layer_indices", options.freeze_layer_indices,
                f"indices between {-total} and {total - 1} for this model's {total} layers ({index} is out of range)",
            )
        resolved.append(index % total)
    if len(set(resolved)) != len(resolved):
        raise invalid("freeze_layer_indices", options.freeze_layer_indices, "indices that name each layer at most once")
    return layer_parameters(layout, resolved), []


def _check_patterns(options) -> None:
    if not options.freeze_patterns and not options.freeze_trainable_patterns:
        raise FreezeConfigError(
            "`freeze_strategy` 'pattern' needs `freeze_patterns` (what to freeze), `freeze_trainable_patterns` "
            "(what stays trainable), or both (got neither).",
            fields=["freeze_patterns", "freeze_trainable_patterns"],
        )
    syntax = getattr(options, "freeze_pattern_syntax", None)
    for field_name in ("freeze_patterns", "freeze_trainable_patterns"):
        for pattern in getattr(options, field_name) or []:
            if parse_name_pattern(pattern, field_name, syntax).rows is not None and field_name == "freeze_patterns":
                raise invalid(
                    field_name, pattern, "a pattern without a row range",
                    hint="Row ranges name rows that train: put the pattern in `freeze_trainable_patterns`.",
                )


def _pattern_trains(layout: ModelLayout, options):
    names = layout.parameter_names
    matched = set()
    for pattern in options.freeze_trainable_patterns or []:
        regex = compile_name_pattern(pattern, "freeze_trainable_patterns", getattr(options, "freeze_pattern_syntax", None))
        matched |= {name for name in names if regex.match(name)}
    return matched


def _trlx_trains(layout: ModelLayout, options):
    count = options.freeze_num_layers_unfrozen
    total = layout.num_layers
    return layer_parameters(layout, range(max(0, total - count), total)) if count and count > 0 else []


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
    >>> from hf_freeze.policies.static import llama_pro_layers
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


def _pattern(layout: ModelLayout, options, progress) -> Selection:
    names = layout.parameter_names
    matched = {}
    for field_name in ("freeze_patterns", "freeze_trainable_patterns"):
        hits = set()
        for pattern in getattr(options, field_name) or []:
            regex = compile_name_pattern(pattern, field_name, getattr(options, "freeze_pattern_syntax", None))
            found = {name for name in names if regex.match(name)}
            if not found:
                raise invalid(
                    field_name, pattern,
                    f"a pattern that matches at least one parameter name, e.g. {names[:3] + names[-2:]}",
                    hint=_AXOLOTL_HINT if getattr(options, "freeze_pattern_syntax", None) == "axolotl" else None,
                )
            hits |= found
        matched[field_name] = hits
    frozen = matched["freeze_patterns"] if options.freeze_patterns else set(names)
    return sorted(frozen - matched["freeze_trainable_patterns"]), []


def _bitfit(layout: ModelLayout, options, progress) -> Selection:
    names = layout.parameter_names
    biases = [name for name in names if name.rsplit(".", 1)[-1] == "bias" or name.endswith("_bias")]
    head = set(layout.parameters_of(layout.blocks_of_kind(HEAD)))
    if not [name for name in biases if name not in head]:
        raise FreezeConfigError(
            "`freeze_strategy` 'bitfit' trains only bias terms, and this model has no bias parameters outside its "
            "head (Llama- and T5-style models use none). Choose another strategy, e.g. 'bottom' or 'head_only'.",
            fields=["freeze_strategy"],
        )
    # The head trains by default (BitFit trains biases and the new classifier); `freeze_head` can freeze it.
    return [name for name in names if name not in biases and name not in head], []


def _head_only(layout: ModelLayout, options, progress) -> Selection:
    head = set(layout.parameters_of(layout.blocks_of_kind(HEAD)))
    if not head:
        tied = [alias for alias, name in layout.tied_parameters.items() if name in layout.input_embedding_parameters]
        reason = (
            f"its head ({', '.join(tied)}) is tied to the input embeddings"
            if tied
            else "no task head (classifier, LM head) was found outside the base model"
        )
        raise FreezeConfigError(
            f"`freeze_strategy` 'head_only' would train nothing: {reason}. Use 'pattern' with "
            "`freeze_trainable_patterns`, or 'trlx' with `freeze_num_layers_unfrozen`.",
            fields=["freeze_strategy"],
        )
    return [name for name in layout.parameter_names if name not in head], []


def _check_trlx(options) -> None:
    value = options.freeze_num_layers_unfrozen
    if value is None or value < -1:
        raise invalid("freeze_num_layers_unfrozen", value, "-1 (freeze nothing), 0 (freeze all layers) or a count > 0")


def _trlx(layout: ModelLayout, options, progress) -> Selection:
    total = require_layers(layout, "trlx")
    unfrozen = options.freeze_num_layers_unfrozen
    if unfrozen == -1:
        return [], []
    if unfrozen > total:
        raise invalid("freeze_num_layers_unfrozen", unfrozen, f"at most the model's {total} layers")
    frozen = layer_parameters(layout, range(total - unfrozen))
    if options.freeze_embeddings is None:
        # trlx freezes `get_input_embeddings()` only: position embeddings keep training.
        frozen += list(layout.input_embedding_parameters)
        if unfrozen == 0 and options.freeze_head is None:
            frozen += list(layout.output_embedding_parameters)
    return frozen, []


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


register_strategy(Strategy("none", _none, description="Freeze nothing (log the counts only)."))
register_strategy(
    Strategy(
        "bottom", _bottom, ("freeze_layers",), {"freeze_embeddings": True}, check_count,
        description="Freeze the first `freeze_layers` layers and the input embeddings.",
    )
)
register_strategy(
    Strategy("top", _top, ("freeze_layers",), {}, check_count, description="Freeze the last `freeze_layers` layers.")
)
register_strategy(
    Strategy(
        "interval", _interval, ("freeze_interval", "freeze_interval_offset"), {}, _check_interval,
        description="Freeze every `freeze_interval`-th layer, starting at `freeze_interval_offset`.",
    )
)
register_strategy(
    Strategy(
        "layers", _layers, ("freeze_layer_indices",), {}, _check_indices,
        description="Freeze the layers listed in `freeze_layer_indices` (negative = from the end).",
    )
)
register_strategy(
    Strategy(
        "pattern", _pattern, ("freeze_patterns", "freeze_trainable_patterns", "freeze_pattern_syntax"), {}, _check_patterns,
        fixed_overrides=("freeze_embeddings", "freeze_norm", "freeze_head", *PART_OPTIONS, *_ALIASES, *MOE_OPTIONS),
        trains=_pattern_trains, whole_model=True,
        description="Freeze parameters by name: `freeze_patterns` and/or `freeze_trainable_patterns`.",
    )
)
register_strategy(
    Strategy(
        "bitfit", _bitfit, (), {},
        description="Train only bias terms (and the head, unless `freeze_head`).",
    )
)
register_strategy(
    Strategy(
        "head_only", _head_only, (), {"freeze_embeddings": True, "freeze_norm": True},
        fixed_overrides=("freeze_head",), description="Train only the task head.",
    )
)
register_strategy(
    Strategy(
        "trlx", _trlx, ("freeze_num_layers_unfrozen",), {}, _check_trlx, trains=_trlx_trains,
        description="trlx's `num_layers_unfrozen` semantics, via `freeze_num_layers_unfrozen`.",
    )
)
register_strategy(
    Strategy(
        "llama_factory", _llama_factory,
        ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
        # LLaMA-Factory's own defaults on a vision-language model (`freeze_vision_tower`,
        # `freeze_multi_modal_projector`: true; `freeze_language_model`: false).
        {"freeze_vision_tower": True, "freeze_multi_modal_projector": True}, _check_llama_factory,
        trains=_llama_factory_trains,
        description=(
            "LLaMA-Factory's freeze tuning (`freeze_trainable_layers`, `freeze_trainable_modules`, "
            "`freeze_extra_modules`): only the chosen layers' modules and the extra modules train."
        ),
    )
)
register_strategy(
    Strategy(
        "llama_pro", _llama_pro, ("freeze_num_new_blocks", "freeze_trainable_modules", "freeze_extra_modules"),
        {"freeze_vision_tower": True, "freeze_multi_modal_projector": True}, _check_llama_pro,
        trains=_llama_pro_trains,
        description=(
            "LLaMA Pro (LLaMA-Factory's `use_llama_pro`): only the `freeze_num_new_blocks` blocks added by "
            "`hf-freeze expand` train (and `freeze_extra_modules`)."
        ),
    )
)
