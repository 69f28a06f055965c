"""`LayerFreezer`: the whole flow (model → blocks → decision → application → report) for any training loop.

`FreezeCallback` is this class driven by Trainer events; everything the callback does, a plain loop does with it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..add_on import AddOn, RunContext
from ..apply import AppliedChange, FreezeApplier, HealthCheck, innermost_optimizer, optimizer_state_bytes
from ..apply.compiled import refuse_stale_compiled_graph
from ..apply.ddp_reduce import TrainableGradientReduce
from ..apply.frozen_groups import skips_frozen_groups
from ..apply.frozen_dtype import frozen_dtype_of
from ..apply.param_groups import rate_metrics
from ..config import FreezeArguments, arguments_from
from ..logs import get_logger
from ..model import discover_layout, loaded_vocabulary_size, peft_adapter_reason, record_vocabulary_size, unwrap_model
from ..policies import STRATEGIES, FreezeDecision, TrainingProgress, decide, registration_decision
from ..policies.adaptive import check_against_training
from ..policies.parts import check_unused_parts, counted_layout
from ..policies.layout_checks import check_against_layout
from ..policies.simulate import describe_inaction
from ..processes import is_main_process
from ..report import FreezeTimeline
from ..scores import LayerProbe
from .addons import ADD_ONS
from .groups import OptimizerGroups
from .report import FreezerReport
from .resume import ResumableFreezer

__all__ = ["LayerFreezer"]

logger = get_logger(__name__)


class LayerFreezer(ResumableFreezer, OptimizerGroups, FreezerReport):
    """Discover a model's blocks, decide what to freeze, apply it, report it: usable from any training loop.

    The options are checked once, here: a value the model cannot honour (a count above its number of layers, a
    pattern that matches nothing) raises before anything is changed.

    A static policy: `apply()` once, before the optimizer is built. A policy that changes during training (a
    schedule, an adaptive policy): `prepare()` before the optimizer is built, then `update(progress, optimizer)`
    before each step's forward pass and `before_optimizer_step()` / `after_optimizer_step()` around
    ``optimizer.step()``. To resume, save `state_dict()` with the model and the optimizer, and in the new process
    build the freezer, `prepare()`, build the optimizer, load the three, and go on with `update`.

    Args:
        model: The model to freeze (wrappers such as DDP are looked through).
        arguments: A `FreezeArguments`; or pass the `freeze_*` options as keywords.
        run: Where the run writes and its tokenizer (`hf_freeze.add_on.RunContext`), for the add-ons that use them.

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

    def __init__(
        self, model: nn.Module, arguments: Optional[FreezeArguments] = None, *, run: Optional[RunContext] = None,
        **options: Any,
    ):
        self.arguments = arguments_from(arguments, options) or FreezeArguments()
        for kind in ADD_ONS:
            kind.check_arguments(self.arguments)
        compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        self.model = unwrap_model(model)
        self.peft_reason = peft_adapter_reason(self.model)
        if self.peft_reason and is_main_process():
            logger.warning(
                f"hf_freeze: freezing is skipped and nothing is changed, because {self.peft_reason}: the adapter "
                "already decides what trains. To train extra modules, list them in the PEFT config's `modules_to_save`."
            )
        self.strategy = STRATEGIES.get(self.arguments.freeze_strategy)
        refuse_stale_compiled_graph(compiled, self.strategy.dynamic, self.strategy.name)
        self.layout = None if self.peft_reason else counted_layout(
            discover_layout(self.model, self.arguments.freeze_layer_paths, self.arguments.freeze_component_paths),
            self.arguments,
        )
        if self.layout is not None and self.arguments.freeze_trainable_tokens is not None:
            # `freeze_trainable_tokens: new` counts from the vocabulary the model was loaded with, recorded on the
            # model (and in `state_dict`) so that a later freezer trains the same rows.
            base = loaded_vocabulary_size(self.model)
            if base is not None:
                record_vocabulary_size(self.model, base)
            self.layout = replace(self.layout, base_vocabulary=base)
        # Add-ons (the loss lever, the frozen-prefix cache) attach before the applier: their hooks run first.
        attached = (kind.attach(self.model, self.layout, self.arguments, run or RunContext()) for kind in ADD_ONS)
        self.add_ons = {add_on.name: add_on for add_on in attached if add_on is not None}
        self.applier = FreezeApplier(
            self.model, self.layout, bool(self.arguments.freeze_frozen_modules_eval),
            frozen_dtype_of(self.arguments.freeze_frozen_dtype) if self.layout is not None else None, self.strategy.dynamic,
        )
        if self.sets_learning_rates:
            self.applier.group_of = lambda name: self.learning_rate(name).group
        self.health = HealthCheck(
            self.applier.parameters, dict(self.model.named_buffers()), self.arguments.freeze_health_check or "warn",
            report=lambda message: logger.warning(message) if is_main_process() else None,
        )
        # Frozen by the user's own code before any policy ran: kept frozen unless the options name them.
        respect = self.arguments.freeze_respect_existing is not False
        self.kept_frozen = frozenset(self.applier.frozen_by_user()) if respect else frozenset()
        self.decision: Optional[FreezeDecision] = None
        self.timeline: Optional[FreezeTimeline] = None
        # Adaptive policies decide from per-layer scores, measured by probes during training.
        self.probe: Optional[LayerProbe] = None
        # The optimizer `update` was last given: a probe that withholds its steps needs it in `before_optimizer_step`.
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._warned = False
        self._checked_optimizer: Optional[int] = None
        self.step_rates: Dict[str, float] = {}  # `freeze/lr/<group>` of the last optimizer step
        # The parameters the optimizer is built over (trainable after `prepare`): what a resume must agree with.
        self.registered: Optional[List[str]] = None
        # Under DDP, the hook that all-reduces only what trains at each step (`reduce_only_trainable`).
        self.communication: Optional[TrainableGradientReduce] = None
        if self.layout is not None:
            self.check()
            self.timeline = FreezeTimeline(self.layout, self.arguments.freeze_strategy, self.arguments.freeze_options())
            if self.strategy.needs_scores:
                self.probe = LayerProbe(self.model, self.layout, self.arguments, self.applier.parameters)

    @property
    def skipped(self) -> bool:
        """True when the model carries a PEFT adapter: nothing is changed then."""
        return self.peft_reason is not None

    @property
    def dynamic(self) -> bool:
        """True when the frozen set changes during training: apply it with `prepare` and then `update`."""
        return not self.skipped and self.strategy.dynamic

    def decide(self, progress: Optional[TrainingProgress] = None) -> FreezeDecision:
        """The policy's decision at ``progress`` (with the scores measured so far), without applying it."""
        if self.skipped:
            return FreezeDecision(frozenset(self.frozen_names()))
        if self.probe is not None and progress is not None and progress.layer_scores is None:
            progress = self.probe.with_scores(progress)
        return decide(self.layout, self.arguments, progress, self.kept_frozen)

    def check(self, max_steps: Optional[int] = None) -> None:
        """Everything training would refuse about this policy on this model, raised now (the freezer runs it when it
        is built; `hf-freeze validate --model` runs the same): values the model cannot honour, a policy that leaves
        nothing to train, and with ``max_steps`` an adaptive probe as long as training."""
        check_against_layout(self.layout, self.arguments, max_steps, self.kept_frozen)
        checking = [add_on for add_on in self.add_ons.values() if type(add_on).check is not AddOn.check]
        if checking:  # the first frozen set, decided once for the add-ons that check it
            frozen = self.decide().frozen
            for add_on in checking:
                add_on.check(self.layout, frozen)
        if max_steps:
            self.check_training_length(max_steps)

    def frozen_names(self) -> List[str]:
        """Names of the parameters that are frozen now."""
        return self.applier.frozen_names()

    def would_change(self, progress: Optional[TrainingProgress] = None) -> List[str]:
        """Parameters whose `requires_grad` applying the decision at ``progress`` would flip."""
        return [] if self.skipped else self.applier.would_flip(self.decide(progress))

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
        self._warn_once(progress)
        self._check_optimizer(optimizer)
        first = self.registered is None
        self.applier.in_backward = frozenset(
            name for add_on in self.add_ons.values() for name in add_on.in_backward(self.decision.frozen)
        )
        change = self.applier.apply(self.decision, optimizer)
        if first and not self.dynamic:  # the parameters an optimizer built now would hold
            self.registered = self._trainable_names()
        for add_on in self.add_ons.values():
            add_on.after_apply(self.frozen_names())
        if change.changed or first or not self.health.checks:
            self.health.arm(self.applier.eval_modules.modules if self.applier.eval_modules else ())
        return change

    @property
    def prefix_cache(self):
        """The frozen-prefix cache (`freeze_cache_prefix`), once the policy is applied; else ``None``."""
        add_on = self.add_ons.get("prefix_cache")
        return add_on.cache if add_on is not None else None

    def close(self, remove: bool = False) -> None:
        """Training ended: the add-ons let go of what they hold (the frozen-prefix cache deletes its stored states
        unless `freeze_cache_keep`); ``remove``: also take their hooks off. Training may go on afterwards."""
        for add_on in self.add_ons.values():
            add_on.close(remove)

    def _trainable_names(self) -> List[str]:
        own = [name for name, parameter in self.applier.parameters.items() if parameter.requires_grad]
        return own + self.applier.rows.registered_names()

    def _warn_once(self, progress: Optional[TrainingProgress]) -> None:
        """What the user must not miss, said once: an option that did more than it says, a policy that does nothing."""
        if self._warned or not is_main_process():
            return
        if self.dynamic and not (progress and progress.max_steps):
            return  # whether a schedule ever changes depends on the length of the run
        self._warned = True
        lines = list(self.decision.warnings)
        inaction = describe_inaction(self.layout, self.arguments, progress or TrainingProgress(), self.kept_frozen)
        lines += [inaction] if inaction else []
        for line in lines:
            logger.warning(line)

    # -- policies that change during training -------------------------------------------------------------------

    def prepare(self, progress: Optional[TrainingProgress] = None) -> AppliedChange:
        """Apply what must hold before the optimizer (and DDP) are built.

        A static policy is applied as it is. A schedule first makes trainable every parameter it may ever train,
        so that an optimizer built from the trainable parameters holds them all (with their usual param group and
        learning-rate schedule); `update` then applies each step's frozen set.
        """
        if not self.dynamic:
            return self.apply(progress)
        change = self.applier.apply(registration_decision(self.layout, self.arguments, self.kept_frozen))
        self.registered = self._trainable_names()
        return change

    def update(self, progress: TrainingProgress, optimizer: Optional[torch.optim.Optimizer] = None) -> AppliedChange:
        """Apply the policy at `progress` if it changes the frozen set; record the change in `timeline`.

        Call it before each step's forward pass (with the optimizer): newly frozen parameters lose their ``.grad``
        and their optimizer state, newly trainable ones join the optimizer if it never saw them. After `restart` or
        `load_state_dict` it applies in full. While an adaptive probe withholds its optimizer steps, the optimizer
        holds no state: what trained before the probe starts afresh after it.
        """
        if self.skipped:
            return AppliedChange([], [])
        if skips_frozen_groups(optimizer):
            optimizer = None  # DeepSpeed ZeRO: its block groups are skipped while frozen (`apply.frozen_groups`)
        if optimizer is not None:
            self._optimizer = optimizer
        if self.communication is not None:
            self.communication.begin_step()
        self._follow_engine()  # before a probe begins
        decision = self._decide_measured(progress)
        released = 0
        if self.probe is not None and self.probe.withholding and optimizer is not None:
            # A re-selection's probe would otherwise hold the state of what trained before: more than the first probe.
            released = optimizer_state_bytes(optimizer)
            self.applier.release_optimizer_state(optimizer)
        if self.decision is not None and decision.frozen == self.decision.frozen:
            self.decision = decision  # learning-rate factors may change without the frozen set changing
            return AppliedChange([], [])
        held = optimizer_state_bytes(optimizer)
        change = self.apply(progress, optimizer, decision=decision)
        after = optimizer_state_bytes(optimizer) if optimizer is not None else None
        self.timeline.record(progress, self.frozen_names(), after, released + held - (after or 0))
        return change

    def reduce_only_trainable(self, ddp_model: Any) -> None:
        """Under DDP (``ddp_model``; ``None``: not DDP), a policy that changes all-reduces only the gradients of what
        trains at each step (`hf_freeze.apply.ddp_reduce`); a static policy has DDP register only what trains."""
        if ddp_model is None or not self.dynamic or self.communication is not None:
            return
        hook = TrainableGradientReduce()
        try:
            hook.register(ddp_model)
        except RuntimeError as error:  # DDP takes one communication hook: the user's stays
            self.log([f"DDP has a communication hook already ({error}): every parameter the policy may train is "
                      "all-reduced at every step, frozen ones as zeros."], warning=True)
            return
        self.communication = hook

    def start(
        self, progress: TrainingProgress, optimizer: Optional[torch.optim.Optimizer] = None,
        state: Optional[Dict[str, Any]] = None, source: str = "the saved state",
    ) -> AppliedChange:
        """Training begins at `progress`, or resumes there from a saved `state` (read from ``source``): refuse a
        state this run cannot resume, forget any earlier run, take over the saved one, refuse a probe as long as
        training, apply the frozen set in full, and log it (a static policy's report only when it is first applied
        now). A changing policy resumed past step 0 without its state restarts its schedule: a warning says so."""
        if state is not None:
            self.check_resumable(state, source)
        if not self.dynamic:
            first = self.decision is None
            change = self.apply(progress, optimizer)
            if first:
                self.log(self.report_lines())
            elif change.changed:
                self.log([f"{len(change.frozen) + len(change.unfrozen)} parameters no longer matched the freezing "
                          "policy when training began (something changed requires_grad after the Trainer was built); "
                          "re-applied."], warning=True)
            return change
        self.restart()
        if state is not None:
            self.load_state_dict(state, step=progress.step)
        elif progress.step > 0:
            self.log([f"Resuming at step {progress.step} without the freezing state of the interrupted run: "
                      f"{self.strategy.name!r} starts its schedule (its timeline, an adaptive policy's probe and "
                      "scores) afresh here, so the run will differ from an uninterrupted one."], warning=True)
        self.check_training_length(progress.max_steps)
        change = self.update(progress, optimizer)
        self.log(self.describe_update(change, always=True) + self.report_lines(summary=False))
        return change

    @staticmethod
    def log(lines: List[str], warning: bool = False) -> None:
        """Log ``lines`` on the main process, one message each."""
        if is_main_process():
            for line in lines:
                (logger.warning if warning else logger.info)(line)

    def check_inputs(self, input_names: Optional[List[str]], ddp_without_unused_search: bool = False) -> List[str]:
        """Check a multi-part model's trainable parts against the training data's inputs (its column names, or the
        keys of its first example; ``None`` when unknown): see `hf_freeze.policies.parts.check_unused_parts`. Under
        `freeze_unused_modalities` (either value) there is nothing to check."""
        if self.layout is None or self.arguments.freeze_unused_modalities is not None:
            return []
        return check_unused_parts(self.layout, self.frozen_names(), input_names, ddp_without_unused_search)

    def check_data(self, dataloader: Any) -> None:
        """Refuse, before the first step, training data an add-on cannot serve (the frozen-prefix cache: a stream,
        a collator that masks at random)."""
        for add_on in self.add_ons.values():
            add_on.check_data(dataloader)

    def check_training_length(self, max_steps: int) -> None:
        """Refuse, before the first step, an adaptive probe that would last as long as training."""
        if self.probe is not None:
            check_against_training(self.arguments, max_steps)

    def _decide_measured(self, progress: Optional[TrainingProgress]) -> FreezeDecision:
        """Decide at `progress`, first starting or finishing an adaptive policy's probe as the step requires."""
        if self.probe is None or progress is None:
            return self.decide(progress)
        decision = self.decide(self.probe.at(progress))
        if self.probe.last_selection is not None:
            self.timeline.record_selection(dict(self.probe.last_selection, frozen_layers=decision.frozen_layers(self.layout)))
        return decision

    def before_optimizer_step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Call just before ``optimizer.step()`` (needed when the policy sets learning-rate factors, and by adaptive
        policies: their probes read the gradients there and, with `freeze_probe_mode: measure`, withhold the step by
        dropping every gradient; under a `GradScaler`, call its ``unscale_(optimizer)`` first, as clipping does).
        ``optimizer``: the one being stepped (default: the one `update` was given)."""
        optimizer = optimizer if optimizer is not None else self._optimizer
        self._follow_engine()
        if self.decision is not None and self.decision.update_factors:
            self.applier.begin_scaled_step(self.decision.update_factors)
        self.health.before_optimizer_step()  # while the gradients are there
        if self.probe is not None:
            withholding = self.probe.withholding
            self.probe.observe_gradients(innermost_optimizer(optimizer) if optimizer is not None else None)
            if withholding:
                self.applier.withhold_step(optimizer)

    def after_optimizer_step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Call just after ``optimizer.step()``: scales the updates of parameters with a learning-rate factor, and
        runs the training health check after the first step and after each change of the frozen set; given the
        optimizer, records the rate each learning-rate group trained at (``freeze/lr/<group>``)."""
        self.applier.end_scaled_step()
        if optimizer is not None and self.sets_learning_rates:
            self.step_rates = rate_metrics(optimizer.param_groups)
        self.health.after_optimizer_step()

    def _follow_engine(self) -> None:
        """Look the parameters up again if the engine replaced them (FSDP2's `fully_shard` after `apply`/`prepare`)."""
        if self.applier.follow_live_parameters():
            self.health.rearm()

    def restart(self) -> None:
        """Forget the run so far (timeline, scores, the applied decision): a second run starts over."""
        self.decision = None
        if self.timeline is not None:
            self.timeline.clear()
        if self.probe is not None:
            self.probe.reset()
