"""Application: the one place that changes a model and its optimizer to match a decision (`FreezeApplier`), and
the hooks that keep a frozen prefix out of the autograd graph under activation checkpointing."""

from .applier import AppliedChange, FreezeApplier, innermost_optimizer, optimizer_state_bytes
from .frozen_prefix import FrozenPrefix, FrozenPrefixHooks, frozen_prefix
from .eval_mode import FrozenModulesEval
from .health import HealthCheck
from .trainable_rows import TrainableRows, merge_rows_file, save_rows_file

__all__ = [
    "AppliedChange",
    "FreezeApplier",
    "FrozenModulesEval",
    "FrozenPrefix",
    "FrozenPrefixHooks",
    "HealthCheck",
    "TrainableRows",
    "frozen_prefix",
    "innermost_optimizer",
    "merge_rows_file",
    "optimizer_state_bytes",
    "save_rows_file",
]
