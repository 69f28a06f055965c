"""The adapters of `freeze_lora` on the model, with peft: injected in place (the model stays the user's object, the
Trainer trains it as it is), and saved as a peft adapter that plain `PeftModel.from_pretrained` reloads.

Trained modules are trained as they are (no peft `ModulesToSaveWrapper`, which would hold a second copy of their
weights during training); at saving they go into the adapter file under the keys peft's own `save_pretrained` writes
for `modules_to_save`, so that loading wraps them and loads the trained weights.
"""

from __future__ import annotations

import os
import re
from typing import Collection, Dict, Optional, Tuple

import torch
from torch import nn

from .options import LoraOptions

__all__ = ["ADAPTER_FOLDER", "inject_lora", "lora_config", "save_lora_adapter"]

ADAPTER_FOLDER = "lora_adapter"
_PREFIX = "base_model.model."  # where peft's PeftModel keeps the base model; its saved keys start so
_ADAPTER = "default"


def lora_config(model: nn.Module, targets: Dict[str, Tuple[int, int]], options: LoraOptions, trained: Collection[str] = ()):
    """The `peft.LoraConfig` of the adapters on ``targets`` (exact module paths), with ``trained`` as
    `modules_to_save`."""
    from peft import LoraConfig

    conv1d = all(type(model.get_submodule(path)).__name__ == "Conv1D" for path in targets)
    return LoraConfig(
        r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, fan_in_fan_out=conv1d,
        target_modules="^(?:" + "|".join(re.escape(path) for path in targets) + ")$",
        modules_to_save=list(trained) or None,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )


def inject_lora(model: nn.Module, targets: Dict[str, Tuple[int, int]], options: LoraOptions) -> None:
    """Put the adapters on ``targets``, in place. peft marks every other parameter frozen when it injects: the
    flags the policy set are put back."""
    from peft import inject_adapter_in_model

    flags = {id(parameter): parameter.requires_grad for parameter in model.parameters()}
    inject_adapter_in_model(lora_config(model, targets, options), model, adapter_name=_ADAPTER)
    for parameter in model.parameters():
        if id(parameter) in flags:
            parameter.requires_grad_(flags[id(parameter)])


def adapter_state(model: nn.Module, trained: Collection[str]) -> Dict[str, torch.Tensor]:
    """The adapter file's tensors, keyed as peft saves them: the adapters' ``lora_A``/``lora_B`` weights and every
    tensor of the trained modules."""
    state: Dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if f".lora_A.{_ADAPTER}." in key or f".lora_B.{_ADAPTER}." in key:
            state[_PREFIX + key.replace(f".{_ADAPTER}.", ".")] = tensor
        elif any(key.startswith(module + ".") for module in trained):
            state[_PREFIX + key] = tensor
    return {key: tensor.detach().to("cpu").clone().contiguous() for key, tensor in state.items()}


def save_lora_adapter(
    model: nn.Module, folder: str, targets: Dict[str, Tuple[int, int]], trained: Collection[str], options: LoraOptions,
) -> Optional[str]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``folder``; returns the folder."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    lora_config(model, targets, options, trained).save_pretrained(folder)
    save_file(adapter_state(model, trained), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder
