"""One trial of a multi-fidelity search (`hf_freeze.tools.hpo.run_search`): its rungs, each a real `Trainer` run
evaluated and reported to Optuna, and the table of a study's trials.

A rung's fidelity is either a fraction of the model's layers left trainable (the bottom layers and the input
embeddings frozen, as in Frozen Layers: Memory-efficient Many-fidelity Hyperparameter Optimization) or a fraction
of the training steps with the training arguments' own freezing (usually none: every layer trains). A steps rung is a
complete, shorter run: its learning-rate schedule (and a warm-up given as a ratio) spans the rung's steps.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
from typing import Any, Dict, List

from ..errors import invalid_choice
from ..integrations import FreezeCallback
from ..logs import get_logger

__all__ = ["FINISHED_STATES", "ProgressLog", "TrialObjective", "best_trial", "format_results"]

logger = get_logger(__name__)

# The states of a trial that counts as done (a failed, interrupted one is run again: `hpo._retry_interrupted`).
FINISHED_STATES = ("COMPLETE", "PRUNED")


class TrialObjective:
    """One trial: the rungs in order, each a Trainer run reported to Optuna, until the pruner stops it."""

    def __init__(self, args, model_init, train_dataset, eval_dataset, space, fidelity, fidelities, counts, num_layers,
                 metric, reduction_factor, continuation, trainer_class, callbacks, trainer_kwargs):
        self.args, self.model_init, self.space, self.metric = args, model_init, space, metric
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.fidelity, self.fidelities, self.counts, self.num_layers = fidelity, fidelities, counts, num_layers
        self.reduction_factor, self.continuation = reduction_factor, continuation
        self.trainer_class, self.callbacks, self.trainer_kwargs = trainer_class, callbacks, trainer_kwargs
        self.model_class = None

    def _rung_options(self, count: int) -> Dict[str, Any]:
        """The training options a rung's fidelity sets."""
        if self.fidelity == "steps":
            return {"max_steps": count}
        frozen = self.num_layers - count
        return {"freeze_strategy": "bottom" if frozen else "none", "freeze_layers": frozen if frozen else None}

    def _describe(self, count: int) -> str:
        if self.fidelity == "steps":
            return f"{count} training steps, layers as the training arguments say"
        return f"top {count} of {self.num_layers} layers trainable"

    def __call__(self, trial) -> float:
        import optuna
        from transformers import Trainer, set_seed

        params = self.space.suggest(trial)
        trial_dir = os.path.join(self.args.output_dir, f"trial-{trial.number}")
        rungs: List[Dict[str, Any]] = []
        previous_dir = None
        value = float("nan")
        for rung, (fraction, count) in enumerate(zip(self.fidelities, self.counts)):
            rung_dir = os.path.join(trial_dir, f"rung-{rung}")
            rung_args = dataclasses.replace(self.args, **params, output_dir=rung_dir, **self._rung_options(count))
            logger.info(f"hpo: trial {trial.number} rung {rung + 1}/{len(self.counts)}: {self._describe(count)} "
                        f"({fraction:g}), {params}")
            set_seed(rung_args.seed)
            model = self.model_init() if previous_dir is None else self._load(previous_dir)
            trainer = (self.trainer_class or Trainer)(
                model=model, args=rung_args, train_dataset=self.train_dataset, eval_dataset=self.eval_dataset,
                callbacks=[FreezeCallback(), *self.callbacks], **self.trainer_kwargs)
            started, cpu_started = time.perf_counter(), time.process_time()
            trainer.train()
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            eval_cpu_started = time.process_time()
            metrics = trainer.evaluate()
            eval_cpu_seconds = time.process_time() - eval_cpu_started
            if self.metric not in metrics:
                raise invalid_choice("metric", self.metric, sorted(metrics))
            value = float(metrics[self.metric])
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            rungs.append({
                "rung": rung, "fidelity": fraction, "fidelity_kind": self.fidelity, "value": value,
                "trainable_layers": count if self.fidelity == "layers" else self.num_layers,
                "train_steps": int(trainer.state.global_step), "trainable_params": trainable,
                "train_seconds": round(seconds, 3), "train_cpu_seconds": round(cpu_seconds, 3),
                "eval_cpu_seconds": round(eval_cpu_seconds, 3),
            })
            trial.set_user_attr("rungs", rungs)
            if previous_dir is not None:
                shutil.rmtree(previous_dir, ignore_errors=True)  # its weights now live in this rung
            previous_dir = None
            if self.continuation and rung + 1 < len(self.counts):
                previous_dir = os.path.join(rung_dir, "continue-from")
                trainer.save_model(previous_dir)
                self.model_class = type(trainer.model)
            del trainer, model
            gc.collect()
            trial.report(value, step=self.reduction_factor ** rung)
            if rung + 1 < len(self.counts) and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at rung {rung + 1} (fidelity {fraction:g})")
        return value

    def _load(self, folder: str):
        return self.model_class.from_pretrained(folder)


class ProgressLog:
    """Logs trials done, the rung a trial reached and the best value so far, after every trial."""

    def __init__(self, n_trials: int, metric: str, num_rungs: int):
        self.n_trials, self.metric, self.num_rungs = n_trials, metric, num_rungs

    def __call__(self, study, trial) -> None:
        done = sum(item.state.name in FINISHED_STATES for item in study.trials)
        reached = len(trial.user_attrs.get("rungs", []))
        best = best_trial(study)
        best_text = (f"best so far: trial {best.number}, {self.metric} {best.value:.4g}" if best
                     else "no complete trial yet")
        logger.info(f"hpo: {done}/{self.n_trials} trials done; trial {trial.number} {trial.state.name.lower()} at rung "
                    f"{reached}/{self.num_rungs}; {best_text}")


def best_trial(study):
    """The study's best complete trial, or ``None`` while no trial has completed (Optuna's `best_trial` raises)."""
    complete = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
    return study.best_trial if complete else None


def _rung_label(rung: Dict[str, Any]) -> str:
    if rung.get("fidelity_kind") == "steps":
        return f"{rung['train_steps']} steps"
    count = rung["trainable_layers"]
    return f"{count} layer{'s' if count != 1 else ''}"


def format_results(study) -> str:
    """A table of the study's trials: state, the value at every rung, the configuration; the best marked '*'.

    Example:

    ```python
    >>> import optuna
    >>> from hf_freeze.tools.hpo_trial import format_results
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study()
    >>> study.add_trial(optuna.trial.create_trial(params={"learning_rate": 1e-4}, value=0.5,
    ...     distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)},
    ...     user_attrs={"rungs": [{"trainable_layers": 1, "value": 0.7}, {"trainable_layers": 4, "value": 0.5}]}))
    >>> print(format_results(study))
    trial  state     1 layer  4 layers  learning_rate
    0*     complete   0.7000    0.5000         0.0001
    ```
    """
    trials = study.trials
    best = best_trial(study)
    # Columns in rung order; a rung's label (its trainable layers or its steps) grows with the rung.
    labels: Dict[int, str] = {}
    for trial in trials:
        for index, rung in enumerate(trial.user_attrs.get("rungs", [])):
            labels.setdefault(index, _rung_label(rung))
    names = sorted({name for trial in trials for name in trial.params})
    header = ["trial", "state"] + [labels[index] for index in sorted(labels)] + names
    rows = []
    for trial in trials:
        values = [rung["value"] for rung in trial.user_attrs.get("rungs", [])]
        mark = "*" if best is not None and trial.number == best.number else ""
        rows.append([f"{trial.number}{mark}", trial.state.name.lower()]
                    + [f"{values[index]:.4f}" if index < len(values) else "-" for index in sorted(labels)]
                    + [f"{trial.params[name]:.4g}" if isinstance(trial.params.get(name), float)
                       else str(trial.params.get(name, "-")) for name in names])
    widths = [max(len(str(row[column])) for row in [header] + rows) for column in range(len(header))]
    lines = []
    for row in [header] + rows:
        cells = [f"{cell:<{widths[i]}}" if i < 2 else f"{cell:>{widths[i]}}" for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
