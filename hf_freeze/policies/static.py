"""Static strategies: decided once, from the layout and the options alone. LLaMA-Factory's two ('llama_factory',
'llama_pro') are defined in `hf_freeze.policies.llama_factory` and registered here, last, in their usual order."""

from __future__ import annotations

import re

from typing import Optional

from ..errors import FreezeConfigError, invalid
from ..model.layout import HEAD, ModelLayout
from .core import Selection, Strategy, register_strategy
from .parts import MOE_OPTIONS, PART_OPTIONS
from .name_patterns import parse_name_pattern
from .common import bottom_prefix, layer_parameters, require_layers, resolve_count
from .llama_factory import LLAMA_FACTORY, LLAMA_PRO

__all__ = ["check_count", "compile_name_pattern"]

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
register_strategy(LLAMA_FACTORY)
register_strategy(LLAMA_PRO)
