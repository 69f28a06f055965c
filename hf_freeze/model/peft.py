"""Detect PEFT adapters with peft's and transformers' own markers; freezing then steps aside."""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["peft_adapter_reason"]


def peft_adapter_reason(model: nn.Module) -> Optional[str]:
    """Why ``model`` counts as carrying a PEFT adapter, or ``None`` when it carries none."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: only transformers' own integration can have loaded adapters
        PeftModel = BaseTunerLayer = None
    if PeftModel is not None and isinstance(model, PeftModel):
        return f"the model is a peft {type(model).__name__}"
    if getattr(model, "_hf_peft_config_loaded", False):
        return "adapters were loaded into the transformers model (`load_adapter`/`add_adapter`)"
    if BaseTunerLayer is not None and any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        return "the model contains PEFT adapter layers"
    return None
