"""The quality study's tables, chart and answer, from its runs (`quality.py --report`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from quality import FULL, chosen_rate

WITHIN = 0.01  # "about as good as full fine-tuning": within 1 accuracy point
CONFIDENCE = 0.95


def paired_difference(runs: List[dict], against: List[dict]) -> Optional[dict]:
    """Dev accuracy minus ``against``'s, seed by seed (same seed: same data order and sample), with the two-sided 95%
    Student t interval of the mean difference; None with fewer than 2 common seeds."""
    other = {run["seed"]: run["dev_accuracy"] for run in against}
    differences = [run["dev_accuracy"] - other[run["seed"]] for run in runs if run["seed"] in other]
    if len(differences) < 2:
        return None
    from scipy import stats

    mean = statistics.fmean(differences)
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(differences) - 1) * statistics.stdev(differences) / len(differences) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(differences)}


def summarise(runs: List[dict], names: List[str]) -> Dict[str, dict]:
    """Per policy: the chosen rate, dev accuracy over the seeds at that rate, and its cost against full fine-tuning."""
    full_runs = _final_runs(runs, FULL)
    full_step = {run["seed"]: run["train_cpu_seconds"] / run["steps"] for run in full_runs}
    full_peak = statistics.fmean(run["peak_training_bytes"] for run in full_runs) if full_runs else None
    table = {}
    for name in names:
        final = _final_runs(runs, name)
        if not final:
            continue
        accuracies = [run["dev_accuracy"] for run in final]
        step_ratios = [run["train_cpu_seconds"] / run["steps"] / full_step[run["seed"]] for run in final
                       if run["seed"] in full_step]
        table[name] = {
            "rate": final[0]["rate"],
            "seeds": len(final),
            "accuracy": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "trainable_share": statistics.fmean(run["trainable_params_mean"] / run["total_params"] for run in final),
            "trainable_params": statistics.fmean(run["trainable_params_mean"] for run in final),
            "step_time_ratio": statistics.fmean(step_ratios) if step_ratios else None,
            "step_time_ratio_range": (min(step_ratios), max(step_ratios)) if step_ratios else None,
            "peak_memory_ratio": (statistics.fmean(run["peak_training_bytes"] for run in final) / full_peak
                                  if full_peak else None),
            "cpu_minutes_all_runs": sum(run["train_cpu_seconds"] for run in runs if run["policy"] == name) / 60,
            "lora_rank": final[0].get("lora_rank"),
            "vs_full": paired_difference(final, full_runs) if name != FULL else None,
        }
    return table


EVAL_MODE = "bottom 50%, frozen prefix in eval mode"
MATCHED = "LoRA, bottom 50%'s size"


def dropout_pairs(runs: List[dict], settings: Optional[dict] = None) -> str:
    """The frozen prefix with dropout (bottom 50%, the default) against in eval mode, seed by seed at bottom 50%'s
    chosen rate: the quality study's setting, the same seeds and data order on both sides."""
    on = {run["seed"]: run for run in _final_runs(runs, "bottom 50%")}
    off = {run["seed"]: run for run in _final_runs(runs, EVAL_MODE)}
    seeds = sorted(set(on) & set(off))
    where = ""
    if settings:
        where = (f"{settings['train_samples']} training sentences, {settings['epochs']} epoch(s), batch "
                 f"{settings['batch_size']}, ")
    lines = [f"Quality study setting (pretrained MiniLM-L6 on SST-2: {where}bottom 50% frozen, learning rate "
             f"{next(iter(on.values()))['rate'] if on else 'not chosen yet'}, the whole dev set); "
             "`python benchmarks/quality.py --report`, runs in `benchmarks/results/quality/runs.jsonl`.", "",
             "| seed | dev accuracy, frozen prefix with dropout | in eval mode | difference |",
             "|---|---|---|---|"]
    for seed in seeds:
        a, b = on[seed], off[seed]
        # No time column: these runs ran at different loads (see the step-time figures of the side-by-side benchmark).
        lines.append(f"| {seed} | {a['dev_accuracy']:.4f} | {b['dev_accuracy']:.4f} | "
                     f"{b['dev_accuracy'] - a['dev_accuracy']:+.4f} |")
    if seeds:
        differences = [off[seed]["dev_accuracy"] - on[seed]["dev_accuracy"] for seed in seeds]
        lines.append(f"| mean of {len(seeds)} | {statistics.fmean(on[s]['dev_accuracy'] for s in seeds):.4f} | "
                     f"{statistics.fmean(off[s]['dev_accuracy'] for s in seeds):.4f} | "
                     f"{statistics.fmean(differences):+.4f} (min {min(differences):+.4f}, max {max(differences):+.4f}) |")
    else:
        lines.append("| no seed measured both ways yet | | | |")
    return "\n".join(lines)


def _final_runs(runs: List[dict], name: str) -> List[dict]:
    rate = chosen_rate(runs, name)
    if rate is None:
        return []
    return sorted((run for run in runs if run["policy"] == name and run["rate"] == rate), key=lambda run: run["seed"])


def _names(names: List[str]) -> str:
    """Policy names joined so that the commas inside some of them stay readable."""
    return "; ".join(names) or "none"


def _points(difference: Optional[dict]) -> str:
    if not difference:
        return "one common seed: no interval yet"
    return (f"{100 * difference['mean']:+.2f} points, 95% interval {100 * difference['low']:+.2f} to "
            f"{100 * difference['high']:+.2f}")


def answer(table: Dict[str, dict], runs: Optional[List[dict]] = None) -> List[str]:
    """'Which should I use?', as far as the numbers carry it."""
    if FULL not in table or len(table) < 2:
        return ["Not enough finished policies to compare yet."]
    full = table[FULL]
    lines = []
    priced = {name: row for name, row in table.items() if row["step_time_ratio"] is not None}
    close = sorted(
        (name for name, row in priced.items() if name != FULL and row["accuracy"] >= full["accuracy"] - WITHIN
         and row["step_time_ratio"] < 1),
        key=lambda name: priced[name]["step_time_ratio"],
    )
    if close:
        best = close[0]
        lines.append(
            f"Cheapest policy within 1 point of full fine-tuning's dev accuracy ({100 * full['accuracy']:.2f}%): "
            f"**{best}**, {100 * priced[best]['accuracy']:.2f}% ({_points(priced[best]['vs_full'])}, seed by seed) "
            f"at {priced[best]['step_time_ratio']:.2f} of its step time and {priced[best]['peak_memory_ratio']:.2f} of "
            f"its peak training memory. Also within 1 point on average, at lower step time: {_names(close[1:])}."
        )
    else:
        lines.append("No policy cheaper than full fine-tuning came within 1 point of its dev accuracy.")
    for cost, label in (("step_time_ratio", "time"), ("peak_memory_ratio", "memory")):
        front = pareto_front(priced, cost)
        lines.append(f"Best accuracy for the {label} (the Pareto front, cheapest first): " + ", ".join(
            f"{name} ({100 * priced[name]['accuracy']:.2f}%, {priced[name][cost]:.2f}x)" for name in front) + ".")
    below = [name for name, row in table.items() if row["vs_full"] and row["vs_full"]["high"] < 0]
    above = [name for name, row in table.items() if row["vs_full"] and row["vs_full"]["low"] > 0]
    unseparated = [name for name, row in table.items()
                   if row["vs_full"] and row["vs_full"]["low"] <= 0 <= row["vs_full"]["high"]]
    single = [name for name, row in table.items() if name != FULL and not row["vs_full"]]
    lines.append(
        "Against full fine-tuning, seed by seed (the 95% interval of the mean difference). Below it: "
        f"{_names(below)}. Above it: {_names(above)}. Not separated from it by these seeds: {_names(unseparated)}."
        + (f" One seed so far: {_names(single)}." if single else "")
    )
    matched, bottom = table.get(MATCHED), table.get("bottom 50%")
    if matched and bottom:
        versus = ""
        if runs is not None:
            pair = paired_difference(_final_runs(runs, "bottom 50%"), _final_runs(runs, MATCHED))
            versus = f" (bottom 50% minus LoRA, seed by seed: {_points(pair)})"
        lines.append(
            f"At equal trainable size, bottom 50% reaches {100 * bottom['accuracy']:.2f}% at "
            f"{bottom['step_time_ratio']:.2f}x step time and {bottom['peak_memory_ratio']:.2f}x peak memory; LoRA of "
            f"rank {matched['lora_rank']} ({matched['trainable_params'] / 1e6:.2f}M trainable parameters) reaches "
            f"{100 * matched['accuracy']:.2f}% at {matched['step_time_ratio']:.2f}x and {matched['peak_memory_ratio']:.2f}x"
            f"{versus}."
        )
    return lines


def pareto_front(table: Dict[str, dict], cost: str) -> List[str]:
    """Policies no other policy beats on both accuracy and ``cost``, cheapest first."""
    ordered = sorted(table, key=lambda name: (table[name][cost], -table[name]["accuracy"]))
    front, best = [], -1.0
    for name in ordered:
        if table[name]["accuracy"] > best:
            front.append(name)
            best = table[name]["accuracy"]
    return front


def markdown(table: Dict[str, dict], settings: dict) -> str:
    lines = [
        "| policy | learning rate | dev accuracy (mean ± std, seeds) | trainable parameters (mean share) | "
        "vs full, points (seed by seed, 95% interval) | step time vs full (range over seeds) | peak training memory vs full "
        "| CPU minutes, all runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(table.items(), key=lambda item: -item[1]["accuracy"]):
        span = row["step_time_ratio_range"]
        step = f"{row['step_time_ratio']:.2f} ({span[0]:.2f}-{span[1]:.2f})" if span else "n/a"
        peak = f"{row['peak_memory_ratio']:.2f}" if row["peak_memory_ratio"] else "n/a"
        label = name + (f" (rank {row['lora_rank']})" if row["lora_rank"] else "")
        versus = row["vs_full"]
        versus = (f"{100 * versus['mean']:+.2f} ({100 * versus['low']:+.2f} to {100 * versus['high']:+.2f})"
                  if versus else ("" if name == FULL else "n/a"))
        lines.append(
            f"| {label} | {row['rate']:g} | {100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} ({row['seeds']}) "
            f"| {row['trainable_params'] / 1e6:.2f}M ({100 * row['trainable_share']:.1f}%) | {versus} | {step} | {peak} "
            f"| {row['cpu_minutes_all_runs']:.1f} |"
        )
    return "\n".join(lines)


def plot(table: Dict[str, dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    priced = {name: row for name, row in table.items() if row["step_time_ratio"] is not None and row["peak_memory_ratio"]}
    if not priced:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for axis, cost, title in ((axes[0], "step_time_ratio", "step time (CPU, one thread)"),
                              (axes[1], "peak_memory_ratio", "peak training memory")):
        front = pareto_front(priced, cost)
        for name, row in priced.items():
            lora = name.startswith("LoRA")
            colour = "black" if name == FULL else ("tab:purple" if lora else "tab:blue")
            axis.errorbar(row[cost], 100 * row["accuracy"], yerr=100 * row["accuracy_std"], fmt="s" if lora else "o",
                          color=colour, markersize=7 if name in front else 5, capsize=3, alpha=1 if name in front else 0.6)
            axis.annotate(name, (row[cost], 100 * row["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        axis.plot([priced[n][cost] for n in front], [100 * priced[n]["accuracy"] for n in front], "--", color="tab:green",
                  label="best accuracy for the cost (Pareto front)")
        axis.axhspan(100 * (priced[FULL]["accuracy"] - WITHIN), 100 * priced[FULL]["accuracy"], color="0.9",
                     label="within 1 point of full fine-tuning") if FULL in priced else None
        axis.set_xlabel(f"{title}, as a fraction of full fine-tuning's (lower is cheaper)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("dev accuracy, % (mean over seeds, bar: ± one standard deviation)")
    figure.suptitle("Which layers should I freeze? Accuracy against cost (up and to the left is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=9)  # below the plots: it hides no point
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def docs_summary(runs: List[dict], settings: dict) -> str:
    """The docs page's block: how far the study is, the table, and the answer as far as the runs carry it."""
    from quality import POLICIES, plan

    names = list(POLICIES)
    table = summarise(runs, names)
    sweep, seeds = plan(runs, names, settings["seeds"])
    complete = [name for name, row in table.items() if row["seeds"] >= settings["seeds"]]
    status = (f"Runs finished: {len(runs)}; still to run: {len(sweep)} learning-rate sweep runs and {len(seeds)} seed "
              f"runs (`python benchmarks/quality.py` resumes). Policies with all {settings['seeds']} seeds: "
              f"{', '.join(complete) or 'none yet'}; with a chosen rate: {len(table)} of {len(names)}; the rest have "
              "not finished their sweep.")
    return "\n".join([status, "", markdown(table, settings), "", *(f"- {line}" for line in answer(table, runs))])


def headline(runs: List[dict], settings: dict) -> str:
    """The short form that the README and the main job's page cite: full fine-tuning, the main job's policy (bottom
    50%), the cheapest policy within 1 point, the step-time Pareto front, and LoRA, as measured over seeds."""
    from quality import POLICIES

    table = summarise(runs, list(POLICIES))
    if FULL not in table:
        return "The quality study has no finished full fine-tuning run yet (`python benchmarks/quality.py`)."
    priced = {name: row for name, row in table.items() if row["step_time_ratio"] is not None}
    close = sorted((name for name, row in priced.items() if name != FULL and row["step_time_ratio"] < 1
                    and row["accuracy"] >= table[FULL]["accuracy"] - WITHIN), key=lambda name: priced[name]["step_time_ratio"])
    wanted = [FULL, "bottom 50%", *close[:1], *pareto_front(priced, "step_time_ratio"), "LoRA r=8", MATCHED]
    shown = [name for name in dict.fromkeys(wanted) if name in table]
    lines = [
        f"Pretrained MiniLM-L6 on GLUE SST-2 ({settings['train_samples']:,} training sentences, {settings['epochs']} "
        f"epoch, the whole dev set), each policy at its own learning rate, {settings['seeds']} seeds "
        f"({len(runs)} runs; `python benchmarks/quality.py --report`):",
        "",
        "| policy | dev accuracy, % (mean ± std, seeds) | vs full, points (95% interval) | step time vs full | "
        "peak memory vs full |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in sorted(shown, key=lambda name: -table[name]["accuracy"]):
        row, versus = table[name], table[name]["vs_full"]
        label = name + (f" (rank {row['lora_rank']})" if row["lora_rank"] else "")
        lines.append(
            f"| {label} | {100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} ({row['seeds']}) | "
            + (f"{100 * versus['mean']:+.2f} ({100 * versus['low']:+.2f} to {100 * versus['high']:+.2f})" if versus
               else ("" if name == FULL else "one seed"))
            + f" | {row['step_time_ratio']:.2f} | {row['peak_memory_ratio']:.2f} |"
        )
    return "\n".join(lines)


def write_report(runs: List[dict], names: List[str], output: Path, settings: dict) -> str:
    table = summarise(runs, names)
    chart = plot(table, output / "quality.png")
    pending = [name for name in names if name not in table]
    text = "\n".join([
        "# Quality study: every policy against full fine-tuning and LoRA",
        "",
        f"Settings: {json.dumps({k: v for k, v in settings.items() if k != 'tokenizer'})}",
        f"Runs finished: {len(runs)}." + (f" Policies not finished yet: {', '.join(pending)}." if pending else ""),
        "",
        markdown(table, settings),
        "",
        *(f"- {line}" for line in answer(table, runs)),
        "",
        f"![accuracy against cost]({chart.name})" if chart else "",
    ])
    (output / "results.md").write_text(text + "\n")
    (output / "summary.json").write_text(json.dumps(table, indent=1))
    return text
