"""`FreezeTrainingArguments`: the Trainer's `TrainingArguments` with the `freeze_*` fields.

Apart from `FreezeArguments` because `TrainingArguments` imports torch and much of transformers: reading the
`freeze_*` options alone (`hf-freeze plan --help`) does not need them.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainerCallback, TrainingArguments

from ..errors import FreezeConfigError
from .arguments import FreezeArguments

__all__ = ["FreezeTrainingArguments", "PolicyWithoutCallbackGuard"]

# Set on the arguments by every `FreezeCallback` that reads them (`hf_freeze.integrations.callback`).
CALLBACK_ATTACHED = "_hf_freeze_callback_attached"


@dataclass
class FreezeTrainingArguments(FreezeArguments, TrainingArguments):
    """`TrainingArguments` that also carry the `freeze_*` fields, so one YAML file holds both.

    A policy here is applied by a `FreezeCallback` in the Trainer (``callbacks=[FreezeCallback()]``). A Trainer
    given these arguments with a policy and no `FreezeCallback` refuses to take its first step, with that fix,
    instead of training every layer.

    Example:

    ```python
    >>> from hf_freeze import FreezeTrainingArguments
    >>> args = FreezeTrainingArguments(output_dir="out", freeze_strategy="top", freeze_layers=2)
    >>> args.freeze_strategy, args.learning_rate
    ('top', 5e-05)
    ```
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_active():
            _install_guard()


class PolicyWithoutCallbackGuard(TrainerCallback):
    """Refuses the first step of a Trainer whose `FreezeTrainingArguments` carry a policy that no `FreezeCallback`
    applies: without one, every layer would train and nothing would say so."""

    def on_step_begin(self, args, state, control, **kwargs):
        if isinstance(args, FreezeArguments) and args.is_active() and not getattr(args, CALLBACK_ATTACHED, False):
            raise FreezeConfigError(
                f"The training arguments carry a freezing policy (`freeze_strategy` {args.freeze_strategy!r}), but "
                "the Trainer has no FreezeCallback to apply it, so every layer would train. Pass "
                "`callbacks=[FreezeCallback()]` to the Trainer (it reads the policy from these arguments).",
                fields=["freeze_strategy"],
            )


def _install_guard() -> None:
    # transformers offers no hook from `TrainingArguments` into the Trainer that uses them: the one place every
    # Trainer (and TRL's trainers, which call `Trainer.__init__`) takes callbacks from without the user's code is
    # the list `transformers.trainer.DEFAULT_CALLBACKS`, read in `Trainer.__init__` (transformers 5.23). The guard
    # joins it once, when arguments with a policy are first built, and does nothing for other arguments.
    from transformers import trainer

    if not any(callback is PolicyWithoutCallbackGuard for callback in trainer.DEFAULT_CALLBACKS):
        trainer.DEFAULT_CALLBACKS.append(PolicyWithoutCallbackGuard)
