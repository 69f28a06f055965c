"""Policies: pure functions from blocks (and the training progress, and measured scores) to the parameters to freeze.

No torch, no side effects, no configuration import: options arrive as any object with ``freeze_*`` attributes.
"""

# Static strategies register first, so that lists of valid names start with them.
from . import static  # noqa: F401, I001
from . import schedules  # noqa: F401
from . import adaptive  # noqa: F401
from .core import (
    STRATEGIES,
    FreezeDecision,
    Strategy,
    TrainingProgress,
    check_options,
    decide,
    register_strategy,
    registration_decision,
)
from .common import resolve_count
from .scoring import SCORES, Score, register_score
from .simulate import FrozenSetChange, frozen_sets_over_training

__all__ = [
    "SCORES",
    "STRATEGIES",
    "FreezeDecision",
    "FrozenSetChange",
    "Score",
    "Strategy",
    "TrainingProgress",
    "check_options",
    "decide",
    "frozen_sets_over_training",
    "register_score",
    "register_strategy",
    "registration_decision",
    "resolve_count",
]
