"""The timeline chart: blocks (rows, in forward order) × optimizer steps, frozen vs trainable, with the trainable
share below and, for adaptive policies, each selection and its scores. Needs matplotlib (``pip install
hf_freeze[plot]``)."""

from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["plot_timeline"]


def plot_timeline(data: Dict[str, Any], path: str) -> str:
    """Draw a timeline (the dict `FreezeTimeline.to_dict` returns) as a PNG: blocks × steps, frozen vs trainable.

    Uses matplotlib's Agg canvas directly, so the user's pyplot backend and figures are left alone.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

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
    selection_handles = _draw_selections(chart, data, blocks, edges)
    options = ", ".join(f"{key.removeprefix('freeze_')}={value}" for key, value in data["options"].items() if key != "freeze_strategy")
    chart.set_title(f"hf_freeze timeline: {data['strategy']}" + (f" ({options})" if options else ""), fontsize=10)
    chart.legend(
        handles=[Patch(color=frozen_colour, label="frozen"), Patch(color=trainable_colour, label="trainable")]
        + selection_handles,
        loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
    )

    counts = figure.add_subplot(grid[1], sharex=chart)
    fractions = [100 * entry["trainable_fraction"] for entry in changes]
    counts.step(edges, fractions + fractions[-1:], where="post", color="#333333", linewidth=1.2)
    counts.set_ylabel("trainable %", fontsize=8)
    counts.set_ylim(0, 105)
    counts.set_xlabel("optimizer step", fontsize=9)
    counts.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 2.5 ticks
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


def _draw_selections(chart, data: Dict[str, Any], blocks: List[Dict[str, Any]], edges: List[int]) -> list:
    """Adaptive policies: each probe window shaded and labelled, a dashed line where its selection applies, and each
    layer's score in its row. Returns the legend entries."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    selections = data.get("selections") or []
    if not selections:
        return []
    rows = {block["layer_index"]: row for row, block in enumerate(blocks) if block["layer_index"] is not None}
    span = max(1, edges[-1] - edges[0])
    annotate = len(selections) <= 12 and len(rows) <= 40
    probed = False
    for selection in selections:
        step, start = selection["step"], selection.get("probe_start_step", selection["step"])
        if step > start:  # a probe: every layer was measured (and, with `freeze_probe_mode: train`, trained)
            probed = True
            chart.axvspan(start, step, facecolor="none", edgecolor="#222222", hatch="//", linewidth=0, alpha=0.35)
            if annotate:
                chart.text((start + step) / 2, len(blocks) - 0.1, "probe", ha="center", va="top", fontsize=8)
        chart.axvline(step, color="#222222", linestyle="--", linewidth=0.9)
        if not annotate:
            continue
        for layer, score in enumerate(selection["scores"]):
            if layer in rows:
                chart.text(step + 0.01 * span, rows[layer] + 0.5, f"{score:.2g}", fontsize=8, va="center", color="#111111")
    handles = [Line2D([], [], color="#222222", linestyle="--", label="selection, with\neach layer's score")]
    if probed:
        handles.insert(0, Patch(facecolor="none", edgecolor="#222222", hatch="//", label="probe (all measured)"))
    return handles


def _label(block: Dict[str, Any]) -> str:
    name = block["name"] if len(block["name"]) <= 32 else "…" + block["name"][-31:]
    return name if block["layer_index"] is None else f"{name} [{block['layer_index']}]"
