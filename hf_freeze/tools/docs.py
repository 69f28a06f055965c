"""Generate the documentation's reference of `freeze_*` options and strategies from the code, so the two cannot drift.

    python -m hf_freeze.tools.docs            # rewrite the generated blocks of docs/options.md
    python -m hf_freeze.tools.docs --check    # exit 1 when docs/options.md is out of date (the tests do this)

The options table is built from `dataclasses.fields(FreezeArguments)` and their ``help`` metadata, the strategies
table from the `STRATEGIES` registry: a new field or strategy appears after one run of the command above.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from typing import Any, Optional, Sequence

from ..config import FreezeArguments
from ..errors import one_of
from ..policies import STRATEGIES

__all__ = ["default_page", "render_options", "render_strategies", "update_page"]

_BLOCKS = {"options": "render_options", "strategies": "render_strategies"}
_MARKER = "<!-- hf_freeze.docs:{name}:{edge} -->"


def _type_name(hint: Any, plural: bool = False) -> str:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _type_name(args[0])
    if typing.get_origin(hint) in (list, typing.List):
        return f"list of {_type_name(typing.get_args(hint)[0], plural=True)}"
    if typing.get_origin(hint) is typing.Literal:
        return one_of(typing.get_args(hint))  # the words of the validator's error
    names = {bool: "true/false", int: "integer", float: "number", str: "string"}
    name = names.get(hint, getattr(hint, "__name__", str(hint)))
    return name + "s" if plural and hint in names and hint is not bool else name


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_options(dataclass_type: type = FreezeArguments) -> str:
    """A Markdown table of every field of ``dataclass_type``: name, type, default, help text."""
    hints = typing.get_type_hints(dataclass_type)
    lines = ["| option | type | default | what it does |", "| --- | --- | --- | --- |"]
    for item in dataclasses.fields(dataclass_type):
        if item.default is not dataclasses.MISSING:
            default = "unset" if item.default is None else f"`{item.default!r}`"
        elif item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f"`{item.default_factory()!r}`"  # type: ignore[misc]
        else:
            default = "required"
        help_text = item.metadata.get("help", "")
        lines.append(f"| `{item.name}` | {_type_name(hints[item.name])} | {default} | {_cell(help_text)} |")
    return "\n".join(lines)


def render_strategies() -> str:
    """A Markdown table of every registered `freeze_strategy`: whether it changes during training, its options."""
    lines = ["| `freeze_strategy` | changes during training | options it reads | what it does |", "| --- | --- | --- | --- |"]
    for name in STRATEGIES.names():
        strategy = STRATEGIES.get(name)
        options = ", ".join(f"`{option}`" for option in strategy.options) or "none"
        lines.append(
            f"| `{name}` | {'yes' if strategy.dynamic else 'no'} | {options} | {_cell(strategy.description)} |"
        )
    return "\n".join(lines)


def _replace_block(text: str, name: str, content: str) -> str:
    start, end = _MARKER.format(name=name, edge="start"), _MARKER.format(name=name, edge="end")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"The page has no generated block {name!r}: add the lines {start} and {end} where it belongs.")
    return pattern.sub(lambda _: f"{start}\n{content}\n{end}", text)


def update_page(path: str, check: bool = False) -> bool:
    """Rewrite the generated blocks of the Markdown page at ``path``; with ``check``, only say whether it is up to date.

    Returns True when the file was already up to date.
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    updated = text
    for name, renderer in _BLOCKS.items():
        updated = _replace_block(updated, name, globals()[renderer]())
    if updated != text and not check:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(updated)
    return updated == text


def default_page() -> str:
    """The repository's docs/options.md (hf_freeze/tools/docs.py -> the folder above hf_freeze/)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "docs", "options.md")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_freeze.tools.docs", description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", default=default_page(), help="the Markdown page to update")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date, change nothing")
    args = parser.parse_args(argv)
    up_to_date = update_page(args.page, check=args.check)
    if args.check and not up_to_date:
        print(f"{args.page} is out of date with the freeze_* options: run `python -m hf_freeze.tools.docs`.", file=sys.stderr)
        return 1
    print(f"{args.page}: {'up to date' if up_to_date else 'updated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
