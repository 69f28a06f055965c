"""The one type checker: judges a value against a dataclass field's annotation, as `HfArgumentParser` reads it.

It serves `FreezeArguments.__post_init__` (a YAML file hands values over untyped: "bottom" for a bool, 3 for a
list), `hf-freeze validate` and `check_config` (every field of `TrainingArguments` and of a script's own argument
dataclasses). The words for what is valid come from the annotation ("an integer", "a list of strings", "one of 'linear',
'cosine', ...") unless the caller has better ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import enum
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import FreezeConfigError, invalid, invalid_choice

__all__ = [
    "ConfigProblem",
    "accepts",
    "check_field",
    "check_values",
    "closest",
    "describe",
    "field_hints",
    "type_error",
    "type_problem",
    "unknown_keys",
    "yaml_hint",
]

_YAML_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration: the fields it concerns (none when it is about the file) and why."""

    fields: Tuple[str, ...]
    message: str

    @property
    def key(self) -> Optional[str]:
        return ", ".join(self.fields) or None

    def __str__(self) -> str:
        return self.message


def unknown_keys(values: Mapping[str, Any], dataclass_types: Sequence[type]) -> List[ConfigProblem]:
    """The keys of ``values`` that no field of ``dataclass_types`` takes, each with the closest valid name."""
    known = [name for dtype in dataclass_types for name in field_hints(dtype)]
    problems = []
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
            problems.append(
                ConfigProblem((str(key),), f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            )
    return problems


@functools.lru_cache(maxsize=None)
def field_hints(dataclass_type: type) -> Dict[str, Any]:
    """The resolved annotation of every ``__init__`` field of ``dataclass_type``."""
    hints = typing.get_type_hints(dataclass_type)
    return {item.name: hints[item.name] for item in dataclasses.fields(dataclass_type) if item.init}


def check_field(
    name: str, hint: Any, value: Any, expects: Optional[str] = None, count_or_fraction: bool = False
) -> Any:
    """``value`` of the field ``name`` checked against its annotation ``hint`` and coerced the way a YAML user means
    it; raises a `FreezeConfigError` naming the field otherwise.

    Coercions: a single value where a list is expected becomes a one-item list (``freeze_layer_indices: 3``); a whole
    number where a float is expected becomes a float; with ``count_or_fraction`` a whole number stays a count
    (``2.0`` -> ``2``) and anything else is a fraction. ``expects`` says in words what is valid, when the annotation
    alone would say less.
    """
    if value is None:
        return None
    expected = expects or describe(hint)
    inner = _without_none(hint)
    origin = typing.get_origin(inner) or inner
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not accepts(value, inner):
            raise invalid(name, value, expected)
        if len(value) == 0:
            raise invalid(name, value, "a non-empty list, or unset")
        return list(value)
    if not accepts(value, inner):
        allowed = choices(inner)
        if allowed and expects is None:  # a `Literal`: the error keeps the choices, for "did you mean ...?"
            raise invalid_choice(name, value, allowed)
        raise invalid(name, value, expected)
    if origin is float:
        if not math.isfinite(value):
            raise invalid(name, value, "a finite number")
        value = float(value)
        if count_or_fraction and value.is_integer():
            value = int(value)
    return value


def _without_none(hint: Any) -> Any:
    members = union_members(hint)
    if members is None:
        return hint
    others = [member for member in members if member is not type(None)]
    return others[0] if len(others) == 1 else typing.Union[tuple(others)]


def type_error(name: str, value: Any, hint: Any) -> Optional[FreezeConfigError]:
    """The error for a value of the field ``name`` that does not fit its annotation, else ``None``: what is valid,
    why YAML may have read it wrongly ("2e-5" is a string to YAML), and the closest allowed value of a choice."""
    expected = type_problem(value, hint)
    if expected is None:
        return None
    return FreezeConfigError(
        f"`{name}` must be {expected} (got {value!r}){yaml_hint(value)}{closest(value, hint)}.", fields=[name]
    )


def check_values(obj: Any, skip: Sequence[str] = ()) -> None:
    """Refuse a dataclass field whose value (when it is not the default) does not fit its annotation, as
    `hf-freeze validate` would: `FreezeTrainingArguments` runs it on the `TrainingArguments` fields, so that a
    ``learning_rate: 2e-5`` read by YAML as a string fails when the file is parsed, not at the first step."""
    for item in dataclasses.fields(obj):
        if not item.init or item.name in skip:
            continue
        value = getattr(obj, item.name)
        # Defaults are right by construction, None means "unset" to HfArgumentParser whatever the annotation, and
        # only what a YAML file can hold is judged: objects built in code (an AcceleratorConfig, a dataclass copied
        # after its own __post_init__ converted its fields) are the dataclass's business.
        if value is None or (item.default is not dataclasses.MISSING and _same(value, item.default)):
            continue
        if type(value) not in (str, int, float, bool, list, dict):
            continue
        error = type_error(item.name, value, field_hints(type(obj))[item.name])
        if error is not None:
            raise error


def _same(value: Any, default: Any) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # values whose comparison is not a plain bool (tensors, arrays)
        return False


def type_problem(value: Any, hint: Any) -> Optional[str]:
    """``None`` when ``value`` fits the annotation ``hint``, else a description of what would."""
    return None if accepts(value, hint) else describe(hint)


def union_members(hint: Any) -> Optional[Tuple[Any, ...]]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return typing.get_args(hint)
    return None


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _judged(hint: Any) -> bool:
    """Whether we know how to judge a value against ``hint`` (other classes are left to the dataclass)."""
    members = union_members(hint)
    if members is not None:
        return all(_judged(member) for member in members)
    origin = typing.get_origin(hint) or hint
    return origin in (bool, int, float, str, list, tuple, dict, type(None), typing.Literal) or _is_enum(hint)


def accepts(value: Any, hint: Any) -> bool:
    if hint is Any or not _judged(hint):
        return True
    members = union_members(hint)
    if members is not None:
        enums = [member for member in members if _is_enum(member)]
        if enums and isinstance(value, str):  # `SchedulerType | str`: the string must name a member
            return any(accepts(value, member) for member in enums)
        return any(accepts(value, member) for member in members)
    origin = typing.get_origin(hint) or hint
    if origin is type(None):
        return value is None
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if _is_enum(hint):
        return isinstance(value, hint) or value in [member.value for member in hint]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item_types = typing.get_args(hint)
        return not item_types or all(accepts(item, item_types[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def describe(hint: Any) -> str:
    """What a value of type ``hint`` is, in words ("an integer", "true, false or unset", "a list of strings")."""
    members = union_members(hint)
    if members is not None:
        present = [member for member in members if member is not type(None)]
        if present == [bool]:
            return "true, false or unset"
        if any(_is_enum(member) for member in present):
            present = [member for member in present if member is not str]
        return " or ".join(dict.fromkeys(describe(member) for member in present))
    origin = typing.get_origin(hint) or hint
    if _is_enum(hint):
        return "one of " + ", ".join(repr(member.value) for member in hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(item) for item in typing.get_args(hint))
    if origin in (list, tuple):
        item_types = typing.get_args(hint)
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return "a list" + (f" of {plural.get(item_types[0], describe(item_types[0]) + ' values')}" if item_types else "")
    return {
        type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
        dict: "a mapping",
    }.get(origin, getattr(origin, "__name__", str(origin)))


def choices(hint: Any) -> List[Any]:
    """The values an enum or `Literal` annotation allows (empty for other types)."""
    members = union_members(hint) or (hint,)
    allowed: List[Any] = []
    for member in members:
        if _is_enum(member):
            allowed += [item.value for item in member]
        elif typing.get_origin(member) is typing.Literal:
            allowed += list(typing.get_args(member))
    return allowed


def closest(value: Any, hint: Any) -> str:
    """"; did you mean 'cosine'?" when ``value`` is a near miss of one of the allowed strings, else ""."""
    allowed = [choice for choice in choices(hint) if isinstance(choice, str)]
    close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) and allowed else []
    return f"; did you mean {close[0]!r}?" if close else ""


def yaml_hint(value: Any) -> str:
    if isinstance(value, str) and _YAML_NUMBER.match(value.strip()):
        return f": YAML reads {value} as a string; write it with a dot and a signed exponent, e.g. {float(value):.1e}"
    return ""

