"""The help text of the options whose choices a registry holds: `freeze_strategy` and `freeze_score`.

It is written from the registries when `FreezeArguments` is defined, so that `--help`, the option page
(docs/options.md) and the validator (`Registry.get`, whose error lists the valid names) read one list: a new built-in
strategy or score appears in all of them. (A strategy registered later, by a user's code, is accepted and listed in
errors, but not in this text.) Options with a fixed set of choices declare it in their annotation instead:
``Optional[Literal[SCHEDULE_UNITS]]``.
"""

from __future__ import annotations

from typing import Iterable

from ..policies import SCORES, STRATEGIES
from ..policies.adaptive import DEFAULT_SCORE

__all__ = ["score_help", "strategy_help"]

_STATIC, _SCHEDULES, _MEASURED = "Static", "Schedules (the frozen set changes during training)", "Chosen from measurements"


def strategy_help() -> str:
    """`freeze_strategy`'s help: the registered strategies, grouped by how they decide.

    Example:

    ```python
    >>> from hf_freeze.config.choices import strategy_help
    >>> strategy_help()[:60]
    "Which layers to freeze. Static: 'none', 'bottom', 'top', 'in"
    ```
    """
    groups = {_STATIC: [], _SCHEDULES: [], _MEASURED: []}
    for name in STRATEGIES.names():
        strategy = STRATEGIES.get(name)
        groups[_MEASURED if strategy.needs_scores else _SCHEDULES if strategy.dynamic else _STATIC].append(name)
    listed = " ".join(f"{group}: {_quoted(names)}." for group, names in groups.items() if names)
    return f"Which layers to freeze. {listed} The options each strategy reads are listed in docs/options.md."


def score_help() -> str:
    """`freeze_score`'s help: the registered scores, each with what it measures.

    Example:

    ```python
    >>> from hf_freeze.config.choices import score_help
    >>> score_help()[:60]
    "'adaptive': how layers are scored (default 'weight_change')."
    ```
    """
    scores = "; ".join(f"{name!r}: {SCORES.get(name).description}" for name in SCORES.names())
    return f"'adaptive': how layers are scored (default {DEFAULT_SCORE!r}). {scores}."


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)
