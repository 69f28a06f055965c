"""Check a training YAML the way `HfArgumentParser.parse_yaml_file` reads it, and report every problem at once.

`parse_yaml_file` stops at the first bad value, and lets some through that break later: PyYAML reads ``2e-5`` as a
string, so ``learning_rate: 2e-5`` is accepted and fails when the optimizer is built. `check_config` collects all of
them: unknown keys (with the closest valid name), values of the wrong type, each bad `freeze_*` value with the field,
the value and what is valid, and (given a model) the values that depend on it. Problems are sorted by the fields
each error names (`FreezeConfigError.fields`); nothing here reads the text of a message.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..config import FreezeArguments, FreezeTrainingArguments, freeze_fields, load_config_file
from ..config.types import ConfigProblem, field_hints, type_error, unknown_keys
from ..errors import FreezeConfigError, invalid_choice
from ..policies import STRATEGIES
from ..policies.adaptive import check_against_training

__all__ = ["ConfigProblem", "check_config", "check_config_file", "did_you_mean", "unknown_keys"]


def check_config_file(path: str, dataclass_types: Sequence[type] = (FreezeTrainingArguments,), model=None) -> List[ConfigProblem]:
    """Every problem of the YAML file at ``path`` for `HfArgumentParser(dataclass_types)` (see `check_config`)."""
    try:
        values = load_config_file(path)
    except FreezeConfigError as error:
        return [ConfigProblem(error.fields, error.message)]
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
    >>> from hf_freeze.tools.validate import check_config
    >>> for problem in check_config({"learning_rat": 1.0e-5, "freeze_strategy": "bottm"}):
    ...     print(problem)
    unknown key 'learning_rat' (did you mean 'learning_rate'?)
    `freeze_strategy` must be one of 'none', ... (got 'bottm'); did you mean 'bottom'?
    ```
    """
    hint_of: Dict[str, Any] = {}
    for dtype in dataclass_types:
        for name, hint in field_hints(dtype).items():
            hint_of.setdefault(name, hint)
    problems = unknown_keys(values, dataclass_types)
    freeze_names = set(freeze_fields())
    typed: Dict[str, Any] = {}
    for key, value in values.items():
        if key not in hint_of:
            continue
        if key in freeze_names:  # FreezeArguments checks its own types, with its own coercions (3 -> [3])
            typed[key] = value
            continue
        error = type_error(key, value, hint_of[key])
        if error is None:
            typed[key] = value
        else:
            problems.append(ConfigProblem(error.fields, error.sentence))
    freeze_values = {key: value for key, value in typed.items() if key in freeze_names}
    freeze_problems, arguments = _freeze_problems(freeze_values)
    problems += freeze_problems
    if arguments is not None:  # the add-ons' option checks that need no model (`LayerFreezer` runs them too)
        room_problems = [problem for check in _room_option_checks() for problem in _problems_of(check, arguments)]
        problems += room_problems
        arguments = None if room_problems else arguments
    max_steps = typed.get("max_steps")
    if arguments is not None and isinstance(max_steps, int) and max_steps > 0:
        problems += _problems_of(check_against_training, arguments, max_steps)
    if arguments is not None and model is not None:
        steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
        problems += _problems_of(_check_against_model, arguments, model, steps, suffix=" (for this model)")
    for dtype in dataclass_types:
        problems += _construction_problems(dtype, typed, freeze_names)
    return problems


def _freeze_problems(values: Dict[str, Any]) -> Tuple[List[ConfigProblem], Optional[FreezeArguments]]:
    """All `freeze_*` problems: after each error, drop the fields it names and look again."""
    problems: List[ConfigProblem] = []
    strategy = values.get("freeze_strategy", "none")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        problems.append(_problem(invalid_choice("freeze_strategy", strategy, STRATEGIES.names())))
        values = {key: value for key, value in values.items() if key != "freeze_strategy"}
        # Without a known strategy only the types of the other fields can be checked: one field at a time.
        for key, value in values.items():
            try:
                FreezeArguments(freeze_strategy=_strategy_reading(key), **{key: value})
            except FreezeConfigError as error:
                if set(error.fields) <= {key}:
                    problems.append(_problem(error))
        return problems, None
    removed: set = set()
    remaining = dict(values)
    for _ in range(len(values) + 1):
        try:
            arguments = FreezeArguments(**remaining)
            return problems, (arguments if not problems else None)
        except FreezeConfigError as error:
            mentioned = set(error.fields)
            if mentioned & removed:
                break  # a consequence of dropping a value already reported ("must be set")
            named = mentioned & set(remaining)
            problems.append(_problem(error))
            removable = named - {"freeze_strategy"}
            if not removable:
                break
            for key in removable:
                remaining.pop(key)
            removed |= removable
    return problems, None


def _room_option_checks() -> List[Callable[[Any], None]]:
    """The option checks of the add-ons' rooms that need no model, imported from the rooms themselves: the engine's
    list of add-ons would import discovery and the Trainer, which `validate` without a model never needs."""
    from ..learning_rates.rates import check_rate_options
    from ..lora.options import lora_options

    return [check_rate_options, lora_options]


def _strategy_reading(option: str) -> str:
    """A strategy that reads ``option``, to check its value alone."""
    return next((name for name in STRATEGIES.names() if option in STRATEGIES.get(name).options), "none")


def _check_against_model(arguments: FreezeArguments, model, max_steps: Optional[int]) -> None:
    from ..engine import LayerFreezer  # with a model only: the engine imports torch

    # Exactly what training runs: building the freezer refuses on the model what it would refuse in the Trainer;
    # with the run's length known, the checks that need it run too.
    freezer = LayerFreezer(model, arguments)
    if max_steps:
        freezer.check(max_steps)


def _problems_of(check: Callable[..., None], *args: Any, suffix: str = "") -> List[ConfigProblem]:
    """The refusal of ``check(*args)`` as a problem (none when it passes)."""
    try:
        check(*args)
    except FreezeConfigError as error:
        return [_problem(error, suffix)]
    return []


def _problem(error: FreezeConfigError, suffix: str = "") -> ConfigProblem:
    """A refusal as a problem, with the closest valid value when the error lists them and the value is a near miss."""
    return ConfigProblem(error.fields, error.sentence + suffix + did_you_mean(error))


def did_you_mean(error: FreezeConfigError) -> str:
    """``"; did you mean 'bottom'?"`` when ``error`` lists the valid values and its value is a near miss, else "".

    Example:

    ```python
    >>> from hf_freeze.errors import invalid_choice
    >>> did_you_mean(invalid_choice("freeze_strategy", "bottm", ["bottom", "top"]))
    "; did you mean 'bottom'?"
    ```
    """
    choices = [option for option in error.options if isinstance(option, str)]
    close = difflib.get_close_matches(error.value, choices, n=1) if isinstance(error.value, str) and choices else []
    return f"; did you mean {close[0]!r}?" if close else ""


def _construction_problems(dtype: type, typed: Dict[str, Any], freeze_names: set) -> List[ConfigProblem]:
    """Errors that only the dataclass's own `__post_init__` finds (e.g. contradictory training arguments)."""
    names = {item.name for item in dataclasses.fields(dtype) if item.init}
    own = {key: value for key, value in typed.items() if key in names and key not in freeze_names}
    try:
        dtype(**own)
    except FreezeConfigError:
        return []  # already reported field by field
    except (ValueError, TypeError, ImportError, RuntimeError) as error:
        return [ConfigProblem((), f"{dtype.__name__}: {error}")]
    return []
