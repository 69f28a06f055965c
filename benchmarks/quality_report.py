"""The quality study's tables, chart and answer, from its runs (`quality.py --report`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from quality import FULL, LLRD, MIX, chosen_rate

WITHIN = 0.01  # "about as good as full fine-tuning": within 1 accuracy point
CONFIDENCE = 0.95


def paired_difference(runs: List[dict], against: List[dict]) -> Optional[dict]:
    """Dev accuracy minus ``against``'s, seed by seed (same seed: same data order and sample), with the two-sided 95%
    Student t interval of the mean difference; None with fewer than 2 common seeds.

    An accuracy on n dev examples moves in steps of 1/n, so a few seeds can differ by the very same step (one
    sentence each) and give a standard deviation of 0: an interval of no width, which would separate a difference of
    one sentence from zero. Where the runs record their dev set's size (`dev_examples`), the standard deviation is
    taken as at least one such step (``floored``: it was); this only ever widens the interval."""
    other = {run["seed"]: run for run in against}
    pairs = [(run, other[run["seed"]]) for run in runs if run["seed"] in other]
    differences = [run["dev_accuracy"] - paired["dev_accuracy"] for run, paired in pairs]
    if len(differences) < 2:
        return None
    from scipy import stats

    mean = statistics.fmean(differences)
    spread = statistics.stdev(differences)
    sizes = [run.get("dev_examples") for pair in pairs for run in pair]
    step = 1 / min(sizes) if all(sizes) else 0.0
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(differences) - 1) * max(spread, step) / len(differences) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(differences), "floored": spread < step}


def read_timing(folder: Path) -> Optional[dict]:
    """The side-by-side step times of `quality.py --timing`, if that ran."""
    path = Path(folder) / "timing.json"
    return json.loads(path.read_text()) if path.exists() else None


def side_by_side_ratios(timing: Optional[dict]) -> Dict[str, dict]:
    """From `quality.py --timing`: each policy's mean step time / full fine-tuning's over the same steps (its whole
    run for a schedule or an adaptive policy, the first steps for a static one), measured taking turns; the range is
    that ratio in each quarter of those steps (a schedule's cost moves between quarters)."""
    if not timing or FULL not in timing["policies"]:
        return {}
    ratios = {}
    for name, measured in timing["policies"].items():
        full = measured.get("full_step_times", timing["policies"][FULL]["step_times"])  # its own session's yardstick
        times = measured["step_times"][:len(full)]
        same = full[:len(times)]
        quarters = [_quarter(times, q) / _quarter(same, q) for q in range(4)] if len(times) >= 4 else []
        ratios[name] = {"ratio": sum(times) / sum(same), "steps": len(times),
                        "range": (min(quarters), max(quarters)) if quarters else None, "rate": measured["rate"]}
    return ratios


def timing_sessions(timing: Optional[dict]) -> str:
    """Which `--timing` session each policy's step-time ratio comes from (`--policies` sessions add up in one file,
    each policy against the full fine-tuning run that took turns with it), as a sentence."""
    if not timing:
        return ""
    sessions: Dict[tuple, List[str]] = {}
    for name, measured in timing["policies"].items():
        if name != FULL:
            sessions.setdefault((tuple(measured["order"]), round(measured["wall_minutes"], 1)), []).append(name)
    if len(sessions) < 2:
        return ""
    parts = [f"{_names(names)} (a session of {len(order)} policies, {minutes:.0f} min)"
             for (order, minutes), names in sorted(sessions.items(), key=lambda item: -len(item[0][0]))]
    return ("The step-time ratios come from " + str(len(sessions)) + " side-by-side sessions, each policy against the "
            "full fine-tuning run that took turns with it in its own session: " + "; ".join(parts) + ".")


def _quarter(times: List[float], index: int) -> float:
    part = times[index * len(times) // 4:(index + 1) * len(times) // 4]
    return sum(part) / len(part)


def _full_step_times(runs: List[dict]) -> List[float]:
    """Full fine-tuning's CPU seconds per step in each of its runs (its cost does not depend on its learning rate)."""
    return [run["train_cpu_seconds"] / run["steps"] for run in runs if run["policy"] == FULL]


def summarise(runs: List[dict], names: List[str], timing: Optional[dict] = None) -> Dict[str, dict]:
    """Per policy: the chosen rate, dev accuracy over the seeds at that rate, and its cost against full fine-tuning
    (step time from the side-by-side timing where there is one for the policy at its chosen rate)."""
    turns = side_by_side_ratios(timing)
    full_runs = _final_runs(runs, FULL)
    # The median over all of full fine-tuning's runs (sweep and seeds, made at different times and loads) is the
    # steadiest yardstick.
    full_steps = _full_step_times(runs)
    full_step = statistics.median(full_steps) if full_steps else None
    full_peak = statistics.fmean(run["peak_training_bytes"] for run in full_runs) if full_runs else None
    table = {}
    for name in names:
        final = _final_runs(runs, name)
        if not final:
            continue
        accuracies = [run["dev_accuracy"] for run in final]
        step_ratios = [run["train_cpu_seconds"] / run["steps"] / full_step for run in final] if full_step else []
        table[name] = {
            "rate": final[0]["rate"],
            "seeds": len(final),
            "accuracy": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "trainable_share": statistics.fmean(run["trainable_params_mean"] / run["total_params"] for run in final),
            "trainable_params": statistics.fmean(run["trainable_params_mean"] for run in final),
            "step_time_ratio": statistics.median(step_ratios) if step_ratios else None,
            "step_time_ratio_range": (min(step_ratios), max(step_ratios)) if step_ratios else None,
            "step_time_source": "runs",
            "peak_memory_ratio": (statistics.fmean(run["peak_training_bytes"] for run in final) / full_peak
                                  if full_peak else None),
            "cpu_minutes_per_run": statistics.fmean(run["train_cpu_seconds"] for run in final) / 60,
            "cpu_minutes_all_runs": sum(run["train_cpu_seconds"] for run in runs if run["policy"] == name) / 60,
            "lora_rank": final[0].get("lora_rank"),
            "vs_full": paired_difference(final, full_runs) if name != FULL else None,
        }
        side = turns.get(name)
        if side and side["rate"] == table[name]["rate"]:
            table[name].update(step_time_ratio=side["ratio"], step_time_ratio_range=side["range"],
                               step_time_source="side by side")
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


BEYOND = (LLRD, MIX)  # issue 30's rows: a learning rate per layer, and freeze + LoRA in one policy
MIX_PARTS = ("bottom 50%", "LoRA r=8")  # what the mix combines, each measured alone


def beyond_pairs(runs: List[dict]) -> str:
    """Issue 30's two rows against full fine-tuning, seed by seed (same seed: same data order and sample), each at
    its own chosen rate, with the mix's two parts alone beside them; dev accuracy in %."""
    names = [FULL, *BEYOND, *MIX_PARTS]
    final = {name: {run["seed"]: run for run in _final_runs(runs, name)} for name in names}
    rate = {name: (f"{next(iter(final[name].values()))['rate']:g}" if final[name] else "not chosen yet") for name in names}
    lines = [
        "Dev accuracy, %, each policy at its own learning rate (in brackets), seed by seed; the differences are "
        "against full fine-tuning's run with the same seed; `python benchmarks/quality.py --report`, runs in "
        "`benchmarks/results/quality/runs.jsonl`.",
        "",
        f"| seed | {FULL} ({rate[FULL]}) | {LLRD} ({rate[LLRD]}) | minus full | {MIX} ({rate[MIX]}) | minus full | "
        f"{MIX_PARTS[0]} ({rate[MIX_PARTS[0]]}) | {MIX_PARTS[1]} ({rate[MIX_PARTS[1]]}) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(name: str, seed: int) -> str:
        run = final[name].get(seed)
        return f"{100 * run['dev_accuracy']:.2f}" if run else "–"

    def difference(name: str, seed: int) -> str:
        run, full = final[name].get(seed), final[FULL].get(seed)
        return f"{100 * (run['dev_accuracy'] - full['dev_accuracy']):+.2f}" if run and full else "–"

    seeds = sorted({seed for runs_of in final.values() for seed in runs_of})
    for seed in seeds:
        lines.append(f"| {seed} | {cell(FULL, seed)} | {cell(LLRD, seed)} | {difference(LLRD, seed)} | {cell(MIX, seed)} | "
                     f"{difference(MIX, seed)} | {cell(MIX_PARTS[0], seed)} | {cell(MIX_PARTS[1], seed)} |")

    def mean(name: str) -> str:
        values = [run["dev_accuracy"] for run in final[name].values()]
        return f"{100 * statistics.fmean(values):.2f}" if values else "–"

    def interval(name: str) -> str:
        versus = paired_difference(list(final[name].values()), list(final[FULL].values()))
        if not versus:
            return "–"
        return f"{100 * versus['mean']:+.2f} ({100 * versus['low']:+.2f} to {100 * versus['high']:+.2f})"

    lines.append(f"| mean (95% interval of the difference) | {mean(FULL)} | {mean(LLRD)} | {interval(LLRD)} | {mean(MIX)} | "
                 f"{interval(MIX)} | {mean(MIX_PARTS[0])} | {mean(MIX_PARTS[1])} |")
    return "\n".join(lines)


def _beyond_lines(table: Dict[str, dict], runs: Optional[List[dict]]) -> List[str]:
    """The answer's lines on issue 30's rows: layer-wise decay against full fine-tuning, and the mix against full
    fine-tuning and against each of its parts, seed by seed."""
    lines = []
    full = table[FULL]
    llrd, mix = table.get(LLRD), table.get(MIX)
    if llrd and llrd["step_time_ratio"] is not None:
        lines.append(
            f"Layer-wise learning-rate decay 0.8 over every layer, nothing frozen (top rate {llrd['rate']:g}): "
            f"{100 * llrd['accuracy']:.2f}% against full fine-tuning's {100 * full['accuracy']:.2f}% "
            f"({_points(llrd['vs_full'])}, seed by seed) at {llrd['step_time_ratio']:.2f}x step time and "
            f"{llrd['peak_memory_ratio']:.2f}x peak memory (every parameter trains).")
    if mix and mix["step_time_ratio"] is not None:
        parts = []
        if runs is not None:
            for part in MIX_PARTS:
                if part in table:
                    pair = paired_difference(_final_runs(runs, MIX), _final_runs(runs, part))
                    parts.append(f"minus {part} alone ({100 * table[part]['accuracy']:.2f}%, "
                                 f"{table[part]['step_time_ratio']:.2f}x, {table[part]['peak_memory_ratio']:.2f}x): "
                                 f"{_points(pair)}")
        lines.append(
            f"Freeze + LoRA, bottom 50% with LoRA r=8 on the frozen half ({mix['trainable_params'] / 1e6:.2f}M "
            f"trainable parameters, rate {mix['rate']:g}): {100 * mix['accuracy']:.2f}% ({_points(mix['vs_full'])} "
            f"against full fine-tuning) at {mix['step_time_ratio']:.2f}x step time and {mix['peak_memory_ratio']:.2f}x "
            "peak memory" + (f"; seed by seed, the mix {'; '.join(parts)}" if parts else "") + ".")
    return lines


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


def _priced(table: Dict[str, dict]) -> Dict[str, dict]:
    return {name: row for name, row in table.items() if row["step_time_ratio"] is not None}


def _within_one_point(table: Dict[str, dict]) -> List[str]:
    """Policies cheaper in step time than full fine-tuning whose mean accuracy is within 1 point of it, cheapest first."""
    priced = _priced(table)
    return sorted((name for name, row in priced.items() if name != FULL and row["step_time_ratio"] < 1
                   and row["accuracy"] >= table[FULL]["accuracy"] - WITHIN), key=lambda name: priced[name]["step_time_ratio"])


def _label(name: str, row: dict) -> str:
    return name + (f" (rank {row['lora_rank']})" if row["lora_rank"] else "")


def _versus_cell(name: str, row: dict, missing: str) -> str:
    """The seed-by-seed difference from full fine-tuning with its interval, in points, for a table cell."""
    versus = row["vs_full"]
    if not versus:
        return "" if name == FULL else missing
    return f"{100 * versus['mean']:+.2f} ({100 * versus['low']:+.2f} to {100 * versus['high']:+.2f})"


def answer(table: Dict[str, dict], runs: Optional[List[dict]] = None) -> List[str]:
    """'Which should I use?', as far as the numbers carry it."""
    if FULL not in table or len(table) < 2:
        return ["Not enough finished policies to compare yet."]
    full = table[FULL]
    lines = []
    priced = _priced(table)
    close = _within_one_point(table)
    if close:
        best = close[0]
        lines.append(
            f"Cheapest policy within 1 point of full fine-tuning's dev accuracy ({100 * full['accuracy']:.2f}%): "
            f"**{best}**, {100 * priced[best]['accuracy']:.2f}% ({_points(priced[best]['vs_full'])}, seed by seed"
            + ("; below full fine-tuning by these seeds, though within the point on average"
               if priced[best]["vs_full"] and priced[best]["vs_full"]["high"] < 0 else "") + ") "
            f"at {priced[best]['step_time_ratio']:.2f} of its step time and {priced[best]['peak_memory_ratio']:.2f} of "
            f"its peak training memory. Also within 1 point on average, at lower step time: {_names(close[1:])}."
        )
    else:
        lines.append("No policy cheaper than full fine-tuning came within 1 point of its dev accuracy.")
    kept = sorted((name for name, row in priced.items() if row["vs_full"] and row["vs_full"]["high"] >= 0
                   and row["step_time_ratio"] < 1), key=lambda name: priced[name]["step_time_ratio"])
    if kept:
        row = priced[kept[0]]
        lines.append(
            f"Cheapest policy that these seeds do not separate from full fine-tuning (the interval reaches zero): "
            f"**{kept[0]}**, {100 * row['accuracy']:.2f}% ({_points(row['vs_full'])}) at {row['step_time_ratio']:.2f} of "
            f"its step time and {row['peak_memory_ratio']:.2f} of its peak training memory.")
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
    return lines + _beyond_lines(table, runs)


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
    sources = {row["step_time_source"] for row in table.values()}
    step_header = {
        frozenset({"runs"}): "step time vs full (median over seeds; range)",
        frozenset({"side by side"}): "step time vs full (side by side; range over the quarters of the timed steps)",
    }.get(frozenset(sources), "step time vs full (side by side; range over the quarters of the timed steps; * from "
                               "the runs: median over seeds, range)")
    lines = [
        "| policy | learning rate | dev accuracy (mean ± std, seeds) | trainable parameters (mean share) | "
        f"vs full, points (seed by seed, 95% interval) | {step_header} | peak training memory vs full "
        "| training CPU minutes per run (all its runs, sweep included) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(table.items(), key=lambda item: -item[1]["accuracy"]):
        span = row["step_time_ratio_range"]
        step = f"{row['step_time_ratio']:.2f} ({span[0]:.2f}-{span[1]:.2f})" if span else "n/a"
        if len(sources) > 1 and row["step_time_source"] == "runs":
            step += " *"
        peak = f"{row['peak_memory_ratio']:.2f}" if row["peak_memory_ratio"] else "n/a"
        lines.append(
            f"| {_label(name, row)} | {row['rate']:g} | {100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} ({row['seeds']}) "
            f"| {row['trainable_params'] / 1e6:.2f}M ({100 * row['trainable_share']:.1f}%) | {_versus_cell(name, row, 'n/a')} | {step} | {peak} "
            f"| {row['cpu_minutes_per_run']:.1f} ({row['cpu_minutes_all_runs']:.1f}) |"
        )
    return "\n".join(lines)


def _padded(values: List[float]) -> tuple:
    low, high = min(values), max(values)
    margin = 0.06 * (high - low or 1)
    return low - margin, high + 1.5 * margin


def plot(table: Dict[str, dict], path: Path) -> Optional[Path]:
    """Accuracy against step time and against peak memory. Every policy is a numbered point (the key on the right
    names it, with its accuracy and costs), so that close points stay readable; the Pareto front is drawn through
    the policies no other beats on both axes. The accuracy axis starts 8 points below full fine-tuning: a policy
    below that is drawn on the bottom edge as a triangle, its accuracy in the key."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    priced = {name: row for name, row in table.items() if row["step_time_ratio"] is not None and row["peak_memory_ratio"]}
    if not priced:
        return None
    order = sorted(priced, key=lambda name: -priced[name]["accuracy"])
    number = {name: index + 1 for index, name in enumerate(order)}
    top = 100 * max(row["accuracy"] + row["accuracy_std"] for row in priced.values()) + 0.6
    floor = 100 * priced[FULL]["accuracy"] - 8 if FULL in priced else 100 * min(r["accuracy"] for r in priced.values()) - 1
    floor = max(floor, 100 * min(row["accuracy"] for row in priced.values()) - 1)

    def shown(name):  # the accuracy as drawn: policies under the floor sit on it
        return max(100 * priced[name]["accuracy"], floor + 0.25)

    figure, axes = plt.subplots(1, 2, figsize=(15, 6.2), sharey=True)
    for axis, cost, title in ((axes[0], "step_time_ratio", "step time (CPU, one thread)"),
                              (axes[1], "peak_memory_ratio", "peak training memory")):
        front = pareto_front(priced, cost)
        if FULL in priced:
            axis.axhspan(100 * (priced[FULL]["accuracy"] - WITHIN), 100 * priced[FULL]["accuracy"], color="0.92",
                         label="within 1 point of full fine-tuning's mean")
        axis.plot([priced[n][cost] for n in front], [shown(n) for n in front], "-", color="tab:green", alpha=0.5,
                  linewidth=2, label="Pareto front: best accuracy for the cost", zorder=1)
        axis.set_ylim(floor, top)
        axis.set_xlim(*_padded([row[cost] for row in priced.values()]))
        points = {name: axis.transData.transform((priced[name][cost], shown(name))) for name in order}
        placed: List[tuple] = []  # label boxes drawn so far, in pixels: (left, bottom, right, top)
        for name in order:
            row, clipped = priced[name], 100 * priced[name]["accuracy"] < floor
            colour = ("black" if name == FULL else "tab:purple" if name.startswith("LoRA")
                      else "tab:orange" if name in BEYOND else "tab:blue")
            marker = "v" if clipped else ("s" if name.startswith("LoRA") else "D" if name in BEYOND else "o")
            axis.errorbar(row[cost], shown(name), yerr=None if clipped else 100 * row["accuracy_std"], fmt=marker,
                          color=colour, markersize=9 if name in front else 6, capsize=3, zorder=3,
                          markeredgecolor="tab:green" if name in front else colour, markeredgewidth=2 if name in front else 1)
            x, y = points[name]
            width = 11 * len(str(number[name]))

            def clear(box, name=name):  # overlaps no label drawn before and no other policy's point
                left, bottom, right, top = box
                return (all(right < b[0] or left > b[2] or top < b[1] or bottom > b[3] for b in placed)
                        and all(not (left - 6 < px < right + 6 and bottom - 6 < py < top + 6)
                                for other, (px, py) in points.items() if other != name))

            boxes = [(x + dx, y + dy, x + dx + width, y + dy + 14)
                     for dx, dy in ((9, 4), (9, -18), (-9 - width, 4), (-9 - width, -18), (16, -7), (-16 - width, -7))]
            box = next((box for box in boxes if clear(box)), boxes[0])
            placed.append(box)
            axis.annotate(str(number[name]), (row[cost], shown(name)), textcoords="offset pixels",
                          xytext=(box[0] - x, box[1] - y), fontsize=9, fontweight="bold" if name in front else "normal",
                          color=colour)
        axis.set_xlabel(f"{title} ÷ full fine-tuning's")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("dev accuracy, % (mean over seeds; bar: ± one standard deviation)")
    key = [f"{number[name]:>2}  {_label(name, priced[name])}"
           + " (below the axis)" * (100 * priced[name]["accuracy"] < floor) + f"\n    {100 * priced[name]['accuracy']:.2f}% "
           f"({priced[name]['seeds']} seed{'s' * (priced[name]['seeds'] > 1)}), "
           f"time {priced[name]['step_time_ratio']:.2f}, memory {priced[name]['peak_memory_ratio']:.2f}" for name in order]
    figure.text(0.745, 0.93, "\n".join(key), va="top", ha="left", fontsize=8, family="monospace")
    figure.suptitle("Which layers should I freeze? Dev accuracy against cost (up and to the left is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=9)  # below the plots: it hides no point
    figure.tight_layout(rect=(0, 0.06, 0.74, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def docs_summary(runs: List[dict], settings: dict, timing: Optional[dict] = None) -> str:
    """The docs page's block: how far the study is, the table, and the answer as far as the runs carry it."""
    from quality import POLICIES, plan

    names = list(POLICIES)
    table = summarise(runs, names, timing)
    sweep, seeds = plan(runs, names, settings["seeds"])
    complete = [name for name, row in table.items() if row["seeds"] >= settings["seeds"]]
    if not sweep and not seeds:
        status = (f"All {len(runs)} runs done: every policy's learning-rate sweep, then {settings['seeds']} seeds at "
                  "its chosen rate.")
    else:
        status = (f"Runs finished: {len(runs)}; still to run: {len(sweep)} learning-rate sweep runs and {len(seeds)} "
                  f"seed runs (`python benchmarks/quality.py` resumes). Policies with all {settings['seeds']} seeds: "
                  f"{_names(complete)}; with a chosen rate: {len(table)} of {len(names)}"
                  + ("; the rest have not finished their sweep." if len(table) < len(names) else "."))
    full_steps = _full_step_times(runs)
    if full_steps:
        status += (f" Full fine-tuning's {len(full_steps)} runs took {min(full_steps):.2f} to {max(full_steps):.2f} CPU "
                   f"seconds per step for the same work: {max(full_steps) / min(full_steps) - 1:.0%} apart, the load alone.")
    sessions = timing_sessions(timing)
    if sessions:
        status += " " + sessions
    return "\n".join([status, "", markdown(table, settings), "", *(f"- {line}" for line in answer(table, runs))])


def headline(runs: List[dict], settings: dict, timing: Optional[dict] = None) -> str:
    """The short form that the README and the main job's page cite: full fine-tuning, the main job's policy (bottom
    50%), the cheapest policy within 1 point, the step-time Pareto front, and LoRA, as measured over seeds."""
    from quality import POLICIES

    table = summarise(runs, list(POLICIES), timing)
    if FULL not in table:
        return "The quality study has no finished full fine-tuning run yet (`python benchmarks/quality.py`)."
    wanted = [FULL, "bottom 50%", *_within_one_point(table)[:1], *pareto_front(_priced(table), "step_time_ratio"),
              "LoRA r=8", MATCHED]
    shown = [name for name in dict.fromkeys(wanted) if name in table]
    lines = [
        f"Pretrained MiniLM-L6 on GLUE SST-2 ({settings['train_samples']:,} training sentences, {settings['epochs']} "
        f"epoch, the whole dev set), each policy at its own learning rate, {settings['seeds']} seeds "
        f"({len(runs)} runs; `python benchmarks/quality.py --report`):",
        "",
        "| policy | dev accuracy, % (mean ± std, seeds) | vs full, points (95% interval) | step time vs full"
        + (" (side by side)" if any(table[name]["step_time_source"] == "side by side" for name in shown) else "")
        + " | peak memory vs full |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in sorted(shown, key=lambda name: -table[name]["accuracy"]):
        row = table[name]
        lines.append(
            f"| {_label(name, row)} | {100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} ({row['seeds']}) | "
            f"{_versus_cell(name, row, 'one seed')} | {row['step_time_ratio']:.2f} | {row['peak_memory_ratio']:.2f} |"
        )
    return "\n".join(lines)


def write_report(runs: List[dict], names: List[str], output: Path, settings: dict) -> str:
    table = summarise(runs, names, read_timing(output))
    chart = plot(table, output / "quality.png")
    pending = [name for name in names if name not in table]
    text = "\n".join([
        "# Quality study: every policy against full fine-tuning and LoRA",
        "",
        f"Settings: {json.dumps({k: v for k, v in settings.items() if k != 'tokenizer'})}",
        f"Runs finished: {len(runs)}." + (f" Policies not finished yet: {', '.join(pending)}." if pending else ""),
        *([timing_sessions(read_timing(output))] if timing_sessions(read_timing(output)) else []),
        "",
        markdown(table, settings),
        "",
        *(f"- {line}" for line in answer(table, runs)),
        "",
        "## Beyond on/off, seed by seed",
        "",
        beyond_pairs(runs),
        "",
        f"![accuracy against cost]({chart.name})" if chart else "",
    ])
    (output / "results.md").write_text(text + "\n")
    (output / "summary.json").write_text(json.dumps(table, indent=1))
    return text
