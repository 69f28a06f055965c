"""The optimizer's param groups of a `LayerFreezer`: one per learning rate when an add-on sets rates
(`freeze_learning_rates`, `freeze_layer_lr_decay`), built before the optimizer exists (see
`hf_freeze.apply.param_groups` for why they cannot be added later)."""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional

import torch
from torch import nn

from ..add_on import AddOn, LearningRate
from ..apply.frozen_groups import BLOCK_KEY
from ..apply.param_groups import GROUP_KEY, decay_parameter_names, parameter_groups
from ..errors import FreezeConfigError
from ..model import unwrap_model

__all__ = ["OptimizerGroups"]


class OptimizerGroups:
    """The part of `LayerFreezer` that builds the optimizer's param groups. (The freezer's attributes it reads:
    ``add_ons``, ``applier``, ``arguments``, ``model``, ``registered`` and ``_checked_optimizer``.)"""

    @property
    def sets_learning_rates(self) -> bool:
        """True when an add-on gives parameters their own learning rates (`freeze_learning_rates`,
        `freeze_layer_lr_decay`): build the optimizer from `parameter_groups` then."""
        return any(type(add_on).learning_rate is not AddOn.learning_rate for add_on in self.add_ons.values())

    def learning_rate(self, name: str) -> LearningRate:
        """The learning rate of the parameter ``name`` (a trained row's full parameter name for its rows)."""
        rates = (add_on.learning_rate(name) for add_on in self.add_ons.values())
        return next((rate for rate in rates if rate is not None), LearningRate("base"))

    def parameter_groups(
        self, learning_rate: float, weight_decay: float = 0.0, model: Optional[nn.Module] = None,
        decay_names: Optional[Collection[str]] = None, by_block: bool = False,
    ) -> List[Dict[str, Any]]:
        """The param groups to build the optimizer from, for any optimizer class: the trainable parameters split as
        the Trainer splits them (weight decay or not), and with `freeze_learning_rates` / `freeze_layer_lr_decay`
        by learning rate too (each group carries its ``lr`` and its name under ``"hf_freeze_group"``; the groups at
        ``learning_rate`` itself come first). Call it after `apply` (a static policy) or `prepare` (a changing one),
        so that every parameter the policy may train has its group.

        Args:
            learning_rate: The base rate (the Trainer's `learning_rate`); a scheduler scales each group from its own.
            weight_decay: The weight decay of the parameters that take it.
            model: The model the optimizer trains (default: the freezer's; the Trainer passes the one it trains).
            decay_names: The parameters that take weight decay (default: the Trainer's rule).
            by_block: One group per block (and weight-decay half), named under ``"hf_freeze_block"``: what an
                optimizer that skips frozen groups needs (`hf_freeze.apply.frozen_groups`, DeepSpeed ZeRO).

        Example:

        ```python
        >>> import torch
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> from hf_freeze import LayerFreezer
        >>> config = AutoConfig.for_model("gpt2", n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
        >>> freezer = LayerFreezer(AutoModelForCausalLM.from_config(config), freeze_layer_lr_decay=0.5)
        >>> change = freezer.apply()
        >>> optimizer = torch.optim.AdamW(freezer.parameter_groups(1e-3, weight_decay=0.01))
        >>> {group["hf_freeze_group"]: group["lr"] for group in optimizer.param_groups}["layer.1"]
        0.00025
        ```
        """
        model = self.model if model is None else unwrap_model(model)
        row_names = {id(rows): name for name, rows in self.applier.rows.parameters.items()}
        named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        full_name = {name: row_names.get(id(parameter), name) for name, parameter in named}
        decay = decay_parameter_names(model) if decay_names is None else decay_names
        rate_of = (lambda name: self.learning_rate(full_name[name])) if self.sets_learning_rates else None
        if not by_block:
            return parameter_groups(named, learning_rate, weight_decay, decay, rate_of)
        block_of = {name: block.name for block in self.layout.blocks for name in block.parameters}
        members: Dict[str, List[Any]] = {}  # block -> its trainable (name, parameter), blocks in first-seen order
        for name, parameter in named:
            members.setdefault(block_of.get(full_name[name], full_name[name]), []).append((name, parameter))
        return [{**group, BLOCK_KEY: block} for block, named_in_block in members.items()
                for group in parameter_groups(named_in_block, learning_rate, weight_decay, decay, rate_of) if group["params"]]

    def group_layout(self) -> Optional[Dict[str, Dict[str, Any]]]:
        """Every learning-rate group of the parameters the optimizer is built over, with its rate (``rate``: an
        absolute rate or ``None`` for the base rate, ``factor``) and its ``parameters`` (``None`` without rate
        groups): saved with the state, so that a resumed run whose groups or rates would differ is refused."""
        if not self.sets_learning_rates or self.registered is None:
            return None
        full_name = dict(zip(self.applier.rows.registered_names(), self.applier.rows.attachments))
        groups: Dict[str, Dict[str, Any]] = {}
        for name in self.registered:
            rate = self.learning_rate(full_name.get(name, name))
            groups.setdefault(rate.group, {"rate": rate.rate, "factor": rate.factor, "parameters": []})["parameters"].append(name)
        return groups

    def _check_optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Refuse an optimizer built without the learning-rate groups the options ask for (once per optimizer)."""
        if optimizer is None or not self.sets_learning_rates or id(optimizer) == self._checked_optimizer:
            return
        self._checked_optimizer = id(optimizer)
        if not any(GROUP_KEY in group for group in optimizer.param_groups):
            given = [name for name in ("freeze_learning_rates", "freeze_layer_lr_decay") if getattr(self.arguments, name) is not None]
            raise FreezeConfigError(
                f"{' and '.join(f'`{name}`' for name in given)} set learning rates, but the optimizer was built without "
                "their param groups, so every parameter would train at one rate. Build it from "
                "`LayerFreezer.parameter_groups(learning_rate, weight_decay)`; with the Trainer, pass the "
                "`FreezeCallback` to `Trainer(callbacks=[...])` (not `add_callback`) and no `optimizers=`, so that the "
                "Trainer builds its optimizer from them.",
                fields=given,
            )
