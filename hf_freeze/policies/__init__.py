"""Policies: pure functions from blocks (and progress) to the set of parameters to freeze."""

from . import schedules, static  # noqa: F401  (register the static strategies and the schedules)
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
from .schedules import registration_decision

__all__ = [
    "STRATEGIES",
    "FreezeDecision",
    "Strategy",
    "TrainingProgress",
    "decide",
    "register_strategy",
    "registration_decision",
    "resolve_count",
    "validate_arguments",
]
