"""What the user sees of an applied policy: the log lines once it is applied, and those of each change."""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional

from ..model.layout import ModelLayout
from .lines import describe_change, describe_selection
from .metrics import format_block_table, format_part_lines, summary_line

__all__ = ["applied_lines", "update_lines"]


def applied_lines(
    layout: Optional[ModelLayout], decision: Any, strategy: str, frozen: Collection[str], rows: Dict[str, tuple],
    metrics: Dict[str, float], summary: bool = True, columns: Optional[Dict[str, Dict[str, str]]] = None,
) -> List[str]:
    """One log message each: the notes (tied weights, weight sharing), the summary line (``summary``), the per-block
    table (with the add-ons' ``columns``) and the line by part of a multi-part model."""
    notes = list(layout.notes if layout is not None else ()) + list(decision.notes if decision else ())
    num_layers = None if layout is None else layout.num_layers
    summary_lines = [f"strategy {strategy!r}: {summary_line(metrics, num_layers)}"] if summary else []
    table = "" if layout is None else format_block_table(layout, frozen, rows, columns)
    parts = format_part_lines(layout, frozen) if layout is not None else []
    return notes + summary_lines + ["\n" + table] + (["by part: " + "; ".join(parts)] if parts else [])


def update_lines(layout: ModelLayout, timeline: Any, probe: Any, changed: bool) -> List[str]:
    """The selection an adaptive probe just made, and the last change of the frozen set when ``changed``."""
    lines = []
    if probe is not None and probe.last_selection is not None:
        lines.append(describe_selection(timeline.selections[-1], layout, probe))
    changes = timeline.changes if timeline is not None else []
    if changed and changes:
        lines.append(describe_change(changes[-1], changes[-2] if len(changes) > 1 else None, layout))
    return lines
