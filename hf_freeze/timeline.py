"""The freezing timeline: every change of the frozen set (step, epoch, frozen blocks, trainable parameters), written
as JSON and drawn as a chart (blocks × steps, frozen vs trainable).

`FreezeCallback` records one for every run and writes ``freeze_timeline.json`` and ``freeze_timeline.png`` into
``args.output_dir``; `simulate_timeline` computes the one a schedule will produce, without a model or a run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

from .layout import ModelLayout
from .policies import TrainingProgress, decide

__all__ = [
    "TIMELINE_JSON",
    "TIMELINE_PNG",
    "FreezeTimeline",
    "describe_change",
    "describe_selection",
    "plot_timeline",
    "simulate_timeline",
]

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
    >>> from hf_freeze.timeline import FreezeTimeline
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

    def restore(
        self, changes: List[Dict[str, Any]], before_step: int, selections: Optional[List[Dict[str, Any]]] = None
    ) -> None:
        """Take over the entries of an interrupted run that precede `before_step` (where the resumed run starts)."""
        self.changes = [dict(entry) for entry in changes if entry["step"] < before_step]
        self.selections = [dict(entry) for entry in selections or [] if entry["step"] < before_step]

    def _describe(self, frozen: Collection[str]) -> Dict[str, Any]:
        frozen = set(frozen)
        frozen_blocks, partial, frozen_layers = [], {}, []
        trainable = 0
        for block in self.layout.blocks:
            frozen_size = sum(size for name, size in zip(block.parameters, block.sizes) if name in frozen)
            trainable += block.num_parameters - frozen_size
            if block.parameters and frozen_size == block.num_parameters:
                frozen_blocks.append(block.name)
                if block.layer_index is not None:
                    frozen_layers.append(block.layer_index)
            elif frozen_size:
                partial[block.name] = round(1 - frozen_size / block.num_parameters, 6)
        total = self.layout.num_parameters
        return {
            "frozen_blocks": frozen_blocks,
            "partial_blocks": partial,
            "frozen_layers": frozen_layers,
            "trainable_params": trainable,
            "trainable_fraction": round(trainable / total, 6) if total else 0.0,
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
            except ImportError:
                png_path = None
        return json_path, png_path


def describe_change(entry: Dict[str, Any], previous: Optional[Dict[str, Any]], layout: ModelLayout) -> str:
    """One log line for a timeline entry: what froze and unfroze since `previous`, and what it left trainable."""
    now, before = entry["frozen_blocks"], set(previous["frozen_blocks"]) if previous else set()
    frozen = [name for name in now if name not in before]
    unfrozen = [name for name in (previous["frozen_blocks"] if previous else []) if name not in set(now)]
    parts = []
    if frozen:
        parts.append(f"froze {_compact(frozen, layout)}")
    if unfrozen:
        parts.append(f"unfroze {_compact(unfrozen, layout)}")
    if not parts:
        parts.append(f"frozen: {_compact(now, layout) if now else 'nothing'}")
    line = (
        f"step {entry['step']} (epoch {entry['epoch']:g}): {'; '.join(parts)} || trainable params: "
        f"{entry['trainable_params']:,} ({100 * entry['trainable_fraction']:.2f}%)"
    )
    if entry.get("released_optimizer_state_bytes"):
        line += f" || released {entry['released_optimizer_state_bytes'] / 2**20:.2f} MiB of optimizer state"
    return line


def describe_selection(selection: Dict[str, Any], layout: ModelLayout, probe: Any = None) -> str:
    """Log lines for an adaptive selection: each layer's score, which layers it froze, and what scoring cost."""
    frozen = set(selection["frozen_layers"])
    if selection["step"] > selection.get("probe_start_step", selection["step"]):
        measured = f"probe of steps {selection['probe_start_step']}-{selection['step'] - 1}"
    else:
        measured = f"weights at step {selection['step']}"
    score = probe.score.name if probe is not None else "score"
    lines = [
        f"adaptive round {selection['round']}: {score} per layer from the {measured}; frozen: "
        f"{_compact([block.name for block in layout.layers if block.layer_index in frozen], layout) or 'nothing'}"
        + (f" ({probe.cost_line()})" if probe is not None else "")
    ]
    for block, value in zip(layout.layers, selection["scores"]):
        lines.append(f"  layer {block.layer_index:>3}  {value:12.6g}  {'frozen' if block.layer_index in frozen else 'trainable'}")
    return "\n".join(lines)


def _compact(block_names: List[str], layout: ModelLayout) -> str:
    """'layers 0-3, 5 + bert.embeddings' rather than eight dotted names."""
    index = {block.name: block.layer_index for block in layout.blocks}
    layers = sorted(index[name] for name in block_names if index.get(name) is not None)
    others = [name for name in block_names if index.get(name) is None]
    runs, start = [], None
    for position, layer in enumerate(layers):
        if start is None:
            start = layer
        if position + 1 == len(layers) or layers[position + 1] != layer + 1:
            runs.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    text = [f"layer{'s' if len(layers) > 1 else ''} {', '.join(runs)}"] if layers else []
    return " + ".join(text + others)


def plot_timeline(data: Dict[str, Any], path: str) -> str:
    """Draw a timeline (the dict `FreezeTimeline.to_dict` returns) as a PNG: blocks × steps, frozen vs trainable.

    Uses matplotlib's Agg canvas directly, so the user's pyplot backend and figures are left alone.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    blocks, changes = data["blocks"], data["changes"]
    if not changes:
        changes = [{"step": 0, "frozen_blocks": [], "partial_blocks": {}, "trainable_fraction": 1.0}]
    edges = [entry["step"] for entry in changes] + [max(data["end_step"], changes[-1]["step"] + 1)]
    # Rows bottom-up in forward order: the input embeddings at the bottom, the head on top.
    frozen_share = np.zeros((len(blocks), len(changes)))
    for column, entry in enumerate(changes):
        frozen_names, partial = set(entry["frozen_blocks"]), entry.get("partial_blocks", {})
        for row, block in enumerate(blocks):
            if block["name"] in frozen_names:
                frozen_share[row, column] = 1.0
            elif block["name"] in partial:
                frozen_share[row, column] = 1.0 - partial[block["name"]]

    frozen_colour, trainable_colour = "#4c72b0", "#f2a541"
    colours = LinearSegmentedColormap.from_list("freeze", [trainable_colour, frozen_colour])
    height = min(16.0, 2.6 + 0.22 * len(blocks))
    figure = Figure(figsize=(10, height + 1.6))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 1, height_ratios=[height, 1.6], hspace=0.08)
    chart = figure.add_subplot(grid[0])
    # Thin white lines mark the changes; past a few dozen columns they would hide the colours.
    lines = dict(edgecolors="white", linewidth=0.3) if len(changes) <= 60 else {}
    chart.pcolormesh(edges, np.arange(len(blocks) + 1), frozen_share, cmap=colours, vmin=0, vmax=1, **lines)
    every = max(1, len(blocks) // 40)
    ticks = list(range(0, len(blocks), every))
    chart.set_yticks([tick + 0.5 for tick in ticks])
    chart.set_yticklabels([_label(blocks[tick]) for tick in ticks], fontsize=8)
    chart.set_xlim(edges[0], edges[-1])
    chart.tick_params(labelbottom=False)
    _draw_selections(chart, data, blocks, edges)
    options = ", ".join(f"{key.removeprefix('freeze_')}={value}" for key, value in data["options"].items() if key != "freeze_strategy")
    chart.set_title(f"hf_freeze timeline: {data['strategy']}" + (f" ({options})" if options else ""), fontsize=10)
    chart.legend(
        handles=[Patch(color=frozen_colour, label="frozen"), Patch(color=trainable_colour, label="trainable")],
        loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
    )

    counts = figure.add_subplot(grid[1], sharex=chart)
    fractions = [100 * entry["trainable_fraction"] for entry in changes]
    counts.step(edges, fractions + fractions[-1:], where="post", color="#333333", linewidth=1.2)
    counts.set_ylabel("trainable %", fontsize=8)
    counts.set_ylim(0, 105)
    counts.set_xlabel("optimizer step", fontsize=9)
    counts.tick_params(labelsize=8)
    released = [(entry["step"], entry.get("released_optimizer_state_bytes", 0) / 2**20) for entry in changes]
    released = [(step, megabytes) for step, megabytes in released if megabytes > 0]
    if released:
        memory = counts.twinx()
        memory.scatter(*zip(*released), color="#c44e52", s=14, zorder=3)
        memory.set_ylabel("optimizer state\nreleased (MiB)", fontsize=8, color="#c44e52")
        memory.tick_params(labelsize=8, colors="#c44e52")
        memory.set_ylim(bottom=0)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _draw_selections(chart, data: Dict[str, Any], blocks: List[Dict[str, Any]], edges: List[int]) -> None:
    """Adaptive policies: a dashed line where each selection was made, and each layer's score in its row."""
    selections = data.get("selections") or []
    if not selections:
        return
    rows = {block["layer_index"]: row for row, block in enumerate(blocks) if block["layer_index"] is not None}
    span = max(1, edges[-1] - edges[0])
    annotate = len(selections) <= 12 and len(rows) <= 40
    for selection in selections:
        step = selection["step"]
        chart.axvline(step, color="#222222", linestyle="--", linewidth=0.8)
        if not annotate:
            continue
        for layer, score in enumerate(selection["scores"]):
            if layer in rows:
                chart.text(step + 0.01 * span, rows[layer] + 0.5, f"{score:.2g}", fontsize=6, va="center", color="#111111")
    chart.text(1.0, -0.02, "dashed: layers selected from scores (numbers: each layer's score)", fontsize=7,
               transform=chart.transAxes, ha="right", va="top")


def _label(block: Dict[str, Any]) -> str:
    name = block["name"] if len(block["name"]) <= 32 else "…" + block["name"][-31:]
    return name if block["layer_index"] is None else f"{name} [{block['layer_index']}]"


def simulate_timeline(
    layout: ModelLayout,
    args,
    max_steps: int,
    steps_per_epoch: Optional[int] = None,
    seed: int = 0,
    layer_scores: Optional[Sequence[float]] = None,
) -> FreezeTimeline:
    """The timeline a policy produces over `max_steps` optimizer steps, computed from the policy alone.

    An adaptive policy selects from `layer_scores` (one per layer) in every round; without them, only its probes
    show (nothing is frozen).

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, ModelLayout
    >>> from hf_freeze.timeline import simulate_timeline
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, head=3)
    >>> args = FreezeArguments(freeze_strategy="progressive", freeze_start=0.5)
    >>> [(entry["step"], entry["frozen_layers"]) for entry in simulate_timeline(layout, args, 8).changes]
    [(0, []), (5, [0]), (6, [0, 1]), (7, [0, 1, 2])]
    ```
    """
    steps_per_epoch = steps_per_epoch or max_steps or 1
    num_epochs = -(-max_steps // steps_per_epoch)
    timeline = FreezeTimeline(layout, args.freeze_strategy, args.freeze_options())
    for step in range(max_steps):
        progress = TrainingProgress(
            step, max_steps, step / steps_per_epoch, float(num_epochs), seed,
            tuple(layer_scores) if layer_scores is not None else None,
        )
        timeline.record(progress, decide(layout, args, progress).frozen)
    return timeline
