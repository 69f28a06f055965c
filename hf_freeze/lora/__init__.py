"""Freeze + LoRA in one policy (`freeze_lora`): peft LoRA adapters on the layers a static strategy froze, the other
blocks trained fully, all saved as one peft adapter that `PeftModel.from_pretrained` reloads.

`options.py` reads the option (no torch), `targets.py` finds the modules that get adapters and those trained fully,
`adapter.py` injects the adapters with peft and saves them, `add_on.py` runs it all beside a `LayerFreezer`.
"""

from .add_on import FrozenLayersLora
from .adapter import ADAPTER_FOLDER, inject_lora, lora_config, save_lora_adapter
from .options import LORA_KEYS, LoraOptions, lora_options
from .targets import adapted_parameters, adapter_column, lora_targets, trained_modules

__all__ = [
    "ADAPTER_FOLDER", "FrozenLayersLora", "LORA_KEYS", "LoraOptions", "adapted_parameters", "adapter_column", "inject_lora",
    "lora_config", "lora_options", "lora_targets", "save_lora_adapter", "trained_modules",
]
