"""Configuration: the typed `freeze_*` options, the one type checker, configuration files. (`hf-freeze validate`,
every problem of a file at once, is a tool: `hf_freeze.tools.validate`.)"""

from .arguments import FreezeArguments, FreezeTrainingArguments, freeze_fields
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
