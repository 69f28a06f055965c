"""The torch side of adaptive freezing: meters that measure per-layer scores, and the probe that runs them.

One file a meter. The built-in scores are registered here, in `hf_freeze.policies.scoring.SCORES`, without importing
torch: each entry's meter imports its file when a probe first measures it, so that checking a configuration
(`freeze_score: snr`) needs neither torch nor the meters. They register in the order `--help` lists them in. The
meters and the probe are imported from their files on first access (PEP 562).
"""

import importlib
from typing import Any, Callable

from ..policies.scoring import SCORES, Score, register_score

__all__ = [
    "SCORES",
    "WEIGHT_SAMPLE_SIZE",
    "GradNormChangeMeter",
    "GradNormMeter",
    "LayerProbe",
    "Layers",
    "Score",
    "ScoreMeter",
    "SnrMeter",
    "WeightChangeMeter",
    "matrix_snr",
    "register_score",
]

# Torch-side names -> the file (of this package) that defines them.
_LAZY = {
    "GradNormChangeMeter": "grad_norm",
    "GradNormMeter": "grad_norm",
    "LayerProbe": "probe",
    "Layers": "meter",
    "ScoreMeter": "meter",
    "SnrMeter": "snr",
    "WEIGHT_SAMPLE_SIZE": "weight_change",
    "WeightChangeMeter": "weight_change",
    "matrix_snr": "snr",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _meter(name: str) -> Callable[..., Any]:
    """``(layers, seed) -> ScoreMeter`` for the meter class ``name``: its file (and torch) is imported on first use."""

    def build(layers, seed: int = 0):
        return __getattr__(name)(layers, seed)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Builds a `hf_freeze.scores.{name}` (imported when first measured)."
    return build


register_score(
    Score("weight_change", _meter("WeightChangeMeter"), True, "Relative weight change |dw|/|w| over the probe (Exploring Selective Layer Freezing Strategies).")
)
register_score(Score("grad_norm", _meter("GradNormMeter"), True, "Mean gradient norm over the probe."))
register_score(
    Score(
        "grad_norm_change", _meter("GradNormChangeMeter"), True,
        "Relative change of the gradient norm between the probe's halves (AutoFreeze); needs 2+ probe steps.",
        min_probe_steps=2,
    )
)
register_score(Score("snr", _meter("SnrMeter"), False, "Signal-to-noise ratio of the weight matrices, no probe (Spectrum)."))
