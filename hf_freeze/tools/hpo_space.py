"""What a layer-fidelity search explores: the search space (a YAML of training options and their ranges) and the
fidelity grid (the fractions of trainable layers of its rungs), both checked before any trial runs.

A search-space file maps `TrainingArguments` fields to a range or a list of choices:

```yaml
learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
warmup_steps: {choices: [0.0, 0.1]}            # a float in [0, 1): a ratio of the steps
per_device_train_batch_size: {low: 8, high: 32, step: 8}     # whole numbers: an integer range
```
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..config import FreezeTrainingArguments, load_config_file
from ..errors import FreezeConfigError, invalid

__all__ = ["DEFAULT_FIDELITIES", "FIDELITY_KINDS", "SearchParameter", "SearchSpace", "check_fidelity_grid",
           "load_search_space", "trainable_layer_counts", "training_step_counts"]

DEFAULT_FIDELITIES: Tuple[float, ...] = (0.25, 0.5, 1.0)
# What a rung's fraction is of: the model's layers left trainable, or the optimizer steps of a full run.
FIDELITY_KINDS: Tuple[str, ...] = ("layers", "steps")
_RANGE_KEYS = {"low", "high", "log", "step"}
# Set by the fidelity of each rung: searching them would mix the fidelity with the configuration.
_SET_BY_THE_FIDELITY = ("freeze_strategy", "freeze_layers")


@dataclass(frozen=True)
class SearchParameter:
    """One searched option: a range (``low``/``high``, optionally ``log`` or ``step``) or a list of ``choices``.

    Example:

    ```python
    >>> from hf_freeze.tools.hpo_space import SearchParameter
    >>> SearchParameter.from_entry("learning_rate", {"low": 1.0e-5, "high": 1.0e-3, "log": True}).kind
    'float'
    ```
    """

    name: str
    kind: str  # 'float', 'int' or 'categorical'
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Tuple[Any, ...] = ()

    @classmethod
    def from_entry(cls, name: str, entry: Any) -> "SearchParameter":
        field = f"space.{name}"
        fix = "write {low: ..., high: ...} (optionally log: true or step: ...) or {choices: [...]}"
        if not isinstance(entry, Mapping):
            raise invalid(field, entry, "a mapping", hint=f"Fix: {fix}.")
        keys = set(entry)
        if "choices" in keys:
            if keys != {"choices"}:
                raise invalid(field, dict(entry), "either choices or a range, not both", hint=f"Fix: {fix}.")
            choices = entry["choices"]
            if not isinstance(choices, list) or not choices:
                raise invalid(field, choices, "a non-empty list of choices", hint="Fix: choices: [a, b, ...].")
            if not all(isinstance(choice, (bool, int, float, str)) or choice is None for choice in choices):
                raise invalid(field, choices, "choices that are numbers, strings, booleans or null")
            if len(set(map(repr, choices))) != len(choices):
                raise invalid(field, choices, "choices without repeats")
            return cls(name, "categorical", choices=tuple(choices))
        unknown = keys - _RANGE_KEYS
        if unknown or not {"low", "high"} <= keys:
            raise invalid(field, dict(entry), "a range with low and high" + (
                f" (unknown keys: {sorted(unknown)})" if unknown else ""), hint=f"Fix: {fix}.")
        low, high, step, log = entry["low"], entry["high"], entry.get("step"), entry.get("log", False)
        for key, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                hint = "YAML reads 1e-5 as a string; write 1.0e-5." if isinstance(value, str) else None
                raise invalid(f"{field}.{key}", value, "a number", hint=hint)
        if not isinstance(log, bool):
            raise invalid(f"{field}.log", log, "true or false")
        if not low < high:
            raise invalid(field, dict(entry), "a range with low < high")
        if log and low <= 0:
            raise invalid(f"{field}.low", low, "> 0 for a log range", hint="Fix: raise low, or drop log: true.")
        if log and step is not None:
            raise invalid(field, dict(entry), "a range with log or step, not both")
        if step is not None and step <= 0:
            raise invalid(f"{field}.step", step, "a number > 0")
        whole = all(isinstance(value, int) for value in (low, high) + ((step,) if step is not None else ()))
        return cls(name, "int" if whole else "float", low=low, high=high, log=log, step=step)

    def suggest(self, trial: Any) -> Any:
        """The value of this option for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def as_json(self) -> Dict[str, Any]:
        values = dataclasses.asdict(self)
        values["choices"] = list(self.choices)
        return values


@dataclass(frozen=True)
class SearchSpace:
    """The searched training options, checked against the `TrainingArguments` fields.

    Example:

    ```python
    >>> from hf_freeze.tools.hpo_space import SearchSpace
    >>> space = SearchSpace.from_mapping({"learning_rate": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
    ...                                   "warmup_steps": {"choices": [0.0, 0.1]}})
    >>> [parameter.name for parameter in space.parameters]
    ['learning_rate', 'warmup_steps']
    ```
    """

    parameters: Tuple[SearchParameter, ...]
    source: str = "the search space"

    @classmethod
    def from_mapping(cls, mapping: Any, source: str = "the search space") -> "SearchSpace":
        if not isinstance(mapping, Mapping) or not mapping:
            raise FreezeConfigError(
                f"{source} must map at least one training option to a range or choices (got {mapping!r}).",
                fields=["space"],
                hint="Fix: e.g. learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}.",
            )
        known = [item.name for item in dataclasses.fields(FreezeTrainingArguments)]
        parameters = []
        for name, entry in mapping.items():
            if name in _SET_BY_THE_FIDELITY:
                raise FreezeConfigError(
                    f"{source}: {name!r} cannot be searched: each rung sets it (freeze_strategy 'bottom' with "
                    "freeze_layers = the frozen share of the fidelity).", fields=[name, *_SET_BY_THE_FIDELITY, "space"],
                    hint="Fix: remove it from the space; change the rungs with the fidelity grid instead.")
            if name == "warmup_ratio" and name not in known:
                raise FreezeConfigError(
                    f"{source}: 'warmup_ratio' is not a training option in this transformers version",
                    fields=["space"], hint="Fix: search warmup_steps instead; a float in [0, 1) is a ratio of the "
                    "training steps there, e.g. warmup_steps: {choices: [0.0, 0.1]}.")
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.75)
                raise FreezeConfigError(
                    f"{source}: {name!r} is not a training option" + (f" (did you mean {close[0]!r}?)" if close else ""),
                    fields=[str(name)] if str(name).startswith("freeze_") else ["space"],
                    hint="Fix: use a field of FreezeTrainingArguments (TrainingArguments or freeze_*).")
            parameters.append(SearchParameter.from_entry(str(name), entry))
        return cls(tuple(parameters), source)

    def suggest(self, trial: Any) -> Dict[str, Any]:
        """The trial's value of every searched option."""
        return {parameter.name: parameter.suggest(trial) for parameter in self.parameters}

    def as_json(self) -> str:
        """A canonical text of the space, stored with the study to refuse a later, different space."""
        return json.dumps([parameter.as_json() for parameter in self.parameters], sort_keys=True)


def load_search_space(path: str) -> SearchSpace:
    """Read and check a search-space YAML (see the module docstring)."""
    return SearchSpace.from_mapping(load_config_file(path), source=path)


def check_fidelity_grid(fidelities: Sequence[float], unit: str) -> List[float]:
    """``fidelities`` as a list, refused unless they are strictly increasing fractions in (0, 1] of ``unit``
    ('trainable layers', 'training steps'): one per rung, each rung training more than the one before."""
    grid = list(fidelities)
    if not grid:
        raise invalid("fidelities", grid, f"a non-empty list of fractions of {unit}, e.g. [0.25, 0.5, 1.0]")
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise invalid("fidelities", grid, f"fractions of {unit} in (0, 1]",
                          hint=f"Fix: {value!r} is not one; e.g. [0.25, 0.5, 1.0].")
    if any(later <= earlier for earlier, later in zip(grid, grid[1:])):
        raise invalid("fidelities", grid, f"strictly increasing (each rung trains more {unit} than the one before)",
                      hint=f"Fix: e.g. {sorted(set(grid))}.")
    return grid


def _counts(grid: List[float], total: int, unit: str) -> List[int]:
    """Each fraction of `total` rounded to a count of `unit` ('layers' of the model, 'steps' of a full run)."""
    counts = [int(math.floor(value * total + 0.5)) for value in grid]
    for value, count in zip(grid, counts):
        if count == 0:
            raise invalid("fidelities", grid, f"fractions that each give a rung at least one of the {total} {unit} "
                          f"({value} of them is {value * total:.2g})", hint=f"Fix: start the grid at {1 / total:.3g} "
                          "or above.")
    if any(later <= earlier for earlier, later in zip(counts, counts[1:])):
        raise invalid("fidelities", grid, f"fractions that give each rung more {unit} than the one before (of "
                      f"{total} {unit}: {counts})", hint="Fix: space the fractions further apart.")
    return counts


def trainable_layer_counts(fidelities: Sequence[float], num_layers: int) -> List[int]:
    """The number of trainable (top) layers at each rung; refuses a grid that is not a strictly increasing list of
    fractions in (0, 1] or that leaves a rung with no trainable layer.

    Example:

    ```python
    >>> from hf_freeze.tools.hpo_space import trainable_layer_counts
    >>> trainable_layer_counts([0.25, 0.5, 1.0], num_layers=6)
    [2, 3, 6]
    ```
    """
    return _counts(check_fidelity_grid(fidelities, "trainable layers"), num_layers, "layers")


def training_step_counts(fidelities: Sequence[float], full_steps: int) -> List[int]:
    """The optimizer steps of each rung of the 'steps' fidelity (fractions of a full run's steps, rounded); refuses a
    grid that is not a strictly increasing list of fractions in (0, 1] or that gives a rung no step.

    Example:

    ```python
    >>> from hf_freeze.tools.hpo_space import training_step_counts
    >>> training_step_counts([0.25, 0.5, 1.0], full_steps=32)
    [8, 16, 32]
    ```
    """
    return _counts(check_fidelity_grid(fidelities, "training steps"), full_steps, "steps")
