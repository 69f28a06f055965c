"""The shape of an add-on capability that `LayerFreezer` runs beside the policy (the loss lever, the frozen-prefix
cache): one room each, attached in the order `hf_freeze.engine.addons.ADD_ONS` lists them. Every method has a
do-nothing default, so that an add-on says only what it does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Dict, Optional

__all__ = ["AddOn", "LearningRate", "RunContext"]


@dataclass(frozen=True)
class RunContext:
    """What an add-on may need to know of the run beyond the model and the options.

    Args:
        output_dir: Where the run writes (the Trainer's ``output_dir``); ``None`` in a plain loop that did not say.
        tokenizer: The run's tokenizer or processor, when there is one.
    """

    output_dir: Optional[str] = None
    tokenizer: Any = None


@dataclass(frozen=True)
class LearningRate:
    """The learning rate an add-on gives a parameter: the name of its optimizer param group, an absolute ``rate``
    (``None``: the run's base rate) and a ``factor`` on it.

    Example:

    ```python
    >>> from hf_freeze.add_on import LearningRate
    >>> LearningRate("layer.2", None, 0.8).value(1e-3)
    0.0008
    ```
    """

    group: str
    rate: Optional[float] = None
    factor: float = 1.0

    def value(self, base: float) -> float:
        return (base if self.rate is None else self.rate) * self.factor


class AddOn:
    """An add-on: built by ``attach(model, layout, arguments, run)`` (``layout`` is ``None`` when a PEFT adapter
    decides what trains), then told about each application of the policy."""

    name = "add_on"

    @classmethod
    def check_arguments(cls, arguments: Any) -> None:
        """Refuse option values this add-on cannot take, before any model is seen (`LayerFreezer` and `hf-freeze
        validate` run it)."""

    def check(self, layout: Any, frozen: Collection[str]) -> None:
        """Refuse, when the freezer is built, a policy this add-on cannot serve (``frozen``: its first frozen set)."""

    def in_backward(self, frozen: Collection[str]) -> Collection[str]:
        """Parameters of ``frozen`` that still take part in the backward pass (an adapter trains on them): kept out
        of what only wholly frozen parameters get (the frozen-prefix cut, eval mode, half-precision storage)."""
        return ()

    def after_apply(self, frozen: Collection[str]) -> None:
        """The frozen set is now ``frozen``."""

    def check_data(self, dataloader: Any) -> None:
        """Refuse, before the first step, training data this add-on cannot serve."""

    def learning_rate(self, name: str) -> Optional[LearningRate]:
        """The learning rate of the parameter ``name``, when this add-on sets one."""
        return None

    def block_columns(self) -> Dict[str, Dict[str, str]]:
        """Columns this add-on adds to the per-block table: ``{header: {block name: cell}}``."""
        return {}

    def metrics(self) -> Dict[str, float]:
        """`freeze/...` metrics of this add-on."""
        return {}

    def save(self, folder: str) -> Optional[str]:
        """Write what this add-on keeps beside the model (an adapter) under ``folder``; returns where, or ``None``."""
        return None

    def close(self, remove: bool = False) -> None:
        """Training ended (``remove``: also take any hooks off the model)."""
