"""The policy checked against the model it will run on, when the model is known (`LayerFreezer` at set-up,
`hf-freeze validate` with a model): what the configuration alone could not refuse."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from ..errors import FreezeConfigError
from ..model.layout import ModelLayout
from .core import STRATEGIES, TrainingProgress, decide

__all__ = ["check_against_layout"]


def check_against_layout(
    layout: ModelLayout, options: Any, max_steps: Optional[int] = None, kept_frozen: Iterable[str] = ()
) -> None:
    """Raise now what the policy would raise on this model during training (a count above the number of layers, an
    index past the last layer, a pattern that matches nothing), and refuse a policy that leaves nothing to train.
    It is asked at the start of training and, when it changes during training, at the quarter points and the end.
    """
    steps = max_steps or 100
    fractions = (0.0, 0.25, 0.5, 0.75, 1.0) if STRATEGIES.get(options.freeze_strategy).dynamic else (0.0,)
    for fraction in fractions:
        decision = decide(layout, options, TrainingProgress(step=int(fraction * steps), max_steps=steps), kept_frozen)
        if fraction == 0.0 and layout.parameter_names and set(layout.parameter_names) <= decision.frozen and not decision.trainable_rows:
            kept = set(kept_frozen) & decision.frozen
            because = (
                f" ({len(kept)} of them were frozen before hf_freeze saw the model, and `freeze_respect_existing` keeps "
                "them frozen)" if kept else ""
            )
            raise FreezeConfigError(
                f"`freeze_strategy` {options.freeze_strategy!r} freezes every parameter{because}, so nothing would "
                "train: the first backward pass fails, and under multi-process training accelerate skips (GPU) or "
                "fails (CPU) the DDP wrap. Leave something trainable, e.g. `freeze_head: false`.",
                fields=["freeze_strategy"] + (["freeze_respect_existing"] if kept else []),
            )
