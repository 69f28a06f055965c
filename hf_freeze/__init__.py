"""hf_freeze: freeze model layers by policy in the Hugging Face Trainer.

The flow is model → blocks (`hf_freeze.model`) → decision (`hf_freeze.policies`, with scores measured by
`hf_freeze.scores`) → application (`hf_freeze.apply`) → report (`hf_freeze.report`); `hf_freeze.integrations` plugs
it into a loop: `FreezeCallback` for the Trainer, `LayerFreezer` for any other. The options are `FreezeArguments`
(`hf_freeze.config`); `hf_freeze.tools` holds the `hf-freeze` command.

Exported here: what a user needs, and the extension points for a new strategy (`Strategy`, `register_strategy`) or
a new adaptive score (`Score`, `ScoreMeter`, `register_score`). Everything else stays importable from its module.
"""

from .config import FreezeArguments, FreezeTrainingArguments
from .errors import FreezeConfigError, LayerDiscoveryError
from .integrations import FreezeCallback, LayerFreezer
from .integrations.reference import reference_model
from .model import Block, ModelLayout, discover_layout
from .policies import (
    SCORES,
    STRATEGIES,
    FreezeDecision,
    Score,
    Strategy,
    TrainingProgress,
    decide,
    register_score,
    register_strategy,
)
from .scores import ScoreMeter

__version__ = "0.1.0"

__all__ = [
    "Block",
    "FreezeArguments",
    "FreezeCallback",
    "FreezeConfigError",
    "FreezeDecision",
    "FreezeTrainingArguments",
    "LayerDiscoveryError",
    "LayerFreezer",
    "ModelLayout",
    "SCORES",
    "STRATEGIES",
    "Score",
    "ScoreMeter",
    "Strategy",
    "TrainingProgress",
    "decide",
    "discover_layout",
    "reference_model",
    "register_score",
    "register_strategy",
]
