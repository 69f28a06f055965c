"""The registry of per-layer scores that adaptive policies select from.

This is the pure side: a `Score` names its meter and says whether it needs a probe and how long the shortest one
is, which is all the adaptive policy reads. The meters themselves (torch) live in `hf_freeze.scores`, one file a
score, each registering itself here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import Registry

__all__ = ["SCORES", "Score", "register_score"]


@dataclass(frozen=True)
class Score:
    """A registered layer score.

    Args:
        name: The `freeze_score` value.
        meter: ``(layers, seed) -> ScoreMeter``: the class (or factory) that measures it (`hf_freeze.ScoreMeter`).
        needs_probe: True when the score is measured over probe steps; False when read off the weights at once.
        description: One line for docs.
        min_probe_steps: The shortest probe the score can be measured over.

    Example:

    ```python
    >>> from hf_freeze import SCORES
    >>> SCORES.get("snr").needs_probe
    False
    ```
    """

    name: str
    meter: Callable[..., Any]
    needs_probe: bool = True
    description: str = ""
    min_probe_steps: int = 1


SCORES: Registry[Score] = Registry("score", field="freeze_score")


def register_score(score: Score) -> Score:
    """Make ``score`` available as ``freeze_score: <score.name>`` for ``freeze_strategy: adaptive``.

    Example:

    ```python
    >>> from hf_freeze import SCORES, Score, ScoreMeter, register_score
    >>> class WeightNorm(ScoreMeter):  # one number per layer; higher = more to learn
    ...     def finish(self):
    ...         return [sum(float(p.detach().norm()) for _, p in parameters) for _, parameters in self.layers]
    >>> _ = register_score(Score("weight_norm_example", WeightNorm, needs_probe=False, description="Weight norm."))
    >>> SCORES.get("weight_norm_example").needs_probe
    False
    ```
    """
    return SCORES.add(score.name, score)

