"""The Trainer's optimizer built over `LayerFreezer.parameter_groups`, when the policy sets learning rates
(`freeze_learning_rates`, `freeze_layer_lr_decay`) or changes under DeepSpeed ZeRO (one group per block, the optimizer
class skipping frozen groups: `hf_freeze.apply.frozen_groups`), without replacing the user's Trainer or its optimizer
class.

Why through `Trainer.optimizer_cls_and_kwargs` and an optimizer factory (measured on transformers 5.23, not assumed):

- the groups must exist when the optimizer is built: `Trainer.train` builds the optimizer, then the scheduler (one
  lambda per group, each scaling its group's ``initial_lr``), then loads a checkpoint's optimizer state (torch refuses
  another number of groups), all before `on_train_begin`; a callback that split the groups there would break the
  schedule and resuming;
- `optimizer_cls_and_kwargs` is the Trainer's documented way to choose the optimizer, and `create_optimizer` calls a
  value that is not an optimizer class as a factory, ``factory()(model, **kwargs)``, with the model it is about to
  train (transformers' `is_optimizer_factory`, there for optimizers that group the model's parameters themselves):
  the groups are made then, from the model `train()` trains (a `model_init` model too), with the optimizer class and
  keywords the Trainer itself would use (`Trainer.get_optimizer_cls_and_kwargs`: `optim`, `optim_args`, betas...);
- no event hands a callback the Trainer, so the callback finds the Trainer whose `__init__` is calling its
  `on_init_end` on the call stack (as `trainer_events.guard_resume` does, for the reason given there), and sets the
  attribute the constructor argument sets.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from transformers import Trainer

from ..apply.frozen_groups import skipping_frozen_groups
from ..errors import FreezeConfigError
from .backends import DEEPSPEED
from .trainer_events import calling_trainer

__all__ = ["GroupedOptimizer", "install_parameter_groups"]

_FIELDS = ["freeze_learning_rates", "freeze_layer_lr_decay"]


class GroupedOptimizer:
    """An optimizer factory for `Trainer.optimizer_cls_and_kwargs`: builds the optimizer over the freezer's param
    groups, from the model the Trainer passes. The optimizer class and keywords are the user's own
    `optimizer_cls_and_kwargs` when given, else those the Trainer's arguments choose, read when the optimizer is
    built (a hyperparameter-search trial may have changed them); ``lr`` is the base rate."""

    def __init__(
        self, callback: Any, args: Any, decay_names: Callable[[Any], Any], given: Any = None, by_block: bool = False,
    ):
        # The callback, not its freezer: `train()` may rebuild the freezer, and the callback pickles (Ray Tune).
        self.callback, self.args, self.decay_names, self.given = callback, args, decay_names, given
        self.by_block = by_block  # DeepSpeed ZeRO and a changing policy: block groups, frozen groups skipped

    def __call__(self, model: Any, **kwargs: Any):
        freezer = self.callback.freezer
        if freezer is None:  # a callback sent to another process (Ray Tune) sets up after the optimizer is built
            raise FreezeConfigError(
                "`freeze_learning_rates` and `freeze_layer_lr_decay` need the freezer when the Trainer builds its "
                "optimizer, and this callback was set up in another process (a Ray Tune trial). Run the search with "
                "Optuna (in-process), or without the rate options.", fields=_FIELDS,
            )
        optimizer_class, kwargs = self.given or Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        kwargs = dict(kwargs)
        learning_rate = kwargs.pop("lr", self.args.learning_rate)
        groups = freezer.parameter_groups(learning_rate, self.args.weight_decay, model, self.decay_names(model), self.by_block)
        if self.by_block:
            optimizer_class = skipping_frozen_groups(optimizer_class)
        return optimizer_class(groups, lr=learning_rate, **kwargs)


def install_parameter_groups(callback: Any, args: Any, model: Any) -> None:
    """Have the Trainer calling `on_init_end` build its optimizer from the param groups of ``callback.freezer``, when
    the freezer sets learning rates; refuse what cannot take them (an optimizer passed in, one the Trainer makes over
    the model itself), naming the options."""
    current = callback.freezer
    if current is None or current.skipped:
        return
    # Under DeepSpeed ZeRO a changing policy needs an optimizer that skips frozen block groups (`frozen_groups`).
    by_block = current.dynamic and getattr(getattr(callback, "_setup", None), "backend", None) == DEEPSPEED
    if not current.sets_learning_rates and not by_block:
        return
    given = [name for name in _FIELDS if getattr(current.arguments, name) is not None] or ["freeze_strategy"]

    what = ("cannot set learning rates here" if current.sets_learning_rates else f"{current.strategy.name!r} cannot change "
            "the frozen set under DeepSpeed here (it needs the optimizer built over one param group per block)")

    def refuse(why: str) -> FreezeConfigError:
        return FreezeConfigError(f"{' and '.join(f'`{name}`' for name in given)} {what}: {why}", fields=given)

    trainer = calling_trainer()
    if trainer is None:
        raise refuse("no Trainer is being built (the groups go into the optimizer `Trainer.train` builds). In your own "
                     "loop, build the optimizer from `LayerFreezer.parameter_groups(learning_rate, weight_decay)`.")
    if trainer.optimizer is not None:
        raise refuse("the Trainer was given its optimizer (`optimizers=`). Build it from "
                     "`LayerFreezer(model, ...).parameter_groups(learning_rate, weight_decay)`, or let the Trainer build it.")
    chosen = trainer.optimizer_cls_and_kwargs or Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_class, kwargs = chosen
    if isinstance(optimizer_class, functools.partial) and optimizer_class.func is GroupedOptimizer:
        return  # installed already (a second callback of this kind, or `on_init_end` run again)
    if not isinstance(optimizer_class, type) or {"params", "model", "optimizer_dict"} & set(kwargs):
        raise refuse(f"the optimizer {getattr(args, 'optim', None)!r} groups the model's parameters itself (GaLore, "
                     "APOLLO, LOMO, layer-wise or factory optimizers). Use a plain optimizer such as 'adamw_torch'.")
    factory = functools.partial(GroupedOptimizer, callback, args, trainer.get_decay_parameter_names,
                                trainer.optimizer_cls_and_kwargs, by_block)
    # The keywords stay beside the factory for what the Trainer reads of them after building (bitsandbytes' 8 bits).
    trainer.optimizer_cls_and_kwargs = (factory, dict(kwargs))
