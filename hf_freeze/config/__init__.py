"""Configuration: the typed `freeze_*` options, the one type checker, configuration files and their checks."""

from .arguments import FreezeArguments, FreezeTrainingArguments, freeze_fields
from .check import check_config, check_config_file
from .files import load_config_file, parse_args_with_config_file
from .sources import arguments_from, freeze_arguments_from, raise_if_unknown, resolve_arguments
from .types import ConfigProblem, unknown_keys

__all__ = [
    "ConfigProblem",
    "FreezeArguments",
    "FreezeTrainingArguments",
    "arguments_from",
    "check_config",
    "check_config_file",
    "freeze_arguments_from",
    "freeze_fields",
    "load_config_file",
    "parse_args_with_config_file",
    "raise_if_unknown",
    "resolve_arguments",
    "unknown_keys",
]
