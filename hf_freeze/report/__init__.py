"""Reporting: counts and `freeze/...` metrics, the per-block table, log lines, the timeline record and its chart."""

from .applied import applied_lines, update_lines
from .chart import plot_timeline
from .lines import compact_blocks, describe_change, describe_selection, layer_ranges
from .metrics import (
    block_rows,
    count_metrics,
    format_block_table,
    format_part_lines,
    freeze_metrics,
    model_metrics,
    part_rows,
    summary_line,
)
from .timeline import TIMELINE_JSON, TIMELINE_PNG, FreezeTimeline, simulate_timeline


__all__ = [
    "TIMELINE_JSON",
    "TIMELINE_PNG",
    "FreezeTimeline",
    "applied_lines",
    "block_rows",
    "compact_blocks",
    "count_metrics",
    "describe_change",
    "describe_selection",
    "format_block_table",
    "format_part_lines",
    "freeze_metrics",
    "layer_ranges",
    "model_metrics",
    "part_rows",
    "plot_timeline",
    "simulate_timeline",
    "summary_line",
    "update_lines",
]
