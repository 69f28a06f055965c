"""Schedules: strategies whose frozen set changes during training.

* ``progressive`` (Composer's LayerFreezing): nothing frozen until `freeze_start`, then layers freeze bottom-up,
  linearly in time, until `freeze_level` of them are frozen at the end of training.
* ``gradual_unfreezing`` (ULMFiT, fastai's ``freeze_to``, Lightning's ``BackboneFinetuning``): the bottom layers start
  frozen and unfreeze top-down, `freeze_unfreeze_layers` at a time, every `freeze_schedule_every` units, optionally
  with a learning-rate factor for the newly unfrozen layers.
* ``lisa`` (LMFlow's LISA): `freeze_active_layers` layers drawn at random train for `freeze_schedule_every` steps;
  embeddings, norms and head always train.
* ``badam`` (BAdam's layer-wise block order): one block of `freeze_active_layers` layers trains at a time, blocks
  taking turns every `freeze_schedule_every` steps, ascending, descending or in a random order.

Each is a pure function of the layout, the options and the `TrainingProgress`: the same step (or epoch) and seed
give the same frozen set, so a resumed run recomputes exactly what the interrupted one had. The random orders come
from a generator seeded by (training seed, period index), never from global random state.
"""

from __future__ import annotations

import math
import random
from typing import Dict, List

from ..errors import FreezeConfigError, invalid, invalid_choice
from ..model.layout import ModelLayout
from .core import (
    Selection,
    Strategy,
    TrainingProgress,
    bottom_prefix,
    layer_parameters,
    register_strategy,
    require_layers,
    resolve_count,
)

__all__ = [
    "BLOCK_ORDERS",
    "SCHEDULE_UNITS",
    "active_block",
    "elapsed_units",
    "lisa_layers",
    "progressive_frozen_count",
    "schedule_every",
    "schedule_unit",
    "still_frozen_count",
]

SCHEDULE_UNITS = ("step", "epoch")
BLOCK_ORDERS = ("ascending", "descending", "random")
_DEFAULT_UNIT = {"gradual_unfreezing": "epoch"}
_DEFAULT_EVERY = {"gradual_unfreezing": 1, "lisa": 20, "badam": 50}
# `state.epoch` is a float sum of per-step fractions: an epoch boundary can land a hair below the integer.
_EPOCH_TOLERANCE = 1e-6


# -- progress ------------------------------------------------------------------------------------------------------


def schedule_unit(options) -> str:
    return options.freeze_schedule_unit or _DEFAULT_UNIT.get(options.freeze_strategy, "step")


def schedule_every(options) -> int:
    return options.freeze_schedule_every or _DEFAULT_EVERY.get(options.freeze_strategy, 1)


def elapsed_units(options, progress: TrainingProgress) -> int:
    """Whole units done: optimizer steps, or completed epochs."""
    if schedule_unit(options) == "epoch":
        return int(math.floor(progress.epoch + _EPOCH_TOLERANCE))
    return progress.step


def _period(options, progress: TrainingProgress) -> int:
    return elapsed_units(options, progress) // schedule_every(options)


def _fraction(options, progress: TrainingProgress) -> float:
    """Fraction of training done, in whole units (0 when the length of training is unknown)."""
    if schedule_unit(options) == "epoch":
        return elapsed_units(options, progress) / progress.num_epochs if progress.num_epochs else 0.0
    return progress.step / progress.max_steps if progress.max_steps else 0.0


def _rng(name: str, seed: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, identically in every process and Python run.
    return random.Random(f"hf_freeze.{name}:{seed}:{index}")


# -- shared pieces -------------------------------------------------------------------------------------------------


def _check_common(options) -> None:
    if options.freeze_schedule_unit is not None and options.freeze_schedule_unit not in SCHEDULE_UNITS:
        raise invalid_choice("freeze_schedule_unit", options.freeze_schedule_unit, SCHEDULE_UNITS)
    if options.freeze_schedule_every is not None and options.freeze_schedule_every < 1:
        raise invalid("freeze_schedule_every", options.freeze_schedule_every, "an integer >= 1")


# -- progressive freezing (Composer's LayerFreezing) ---------------------------------------------------------------


def progressive_frozen_count(options, progress: TrainingProgress, num_layers: int) -> int:
    """Layers frozen at `progress`: 0 until `freeze_start`, then linear in time up to `freeze_level` at the end."""
    start = 0.5 if options.freeze_start is None else options.freeze_start
    level = 1.0 if options.freeze_level is None else options.freeze_level
    fraction = _fraction(options, progress)
    if fraction <= start:
        return 0
    elapsed = min(1.0, (fraction - start) / (1.0 - start))
    return min(num_layers, int(level * elapsed * num_layers + 1e-9))


def _check_progressive(options) -> None:
    _check_common(options)
    if options.freeze_start is not None and not 0.0 <= options.freeze_start < 1.0:
        raise invalid("freeze_start", options.freeze_start, "a fraction of training in [0, 1)")
    if options.freeze_level is not None and not 0.0 < options.freeze_level <= 1.0:
        raise invalid("freeze_level", options.freeze_level, "a fraction of the layers in (0, 1]")


def _progressive(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "progressive")
    return bottom_prefix(layout, options, range(progressive_frozen_count(options, progress, total))), []


# -- gradual unfreezing (ULMFiT, fastai, Lightning's BackboneFinetuning) --------------------------------------------


def _initially_frozen(options, num_layers: int) -> int:
    if options.freeze_layers is None:
        return num_layers
    return resolve_count(options.freeze_layers, num_layers)


def still_frozen_count(options, events: int, initially_frozen: int) -> int:
    """Layers still frozen after `events` unfreezing events."""
    return max(0, initially_frozen - events * (options.freeze_unfreeze_layers or 1))


def _check_gradual(options) -> None:
    _check_common(options)
    value = options.freeze_layers
    if value is not None and (value < 0 or (isinstance(value, float) and not value < 1)):
        raise invalid("freeze_layers", value, "layers frozen at the start: a count >= 0 or a fraction in (0, 1)")
    if options.freeze_unfreeze_layers is not None and options.freeze_unfreeze_layers < 1:
        raise invalid("freeze_unfreeze_layers", options.freeze_unfreeze_layers, "an integer >= 1")
    factor, growth = options.freeze_unfreeze_lr_factor, options.freeze_unfreeze_lr_growth
    if factor is not None and not 0.0 < factor <= 1.0:
        raise invalid("freeze_unfreeze_lr_factor", factor, "a learning-rate factor in (0, 1]")
    if growth is not None:
        if factor is None:
            raise FreezeConfigError(
                f"`freeze_unfreeze_lr_growth` ({growth!r}) needs `freeze_unfreeze_lr_factor`: it grows that factor "
                "back to 1. Set `freeze_unfreeze_lr_factor` (e.g. 0.1) or remove `freeze_unfreeze_lr_growth`.",
                fields=["freeze_unfreeze_lr_growth", "freeze_unfreeze_lr_factor"],
            )
        if growth < 1.0:
            raise invalid("freeze_unfreeze_lr_growth", growth, "a growth factor >= 1")


def _gradual(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "gradual_unfreezing")
    frozen = still_frozen_count(options, _period(options, progress), _initially_frozen(options, total))
    return bottom_prefix(layout, options, range(frozen)), []


def _gradual_factors(layout: ModelLayout, options, progress: TrainingProgress) -> Dict[str, float]:
    """Factor of each layer unfrozen so far: `freeze_unfreeze_lr_factor`, times the growth per event since, up to 1."""
    if options.freeze_unfreeze_lr_factor is None:
        return {}
    initial, growth = options.freeze_unfreeze_lr_factor, options.freeze_unfreeze_lr_growth or 1.5
    total = layout.num_layers
    first_frozen = _initially_frozen(options, total)
    events = _period(options, progress)
    last_useful = math.ceil(first_frozen / (options.freeze_unfreeze_layers or 1))  # later events unfreeze nothing
    # Events older than this have grown back to factor 1 (with growth 1, factors never grow: look at all of them).
    horizon = math.ceil(math.log(1.0 / initial, growth)) if growth > 1.0 else events
    factors: Dict[str, float] = {}
    for event in range(max(1, events - horizon), min(events, last_useful) + 1):
        factor = min(1.0, initial * growth ** (events - event))
        before = set(bottom_prefix(layout, options, range(still_frozen_count(options, event - 1, first_frozen))))
        after = set(bottom_prefix(layout, options, range(still_frozen_count(options, event, first_frozen))))
        factors.update({name: factor for name in before - after})
    return factors


# -- LISA (LMFlow) -------------------------------------------------------------------------------------------------


def lisa_layers(options, progress: TrainingProgress, num_layers: int) -> List[int]:
    """The layers LISA trains during the current period, drawn from (seed, period index)."""
    count = options.freeze_active_layers or 2
    if count > num_layers:
        raise invalid("freeze_active_layers", count, f"at most the model's {num_layers} layers")
    return sorted(_rng("lisa", progress.seed, _period(options, progress)).sample(range(num_layers), count))


def _check_active(options) -> None:
    _check_common(options)
    if options.freeze_active_layers is not None and options.freeze_active_layers < 1:
        raise invalid("freeze_active_layers", options.freeze_active_layers, "an integer >= 1")


def _lisa(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "lisa")
    active = set(lisa_layers(options, progress, total))
    return layer_parameters(layout, set(range(total)) - active), []


# -- BAdam (block coordinate descent over layers) -------------------------------------------------------------------


def active_block(options, progress: TrainingProgress, num_layers: int) -> List[int]:
    """The layers of the block BAdam trains during the current period.

    Blocks are runs of `freeze_active_layers` consecutive layers. 'random' visits every block once per pass, in a
    new permutation each pass (drawn from (seed, pass index)), as BAdam's random switch mode does.
    """
    size = options.freeze_active_layers or 1
    if size > num_layers:
        raise invalid("freeze_active_layers", size, f"at most the model's {num_layers} layers")
    blocks = [list(range(first, min(first + size, num_layers))) for first in range(0, num_layers, size)]
    passes, position = divmod(_period(options, progress), len(blocks))
    order = list(range(len(blocks)))
    mode = options.freeze_block_order or "ascending"
    if mode == "descending":
        order.reverse()
    elif mode == "random":
        _rng("badam", progress.seed, passes).shuffle(order)
    return blocks[order[position]]


def _check_badam(options) -> None:
    _check_active(options)
    if options.freeze_block_order is not None and options.freeze_block_order not in BLOCK_ORDERS:
        raise invalid_choice("freeze_block_order", options.freeze_block_order, BLOCK_ORDERS)


def _badam(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "badam")
    active = set(active_block(options, progress, total))
    return layer_parameters(layout, set(range(total)) - active), []


_UNIT_OPTIONS = ("freeze_schedule_unit",)
_PERIODIC_OPTIONS = ("freeze_schedule_unit", "freeze_schedule_every")

register_strategy(
    Strategy(
        "progressive", _progressive, _UNIT_OPTIONS + ("freeze_start", "freeze_level"), {}, _check_progressive,
        dynamic=True,
        description="Freeze layers bottom-up, linearly in time from `freeze_start` to `freeze_level` (Composer).",
    )
)
register_strategy(
    Strategy(
        "gradual_unfreezing", _gradual,
        _PERIODIC_OPTIONS
        + ("freeze_layers", "freeze_unfreeze_layers", "freeze_unfreeze_lr_factor", "freeze_unfreeze_lr_growth"),
        {}, _check_gradual, dynamic=True, update_factors=_gradual_factors,
        description="Start with the bottom layers frozen; unfreeze them top-down over time (ULMFiT, Lightning).",
    )
)
register_strategy(
    Strategy(
        "lisa", _lisa, _PERIODIC_OPTIONS + ("freeze_active_layers",), {}, _check_active, dynamic=True,
        description="Train `freeze_active_layers` random layers, redrawn every `freeze_schedule_every` steps (LISA).",
    )
)
register_strategy(
    Strategy(
        "badam", _badam, _PERIODIC_OPTIONS + ("freeze_active_layers", "freeze_block_order"),
        {"freeze_embeddings": True, "freeze_norm": True}, _check_badam, dynamic=True,
        description="Train one block of layers at a time, switching every `freeze_schedule_every` steps (BAdam).",
    )
)
