"""The frozen-prefix cache (`freeze_cache_prefix`): what a frozen bottom of the model computes for an example is
stored the first time it is seen, and later epochs start from the stored states.

`store.py` keeps the states (memory, then disk), `cache.py` hooks the model, `setup.py` checks what the model and
the data must allow and builds the cache for a policy, `add_on.py` keeps it in step with a `LayerFreezer`. The option
checks that need neither a model nor data are with the other option checks (`hf_freeze.policies.common`).
"""

from .add_on import PrefixCache
from .cache import FrozenPrefixCache
from .setup import CACHE_FOLDER, build_prefix_cache, cache_prefix, check_cache_data

__all__ = ["CACHE_FOLDER", "FrozenPrefixCache", "PrefixCache", "build_prefix_cache", "cache_prefix", "check_cache_data"]
