"""The torch side of adaptive freezing: meters that measure per-layer scores, and the probe that runs them.

One file a score, each registering itself in `hf_freeze.policies.scoring.SCORES` (built-in ones register in the
order of this import list, which is the order `--help` lists them in).
"""

from . import weight_change  # noqa: F401, I001
from . import grad_norm  # noqa: F401
from . import snr  # noqa: F401
from ..policies.scoring import SCORES, Score, register_score
from .grad_norm import GradNormChangeMeter, GradNormMeter
from .meter import Layers, ScoreMeter
from .probe import LayerProbe
from .snr import SnrMeter, matrix_snr
from .weight_change import WEIGHT_SAMPLE_SIZE, WeightChangeMeter

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
