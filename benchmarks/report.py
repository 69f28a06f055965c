"""Turn benchmark results into a markdown table, a list of targets met or missed, and PNG charts."""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
import sys
from typing import Dict, List, Optional, Tuple

from configurations import BY_HAND_PEER, CONFIGURATIONS, MODELS, bottom_limit, issue_bottom_limit

MODES = [("off", "no checkpointing"), ("non_reentrant", "checkpointing (non-reentrant)"), ("reentrant", "checkpointing (reentrant)")]
TIME_TOLERANCE = 1.05
MEMORY_TARGET = 0.70
MEMORY_TARGET_CHECKPOINTING = 0.60  # issue 21: with the chunked loss
OVERHEAD_TARGET = 0.01


def _index(results) -> Dict[Tuple[str, str, str], dict]:
    return {(r["model"], r["config"], r["checkpointing"]): r for r in results}


def _ok(result: Optional[dict]) -> bool:
    return bool(result) and result.get("status") == "ok"


def repeat_ratios(result: dict, other: dict) -> List[float]:
    """Step-time ratio of two configurations in each side-by-side repeat (they took turns in the same process)."""
    first = result.get("repeat_step_times") or [result["step_time"]]
    second = other.get("repeat_step_times") or [other["step_time"]]
    return [a / b for a, b in zip(first, second)]


def spread(values: List[float]) -> Tuple[float, float, float]:
    """The median and the range (min, max) of per-repeat values."""
    import statistics

    return statistics.median(values), min(values), max(values)


def ratios(results) -> Dict[Tuple[str, str, str], dict]:
    """Step-time ratios (median and min-max over repeats) and memory ratios to full fine-tuning of the same model
    and checkpointing mode."""
    table = _index(results)
    out = {}
    for (model, config, mode), result in table.items():
        full = table.get((model, "full", mode))
        if not (_ok(result) and _ok(full)):
            continue
        checkpointing = mode != "off"
        limit = CONFIGURATIONS[config].limit(result["frozen_fraction"], checkpointing)
        memory = result["peak_memory"] / full["peak_memory"] if result.get("peak_memory") and full.get("peak_memory") else None
        time, low, high = spread(repeat_ratios(result, full))
        out[(model, config, mode)] = dict(
            time=time, time_low=low, time_high=high, limit=limit, memory=memory,
            split_bound=split_bound(full, result["frozen_fraction"]),
        )
    return out


def ratio_text(values: List[float]) -> str:
    """'0.72 (0.71-0.74)': the median over repeats and its spread."""
    middle, low, high = spread(values)
    return f"{middle:.2f} ({low:.2f}-{high:.2f})"


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
    if not ratio:
        return f"{result['step_time']:.3f} s"
    return f"{result['step_time']:.3f} s ({ratio['time']:.2f}, {ratio['time_low']:.2f}-{ratio['time_high']:.2f})"


def _cell_memory(result, ratio) -> str:
    if not _ok(result) or not result.get("peak_memory"):
        return ""
    text = f"{result['peak_memory'] / 2**20:.0f} MB"
    return f"{text} ({ratio['memory']:.2f})" if ratio and ratio.get("memory") else text


def markdown(results, callback_overhead, settings) -> str:
    table = _index(results)
    models = [m for m in MODELS if any(key[0] == m for key in table)]
    lines = [description(results, settings)]
    for model in models:
        lines += ["", f"### {model}: {MODELS[model]['description']}", "", *model_table(results, model)]
    lines += ["", "### Targets and levers", ""] + targets(results, callback_overhead)
    return "\n".join(lines) + "\n"


def description(results, settings) -> str:
    table = _index(results)
    models = [m for m in MODELS if any(key[0] == m for key in table)]
    device = next((r["device"] for r in results if _ok(r)), settings.get("device"))
    clock = next((r["clock"] for r in results if _ok(r)), "")
    return (
        f"Device: {device}; step time is {clock}. Batch {_batches(settings, models)} x {settings['seq_len']} tokens, "
        f"fp32, AdamW. Step time: the configurations of a model ran side by side in one process, taking turns step "
        f"by step; {_repeats(results, models)} (fresh processes, rotated order), each the median of "
        f"{settings['steps']} steps after {settings['warmup']} warm-up steps. Peak memory: one process per "
        f"configuration. Command: `{settings['command']}` ({settings['wall_time_s']} s)."
        + (f" Peak memory measured again, after a change that moved memory: `{settings['memory_command']}`."
           if settings.get("memory_command") else "")
        + "\n\n"
        "Cells: step time, median over repeats (ratio to full fine-tuning: median over repeats, min-max); FLOP limit: "
        "the FLOP model's ratio (forward 1, backward 2, recomputation 1; layers only); peak memory (ratio to full "
        "fine-tuning). The configurations with hf_freeze compute a causal LM's loss in chunks (`freeze_chunked_loss`, "
        "the default) unless the row says otherwise; full fine-tuning, LoRA and freezing by hand use transformers' loss."
    )


def model_table(results, model: str) -> List[str]:
    table, rat = _index(results), ratios(results)
    modes = [m for m in MODES if any(key[2] == m[0] for key in table)]
    configs = [c for c in CONFIGURATIONS if any(key[1] == c for key in table)]
    header = ["configuration", "trainable", "frozen layers"]
    for mode, title in modes:
        header += [f"step, {title}", "FLOP limit", "peak memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
    return lines


def _repeats(results, models) -> str:
    counts = {model: max((len(r.get("repeat_step_times") or [1]) for r in results if r.get("model") == model and _ok(r)),
                         default=0) for model in models}
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} repeats"
    return "repeats: " + ", ".join(f"{model} {count}" for model, count in counts.items())


def _batches(settings, models) -> str:
    sizes = settings.get("batch_sizes") or {}
    shown = sorted({sizes.get(model, settings.get("batch_size")) for model in models} - {None})
    return " / ".join(str(size) for size in shown) or str(settings.get("batch_size"))


def _pair(table, model, mode, first, second) -> Optional[str]:
    """The step-time ratio first / second over the repeats, as 'median (min-max)', or None if either is missing."""
    a, b = table.get((model, first, mode)), table.get((model, second, mode))
    return ratio_text(repeat_ratios(a, b)) if _ok(a) and _ok(b) else None


def _memory_pair(table, model, mode, first, second) -> Optional[str]:
    a, b = table.get((model, first, mode)), table.get((model, second, mode))
    if _ok(a) and _ok(b) and a.get("peak_memory") and b.get("peak_memory"):
        return f"{a['peak_memory'] / b['peak_memory']:.2f}"
    return None


def targets(results, callback_overhead) -> List[str]:
    table, rat = _index(results), ratios(results)
    lines = []
    models = [m for m in MODELS if any(key[0] == m for key in table)]
    modes = [mode for mode, _ in MODES if any(key[2] == mode for key in table)]

    def verdict(value, bound) -> str:
        return "met" if value <= bound else f"MISSED by {100 * (value / bound - 1):.1f}%"

    def each(render) -> None:
        for model in models:
            cells = [cell for cell in (render(model, mode) for mode in modes) if cell]
            if cells:
                lines.append(f"- {model}: " + "; ".join(cells))

    lines.append(f"Bottom-f step time <= {TIME_TOLERANCE} x FLOP limit (ratio to full, median and min-max over repeats, "
                 "/ the limit):")
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
                        notes.append(f"{ratio['time'] / issue_bottom_limit(f, True):.2f} x the estimate (1.5 + 2.5(1 - f)) / 4")
                    if ratio.get("split_bound"):
                        notes.append(f"bound from the measured forward share: {ratio['split_bound']:.3f}")
                    cells.append(f"{config} {ratio['time']:.2f} ({ratio['time_low']:.2f}-{ratio['time_high']:.2f}) / "
                                 f"{ratio['limit']:.3f} = {relative:.2f} ({'; '.join([verdict(relative, TIME_TOLERANCE)] + notes)})")
            if cells:
                full = table[(model, "full", mode)]
                share = full["forward_time"] / full["step_time"] if full.get("forward_time") else None
                shown = f" (forward = {100 * share:.0f}% of the full step; the FLOP model assumes {100 / (4 if mode != 'off' else 3):.0f}%)" if share else ""
                lines.append(f"- {model}, checkpointing {mode}{shown}: " + "; ".join(cells))

    lines.append(f"\nBottom-50% peak memory <= {MEMORY_TARGET} of full fine-tuning (with checkpointing: <= "
                 f"{MEMORY_TARGET_CHECKPOINTING}); with hf_freeze's chunked loss, with transformers' loss "
                 "(`freeze_chunked_loss: false`), and against full fine-tuning with the chunked loss too:")

    def memory(model, mode):
        value = rat.get((model, "bottom50", mode), {}).get("memory")
        if value is None:
            return None
        bound = MEMORY_TARGET_CHECKPOINTING if mode != "off" else MEMORY_TARGET
        text = f"{mode} {value:.2f} ({verdict(value, bound)})"
        unchunked = _memory_pair(table, model, mode, "bottom50_unchunked", "full")
        against_chunked = _memory_pair(table, model, mode, "bottom50", "full_chunked")
        if unchunked:
            text += f", unchunked {unchunked}"
        if against_chunked:
            text += f", against full with the chunked loss {against_chunked}"
        return text

    each(memory)
    lines.append("\nThe chunked loss (`freeze_chunked_loss`), against transformers' loss: step time (median, min-max "
                 "over repeats) and peak memory:")
    each(lambda model, mode: (
        f"{mode}: full fine-tuning time {_pair(table, model, mode, 'full_chunked', 'full')}, memory "
        f"{_memory_pair(table, model, mode, 'full_chunked', 'full')}; bottom 50% time "
        f"{_pair(table, model, mode, 'bottom50', 'bottom50_unchunked')}, memory "
        f"{_memory_pair(table, model, mode, 'bottom50', 'bottom50_unchunked')}"
    ) if _pair(table, model, mode, "full_chunked", "full") else None)
    lines.append("\nFrozen modules in eval mode (`freeze_frozen_modules_eval`: no dropout in the frozen prefix), against "
                 "dropout on: bottom-50% step time (median, min-max over repeats):")
    each(lambda model, mode: f"{mode} {_pair(table, model, mode, 'bottom50_eval', 'bottom50')}"
         if _pair(table, model, mode, "bottom50_eval", "bottom50") else None)
    lines.append("\nBottom-50% faster per step than LoRA r=8 (step-time ratio bottom-50% / LoRA, median and min-max "
                 "over repeats):")
    each(lambda model, mode: f"{mode} {_pair(table, model, mode, 'bottom50', 'lora8')}"
         if _pair(table, model, mode, "bottom50", "lora8") else None)
    lines.append("\nThe checkpointing waste: bottom-50% by hand and with hf_freeze (the same loss on both sides), "
                 "step-time ratio to full fine-tuning, and hf_freeze / by hand:")

    def waste(model, mode):
        peer = BY_HAND_PEER[MODELS[model]["kind"]]
        if not (_pair(table, model, mode, "bottom50_hand", "full") and _pair(table, model, mode, peer, "full")):
            return None
        return (f"{mode}: by hand {_pair(table, model, mode, 'bottom50_hand', 'full')}, hf_freeze "
                f"{_pair(table, model, mode, peer, 'full')}, hf_freeze / by hand {_pair(table, model, mode, peer, 'bottom50_hand')}")

    each(waste)
    if callback_overhead and "callback_per_step_s" in callback_overhead:
        per_step = callback_overhead["callback_per_step_s"]
        lines.append(
            f"\nCallback overhead <= {100 * OVERHEAD_TARGET:.0f}% of step time: the callback's events "
            f"({1e6 * callback_overhead['callback_events_s']:.0f} us, logging every step) and its "
            f"{callback_overhead['prefix_hook_calls']} forward hooks ({1e6 * callback_overhead['prefix_hooks_s']:.0f} us) "
            f"cost {1e6 * per_step:.0f} us per step, as a share of bottom-50%'s step:"
        )
        each(lambda model, mode: (
            f"{mode} {100 * per_step / table[(model, 'bottom50', mode)]['step_time']:.3f}% "
            f"({verdict(per_step / table[(model, 'bottom50', mode)]['step_time'], OVERHEAD_TARGET)})"
        ) if _ok(table.get((model, "bottom50", mode))) else None)
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


# -- the figures in docs/performance.md, generated from the committed results -----------------------------------------
#
# A block in the docs page reads `<!-- benchmark SOURCE:KIND [MODEL] -->`, then the generated text, then
# `<!-- /benchmark -->`. `python benchmarks/report.py --docs docs/performance.md` rewrites every block from the
# results files; the test suite checks that the page matches them (tests/test_performance_docs.py).

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DOCS_SOURCES = {"main": "", "minilm": "minilm", "vocab128k": "vocab128k", "reentrant": "reentrant", "cuda": "cuda", "dropout": "frozen_dropout", "quality": "quality"}
_BLOCK = re.compile(r"<!-- benchmark (\w+):(\w+)(?: (\w+))? -->\n.*?<!-- /benchmark -->", re.DOTALL)


def render_block(source: str, kind: str, argument: Optional[str], root: str = RESULTS) -> str:
    if source == "quality":  # the quality study keeps its runs, not a results.json
        from quality import read_runs
        from quality_report import beyond_pairs, docs_summary, dropout_pairs, headline, read_timing

        folder = Path(root, DOCS_SOURCES[source])
        runs, settings = read_runs(folder / "runs.jsonl"), json.loads((folder / "settings.json").read_text())
        if kind == "dropout":
            return dropout_pairs(runs, settings)
        if kind == "table":
            return docs_summary(runs, settings, read_timing(folder))
        if kind == "headline":
            return headline(runs, settings, read_timing(folder))
        if kind == "beyond":
            return beyond_pairs(runs)
        raise KeyError(f"unknown quality block kind {kind!r}; valid: table, headline, dropout, beyond")
    if source == "cuda":  # the GPU benchmark (`gpu_shapes.py`) keeps its own file
        from gpu_shapes_report import docs_findings, docs_table

        gpu = json.loads(Path(root, DOCS_SOURCES[source], "gpu_shapes.json").read_text())
        if kind == "table":
            return docs_table(gpu)
        if kind == "findings":
            return docs_findings(gpu)
        raise KeyError(f"unknown cuda block kind {kind!r}; valid: table, findings")
    with open(os.path.join(root, DOCS_SOURCES[source], "results.json")) as handle:
        saved = json.load(handle)
    if source == "dropout":
        import argparse

        from frozen_dropout import report as dropout_report

        return dropout_report(saved["runs"], argparse.Namespace(**saved["settings"]), saved["command"]).rstrip("\n")
    results, overhead, settings = saved["results"], saved["callback_overhead"], saved["settings"]
    if kind == "description":
        return description(results, settings)
    if kind == "table":
        return "\n".join(model_table(results, argument))
    if kind == "targets":
        return "\n".join(targets(results, overhead)).strip("\n")
    raise KeyError(f"unknown benchmark block kind {kind!r}; valid: description, table, targets")


def render_docs(text: str, root: str = RESULTS) -> str:
    """The page with every benchmark block regenerated from the results files."""

    def replace(match):
        source, kind, argument = match.groups()
        head = f"<!-- benchmark {source}:{kind}{' ' + argument if argument else ''} -->"
        return f"{head}\n{render_block(source, kind, argument, root)}\n<!-- /benchmark -->"

    return _BLOCK.sub(replace, text)


def count_blocks(text: str) -> int:
    return len(_BLOCK.findall(text))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate (or check) the benchmark figures of a docs page.")
    parser.add_argument("--docs", required=True, help="The Markdown page, e.g. docs/performance.md.")
    parser.add_argument("--check", action="store_true", help="Exit 1 when the page differs from the results.")
    options = parser.parse_args()
    with open(options.docs) as handle:
        current = handle.read()
    rendered = render_docs(current)
    if options.check:
        sys.exit(0 if rendered == current else 1)
    with open(options.docs, "w") as handle:
        handle.write(rendered)
    print(f"{options.docs}: {count_blocks(rendered)} benchmark blocks regenerated")
