"""`freeze_cache_prefix` set-up: what the model and the data must allow, and building the cache for a policy.

The option checks that need neither a model nor data live with the other option checks (policies/common.py);
here are those that need the layout (a frozen prefix that ends at a trainable layer) and the training data (a
dataset that comes back every epoch, a collator that does not draw random masks).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..apply import FrozenPrefix, frozen_prefix
from .cache import FrozenPrefixCache
from .store import PrefixStore, fingerprint
from ..errors import FreezeConfigError
from ..model.layout import ModelLayout

__all__ = ["build_prefix_cache", "cache_prefix", "check_cache_data", "tokenizer_identity"]

DEFAULT_MEMORY_MB = 1024.0
CACHE_FOLDER = "frozen_prefix_cache"


def cache_prefix(layout: ModelLayout, frozen, strategy: str) -> FrozenPrefix:
    """The frozen prefix the cache would skip; refuses a policy that has none, or a model the cache cannot key."""
    prefix = frozen_prefix(layout, frozen)
    if layout.parts:
        raise FreezeConfigError(
            f"`freeze_cache_prefix` keys examples by their token ids, and this model has several parts "
            f"({', '.join(layout.parts)}) whose inputs are not token ids. Turn `freeze_cache_prefix` off.",
            fields=["freeze_cache_prefix"],
        )
    if not prefix.single_stack:
        raise FreezeConfigError(
            "`freeze_cache_prefix` supports models with one stack of layers (decoder-only or encoder-only); this "
            "model has an encoder and a decoder. Turn `freeze_cache_prefix` off.",
            fields=["freeze_cache_prefix"],
        )
    if not prefix.active or prefix.first_trainable_layer is None:
        reason = (
            "leaves the first layer (or the embeddings below it) trainable, so there is no frozen prefix to skip"
            if not prefix.active else "freezes every layer, so no trainable layer takes the stored states"
        )
        raise FreezeConfigError(
            f"`freeze_cache_prefix` skips the frozen bottom of the model, and `freeze_strategy` {strategy!r} with "
            f"these options {reason} (frozen prefix: {list(prefix.blocks) or 'none'}). Freeze the bottom layers "
            "('bottom', or 'layers' with indices from 0) and the embeddings, or turn `freeze_cache_prefix` off.",
            fields=["freeze_cache_prefix", "freeze_strategy"],
        )
    return prefix


def check_cache_data(dataloader: Any) -> None:
    """Refuse, before the first step, training data the cache cannot serve: a stream (examples need not come back,
    and nothing bounds the cache) and a collator that masks tokens at random (every epoch's inputs differ)."""
    if dataloader is None:
        return
    dataset = getattr(dataloader, "dataset", None)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise FreezeConfigError(
            f"`freeze_cache_prefix` stores each example's states for the next epoch, and the training dataset is "
            f"an iterable (streaming) dataset ({type(dataset).__name__}): its examples carry no index, need not come "
            "back, and nothing bounds how many are stored. Use a map-style dataset, or turn `freeze_cache_prefix` off.",
            fields=["freeze_cache_prefix"],
        )
    collator = getattr(dataloader, "collate_fn", None)
    collator = getattr(collator, "data_collator", collator)  # the Trainer wraps it to drop unused columns
    if getattr(collator, "mlm", False) and (getattr(collator, "mlm_probability", 0) or 0) > 0:
        raise FreezeConfigError(
            f"`freeze_cache_prefix` needs the same inputs every epoch, and the data collator "
            f"{type(collator).__name__} masks tokens at random (`mlm=True`, `mlm_probability` "
            f"{collator.mlm_probability!r}): no example would ever be found again. Turn `freeze_cache_prefix` off "
            "for masked language modelling.",
            fields=["freeze_cache_prefix"],
        )


def tokenizer_identity(tokenizer: Any) -> Optional[Dict[str, Any]]:
    """What of the tokenizer goes into the cache folder's fingerprint."""
    if tokenizer is None:
        return None
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    return {"class": type(tokenizer).__name__, "name": getattr(tokenizer, "name_or_path", None), "size": size}


def build_prefix_cache(
    model: nn.Module,
    layout: ModelLayout,
    prefix: FrozenPrefix,
    arguments: Any,
    directory: Optional[str],
    tokenizer: Any = None,
    rank: int = 0,
    world_size: int = 1,
) -> FrozenPrefixCache:
    """The cache for this policy; a folder left by another model, prefix, precision or tokenizer is rebuilt."""
    parameters = dict(model.named_parameters())
    model_dtype = next(iter(parameters.values())).dtype if parameters else torch.float32
    dtype = getattr(torch, arguments.freeze_cache_dtype) if arguments.freeze_cache_dtype else model_dtype
    config = getattr(model, "config", None)
    config = {key: value for key, value in config.to_dict().items() if key not in ("_name_or_path", "transformers_version")} if config is not None else None
    parts = {
        "model": type(model).__name__, "config": config, "prefix": list(prefix.blocks),
        "boundary": prefix.first_trainable_layer, "dtype": str(dtype), "tokenizer": tokenizer_identity(tokenizer),
    }
    in_prefix = set(prefix.blocks)
    weights = [(name, parameters[name]) for block in layout.blocks if block.name in in_prefix for name in block.parameters]
    directory = root = arguments.freeze_cache_dir or directory
    if directory is not None and world_size > 1:
        directory = os.path.join(directory, f"rank-{rank}")  # each process stores the examples it sees
    memory = arguments.freeze_cache_memory_mb if arguments.freeze_cache_memory_mb is not None else DEFAULT_MEMORY_MB
    store = PrefixStore(directory, fingerprint(parts, weights), dtype, memory * 2**20, keep=bool(arguments.freeze_cache_keep), root=root)
    return FrozenPrefixCache(model, layout, prefix, store)
