"""Policies: pure functions from blocks (and progress) to the set of parameters to freeze."""

from . import static  # noqa: F401  (registers the static strategies)
from .base import (
    STRATEGIES,
    FreezeDecision,
    Strategy,
    TrainingProgress,
    decide,
    register_strategy,
    resolve_count,
    validate_arguments,
)

__all__ = [
    "STRATEGIES",
    "FreezeDecision",
    "Strategy",
    "TrainingProgress",
    "decide",
    "register_strategy",
    "resolve_count",
    "validate_arguments",
]
