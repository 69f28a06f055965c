"""Turn benchmark results into a markdown table, a list of targets met or missed, and PNG charts."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from configurations import CONFIGURATIONS, MODELS, bottom_limit, issue_bottom_limit

MODES = [("off", "no checkpointing"), ("non_reentrant", "checkpointing (non-reentrant)"), ("reentrant", "checkpointing (reentrant)")]
TIME_TOLERANCE = 1.05
MEMORY_TARGET = 0.70
OVERHEAD_TARGET = 0.01


def _index(results) -> Dict[Tuple[str, str, str], dict]:
    return {(r["model"], r["config"], r["checkpointing"]): r for r in results}


def _ok(result: Optional[dict]) -> bool:
    return bool(result) and result.get("status") == "ok"


def ratios(results) -> Dict[Tuple[str, str, str], dict]:
    """Step-time and memory ratios to full fine-tuning of the same model and checkpointing mode."""
    table = _index(results)
    out = {}
    for (model, config, mode), result in table.items():
        full = table.get((model, "full", mode))
        if not (_ok(result) and _ok(full)):
            continue
        checkpointing = mode != "off"
        limit = CONFIGURATIONS[config].limit(result["frozen_fraction"], checkpointing)
        memory = result["peak_memory"] / full["peak_memory"] if result.get("peak_memory") and full.get("peak_memory") else None
        out[(model, config, mode)] = dict(
            time=result["step_time"] / full["step_time"], limit=limit, memory=memory,
            split_bound=split_bound(full, result["frozen_fraction"]),
        )
    return out


def split_bound(full: dict, frozen_fraction: float) -> Optional[float]:
    """What a perfect bottom-f would cost given the measured split of the full step into forward and the rest.

    The FLOP model assumes the forward pass is 1/3 of the step (1/4 with checkpointing). Freezing a prefix saves
    nothing of the forward pass and the prefix's share of everything after it (backward, recomputation,
    optimizer), so with the forward's measured share p of the full step the best bottom-f can do is
    p + (1 - p)(1 - f).
    """
    if not full.get("forward_time") or not full.get("step_time"):
        return None
    share = full["forward_time"] / full["step_time"]
    return share + (1 - share) * (1 - frozen_fraction)


def _cell_time(result, ratio) -> str:
    if not _ok(result):
        return "n/a" if result else ""
    return f"{result['step_time']:.3f} s ({ratio['time']:.2f})" if ratio else f"{result['step_time']:.3f} s"


def _cell_memory(result, ratio) -> str:
    if not _ok(result) or not result.get("peak_memory"):
        return ""
    text = f"{result['peak_memory'] / 2**20:.0f} MB"
    return f"{text} ({ratio['memory']:.2f})" if ratio and ratio.get("memory") else text


def markdown(results, callback_overhead, settings) -> str:
    table, rat = _index(results), ratios(results)
    modes = [m for m in MODES if any(key[2] == m[0] for key in table)]
    models = [m for m in MODELS if any(key[0] == m for key in table)]
    configs = [c for c in CONFIGURATIONS if any(key[1] == c for key in table)]
    device = next((r["device"] for r in results if _ok(r)), settings.get("device"))
    clock = next((r["clock"] for r in results if _ok(r)), "")
    lines = [
        f"Device: {device}; step time is {clock}. Batch {settings['batch_size']} x {settings['seq_len']} tokens, fp32, AdamW, "
        f"median of {settings['steps']} steps after {settings['warmup']} warm-up steps, each configuration in its "
        f"own process" + (f", {settings['rounds']} rounds (the lowest per-process median is shown)"
                          if settings.get("rounds", 1) > 1 else "")
        + f". Command: `{settings['command']}` ({settings['wall_time_s']} s).",
        "",
        "Cells: step time (ratio to full fine-tuning in the same run); FLOP limit: the FLOP model's ratio "
        "(forward 1, backward 2, recomputation 1; layers only); peak memory (ratio to full fine-tuning).",
    ]
    for model in models:
        lines += ["", f"### {model}: {MODELS[model]['description']}", ""]
        header = ["configuration", "trainable", "frozen layers"]
        for mode, title in modes:
            header += [f"step, {title}", "FLOP limit", "peak memory"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for config in configs:
            first = next((table.get((model, config, mode)) for mode, _ in modes if _ok(table.get((model, config, mode)))), None)
            any_result = next((table.get((model, config, mode)) for mode, _ in modes if table.get((model, config, mode))), None)
            if any_result is None:
                continue
            if first is None:
                reason = any_result.get("message", "")
                lines.append(f"| {CONFIGURATIONS[config].label} | n/a: {reason} |" + " |" * (len(header) - 2))
                continue
            trainable = f"{100 * first['trainable_params'] / first['total_params']:.1f}%"
            frozen = f"{first['frozen_layers']}/{first['num_layers']}" if not CONFIGURATIONS[config].lora else "adapter"
            row = [CONFIGURATIONS[config].label, trainable, frozen]
            for mode, _ in modes:
                result, ratio = table.get((model, config, mode)), rat.get((model, config, mode))
                row += [_cell_time(result, ratio), f"{ratio['limit']:.3f}" if ratio else "", _cell_memory(result, ratio)]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "### Targets", ""] + targets(results, callback_overhead)
    return "\n".join(lines) + "\n"


def targets(results, callback_overhead) -> List[str]:
    table, rat = _index(results), ratios(results)
    lines = []
    models = [m for m in MODELS if any(key[0] == m for key in table)]
    modes = [mode for mode, _ in MODES if any(key[2] == mode for key in table)]

    def verdict(value, bound, lower_is_better=True) -> str:
        if lower_is_better:
            return "met" if value <= bound else f"MISSED by {100 * (value / bound - 1):.1f}%"
        return "met" if value >= bound else f"MISSED by {100 * (1 - value / bound):.1f}%"

    lines.append(f"Bottom-f step time <= {TIME_TOLERANCE} x FLOP limit (measured ratio / limit):")
    for model in models:
        for mode in modes:
            cells = []
            for config in ("bottom25", "bottom50", "bottom75"):
                ratio = rat.get((model, config, mode))
                if ratio:
                    relative = ratio["time"] / ratio["limit"]
                    notes = []
                    if mode != "off":
                        f = table[(model, config, mode)]["frozen_fraction"]
                        notes.append(f"{ratio['time'] / issue_bottom_limit(f, True):.2f} x the issue's formula")
                    if ratio.get("split_bound"):
                        notes.append(f"bound from the measured forward share: {ratio['split_bound']:.3f}")
                    cells.append(f"{config} {ratio['time']:.3f} / {ratio['limit']:.3f} = {relative:.2f} "
                                 f"({'; '.join([verdict(relative, TIME_TOLERANCE)] + notes)})")
            if cells:
                full = table[(model, "full", mode)]
                share = full["forward_time"] / full["step_time"] if full.get("forward_time") else None
                shown = f" (forward = {100 * share:.0f}% of the full step; the FLOP model assumes {100 / (4 if mode != 'off' else 3):.0f}%)" if share else ""
                lines.append(f"- {model}, checkpointing {mode}{shown}: " + "; ".join(cells))
    lines.append(f"\nBottom-50% peak memory <= {MEMORY_TARGET} of full fine-tuning:")
    for model in models:
        cells = [f"{mode} {rat[(model, 'bottom50', mode)]['memory']:.2f} ({verdict(rat[(model, 'bottom50', mode)]['memory'], MEMORY_TARGET)})"
                 for mode in modes if rat.get((model, "bottom50", mode), {}).get("memory")]
        if cells:
            lines.append(f"- {model}: " + "; ".join(cells))
    lines.append("\nBottom-50% faster per step than LoRA r=8 (step-time ratio bottom-50% / LoRA):")
    for model in models:
        cells = []
        for mode in modes:
            bottom, lora = table.get((model, "bottom50", mode)), table.get((model, "lora8", mode))
            if _ok(bottom) and _ok(lora):
                value = bottom["step_time"] / lora["step_time"]
                cells.append(f"{mode} {value:.2f} ({'met' if value < 1 else f'MISSED by {100 * (value - 1):.1f}%'})")
        if cells:
            lines.append(f"- {model}: " + "; ".join(cells))
    if _ok(callback_overhead) or (callback_overhead and "callback_per_step_s" in callback_overhead):
        per_step = callback_overhead["callback_per_step_s"]
        lines.append(
            f"\nCallback overhead <= {100 * OVERHEAD_TARGET:.0f}% of step time: the callback's events "
            f"({1e6 * callback_overhead['callback_events_s']:.0f} us, logging every step) and its "
            f"{callback_overhead['prefix_hook_calls']} forward hooks ({1e6 * callback_overhead['prefix_hooks_s']:.0f} us) "
            f"cost {1e6 * per_step:.0f} us per step:"
        )
        for model in models:
            cells = []
            for mode in modes:
                bottom, hand = table.get((model, "bottom50", mode)), table.get((model, "bottom50_hand", mode))
                if _ok(bottom):
                    share = per_step / bottom["step_time"]
                    text = f"{mode} {100 * share:.3f}% ({verdict(share, OVERHEAD_TARGET)})"
                    if _ok(hand):
                        text += f", end to end bottom-50% with hf_freeze / by hand = {bottom['step_time'] / hand['step_time']:.2f}"
                    cells.append(text)
            if cells:
                lines.append(f"- {model}: " + "; ".join(cells))
    return lines


def charts(results, output: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, rat = _index(results), ratios(results)
    models = [m for m in MODELS if any(key[0] == m for key in table)]
    modes = [m for m in MODES if any(key[2] == m[0] for key in table)]
    configs = [c for c in CONFIGURATIONS if c != "full" and any(key[1] == c for key in table)]
    paths = []
    for quantity, title, filename in (("time", "step time / full fine-tuning", "step_time.png"),
                                      ("memory", "peak memory / full fine-tuning", "peak_memory.png")):
        figure, axes = plt.subplots(len(models), 1, figsize=(10, 2.8 * len(models)), squeeze=False)
        width = 0.8 / len(modes)
        for axis, model in zip(axes[:, 0], models):
            for position, (mode, label) in enumerate(modes):
                xs, ys, limits = [], [], []
                for index, config in enumerate(configs):
                    ratio = rat.get((model, config, mode))
                    if ratio and ratio.get(quantity) is not None:
                        x = index + (position - (len(modes) - 1) / 2) * width
                        xs.append(x)
                        ys.append(ratio[quantity])
                        limits.append(ratio["limit"])
                axis.bar(xs, ys, width=width, label=label)
                if quantity == "time":
                    axis.scatter(xs, limits, marker="_", s=300, color="black", zorder=3,
                                 label="FLOP limit" if position == 0 else None)
            axis.axhline(1.0, color="grey", linewidth=0.8)
            if quantity == "memory":
                axis.axhline(MEMORY_TARGET, color="red", linewidth=0.8, linestyle="--", label=f"target {MEMORY_TARGET}")
            axis.set_xticks(range(len(configs)))
            axis.set_xticklabels([CONFIGURATIONS[c].label.replace(" (", "\n(") for c in configs], fontsize=7)
            axis.set_ylabel(title, fontsize=8)
            axis.set_ylim(0, 1.3)
            axis.set_title(f"{model}: {MODELS[model]['description']}", fontsize=9)
            axis.legend(fontsize=7, loc="upper center", ncol=4, frameon=False)
        figure.tight_layout()
        path = os.path.join(output, filename)
        figure.savefig(path, dpi=80)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(results, callback_overhead, settings, output: str) -> List[str]:
    path = os.path.join(output, "results.md")
    with open(path, "w") as handle:
        handle.write(markdown(results, callback_overhead, settings))
    return [path] + charts(results, output)
