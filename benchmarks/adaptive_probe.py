"""What adaptive freezing costs: a run with a probe against the same layers frozen from the first step.

For each score, two runs of the same length on the same model and data, each in its own process:

* ``adaptive``: `freeze_strategy: adaptive`, `freeze_layers: 0.5`, a probe of `--probe` of the steps (default 5%);
* ``fixed``: `freeze_strategy: layers` with the layers the adaptive run chose, frozen from step 0 — what the user
  would have run had they known the answer (with `--freeze-embeddings`, both freeze the embeddings, as `bottom`
  does).

Reported per score, as a share of training time: the extra cost end to end (the whole training time of
``adaptive`` over ``fixed``: the probe's steps train every layer, plus the scoring), the extra cost within the
adaptive run (its probe steps, and the step in which the selection is made, against the median of its own later
steps: one process, one noise environment, so this is the steadier figure on a shared machine), the scoring work
alone (meters and agreement, as `freeze/probe_scoring_seconds` logs it), and what the FLOP model expects from the
probe's full-cost steps: ``probe × (full step / frozen step − 1)``, from the step times measured in the same run. The goal is an extra cost
under 5% of training time with a 5% probe. Also: the adaptive run's steps after the selection against the fixed
run's same steps (medians), the goal being at most 1.05; and, from the same step times, what a 5% probe would add
to a 1,000-step run (``0.05 × (probe step / frozen step − 1)``), and what it adds when the probe's steps, which only
measure with `freeze_probe_mode: measure`, are trained again at the end (``0.05 × probe step / frozen step``). On CPU, times are process CPU time with one thread (see `worker.py`);
each pair runs `--rounds` times, alternating, and the lower total of each configuration is kept.

    python benchmarks/adaptive_probe.py                      # GPT-2 8 x 256, 60 steps: about 4 minutes here
    python benchmarks/adaptive_probe.py --model minilm --steps 100
    python benchmarks/adaptive_probe.py --scores weight_change --freeze-embeddings   # the step time of issue 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from configurations import MODELS, build_model  # noqa: E402

DEFAULT_SCORES = ("weight_change", "grad_norm", "snr")


def train_once(options: dict) -> dict:
    """One run in this process: per-step times, the adaptive selection and its scoring cost."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_freeze import FreezeCallback

    cuda = options["device"] == "cuda" or (options["device"] == "auto" and torch.cuda.is_available())
    if not cuda:
        torch.set_num_threads(1)

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    class StepTimes(TrainerCallback):
        """Time between consecutive `on_step_end` events: everything a step costs, every callback included."""

        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = now()

        def on_step_end(self, args, state, control, **kwargs):
            current = now()
            self.times.append(current - self.last)
            self.last = current

    model = build_model(options["model"], options["seq_len"])
    kind = MODELS[options["model"]]["kind"]
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    size = options["steps"] * options["batch_size"]
    ids = torch.randint(1, vocab, (size, options["seq_len"]), generator=generator)
    if kind == "causal_lm":
        data = [{"input_ids": row, "labels": row} for row in ids]
    else:
        labels = torch.randint(0, 2, (size,), generator=generator)
        data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label} for row, label in zip(ids, labels)]
    times = StepTimes()
    freeze = FreezeCallback(**options["freeze"])
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, max_steps=options["steps"], per_device_train_batch_size=options["batch_size"],
            learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            use_cpu=not cuda, seed=0, log_level="error",
        )
        Trainer(model=model, args=args, train_dataset=data, callbacks=[freeze, times]).train()
    probe = freeze.freezer.probe
    result = {"step_times": times.times, "total": sum(times.times)}
    if probe is not None:
        result.update(
            selected=freeze.freezer.timeline.selections[0]["frozen_layers"],
            scoring_seconds=probe.scoring_seconds,
            probe_steps=freeze.freezer.timeline.selections[0]["step"],
        )
    return result


def _in_process(options: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(options, handle)
    try:
        output = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", handle.name], check=True, capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(handle.name)
    return json.loads(output.strip().splitlines()[-1])


def measure(score: str, args) -> dict:
    base = dict(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
    adaptive_policy = {"freeze_strategy": "adaptive", "freeze_layers": 0.5, "freeze_score": score}
    if score != "snr":
        adaptive_policy.update(freeze_probe_steps=args.probe, freeze_probe_mode=args.probe_mode)
    if args.freeze_embeddings:
        adaptive_policy["freeze_embeddings"] = True
    best = {}
    for _ in range(args.rounds):
        adaptive = _in_process(dict(base, freeze=adaptive_policy))
        fixed_policy = {"freeze_strategy": "layers", "freeze_layer_indices": adaptive["selected"]}
        if args.freeze_embeddings:
            fixed_policy["freeze_embeddings"] = True
        elif 0 not in adaptive["selected"]:
            fixed_policy["freeze_embeddings"] = False  # adaptive freezes them with layer 0 only
        fixed = _in_process(dict(base, freeze=fixed_policy))
        for name, run in (("adaptive", adaptive), ("fixed", fixed)):
            if name not in best or run["total"] < best[name]["total"]:
                best[name] = run
    adaptive, fixed = best["adaptive"], best["fixed"]
    probe_steps = adaptive["probe_steps"]
    times = adaptive["step_times"]
    # Within the adaptive run (one process, one noise environment): the probe's steps 1..P (P is the step in which
    # the selection is made) against the same run's later steps; step 0 is warm-up in every run.
    frozen_step = statistics.median(times[probe_steps + 1:])
    within = sum(time_ - frozen_step for time_ in times[1:probe_steps + 1])
    if probe_steps == 0:  # scored at the start, inside the warm-up step
        within = adaptive["scoring_seconds"]
    full_step = statistics.median(times[1:probe_steps]) if probe_steps > 1 else None
    expected = probe_steps / args.steps * (full_step / frozen_step - 1) if full_step else 0.0
    fixed_after = statistics.median(fixed["step_times"][probe_steps + 1:])
    return {
        "score": score,
        "selected": adaptive["selected"],
        "probe_steps": probe_steps,
        "adaptive_seconds": adaptive["total"],
        "fixed_seconds": fixed["total"],
        "extra": adaptive["total"] / fixed["total"] - 1,
        "extra_within": within / (args.steps * frozen_step),
        "scoring_share": adaptive["scoring_seconds"] / adaptive["total"],
        "scoring_seconds": adaptive["scoring_seconds"],
        "flop_expected_extra": expected,
        "step_after_selection_ratio": frozen_step / fixed_after,
        "thousand_step_probe": 0.05 * (full_step / frozen_step - 1) if full_step else 0.0,
        "thousand_step_probe_retrained": 0.05 * full_step / frozen_step if full_step else 0.0,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    from hf_freeze.scores import SCORES

    parser.add_argument("--scores", nargs="+", choices=SCORES.names(), default=list(DEFAULT_SCORES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--probe", type=float, default=0.05, help="probe length: a fraction of the steps, or a count")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--probe-mode", choices=["measure", "train"], default=None,
                        help="`freeze_probe_mode` (default: unset, 'measure')")
    parser.add_argument("--freeze-embeddings", action="store_true",
                        help="adaptive and fixed runs both freeze the embeddings (`freeze_embeddings: true`), as bottom does")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "adaptive_probe.md"))
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker) as handle:
            print(json.dumps(train_once(json.load(handle))))
        return
    started = time.perf_counter()
    rows = [measure(score, args) for score in args.scores]
    command = "python benchmarks/adaptive_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"Model {args.model} ({MODELS[args.model]['description']}), {args.steps} steps of batch {args.batch_size} x "
        f"{args.seq_len}, probe {args.probe:g} of the steps ({args.probe_mode or 'measure'}), freeze_layers 0.5"
        f"{', embeddings frozen' if args.freeze_embeddings else ''}; best of {args.rounds} rounds. "
        f"Command: `{command.strip()}` ({time.perf_counter() - started:.0f} s).",
        "",
        "| score | layers chosen | probe steps | adaptive run | same layers frozen from step 0 | extra cost, end to end | extra cost, within the run | scoring alone | FLOP model's extra | step after the selection / same layers frozen | 5% probe in 1,000 steps | ... its steps trained again |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['score']} | {row['selected']} | {row['probe_steps']} | {row['adaptive_seconds']:.2f} s | "
            f"{row['fixed_seconds']:.2f} s | {100 * row['extra']:+.1f}% | {100 * row['extra_within']:+.1f}% | "
            f"{100 * row['scoring_share']:.2f}% "
            f"({row['scoring_seconds']:.3f} s) | {100 * row['flop_expected_extra']:+.1f}% | "
            f"{row['step_after_selection_ratio']:.3f} | {100 * row['thousand_step_probe']:+.1f}% | "
            f"{100 * row['thousand_step_probe_retrained']:+.1f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
