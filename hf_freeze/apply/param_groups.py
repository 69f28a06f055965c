"""The optimizer's param groups, built before the optimizer exists: the Trainer's weight-decay split, and one group
per learning rate when an add-on sets rates (`freeze_learning_rates`, `freeze_layer_lr_decay`).

Groups must exist when the optimizer is built: a scheduler keeps one entry per group from its construction on
(LambdaLR's `lr_lambdas` and `base_lrs`, read from each group's ``initial_lr``), and `Optimizer.load_state_dict`
refuses a saved state with another number of groups, so groups added later break both the schedule and resuming.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Tuple

from torch import nn

__all__ = ["GROUP_KEY", "decay_parameter_names", "parameter_groups", "rate_metrics"]

# The key of a param group that names its learning-rate group (kept by torch in the optimizer's state dict).
GROUP_KEY = "hf_freeze_group"
# transformers' Trainer keeps these out of weight decay (`Trainer.get_decay_parameter_names`): every parameter of an
# `nn.LayerNorm`, and names matching these patterns once lower-cased.
_NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> List[str]:
    """The parameters the Trainer's default rule gives weight decay (`Trainer.get_decay_parameter_names`)."""
    from transformers.trainer_pt_utils import get_parameter_names

    return get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_NAME_PATTERNS)


def parameter_groups(
    named_parameters: Iterable[Tuple[str, nn.Parameter]], learning_rate: float, weight_decay: float,
    decay_names: Collection[str], rate_of: Optional[Callable[[str], Any]] = None,
) -> List[Dict[str, Any]]:
    """Param groups over ``named_parameters`` (the trainable ones), split as the Trainer splits them.

    Without ``rate_of``: the Trainer's two groups, with weight decay and without. With it (``name ->`` a
    `hf_freeze.add_on.LearningRate` or ``None`` for the base rate): those two per learning-rate group, each with its
    ``lr`` and its name under `GROUP_KEY`; empty groups are left out, and the groups at the base rate come first (the
    Trainer logs the first group's rate as ``learning_rate``).

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_freeze.add_on import LearningRate
    >>> from hf_freeze.apply.param_groups import parameter_groups
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> rates = {"0.weight": LearningRate("layer.0", None, 0.5), "0.bias": LearningRate("layer.0", None, 0.5)}
    >>> groups = parameter_groups(net.named_parameters(), 1e-3, 0.01, {"0.weight", "1.weight"}, rates.get)
    >>> [(group["hf_freeze_group"], group["lr"], group["weight_decay"], len(group["params"])) for group in groups]
    [('base', 0.001, 0.01, 1), ('base', 0.001, 0.0, 1), ('layer.0', 0.0005, 0.01, 1), ('layer.0', 0.0005, 0.0, 1)]
    ```
    """
    decay_names = decay_names if isinstance(decay_names, (set, frozenset)) else set(decay_names)
    named = list(named_parameters)
    if rate_of is None:
        return [
            {"params": [p for n, p in named if n in decay_names], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
        ]
    groups: Dict[Tuple[str, bool], Dict[str, Any]] = {}
    at_base: List[Tuple[str, bool]] = []
    for name, parameter in named:
        rate = rate_of(name)
        group = rate.group if rate is not None else "base"
        key = (group, name in decay_names)
        if key not in groups:
            # Both halves of a rate group are created together, so that its decay half always comes first.
            for decays in (True, False):
                groups[(group, decays)] = {
                    "params": [], "lr": rate.value(learning_rate) if rate is not None else learning_rate,
                    "weight_decay": weight_decay if decays else 0.0, GROUP_KEY: group,
                }
            if rate is None or (rate.rate is None and rate.factor == 1.0):
                at_base += [(group, True), (group, False)]
        groups[key]["params"].append(parameter)
    order = at_base + [key for key in groups if key not in at_base]
    return [groups[key] for key in order if groups[key]["params"]]


def rate_metrics(param_groups: Iterable[Dict[str, Any]]) -> Dict[str, float]:
    """``freeze/lr/<group>``: the learning rate each named group trains at now (the scheduler's multiplier included)."""
    return {f"freeze/lr/{group[GROUP_KEY]}": group["lr"] for group in param_groups if GROUP_KEY in group}
