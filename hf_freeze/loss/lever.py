"""Whether the loss lever is on for a model and its options, and the add-on that keeps its hooks on the model."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..add_on import AddOn
from ..errors import FreezeConfigError
from .chunked import ChunkedLossHooks, chunked_loss_unsupported, set_chunked_loss

__all__ = ["TrainingLoss", "wants_chunked_loss"]


def wants_chunked_loss(model: nn.Module, arguments: Any) -> bool:
    """`freeze_chunked_loss`: on by default where it computes the model's own loss (on a GPU only when asked for:
    `ChunkedLossHooks`); asked for where it cannot, refused."""
    setting = arguments.freeze_chunked_loss
    if setting is False:
        return False
    reason = chunked_loss_unsupported(model)
    ranges = arguments.freeze_pattern_syntax == "axolotl" and any(
        "[" in pattern for pattern in arguments.freeze_trainable_patterns or ()
    )
    if reason is None and (arguments.freeze_trainable_tokens is not None or ranges):
        # Trainable rows of the LM head are put in place by a hook on its forward, which the chunked loss skips.
        reason = "rows of the LM head train (`freeze_trainable_tokens` or a row range), which it does not compute"
    if reason is None and arguments.freeze_cache_prefix:
        # Not combined yet: the cache runs the model's prefix inside the model's own forward call.
        reason = "`freeze_cache_prefix` is on, and the two are not combined"
    if reason is not None and setting:
        raise FreezeConfigError(
            f"`freeze_chunked_loss` is true, but the chunked loss cannot compute this model's loss: {reason}.",
            field="freeze_chunked_loss", value=setting, hint="Leave it unset or set it to false.",
        )
    return reason is None


class TrainingLoss(AddOn):
    """The loss lever as a `LayerFreezer` add-on: installs the chunked loss's hooks on the model (or removes hooks a
    previous freezer installed when this one's options turn the lever off)."""

    name = "training_loss"

    def __init__(self, hooks: Optional[ChunkedLossHooks]):
        self.hooks = hooks

    @classmethod
    def attach(cls, model: nn.Module, layout: Any, arguments: Any, run: Any) -> "TrainingLoss":
        # Unset, the lever computes the loss in chunks on the CPU alone (where it measured faster and leaner) and
        # leaves the model's own loss on a GPU (where the chunks measured slower); asked for, it is Liger-Kernel's
        # fused kernel on a GPU.
        enabled = layout is not None and wants_chunked_loss(model, arguments)
        return cls(set_chunked_loss(model, enabled, "liger" if arguments.freeze_chunked_loss else "model"))
