"""`freeze_cache_prefix` as a `LayerFreezer` add-on: the cache is built by the first application of the policy, and
built again whenever the frozen prefix it skips is no longer the policy's."""

from __future__ import annotations

import os
from typing import Any, Collection, Dict, Optional

from torch import nn

from ..add_on import AddOn, RunContext
from ..processes import rank_and_world
from .cache import FrozenPrefixCache
from .setup import CACHE_FOLDER, build_prefix_cache, cache_prefix, check_cache_data

__all__ = ["PrefixCache"]


class PrefixCache(AddOn):
    """Keeps the frozen-prefix cache in step with the frozen set. Its states spill to ``freeze_cache_dir``, else to
    ``<output_dir>/frozen_prefix_cache`` (the Trainer's output folder), else to a temporary folder."""

    name = "prefix_cache"

    def __init__(self, model: nn.Module, layout: Any, arguments: Any, run: RunContext):
        self.model, self.layout, self.arguments, self.run = model, layout, arguments, run
        self.cache: Optional[FrozenPrefixCache] = None

    @classmethod
    def attach(cls, model: nn.Module, layout: Any, arguments: Any, run: RunContext) -> Optional["PrefixCache"]:
        return cls(model, layout, arguments, run) if layout is not None and arguments.freeze_cache_prefix else None

    def check(self, layout: Any, frozen: Collection[str]) -> None:
        cache_prefix(layout, frozen, self.arguments.freeze_strategy)

    def after_apply(self, frozen: Collection[str]) -> None:
        prefix = cache_prefix(self.layout, frozen, self.arguments.freeze_strategy)
        if self.cache is not None and self.cache.prefix == prefix:
            return
        self.close(remove=True)
        directory = os.path.join(self.run.output_dir, CACHE_FOLDER) if self.run.output_dir else None
        self.cache = build_prefix_cache(
            self.model, self.layout, prefix, self.arguments, directory, self.run.tokenizer, *rank_and_world()
        )

    def check_data(self, dataloader: Any) -> None:
        check_cache_data(dataloader)

    def metrics(self) -> Dict[str, float]:
        if self.cache is None:
            return {}
        stats = self.cache.stats()
        return {
            "freeze/prefix_cache_examples": stats["examples"],
            "freeze/prefix_cache_mib": round((stats["memory_bytes"] + stats["disk_bytes"]) / 2**20, 3),
        }

    def close(self, remove: bool = False) -> None:
        """Delete the stored states (`freeze_cache_keep` keeps them); ``remove``: also take the hooks off."""
        if self.cache is None:
            return
        self.cache.close()
        if remove:
            self.cache.remove()
            self.cache = None
