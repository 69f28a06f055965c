"""Training a few rows of frozen parameters, in the pure policies: which rows of which parameters train.

`freeze_trainable_tokens` names token ids (or ``new``: the rows past the vocabulary the model was loaded with); their
rows of the input embeddings and of the output embeddings (the LM head, tied or not) train. `freeze_trainable_experts`
names experts whose slices of the fused routed-expert tensors train. axolotl's row ranges (`name$[:32000]`, with
`freeze_pattern_syntax: axolotl`) name rows of whatever parameters the pattern matches. A parameter with trainable
rows is frozen as a whole; the applier trains its rows as a small parameter of their own, so that weight decay, the
optimizer state and gradient clipping only ever see those rows.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import FreezeConfigError, invalid
from ..model.layout import ROUTED_EXPERTS, ModelLayout

__all__ = ["ROW_OPTIONS", "check_row_options", "parse_expert_items", "row_selection", "trainable_row_elements"]

TOKENS = "freeze_trainable_tokens"
EXPERTS = "freeze_trainable_experts"
ROW_OPTIONS = (TOKENS, EXPERTS)
NEW_TOKENS = "new"
_LAYER_EXPERT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

RowMap = Dict[str, Tuple[int, ...]]


def check_row_options(options: Any) -> None:
    """Configuration-time checks that need no model: the shape of the token and expert lists."""
    tokens = getattr(options, TOKENS, None)
    if tokens is not None:
        words = [item for item in tokens if isinstance(item, str)]
        if words and (words != [NEW_TOKENS] or len(tokens) != 1):
            raise invalid(TOKENS, tokens, "a list of token ids (integers >= 0), or 'new' alone")
        if any(isinstance(item, int) and item < 0 for item in tokens):
            raise invalid(TOKENS, tokens, "token ids >= 0")
    experts = getattr(options, EXPERTS, None)
    if experts is not None:
        parse_expert_items(experts)


def parse_expert_items(items: Sequence[Any]) -> List[Tuple[Optional[int], int]]:
    """``[(layer or None for every layer, expert), ...]`` from `freeze_trainable_experts` items: an integer (that
    expert in every mixture-of-experts layer) or ``"layer:expert"``."""
    parsed = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            parsed.append((None, item))
            continue
        match = _LAYER_EXPERT.match(item) if isinstance(item, str) else None
        if match is None:
            raise invalid(
                EXPERTS, list(items), "a list of expert indices (integers >= 0: that expert in every layer) or "
                "'layer:expert' strings (e.g. '0:3', expert 3 of layer 0)", hint=f"{item!r} is neither.",
            )
        parsed.append((int(match.group(1)), int(match.group(2))))
    return parsed


def row_selection(layout: ModelLayout, options: Any, pattern_rows: Optional[RowMap] = None) -> RowMap:
    """The trainable rows of every parameter that trains by rows: ``{parameter name: sorted row indices}``.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> from hf_freeze import Block, ModelLayout
    >>> from hf_freeze.policies.row_selection import row_selection
    >>> layout = ModelLayout((Block("embed", "embeddings", ("embed.weight",), (40,)),),
    ...                      input_embedding_parameters=("embed.weight",), row_counts={"embed.weight": 10}, base_vocabulary=8)
    >>> row_selection(layout, SimpleNamespace(freeze_trainable_tokens=["new"], freeze_trainable_experts=None))
    {'embed.weight': (8, 9)}
    ```
    """
    rows: Dict[str, set] = {}
    for name, indices in (pattern_rows or {}).items():
        rows.setdefault(name, set()).update(indices)
    tokens = getattr(options, TOKENS, None)
    if tokens is not None:
        for name, ids in _token_rows(layout, tokens).items():
            rows.setdefault(name, set()).update(ids)
    experts = getattr(options, EXPERTS, None)
    if experts is not None:
        for name, ids in _expert_rows(layout, experts).items():
            rows.setdefault(name, set()).update(ids)
    return {name: tuple(sorted(indices)) for name, indices in rows.items()}


def _token_rows(layout: ModelLayout, tokens: Sequence[Any]) -> Dict[str, List[int]]:
    owners = list(dict.fromkeys(
        name for name in (*layout.input_embedding_parameters, *layout.output_embedding_parameters) if name in layout.row_counts
    ))
    if not owners:
        raise invalid(TOKENS, list(tokens), "unset on this model", hint="Discovery found no token embedding matrix in it.")
    vocabulary = layout.row_counts[owners[0]]
    if tokens == [NEW_TOKENS]:
        base = layout.base_vocabulary
        if base is None:
            raise FreezeConfigError(
                f"`{TOKENS}` is 'new', but the vocabulary size before resizing is unknown: the model was not loaded with "
                "`from_pretrained` from a checkpoint hf_freeze can read (its config.json), and no earlier freezer "
                f"recorded it. List the new token ids instead (e.g. `{TOKENS}: [{vocabulary - 1}]`), or build the "
                "freezer before `resize_token_embeddings`.",
                fields=[TOKENS],
            )
        if base >= vocabulary:
            raise FreezeConfigError(
                f"`{TOKENS}` is 'new', but this model's vocabulary was never resized (it has {vocabulary} tokens, as "
                f"loaded): there are no new tokens. Call `resize_token_embeddings` after adding tokens, or list token "
                f"ids in [0, {vocabulary - 1}].",
                fields=[TOKENS],
            )
        ids = list(range(base, vocabulary))
    else:
        ids = list(tokens)
    rows = {}
    for name in owners:
        count = layout.row_counts[name]
        outside = [token for token in ids if token >= count]
        if outside:
            raise invalid(
                TOKENS, list(tokens), f"token ids in [0, {count - 1}] (the vocabulary of {name})",
                hint=f"{outside[:5]} {'is' if len(outside) == 1 else 'are'} outside it.",
            )
        rows[name] = ids
    return rows


def _expert_rows(layout: ModelLayout, items: Sequence[Any]) -> Dict[str, List[int]]:
    by_layer: Dict[int, List[str]] = {}
    blocks = layout.block_of()
    for name in layout.components.get(ROUTED_EXPERTS, ()):
        if name in layout.row_counts and name in blocks and blocks[name].layer_index is not None:
            by_layer.setdefault(blocks[name].layer_index, []).append(name)
    if not by_layer:
        kind = "its routed experts are not fused 3-D tensors" if layout.components.get(ROUTED_EXPERTS) else "a dense model"
        raise invalid(EXPERTS, list(items), "unset on this model", hint=f"Discovery found {kind}: there are no expert slices to train.")
    rows: Dict[str, List[int]] = {}
    for layer, expert in parse_expert_items(items):
        if layer is not None and layer not in by_layer:
            raise invalid(
                EXPERTS, list(items), f"'layer:expert' with a mixture-of-experts layer index in {_span(sorted(by_layer))}",
                hint=f"Layer {layer} has no routed experts.",
            )
        for index in ([layer] if layer is not None else sorted(by_layer)):
            for name in by_layer[index]:
                if expert >= layout.row_counts[name]:
                    raise invalid(
                        EXPERTS, list(items), f"expert indices in [0, {layout.row_counts[name] - 1}] (layer {index} has "
                        f"{layout.row_counts[name]} routed experts)", hint=f"Expert {expert} does not exist.",
                    )
                rows.setdefault(name, []).append(expert)
    return rows


def _span(indices: Sequence[int]) -> str:
    return f"[{indices[0]}, {indices[-1]}]" if indices == list(range(indices[0], indices[-1] + 1)) else str(list(indices))


def trainable_row_elements(layout: ModelLayout, trainable_rows: Optional[Mapping[str, Sequence[int]]]) -> Dict[str, int]:
    """The elements that train of each frozen parameter with trainable rows."""
    sizes = layout.parameter_sizes
    return {
        name: len(rows) * (sizes[name] // layout.row_counts[name])
        for name, rows in (trainable_rows or {}).items()
        if name in sizes and layout.row_counts.get(name)
    }
