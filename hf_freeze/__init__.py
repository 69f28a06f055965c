"""hf_freeze: freeze model layers by policy in the Hugging Face Trainer.

The flow is model → blocks (`discovery`) → decision (`policies`) → application (`applier`) → report (`report`);
`FreezeCallback` glues it to the Trainer, `LayerFreezer` to any other training loop.
"""

from .applier import AppliedChange, FreezeApplier, optimizer_state_bytes, trainable_parameter_count
from .callback import FreezeCallback
from .checkpointing import FrozenPrefix, FrozenPrefixHooks, frozen_prefix
from .config import FreezeArguments, FreezeTrainingArguments
from .discovery import discover_layout
from .errors import FreezeConfigError, LayerDiscoveryError
from .freezer import LayerFreezer
from .layout import Block, ModelLayout
from .peft_guard import peft_adapter_reason
from .probe import LayerProbe
from .scores import SCORES, Score, register_score
from .policies import (
    STRATEGIES,
    FreezeDecision,
    Strategy,
    TrainingProgress,
    decide,
    register_strategy,
    registration_decision,
)
from .report import format_block_table, freeze_metrics
from .timeline import FreezeTimeline, plot_timeline, simulate_timeline

__version__ = "0.1.0"

__all__ = [
    "AppliedChange",
    "Block",
    "FreezeApplier",
    "FreezeArguments",
    "FreezeCallback",
    "FreezeConfigError",
    "FreezeDecision",
    "FreezeTimeline",
    "FreezeTrainingArguments",
    "FrozenPrefix",
    "FrozenPrefixHooks",
    "LayerDiscoveryError",
    "LayerFreezer",
    "LayerProbe",
    "ModelLayout",
    "SCORES",
    "STRATEGIES",
    "Score",
    "Strategy",
    "TrainingProgress",
    "decide",
    "discover_layout",
    "format_block_table",
    "freeze_metrics",
    "frozen_prefix",
    "optimizer_state_bytes",
    "peft_adapter_reason",
    "plot_timeline",
    "register_score",
    "register_strategy",
    "registration_decision",
    "simulate_timeline",
    "trainable_parameter_count",
]
