"""The model's leaf modules in Composer's order: what `freeze_granularity: module` counts."""

from __future__ import annotations

from typing import Dict, List, Tuple

from torch import nn

__all__ = ["leaf_modules"]


def leaf_modules(model: nn.Module, canonical: Dict[str, str]) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """The modules with no submodules and at least one parameter, depth first in registration order, each with its
    parameters' canonical names: the list Composer's `LayerFreezing` freezes from the front.

    A module with submodules is never a leaf, so parameters held directly by one (a ViT's `cls_token`, experts
    kept as one tensor next to an activation module) are in no leaf. A module registered under two parents is
    listed twice, as Composer's walk meets it twice.
    """
    found: List[Tuple[str, Tuple[str, ...]]] = []

    def visit(module: nn.Module, path: str) -> None:
        children = list(module.named_children())
        if not children:
            names = tuple(
                dict.fromkeys(canonical[f"{path}.{name}" if path else name] for name, _ in module.named_parameters())
            )
            if names:
                found.append((path, names))
            return
        for name, child in children:
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return tuple(found)
