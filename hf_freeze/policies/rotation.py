"""Rotation: schedules that train a few layers at a time and move on, LISA (LMFlow: random layers redrawn every period)
and BAdam (blocks of layers taking turns, as its `BlockOptimizer` switches). Registered with the other schedules in
`hf_freeze.policies.schedules`."""

from __future__ import annotations

from typing import List

from ..errors import FreezeConfigError, invalid
from ..model.layout import ModelLayout
from .common import layer_parameters, require_layers
from .core import Selection, TrainingProgress
from .progress import check_schedule_options, elapsed_units, schedule_every, schedule_period, seeded_random

__all__ = [
    "BLOCK_ORDERS",
    "active_block",
    "badam_selection",
    "badam_switches",
    "check_active_layers",
    "check_badam",
    "lisa_layers",
    "lisa_selection",
]

BLOCK_ORDERS = ("ascending", "descending", "random", "fixed")


# -- LISA (LMFlow) -------------------------------------------------------------------------------------------------


def lisa_layers(options, progress: TrainingProgress, num_layers: int) -> List[int]:
    """The layers LISA trains during the current period, drawn from (seed, period index)."""
    count = options.freeze_active_layers or 2
    if count > num_layers:
        raise invalid("freeze_active_layers", count, f"at most the model's {num_layers} layers")
    return sorted(seeded_random("lisa", progress.seed, schedule_period(options, progress)).sample(range(num_layers), count))


def check_active_layers(options) -> None:
    check_schedule_options(options)
    if options.freeze_active_layers is not None and options.freeze_active_layers < 1:
        raise invalid("freeze_active_layers", options.freeze_active_layers, "an integer >= 1")


def lisa_selection(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
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
        seeded_random("badam", progress.seed, passes).shuffle(order)
        return blocks[order[position]]
    return blocks[((start or 0) + switches) % len(blocks)]


def check_badam(options) -> None:
    check_active_layers(options)
    order, start = options.freeze_block_order, options.freeze_start_block
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


def badam_selection(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "badam")
    active = set(active_block(options, progress, total))
    return layer_parameters(layout, set(range(total)) - active), []
