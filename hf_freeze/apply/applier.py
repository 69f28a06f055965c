"""The applier: the one place that changes a model and an optimizer to match a `FreezeDecision`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..model.discovery import unwrap_model
from ..model.layout import ROWS_MODULE, ModelLayout
from ..policies import FreezeDecision
from .frozen_dtype import FrozenWeightsDtype
from .frozen_prefix import FrozenPrefixHooks
from .eval_mode import FrozenModulesEval
from .param_groups import GROUP_KEY, decay_parameter_names
from .trainable_rows import TrainableRows

__all__ = ["AppliedChange", "FreezeApplier", "innermost_optimizer", "optimizer_state_bytes"]

# The attribute of the model that lists the parameters an hf_freeze applier froze.
_FROZEN_BY_POLICY = "_hf_freeze_frozen_by_policy"


@dataclass(frozen=True)
class AppliedChange:
    """What one application changed: parameter names whose `requires_grad` flipped.

    Example:

    ```python
    >>> from hf_freeze.apply import AppliedChange
    >>> AppliedChange(frozen=["h.0.w"], unfrozen=[]).changed
    True
    ```
    """

    frozen: List[str]
    unfrozen: List[str]

    @property
    def changed(self) -> bool:
        return bool(self.frozen or self.unfrozen)


class FreezeApplier:
    """Makes a model (and optionally its optimizer) match a decision.

    Freezing a parameter sets ``requires_grad=False``, drops its ``.grad`` (AdamW skips a parameter whose grad
    is ``None``, but moves one whose grad is a zero tensor) and releases its optimizer state. Unfreezing sets
    ``requires_grad=True`` and, when the optimizer never saw the parameter, adds it to the matching existing
    param group so the learning-rate scheduler keeps driving it. Given the model's layout, it also keeps a frozen
    prefix out of the autograd graph under activation checkpointing (`FrozenPrefixHooks`).

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_freeze import FreezeDecision
    >>> from hf_freeze.apply import FreezeApplier
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> change = FreezeApplier(net).apply(FreezeDecision(frozenset({"0.weight", "0.bias"})))
    >>> change.frozen, net[0].weight.requires_grad, net[1].weight.requires_grad
    (['0.weight', '0.bias'], False, True)
    ```
    """

    def __init__(
        self, model: nn.Module, layout: Optional[ModelLayout] = None, frozen_modules_eval: bool = False,
        frozen_dtype: Optional[torch.dtype] = None, exact_unfreeze: bool = False,
    ):
        self.model = unwrap_model(model)
        # Frozen linear weights stored in half precision (`freeze_frozen_dtype`); ``exact_unfreeze`` for schedules.
        self.frozen_dtype = FrozenWeightsDtype(self.model, frozen_dtype, exact_unfreeze) if frozen_dtype else None
        # A schedule's optimizer holds every parameter that trains: one trainable and unknown to it joins it (an
        # optimizer built while a resumed run's frozen set applied, as FSDP2's checkpoint loading needs, lacks some).
        self.adopt_trainable = exact_unfreeze
        # The model's own parameters: the trainable rows hf_freeze adds (`rows`) stand for rows of some of them.
        self.parameters: Dict[str, nn.Parameter] = {
            name: parameter for name, parameter in self.model.named_parameters() if not name.startswith(ROWS_MODULE + ".")
        }
        self._first_parameter = next(self.model.parameters(), None)  # `follow_live_parameters` compares it
        self.rows = TrainableRows(self.model)
        # Frozen modules in eval mode (`freeze_frozen_modules_eval`), kept in step with every application.
        self.eval_modules = FrozenModulesEval(self.model) if frozen_modules_eval else None
        self._before_step: Dict[str, Tuple[torch.Tensor, float]] = {}
        self.layout = layout
        self.prefix_hooks = FrozenPrefixHooks(self.model) if layout is not None else None
        self._decay_names: Optional[set] = None  # the Trainer's weight-decay parameters, read when first needed
        # The learning-rate group of a parameter (`freeze_learning_rates`, `freeze_layer_lr_decay`), set by the freezer.
        self.group_of: Optional[Callable[[str], Optional[str]]] = None
        # Frozen parameters that stay in the backward pass (adapters train on them), set by the freezer.
        self.in_backward: frozenset = frozenset()

    def follow_live_parameters(self) -> bool:
        """Look the parameters up again when the engine replaced them: FSDP2's `fully_shard` registers a new (DTensor)
        parameter under every name. Only the names the applier knows are followed (an adapter's own parameters, or a
        name an adapter moved, are not the policy's). Updated in place: the health check shares the mapping. True when
        one changed."""
        first = next(self.model.parameters(), None)
        if first is self._first_parameter:  # a wrap replaces every parameter: the first one tells, at no cost
            return False
        self._first_parameter = first
        live = dict(self.model.named_parameters())
        replaced = {name: live[name] for name, known in self.parameters.items() if name in live and live[name] is not known}
        self.parameters.update(replaced)
        return bool(replaced)

    def frozen_names(self) -> List[str]:
        return [name for name, parameter in self.parameters.items() if not parameter.requires_grad]

    def frozen_by_user(self) -> List[str]:
        """Frozen parameters that no hf_freeze applier froze: the user's own freezing, to be respected."""
        ours = getattr(self.model, _FROZEN_BY_POLICY, set())
        return [name for name in self.frozen_names() if name not in ours]

    def would_flip(self, decision: FreezeDecision) -> List[str]:
        """Parameters whose `requires_grad` applying ``decision`` would change."""
        return [name for name, parameter in self.parameters.items() if parameter.requires_grad == decision.is_frozen(name)]

    def apply(self, decision: FreezeDecision, optimizer: Optional[torch.optim.Optimizer] = None) -> AppliedChange:
        self.follow_live_parameters()
        frozen, unfrozen = [], []
        for name, parameter in self.parameters.items():
            trainable = not decision.is_frozen(name)
            if parameter.requires_grad != trainable:
                parameter.requires_grad_(trainable)
                (unfrozen if trainable else frozen).append(name)
            if not trainable:
                parameter.grad = None
        # Remembered on the model, so that a later freezer (a second Trainer, a resumed callback) can tell the
        # user's own freezing from ours.
        marked = getattr(self.model, _FROZEN_BY_POLICY, None)
        if marked is None:
            marked = set()
            object.__setattr__(self.model, _FROZEN_BY_POLICY, marked)
        marked.difference_update(unfrozen)
        marked.update(frozen)
        inner = innermost_optimizer(optimizer) if optimizer is not None else None
        if self.rows.update(decision.trainable_rows, inner) and optimizer is not None:
            self._register_rows(optimizer)
        if optimizer is not None:
            self.sync_optimizer(optimizer, frozen, unfrozen)
        # A parameter that trains by rows, or carries an adapter, still takes part in the backward pass: not frozen here.
        wholly_frozen = [
            name for name in self.frozen_names() if name not in decision.trainable_rows and name not in self.in_backward
        ]
        if self.eval_modules is not None:
            self.eval_modules.update(wholly_frozen)
        if self.frozen_dtype is not None:
            self.frozen_dtype.update(wholly_frozen, unfrozen)
        if self.prefix_hooks is not None:
            # Every application, not only changing ones: `Trainer.train()` switches checkpointing on in between.
            self.prefix_hooks.update(self.layout, wholly_frozen)
        return AppliedChange(frozen, unfrozen)

    def _register_rows(self, optimizer: torch.optim.Optimizer) -> None:
        """Rows attached after the optimizer was built join the param group of their full parameter's kind."""
        inner = innermost_optimizer(optimizer)
        known = {id(parameter) for group in inner.param_groups for parameter in group["params"]}
        for name, rows in self.rows.parameters.items():
            if id(rows) not in known:
                self._group_for(inner, name)["params"].append(rows)

    def sync_optimizer(self, optimizer: torch.optim.Optimizer, frozen: List[str], unfrozen: List[str]) -> None:
        """Release the state of newly frozen parameters; give newly trainable ones a place in a param group."""
        inner = innermost_optimizer(optimizer)
        for name in frozen:
            inner.state.pop(self.parameters[name], None)
        known = {id(parameter) for group in inner.param_groups for parameter in group["params"]}
        joining = list(unfrozen)
        if self.adopt_trainable:
            joining += [name for name, parameter in self.parameters.items() if parameter.requires_grad and name not in unfrozen]
        for name in joining:
            parameter = self.parameters[name]
            if id(parameter) not in known:
                self._group_for(inner, name)["params"].append(parameter)
                known.add(id(parameter))

    # -- a step that only measures (an adaptive probe's, `freeze_probe_mode: measure`) -----------------------------

    def withhold_step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Before ``optimizer.step()``: drop every gradient, so that the step changes no parameter and allocates no
        optimizer state (every torch optimizer skips a parameter whose grad is ``None``; a zero grad would still
        move it under weight decay or momentum, and give it Adam's moments)."""
        for parameter in self._stepped(optimizer):
            parameter.grad = None

    def release_optimizer_state(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Drop the optimizer's state of every parameter, as freezing does for a frozen one: what trains afterwards
        starts with fresh state."""
        if optimizer is not None:
            innermost_optimizer(optimizer).state.clear()

    def _stepped(self, optimizer: Optional[torch.optim.Optimizer]) -> List[torch.Tensor]:
        stepped = list(self.model.parameters())
        if optimizer is not None:  # the optimizer may hold tensors that are not the model's
            known = {id(parameter) for parameter in stepped}
            stepped += [parameter for group in innermost_optimizer(optimizer).param_groups for parameter in group["params"]
                        if id(parameter) not in known]
        return stepped

    def _group_for(self, optimizer: torch.optim.Optimizer, name: str) -> dict:
        """The existing group a parameter joins: among the groups of its learning rate (when there are such groups),
        the one holding parameters of its kind (weight decay or not, by the Trainer's rule), else the group with the
        most (or least) weight decay.

        Adding a new group instead would break LambdaLR-style schedulers, which keep one entry per group.
        """
        groups = optimizer.param_groups
        wanted = self.group_of(name) if self.group_of is not None else None
        # With learning-rate groups, a parameter joins its own rate's group (built with the optimizer).
        groups = [group for group in groups if wanted is not None and group.get(GROUP_KEY) == wanted] or groups
        if len(groups) == 1:
            return groups[0]
        if self._decay_names is None:
            self._decay_names = set(decay_parameter_names(self.model))
        decays = name in self._decay_names
        same_kind = {id(p) for other, p in self.parameters.items() if other != name and (other in self._decay_names) == decays}
        for group in groups:
            if any(id(parameter) in same_kind for parameter in group["params"]):
                return group
        by_decay = sorted(groups, key=lambda group: group.get("weight_decay", 0.0))
        return by_decay[-1] if decays else by_decay[0]

    # -- learning-rate factors without new param groups -----------------------------------------------------------
    #
    # A factor on a few parameters' learning rate would need param groups of their own, and groups added after the
    # scheduler exists break it (LambdaLR keeps one lambda per group); the optimizer's state dict would no longer
    # match the groups a resumed run builds either. Scaling the update instead is the same thing for every optimizer
    # whose update is ``-lr * u(state, grad)`` with a state that does not depend on ``lr`` (SGD, Adam, AdamW, Adagrad,
    # RMSprop, Lion, ...): ``old + f * (new - old)`` is the step taken with ``f * lr``.

    def begin_scaled_step(self, factors: Mapping[str, float]) -> None:
        """Before ``optimizer.step()``: remember the parameters whose update will be scaled by a factor."""
        self._before_step = {
            name: (self.parameters[name].detach().clone(), float(factor))
            for name, factor in factors.items()
            if factor != 1.0 and self.parameters[name].requires_grad
        }

    def end_scaled_step(self) -> None:
        """After ``optimizer.step()``: shrink each remembered parameter's update by its factor."""
        with torch.no_grad():
            for name, (before, factor) in self._before_step.items():
                parameter = self.parameters[name]
                parameter.copy_(before.lerp_(parameter.detach(), factor))
        self._before_step = {}


def optimizer_state_bytes(optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (Adam's moments, momentum buffers, ...)."""
    if optimizer is None:
        return 0
    inner = innermost_optimizer(optimizer)
    return sum(
        value.numel() * value.element_size()
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def innermost_optimizer(optimizer):
    """The torch optimizer inside a wrapper (accelerate's `AcceleratedOptimizer`), or ``optimizer`` itself."""
    # accelerate's AcceleratedOptimizer (and DeepSpeed wrappers) keep the real optimizer in `.optimizer`.
    while hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
