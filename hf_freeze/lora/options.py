"""`freeze_lora` read and checked without a model: the adapter's rank, scale, dropout, and where it goes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from ..errors import FreezeConfigError, invalid, invalid_choice
from ..policies import STRATEGIES
from ..policies.name_patterns import NamePattern, parse_name_pattern

__all__ = ["LORA_KEYS", "LoraOptions", "lora_options"]

FIELD = "freeze_lora"
# The keys of `freeze_lora`, with what each one takes.
LORA_KEYS = {
    "r": "the rank, an integer >= 1 (default 8)",
    "alpha": "the scale's numerator, a number > 0 (the update is scaled by alpha / r; default 2 x r)",
    "dropout": "dropout on the adapter's input, in [0, 1) (default 0)",
    "on": "'frozen' (every linear module of the layers the strategy froze; default) or a list of module-name "
          "patterns (regular expressions from the start of the module path), among the frozen linear modules",
}
# Options whose machinery cannot run beside adapters on frozen layers (yet), with why.
_EXCLUDED = {
    "freeze_cache_prefix": "the cache skips the frozen bottom layers, where the adapters train",
    "freeze_trainable_tokens": "trained rows and adapters are not combined",
    "freeze_trainable_experts": "trained expert slices and adapters are not combined",
}


@dataclass(frozen=True)
class LoraOptions:
    """`freeze_lora`, read: ``on`` is ``None`` for 'frozen', else the compiled patterns."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    on: Optional[Tuple[NamePattern, ...]] = None

    def describe(self) -> str:
        return f"lora r={self.r}"


def lora_options(arguments: Any) -> Optional[LoraOptions]:
    """`freeze_lora` checked against the other options and read (``None`` when unset)."""
    value = getattr(arguments, FIELD, None)
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise invalid(FIELD, value, "a mapping with the keys " + ", ".join(repr(key) for key in LORA_KEYS),
                      hint="e.g. {r: 16, alpha: 32, on: frozen}")
    # PyYAML (YAML 1.1) reads an unquoted `on` key as the boolean true: that is the 'on' key.
    value = {("on" if key is True else key): item for key, item in value.items()}
    for key in value:
        if key not in LORA_KEYS:
            raise invalid_choice(FIELD, key, LORA_KEYS, hint="Those are the keys the mapping takes.")
    rank = value.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise invalid(FIELD, {"r": rank}, f"a mapping whose 'r' is {LORA_KEYS['r']}")
    alpha = value.get("alpha", 2 * rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise invalid(FIELD, {"alpha": alpha}, f"a mapping whose 'alpha' is {LORA_KEYS['alpha']}")
    dropout = value.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise invalid(FIELD, {"dropout": dropout}, f"a mapping whose 'dropout' is {LORA_KEYS['dropout']}")
    on = value.get("on", "frozen")
    patterns = None
    if on != "frozen":
        items = [on] if isinstance(on, str) else on
        if not isinstance(items, list) or not items or not all(isinstance(item, str) and item for item in items):
            raise invalid(FIELD, {"on": on}, f"a mapping whose 'on' is {LORA_KEYS['on']}")
        patterns = tuple(parse_name_pattern(item, FIELD) for item in items)
    strategy = STRATEGIES.get(arguments.freeze_strategy)
    if strategy.dynamic:
        raise FreezeConfigError(
            f"`freeze_lora` needs a static strategy: `freeze_strategy` {strategy.name!r} changes the frozen set during "
            "training, and the adapters go on the frozen layers once, before the optimizer is built. Use a static "
            "strategy ('bottom', 'top', 'interval', 'layers', ...), or remove `freeze_lora`.",
            fields=[FIELD, "freeze_strategy"],
        )
    if strategy.name == "none":
        raise FreezeConfigError(
            "`freeze_lora` puts adapters on the layers the strategy freezes, but `freeze_strategy` is 'none' (it "
            "freezes nothing). Choose a strategy, e.g. `freeze_strategy: bottom` with `freeze_layers: 0.5`.",
            fields=[FIELD, "freeze_strategy"],
        )
    for name, why in _EXCLUDED.items():
        if getattr(arguments, name, None):
            raise FreezeConfigError(
                f"`freeze_lora` cannot be combined with `{name}` (got {getattr(arguments, name)!r}): {why}. Remove one.",
                fields=[FIELD, name],
            )
    return LoraOptions(rank, float(alpha), float(dropout), patterns)
