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
import random
from typing import Dict, List, Optional, Union

from ..errors import FreezeConfigError, invalid, invalid_choice
from ..model.layout import ModelLayout
from .core import Selection, Strategy, TrainingProgress, register_strategy
from .common import bottom_prefix, layer_parameters, require_layers, resolve_count

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

SCHEDULE_UNITS = ("step", "epoch")
# What 'progressive' counts: hf_freeze's layers, or Composer's leaf modules.
GRANULARITIES = ("layer", "module")
BLOCK_ORDERS = ("ascending", "descending", "random", "fixed")
_DEFAULT_UNIT = {"gradual_unfreezing": "epoch"}
_DEFAULT_EVERY = {"gradual_unfreezing": 1, "lisa": 20, "badam": 50}
# Lightning's default `lambda_func` (`multiplicative`) doubles the backbone's rate every epoch.
DEFAULT_LR_GROWTH = 2.0
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
    _check_common(options)
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
    fraction = _fraction(options, progress)
    if fraction <= start:
        return 0
    elapsed = min(1.0, (fraction - start) / (1.0 - start))
    return min(num_layers, int(level * elapsed * num_layers))


def _check_progressive(options) -> None:
    _check_common(options)
    if options.freeze_granularity is not None and options.freeze_granularity not in GRANULARITIES:
        raise invalid_choice("freeze_granularity", options.freeze_granularity, GRANULARITIES)
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
    events = _period(options, progress)
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


def badam_switches(options, progress: TrainingProgress) -> int:
    """How many times BAdam's `BlockOptimizer` has switched blocks after `elapsed_units` steps.

    BAdam counts its steps from 1 and switches after a step when (steps + 1) is a multiple of the interval, so the
    first block trains one step fewer than the others: with an interval of 3 the blocks go 0, 0, 1, 1, 1, 2, ...
    With an interval of 1 it switches after every step.
    """
    every, units = schedule_every(options), elapsed_units(options, progress)
    return (units + 1) // every - (1 if every == 1 else 0)


def active_block(options, progress: TrainingProgress, num_layers: int) -> List[int]:
    """The layers of the block BAdam trains during the current period.

    Blocks are runs of `freeze_active_layers` consecutive layers. The first block is `freeze_start_block` (BAdam's
    `start_block`; default the first block, the last for 'descending'); 'ascending' and 'descending' then step
    through the blocks cyclically, 'fixed' stays on the start block, and 'random' visits every block once per pass,
    in a new permutation each pass (drawn from (seed, pass index)), as BAdam's random switch mode does.
    """
    size = options.freeze_active_layers or 1
    if size > num_layers:
        raise invalid("freeze_active_layers", size, f"at most the model's {num_layers} layers")
    blocks = [list(range(first, min(first + size, num_layers))) for first in range(0, num_layers, size)]
    start = options.freeze_start_block
    if start is not None and start >= len(blocks):
        raise invalid(
            "freeze_start_block", start,
            f"a block index below {len(blocks)}: this model's {num_layers} layers make {len(blocks)} block(s) of "
            f"`freeze_active_layers` {size}",
        )
    switches = badam_switches(options, progress)
    mode = options.freeze_block_order or "ascending"
    if mode == "fixed":
        return blocks[start]
    if mode == "descending":
        return blocks[((len(blocks) - 1 if start is None else start) - switches) % len(blocks)]
    if mode == "random":
        passes, position = divmod(switches, len(blocks))
        order = list(range(len(blocks)))
        _rng("badam", progress.seed, passes).shuffle(order)
        return blocks[order[position]]
    return blocks[((start or 0) + switches) % len(blocks)]


def _check_badam(options) -> None:
    _check_active(options)
    order, start = options.freeze_block_order, options.freeze_start_block
    if order is not None and order not in BLOCK_ORDERS:
        raise invalid_choice("freeze_block_order", order, BLOCK_ORDERS)
    if start is not None and start < 0:
        raise invalid("freeze_start_block", start, "a block index >= 0 (0 is the block nearest the input)")
    if order == "fixed" and start is None:
        raise FreezeConfigError(
            "`freeze_block_order` 'fixed' trains one block for the whole run and needs `freeze_start_block` to say "
            "which (BAdam's `start_block`). Set `freeze_start_block`, or choose another order.",
            fields=["freeze_block_order", "freeze_start_block"],
        )
    if order == "random" and start is not None:
        raise FreezeConfigError(
            f"`freeze_start_block` ({start!r}) cannot be used with `freeze_block_order` 'random': each pass is a "
            "permutation drawn from the training seed (BAdam's BlockOptimizer has no order for it either). Remove "
            "`freeze_start_block`, or choose 'ascending', 'descending' or 'fixed'.",
            fields=["freeze_start_block", "freeze_block_order"],
        )


def _badam(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "badam")
    active = set(active_block(options, progress, total))
    return layer_parameters(layout, set(range(total)) - active), []


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
        "lisa", _lisa, _PERIODIC_OPTIONS + ("freeze_active_layers",), {}, _check_active, dynamic=True,
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
        "badam", _badam, _PERIODIC_OPTIONS + ("freeze_active_layers", "freeze_block_order", "freeze_start_block"),
        {"freeze_embeddings": True, "freeze_norm": True}, _check_badam, dynamic=True,
        description="Train one block of layers at a time, switching every `freeze_schedule_every` steps (BAdam).",
    )
)
