"""A plan as a person reads it (`format_plan`) and as JSON (`plan_as_dict`): `hf-freeze plan`'s output."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..report import block_rows, format_block_table, freeze_metrics, layer_ranges, part_rows, summary_line
from .memory import MemoryEstimate, part_memory
from .plan import FreezePlan, plan_notes

__all__ = ["format_plan", "plan_as_dict"]

# A periodic schedule (LISA-like) changes every few steps: the text shows the first and last changes only.
_TIMELINE_LINES = 30


def plan_as_dict(plan: FreezePlan, source: str = "") -> Dict[str, Any]:
    """The plan as JSON-safe data."""
    return {
        "model": source,
        "model_class": plan.model_class,
        "policy": {key: value for key, value in plan.arguments.freeze_options().items() if value is not None},
        "dynamic": plan.dynamic,
        "settings": plan.settings,
        "blocks": block_rows(plan.layout, plan.frozen, plan.trainable_rows),
        "totals": {**freeze_metrics(plan.layout, plan.frozen, plan.trainable_rows),
                   **({"freeze/lora_params": plan.adapter_parameters} if plan.adapter_parameters else {})},
        "trainable_rows": {name: list(rows) for name, rows in plan.trainable_rows.items()},
        "parts": [
            dict(row, memory_full_finetuning=full.as_dict(), memory_policy=policy.as_dict())
            for row, full, policy in _parts(plan)
        ],
        "memory": {
            "full_finetuning": plan.full_memory.as_dict(),
            "policy": plan.policy_memory.as_dict(),
            "policy_peak": plan.peak_memory.as_dict(),
            **({"probe": plan.probe_memory.as_dict(), "after_selection": plan.selection_memory.as_dict()}
               if plan.probe_memory is not None and plan.selection_memory is not None else {}),
        },
        "timeline": [
            {
                "step": entry.step,
                "epoch": round(entry.epoch, 4),
                "frozen_layers": plan.layout.frozen_layer_indices(entry.frozen),
                "trainable_params": freeze_metrics(plan.layout, entry.frozen, plan.trainable_rows)["freeze/trainable_params"],
                "memory": memory.as_dict(),
            }
            for entry, memory in zip(plan.timeline, plan.phase_memory)
        ],
        "notes": plan_notes(plan),
    }


def format_plan(plan: FreezePlan, source: str = "") -> str:
    policy = ", ".join(f"{key}={value!r}" for key, value in plan.arguments.freeze_options().items() if value is not None)
    settings = plan.settings
    lines = [
        f"Model: {plan.model_class} from {source} (built on the meta device: no weights loaded)",
        f"Policy: {policy}",
        "",
        format_block_table(plan.layout, plan.frozen, plan.trainable_rows, plan.columns),
        "",
        summary_line(freeze_metrics(plan.layout, plan.frozen, plan.trainable_rows), plan.layout.num_layers)
        + (f" || LoRA adapter params: {plan.adapter_parameters:,} (trained, with the trainable params)" if plan.adapter_parameters else ""),
    ]
    lines += [f"Note: {note}" for note in plan_notes(plan)]
    lines += ["", *_timeline_lines(plan), ""]
    lines.append(
        f"Estimated training memory per device (batch {settings['batch_size']} x {settings['sequence_length']} tokens, "
        f"{settings['precision']}, {settings['optimizer']}, gradient checkpointing "
        f"{'on' if settings['gradient_checkpointing'] else 'off'}"
        + (", causal-LM loss in chunks (`freeze_chunked_loss`)" if settings.get("chunked_loss") else "") + "):"
    )
    columns = [("full fine-tuning", plan.full_memory), ("policy", plan.policy_memory)]
    if plan.dynamic:
        columns = [columns[0], ("smallest phase", plan.policy_memory), ("largest phase", plan.peak_memory)]
    lines.append(f"  {'':<18}" + "".join(f"{title:>18}" for title, _ in columns))
    for kind in ("weights", "gradients", "optimizer_states", "activations", "total"):
        cells = [_bytes(getattr(estimate, kind)) for _, estimate in columns]
        lines.append(f"  {kind.replace('_', ' '):<18}" + "".join(f"{cell:>18}" for cell in cells))
    full = plan.full_memory.total
    if full and not plan.dynamic:
        lines.append(f"  saved by the policy: {_bytes(full - plan.policy_memory.total)} ({_share(plan.policy_memory, full)})")
    elif full:
        smallest, largest = plan.phase_memory.index(plan.policy_memory), plan.phase_memory.index(plan.peak_memory)
        lines.append(
            f"  saved by the policy: {_bytes(full - plan.policy_memory.total)} ({_share(plan.policy_memory, full)}) "
            f"in its smallest phase (from step {plan.timeline[smallest].step}), {_bytes(full - plan.peak_memory.total)} "
            f"({_share(plan.peak_memory, full)}) in its largest (from step {plan.timeline[largest].step}); the "
            "device must hold the largest. Each phase's total is in the timeline above."
        )
    lines += _probe_lines(plan)
    lines += _part_lines(plan)
    lines.append(
        "  An estimate, not a measurement: no CUDA context, allocator slack or temporary buffers; fused attention "
        "(no stored score matrix) assumed."
    )
    return "\n".join(lines)


def _probe_lines(plan: FreezePlan) -> List[str]:
    """An adaptive policy: what its probes hold against what its selection holds, and which sets the peak."""
    probe, selection = plan.probe_memory, plan.selection_memory
    if probe is None or selection is None:
        return []
    line = (f"  adaptive: each probe {_bytes(probe.total)} ({_ratio(probe, plan.full_memory)} of full fine-tuning; "
            f"optimizer states {_bytes(probe.optimizer_states)}), after the selection {_bytes(selection.total)} "
            f"({_ratio(selection, plan.full_memory)}): ")
    if probe.total > selection.total:
        line += (f"the probe holds {_bytes(probe.total - selection.total)} more than the selection and sets the "
                 "peak (every layer's gradients and activations")
        line += ")." if probe.optimizer_states == 0 else (
            f", and optimizer states for all: `freeze_probe_mode: measure` withholds the probe's steps and holds "
            f"{_bytes(probe.total - probe.optimizer_states)}).")
    else:
        line += "the probe stays within the selection's memory."
    return [line]


def _ratio(estimate, full: MemoryEstimate) -> str:
    return f"{estimate.total / full.total:.2f}" if full.total else "n/a"


def _parts(plan: FreezePlan):
    """(row, full fine-tuning estimate, policy estimate) per part of a multi-part model."""
    memory = {key: plan.settings[key] for key in ("precision", "optimizer")}
    full = part_memory(plan.layout, (), **memory)
    policy = part_memory(plan.layout, plan.frozen, **memory)
    return [(row, full[row["part"]], policy[row["part"]]) for row in part_rows(plan.layout, plan.frozen)]


def _part_lines(plan: FreezePlan) -> List[str]:
    parts = _parts(plan)
    if not parts:
        return []
    lines = [
        "  By part (weights, gradients and optimizer states; activations are not split by part):",
        f"    {'part':<12}{'parameters':>16}{'trainable':>16}{'frozen layers':>15}{'full fine-tuning':>18}{'policy':>12}",
    ]
    for row, full, policy in parts:
        lines.append(
            f"    {row['part']:<12}{row['parameters']:>16,}{row['trainable_parameters']:>16,}{row['frozen_layers']:>15}"
            f"{_bytes(full.total):>18}{_bytes(policy.total):>12}"
        )
    return lines


def _timeline_lines(plan: FreezePlan) -> List[str]:
    if not plan.dynamic:
        return ["Static policy: the frozen set is the same for the whole run."]
    total = plan.layout.num_parameters
    lines = [f"Timeline over {plan.settings['max_steps']} steps ({len(plan.timeline)} frozen sets):"]
    shown = plan.timeline
    if len(shown) > _TIMELINE_LINES:  # periodic schedules (LISA-like) change every few steps
        shown = shown[: _TIMELINE_LINES - 5] + [None] + shown[-5:]
    memory = dict(zip((id(entry) for entry in plan.timeline), plan.phase_memory))
    for entry in shown:
        if entry is None:
            lines.append(f"  ... {len(plan.timeline) - _TIMELINE_LINES} more changes (--json lists them all)")
            continue
        trainable = freeze_metrics(plan.layout, entry.frozen)["freeze/trainable_params"]
        phase = f"; memory {_bytes(memory[id(entry)].total)}" if id(entry) in memory else ""
        lines.append(
            f"  step {entry.step:>7} (epoch {entry.epoch:.2f}): frozen layers "
            f"{layer_ranges(plan.layout.frozen_layer_indices(entry.frozen))}; trainable {trainable:,} "
            f"({100 * trainable / total:.1f}%){phase}"
        )
    return lines


def _share(estimate, full: int) -> str:
    return f"{100 * (full - estimate.total) / full:.1f}%"


def _bytes(value: Optional[int]) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value} B"
