"""`freeze_learning_rates` and `freeze_layer_lr_decay` as a `LayerFreezer` add-on: it gives each parameter its
learning rate, from which the freezer builds the optimizer's param groups (`LayerFreezer.parameter_groups`), and
shows each block's rate in the per-block table."""

from __future__ import annotations

from typing import Any, Dict, Optional

from ..add_on import AddOn, LearningRate, RunContext
from ..errors import FreezeConfigError
from ..model.layout import inside
from .rates import RATE_OPTIONS, block_rates, check_rate_options, learning_rates

__all__ = ["LearningRates"]


class LearningRates(AddOn):
    """The learning rate of every parameter of the model, as the rate options set it."""

    name = "learning_rates"

    def __init__(self, layout: Any, rates: Dict[str, LearningRate]):
        self.layout, self.rates = layout, rates

    @classmethod
    def check_arguments(cls, arguments: Any) -> None:
        check_rate_options(arguments)

    @classmethod
    def attach(cls, model: Any, layout: Any, arguments: Any, run: RunContext) -> Optional["LearningRates"]:
        given = [name for name in RATE_OPTIONS if getattr(arguments, name, None) is not None]
        if not given:
            return None
        if layout is None:  # a PEFT adapter decides what trains, and hf_freeze changes nothing
            raise FreezeConfigError(
                f"{' and '.join(f'`{name}`' for name in given)} cannot be used on a model that carries a PEFT adapter: "
                "hf_freeze leaves such a model as it is. Remove them, or give the adapter's parameters their rates "
                "in your own optimizer.",
                fields=given,
            )
        return cls(layout, learning_rates(layout, arguments))

    def learning_rate(self, name: str) -> Optional[LearningRate]:
        """The rate of ``name``; a parameter the model gained after discovery (an adapter of `freeze_lora`) trains at
        the rate of the block it sits in."""
        rate = self.rates.get(name)
        if rate is None:
            block = max((block for block in self.layout.blocks if inside(name, block.name)), key=lambda b: len(b.name), default=None)
            rate = self.rates.get(block.parameters[0]) if block is not None and block.parameters else None
        return rate

    def block_columns(self) -> Dict[str, Dict[str, str]]:
        return {"lr": block_rates(self.layout, self.rates)}
