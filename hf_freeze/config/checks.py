"""The one check of the `freeze_*` options, run by `FreezeArguments.__post_init__`: each value against its field's
annotation (the sets of choices are `Literal` annotations), the values that parsers read (mappings), then the
strategy's own rules (`hf_freeze.policies.check_options`).

Everything downstream (`LayerFreezer`, the policies, the callback) trusts a `FreezeArguments` that passed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

from ..errors import invalid
from ..model.layout import check_component_paths, refuse_overlapping_paths
from ..policies import check_options
from ..policies.row_selection import NEW_TOKENS
from ..policies.schedules import parse_stages
from .types import check_field, check_values, field_hints

__all__ = ["check_freeze_arguments"]

# What a valid value is, in words, where the annotation alone would say less ("a number" for a count of layers).
# The sets of choices are not here: their annotation lists them (`describe` says "one of ...").
_EXPECTS = {
    "freeze_strategy": "a strategy name (a string)",
    "freeze_layers": "a number: a count of layers or a fraction in (0, 1)",
    "freeze_patterns": "a list of regular expressions",
    "freeze_trainable_patterns": "a list of regular expressions",
    "freeze_layer_paths": "a list of dotted module paths",
    "freeze_trainable_modules": "a list of module names (or ['all'])",
    "freeze_extra_modules": "a list of module names",
    "freeze_score": "a score name (a string)",
    "freeze_probe_steps": "a number: a count of steps or a fraction of training in (0, 1)",
    "freeze_cache_memory_mb": "a number of MiB (>= 0)",
    "freeze_trainable_tokens": f"a list of token ids, or {NEW_TOKENS!r}",
    "freeze_trainable_experts": "a list of expert indices or 'layer:expert' strings",
    "freeze_learning_rates": "a mapping from a part or a parameter-name pattern to a learning rate",
    "freeze_lora": "a mapping with the keys 'r', 'alpha', 'dropout', 'on'",
}
# List fields whose items are integers or words: read as strings (the command line gives strings), then numbers
# turned back into integers.
_INTEGERS_OR_WORDS = ("freeze_trainable_tokens", "freeze_trainable_experts")
# Fields that hold a count or a fraction: a whole number is a count (2.0 -> 2), anything else a fraction.
_COUNT_OR_FRACTION = ("freeze_layers", "freeze_probe_steps")
# Mappings, read by their parser (which says what is valid); on the command line they arrive as text.
_PARSED: Dict[str, Callable[[Any], Any]] = {
    "freeze_component_paths": check_component_paths,
    "freeze_stages": parse_stages,
    "freeze_learning_rates": lambda value: value,  # checked against the model by `hf_freeze.learning_rates`
    "freeze_lora": lambda value: _lora_keys(value),  # checked by `hf_freeze.lora`
}


def check_freeze_arguments(arguments: Any, freeze_type: type) -> None:
    """Normalise and check the `freeze_*` fields of ``arguments`` in place (the fields of ``freeze_type``, the
    `FreezeArguments` class); raises a `FreezeConfigError` naming the field at fault."""
    hints = field_hints(freeze_type)
    names = [item.name for item in dataclasses.fields(freeze_type)]
    for name in names:
        value = getattr(arguments, name)
        if name in _INTEGERS_OR_WORDS:
            value = _integers_or_words(name, value)
        elif name in _PARSED:
            value = _PARSED[name](_mapping(name, value))
            if name in _EXPECTS:  # a mapping whose entries its room checks: here only that it is one
                value = check_field(name, hints[name], value, _EXPECTS[name])
        else:
            value = check_field(
                name, hints[name], value, _EXPECTS.get(name), count_or_fraction=name in _COUNT_OR_FRACTION
            )
        setattr(arguments, name, value)
    check_options(arguments, names)
    refuse_overlapping_paths(arguments.freeze_layer_paths or [])
    if dataclasses.is_dataclass(arguments) and len(dataclasses.fields(arguments)) > len(names):
        check_values(arguments, skip=names)  # the TrainingArguments fields, as `hf-freeze validate` checks them


def _lora_keys(value: Any) -> Any:
    if isinstance(value, dict):  # PyYAML (YAML 1.1) reads an unquoted `on` key as true
        return {("on" if key is True else key): item for key, item in value.items()}
    return value


def _integers_or_words(name: str, value: Any) -> Any:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or any(isinstance(item, bool) or not isinstance(item, (int, str)) for item in items):
        raise invalid(name, value, _EXPECTS[name])
    return [int(item) if isinstance(item, str) and item.strip().isdecimal() else item for item in items]


def _mapping(name: str, value: Any) -> Any:
    """A mapping given on the command line arrives as text (JSON, or YAML's ``{key: value}``): read it."""
    if not isinstance(value, str):
        return value
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise invalid(name, value, "a mapping written as JSON or YAML, e.g. '{\"vision_tower\": \"model.vision_tower\"}'") from None

