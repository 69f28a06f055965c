"""Pieces the strategies share: counts and fractions of layers, the parameters of layers, the frozen-prefix rule."""

from __future__ import annotations

from typing import Any, Iterable, List

from ..errors import FreezeConfigError, invalid
from ..model.layout import EMBEDDINGS, LAYER, NORM, OTHER, ModelLayout

__all__ = [
    "CACHE_DTYPES", "FROZEN_DTYPES", "bottom_prefix", "check_cache_options", "layer_parameters", "require_layers", "resolve_count",
]

CACHE_DTYPES = ("float32", "float16", "bfloat16")
# `freeze_frozen_dtype`: the storage dtype of frozen linear weights (`hf_freeze.apply.frozen_dtype`).
FROZEN_DTYPES = ("bfloat16", "float16", "none")
_CACHE_DETAILS = ("freeze_cache_memory_mb", "freeze_cache_dir", "freeze_cache_dtype", "freeze_cache_keep")


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


def check_cache_options(options: Any, dynamic: bool) -> None:
    """Refuse cache options that cannot work, whatever the model: `freeze_cache_prefix` with a frozen set that
    changes, or without frozen modules in eval mode (their dropout would make every stored state a lie)."""
    details = [name for name in _CACHE_DETAILS if getattr(options, name, None) is not None]
    if not getattr(options, "freeze_cache_prefix", None):
        if details:
            raise FreezeConfigError(
                f"{', '.join(f'`{name}`' for name in details)} only apply with `freeze_cache_prefix: true` (got "
                f"`freeze_cache_prefix` {getattr(options, 'freeze_cache_prefix', None)!r}). Set it, or remove them.",
                fields=["freeze_cache_prefix", *details],
            )
        return
    if dynamic:
        raise FreezeConfigError(
            f"`freeze_cache_prefix` needs a frozen prefix that stays the same for the whole run, and "
            f"`freeze_strategy` {options.freeze_strategy!r} changes the frozen set during training: stored states "
            "would go stale. Use a static strategy ('bottom', 'layers', ...) or turn `freeze_cache_prefix` off.",
            fields=["freeze_cache_prefix", "freeze_strategy"],
        )
    if not getattr(options, "freeze_frozen_modules_eval", None):
        raise FreezeConfigError(
            "`freeze_cache_prefix` stores what the frozen prefix computes once, which is right only when it computes "
            "the same every epoch: set `freeze_frozen_modules_eval: true` so that its dropout is off (got "
            f"`freeze_frozen_modules_eval` {getattr(options, 'freeze_frozen_modules_eval', None)!r}).",
            fields=["freeze_cache_prefix", "freeze_frozen_modules_eval"],
        )
    memory = options.freeze_cache_memory_mb
    if memory is not None and not memory >= 0:
        raise invalid("freeze_cache_memory_mb", memory, "a number of MiB >= 0 (0: everything on disk)")
