"""Configuration: the typed `freeze_*` options, the one type checker, configuration files. (`hf-freeze validate`,
every problem of a file at once, is a tool: `hf_freeze.tools.validate`.)

`FreezeTrainingArguments` is imported from `.training` on first access (PEP 562): transformers' `TrainingArguments`
imports torch, which the `freeze_*` options alone do not need.
"""

from .arguments import FreezeArguments, freeze_fields
from .files import load_config_file, parse_args_with_config_file
from .sources import arguments_from, freeze_arguments_from, raise_if_unknown, resolve_arguments
from .types import ConfigProblem, unknown_keys

__all__ = [
    "ConfigProblem",
    "FreezeArguments",
    "FreezeTrainingArguments",
    "arguments_from",
    "freeze_arguments_from",
    "freeze_fields",
    "load_config_file",
    "parse_args_with_config_file",
    "raise_if_unknown",
    "resolve_arguments",
    "unknown_keys",
]


def __getattr__(name: str):
    if name != "FreezeTrainingArguments":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .training import FreezeTrainingArguments

    globals()[name] = FreezeTrainingArguments
    return FreezeTrainingArguments


def __dir__():
    return sorted(set(globals()) | set(__all__))
