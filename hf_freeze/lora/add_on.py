"""`freeze_lora` as a `LayerFreezer` add-on: peft LoRA adapters on the layers the static policy froze, the other
blocks trained fully, saved together as one peft adapter."""

from __future__ import annotations

import os
from typing import Any, Collection, Dict, List, Optional

from ..add_on import AddOn, RunContext
from ..errors import FreezeConfigError
from .adapter import ADAPTER_FOLDER, inject_lora, save_lora_adapter
from .options import LoraOptions, lora_options
from .targets import adapted_parameters, adapter_column, lora_targets, trained_modules

__all__ = ["FrozenLayersLora"]


class FrozenLayersLora(AddOn):
    """Adapters on the frozen layers' linear modules, put on by the first application of the policy (before the
    optimizer and DDP see the model); saved to ``<folder>/lora_adapter`` by `save`."""

    name = "lora"

    def __init__(self, model: Any, layout: Any, options: LoraOptions):
        self.model, self.layout, self.options = model, layout, options
        self.targets: Dict[str, tuple] = {}
        self.trained: List[str] = []
        self.adapted: List[str] = []
        self.injected = False

    @classmethod
    def check_arguments(cls, arguments: Any) -> None:
        lora_options(arguments)

    @classmethod
    def attach(cls, model: Any, layout: Any, arguments: Any, run: RunContext) -> Optional["FrozenLayersLora"]:
        options = lora_options(arguments)
        if options is None:
            return None
        if layout is None:
            raise FreezeConfigError(
                f"`freeze_lora` (got {arguments.freeze_lora!r}) cannot put adapters on a model that already carries a "
                "PEFT adapter: hf_freeze leaves such a model as it is. Remove `freeze_lora`, or start from the base model.",
                fields=["freeze_lora"],
            )
        return cls(model, layout, options)

    def check(self, layout: Any, frozen: Collection[str]) -> None:
        if self.injected:  # the adapters went on with the first frozen set: a static policy keeps it
            return
        self.targets = lora_targets(self.model, layout, frozen, self.options)
        self.trained = trained_modules(self.model, layout, frozen)
        self.adapted = adapted_parameters(self.model, self.targets)

    def in_backward(self, frozen: Collection[str]) -> Collection[str]:
        return self.adapted

    def after_apply(self, frozen: Collection[str]) -> None:
        if self.injected:
            return
        inject_lora(self.model, self.targets, self.options)
        self.injected = True

    def block_columns(self) -> Dict[str, Dict[str, str]]:
        return {"adapter": adapter_column(self.layout, self.targets, self.trained, self.options.describe())}

    def metrics(self) -> Dict[str, float]:
        return {"freeze/lora_params": sum(self.options.r * (inputs + outputs) for inputs, outputs in self.targets.values())}

    def save(self, folder: str) -> Optional[str]:
        if not self.injected:
            return None
        return save_lora_adapter(self.model, os.path.join(folder, ADAPTER_FOLDER), self.targets, self.trained, self.options)
