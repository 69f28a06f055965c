"""Frozen modules in eval mode (`freeze_frozen_modules_eval`, Lightning's ``train_bn=False``).

`FrozenModulesEval` runs every module whose parameters are all frozen in eval mode: its BatchNorm uses and keeps its
running statistics, and its dropout is off. The Trainer calls ``model.train()`` before every step, so the mode is
set again by a forward pre-hook each time the module runs.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

from torch import nn

__all__ = ["FrozenModulesEval"]


class FrozenModulesEval:
    """Keeps the modules whose parameters are all frozen in eval mode while they are frozen.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_freeze.apply.eval_mode import FrozenModulesEval
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    >>> keeper = FrozenModulesEval(net)
    >>> keeper.update({"0.weight", "0.bias"})
    >>> keeper.modules, net[0].training, net[2].training
    (['0'], False, True)
    ```
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks: Dict[str, Any] = {}

    @property
    def modules(self) -> List[str]:
        return sorted(self._hooks)

    def update(self, frozen: Iterable[str]) -> None:
        frozen = set(frozen)
        wanted = _outermost_frozen_modules(self.model, frozen)
        for path in set(self._hooks) - wanted:
            self._hooks.pop(path).remove()
            module = self.model.get_submodule(path)
            module.train(self.model.training)  # back in the model's mode; the next model.train() agrees
        for path in wanted - set(self._hooks):
            module = self.model.get_submodule(path)
            self._hooks[path] = module.register_forward_pre_hook(_to_eval)
            module.eval()

    def remove(self) -> None:
        self.update(())


def _to_eval(module: nn.Module, args) -> None:
    if module.training:
        module.eval()


def _outermost_frozen_modules(model: nn.Module, frozen: set) -> set:
    """Paths of the largest modules whose own and descendants' parameters are all frozen (and that have some)."""
    chosen = set()

    def visit(module: nn.Module, path: str) -> None:
        names = [f"{path}.{name}" if path else name for name, _ in module.named_parameters()]
        if path and names and all(name in frozen for name in names):
            chosen.add(path)
            return
        for child_name, child in module.named_children():
            visit(child, f"{path}.{child_name}" if path else child_name)

    visit(model, "")
    return chosen
