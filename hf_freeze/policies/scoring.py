"""The registry of per-layer scores that adaptive policies select from.

This is the pure side: a `Score` names its meter and says whether it needs a probe and how long the shortest one
is, which is all the adaptive policy reads. The meters themselves (torch) live in `hf_freeze.scores`, one file a
score. The built-in scores are registered at the end of this file, each naming its meter by its dotted path, which the
probe imports when it first measures the score: checking a configuration (`freeze_score: snr`) needs neither torch
nor the meters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from ..registry import Registry

__all__ = ["SCORES", "Score", "register_score"]


@dataclass(frozen=True)
class Score:
    """A registered layer score.

    Args:
        name: The `freeze_score` value.
        meter: ``(layers, seed) -> ScoreMeter``: the class (or factory) that measures it (`hf_freeze.ScoreMeter`),
            or its dotted path (``"package.module.ClassName"``), imported when the score is first measured.
        needs_probe: True when the score is measured over probe steps; False when read off the weights at once.
        description: What it measures, a phrase: `freeze_score`'s help lists it after the name.
        min_probe_steps: The shortest probe the score can be measured over.

    Example:

    ```python
    >>> from hf_freeze import SCORES
    >>> SCORES.get("snr").needs_probe
    False
    ```
    """

    name: str
    meter: Union[str, Callable[..., Any]]
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



# The built-in scores, in the order `--help` and the option page list them.
register_score(
    Score(
        name="weight_change", meter="hf_freeze.scores.weight_change.WeightChangeMeter", needs_probe=True,
        description=(
            "relative weight change |dw|/|w| over the probe (the adaptive strategy of the paper Exploring Selective "
            "Layer Freezing Strategies in Transformer Fine-Tuning)"
        ),
    )
)
register_score(
    Score(
        name="grad_norm", meter="hf_freeze.scores.grad_norm.GradNormMeter", needs_probe=True,
        description="mean gradient norm over the probe",
    )
)
register_score(
    Score(
        name="grad_norm_change", meter="hf_freeze.scores.grad_norm.GradNormChangeMeter", needs_probe=True,
        description=(
            "relative change of the gradient norm between the probe's halves, low when it has settled (AutoFreeze; "
            "2 or more probe steps)"
        ),
        min_probe_steps=2,
    )
)
register_score(
    Score(
        name="snr", meter="hf_freeze.scores.snr.SnrMeter", needs_probe=False,
        description=(
            "signal-to-noise ratio of the weight matrices against the Marchenko-Pastur noise edge, measured without "
            "a probe (Spectrum)"
        ),
    )
)
