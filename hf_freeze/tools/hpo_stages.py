"""The layer fidelity inside one training run: `Trainer.hyperparameter_search` with Optuna or Ray Tune.

`run_search` trains each rung as a run of its own. Here a trial is one `Trainer.train()` whose frozen set shrinks at
the rungs (`freeze_strategy: staged`), so that the Trainer's own search drives it and the search engine's pruner (or
scheduler) stops a trial between rungs, as it would stop any run between evaluations:

* rung 0 trains the top ``fidelities[0]`` of the layers for `rung_steps` optimizer steps; rung k (k >= 1) trains the
  top ``fidelities[k]`` from step ``rung_steps x r^(k-1)`` to ``rung_steps x r^k`` (r the reduction factor), so the
  last rung ends the run at ``rung_steps x r^(R-1)`` steps with every layer trainable when the last fidelity is 1.0;
* the Trainer evaluates every `rung_steps` steps and reports each evaluation to the search (Optuna:
  ``trial.report(objective, step=global_step)``; Ray Tune: one ``training_iteration`` per evaluation);
* Optuna's `SuccessiveHalvingPruner(min_resource=rung_steps, reduction_factor=r)` and Ray Tune's
  `ASHAScheduler(grace_period=1, reduction_factor=r, max_t=r^(R-1))` place their rungs exactly at those steps: a trial
  is compared with the others at the end of each fidelity rung, and continues (with more layers trainable, from
  its own weights and optimizer state) only if it ranks in the top 1/r.

This is the layer fidelity together with training length, with continuation (a promoted trial keeps what it
learnt: the Frozen Layers paper's first open question) and without a restart per rung.

Example:

```python
>>> from hf_freeze.tools.hpo_stages import LayerFidelityStages
>>> stages = LayerFidelityStages(fidelities=(0.25, 0.5, 1.0), rung_steps=10)
>>> stages.freeze_stages(num_layers=8)  # the bottom layers frozen from each step on
{0: 6, 10: 4, 20: 0}
>>> stages.max_steps, stages.rung_ends
(40, [10, 20, 40])
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Union

from ..errors import FreezeConfigError, invalid
from .hpo_space import (
    DEFAULT_FIDELITIES, SearchSpace, check_fidelity_grid, load_search_space, trainable_layer_counts,
)

__all__ = ["LayerFidelityStages"]

# Options the stages set: a training-arguments value for one of them would be overwritten.
_SET_HERE = ("freeze_strategy", "freeze_layers", "freeze_stages", "max_steps", "eval_strategy", "eval_steps")


@dataclass(frozen=True)
class LayerFidelityStages:
    """Rungs of trainable layers inside one training run, for `Trainer.hyperparameter_search`.

    Args:
        fidelities: Fractions of the layers trainable at each rung, strictly increasing in (0, 1].
        rung_steps: Optimizer steps of the first rung (every later rung multiplies the run's length by
            `reduction_factor`).
        reduction_factor: The pruner's reduction factor (>= 2): the share of trials that goes on at each rung is
            1 / reduction_factor.
    """

    fidelities: Sequence[float] = DEFAULT_FIDELITIES
    rung_steps: int = 0
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.rung_steps, bool) or not isinstance(self.rung_steps, int) or self.rung_steps < 1:
            raise invalid("rung_steps", self.rung_steps, "the optimizer steps of the first rung, an integer >= 1")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            raise invalid("reduction_factor", self.reduction_factor, "an integer >= 2")
        check_fidelity_grid(self.fidelities, "trainable layers")  # strictly increasing fractions in (0, 1]
        object.__setattr__(self, "fidelities", tuple(float(f) for f in self.fidelities))

    @property
    def rung_ends(self) -> List[int]:
        """The optimizer step at which each rung ends (and is compared with the other trials)."""
        return [self.rung_steps * self.reduction_factor ** rung for rung in range(len(self.fidelities))]

    @property
    def max_steps(self) -> int:
        return self.rung_ends[-1]

    def freeze_stages(self, num_layers: int) -> Dict[int, int]:
        """`freeze_stages` for a model of `num_layers` layers: each rung's start -> the bottom layers frozen."""
        counts = trainable_layer_counts(self.fidelities, num_layers)
        starts = [0] + self.rung_ends[:-1]
        return {start: num_layers - trainable for start, trainable in zip(starts, counts)}

    def training_arguments(self, args: Any, model: Any) -> Any:
        """`args` (a `FreezeTrainingArguments`) with the stages of `model`'s layers, the run's length and an
        evaluation at the end of every `rung_steps` steps; refused if `args` sets any of them itself."""
        from ..model import discover_layout

        clashes = [name for name in _SET_HERE if _set_by_user(args, name)]
        if clashes:
            raise FreezeConfigError(
                f"the training arguments set {', '.join(f'`{name}`' for name in clashes)}, which the layer fidelity "
                f"sets for every trial (the frozen layers of each rung, {self.max_steps} steps, an evaluation every "
                f"{self.rung_steps}). Remove them from the training arguments.",
                fields=clashes,
            )
        layout = discover_layout(model)
        if layout.num_layers < 2:
            raise FreezeConfigError(
                f"the layer fidelity needs a model with at least 2 layers; {type(model).__name__} has "
                f"{layout.num_layers}.", fields=["fidelities"])
        stages = self.freeze_stages(layout.num_layers)
        values = dict(
            freeze_strategy="staged", freeze_stages=stages, freeze_schedule_unit="step", max_steps=self.max_steps,
            eval_strategy="steps", eval_steps=self.rung_steps,
        )
        if hasattr(args, "do_eval"):
            values["do_eval"] = True
        return dataclasses.replace(args, **values)

    def optuna_pruner(self) -> Any:
        """Optuna's successive halving with its rungs at the ends of the fidelity rungs."""
        import optuna

        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=self.rung_steps, reduction_factor=self.reduction_factor, min_early_stopping_rate=0
        )

    def ray_scheduler(self, mode: str = "max") -> Any:
        """Ray Tune's ASHA with its rungs at the ends of the fidelity rungs (one training iteration = one
        evaluation = `rung_steps` steps), on the Trainer's reported ``objective``."""
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr="training_iteration", metric="objective", mode=mode, max_t=self.max_steps // self.rung_steps,
            grace_period=1, reduction_factor=self.reduction_factor,
        )

    def search_arguments(
        self,
        backend: str,
        space: Union[str, Mapping[str, Any], SearchSpace],
        metric: str,
        direction: str = "maximize",
        n_trials: int = 8,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """Keyword arguments for `trainer.hyperparameter_search(**...)`: the backend, the search space (a YAML
        file, a mapping, or a `SearchSpace`) in the backend's form, the objective `metric` (e.g.
        ``eval_accuracy``), the pruner (Optuna) or scheduler (Ray Tune), and `kwargs` for the backend
        (Optuna: ``storage``, ``study_name``, ``load_if_exists``, ``sampler``; Ray Tune: ``resources_per_trial``,
        ``storage_path``, ...)."""
        if backend not in ("optuna", "ray"):
            raise invalid("backend", backend, "'optuna' or 'ray'")
        if direction not in ("maximize", "minimize"):
            raise invalid("direction", direction, "'maximize' or 'minimize'")
        if isinstance(space, str):
            space = load_search_space(space)
        elif not isinstance(space, SearchSpace):
            space = SearchSpace.from_mapping(space)
        arguments: Dict[str, Any] = dict(
            backend=backend, n_trials=n_trials, direction=direction, compute_objective=_objective(metric),
            hp_space=space.suggest if backend == "optuna" else _ray_space(space),
        )
        if backend == "optuna":
            arguments["pruner"] = kwargs.pop("pruner", None) or self.optuna_pruner()
        else:
            arguments["scheduler"] = kwargs.pop("scheduler", None) or self.ray_scheduler(direction[:3])
        arguments.update(kwargs)
        return arguments


def _set_by_user(args: Any, name: str) -> bool:
    value = getattr(args, name, None)
    if name == "freeze_strategy":
        return value not in (None, "none")
    if name == "max_steps":
        return value not in (None, -1)
    if name == "eval_strategy":
        return str(getattr(value, "value", value)) not in ("no", "None")
    return value is not None


def _objective(metric: str) -> Callable[[Dict[str, float]], float]:
    def objective(metrics: Dict[str, float]) -> float:
        if metric not in metrics:
            raise KeyError(
                f"the evaluation metrics have no {metric!r} (they have {sorted(metrics)}); pass `compute_metrics` "
                f"to the Trainer, or name one of these as the metric")
        return float(metrics[metric])

    objective.__name__ = f"objective_{metric}"
    return objective


def _ray_space(space: SearchSpace) -> Callable[[Any], Dict[str, Any]]:
    from ray import tune

    distributions: Dict[str, Any] = {}
    for parameter in space.parameters:
        if parameter.kind == "categorical":
            distributions[parameter.name] = tune.choice(list(parameter.choices))
        elif parameter.kind == "int":
            step = int(parameter.step or 1)
            low, high = int(parameter.low), int(parameter.high)
            distributions[parameter.name] = (
                tune.lograndint(low, high + 1) if parameter.log else tune.qrandint(low, high, step)
            )
        elif parameter.log:
            distributions[parameter.name] = tune.loguniform(parameter.low, parameter.high)
        elif parameter.step:
            distributions[parameter.name] = tune.quniform(parameter.low, parameter.high, parameter.step)
        else:
            distributions[parameter.name] = tune.uniform(parameter.low, parameter.high)
    return lambda trial: dict(distributions)
