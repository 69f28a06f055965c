"""Configuration files: read a YAML (or JSON) mapping, and parse ``script.py config.yaml --option value``."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Iterable, List, Optional

from ..errors import FreezeConfigError
from ..logs import get_logger
from ..policies import STRATEGIES
from ..policies.core import common_options
from .arguments import freeze_fields
from .types import unknown_keys

logger = get_logger(__name__)

__all__ = ["load_config_file", "parse_args_with_config_file"]


def load_config_file(path: str) -> Dict[str, Any]:
    """The mapping in a YAML (or JSON) file; a `FreezeConfigError` when it cannot be read as one, or when a key is
    given twice (PyYAML would keep the last one silently)."""
    import yaml

    if not os.path.isfile(path):
        raise FreezeConfigError(f"Configuration file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_unique_key_loader())
    except yaml.YAMLError as error:
        raise FreezeConfigError(f"{path} is not valid YAML: {error}") from None
    except _DuplicateKey as duplicate:
        key, line = duplicate.args
        raise FreezeConfigError(
            f"{path}: key {key!r} is given twice (again on line {line}); YAML would keep only the last value. "
            "Keep one.", fields=[str(key)],
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise FreezeConfigError(f"{path} must hold a mapping of option: value (got a {type(values).__name__}).")
    return values


class _DuplicateKey(Exception):
    pass


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _without_other_strategys_options(values: Dict[str, Any], command_line: List[str]) -> Dict[str, Any]:
    """The file's values, less the `freeze_*` options the command line's strategy does not read."""
    given = {token[2:].split("=", 1)[0].replace("-", "_") for token in command_line if token.startswith("--")}
    strategy = _command_line_value(command_line, "freeze_strategy")
    if strategy is None or strategy == values.get("freeze_strategy", "none") or strategy not in STRATEGIES:
        return values
    read = set(common_options(freeze_fields())) | set(STRATEGIES.get(strategy).options)
    dropped = sorted(key for key in values if key.startswith("freeze_") and key not in read and key not in given)
    if dropped:
        logger.info(
            f"--freeze_strategy {strategy} replaces the file's {values.get('freeze_strategy', 'none')!r}: dropped the "
            f"file's {', '.join(dropped)}, which {strategy!r} does not read."
        )
    return {key: value for key, value in values.items() if key not in dropped}


def _command_line_value(tokens: List[str], name: str) -> Optional[str]:
    for index, token in enumerate(tokens):
        option, equals, value = token.partition("=")
        if option.startswith("--") and option[2:].replace("-", "_") == name:
            return value if equals else (tokens[index + 1] if index + 1 < len(tokens) else None)
    return None


def parse_args_with_config_file(parser, args: Optional[Iterable[str]] = None) -> tuple:
    """`parser.parse_args_into_dataclasses`, where the first argument may be a YAML/JSON file of defaults.

    ``script.py config.yaml --learning_rate 1e-4`` reads the file, refuses its unknown keys (naming the closest
    valid ones), then lets the command line override it: the file alone works as in `run_glue.py`, and one setting
    can change without editing it. When the command line changes `freeze_strategy`, the file's options that only its
    own strategy reads are dropped (an INFO line names them): ``main.yaml --freeze_strategy none`` works although
    the file sets `freeze_layers` for 'bottom'.

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> from hf_freeze import FreezeArguments
    >>> from hf_freeze.config import parse_args_with_config_file
    >>> (args,) = parse_args_with_config_file(HfArgumentParser(FreezeArguments), ["--freeze_strategy", "top",
    ...                                                                           "--freeze_layers", "2"])
    >>> args.freeze_layers
    2
    ```
    """
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0].endswith((".yaml", ".yml", ".json")):
        values = load_config_file(args[0])
        unknown = unknown_keys(values, parser.dataclass_types)
        if unknown:
            raise FreezeConfigError(f"{args[0]}: " + "; ".join(map(str, unknown)) + ".")
        values = _without_other_strategys_options(values, args[1:])
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # the file gives it
        parser.set_defaults(**values)
        args = args[1:]
    _refuse_unknown_options(parser, args)
    return parser.parse_args_into_dataclasses(args=args)


def _refuse_unknown_options(parser, args: List[str]) -> None:
    """A misspelled option is named first: building the dataclasses would otherwise judge the others without it
    (``--freeze_stratgy bottom --freeze_layers 1`` would read as 'none' given `freeze_layers`)."""
    _, extra = parser.parse_known_args(args=args)
    given = {token[2:].split("=", 1)[0].replace("-", "_"): None for token in extra if token.startswith("--")}
    unknown = unknown_keys(given, parser.dataclass_types)
    if unknown:
        raise FreezeConfigError("; ".join(f"command line: {problem}" for problem in unknown) + ".",
                                fields=[problem.fields[0] for problem in unknown])

