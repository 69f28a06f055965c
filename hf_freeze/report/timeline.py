"""The freezing timeline: every change of the frozen set (step, epoch, frozen blocks, trainable parameters), and
every adaptive selection, kept as JSON-safe records and written as ``freeze_timeline.json`` (and, with matplotlib,
``freeze_timeline.png``, drawn by `hf_freeze.report.chart`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

from ..model.layout import ModelLayout
from ..policies import TrainingProgress
from ..policies.simulate import frozen_sets_over_training
from .chart import plot_timeline
from .metrics import block_rows, freeze_metrics

__all__ = ["TIMELINE_JSON", "TIMELINE_PNG", "FreezeTimeline", "simulate_timeline"]

TIMELINE_JSON = "freeze_timeline.json"
TIMELINE_PNG = "freeze_timeline.png"
# What a change is made of; step, epoch and optimizer measurements say when and at what cost.
_STATE_KEYS = ("frozen_blocks", "partial_blocks")


class FreezeTimeline:
    """The sequence of frozen sets a run went through, one entry per change.

    Args:
        layout: The model's blocks (entries name them).
        strategy: The `freeze_strategy` value, for the record.
        options: The `freeze_*` options that were set, for the record.

    Example:

    ```python
    >>> from hf_freeze import ModelLayout, TrainingProgress
    >>> from hf_freeze.report import FreezeTimeline
    >>> timeline = FreezeTimeline(ModelLayout.from_layer_sizes([10, 10]), strategy="progressive")
    >>> _ = timeline.record(TrainingProgress(step=0), frozen=[])
    >>> timeline.record(TrainingProgress(step=0), frozen=[]) is None  # no change, no entry
    True
    >>> timeline.record(TrainingProgress(step=5), frozen=["layers.0.weight"])["frozen_layers"]
    [0]
    ```
    """

    def __init__(self, layout: ModelLayout, strategy: str = "", options: Optional[Dict[str, Any]] = None):
        self.layout = layout
        self.strategy = strategy
        self.options = {key: value for key, value in (options or {}).items() if value is not None}
        self.changes: List[Dict[str, Any]] = []
        # Adaptive policies: each selection (step, round, per-layer scores, the layers it froze).
        self.selections: List[Dict[str, Any]] = []
        self.max_steps = 0
        self.num_epochs = 0.0

    def record(
        self,
        progress: TrainingProgress,
        frozen: Collection[str],
        optimizer_state_bytes: Optional[int] = None,
        released_optimizer_state_bytes: Optional[int] = None,
    ) -> Optional[Dict[str, Any]]:
        """Add an entry when `frozen` (parameter names) differs from the last entry; return it, or ``None``."""
        self.max_steps = progress.max_steps or self.max_steps
        self.num_epochs = progress.num_epochs or self.num_epochs
        entry = {"step": int(progress.step), "epoch": round(float(progress.epoch), 6), **self._describe(frozen)}
        if self.changes and all(self.changes[-1][key] == entry[key] for key in _STATE_KEYS):
            return None
        if optimizer_state_bytes is not None:
            entry["optimizer_state_bytes"] = int(optimizer_state_bytes)
            entry["released_optimizer_state_bytes"] = int(released_optimizer_state_bytes or 0)
        self.changes.append(entry)
        return entry

    def record_selection(self, selection: Dict[str, Any]) -> None:
        """Add an adaptive policy's selection: ``step``, ``round``, ``scores`` (one per layer), ``frozen_layers``."""
        self.selections.append(dict(selection))

    def state_dict(self) -> Dict[str, Any]:
        """The entries so far, JSON-safe."""
        return {"changes": [dict(entry) for entry in self.changes], "selections": [dict(entry) for entry in self.selections]}

    def load_state_dict(self, state: Dict[str, Any], before_step: Optional[int] = None) -> None:
        """Take over the entries of an interrupted run (those that precede `before_step`, where the resumed run
        starts, when it is given)."""
        keep = lambda entry: before_step is None or entry["step"] < before_step  # noqa: E731
        self.changes = [dict(entry) for entry in state.get("changes") or [] if keep(entry)]
        self.selections = [dict(entry) for entry in state.get("selections") or [] if keep(entry)]

    def clear(self) -> None:
        self.changes, self.selections = [], []

    def _describe(self, frozen: Collection[str]) -> Dict[str, Any]:
        rows = block_rows(self.layout, frozen)
        metrics = freeze_metrics(self.layout, frozen)
        return {
            "frozen_blocks": [row["name"] for row in rows if row["parameters"] and row["trainable_parameters"] == 0],
            "partial_blocks": {
                row["name"]: round(row["trainable_parameters"] / row["parameters"], 6)
                for row in rows
                if 0 < row["trainable_parameters"] < row["parameters"]
            },
            "frozen_layers": self.layout.frozen_layer_indices(frozen),
            "trainable_params": metrics["freeze/trainable_params"],
            "trainable_fraction": metrics["freeze/trainable_fraction"],
        }

    def to_dict(self, end_step: Optional[int] = None) -> Dict[str, Any]:
        """The JSON-safe record; `end_step` is where the chart ends (default: the run's `max_steps`)."""
        last = self.changes[-1]["step"] if self.changes else 0
        return {
            "strategy": self.strategy,
            "options": self.options,
            "max_steps": self.max_steps,
            "num_epochs": self.num_epochs,
            "end_step": max(end_step if end_step is not None else self.max_steps, last + 1),
            "total_params": self.layout.num_parameters,
            "blocks": [
                {"name": block.name, "kind": block.kind, "layer_index": block.layer_index, "parameters": block.num_parameters}
                for block in self.layout.blocks
            ],
            "changes": [dict(entry) for entry in self.changes],
            **({"selections": [dict(entry) for entry in self.selections]} if self.selections else {}),
        }

    def write(self, output_dir: str, end_step: Optional[int] = None, chart: bool = True) -> Tuple[str, Optional[str]]:
        """Write ``freeze_timeline.json`` (and ``freeze_timeline.png`` when matplotlib is installed) to `output_dir`."""
        os.makedirs(output_dir, exist_ok=True)
        data = self.to_dict(end_step)
        json_path = os.path.join(output_dir, TIMELINE_JSON)
        with open(json_path, "w") as handle:
            json.dump(data, handle, indent=1)
        png_path = None
        if chart:
            try:
                png_path = plot_timeline(data, os.path.join(output_dir, TIMELINE_PNG))
            except ImportError:  # matplotlib is optional
                png_path = None
        return json_path, png_path


def simulate_timeline(
    layout: ModelLayout,
    options,
    max_steps: int,
    steps_per_epoch: Optional[int] = None,
    seed: int = 0,
    layer_scores: Optional[Sequence[float]] = None,
) -> FreezeTimeline:
    """The timeline a policy produces over `max_steps` optimizer steps, computed from the policy alone
    (`hf_freeze.policies.frozen_sets_over_training`), as the record a run writes.

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, ModelLayout
    >>> from hf_freeze.report import simulate_timeline
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, head=3)
    >>> options = FreezeArguments(freeze_strategy="progressive", freeze_start=0.5)
    >>> [(entry["step"], entry["frozen_layers"]) for entry in simulate_timeline(layout, options, 8).changes]
    [(0, []), (5, [0]), (6, [0, 1]), (7, [0, 1, 2])]
    ```
    """
    changes = frozen_sets_over_training(
        layout, options, max_steps, steps_per_epoch=steps_per_epoch or max_steps or 1, seed=seed, layer_scores=layer_scores
    )
    timeline = FreezeTimeline(layout, options.freeze_strategy, options.freeze_options())
    num_epochs = float(-(-max_steps // (steps_per_epoch or max_steps or 1)))
    for change in changes:
        timeline.record(TrainingProgress(change.step, max_steps, change.epoch, num_epochs, seed), change.frozen)
    return timeline
