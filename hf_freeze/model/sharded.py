"""A parameter's values as the training engine holds them: the whole tensor (one process, DDP, ZeRO-1/2), a DTensor
shard (FSDP2's `fully_shard` replaces every parameter with one), or a ZeRO-3 partition (``param.ds_tensor``; the
parameter itself is an empty placeholder outside the forward and backward passes).

`local_value` reads what this process holds, without communication: what the health check compares across a step.
`full_value` reads the whole tensor, gathered from every process under FSDP2 (a collective: every rank must call it,
in the same order): what an adaptive probe's scores are measured on, so that every engine scores the same numbers.

Example:

```python
>>> import torch
>>> from hf_freeze.model.sharded import full_value, local_value
>>> weight = torch.nn.Parameter(torch.ones(2, 3))
>>> local_value(weight) is weight, full_value(weight) is weight
(True, True)
```
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["full_value", "is_dtensor", "is_zero3_partitioned", "local_value"]


def is_dtensor(tensor: Optional[torch.Tensor]) -> bool:
    """True for a DTensor (FSDP2's sharded parameters and their gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 partitioned (its values live in ``ds_tensor``)."""
    return getattr(tensor, "ds_tensor", None) is not None


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``tensor``: the local shard of a DTensor, the local partition of a ZeRO-3
    parameter, else the tensor itself. No communication."""
    if is_dtensor(tensor):
        return tensor.to_local()
    if is_zero3_partitioned(tensor):
        return tensor.ds_tensor
    return tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: a DTensor gathered from its shards (a collective), else the tensor itself."""
    if is_dtensor(tensor):
        return tensor.detach().full_tensor()
    return tensor
