"""Stacks of repeated layers: the ``nn.ModuleList``/``nn.ModuleDict`` containers that hold a model's layers.

The rule: the outermost containers whose entries hold parameters, in registration order; small side containers
(per-layer scalars, auxiliary heads, under a tenth of the largest) are not the model's layers.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from ..errors import LayerDiscoveryError
from .layout import inside

__all__ = ["CONTAINERS", "UNWRAP", "Stack", "container_candidates", "find_stacks", "has_parameters", "no_layers_message", "stack_at"]

CONTAINERS = (nn.ModuleList, nn.ModuleDict)
UNWRAP = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class Stack:
    """A layer container: its path and its distinct entries (path, module)."""

    def __init__(self, path: str, container: nn.Module):
        self.path = path
        self.positions = len(container._modules)
        seen = set()
        self.entries: List[Tuple[str, nn.Module]] = []
        for key, module in container._modules.items():
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            self.entries.append((f"{path}.{key}" if path else key, module))

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]


def has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_stacks(model: nn.Module, root: str = "") -> Tuple[List[Stack], List[str]]:
    candidates: List[Stack] = []
    single_entry: List[Stack] = []
    for path, module in model.get_submodule(root).named_modules(prefix=root):
        if not isinstance(module, CONTAINERS) or any(inside(path, stack.path) for stack in candidates):
            continue
        stack = Stack(path, module)
        holding = [entry for entry in stack.entries if has_parameters(entry[1])]
        if len(holding) >= 2:
            candidates.append(stack)
        elif len(holding) == 1 and not any(inside(path, other.path) for other in single_entry):
            single_entry.append(stack)
    notes: List[str] = []
    if candidates:
        largest = max(_stack_size(stack) for stack in candidates)
        # Small side containers (per-layer scalars, auxiliary heads) are not the model's layers.
        stacks = [stack for stack in candidates if _stack_size(stack) >= 0.1 * largest]
    else:
        # One entry holding every layer's weights (ALBERT's shared layer group): one honest block, never a
        # made-up split into positions that share storage.
        stacks = single_entry[:1]
        if stacks:
            repeats = getattr(getattr(model.get_submodule(root), "config", None), "num_hidden_layers", None)
            notes.append(
                f"{stacks[0].path} holds a single block whose weights are shared by every layer position"
                + (f" ({repeats} positions)" if repeats else "")
                + ": it is one block, frozen or trained as a whole."
            )
    return stacks, notes


def _stack_size(stack: Stack) -> int:
    return sum(parameter.numel() for _, module in stack.entries for parameter in module.parameters())


def stack_at(model: nn.Module, path: str) -> Stack:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise LayerDiscoveryError(
            f"`freeze_layer_paths` entry {path!r} is not a submodule of {type(model).__name__}. "
            f"Containers of layers in this model: {container_candidates(model) or 'none found'}.",
            fields=["freeze_layer_paths"],
        ) from None
    if not isinstance(module, UNWRAP) or len(module) == 0:
        raise LayerDiscoveryError(
            f"`freeze_layer_paths` entry {path!r} is a {type(module).__name__}, not a container of layers "
            f"(nn.ModuleList, nn.ModuleDict or nn.Sequential). Containers in this model: "
            f"{container_candidates(model) or 'none found'}.",
            fields=["freeze_layer_paths"],
        )
    return Stack(path, module)


def container_candidates(model: nn.Module) -> List[str]:
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, UNWRAP) and path and sum(has_parameters(child) for child in module.children()) >= 2
    ][:10]


def no_layers_message(model: nn.Module) -> str:
    candidates = container_candidates(model)
    example = candidates[0] if candidates else "model.layers"
    return (
        f"Could not find the repeated layers of {type(model).__name__}: no nn.ModuleList or nn.ModuleDict in it "
        f"holds modules with parameters. Name the layer container(s) with `freeze_layer_paths`, in forward order, "
        f"e.g. `freeze_layer_paths: [{example}]`"
        + (f"; containers found: {candidates}." if candidates else ".")
    )
