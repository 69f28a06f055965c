"""Plan a freezing policy before training: what it freezes, when, and what it saves.

`load_model_on_meta` builds a model from its config on the meta device (shapes only, no weights, no memory: a
70B-parameter config takes seconds); `plan_timeline` runs a policy over the training steps and keeps the steps where
the frozen set changes; `make_plan` puts these together with the memory estimate of `memory.py`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from .config import FreezeArguments
from .errors import FreezeConfigError, invalid, one_of
from .layout import ModelLayout
from .memory import ActivationShape, MemoryEstimate, estimate_training_memory
from .policies import STRATEGIES, TrainingProgress, decide

__all__ = ["TASKS", "FreezePlan", "TimelineEntry", "load_model_on_meta", "make_plan", "plan_timeline"]

# `--task` values -> transformers Auto class names.
TASKS: Dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}


def load_config(model_path: str):
    """A transformers config from a model folder or a ``config.json`` file (local only)."""
    from transformers import AutoConfig

    if not os.path.exists(model_path):
        raise FreezeConfigError(
            f"MODEL must be a local model folder or a config.json file (got {model_path!r}, which does not exist)."
        )
    if os.path.isdir(model_path) and not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FreezeConfigError(f"MODEL folder {model_path!r} has no config.json.")
    if os.path.isfile(model_path):
        with open(model_path, encoding="utf-8") as handle:
            values = json.load(handle)
        if "model_type" not in values:
            raise FreezeConfigError(f"{model_path!r} has no `model_type`: it is not a transformers config.json.")
        return AutoConfig.for_model(**values)
    return AutoConfig.from_pretrained(model_path, local_files_only=True)


def load_model_on_meta(model_path: str, task: str = "auto", num_labels: Optional[int] = None):
    """Build the model described by ``model_path`` on the meta device: every parameter has its shape, none has data.

    Args:
        model_path: A local model folder or a ``config.json``.
        task: ``"auto"`` (the config's `architectures`; without it a seq2seq LM for encoder-decoders, the base
            model for encoders, a causal LM for decoders) or one of `TASKS`.
        num_labels: For classification heads.
    """
    import torch

    config = load_config(model_path)
    if num_labels is not None:
        config.num_labels = num_labels
    model_class = _model_class(config, task)
    # Auto classes build from a config with `from_config`, concrete ones (from `architectures`) with `_from_config`.
    build = getattr(model_class, "from_config", None) or getattr(model_class, "_from_config", model_class)
    with torch.device("meta"):
        model = build(config)
    return model


def _model_class(config, task: str):
    import transformers
    from transformers.models.auto import modeling_auto

    if task != "auto":
        if task not in TASKS:
            raise invalid("task", task, one_of(["auto", *TASKS]))
        return getattr(transformers, TASKS[task])
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    seq2seq = modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False) and config.model_type in seq2seq:
        return transformers.AutoModelForSeq2SeqLM
    # Encoders (BERT, RoBERTa, ...) also have a causal-LM class; without `architectures`, plan their base model.
    if config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return transformers.AutoModel
    if config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


@dataclass(frozen=True)
class TimelineEntry:
    """The frozen set from `step` on (until the next entry)."""

    step: int
    epoch: float
    frozen: FrozenSet[str]


def plan_timeline(
    layout: ModelLayout, args: FreezeArguments, max_steps: int, num_epochs: float = 1.0, seed: int = 0,
    checkpoints: int = 1000,
) -> List[TimelineEntry]:
    """Run the policy over ``max_steps`` and return one entry per change of the frozen set (the first at step 0).

    The policy is asked at up to `checkpoints` evenly spaced steps; between two that differ, bisection finds the
    exact step of each change (a change undone before the next checkpoint is not seen). A static policy gives one entry.

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, ModelLayout
    >>> from hf_freeze.plan import plan_timeline
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10])
    >>> [entry.step for entry in plan_timeline(layout, FreezeArguments("top", freeze_layers=1), max_steps=100)]
    [0]
    ```
    """
    if max_steps < 1:
        raise invalid("max_steps", max_steps, "a number of training steps >= 1")
    strategy = STRATEGIES.get(args.freeze_strategy)
    dynamic = strategy.dynamic
    # Scores are measured during training: the plan stands in equal ones (the selection then takes the first layers).
    scores = placeholder_scores(layout) if strategy.needs_scores else None

    def at(step: int) -> TimelineEntry:
        epoch = num_epochs * step / max_steps
        progress = TrainingProgress(
            step=step, max_steps=max_steps, epoch=epoch, num_epochs=num_epochs, seed=seed, layer_scores=scores
        )
        return TimelineEntry(step, round(epoch, 4), decide(layout, args, progress).frozen)

    if not dynamic:  # a static policy ignores the progress by definition
        return [at(0)]
    stride = max(1, math.ceil(max_steps / checkpoints))
    steps = list(range(0, max_steps, stride)) + [max_steps]
    entries = [at(0)]
    for step in steps[1:]:
        current = at(step)
        # Every change in (previous step, step]: bisect to the first, then look again after it.
        while current.frozen != entries[-1].frozen:
            low, high = entries[-1].step, current.step
            while high - low > 1:
                middle = (low + high) // 2
                if at(middle).frozen == entries[-1].frozen:
                    low = middle
                else:
                    high = middle
            entries.append(at(high) if high != current.step else current)
    return entries


@dataclass
class FreezePlan:
    """What a policy does to a model, computed without weights: the layout, the timeline, the memory estimates."""

    model_class: str
    layout: ModelLayout
    arguments: FreezeArguments
    timeline: List[TimelineEntry]
    full_memory: MemoryEstimate
    policy_memory: MemoryEstimate
    peak_memory: MemoryEstimate
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return STRATEGIES.get(self.arguments.freeze_strategy).dynamic

    @property
    def frozen(self) -> FrozenSet[str]:
        return self.timeline[0].frozen


def make_plan(
    model,
    arguments: FreezeArguments,
    batch_size: int = 1,
    sequence_length: int = 512,
    precision: str = "fp32",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    max_steps: Optional[int] = None,
    num_epochs: float = 1.0,
    seed: int = 0,
) -> FreezePlan:
    """Discover the blocks of ``model`` (real or on the meta device), run the policy and estimate the memory."""
    from .discovery import discover_layout

    layout = discover_layout(model, arguments.freeze_layer_paths)
    strategy = STRATEGIES.get(arguments.freeze_strategy)
    if strategy.dynamic and not max_steps:
        raise FreezeConfigError(
            f"`freeze_strategy` {arguments.freeze_strategy!r} changes the frozen set during training: give the "
            "number of training steps (--max-steps, or max_steps in the YAML) to see its timeline."
        )
    timeline = plan_timeline(layout, arguments, max_steps or 1, num_epochs, seed)
    shape = ActivationShape.from_config(getattr(model, "config", None), layout)
    settings = dict(
        batch_size=batch_size, sequence_length=sequence_length, precision=precision, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, max_steps=max_steps, num_epochs=num_epochs,
    )
    memory = dict(settings)
    for key in ("max_steps", "num_epochs"):
        memory.pop(key)

    def estimate(frozen) -> MemoryEstimate:
        return estimate_training_memory(layout, frozen, shape, **memory)

    per_entry = [estimate(entry.frozen) for entry in timeline]
    return FreezePlan(
        model_class=type(model).__name__,
        layout=layout,
        arguments=arguments,
        timeline=timeline,
        full_memory=estimate(()),
        # An adaptive policy starts with a probe that trains everything: its steady state is the selection.
        policy_memory=min(per_entry, key=lambda item: item.total) if strategy.needs_scores else per_entry[0],
        peak_memory=max(per_entry, key=lambda item: item.total),
        settings=settings,
    )


def placeholder_scores(layout: ModelLayout) -> Tuple[float, ...]:
    """Equal scores for every layer: what a plan selects from in place of scores measured during training."""
    return (0.0,) * layout.num_layers


def plan_notes(plan: "FreezePlan") -> List[str]:
    """What the user should know about a plan beyond the layout's own notes."""
    notes = list(plan.layout.notes)
    if STRATEGIES.get(plan.arguments.freeze_strategy).needs_scores:
        notes.append(
            f"`freeze_strategy` {plan.arguments.freeze_strategy!r} chooses its layers from scores measured during "
            "training: the timeline shows when each probe runs (every layer trains) and when the selection "
            "applies; which layers it freezes is known only then, so the first layers stand in for them here. "
            "Its peak memory is that of full fine-tuning, reached in every probe; in the 'policy' estimate, after "
            "the selection, gradients and optimizer states hold for any layers of the same size, the activation "
            "saving only when the first layers are chosen."
        )
    return notes


def layer_ranges(indices: List[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    if not indices:
        return "none"
    spans: List[Tuple[int, int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], index)
        else:
            spans.append((index, index))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
