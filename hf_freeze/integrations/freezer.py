"""`LayerFreezer`: the whole flow (model → blocks → decision → application → report) for any training loop.

`FreezeCallback` is this class driven by Trainer events; everything the callback does, a plain loop does with it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..apply import AppliedChange, FreezeApplier, HealthCheck, optimizer_state_bytes
from ..config import FreezeArguments, arguments_from
from ..errors import FreezeConfigError, few
from ..logging import get_logger
from ..model import discover_layout, peft_adapter_reason, unwrap_model
from ..policies import STRATEGIES, FreezeDecision, TrainingProgress, decide, registration_decision
from ..policies.adaptive import check_against_training
from ..policies.parts import counted_layout, unused_parts
from ..policies.simulate import check_against_layout, describe_inaction
from ..processes import is_main_process, rank_and_world
from ..report import FreezeTimeline, describe_change, describe_selection, format_block_table, format_part_lines
from ..report import freeze_metrics
from ..report import model_metrics, summary_line
from ..scores import LayerProbe
from .prefix_cache_setup import build_prefix_cache, cache_prefix
from .saved_state import check_registered, check_shape

__all__ = ["LayerFreezer"]

logger = get_logger(__name__)


class LayerFreezer:
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
        if self.peft_reason and is_main_process():
            logger.warning(
                f"hf_freeze: freezing is skipped and nothing is changed, because {self.peft_reason}: the adapter "
                "already decides what trains. To train extra modules, list them in the PEFT config's `modules_to_save`."
            )
        self.strategy = STRATEGIES.get(self.arguments.freeze_strategy)
        self.layout = None if self.peft_reason else counted_layout(
            discover_layout(self.model, self.arguments.freeze_layer_paths, self.arguments.freeze_component_paths),
            self.arguments,
        )
        self.applier = FreezeApplier(self.model, self.layout, bool(self.arguments.freeze_frozen_modules_eval))
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
        self._warned = False
        # The parameters the optimizer is built over (trainable after `prepare`): what a resume must agree with.
        self.registered: Optional[List[str]] = None
        # `freeze_cache_prefix`: the stored frozen-prefix states (built by the first `apply`), where they spill to
        # disk when `freeze_cache_dir` is unset (the callback sets the output folder), and the tokenizer they follow.
        self.prefix_cache = None
        self.cache_directory: Optional[str] = None
        self.cache_tokenizer: Any = None
        if self.layout is not None:
            self.check()
            self.timeline = FreezeTimeline(self.layout, self.arguments.freeze_strategy, self.arguments.freeze_options())
            if self.strategy.needs_scores:
                self.probe = LayerProbe(self.model, self.layout, self.arguments)

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
        if self.arguments.freeze_cache_prefix:
            cache_prefix(self.layout, self.decide().frozen, self.arguments.freeze_strategy)
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
        first = self.registered is None
        change = self.applier.apply(self.decision, optimizer)
        if first and not self.dynamic:  # the parameters an optimizer built now would hold
            self.registered = self._trainable_names()
        if self.arguments.freeze_cache_prefix:
            self._follow_prefix()
        if change.changed or first or not self.health.checks:
            self.health.arm(self.applier.eval_modules.modules if self.applier.eval_modules else ())
        return change

    def _follow_prefix(self) -> None:
        """Build the frozen-prefix cache, or build it again when the frozen prefix is no longer the one it skips."""
        prefix = cache_prefix(self.layout, self.frozen_names(), self.arguments.freeze_strategy)
        if self.prefix_cache is not None and self.prefix_cache.prefix == prefix:
            return
        self.close(remove=True)
        self.prefix_cache = build_prefix_cache(
            self.model, self.layout, prefix, self.arguments, self.cache_directory, self.cache_tokenizer, *rank_and_world()
        )

    def close(self, remove: bool = False) -> None:
        """Delete the frozen-prefix cache's stored states (`freeze_cache_keep` keeps them); ``remove``: also take its
        hooks off. Call it when training ends; the cache fills again if training goes on."""
        if self.prefix_cache is None:
            return
        self.prefix_cache.close()
        if remove:
            self.prefix_cache.remove()
            self.prefix_cache = None

    def _trainable_names(self) -> List[str]:
        return [name for name, parameter in self.applier.parameters.items() if parameter.requires_grad]

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
        `load_state_dict` it applies in full.
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
        self.timeline.record(progress, self.frozen_names(), after, held - (after or 0))
        return change

    def start(
        self, progress: TrainingProgress, optimizer: Optional[torch.optim.Optimizer] = None, state: Optional[Dict[str, Any]] = None
    ) -> AppliedChange:
        """Training begins at `progress`, or resumes there from a saved `state`: forget any earlier run, take over
        the saved one, refuse a probe as long as training, and apply the frozen set in full."""
        if not self.dynamic:
            return self.apply(progress, optimizer)
        self.restart()
        if state is not None:
            self.load_state_dict(state, step=progress.step)
        self.check_training_length(progress.max_steps)
        return self.update(progress, optimizer)

    def check_inputs(self, input_names: Optional[List[str]], ddp_without_unused_search: bool = False) -> List[str]:
        """Check a multi-part model's trainable parts against the training data's inputs (its column names, or the
        keys of its first example; ``None`` when unknown): on text-only data, the encoders and projector train
        nothing. Under DDP without ``find_unused_parameters`` that would fail at the first step, so it is refused
        here, naming `freeze_unused_modalities`; otherwise the returned lines say what that option would save.

        Example:

        ```python
        >>> from transformers import AutoConfig, AutoModelForImageTextToText
        >>> from hf_freeze import LayerFreezer
        >>> config = AutoConfig.for_model("llava", image_token_index=127,
        ...     text_config=dict(model_type="llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        ...                      num_key_value_heads=1, intermediate_size=32, vocab_size=128),
        ...     vision_config=dict(model_type="clip_vision_model", hidden_size=16, num_hidden_layers=1,
        ...                        num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8))
        >>> freezer = LayerFreezer(AutoModelForImageTextToText.from_config(config), freeze_strategy="none")
        >>> freezer.check_inputs(["input_ids", "pixel_values", "labels"])
        []
        >>> len(freezer.check_inputs(["input_ids", "labels"]))
        1
        ```
        """
        if self.layout is None or self.arguments.freeze_unused_modalities is not None:
            return []
        unused = unused_parts(self.layout, self.frozen_names(), input_names)
        if not unused:
            return []
        what = " and ".join(f"the {part} part ({count:,} trainable parameters)" for part, count in unused.items())
        if ddp_without_unused_search:
            raise FreezeConfigError(
                f"The training data has no image, video or audio input (its inputs: {few(input_names, 6)}), so {what} "
                "will get no gradients, and DDP without unused-parameter detection stops at the first step waiting for "
                "them. Set `freeze_unused_modalities: true` to freeze them (the run is otherwise the same), or "
                "`ddp_find_unused_parameters: true`, or `freeze_unused_modalities: false` if a data collator adds "
                "the image inputs.",
                fields=["freeze_unused_modalities"],
            )
        return [
            f"The training data has no image, video or audio input, so {what} train nothing; "
            "`freeze_unused_modalities: true` would spare their gradients and optimizer states (and DDP's search "
            "for unused parameters)."
        ]

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

    def before_optimizer_step(self) -> None:
        """Call just before ``optimizer.step()`` (needed when the policy sets learning-rate factors, and by the
        gradient scores of adaptive policies, which read the gradients there)."""
        if self.decision is not None and self.decision.update_factors:
            self.applier.begin_scaled_step(self.decision.update_factors)
        if self.probe is not None:
            self.probe.observe_gradients()
        self.health.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Call just after ``optimizer.step()``: scales the updates of parameters with a learning-rate factor, and
        runs the training health check after the first step and after each change of the frozen set."""
        self.applier.end_scaled_step()
        self.health.after_optimizer_step()

    # -- state that survives a restart ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe state: the options, the timeline so far, an adaptive policy's scores and probe in progress.

        The frozen set itself is not saved: it is a function of the step (and of the saved scores), recomputed by
        the next `update`.
        """
        return {
            "options": self.arguments.freeze_options(),
            "registered": self.registered,
            "timeline": self.timeline.state_dict() if self.timeline is not None else None,
            "probe": self.probe.state_dict() if self.probe is not None else None,
        }

    def check_resumable(self, state: Dict[str, Any], source: str = "the saved state") -> None:
        """Refuse, before any optimizer state is loaded, a saved state that is damaged or whose optimizer was built
        over other parameters than this run's (a policy changed between the runs). Call it after `prepare`."""
        check_shape(state, source)
        if self.registered is not None:
            check_registered(state.get("registered"), self.registered, state.get("options"), self.arguments.freeze_options())

    def load_state_dict(self, state: Dict[str, Any], step: Optional[int] = None) -> None:
        """Take over the state of an interrupted run; the next `update` applies the frozen set in full.

        Load it before the optimizer's state: it refuses an optimizer state that belongs to other parameters.

        Args:
            state: What `state_dict` returned.
            step: Where the resumed run starts; records made at or after it are dropped. Default: keep them all.
        """
        self.check_resumable(state)
        if state.get("options") not in (None, self.arguments.freeze_options()) and is_main_process():
            logger.warning(
                "The freezing policy differs from the one in the saved state; the frozen set follows the current "
                "policy" + (f" from step {step} on." if step is not None else ".")
            )
        self.restart()
        if self.timeline is not None and state.get("timeline"):
            self.timeline.load_state_dict(state["timeline"], step)
        if self.probe is not None and state.get("probe"):
            self.probe.load_state_dict(state["probe"], step)

    def restart(self) -> None:
        """Forget the run so far (timeline, scores, the applied decision): a second run starts over."""
        self.decision = None
        if self.timeline is not None:
            self.timeline.clear()
        if self.probe is not None:
            self.probe.reset()

    # -- report ---------------------------------------------------------------------------------------------------

    def metrics(self) -> Dict[str, float]:
        """`freeze/...` metrics measured on the model itself (its `requires_grad` flags)."""
        if self.layout is None:
            return model_metrics(self.model)
        metrics = freeze_metrics(self.layout, self.frozen_names())
        if self.prefix_cache is not None:
            stats = self.prefix_cache.stats()
            metrics["freeze/prefix_cache_examples"] = stats["examples"]
            metrics["freeze/prefix_cache_mib"] = round((stats["memory_bytes"] + stats["disk_bytes"]) / 2**20, 3)
        if self.probe is not None:
            metrics.update(self.probe.metrics())
        return metrics

    def summary(self) -> str:
        return summary_line(self.metrics(), None if self.layout is None else self.layout.num_layers)

    def table(self) -> str:
        return "" if self.layout is None else format_block_table(self.layout, self.frozen_names())

    def report_lines(self, summary: bool = True) -> List[str]:
        """What the user should see once the policy is applied, one log message each: the notes (tied weights,
        weight sharing), the summary line, the per-block table."""
        notes = list(self.layout.notes if self.layout is not None else ()) + list(self.decision.notes if self.decision else ())
        summary_lines = [f"strategy {self.arguments.freeze_strategy!r}: {self.summary()}"] if summary else []
        parts = format_part_lines(self.layout, self.frozen_names()) if self.layout is not None else []
        return notes + summary_lines + ["\n" + self.table()] + (["by part: " + "; ".join(parts)] if parts else [])

    def describe_update(self, change: AppliedChange, always: bool = False) -> List[str]:
        """Log lines for the last `update`: the selection an adaptive probe just made, and the change of the
        frozen set (``always``: the current frozen set even when it did not change)."""
        lines = []
        if self.probe is not None and self.probe.last_selection is not None:
            lines.append(describe_selection(self.timeline.selections[-1], self.layout, self.probe))
        changes = self.timeline.changes if self.timeline is not None else []
        if (change.changed or always) and changes:
            lines.append(describe_change(changes[-1], changes[-2] if len(changes) > 1 else None, self.layout))
        return lines

    def write_timeline(self, output_dir: str, end_step: Optional[int] = None) -> None:
        """Write ``freeze_timeline.json`` (and ``.png`` with matplotlib) when the frozen set changes in training."""
        if self.dynamic and output_dir:
            self.timeline.write(output_dir, end_step=end_step)
