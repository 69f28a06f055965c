"""Learning rates per part and per layer, as plain data: which rate each parameter trains at.

`freeze_learning_rates` gives absolute rates to parts of a multi-part model (named as the part options and
discovery name them) or to parameter-name patterns; `freeze_layer_lr_decay` scales the counted layer stack
(layer-wise learning-rate decay: layer i of L at decay^(L-1-i), the embeddings below layer 0 at decay^L, the final
norm and the head at the top rate). The two multiply: a layer of the language model trains at the language model's
rate times its decay factor. Nothing here touches torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..add_on import LearningRate
from ..errors import FreezeConfigError, invalid
from ..model.layout import COMPONENT_KEYS, EMBEDDINGS, PARTS, ModelLayout
from ..policies.name_patterns import NamePattern, parse_name_pattern
from ..policies.parts import PART_OPTIONS

__all__ = [
    "PART_WORDS", "RATE_OPTIONS", "RateEntry", "block_rates", "check_rate_options", "describe_rate", "learning_rates",
    "rate_entries",
]

RATE_OPTIONS = ("freeze_learning_rates", "freeze_layer_lr_decay")
# The words a `freeze_learning_rates` key may use for a part: the part options' names without `freeze_`
# ('vision_tower', 'multi_modal_projector', 'language_model'), `freeze_component_paths`' keys ('audio_tower',
# 'projector') and discovery's own names (the `part` column of the block table). Any other key is a name pattern.
PART_WORDS: Dict[str, str] = {
    **{part: part for part in PARTS},
    **COMPONENT_KEYS,
    **{name[len("freeze_"):]: part for name, (_, part, _) in PART_OPTIONS.items()},
}
_EXPECTED_RATES = (
    "a mapping from a part (" + ", ".join(repr(word) for word in PART_WORDS) + ") or a parameter-name pattern to a "
    "learning rate > 0"
)


@dataclass(frozen=True)
class RateEntry:
    """One entry of `freeze_learning_rates`: the key as written, its part or its compiled pattern, and its rate."""

    key: str
    rate: float
    part: Optional[str] = None
    pattern: Optional[NamePattern] = None


def rate_entries(value: Optional[Mapping[str, Any]]) -> List[RateEntry]:
    """`freeze_learning_rates` checked and read: patterns first (in the order written), then parts, so that a
    pattern inside a part wins over the part's rate. A rate written as text (PyYAML reads ``2e-6`` as a string) is
    read as a number."""
    name = "freeze_learning_rates"
    if value is None:
        return []
    if not isinstance(value, Mapping) or not value:
        raise invalid(name, value, _EXPECTED_RATES, hint="e.g. {vision_tower: 2.0e-6, language_model: 1.0e-5}")
    patterns, parts = [], []
    for key, rate in value.items():
        if not isinstance(key, str) or not key:
            raise invalid(name, value, _EXPECTED_RATES, hint=f"the key {key!r} is not a part or a pattern")
        number = _number(rate)
        if number is None or not math.isfinite(number) or number <= 0:
            raise invalid(name, {key: rate}, f"for {key!r}, a learning rate > 0 (a number such as 2.0e-6)")
        if key in PART_WORDS:
            parts.append(RateEntry(key, number, part=PART_WORDS[key]))
        else:
            patterns.append(RateEntry(key, number, pattern=parse_name_pattern(key, name)))
    taken: Dict[str, str] = {}
    for entry in parts:
        if entry.part in taken:
            raise FreezeConfigError(
                f"`freeze_learning_rates` names one part twice: {taken[entry.part]!r} and {entry.key!r} are both the "
                f"{entry.part} part (got {dict(value)!r}). Keep one of them.",
                fields=[name],
            )
        taken[entry.part] = entry.key
    return patterns + parts


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_rate_options(arguments: Any) -> None:
    """The checks that need no model: the rates' mapping, and a decay in (0, 1]."""
    rate_entries(getattr(arguments, "freeze_learning_rates", None))
    decay = getattr(arguments, "freeze_layer_lr_decay", None)
    if decay is not None and not 0 < decay <= 1:
        raise invalid(
            "freeze_layer_lr_decay", decay, "a factor in (0, 1]",
            hint="Each layer trains at decay times the rate of the layer above it (0.8 is usual; 1 turns it off).",
        )


def learning_rates(layout: ModelLayout, arguments: Any) -> Dict[str, LearningRate]:
    """The learning rate of every parameter of ``layout`` (empty when no rate option is set), refusing a part the
    model does not have and a pattern that matches none of its parameters.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> from hf_freeze import ModelLayout
    >>> from hf_freeze.learning_rates import learning_rates
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10], embeddings=5, head=3)
    >>> rates = learning_rates(layout, SimpleNamespace(freeze_learning_rates=None, freeze_layer_lr_decay=0.5))
    >>> [(rates[name].group, rates[name].factor) for name in ("embeddings.weight", "layers.0.weight", "head.weight")]
    [('embeddings', 0.125), ('layer.0', 0.25), ('base', 1.0)]
    ```
    """
    entries = rate_entries(getattr(arguments, "freeze_learning_rates", None))
    decay = getattr(arguments, "freeze_layer_lr_decay", None)
    if not entries and decay is None:
        return {}
    _refuse_absent(layout, entries)
    positions = _decay_positions(layout, decay) if decay is not None else {}
    rates: Dict[str, LearningRate] = {}
    for block in layout.blocks:
        for name in block.parameters:
            entry = next((e for e in entries if e.pattern is not None and e.pattern.matches(name)), None)
            if entry is None:
                entry = next((e for e in entries if e.part is not None and e.part == block.part), None)
            position, factor = positions.get(block.name, (None, 1.0))
            group = "/".join(text for text in (entry.key if entry else None, position) if text) or "base"
            rates[name] = LearningRate(group, entry.rate if entry else None, factor)
    return rates


def _refuse_absent(layout: ModelLayout, entries: List[RateEntry]) -> None:
    parts = layout.parts
    names = layout.parameter_names
    for entry in entries:
        if entry.part is not None and entry.part not in parts:
            words = [word for word, part in PART_WORDS.items() if part in parts]
            what = (f"its parts are {', '.join(parts)} (keys {', '.join(repr(word) for word in words)})" if parts
                    else "discovery found a single-part model: name its parameters with a pattern instead")
            raise FreezeConfigError(
                f"`freeze_learning_rates` gives a rate to {entry.key!r} (got {entry.rate!r}), but this model has no "
                f"{entry.part} part: {what}, e.g. {names[0]!r}.",
                fields=["freeze_learning_rates"],
            )
        if entry.pattern is not None and not any(entry.pattern.matches(name) for name in names):
            raise FreezeConfigError(
                f"`freeze_learning_rates` key {entry.key!r} (rate {entry.rate!r}) is neither a part ("
                + ", ".join(repr(word) for word in PART_WORDS)
                + f") nor a pattern that matches a parameter of this model (matched from the start of the name, e.g. "
                f"{names[0]!r}" + (f"; its parts: {', '.join(parts)}" if parts else "") + ").",
                fields=["freeze_learning_rates"],
            )


def _decay_positions(layout: ModelLayout, decay: float) -> Dict[str, Tuple[str, float]]:
    """Block name -> (its position's group name, its decay factor) for the counted stack: layer i of L at
    decay^(L-1-i), the counted part's embeddings at decay^L; blocks absent here keep the top rate."""
    layers = layout.layers
    count = len(layers)
    counted_parts = {block.part for block in layers}
    positions = {block.name: (f"layer.{block.layer_index}", decay ** (count - 1 - block.layer_index)) for block in layers}
    for block in layout.blocks:
        if block.kind == EMBEDDINGS and (block.part is None or block.part in counted_parts):
            positions[block.name] = ("embeddings", decay ** count)
    return positions


def describe_rate(rate: LearningRate) -> str:
    """A table cell: ``2e-06``, ``×0.64``, ``1e-05 ×0.64`` or ``base``."""
    parts = [f"{rate.rate:g}"] if rate.rate is not None else []
    if rate.factor != 1.0:
        parts.append(f"×{rate.factor:.3g}")
    return " ".join(parts) or "base"


def block_rates(layout: ModelLayout, rates: Mapping[str, LearningRate]) -> Dict[str, str]:
    """Block name -> its rate cell (several when its parameters train at different rates)."""
    cells = {}
    for block in layout.blocks:
        described = list(dict.fromkeys(describe_rate(rates[name]) for name in block.parameters if name in rates))
        if described:
            cells[block.name] = ", ".join(described)
    return cells
