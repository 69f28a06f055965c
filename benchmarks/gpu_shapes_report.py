"""`gpu_shapes.py`'s results as JSON and as a markdown table: ratios to full fine-tuning, the plan's estimates."""

from __future__ import annotations

import json
import os
from typing import List, Optional

GIB = 2**30
PLAN_ROWS = [("full", "full fine-tuning (transformers' loss)"), ("bottom50", "bottom 50%, `freeze_chunked_loss=True` (the default on CPU)"),
             ("bottom50_unchunked", "bottom 50%, `freeze_chunked_loss=False`")]


def with_ratios(results: List[dict]) -> List[dict]:
    """Each measured row with its step-time and peak-memory ratios to its baseline row (None where not measured)."""
    by_name = {result["name"]: result for result in results if result["status"] == "ok"}
    rows = []
    for result in results:
        result = dict(result)
        baseline = by_name.get(result["baseline"])
        ok = result["status"] == "ok" and baseline is not None
        result["step_ratio"] = result["step_ms"] / baseline["step_ms"] if ok else None
        peaks = ok and result.get("peak_bytes") and baseline.get("peak_bytes")
        result["peak_ratio"] = result["peak_bytes"] / baseline["peak_bytes"] if peaks else None
        rows.append(result)
    return rows


def write_outputs(report: dict, folder: str) -> List[str]:
    """Write ``gpu_shapes.json`` and ``gpu_shapes.md`` into ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    report = dict(report, results=with_ratios(report["results"]))
    paths = [os.path.join(folder, "gpu_shapes.json"), os.path.join(folder, "gpu_shapes.md")]
    for path, text in zip(paths, (json.dumps(report, indent=1), markdown(report))):
        with open(path + ".partial", "w") as handle:  # a run killed while writing leaves the previous file whole
            handle.write(text)
        os.replace(path + ".partial", path)
    return paths


def markdown(report: dict) -> str:
    settings, versions = report["settings"], report["versions"]
    shape = settings["model_config"]
    installed = ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items())
    commit = f"; hf_freeze {report['hf_freeze_commit']}" if report.get("hf_freeze_commit") else ""
    lines = [
        f"# {settings['shape']} shape: hf_freeze's configurations under the Trainer",
        "",
        f"{report['device']}; {installed}; {report['date']}{commit}.",
        "",
        f"Model: LlamaConfig hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads, intermediate "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}, {'tied' if shape['tie_word_embeddings'] else 'untied'} "
        f"embeddings; random weights. Real `transformers.Trainer`, {settings['precision']}, {settings['optimizer']}, batch "
        f"{settings['batch_size']} x {settings['seq_len']} random tokens. Step: synchronized wall time between step "
        f"starts, median (min-max) of {settings['steps']} steps after {settings['warmup']} warm-up steps. Peak: "
        "`torch.cuda.max_memory_allocated()` (model build included). Ratios are to full fine-tuning; rows with "
        f"activation checkpointing ({settings['checkpointing']}) to full fine-tuning with checkpointing. Plan: "
        "`hf-freeze plan`'s estimate (`hf_freeze/tools/memory.py`).",
        "",
        f"Command: `{report['command']}` ({report.get('wall_time_s', '?')} s in all, imports included).",
        "",
        "| configuration | trainable | step | ratio | peak memory | ratio | plan estimate |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(_row(row))
    for shape_name, estimates in report.get("plans", {}).items():
        lines += ["", f"Plan estimate for the {shape_name} shape (`hf_freeze.tools.plan.make_plan` on the meta device, "
                      f"batch {settings['batch_size']} x {settings['seq_len']}, bf16-mixed, AdamW; not measured):", ""]
        if "error" in estimates:
            lines.append(f"not estimated: {estimates['error']}")
            continue
        lines += ["| configuration | no checkpointing | checkpointing |", "|---|---|---|"]
        lines += [f"| {label} | {gib(estimates.get(key))} | {gib(estimates.get(key + '_ckpt'))} |" for key, label in PLAN_ROWS]
    return "\n".join(lines) + "\n"


def _row(row: dict) -> str:
    if row["status"] != "ok":
        return f"| {row['label']} | {row['status']}: {row['message']} | | | | | |"
    share = row["trainable_params"] / row["total_params"]
    step = f"{row['step_ms']:.1f} ms ({row['step_ms_min']:.1f}-{row['step_ms_max']:.1f})"
    label = row["label"]
    if row.get("selected_layers") is not None:  # an adaptive row: what its probe chose
        label += f"; chose layers {row['selected_layers']} at step {row['selected_at_step']}"
    cells = [label, f"{row['trainable_params'] / 1e6:.1f}M ({share:.0%})", step, _ratio(row["step_ratio"]),
             gib(row.get("peak_bytes")), _ratio(row["peak_ratio"]), gib(row.get("estimate_bytes"))]
    return "| " + " | ".join(cells) + " |"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def gib(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / 2**20:.1f} MiB"  # MiB: the tiny model


# -- the GPU section of docs/performance.md, generated from the committed results --------------------------------


def docs_table(report: dict) -> str:
    """The measured table, with the machine, versions and date above it (the `cuda:table` block)."""
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items() if version)
    lines = [f"{report['device']}; {versions}; {report['date']}; hf_freeze {report.get('hf_freeze_commit', '?')}.", "",
             "| configuration | trainable | step | ratio | peak memory | ratio | plan estimate |",
             "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [_row(row) for row in report["results"]])


def docs_findings(report: dict) -> str:
    """What the table shows, each figure read from it (the `cuda:findings` block)."""
    rows = {row["name"]: row for row in report["results"] if row["status"] == "ok"}

    def ratio(name: str, key: str = "step_ratio") -> str:
        return _ratio(rows[name][key]) if name in rows else "-"

    frozen = rows.get("bottom50_unchunked", {}).get("peak_bytes"), rows.get("bottom50_bf16frozen", {}).get("peak_bytes")
    lines = [
        f"- **The defaults are as fast as freezing by hand**: bottom 50% at {ratio('bottom50')} of full fine-tuning's "
        f"step (by hand {ratio('bottom50_hand')}), and {ratio('bottom50_ckpt')} with activation checkpointing, where "
        f"freezing by hand takes {ratio('bottom50_hand_ckpt')} (the frozen prefix is recomputed and back-propagated "
        "through by hand).",
        f"- **With the user's `use_liger_kernel=True`** hf_freeze leaves Liger's loss alone: {ratio('bottom50_liger')} "
        f"of the step, {ratio('bottom50_liger', 'peak_ratio')} of the peak memory.",
        f"- **The memory lever** (`freeze_chunked_loss: true`, Liger's fused loss): with frozen weights in bf16, "
        f"{ratio('bottom50_bf16frozen_chunked', 'peak_ratio')} of full fine-tuning's peak memory at "
        f"{ratio('bottom50_bf16frozen_chunked')} of its step; on full fine-tuning {ratio('full_chunked')} of the step "
        f"and {ratio('full_chunked', 'peak_ratio')} of the memory.",
    ]
    if all(frozen):
        lines.append(
            f"- **Frozen weights in bf16** (`freeze_frozen_dtype: bfloat16`): {gib(frozen[0])} → {gib(frozen[1])} at "
            f"{ratio('bottom50_bf16frozen')} of the step (unchunked bottom 50%: {ratio('bottom50_unchunked')})."
        )
    return "\n".join(lines)
