"""Hyperparameter search with the number of trainable layers as the fidelity (Frozen Layers, arXiv 2504.10735), on
Optuna.

Every trial is one configuration from the search space, trained at rungs of increasing fidelity: at a fidelity f the
top round(f x n) of the model's n layers train and the rest, with the input embeddings, are frozen (`freeze_strategy:
bottom`; the last rung of the default grid, 1.0, is full fine-tuning). Each rung is a real `Trainer` run with a
`FreezeCallback`, evaluated, and reported to Optuna, whose `SuccessiveHalvingPruner` (or `HyperbandPruner`) stops the
configurations that rank low at a rung. A rung restarts from `model_init()` by default; `continuation=True` starts it
from the weights the trial's previous rung trained (the optimizer starts afresh: the moments of the weights trained
before are not carried over).

`fidelity="steps"` is the usual training-length fidelity instead, for comparison and for models whose layers should
all train: a rung trains every layer (or what the training arguments' own `freeze_*` options leave trainable) for a
fraction of the full run's optimizer steps, as a complete shorter run (its learning-rate schedule, and a warm-up given
as a ratio, span the rung's steps).

The study lives in an SQLite file in the output folder (`optuna.db`), so an interrupted search resumes where it
stopped: the finished trials are kept, the interrupted one is run again, and `optuna-dashboard sqlite:///.../optuna.db`
shows it. Several processes may share the file (each runs `run_search` with the same study name).

`Trainer.hyperparameter_search` runs exactly one `trainer.train()` per trial, which a rung here is not (a new
training run with a different frozen set, or a change of the frozen set within the trial); for that search,
`hf_freeze.tools.hpo_stages.LayerFidelityStages` runs the rungs inside one training run instead (Optuna or Ray
Tune). `run_search` is the entry point here, from a script or from the command line (`hf-freeze hpo TRAIN.yaml
--space SPACE.yaml --trials N`).

Pruner steps: a configuration's value at rung i is reported as `trial.report(value, step=reduction_factor ** i)` with
the pruner's `min_resource=1`, so each fidelity rung is exactly one rung of Optuna's successive halving (which
places its rungs at min_resource x reduction_factor^k steps), whatever the spacing of the fidelity grid. The rung index
and the trainable layers are stored on the trial (`user_attrs['rungs']`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from ..config import FreezeTrainingArguments
from ..errors import FreezeConfigError, invalid, invalid_choice
from ..logs import get_logger
from ..model import discover_layout
from .hpo_space import (
    DEFAULT_FIDELITIES,
    FIDELITY_KINDS,
    SearchSpace,
    load_search_space,
    trainable_layer_counts,
    training_step_counts,
)
from .hpo_trial import FINISHED_STATES, ProgressLog, TrialObjective, best_trial, format_results

__all__ = ["FIDELITY_KINDS", "PRUNERS", "SearchResult", "add_parser", "format_results", "main", "run_search"]

logger = get_logger(__name__)

PRUNERS = ("successive_halving", "hyperband", "none")
_STUDY_ATTRIBUTE = "hf_freeze_search"  # what the study was created for: a later run must search the same thing
_DESCRIPTION_KEYS = ("space", "fidelity", "fidelities", "metric", "direction", "continuation", "reduction_factor")
# Studies made before the 'steps' fidelity existed searched over layers.
_DESCRIPTION_DEFAULTS = {"fidelity": "layers"}


@dataclass
class SearchResult:
    """What `run_search` returns: the Optuna study (left in its storage) and the best full-fidelity configuration.

    Example:

    ```python
    >>> from hf_freeze.tools.hpo import SearchResult
    >>> SearchResult(study=None, storage="sqlite:///out/optuna.db", study_name="s", best_params={"learning_rate": 1e-4},
    ...              best_value=0.3, best_trial=2).best_params
    {'learning_rate': 0.0001}
    ```
    """

    study: Any
    storage: str
    study_name: str
    best_params: Optional[Dict[str, Any]]
    best_value: Optional[float]
    best_trial: Optional[int]

    def table(self) -> str:
        return format_results(self.study)


def run_search(
    args: FreezeTrainingArguments,
    model_init: Callable[[], Any],
    train_dataset: Any,
    eval_dataset: Any,
    space: Union[SearchSpace, Mapping[str, Any], str],
    n_trials: int = 20,
    fidelities: Sequence[float] = DEFAULT_FIDELITIES,
    fidelity: str = "layers",
    metric: str = "eval_loss",
    direction: Optional[str] = None,
    pruner: Union[str, Any] = "successive_halving",
    reduction_factor: int = 2,
    continuation: bool = False,
    study_name: str = "hf_freeze_hpo",
    storage: Optional[str] = None,
    sampler: Any = None,
    trainer_class: Optional[type] = None,
    callbacks: Sequence[Any] = (),
    study_callbacks: Sequence[Callable[[Any, Any], None]] = (),
    **trainer_kwargs: Any,
) -> SearchResult:
    """Search hyperparameters with rungs of increasing fidelity (trainable-layer fractions by default, or fractions
    of the training steps); resumes a stored study.

    Args:
        args: The training arguments of every rung; the searched options and the fidelity's `freeze_strategy` /
            `freeze_layers` replace theirs. The study and each rung's output go under `args.output_dir`.
        model_init: Builds the model to train, called (after `set_seed(args.seed)`) for every rung that starts
            afresh: a pretrained model, or one from its config for the paper's training from random initialisation.
        train_dataset: Passed to the `Trainer`.
        eval_dataset: Passed to the `Trainer`; every rung is evaluated on it.
        space: A `SearchSpace`, its mapping, or the path of a search-space YAML.
        n_trials: Trials the study should hold when this call ends, counting finished (complete or pruned) ones
            from an earlier run of the same study.
        fidelities: Strictly increasing fractions of the fidelity, one a rung (default 0.25, 0.5, 1.0).
        fidelity: 'layers' (a rung trains the top fraction of the layers, the rest and the input embeddings frozen)
            or 'steps' (a rung trains that fraction of the training steps, `max_steps` or the steps of
            `num_train_epochs`, as a complete shorter run, with the training arguments' own freezing).
        metric: The key of `trainer.evaluate()` to optimise (e.g. 'eval_loss', 'eval_accuracy').
        direction: 'minimize' or 'maximize'; default: minimize a metric with 'loss' in its name, else maximize.
        pruner: 'successive_halving', 'hyperband', 'none', or an Optuna pruner.
        reduction_factor: The pruner's reduction factor: about 1/reduction_factor of the trials go on at each rung.
        continuation: Start a rung from the weights of the trial's previous rung instead of `model_init()`
            (the 'layers' fidelity only).
        study_name: The study's name in its storage.
        storage: An Optuna storage URL; default an SQLite file `optuna.db` in `args.output_dir`.
        sampler: An Optuna sampler; default TPE seeded with `args.seed`.
        trainer_class: The `Trainer` class (default `transformers.Trainer`), e.g. a subclass or TRL's trainers.
        callbacks: More Trainer callbacks for every rung (a `FreezeCallback` is always added).
        study_callbacks: Optuna callbacks `(study, trial)` called after every trial, e.g. one that calls
            `study.stop()` when a budget is spent.
        trainer_kwargs: More `Trainer` keywords (`data_collator`, `compute_metrics`, `processing_class`, ...).

    Example:

    ```python
    >>> from hf_freeze.tools.hpo import run_search
    >>> # result = run_search(args, lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
    >>> #                     train, dev, "configs/search_spaces/hpo_space.yaml", n_trials=24, metric="eval_accuracy")
    >>> # print(result.table())
    ```
    """
    import optuna

    space = space if isinstance(space, SearchSpace) else (
        load_search_space(space) if isinstance(space, str) else SearchSpace.from_mapping(space))
    _check_arguments(args, eval_dataset, n_trials, reduction_factor, fidelity, continuation)
    direction = direction or ("minimize" if "loss" in metric else "maximize")
    if direction not in ("minimize", "maximize"):
        raise invalid_choice("direction", direction, ["minimize", "maximize"])
    num_layers = discover_layout(model_init()).num_layers
    if fidelity == "layers":
        counts = trainable_layer_counts(fidelities, num_layers)
        unit = f"train the top {counts} of {num_layers} layers"
    else:
        counts = training_step_counts(fidelities, _full_training_steps(args, train_dataset))
        unit = f"train {counts} steps"
    pruner = _make_pruner(pruner, len(counts), reduction_factor)

    os.makedirs(args.output_dir, exist_ok=True)
    storage = storage or "sqlite:///" + os.path.abspath(os.path.join(args.output_dir, "optuna.db"))
    description = {"space": json.loads(space.as_json()), "fidelity": fidelity, "fidelities": list(fidelities),
                   "metric": metric,
                   "direction": direction, "continuation": continuation, "reduction_factor": reduction_factor}
    study = _open_study(optuna, storage, study_name, direction, pruner, sampler or optuna.samplers.TPESampler(
        seed=args.seed), description)

    done = sum(trial.state.name in FINISHED_STATES for trial in study.trials)
    remaining = max(0, n_trials - done)
    if remaining:
        _retry_interrupted(study)
    logger.info(f"hpo: study {study_name!r} in {storage}: {done} finished trial(s), {remaining} to run; rungs {unit} "
                f"(fidelities {list(fidelities)}), {direction} {metric}")
    objective = TrialObjective(args, model_init, train_dataset, eval_dataset, space, fidelity, fidelities, counts,
                           num_layers, metric, reduction_factor, continuation, trainer_class, list(callbacks),
                           trainer_kwargs)
    if remaining:
        study.optimize(objective, n_trials=remaining,
                       callbacks=[ProgressLog(n_trials, metric, len(counts)), *study_callbacks])
    best = best_trial(study)
    logger.info("hpo: results\n" + format_results(study))
    return SearchResult(study, storage, study_name, best.params if best else None, best.value if best else None,
                        best.number if best else None)


def _check_arguments(args, eval_dataset, n_trials, reduction_factor, fidelity, continuation) -> None:
    if fidelity not in FIDELITY_KINDS:
        raise invalid_choice("fidelity", fidelity, FIDELITY_KINDS)
    if fidelity == "steps" and continuation:
        raise FreezeConfigError(
            "continuation=True continues a trial's weights into a rung with more trainable layers; with the 'steps' "
            "fidelity every rung is a complete run of its own length, so there is nothing to continue.",
            fields=["continuation", "fidelity"], hint="Fix: leave continuation off, or use fidelity='layers'.")
    if fidelity == "layers" and (args.freeze_strategy not in ("none", "bottom") or args.freeze_layers is not None):
        raise FreezeConfigError(
            f"A layer-fidelity search sets freeze_strategy 'bottom' and freeze_layers at every rung (got "
            f"freeze_strategy={args.freeze_strategy!r}, freeze_layers={args.freeze_layers!r}).",
            fields=["freeze_strategy", "freeze_layers"], hint="Fix: remove both from the training arguments.")
    if eval_dataset is None:
        raise invalid("eval_dataset", None, "a dataset: every rung is evaluated on it")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise invalid("n_trials", n_trials, "an integer >= 1")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 2:
        raise invalid("reduction_factor", reduction_factor, "an integer >= 2")


def _make_pruner(pruner: Union[str, Any], num_rungs: int, reduction_factor: int):
    import optuna

    if not isinstance(pruner, str):
        return pruner
    if pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=reduction_factor ** (num_rungs - 1), reduction_factor=reduction_factor)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise invalid_choice("pruner", pruner, PRUNERS)


def _open_study(optuna, storage: str, study_name: str, direction, pruner, sampler, description: Dict[str, Any]):
    if storage.startswith("sqlite:"):
        # A heartbeat lets a later run tell a trial of a killed process (no heartbeat) from a live one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(storage, heartbeat_interval=30, grace_period=90)
    study = optuna.create_study(study_name=study_name, storage=storage, direction=direction, pruner=pruner,
                                sampler=sampler, load_if_exists=True)
    stored = study.user_attrs.get(_STUDY_ATTRIBUTE)
    if stored is None:
        if any(trial.state.name != "WAITING" for trial in study.trials):  # enqueued configurations are welcome
            raise FreezeConfigError(
                f"Study {study_name!r} in {storage} already has trials that hf_freeze did not make.",
                fields=["study_name"], hint="Fix: choose another study name or output folder.")
        study.set_user_attr(_STUDY_ATTRIBUTE, description)
        return study
    for key in _DESCRIPTION_KEYS:
        before = stored.get(key, _DESCRIPTION_DEFAULTS.get(key))
        if before != description[key]:
            raise FreezeConfigError(
                f"Study {study_name!r} in {storage} was made with a different {key}: {before!r}, "
                f"not {description[key]!r}; its trials would not be comparable with new ones.",
                fields=[key], hint="Fix: restore the study's own setting, or start a new study (another "
                "--study-name or output folder).")
    return study


def _full_training_steps(args, train_dataset) -> int:
    """The optimizer steps of a full-fidelity run, counted as the Trainer counts them."""
    if args.max_steps > 0:
        return args.max_steps
    try:
        examples = len(train_dataset)
    except TypeError:
        raise invalid("max_steps", args.max_steps, "a positive number of steps: the 'steps' fidelity takes fractions "
                      "of it, and the training dataset has no length to count the steps of an epoch") from None
    per_batch = args.per_device_train_batch_size * max(1, args.world_size)
    batches = examples // per_batch if args.dataloader_drop_last else math.ceil(examples / per_batch)
    updates = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * updates)


def _retry_interrupted(study) -> None:
    """Run an interrupted (failed) trial's configuration again first, once."""
    retried = {trial.user_attrs.get("retry_of") for trial in study.trials}
    for trial in study.trials:
        if trial.state.name == "FAIL" and trial.number not in retried and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            logger.info(f"hpo: trial {trial.number} was interrupted; its configuration runs again")


def add_parser(subparsers, **kwargs: Any) -> Any:
    """Add the `hpo` command to the `hf-freeze` sub-command parsers (``kwargs``: the parser's own, such as ``help``,
    which `hf-freeze --help` shows without importing this module); returns its parser."""
    parser = subparsers.add_parser(
        "hpo",
        description="Search the options of SPACE.yaml for the training run of TRAIN.yaml (training, freeze_* and the "
        "task's model_name_or_path, train_file, validation_file, ...): each trial trains at rungs of increasing "
        "trainable-layer fractions (bottom layers frozen), and Optuna's pruner stops the configurations that rank "
        "low. The study is stored in OUTPUT_DIR/optuna.db: run the same command again to resume it.",
        **kwargs,
    )
    parser.add_argument("train_yaml", metavar="TRAIN.yaml", help="the training YAML (FreezeTrainingArguments and "
                        "the task's model and data options)")
    parser.add_argument("--space", required=True, metavar="SPACE.yaml", help="the search space")
    parser.add_argument("--trials", type=int, default=20, help="trials the study should hold (finished ones count)")
    parser.add_argument("--fidelity", default="layers", choices=list(FIDELITY_KINDS),
                        help="what a rung's fraction is of: the trainable layers (bottom ones frozen) or the training "
                        "steps (a shorter run with the YAML's own freezing)")
    parser.add_argument("--fidelities", type=float, nargs="+", default=list(DEFAULT_FIDELITIES),
                        help="strictly increasing fractions of the fidelity, one a rung")
    parser.add_argument("--pruner", default="successive_halving", choices=list(PRUNERS))
    parser.add_argument("--reduction-factor", type=int, default=2, help="about 1/N of the trials go on at each rung")
    parser.add_argument("--metric", default="eval_loss", help="the key of trainer.evaluate() to optimise, e.g. "
                        "eval_accuracy")
    parser.add_argument("--direction", default=None, choices=["minimize", "maximize"],
                        help="default: minimize a metric with 'loss' in its name, else maximize")
    parser.add_argument("--continuation", action="store_true", help="start each rung from the weights of the "
                        "trial's previous rung instead of the model's initial weights")
    parser.add_argument("--study-name", default="hf_freeze_hpo")
    parser.add_argument("--storage", default=None, help="an Optuna storage URL (default: sqlite in the output folder)")
    parser.add_argument("--output-dir", default=None, help="overrides the YAML's output_dir")
    parser.set_defaults(hpo_main=main)
    return parser


def main(namespace) -> int:
    """Run `hf-freeze hpo` from its parsed arguments; 0 on success, 2 for a configuration error."""
    import sys

    from transformers import HfArgumentParser

    from ..config import load_config_file
    from ..config.types import unknown_keys
    from .hpo_task import HpoTaskArguments, build_classification_task

    try:
        values = load_config_file(namespace.train_yaml)
        if namespace.output_dir:
            values["output_dir"] = namespace.output_dir
        unknown = unknown_keys(values, [HpoTaskArguments, FreezeTrainingArguments])
        if unknown:
            raise FreezeConfigError(f"{namespace.train_yaml}: " + "; ".join(map(str, unknown)) + ".",
                                    fields=[name for problem in unknown for name in problem.fields])
        task, args = HfArgumentParser((HpoTaskArguments, FreezeTrainingArguments)).parse_dict(values)
        space = load_search_space(namespace.space)
        model_init, train_dataset, eval_dataset, extras = build_classification_task(task)
        result = run_search(
            args, model_init, train_dataset, eval_dataset, space, n_trials=namespace.trials,
            fidelities=namespace.fidelities, fidelity=namespace.fidelity, metric=namespace.metric,
            direction=namespace.direction,
            pruner=namespace.pruner, reduction_factor=namespace.reduction_factor,
            continuation=namespace.continuation, study_name=namespace.study_name, storage=namespace.storage,
            **extras)
    except FreezeConfigError as error:
        print(f"hf-freeze hpo: {error}", file=sys.stderr)
        return 2
    print(result.table())
    if result.best_trial is None:
        print("No trial reached the last rung.")
    else:
        print(f"best: trial {result.best_trial}, {namespace.metric} {result.best_value:.4f}, {result.best_params}")
    print(f"study {result.study_name!r} in {result.storage} (optuna-dashboard {result.storage})")
    return 0
