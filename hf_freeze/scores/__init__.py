"""The torch side of adaptive freezing: meters that measure per-layer scores, and the probe that runs them.

One file a meter. The built-in scores are registered with the registry, in `hf_freeze.policies.scoring`, each
naming its meter here by dotted path; `build_meter` imports it when a probe first measures the score. The meters and
the probe are imported from their files on first access (PEP 562).
"""

import importlib
from typing import Any

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
    "build_meter",
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
    "build_meter": "meter",
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
