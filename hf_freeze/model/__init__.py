"""The model as plain data: its blocks in forward order (`discover_layout`), and whether a PEFT adapter decides
what trains (`peft_adapter_reason`). Knows architectures, nothing about policies.

The layout types are imported at once; discovery and the PEFT check (torch) only when first used, so that the
policies, which read layouts alone, import no torch.
"""

from .layout import BLOCK_KINDS, EMBEDDINGS, HEAD, LAYER, NORM, OTHER, Block, ModelLayout

# Torch-side names -> their module, imported on first access (PEP 562).
_LAZY = {
    "discover_layout": ".discovery", "unwrap_model": ".discovery", "peft_adapter_reason": ".peft",
    "loaded_vocabulary_size": ".vocabulary", "record_vocabulary_size": ".vocabulary",
}

__all__ = [
    "BLOCK_KINDS",
    "EMBEDDINGS",
    "HEAD",
    "LAYER",
    "NORM",
    "OTHER",
    "Block",
    "ModelLayout",
    "discover_layout",
    "loaded_vocabulary_size",
    "peft_adapter_reason",
    "record_vocabulary_size",
    "unwrap_model",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
