"""Schedules: strategies whose frozen set changes during training.

* ``progressive`` (Composer's LayerFreezing): nothing frozen until `freeze_start`, then layers freeze bottom-up,
  linearly in time, until `freeze_level` of them are frozen at the end of training; with `freeze_granularity:
  module`, Composer's leaf modules instead of layers.
* ``gradual_unfreezing`` (ULMFiT, fastai's ``freeze_to``, Lightning's ``BackboneFinetuning``): the bottom layers start
  frozen and unfreeze top-down, `freeze_unfreeze_layers` at a time, every `freeze_schedule_every` units, optionally
  with a learning-rate factor for the newly unfrozen layers.
* ``lisa`` (LMFlow's LISA): `freeze_active_layers` layers drawn at random train for `freeze_schedule_every` steps;
  embeddings, norms and head always train.
* ``staged`` (explicit stages, as Lightning's Fine-Tuning Scheduler phases): `freeze_stages` maps the unit each stage
  starts at to the bottom layers frozen from then on; it is also how a rung of the layer fidelity runs inside one
  `Trainer.train()` (`hf_freeze.tools.hpo_stages`).
* ``badam`` (BAdam's layer-wise block order): one block of `freeze_active_layers` layers trains at a time, blocks
  taking turns every `freeze_schedule_every` steps (switching when BAdam's `BlockOptimizer` does), ascending,
  descending, in a random order or fixed, from `freeze_start_block`.

Each is a pure function of the layout, the options and the `TrainingProgress`: the same step (or epoch) and seed
give the same frozen set, so a resumed run recomputes exactly what the interrupted one had. The random orders come
from a generator seeded by (training seed, period index), never from global random state.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

from ..errors import FreezeConfigError, invalid
from ..model.layout import ModelLayout
from .common import bottom_prefix, require_layers, resolve_count
from .core import Selection, Strategy, TrainingProgress, register_strategy
from .progress import SCHEDULE_UNITS, check_schedule_options, elapsed_units, schedule_every, schedule_period, schedule_unit
from .progress import training_fraction
from .rotation import BLOCK_ORDERS, active_block, badam_selection, badam_switches, check_active_layers, check_badam
from .rotation import lisa_layers, lisa_selection

__all__ = [
    "BLOCK_ORDERS",
    "DEFAULT_LR_GROWTH",
    "GRANULARITIES",
    "SCHEDULE_UNITS",
    "active_block",
    "badam_switches",
    "elapsed_units",
    "lisa_layers",
    "parse_stages",
    "stage_frozen_count",
    "progressive_frozen_count",
    "progressive_frozen_leaves",
    "schedule_every",
    "schedule_unit",
    "still_frozen_count",
]
# What 'progressive' counts: hf_freeze's layers, or Composer's leaf modules.
GRANULARITIES = ("layer", "module")
# Lightning's default `lambda_func` (`multiplicative`) doubles the backbone's rate every epoch.
DEFAULT_LR_GROWTH = 2.0


# -- explicit stages ------------------------------------------------------------------------------------------------

_STAGES_EXPECT = (
    "a mapping from the step (or epoch) a stage starts at, an integer >= 0 with 0 among them, to the bottom layers "
    "frozen from then on (a count, or a fraction in [0, 1)), e.g. {0: 4, 100: 2, 200: 0}"
)


def parse_stages(value) -> Optional[Dict[int, Union[int, float]]]:
    """`freeze_stages` as a mapping of int start -> count or fraction, sorted by start (text keys from JSON allowed).

    Example:

    ```python
    >>> from hf_freeze.policies.schedules import parse_stages
    >>> parse_stages({"100": 2, "0": 0.5})
    {0: 0.5, 100: 2}
    ```
    """
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise invalid("freeze_stages", value, _STAGES_EXPECT)
    stages = {}
    for start, frozen in value.items():
        if isinstance(start, str) and start.strip().isdecimal():
            start = int(start)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise invalid("freeze_stages", value, f"{_STAGES_EXPECT}; {start!r} is not a start")
        if isinstance(frozen, bool) or not isinstance(frozen, (int, float)) or frozen < 0 or (
            isinstance(frozen, float) and not frozen.is_integer() and frozen >= 1
        ):
            raise invalid("freeze_stages", value, f"{_STAGES_EXPECT}; stage {start}: {frozen!r} is not a layer count")
        stages[start] = int(frozen) if isinstance(frozen, float) and frozen.is_integer() and frozen >= 1 else frozen
    if 0 not in stages:
        raise invalid("freeze_stages", value, f"{_STAGES_EXPECT}; no stage starts at 0")
    return dict(sorted(stages.items()))


def stage_frozen_count(options, progress: TrainingProgress, num_layers: int) -> int:
    """The bottom layers frozen at this point of training under `freeze_stages`."""
    units = elapsed_units(options, progress)
    current = max(start for start in options.freeze_stages if start <= units)
    value = options.freeze_stages[current]
    if isinstance(value, float) and not value.is_integer():
        return int(value * num_layers + 0.5)
    return resolve_count(int(value), num_layers, "freeze_stages")


def _check_staged(options) -> None:
    check_schedule_options(options)
    if options.freeze_stages is None:
        raise invalid("freeze_stages", None, f"set for 'staged': {_STAGES_EXPECT}")


def _staged(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "staged")
    return bottom_prefix(layout, options, range(stage_frozen_count(options, progress, total))), []


# -- progressive freezing (Composer's LayerFreezing) ---------------------------------------------------------------


def progressive_frozen_count(options, progress: TrainingProgress, num_layers: int) -> int:
    """Layers frozen at `progress`: 0 until `freeze_start`, then linear in time up to `freeze_level` at the end.

    The arithmetic is Composer's, operation for operation: the fraction of the freezing time elapsed, times the
    level, times the count, truncated. Truncation sees float error, and that is the point: with `freeze_start` 0.5,
    10 epochs and 5 layers, epoch 6 gives 0.999...98, so 0 layers, as in Composer (rounding it up would freeze one
    epoch early).
    """
    start = 0.5 if options.freeze_start is None else options.freeze_start
    level = 1.0 if options.freeze_level is None else options.freeze_level
    fraction = training_fraction(options, progress)
    if fraction <= start:
        return 0
    elapsed = min(1.0, (fraction - start) / (1.0 - start))
    return min(num_layers, int(level * elapsed * num_layers))


def _check_progressive(options) -> None:
    check_schedule_options(options)
    if options.freeze_start is not None and not 0.0 <= options.freeze_start < 1.0:
        raise invalid("freeze_start", options.freeze_start, "a fraction of training in [0, 1)")
    if options.freeze_level is not None and not 0.0 < options.freeze_level <= 1.0:
        raise invalid("freeze_level", options.freeze_level, "a fraction of the layers in (0, 1]")


def _progressive(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    if options.freeze_granularity == "module":
        return _progressive_leaves(layout, options, progress), []
    total = require_layers(layout, "progressive")
    return bottom_prefix(layout, options, range(progressive_frozen_count(options, progress, total))), []


def progressive_frozen_leaves(options, progress: TrainingProgress, num_leaves: int) -> int:
    """Leaf modules frozen at `progress` with `freeze_granularity: module`: Composer's count, which leaves the last
    leaf out of both the count and the candidates, so it is never frozen (the head, on most models)."""
    return progressive_frozen_count(options, progress, max(0, num_leaves - 1))


def _progressive_leaves(layout: ModelLayout, options, progress: TrainingProgress) -> List[str]:
    leaves = layout.leaf_modules
    if not leaves:
        raise FreezeConfigError(
            "`freeze_granularity` 'module' counts the model's leaf modules, and this layout lists none (it was "
            "written by hand, not discovered from a model). Use `freeze_granularity: layer`, or build the layout "
            "with `discover_layout(model)`.",
            fields=["freeze_granularity"],
        )
    count = progressive_frozen_leaves(options, progress, len(leaves))
    return list(dict.fromkeys(name for _, names in leaves[:count] for name in names))


# -- gradual unfreezing (ULMFiT, fastai, Lightning's BackboneFinetuning) --------------------------------------------


def _initially_frozen(options, num_layers: int) -> int:
    if options.freeze_layers is None:
        return num_layers
    return resolve_count(options.freeze_layers, num_layers)


def still_frozen_count(options, events: int, initially_frozen: int) -> int:
    """Layers still frozen after `events` unfreezing events."""
    return max(0, initially_frozen - events * (options.freeze_unfreeze_layers or 1))


def _check_gradual(options) -> None:
    check_schedule_options(options)
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
    frozen = still_frozen_count(options, schedule_period(options, progress), _initially_frozen(options, total))
    return bottom_prefix(layout, options, range(frozen)), []


def _gradual_factors(layout: ModelLayout, options, progress: TrainingProgress) -> Dict[str, float]:
    """Factor of each layer unfrozen so far, as Lightning's `BackboneFinetuning` sets its backbone's rate.

    A layer starts at `freeze_unfreeze_lr_factor` in the unit (epoch, step) it is unfrozen in, and its factor is
    multiplied by `freeze_unfreeze_lr_growth` (Lightning's default `lambda_func`: 2.0) in every later unit, capped
    at 1 (`should_align`: the rate never passes the rest of the model's). With factor 0.1 the rates are 0.1, 0.2,
    0.4, 0.8, 1, 1, ... of the scheduled rate.
    """
    if options.freeze_unfreeze_lr_factor is None:
        return {}
    initial = options.freeze_unfreeze_lr_factor
    growth = DEFAULT_LR_GROWTH if options.freeze_unfreeze_lr_growth is None else options.freeze_unfreeze_lr_growth
    every, units = schedule_every(options), elapsed_units(options, progress)
    first_frozen = _initially_frozen(options, layout.num_layers)
    events = schedule_period(options, progress)
    last_useful = math.ceil(first_frozen / (options.freeze_unfreeze_layers or 1))  # later events unfreeze nothing
    ladder = _growth_ladder(initial, growth)
    # Layers unfrozen `len(ladder)` or more units ago are back at factor 1: only the recent events need a factor.
    oldest = 1 if growth == 1.0 else max(1, (units - len(ladder)) // every + 1)
    factors: Dict[str, float] = {}
    for event in range(oldest, min(events, last_useful) + 1):
        grown = units - event * every  # units since this event's layers were unfrozen
        factor = initial if growth == 1.0 else (ladder[grown] if grown < len(ladder) else 1.0)
        if factor >= 1.0:
            continue
        before = set(bottom_prefix(layout, options, range(still_frozen_count(options, event - 1, first_frozen))))
        after = set(bottom_prefix(layout, options, range(still_frozen_count(options, event, first_frozen))))
        factors.update({name: factor for name in before - after})
    return factors


def _growth_ladder(initial: float, growth: float) -> List[float]:
    """The factors below 1 a layer goes through, one per unit: multiplied step by step, as Lightning multiplies its
    previous rate (the same floats as Lightning's, not ``initial * growth ** k``)."""
    if growth == 1.0:
        return [initial]
    ladder = [initial]
    while ladder[-1] * growth < 1.0:
        ladder.append(ladder[-1] * growth)
    return ladder


_UNIT_OPTIONS = ("freeze_schedule_unit",)
_PERIODIC_OPTIONS = ("freeze_schedule_unit", "freeze_schedule_every")

register_strategy(
    Strategy(
        "progressive", _progressive, _UNIT_OPTIONS + ("freeze_start", "freeze_level", "freeze_granularity"), {},
        _check_progressive,
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
        "lisa", lisa_selection, _PERIODIC_OPTIONS + ("freeze_active_layers",), {}, check_active_layers, dynamic=True,
        description="Train `freeze_active_layers` random layers, redrawn every `freeze_schedule_every` steps (LISA).",
    )
)
register_strategy(
    Strategy(
        "staged", _staged, _UNIT_OPTIONS + ("freeze_stages",), {}, _check_staged, dynamic=True,
        description="Freeze the bottom layers by explicit stages: `freeze_stages` maps a step (or epoch) to a count.",
    )
)
register_strategy(
    Strategy(
        "badam", badam_selection, _PERIODIC_OPTIONS + ("freeze_active_layers", "freeze_block_order", "freeze_start_block"),
        {"freeze_embeddings": True, "freeze_norm": True}, check_badam, dynamic=True,
        description="Train one block of layers at a time, switching every `freeze_schedule_every` steps (BAdam).",
    )
)
