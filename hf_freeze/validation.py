"""Check a training YAML the way `HfArgumentParser.parse_yaml_file` reads it, and report every problem at once.

`parse_yaml_file` stops at the first bad value, and lets some through that break later: PyYAML reads ``2e-5`` as a
string, so ``learning_rate: 2e-5`` is accepted and fails when the optimizer is built. `check_config` collects all of
them: unknown keys (with the closest valid name), values of the wrong type, each bad `freeze_*` value with the field,
the value and what is valid, and (given a model) the values that depend on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .config import FreezeArguments, FreezeTrainingArguments, freeze_fields
from .errors import FreezeConfigError
from .policies import STRATEGIES, TrainingProgress, decide

__all__ = [
    "ConfigProblem",
    "check_config",
    "check_config_file",
    "load_config_file",
    "parse_args_with_config_file",
    "unknown_keys",
]

_FIELD_IN_MESSAGE = re.compile(r"`(freeze_\w+)`")
_YAML_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration: the key it concerns (``None`` when it spans several) and why."""

    key: Optional[str]
    message: str

    def __str__(self) -> str:
        return self.message


def load_config_file(path: str) -> Dict[str, Any]:
    """The mapping in a YAML (or JSON) file; a `FreezeConfigError` when it cannot be read as one."""
    import yaml

    if not os.path.isfile(path):
        raise FreezeConfigError(f"Configuration file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise FreezeConfigError(f"{path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise FreezeConfigError(f"{path} must hold a mapping of option: value (got a {type(values).__name__}).")
    return values


def check_config_file(path: str, dataclass_types: Sequence[type] = (FreezeTrainingArguments,), model=None) -> List[ConfigProblem]:
    """Every problem of the YAML file at ``path`` for `HfArgumentParser(dataclass_types)` (see `check_config`)."""
    try:
        values = load_config_file(path)
    except FreezeConfigError as error:
        return [ConfigProblem(None, str(error))]
    return check_config(values, dataclass_types, model)


def check_config(
    values: Mapping[str, Any], dataclass_types: Sequence[type] = (FreezeTrainingArguments,), model=None
) -> List[ConfigProblem]:
    """Every problem of ``values`` as `HfArgumentParser(dataclass_types).parse_dict` would meet it, collected.

    Args:
        values: The parsed YAML.
        dataclass_types: The argument dataclasses of the training script (`FreezeTrainingArguments`, or with the
            script's own model and data dataclasses).
        model: Optionally, the model (real or on the meta device) to check the model-dependent values against.

    Example:

    ```python
    >>> from hf_freeze.validation import check_config
    >>> for problem in check_config({"learning_rat": 1.0e-5, "freeze_strategy": "bottm"}):
    ...     print(problem)
    unknown key 'learning_rat' (did you mean 'learning_rate'?)
    `freeze_strategy` must be one of 'none', ... (got 'bottm'); did you mean 'bottom'?
    ```
    """
    hint_of: Dict[str, Any] = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for item in dataclasses.fields(dtype):
            if item.init:
                hint_of.setdefault(item.name, hints[item.name])
    problems = unknown_keys(values, dataclass_types)
    freeze_names = set(freeze_fields())
    typed: Dict[str, Any] = {}
    for key, value in values.items():
        if key not in hint_of:
            continue
        if key in freeze_names:  # FreezeArguments checks its own types, with its own coercions (3 -> [3])
            typed[key] = value
            continue
        hint = hint_of[key]
        expected = _type_problem(value, hint)
        if expected is None:
            typed[key] = value
        else:
            problems.append(
                ConfigProblem(key, f"`{key}` must be {expected} (got {value!r}){_yaml_hint(value)}{_closest(value, hint)}")
            )
    freeze_values = {key: value for key, value in typed.items() if key in freeze_names}
    freeze_problems, arguments = _freeze_problems(freeze_values)
    problems += freeze_problems
    max_steps = typed.get("max_steps")
    if arguments is not None and isinstance(max_steps, int) and max_steps > 0:
        problems += _training_length_problems(arguments, max_steps)
    if arguments is not None and model is not None:
        problems += _model_problems(arguments, model, typed.get("max_steps"))
    for dtype in dataclass_types:
        problems += _construction_problems(dtype, typed, freeze_names)
    return problems


def unknown_keys(values: Mapping[str, Any], dataclass_types: Sequence[type]) -> List[ConfigProblem]:
    """The keys of ``values`` that no field of ``dataclass_types`` takes, each with the closest valid name."""
    known = [item.name for dtype in dataclass_types for item in dataclasses.fields(dtype) if item.init]
    problems = []
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
            problems.append(
                ConfigProblem(str(key), f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            )
    return problems


def _freeze_problems(values: Dict[str, Any]) -> Tuple[List[ConfigProblem], Optional[FreezeArguments]]:
    """All `freeze_*` problems: after each error, drop the fields it names and look again."""
    problems: List[ConfigProblem] = []
    strategy = values.get("freeze_strategy", "none")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        message = f"`freeze_strategy` must be one of {', '.join(map(repr, STRATEGIES.names()))} (got {strategy!r})"
        close = difflib.get_close_matches(str(strategy), STRATEGIES.names(), n=1)
        problems.append(ConfigProblem("freeze_strategy", message + (f"; did you mean {close[0]!r}?" if close else "")))
        values = {key: value for key, value in values.items() if key != "freeze_strategy"}
        # Without a known strategy only the types of the other fields can be checked: one field at a time.
        for key, value in values.items():
            try:
                FreezeArguments(freeze_strategy=_strategy_reading(key), **{key: value})
            except FreezeConfigError as error:
                if _named_fields(str(error)) <= {key}:
                    problems.append(ConfigProblem(key, _sentence(error)))
        return problems, None
    removed: set = set()
    remaining = dict(values)
    for _ in range(len(values) + 1):
        try:
            arguments = FreezeArguments(**remaining)
            return problems, (arguments if not problems else None)
        except FreezeConfigError as error:
            mentioned = _named_fields(str(error))
            if mentioned & removed:
                break  # a consequence of dropping a value already reported ("must be set")
            named = mentioned & set(remaining)
            problems.append(ConfigProblem(", ".join(sorted(named)) or None, _sentence(error)))
            removable = named - {"freeze_strategy"}
            if not removable:
                break
            for key in removable:
                remaining.pop(key)
            removed |= removable
    return problems, None


def _strategy_reading(option: str) -> str:
    """A strategy that reads ``option``, to check its value alone."""
    return next((name for name in STRATEGIES.names() if option in STRATEGIES.get(name).options), "none")


def _training_length_problems(arguments: FreezeArguments, max_steps: int) -> List[ConfigProblem]:
    """What `FreezeCallback` would refuse when training starts and `max_steps` is known (an adaptive probe as long as
    training)."""
    if not STRATEGIES.get(arguments.freeze_strategy).needs_scores:
        return []
    from .policies.adaptive import check_against_training

    try:
        check_against_training(arguments, max_steps)
    except FreezeConfigError as error:
        return [_problem_of(error)]
    return []


def _model_problems(arguments: FreezeArguments, model, max_steps: Any) -> List[ConfigProblem]:
    from .discovery import discover_layout

    try:
        layout = discover_layout(model, arguments.freeze_layer_paths)
        steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else 100
        fractions = (0.0, 0.25, 0.5, 0.75, 1.0) if STRATEGIES.get(arguments.freeze_strategy).dynamic else (0.0,)
        for fraction in fractions:
            decide(layout, arguments, TrainingProgress(step=int(fraction * steps), max_steps=steps))
    except FreezeConfigError as error:
        return [_problem_of(error, " (for this model)")]
    return []


def _construction_problems(dtype: type, typed: Dict[str, Any], freeze_names: set) -> List[ConfigProblem]:
    """Errors that only the dataclass's own `__post_init__` finds (e.g. contradictory training arguments)."""
    names = {item.name for item in dataclasses.fields(dtype) if item.init}
    own = {key: value for key, value in typed.items() if key in names and key not in freeze_names}
    try:
        dtype(**own)
    except FreezeConfigError:
        return []  # already reported field by field
    except (ValueError, TypeError, ImportError, RuntimeError) as error:
        return [ConfigProblem(None, f"{dtype.__name__}: {error}")]
    return []


def _problem_of(error: FreezeConfigError, suffix: str = "") -> ConfigProblem:
    """A refusal as a problem, keyed by the fields its message names."""
    return ConfigProblem(", ".join(sorted(_named_fields(str(error)))) or None, _sentence(error) + suffix)


def _named_fields(message: str) -> set:
    return set(_FIELD_IN_MESSAGE.findall(message))


def _sentence(error: Exception) -> str:
    return str(error).rstrip(".")


# ---------------------------------------------------------------------------------------------------------------
# Types, as HfArgumentParser's dataclasses annotate them


def _type_problem(value: Any, hint: Any) -> Optional[str]:
    """``None`` when ``value`` fits the annotation ``hint``, else a description of what would."""
    return None if _accepts(value, hint) else _describe(hint)


def _union_members(hint: Any) -> Optional[Tuple[Any, ...]]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return typing.get_args(hint)
    return None


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _judged(hint: Any) -> bool:
    """Whether we know how to judge a value against ``hint`` (other classes are left to the dataclass)."""
    members = _union_members(hint)
    if members is not None:
        return all(_judged(member) for member in members)
    origin = typing.get_origin(hint) or hint
    return origin in (bool, int, float, str, list, tuple, dict, type(None), typing.Literal) or _is_enum(hint)


def _accepts(value: Any, hint: Any) -> bool:
    if hint is Any or not _judged(hint):
        return True
    members = _union_members(hint)
    if members is not None:
        enums = [member for member in members if _is_enum(member)]
        if enums and isinstance(value, str):  # `SchedulerType | str`: the string must name a member
            return any(_accepts(value, member) for member in enums)
        return any(_accepts(value, member) for member in members)
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
        return not item_types or all(_accepts(item, item_types[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    members = _union_members(hint)
    if members is not None:
        if any(_is_enum(member) for member in members):
            members = [member for member in members if member is not str]
        return " or ".join(dict.fromkeys(_describe(member) for member in members))
    origin = typing.get_origin(hint) or hint
    if _is_enum(hint):
        return "one of " + ", ".join(repr(member.value) for member in hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(item) for item in typing.get_args(hint))
    if origin in (list, tuple):
        item_types = typing.get_args(hint)
        return "a list" + (f" of {_describe(item_types[0])} values" if item_types else "")
    return {
        type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
        dict: "a mapping",
    }.get(origin, getattr(origin, "__name__", str(origin)))


def _choices(hint: Any) -> List[Any]:
    members = _union_members(hint) or (hint,)
    choices: List[Any] = []
    for member in members:
        if _is_enum(member):
            choices += [item.value for item in member]
        elif typing.get_origin(member) is typing.Literal:
            choices += list(typing.get_args(member))
    return choices


def _closest(value: Any, hint: Any) -> str:
    choices = [choice for choice in _choices(hint) if isinstance(choice, str)]
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) and choices else []
    return f"; did you mean {close[0]!r}?" if close else ""


def _yaml_hint(value: Any) -> str:
    if isinstance(value, str) and _YAML_NUMBER.match(value.strip()):
        return f": YAML reads {value} as a string; write it with a dot and a signed exponent, e.g. {float(value):.1e}"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# Command-line parsing with a configuration file


def parse_args_with_config_file(parser, args: Optional[Iterable[str]] = None) -> tuple:
    """`parser.parse_args_into_dataclasses`, where the first argument may be a YAML/JSON file of defaults.

    ``script.py config.yaml --learning_rate 1e-4`` reads the file, refuses its unknown keys (naming the closest
    valid ones), then lets the command line override it: the file alone works as in `run_glue.py`, and one setting
    can change without editing it.

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> from hf_freeze import FreezeArguments
    >>> from hf_freeze.validation import parse_args_with_config_file
    >>> (args,) = parse_args_with_config_file(HfArgumentParser(FreezeArguments), ["--freeze_strategy", "top",
    ...                                                                           "--freeze_layers", "2"])
    >>> args.freeze_layers
    2
    ```
    """
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0].endswith((".yaml", ".yml", ".json")):
        values = load_config_file(args[0])
        unknown = unknown_keys(values, parser.dataclass_types)
        if unknown:
            raise FreezeConfigError(f"{args[0]}: " + "; ".join(map(str, unknown)) + ".")
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # the file gives it
        parser.set_defaults(**values)
        args = args[1:]
    return parser.parse_args_into_dataclasses(args=args)
