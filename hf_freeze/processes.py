"""Which process this is, and what the processes of a multi-process run agree on.

Built on accelerate's process state and torch.distributed's collectives; every function is a no-op (or answers
for the one process) when training runs in a single process.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Tuple

from .errors import FreezeConfigError

__all__ = ["broadcast_from_main", "is_main_process", "raise_if_ranks_disagree", "rank_and_world"]


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def rank_and_world() -> Tuple[int, int]:
    """This process's index and the number of processes (``(0, 1)`` in a single process)."""
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_main(value: Any) -> Any:
    """The main process's ``value`` on every process (a collective: every rank must call it)."""
    if _world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    payload = [value]
    broadcast_object_list(payload, from_process=0)
    return payload[0]


def raise_if_ranks_disagree(frozen_names: Iterable[str]) -> None:
    """Refuse to train when the ranks froze different parameters (a collective: every rank must call it)."""
    if _world_size() == 1:
        return
    import torch.distributed as dist

    fingerprint = hashlib.sha256("\n".join(sorted(frozen_names)).encode()).hexdigest()[:16]
    fingerprints = [None] * dist.get_world_size()
    dist.all_gather_object(fingerprints, fingerprint)
    if len(set(fingerprints)) > 1:
        raise FreezeConfigError(
            f"The processes froze different parameters (frozen-set fingerprints by rank: {fingerprints}). DDP "
            "would average gradients of parameters that some ranks keep frozen. A policy must decide the same "
            "on every rank: derive it from the step, the seed and values that are identical across processes."
        )
