"""Log lines: what changed in the frozen set, what an adaptive selection chose, runs of layer indices."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..model.layout import ModelLayout

__all__ = ["compact_blocks", "describe_change", "describe_selection", "layer_ranges"]


def layer_ranges(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (``"none"`` for no index).

    Example:

    ```python
    >>> from hf_freeze.report import layer_ranges
    >>> layer_ranges([5, 0, 1, 2])
    '0-2, 5'
    ```
    """
    spans: List[Tuple[int, int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], index)
        else:
            spans.append((index, index))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"


def compact_blocks(block_names: List[str], layout: ModelLayout) -> str:
    """'layers 0-3, 5 + bert.embeddings' rather than eight dotted names."""
    index = {block.name: block.layer_index for block in layout.blocks}
    layers = [index[name] for name in block_names if index.get(name) is not None]
    others = [name for name in block_names if index.get(name) is None]
    text = [f"layer{'s' if len(layers) > 1 else ''} {layer_ranges(layers)}"] if layers else []
    return " + ".join(text + others)


def describe_change(entry: Dict[str, Any], previous: Optional[Dict[str, Any]], layout: ModelLayout) -> str:
    """One log line for a timeline entry: what froze and unfroze since `previous`, and what it left trainable."""
    now, before = entry["frozen_blocks"], set(previous["frozen_blocks"]) if previous else set()
    frozen = [name for name in now if name not in before]
    unfrozen = [name for name in (previous["frozen_blocks"] if previous else []) if name not in set(now)]
    parts = []
    if frozen:
        parts.append(f"froze {compact_blocks(frozen, layout)}")
    if unfrozen:
        parts.append(f"unfroze {compact_blocks(unfrozen, layout)}")
    if not parts:
        parts.append(f"frozen: {compact_blocks(now, layout) if now else 'nothing'}")
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
        f"{compact_blocks([block.name for block in layout.layers if block.layer_index in frozen], layout) or 'nothing'}"
        + (f" ({probe.cost_line()})" if probe is not None else "")
    ]
    for block, value in zip(layout.layers, selection["scores"]):
        lines.append(f"  layer {block.layer_index:>3}  {value:12.6g}  {'frozen' if block.layer_index in frozen else 'trainable'}")
    return "\n".join(lines)


