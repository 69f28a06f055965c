"""Counts: trainable and total parameters, the `freeze/...` log metrics, the one-line summary, the block table."""

from __future__ import annotations

from typing import Collection, Dict, List, Mapping, Optional, Sequence

from torch import nn

from ..model.layout import LAYER, ModelLayout
from ..policies.row_selection import trainable_row_elements

__all__ = [
    "block_rows", "count_metrics", "format_block_table", "format_part_lines", "freeze_metrics", "model_metrics",
    "part_rows", "summary_line",
]


def count_metrics(trainable: int, total: int) -> Dict[str, float]:
    """The count metrics every report shares."""
    return {
        "freeze/trainable_params": trainable,
        "freeze/total_params": total,
        "freeze/trainable_fraction": round(trainable / total, 6) if total else 0.0,
    }


def model_metrics(model: nn.Module) -> Dict[str, float]:
    """Count metrics read off a model's own `requires_grad` flags (tied weights counted once), for models whose
    blocks were not discovered (a PEFT model, which hf_freeze leaves alone)."""
    parameters = list(model.parameters())
    return count_metrics(sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters))


def block_rows(
    layout: ModelLayout, frozen: Collection[str], trainable_rows: Optional[Mapping[str, Sequence[int]]] = None
) -> List[Dict[str, object]]:
    """One row per block: position, name, kind, layer index, parameter count, state (and the part, on a
    multi-part model). A block with trainable rows of frozen parameters says how many rows train."""
    frozen = set(frozen)
    row_elements = trainable_row_elements(layout, trainable_rows)
    rows = []
    for position, block in enumerate(layout.blocks):
        frozen_count = sum(size for name, size in zip(block.parameters, block.sizes) if name in frozen)
        if frozen_count == 0:
            state = "trainable"
        elif frozen_count == block.num_parameters:
            state = "frozen"
        else:
            state = f"partial ({100 * (block.num_parameters - frozen_count) / block.num_parameters:.1f}% trainable)"
        with_rows = [name for name in block.parameters if name in row_elements]
        if with_rows:
            unit = {name: "experts" if block.kind == "layer" else "rows" for name in with_rows}
            counts = [f"{len(trainable_rows[n]):,}/{layout.row_counts[n]:,} {unit[n]} of {n.rsplit('.', 1)[-1]}" for n in with_rows]
            state += f" except {', '.join(counts)}"
            frozen_count -= sum(row_elements[name] for name in with_rows)
        rows.append(
            {
                "position": position,
                "name": block.name,
                "kind": block.kind,
                "layer": "" if block.layer_index is None else block.layer_index,
                "parameters": block.num_parameters,
                "trainable_parameters": block.num_parameters - frozen_count,
                "state": state,
                **({"part": block.part} if block.part is not None else {}),
            }
        )
    return rows


def freeze_metrics(
    layout: ModelLayout, frozen: Collection[str], trainable_rows: Optional[Mapping[str, Sequence[int]]] = None
) -> Dict[str, float]:
    """The `freeze/...` metrics the callback adds to the Trainer's logs (with trainable rows of frozen parameters:
    `freeze/trainable_rows`, and their elements in `freeze/trainable_row_params`, counted in `trainable_params`).

    Example:

    ```python
    >>> from hf_freeze import ModelLayout
    >>> from hf_freeze.report import freeze_metrics
    >>> freeze_metrics(ModelLayout.from_layer_sizes([10, 10]), {"layers.0.weight"})["freeze/trainable_fraction"]
    0.5
    ```
    """
    sizes = layout.parameter_sizes
    frozen = set(frozen)
    total = sum(sizes.values())
    row_elements = trainable_row_elements(layout, trainable_rows)
    trainable = total - sum(size for name, size in sizes.items() if name in frozen) + sum(row_elements.values())
    metrics = {**count_metrics(trainable, total), "freeze/frozen_layers": len(layout.frozen_layer_indices(frozen))}
    if row_elements:
        metrics["freeze/trainable_rows"] = sum(len(trainable_rows[name]) for name in row_elements)
        metrics["freeze/trainable_row_params"] = sum(row_elements.values())
    for row in part_rows(layout, frozen):  # a multi-part model: what trains in each part
        metrics[f"freeze/trainable_params/{row['part']}"] = row["trainable_parameters"]
    return metrics


def part_rows(layout: ModelLayout, frozen: Collection[str]) -> List[Dict[str, object]]:
    """One row per part of a multi-part model (none for a single-part model): parameters, trainable parameters,
    and frozen layers out of the part's layers.

    Example:

    ```python
    >>> from hf_freeze import Block, ModelLayout
    >>> from hf_freeze.report.metrics import part_rows
    >>> layout = ModelLayout((
    ...     Block("vision.0", "layer", ("vision.0.w",), (4,), None, "vision", part="vision"),
    ...     Block("text.0", "layer", ("text.0.w",), (6,), 0, "text", part="language"),
    ... ), layer_parts=("language",))
    >>> [(row["part"], row["trainable_parameters"], row["frozen_layers"]) for row in part_rows(layout, {"vision.0.w"})]
    [('vision', 0, '1/1'), ('language', 6, '0/1')]
    ```
    """
    frozen = set(frozen)
    rows = []
    for part in layout.parts:
        layers = [block for block in layout.blocks_of_part(part) if block.kind == LAYER]
        frozen_layers = sum(all(name in frozen for name in block.parameters) for block in layers)
        rows.append(
            {
                "part": part,
                "parameters": layout.part_parameters(part),
                "trainable_parameters": layout.part_parameters(part, frozen),
                "frozen_layers": f"{frozen_layers}/{len(layers)}",
            }
        )
    return rows


def summary_line(metrics: Dict[str, float], num_layers: Optional[int] = None) -> str:
    """``trainable params: ... || all params: ... || trainable%: ... || frozen layers: i/n`` from the metrics."""
    line = f"trainable params: {metrics['freeze/trainable_params']:,} || all params: {metrics['freeze/total_params']:,}"
    if num_layers is None:
        return line
    return (
        f"{line} || trainable%: {100 * metrics['freeze/trainable_fraction']:.4f} "
        f"|| frozen layers: {metrics['freeze/frozen_layers']}/{num_layers}"
    )


def format_block_table(
    layout: ModelLayout, frozen: Collection[str], trainable_rows: Optional[Mapping[str, Sequence[int]]] = None,
    columns: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> str:
    """A fixed-width table a person can read in a log; ``columns`` adds columns (``{header: {block name: cell}}``,
    e.g. each block's learning rate)."""
    rows = block_rows(layout, frozen, trainable_rows)
    headers = ["#", "block", "kind", "layer", "params", "state"]
    cells = [
        [str(row["position"]), str(row["name"]), str(row["kind"]), str(row["layer"]), f"{row['parameters']:,}", str(row["state"])]
        for row in rows
    ]
    if layout.parts:  # a multi-part model: say which part each block is in
        headers.append("part")
        for line, row in zip(cells, rows):
            line.append(str(row.get("part", "")))
    for header, cells_of in (columns or {}).items():
        headers.append(header)
        for line, row in zip(cells, rows):
            line.append(cells_of.get(str(row["name"]), ""))
    widths = [max(len(header), *(len(line[i]) for line in cells)) if cells else len(header) for i, header in enumerate(headers)]
    right = {0, 3, 4}

    def render(values: List[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    lines = [render(headers), render(["-" * w for w in widths])] + [render(line) for line in cells]
    return "\n".join(lines)


def format_part_lines(layout: ModelLayout, frozen: Collection[str]) -> List[str]:
    """One line per part of a multi-part model: ``vision: 0 of 303,507,456 parameters train; frozen layers 24/24``."""
    return [
        f"{row['part']}: {row['trainable_parameters']:,} of {row['parameters']:,} parameters train; "
        f"frozen layers {row['frozen_layers']}"
        for row in part_rows(layout, frozen)
    ]
