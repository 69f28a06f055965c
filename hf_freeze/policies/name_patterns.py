"""Parameter-name patterns of the 'pattern' strategy, in two syntaxes (`freeze_pattern_syntax`).

* ``regex`` (the default): a regular expression matched from the start of the name, where a '.' between name parts
  is a literal dot and ``.*``, ``.+``, ``.?`` keep their regex meaning.
* ``axolotl``: what axolotl does with `unfrozen_parameters`. Every '.' not followed by '+' is made literal (so
  ``model.layers.*mlp`` means "model.layers" followed by any number of dots and "mlp", and matches nothing in a
  usual model; an escaped ``\\.`` becomes a literal backslash before any character), the pattern is matched from
  the start of the name, and a trailing ``[start:end]`` (either end may be left out) or ``[index]`` is a range of
  rows, not part of the expression: ``model.embed_tokens.weight$[:32000]`` trains the first 32000 rows, and
  ``transformer.h.[23]`` would train row 23 of every parameter under ``transformer.h`` (not layers 2 and 3). A
  parameter matched by a pattern with a range trains only the rows of the ranges that match it, even when a
  pattern without a range matches it too.

Unlike axolotl, hf_freeze refuses a pattern that matches nothing, a row range on a parameter that is neither a token
embedding nor a fused expert tensor, and a range past the parameter's last row, before training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..errors import invalid, invalid_choice
from ..model.layout import ModelLayout

__all__ = ["PATTERN_SYNTAXES", "NamePattern", "parse_name_pattern", "pattern_rows"]

PATTERN_SYNTAXES = ("regex", "axolotl")
_ROW_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


@dataclass(frozen=True)
class NamePattern:
    """A compiled pattern and, in axolotl's syntax, its range of rows (``None``: the whole parameter).

    Example:

    ```python
    >>> from hf_freeze.policies.name_patterns import parse_name_pattern
    >>> pattern = parse_name_pattern("model.embed_tokens.weight$[:32000]", "freeze_trainable_patterns", "axolotl")
    >>> bool(pattern.regex.match("model.embed_tokens.weight")), pattern.rows
    (True, (None, 32000))
    ```
    """

    text: str
    regex: "re.Pattern[str]"
    rows: Optional[Tuple[Optional[int], Optional[int]]] = None

    def matches(self, name: str) -> bool:
        return self.regex.match(name) is not None


def parse_name_pattern(pattern: str, field_name: str, syntax: Optional[str] = None) -> NamePattern:
    """Compile ``pattern`` in ``syntax`` ('regex' unless given), refusing what cannot be compiled with the field."""
    syntax = syntax or "regex"
    if syntax not in PATTERN_SYNTAXES:
        raise invalid_choice("freeze_pattern_syntax", syntax, PATTERN_SYNTAXES)
    rows = None
    expression = pattern
    if syntax == "axolotl":
        match = _ROW_RANGE.match(pattern)
        if match is not None:
            expression, start, end = match.groups()
            if end is None and start.isdecimal():
                rows = (int(start), int(start) + 1)
            else:
                rows = (int(start) if start else None, int(end) if end else None)
                if rows[0] is not None and rows[1] is not None and rows[0] >= rows[1]:
                    raise invalid(field_name, pattern, "a row range [start:end] with start < end")
        expression = re.sub(r"\.(?!\+)", r"\\.", expression)
    else:
        expression = re.sub(r"\.(?![*+?{])", r"\\.", pattern.replace("\\.", "."))
    try:
        return NamePattern(pattern, re.compile(expression), rows)
    except re.error as error:
        raise invalid(field_name, pattern, f"a valid regular expression in the {syntax!r} syntax ({error})") from None


def pattern_rows(layout: ModelLayout, options: Any) -> Dict[str, Tuple[int, ...]]:
    """The rows axolotl's row ranges train: ``{parameter name: rows}`` (empty without ranges)."""
    if getattr(options, "freeze_strategy", None) != "pattern" or getattr(options, "freeze_pattern_syntax", None) != "axolotl":
        return {}
    ranges: Dict[str, List[Tuple[int, int]]] = {}
    for text in options.freeze_trainable_patterns or []:
        pattern = parse_name_pattern(text, "freeze_trainable_patterns", "axolotl")
        if pattern.rows is None:
            continue
        for name in layout.parameter_names:
            if not pattern.matches(name):
                continue
            count = layout.row_counts.get(name)
            if count is None:
                raise invalid(
                    "freeze_trainable_patterns", text, "a row range only on token embeddings or fused expert tensors "
                    f"({', '.join(sorted(layout.row_counts)) or 'this model has none'})",
                    hint=f"It matches {name}, which hf_freeze cannot train by rows; drop the range to train it whole.",
                )
            start, end = pattern.rows[0] or 0, count if pattern.rows[1] is None else pattern.rows[1]
            if end > count or start >= end:
                raise invalid(
                    "freeze_trainable_patterns", text, f"a row range within [0:{count}] for {name}",
                    hint=f"Row {end - 1} does not exist.",
                )
            ranges.setdefault(name, []).append((start, end))
    return {name: tuple(sorted({row for start, end in spans for row in range(start, end)})) for name, spans in ranges.items()}
