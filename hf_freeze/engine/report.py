"""The part of `LayerFreezer` that reports: its metrics, the summary line, the per-block table, the log lines of
an application and of each change, the timeline file, and what the add-ons save beside the model. (The freezer's
attributes it reads: ``model``, ``layout``, ``arguments``, ``applier``, ``decision``, ``timeline``, ``probe``,
``add_ons``, ``step_rates``, ``dynamic``.)"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..apply import AppliedChange, save_rows_file
from ..report import applied_lines, format_block_table, freeze_metrics, model_metrics, summary_line, update_lines

__all__ = ["FreezerReport"]


class FreezerReport:
    """What `LayerFreezer` shows and writes; see the module's docstring."""

    def save_add_ons(self, folder: str) -> List[str]:
        """Write what the add-ons keep beside the model under ``folder`` (`freeze_lora`: the peft adapter with the
        trained modules, in ``folder/lora_adapter``, for `PeftModel.from_pretrained`); returns what was written."""
        return [path for path in (add_on.save(folder) for add_on in self.add_ons.values()) if path]

    def save_rows(self, path: str) -> int:
        """Write just the trained rows (of `freeze_trainable_tokens`, `freeze_trainable_experts`, axolotl's row
        ranges) with their row indices to a safetensors file; returns its size in bytes. `merge_rows_file` writes
        them into a base model later."""
        return save_rows_file(self.applier.rows, path, {"base_vocabulary": self.layout.base_vocabulary})

    def metrics(self) -> Dict[str, float]:
        """`freeze/...` metrics measured on the model itself (its `requires_grad` flags), and with learning-rate
        groups ``freeze/lr/<group>``: the rate each group trained at in the last optimizer step (as the Trainer's
        ``learning_rate`` log)."""
        if self.layout is None:
            return model_metrics(self.model)
        metrics = freeze_metrics(self.layout, self.frozen_names(), self.applier.rows.selection())
        if self.applier.rows.attachments:  # what the rows hold (their gradients and optimizer states scale with it)
            metrics["freeze/trainable_row_bytes"] = sum(p.numel() * p.element_size() for p in self.applier.rows.parameters.values())
        for add_on in self.add_ons.values():
            metrics.update(add_on.metrics())
        if self.probe is not None:
            metrics.update(self.probe.metrics())
        metrics.update(self.step_rates)
        return metrics

    def summary(self) -> str:
        return summary_line(self.metrics(), None if self.layout is None else self.layout.num_layers)

    def table(self) -> str:
        if self.layout is None:
            return ""
        return format_block_table(self.layout, self.frozen_names(), self.applier.rows.selection(), self.block_columns())

    def block_columns(self) -> Dict[str, Dict[str, str]]:
        """The add-ons' columns of the per-block table (a block's learning rate, its adapter)."""
        return {header: cells for add_on in self.add_ons.values() for header, cells in add_on.block_columns().items()}

    def report_lines(self, summary: bool = True) -> List[str]:
        """What the user should see once the policy is applied, one log message each: the notes (tied weights,
        weight sharing), the summary line, the per-block table."""
        return applied_lines(
            self.layout, self.decision, self.arguments.freeze_strategy, self.frozen_names(), self.applier.rows.selection(),
            self.metrics() if summary else {}, summary, self.block_columns(),
        )

    def describe_update(self, change: AppliedChange, always: bool = False) -> List[str]:
        """Log lines for the last `update`: the selection an adaptive probe just made, and the change of the
        frozen set (``always``: the current frozen set even when it did not change)."""
        return update_lines(self.layout, self.timeline, self.probe, change.changed or always)

    def write_timeline(self, output_dir: str, end_step: Optional[int] = None) -> None:
        """Write ``freeze_timeline.json`` (and ``.png`` with matplotlib) when the frozen set changes in training."""
        if self.dynamic and output_dir:
            self.timeline.write(output_dir, end_step=end_step)

