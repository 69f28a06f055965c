"""A compiled model whose frozen set changes: torch before 2.13 keeps the graph it compiled when `requires_grad`
changes, so a layer unfrozen later gets no gradient and training goes on with the wrong layers (measured on torch
2.11.0 with `torch.compile`, `tests/integrations/test_reliability.py`); torch 2.13 recompiles. Refused there."""

from __future__ import annotations

import torch

from ..errors import FreezeConfigError

__all__ = ["recompiles_when_requires_grad_changes", "refuse_stale_compiled_graph"]


def recompiles_when_requires_grad_changes() -> bool:
    """Whether this torch compiles again when a parameter's `requires_grad` changes (2.13 and later)."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def refuse_stale_compiled_graph(compiled: bool, dynamic: bool, strategy: str) -> None:
    """Refuse a policy that changes the frozen set of a compiled model on a torch that would not recompile."""
    if compiled and dynamic and not recompiles_when_requires_grad_changes():
        raise FreezeConfigError(
            f"`freeze_strategy` {strategy!r} changes the frozen set during training, and the model is compiled: "
            f"torch {torch.__version__} keeps the compiled graph when requires_grad changes, so a layer unfrozen "
            "later would get no gradient. Use torch 2.13 or later, train without torch.compile (`torch_compile: "
            "false`), or use a static strategy.",
            fields=["freeze_strategy"],
        )
