"""Run a policy over a whole training run without a model or a run: the frozen set at every change.

The one simulator: `hf-freeze plan` shows its result, `hf_freeze.report.simulate_timeline` draws it, and
`describe_inaction` reads it to tell a user that a policy does nothing in their run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, FrozenSet, Iterable, List, Optional, Sequence

from ..errors import invalid
from ..model.layout import ModelLayout
from .core import STRATEGIES, TrainingProgress, decide
from .parts import policy_view

__all__ = ["FrozenSetChange", "describe_inaction", "frozen_sets_over_training", "placeholder_scores"]


@dataclass(frozen=True)
class FrozenSetChange:
    """The frozen set from `step` on (until the next change)."""

    step: int
    epoch: float
    frozen: FrozenSet[str]


def placeholder_scores(layout: ModelLayout) -> Sequence[float]:
    """Equal scores for every layer: what a simulation selects from in place of scores measured during training
    (the selection then takes the first layers)."""
    return (0.0,) * layout.num_layers


def frozen_sets_over_training(
    layout: ModelLayout,
    options: Any,
    max_steps: int,
    num_epochs: Optional[float] = None,
    steps_per_epoch: Optional[int] = None,
    seed: int = 0,
    layer_scores: Optional[Sequence[float]] = None,
    checkpoints: int = 1000,
) -> List[FrozenSetChange]:
    """Run the policy over ``max_steps`` optimizer steps; one entry per change of the frozen set (the first at 0).

    The length of an epoch comes from ``steps_per_epoch`` or, without it, from ``num_epochs`` over ``max_steps``
    (default: one epoch). An adaptive policy selects from ``layer_scores`` (one per layer) in every round; without
    them only its probes show (nothing is frozen).

    The policy is asked at every step when ``max_steps <= checkpoints``, else at ``checkpoints`` evenly spaced
    steps, with bisection between two that differ to find the exact step of each change (a change undone before
    the next checkpoint is not seen then). A static policy gives one entry.

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, ModelLayout
    >>> from hf_freeze.policies import frozen_sets_over_training
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, head=3)
    >>> options = FreezeArguments(freeze_strategy="progressive", freeze_start=0.5)
    >>> [(change.step, layout.frozen_layer_indices(change.frozen))
    ...  for change in frozen_sets_over_training(layout, options, 8)]
    [(0, []), (5, [0]), (6, [0, 1]), (7, [0, 1, 2])]
    ```
    """
    if max_steps < 1:
        raise invalid("max_steps", max_steps, "a number of training steps >= 1")
    if steps_per_epoch:
        num_epochs = float(math.ceil(max_steps / steps_per_epoch))
        epoch_of = lambda step: step / steps_per_epoch  # noqa: E731
    else:
        num_epochs = 1.0 if num_epochs is None else float(num_epochs)
        epoch_of = lambda step: num_epochs * step / max_steps  # noqa: E731
    scores = tuple(layer_scores) if layer_scores is not None else None

    def at(step: int) -> FrozenSetChange:
        progress = TrainingProgress(step, max_steps, epoch_of(step), num_epochs, seed, scores)
        return FrozenSetChange(step, epoch_of(step), decide(layout, options, progress).frozen)

    if not STRATEGIES.get(options.freeze_strategy).dynamic:  # a static policy ignores the progress by definition
        return [at(0)]
    stride = max(1, math.ceil(max_steps / checkpoints))
    changes = [at(0)]
    for step in list(range(stride, max_steps, stride)) + [max_steps - 1]:
        current = at(step)
        # Every change in (previous step, step]: bisect to the first, then look again after it.
        while current.frozen != changes[-1].frozen:
            low, high = changes[-1].step, current.step
            while high - low > 1:
                middle = (low + high) // 2
                if at(middle).frozen == changes[-1].frozen:
                    low = middle
                else:
                    high = middle
            changes.append(at(high) if high != current.step else current)
    return changes


def describe_inaction(
    layout: ModelLayout, options: Any, progress: TrainingProgress, kept_frozen: Iterable[str] = ()
) -> Optional[str]:
    """Why the policy does nothing useful in this run, or ``None``: it never freezes any part of a layer, or (a
    schedule) its frozen set never changes within the run's length. The strategy 'none' is meant to do nothing."""
    strategy = STRATEGIES.get(options.freeze_strategy)
    view = policy_view(layout, options, strategy)
    if strategy.name == "none" or not view.layers:
        return None
    layer_names = set(view.parameters_of(view.layers))
    kept = set(kept_frozen)
    name = f"`freeze_strategy` {strategy.name!r}"
    if not strategy.dynamic:
        if not (decide(layout, options, progress).frozen - kept) & layer_names:
            return f"{name} freezes no part of any layer with these options: every layer trains, as without hf_freeze."
        return None
    if not progress.max_steps:
        return None
    steps_per_epoch = progress.max_steps / progress.num_epochs if progress.num_epochs else None
    scores = placeholder_scores(layout) if strategy.needs_scores else None
    changes = frozen_sets_over_training(
        layout, options, progress.max_steps, num_epochs=progress.num_epochs or None,
        steps_per_epoch=int(steps_per_epoch) if steps_per_epoch and steps_per_epoch.is_integer() else None,
        seed=progress.seed, layer_scores=scores,
    )
    if not any(change.frozen & layer_names for change in changes):
        return f"{name} never freezes any part of a layer in this run of {progress.max_steps} steps: every layer trains."
    if len(changes) == 1 and not strategy.needs_scores:  # an adaptive selection made once is the policy's point
        length = f"{progress.max_steps} steps" + (f", {progress.num_epochs:g} epochs" if progress.num_epochs else "")
        return (
            f"{name} never changes the frozen set in this run ({length}): its first change would come later, so it "
            "acts as a static policy. Shorten `freeze_schedule_every`, or count in steps (`freeze_schedule_unit: step`)."
        )
    return None
