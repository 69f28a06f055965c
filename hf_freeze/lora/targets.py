"""Where the adapters of `freeze_lora` go, and which modules train fully beside them (saved whole with the adapter)."""

from __future__ import annotations

from typing import Collection, Dict, List, Tuple

from torch import nn

from ..errors import FreezeConfigError, few
from ..model.layout import ModelLayout, inside
from .options import LoraOptions

__all__ = ["adapted_parameters", "adapter_column", "lora_targets", "trained_modules"]


def _linear_shape(module: nn.Module) -> Tuple[int, int]:
    """(in features, out features) of a linear module (``nn.Linear``, transformers' ``Conv1D``), else ``(0, 0)``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)  # Conv1D keeps its weight as (in, out)
    return 0, 0


def lora_targets(model: nn.Module, layout: ModelLayout, frozen: Collection[str], options: LoraOptions) -> Dict[str, Tuple[int, int]]:
    """The linear modules that get adapters, as ``{module path: (in, out)}``: those inside the blocks the policy froze
    whole (the layers with ``on: frozen``; any frozen block whose modules match ``on``'s patterns)."""
    frozen = set(frozen)
    frozen_blocks = [block for block in layout.blocks if block.parameters and all(name in frozen for name in block.parameters)]
    if options.on is None:
        frozen_blocks = [block for block in frozen_blocks if block.kind == "layer"]
    targets: Dict[str, Tuple[int, int]] = {}
    for path, module in model.named_modules():
        shape = _linear_shape(module)
        if not shape[0] or not any(inside(path, block.name) for block in frozen_blocks):
            continue
        if options.on is None or any(pattern.matches(path) for pattern in options.on):
            targets[path] = shape
    if not targets:
        if options.on is None:
            what = "the strategy froze no whole layer with linear modules"
        else:
            examples = [path for path, module in model.named_modules() if _linear_shape(module)[0]]
            what = (f"no linear module of the blocks the strategy froze matches {[p.text for p in options.on]!r} "
                    f"(linear modules are named like {few(examples)}; frozen blocks: {few([b.name for b in frozen_blocks])})")
        raise FreezeConfigError(
            f"`freeze_lora` has nowhere to go: {what}. Freeze layers with the strategy, or change `on`.",
            fields=["freeze_lora"],
        )
    return targets


def adapted_parameters(model: nn.Module, targets: Collection[str]) -> List[str]:
    """The frozen parameters of the target modules: they stay in the backward pass, which reaches the adapters."""
    return [f"{path}.{name}" for path in targets for name, _ in model.get_submodule(path).named_parameters(recurse=False)]


def trained_modules(model: nn.Module, layout: ModelLayout, frozen: Collection[str]) -> List[str]:
    """The modules saved whole beside the adapter (peft's `modules_to_save`): every block with a trainable
    parameter, and a head tied to trained input embeddings (it shares their trained weight)."""
    frozen = set(frozen)
    modules = [block.name for block in layout.blocks if any(name not in frozen for name in block.parameters)]
    trained = {name for block in layout.blocks for name in block.parameters if name not in frozen}
    modules += [alias.rsplit(".", 1)[0] for alias, canonical in layout.tied_parameters.items() if canonical in trained]
    known = dict(model.named_modules())
    missing = [name for name in modules if name not in known]
    if missing:
        raise FreezeConfigError(
            f"`freeze_lora` saves the trained blocks whole beside the adapter, but {few(missing)} is a parameter, not a "
            "module peft can save. Freeze it with the strategy, or train without `freeze_lora`.",
            fields=["freeze_lora"],
        )
    return list(dict.fromkeys(modules))


def adapter_column(layout: ModelLayout, targets: Collection[str], trained: Collection[str], label: str) -> Dict[str, str]:
    """The block table's adapter column: ``label`` ('lora r=16') on the blocks with adapters, 'full' on the blocks
    saved whole beside them."""
    cells = {}
    for block in layout.blocks:
        if any(inside(path, block.name) for path in targets):
            cells[block.name] = label
        elif block.name in trained:
            cells[block.name] = "full"
    return cells
