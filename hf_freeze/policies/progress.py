"""The clock of the schedules: how far training is in a schedule's unit (steps or epochs), its periods, and the
seeded random draws that make a schedule the same in every process and after a resume."""

from __future__ import annotations

import math
import random

from ..errors import invalid
from .core import TrainingProgress

__all__ = [
    "SCHEDULE_UNITS",
    "check_schedule_options",
    "elapsed_units",
    "schedule_every",
    "schedule_period",
    "schedule_unit",
    "seeded_random",
    "training_fraction",
]

SCHEDULE_UNITS = ("step", "epoch")
_DEFAULT_UNIT = {"gradual_unfreezing": "epoch"}
_DEFAULT_EVERY = {"gradual_unfreezing": 1, "lisa": 20, "badam": 50}
# `state.epoch` is a float sum of per-step fractions: an epoch boundary can land a hair below the integer.
_EPOCH_TOLERANCE = 1e-6

def schedule_unit(options) -> str:
    return options.freeze_schedule_unit or _DEFAULT_UNIT.get(options.freeze_strategy, "step")


def schedule_every(options) -> int:
    return options.freeze_schedule_every or _DEFAULT_EVERY.get(options.freeze_strategy, 1)


def elapsed_units(options, progress: TrainingProgress) -> int:
    """Whole units done: optimizer steps, or completed epochs."""
    if schedule_unit(options) == "epoch":
        return int(math.floor(progress.epoch + _EPOCH_TOLERANCE))
    return progress.step


def schedule_period(options, progress: TrainingProgress) -> int:
    return elapsed_units(options, progress) // schedule_every(options)


def training_fraction(options, progress: TrainingProgress) -> float:
    """Fraction of training done, in whole units (0 when the length of training is unknown)."""
    if schedule_unit(options) == "epoch":
        return elapsed_units(options, progress) / progress.num_epochs if progress.num_epochs else 0.0
    return progress.step / progress.max_steps if progress.max_steps else 0.0


def seeded_random(name: str, seed: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, identically in every process and Python run.
    return random.Random(f"hf_freeze.{name}:{seed}:{index}")


def check_schedule_options(options) -> None:
    if options.freeze_schedule_every is not None and options.freeze_schedule_every < 1:
        raise invalid("freeze_schedule_every", options.freeze_schedule_every, "an integer >= 1")
