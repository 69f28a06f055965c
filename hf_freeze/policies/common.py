"""Pieces the strategies share: counts and fractions of layers, the parameters of layers, the frozen-prefix rule."""

from __future__ import annotations

from typing import Any, Iterable, List

from ..errors import FreezeConfigError, invalid
from ..model.layout import EMBEDDINGS, LAYER, NORM, OTHER, ModelLayout

__all__ = ["bottom_prefix", "layer_parameters", "require_layers", "resolve_count"]


def resolve_count(value: Any, num_layers: int, field_name: str = "freeze_layers") -> int:
    """Turn a count or a fraction of layers into a count, refusing values the model cannot honour."""
    if value is None:
        raise invalid(field_name, value, f"set: a count of layers (1..{num_layers}) or a fraction in (0, 1)")
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value < 1:
            raise invalid(field_name, value, f"a whole count of layers (0..{num_layers}) or a fraction in (0, 1)")
        count = int(value * num_layers + 0.5)
        if count == 0:
            raise invalid(
                field_name, value, f"a fraction that selects at least one of the {num_layers} layers (>= {0.5 / num_layers:.3g})"
            )
        return count
    count = int(value)
    if not 0 <= count <= num_layers:
        raise invalid(field_name, value, f"between 0 and the model's {num_layers} layers")
    return count


def layer_parameters(layout: ModelLayout, indices: Iterable[int]) -> List[str]:
    """The parameter names of the layers at ``indices``."""
    wanted = set(indices)
    return [name for block in layout.layers if block.layer_index in wanted for name in block.parameters]


def require_layers(layout: ModelLayout, strategy: str) -> int:
    if layout.num_layers == 0:
        raise FreezeConfigError(
            f"`freeze_strategy` {strategy!r} needs layers, and this model has none discovered. Name the layer "
            "containers with `freeze_layer_paths`, or choose 'pattern'.",
            fields=["freeze_strategy"],
        )
    return layout.num_layers


def bottom_prefix(layout: ModelLayout, options: Any, layers: Iterable[int], embeddings: bool = True) -> List[str]:
    """The frozen-prefix rule: the given layers, and what sits below them when they include layer 0.

    While anything below a frozen layer trains, backward runs through the frozen layers anyway and freezing them
    saves nothing; so the input embeddings freeze with layer 0 (when ``embeddings`` and the user left
    `freeze_embeddings` unset), and a norm between two stacks (T5's ``encoder.final_layer_norm`` when the whole
    encoder is frozen) freezes with the layers around it (when `freeze_norm` is unset).
    """
    chosen = sorted(set(layers))
    if not chosen:
        return []
    frozen = layer_parameters(layout, chosen)
    if chosen[0] != 0:
        return frozen
    if embeddings and options.freeze_embeddings is None:
        frozen += layout.parameters_of(layout.blocks_of_kind(EMBEDDINGS))
    if options.freeze_norm is None:
        contiguous = 0
        while contiguous < len(chosen) and chosen[contiguous] == contiguous:
            contiguous += 1
        for block in layout.blocks:
            if block.kind == LAYER and block.layer_index is not None and block.layer_index >= contiguous:
                break
            if block.kind in (NORM, OTHER):
                frozen += block.parameters
    return frozen
