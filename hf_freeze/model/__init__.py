"""The model as plain data: its blocks in forward order (`discover_layout`), and whether a PEFT adapter decides
what trains (`peft_adapter_reason`). Knows architectures, nothing about policies."""

from .discovery import discover_layout, unwrap_model
from .layout import BLOCK_KINDS, EMBEDDINGS, HEAD, LAYER, NORM, OTHER, Block, ModelLayout
from .peft import peft_adapter_reason

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
    "peft_adapter_reason",
    "unwrap_model",
]
