"""Frozen linear weights stored in half precision (`freeze_frozen_dtype`).

Under bf16/fp16 mixed precision, autocast casts every linear layer's float32 weight to half precision on every
forward pass. A frozen weight never changes, so storing it in that dtype gives the same products and saves 2 bytes
per parameter (LLaMA-Factory keeps frozen weights in half precision the same way). Only weights and biases whose
every user is a linear layer (`nn.Linear`, transformers' `Conv1D`) are cast: an embedding or a norm is not cast by
autocast, and a head tied to the embeddings stays as it is. Outside autocast (evaluation without mixed precision, generation) a
forward hook hands such a layer its weights in the caller's dtype, so that it computes as before.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["FrozenWeightsDtype", "castable_weights"]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def castable_weights(model: nn.Module) -> Dict[str, nn.Module]:
    """``{parameter name: its linear layer}`` for the weights and biases used by linear layers alone (no embedding,
    no norm, no tie to a module of another kind)."""
    owners: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, parameter in module.named_parameters(recurse=False):
            name = f"{module_name}.{attribute}" if module_name else attribute
            owners.setdefault(id(parameter), []).append((name, module, attribute))
    castable = {}
    for entries in owners.values():
        if all(_is_linear(module) and attribute in ("weight", "bias") for _, module, attribute in entries):
            castable[entries[0][0]] = entries[0][1]
    return castable


class FrozenWeightsDtype:
    """Keeps the weights of frozen linear layers in ``dtype`` and gives a layer its own weights back when it trains.

    Args:
        model: The model.
        dtype: The storage dtype of frozen linear weights (`torch.bfloat16` or `torch.float16`).
        exact: Keep a float32 copy (on the CPU) of each cast weight, so that a layer unfrozen later trains from its
            exact weights (schedules); without it the weight comes back rounded to ``dtype``.

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from hf_freeze.apply.frozen_dtype import FrozenWeightsDtype
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> store = FrozenWeightsDtype(net, torch.bfloat16, exact=True)
    >>> store.update(["0.weight", "0.bias", "1.weight"], [])
    >>> net[0].weight.dtype, net[0].bias.dtype, net[1].weight.dtype, net(torch.ones(1, 4)).dtype
    (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
    >>> store.update([], ["0.weight", "0.bias"])
    >>> net[0].weight.dtype
    torch.float32
    ```
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, exact: bool = False):
        self.model, self.dtype, self.exact = model, dtype, exact
        self.layers = castable_weights(model)
        self.parameters = dict(model.named_parameters())
        self.original: Dict[str, torch.dtype] = {}  # cast weights -> their own dtype
        self.copies: Dict[str, torch.Tensor] = {}
        self._hooked: Dict[str, list] = {}
        self._state_hook = model._register_state_dict_hook(self._own_dtype_in_state_dict)

    def update(self, frozen: Iterable[str], unfrozen: Iterable[str]) -> None:
        """``frozen``: the parameters frozen now (all of them); ``unfrozen``: those that train again."""
        for name in unfrozen:
            if name in self.original:
                self._restore(name)
        for name in frozen:
            if name in self.layers and name not in self.original and self.parameters[name].dtype != self.dtype:
                self._cast(name)

    def _cast(self, name: str) -> None:
        parameter = self.parameters[name]
        self.original[name] = parameter.dtype
        if self.exact:
            self.copies[name] = parameter.detach().to("cpu", copy=True)
        parameter.data = parameter.data.to(self.dtype)
        if name not in self._hooked:
            layer = self.layers[name]
            self._hooked[name] = [
                layer.register_forward_pre_hook(self._inputs_to_weight_dtype),
                layer.register_forward_hook(self._outputs_to_caller_dtype),
            ]

    def _restore(self, name: str) -> None:
        parameter = self.parameters[name]
        dtype = self.original.pop(name)
        copy = self.copies.pop(name, None)
        parameter.data = copy.to(parameter.device) if copy is not None else parameter.data.to(dtype)
        for handle in self._hooked.pop(name, []):
            handle.remove()

    @staticmethod
    def _inputs_to_weight_dtype(module, args):
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor) or torch.is_autocast_enabled(first.device.type):
            return None
        # Outside autocast: the forward reads its weights in the caller's dtype. An entry in the instance's
        # `__dict__` is found before `nn.Module.__getattr__` looks in `_parameters`; the forward hook takes it away.
        for attribute in ("weight", "bias"):
            parameter = module._parameters.get(attribute)
            if parameter is not None and parameter.dtype != first.dtype:
                module.__dict__[attribute] = parameter.to(first.dtype)
        return None

    @staticmethod
    def _outputs_to_caller_dtype(module, args, output):
        module.__dict__.pop("weight", None)
        module.__dict__.pop("bias", None)
        return None

    def _own_dtype_in_state_dict(self, module, state_dict, prefix, local_metadata) -> None:
        for name, dtype in self.original.items():
            key = prefix + name
            if key in state_dict:
                state_dict[key] = state_dict[key].to(dtype)

    def remove(self) -> None:
        """Give every cast weight its own dtype back and take the hooks off."""
        for name in list(self.original):
            self._restore(name)
        self._state_hook.remove()


def frozen_dtype_of(setting: Optional[str]) -> Optional[torch.dtype]:
    """The torch dtype of a `freeze_frozen_dtype` setting (None for unset or 'none')."""
    return None if setting in (None, "none") else getattr(torch, setting)
