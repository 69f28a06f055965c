"""The quality study's answer (benchmarks/quality_report.py) from made-up runs: what it says must follow the numbers."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytest.importorskip("scipy")
quality_report = pytest.importorskip("quality_report")

SETTINGS = {"train_samples": 8000, "epochs": 1, "seeds": 3}


def _run(policy, rate, seed, dev, select=0.8, cpu=100.0, peak=1000):
    return {"policy": policy, "rate": rate, "seed": seed, "select_accuracy": select, "dev_accuracy": dev,
            "steps": 100, "train_cpu_seconds": cpu, "peak_training_bytes": peak, "total_params": 100,
            "trainable_params_mean": 100 if policy == "full fine-tuning" else 25, "lora_rank": None}


def _study(bottom_devs):
    """Full fine-tuning chooses 5e-5 and bottom 50% chooses 1e-4 (middle of their grids: no extension)."""
    runs = [_run("full fine-tuning", rate, 0, 0.85, select=0.9 if rate == 5e-5 else 0.8) for rate in (2e-5, 5e-5, 1e-4)]
    runs[1]["dev_accuracy"] = 0.850
    runs += [_run("full fine-tuning", 5e-5, 1, 0.840), _run("full fine-tuning", 5e-5, 2, 0.860)]
    for rate in (5e-5, 1e-4, 2e-4):
        runs.append(_run("bottom 50%", rate, 0, bottom_devs[0], select=0.9 if rate == 1e-4 else 0.8, cpu=60, peak=500))
    runs += [_run("bottom 50%", 1e-4, seed, bottom_devs[seed], cpu=60, peak=500) for seed in (1, 2)]
    return runs


def test_the_paired_interval_is_student_t_over_the_seed_differences():
    full = [{"seed": s, "dev_accuracy": a} for s, a in enumerate((0.85, 0.84, 0.86))]
    other = [{"seed": s, "dev_accuracy": a} for s, a in enumerate((0.84, 0.82, 0.83))]  # -0.01, -0.02, -0.03
    difference = quality_report.paired_difference(other, full)
    assert difference["mean"] == pytest.approx(-0.02)
    assert difference["high"] - difference["mean"] == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)
    assert quality_report.paired_difference(other[:1], full) is None  # one common seed: no interval


def test_a_policy_clearly_below_full_fine_tuning_is_said_to_be_below_it():
    runs = _study((0.80, 0.79, 0.81))  # 5 points below on every seed
    table = quality_report.summarise(runs, ["full fine-tuning", "bottom 50%"])
    assert table["bottom 50%"]["vs_full"]["high"] < 0
    text = " ".join(quality_report.answer(table, runs))
    assert "Below it: bottom 50%." in text
    assert "No policy cheaper than full fine-tuning came within 1 point" in text
    assert "do not separate from full fine-tuning" not in text


def test_a_policy_inside_the_noise_is_not_separated_and_is_the_cheapest_within_one_point():
    runs = _study((0.855, 0.835, 0.858))  # differences +0.5, -0.5, -0.2 points
    table = quality_report.summarise(runs, ["full fine-tuning", "bottom 50%"])
    text = " ".join(quality_report.answer(table, runs))
    assert "Not separated from it by these seeds: bottom 50%." in text
    assert "Cheapest policy that these seeds do not separate from full fine-tuning (the interval reaches zero): **bottom 50%**" in text
    assert "**bottom 50%**" in text and "at 0.60 of its step time and 0.50 of its peak training memory" in text
    headline = quality_report.headline(runs, SETTINGS)
    assert "| bottom 50% | 84.93 ± 1.25 (3) | -0.07 (-1.34 to +1.21)" in headline


def test_the_rows_beyond_on_off_are_reported_against_full_fine_tuning_seed_by_seed():
    """Layer-wise decay and the freeze + LoRA mix (issue 30): each seed against full fine-tuning's same seed, and the
    mix against each of its parts alone."""
    from quality import LLRD, MIX, POLICIES

    runs = _study((0.845, 0.835, 0.855))
    for name, devs in ((LLRD, (0.86, 0.85, 0.87)), (MIX, (0.84, 0.83, 0.85)), ("LoRA r=8", (0.85, 0.84, 0.86))):
        grid = POLICIES[name]["rates"]  # each policy chooses the middle of its own grid: no extension
        for rate in grid:
            runs.append(_run(name, rate, 0, devs[0], select=0.9 if rate == grid[1] else 0.8, cpu=80, peak=700))
        runs += [_run(name, grid[1], seed, devs[seed], cpu=80, peak=700) for seed in (1, 2)]
    table = quality_report.summarise(runs, ["full fine-tuning", "bottom 50%", "LoRA r=8", LLRD, MIX])
    pairs = quality_report.beyond_pairs(runs)
    assert f"| {LLRD} (0.0001) | minus full |" in pairs
    assert "| 0 | 85.00 | 86.00 | +1.00 | 84.00 | -1.00 | 84.50 | 85.00 |" in pairs
    assert "| 1 | 84.00 | 85.00 | +1.00 | 83.00 | -1.00 | 83.50 | 84.00 |" in pairs
    text = " ".join(quality_report.answer(table, runs))
    assert f"Layer-wise learning-rate decay 0.8 over every layer, nothing frozen (top rate 0.0001): 86.00%" in text
    assert "minus bottom 50% alone (84.50%, 0.60x, 0.50x): -0.50 points" in text
    assert "minus LoRA r=8 alone (85.00%, 0.80x, 0.70x): -1.00 points" in text


def test_each_step_time_ratio_names_the_timing_session_it_comes_from():
    """`--timing --policies` sessions add up in one file: the report says which session timed which policy."""
    def entry(order, minutes):
        return {"rate": 1e-4, "step_times": [1.0] * 8, "order": order, "wall_minutes": minutes, "full_step_times": [2.0] * 8}

    first = ["full fine-tuning", "bottom 25%", "bottom 50%"]
    second = ["full fine-tuning", "bottom 50%", "LISA"]
    timing = {"policies": {"full fine-tuning": {"rate": 1e-4, "step_times": [2.0] * 8, "order": second, "wall_minutes": 9.0},
                           "bottom 25%": entry(first, 20.0), "bottom 50%": entry(second, 9.0), "LISA": entry(second, 9.0)}}
    text = quality_report.timing_sessions(timing)
    assert "2 side-by-side sessions" in text
    assert "bottom 25% (a session of 3 policies, 20 min); bottom 50%; LISA (a session of 3 policies, 9 min)" in text
    del timing["policies"]["bottom 25%"]
    assert quality_report.timing_sessions(timing) == ""  # one session: nothing to tell apart


def test_the_same_one_sentence_difference_on_every_seed_does_not_separate_a_policy():
    """Accuracies on 872 sentences move in steps of 1/872: three seeds one sentence apart each have no spread, and
    the interval takes one step as its spread (with the dev set's size recorded); five points apart stay separated."""
    full = [{"seed": s, "dev_accuracy": k / 872, "dev_examples": 872} for s, k in enumerate((740, 734, 744))]
    one_less = [{"seed": s, "dev_accuracy": (k - 1) / 872, "dev_examples": 872} for s, k in enumerate((740, 734, 744))]
    difference = quality_report.paired_difference(one_less, full)
    assert difference["mean"] == pytest.approx(-1 / 872) and difference["floored"]
    assert difference["low"] < 0 < difference["high"]
    far = [{"seed": s, "dev_accuracy": (k - 44) / 872, "dev_examples": 872} for s, k in enumerate((740, 734, 744))]
    assert quality_report.paired_difference(far, full)["high"] < 0
    unrecorded = [{key: value for key, value in run.items() if key != "dev_examples"} for run in one_less]
    assert not quality_report.paired_difference(unrecorded, full)["floored"]  # no size recorded: no floor
