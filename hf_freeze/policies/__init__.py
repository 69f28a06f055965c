"""Policies: pure functions from blocks (and progress) to the set of parameters to freeze."""

# Static strategies register first, so that lists of valid names start with them.
from . import static  # noqa: F401, I001
from . import schedules  # noqa: F401
from . import adaptive  # noqa: F401
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
