"""`LayerFreezer`: the whole flow (model → blocks → decision → application → report) without a Trainer."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .applier import AppliedChange, FreezeApplier, optimizer_state_bytes
from .config import FreezeArguments, raise_if_unknown
from .discovery import discover_layout, unwrap_model
from .errors import FreezeConfigError
from .peft_guard import peft_adapter_reason
from .probe import LayerProbe
from .policies import STRATEGIES, FreezeDecision, TrainingProgress, decide, registration_decision
from .report import format_block_table, freeze_metrics, summary_line
from .timeline import FreezeTimeline

__all__ = ["LayerFreezer", "arguments_from"]


def arguments_from(arguments: Optional[FreezeArguments] = None, options: Optional[Mapping[str, Any]] = None):
    """One `FreezeArguments` from either a ready object or `freeze_*` keyword options (not both)."""
    options = dict(options or {})
    if arguments is not None and options:
        raise FreezeConfigError(
            f"Give the policy either as a FreezeArguments or as freeze_* keywords, not both (got keywords "
            f"{sorted(options)})."
        )
    if arguments is not None:
        if not isinstance(arguments, FreezeArguments):
            raise FreezeConfigError(f"`arguments` must be a FreezeArguments (got {type(arguments).__name__}).")
        return FreezeArguments(**arguments.freeze_options())
    if options:
        raise_if_unknown(options)
        return FreezeArguments(**options)
    return None


class LayerFreezer:
    """Discover a model's blocks, decide what to freeze, apply it, report it: usable from any training loop.

    Args:
        model: The model to freeze (wrappers such as DDP are looked through).
        arguments: A `FreezeArguments`; or pass the `freeze_*` options as keywords.

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_freeze import LayerFreezer
    >>> config = AutoConfig.for_model("gpt2", n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2)
    >>> change = freezer.apply()
    >>> freezer.metrics()["freeze/frozen_layers"]
    2
    ```
    """

    def __init__(self, model: nn.Module, arguments: Optional[FreezeArguments] = None, **options: Any):
        self.arguments = arguments_from(arguments, options) or FreezeArguments()
        self.model = unwrap_model(model)
        self.peft_reason = peft_adapter_reason(self.model)
        self.layout = None if self.peft_reason else discover_layout(self.model, self.arguments.freeze_layer_paths)
        self.applier = FreezeApplier(self.model, self.layout)
        self.decision: Optional[FreezeDecision] = None
        self.timeline = (
            None
            if self.layout is None
            else FreezeTimeline(self.layout, self.arguments.freeze_strategy, self.arguments.freeze_options())
        )
        # Adaptive policies decide from per-layer scores, measured by probes during training.
        self.probe = (
            LayerProbe(self.model, self.layout, self.arguments)
            if self.layout is not None and STRATEGIES.get(self.arguments.freeze_strategy).needs_scores
            else None
        )

    @property
    def skipped(self) -> bool:
        """True when the model carries a PEFT adapter: nothing is changed then."""
        return self.peft_reason is not None

    def decide(self, progress: Optional[TrainingProgress] = None) -> FreezeDecision:
        if self.skipped:
            return FreezeDecision(frozenset(self.applier.frozen_names()))
        if self.probe is not None and progress is not None and progress.layer_scores is None:
            progress = self.probe.with_scores(progress)
        return decide(self.layout, self.arguments, progress)

    def apply(
        self,
        progress: Optional[TrainingProgress] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        decision: Optional[FreezeDecision] = None,
    ) -> AppliedChange:
        """Decide (unless a decision is given) and make the model and the optimizer match."""
        if self.skipped:
            return AppliedChange([], [])
        self.decision = decision or self._decide_measured(progress)
        return self.applier.apply(self.decision, optimizer)

    # -- policies that change during training (schedules) --------------------------------------------------------

    @property
    def dynamic(self) -> bool:
        """True when the frozen set changes during training: apply it with `prepare` and then `update`."""
        return not self.skipped and STRATEGIES.get(self.arguments.freeze_strategy).dynamic

    def prepare(self, progress: Optional[TrainingProgress] = None) -> AppliedChange:
        """Apply what must hold before the optimizer (and DDP) are built.

        A static policy is applied as it is. A schedule first makes trainable every parameter it may ever train,
        so that an optimizer built from the trainable parameters holds them all (with their usual param group and
        learning-rate schedule); `update` then applies each step's frozen set. Configuration errors that depend on
        the model (too few layers) are raised here, before training starts.
        """
        if not self.dynamic:
            return self.apply(progress)
        self.decide(progress)
        return self.applier.apply(registration_decision(self.layout, self.arguments))

    def update(self, progress: TrainingProgress, optimizer: Optional[torch.optim.Optimizer] = None) -> AppliedChange:
        """Apply the policy at `progress` if it changes the frozen set; record the change in `timeline`.

        Call it before each step's forward pass (with the optimizer): newly frozen parameters lose their ``.grad``
        and their optimizer state, newly trainable ones join the optimizer if it never saw them.
        """
        if self.skipped:
            return AppliedChange([], [])
        decision = self._decide_measured(progress)
        if self.decision is not None and decision.frozen == self.decision.frozen:
            self.decision = decision  # learning-rate factors may change without the frozen set changing
            return AppliedChange([], [])
        held = optimizer_state_bytes(optimizer)
        change = self.apply(progress, optimizer, decision=decision)
        after = optimizer_state_bytes(optimizer) if optimizer is not None else None
        self.timeline.record(progress, self.applier.frozen_names(), after, held - (after or 0))
        return change

    def _decide_measured(self, progress: Optional[TrainingProgress]) -> FreezeDecision:
        """Decide at `progress`, first starting or finishing an adaptive policy's probe as the step requires."""
        if self.probe is None or progress is None:
            return self.decide(progress)
        decision = self.decide(self.probe.at(progress))
        if self.probe.last_selection is not None:
            self.timeline.record_selection(dict(self.probe.last_selection, frozen_layers=decision.frozen_layers(self.layout)))
        return decision

    def before_optimizer_step(self) -> None:
        """Call just before ``optimizer.step()`` (needed when the policy sets learning-rate factors, and by the
        'grad_norm' score of adaptive policies, which reads the gradients there)."""
        if self.decision is not None and self.decision.update_factors:
            self.applier.begin_scaled_step(self.decision.update_factors)
        if self.probe is not None:
            self.probe.observe_gradients()

    def after_optimizer_step(self) -> None:
        """Call just after ``optimizer.step()``: scales the updates of parameters with a learning-rate factor."""
        self.applier.end_scaled_step()

    def metrics(self) -> Dict[str, float]:
        """`freeze/...` metrics measured on the model itself (its `requires_grad` flags)."""
        if self.layout is None:
            total = sum(p.numel() for p in self.applier.parameters.values())
            trainable = sum(p.numel() for p in self.applier.parameters.values() if p.requires_grad)
            return {
                "freeze/trainable_params": trainable,
                "freeze/total_params": total,
                "freeze/trainable_fraction": round(trainable / total, 6) if total else 0.0,
            }
        metrics = freeze_metrics(self.layout, self.applier.frozen_names())
        if self.probe is not None:
            metrics.update(self.probe.metrics())
        return metrics

    def summary(self) -> str:
        if self.layout is None:
            metrics = self.metrics()
            return f"trainable params: {metrics['freeze/trainable_params']:,} || all params: {metrics['freeze/total_params']:,}"
        return summary_line(self.layout, self.applier.frozen_names())

    def table(self) -> str:
        return "" if self.layout is None else format_block_table(self.layout, self.applier.frozen_names())
