"""`ScoreMeter`: the interface a per-layer score is measured through, during an adaptive policy's probe.

A meter is told when the probe begins (`start`), sees the gradients before each optimizer step of the probe
(`observe_gradients`), is told when that step is withheld (`withheld_step`, `freeze_probe_mode: measure`: nothing
will move), and returns one number per layer when it ends (`finish`): higher = changed more, larger
gradients, more signal. Its state is JSON-safe and keyed by parameter name, so a checkpoint taken in the middle of
a probe resumes it exactly. Register a new score with `hf_freeze.register_score(Score(name, meter=YourMeter))`.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Layers", "ScoreMeter", "build_meter", "reads_gradients"]

# Layers in forward order: (block name, [(parameter name, parameter), ...]).
Layers = Sequence[Tuple[str, Sequence[Tuple[str, nn.Parameter]]]]


class ScoreMeter:
    """Measures one score for every layer. Subclasses override what they need.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_freeze import SCORES
    >>> from hf_freeze.scores import build_meter
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> layers = [(f"{i}", [(f"{i}.{name}", p) for name, p in module.named_parameters()]) for i, module in enumerate(net)]
    >>> meter = build_meter(SCORES.get("weight_change"), layers, 0)
    >>> meter.start()
    >>> _ = net[1].weight.data.mul_(2.0)
    >>> [round(score, 2) for score in meter.finish()][0]
    0.0
    ```
    """

    def __init__(self, layers: Layers, seed: int = 0):
        self.layers = [(name, list(parameters)) for name, parameters in layers]
        self.seed = seed

    def start(self) -> None:
        """The probe begins."""

    def observe_gradients(self) -> None:
        """Before an optimizer step of the probe (gradients are final)."""

    def withheld_step(self, optimizer) -> None:
        """After `observe_gradients`, when the probe withholds this optimizer step (`freeze_probe_mode: measure`):
        no parameter will move. A meter that scores what the step does takes it here, on its own copies.
        ``optimizer`` is the torch optimizer (``None`` when the training loop did not pass one)."""

    def finish(self) -> List[float]:
        """The probe ends: one score per layer."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    @property
    def device(self) -> torch.device:
        for _, parameters in self.layers:
            for _, parameter in parameters:
                return parameter.device
        return torch.device("cpu")


def build_meter(score: Any, layers: Layers, seed: int = 0) -> ScoreMeter:
    """A new meter of the registered `Score` ``score`` for ``layers``; a meter named by its dotted path (as the
    built-in scores name theirs) is imported here, when a probe first measures it."""
    return _meter_class(score)(layers, seed)


def reads_gradients(score: Any) -> bool:
    """Whether the registered `Score` ``score`` reads gradients before optimizer steps (`observe_gradients`), which an
    engine that steps inside ``backward`` (DeepSpeed) never offers."""
    meter = _meter_class(score)
    return not isinstance(meter, type) or getattr(meter, "observe_gradients", None) is not ScoreMeter.observe_gradients


def _meter_class(score: Any) -> Any:
    meter = score.meter
    if isinstance(meter, str):
        module, _, name = meter.rpartition(".")
        meter = getattr(importlib.import_module(module), name)
    return meter
