"""Under DDP, all-reduce only the gradients of the parameters that train at this step.

A policy that changes the trainable set must leave every parameter it may ever train registered with DDP at the wrap
(a parameter DDP did not register is never all-reduced once it is unfrozen). DDP then all-reduces every registered
parameter's gradient bucket at every step, the frozen ones as zeros: LISA and BAdam, which train one layer at a time,
would send the bytes of every layer they rotate through. `TrainableGradientReduce` is a DDP communication hook that
packs the gradients of the parameters that require grad now into one tensor, all-reduces (averages) it, and unpacks
it; a bucket with nothing trainable sends nothing. Every process freezes the same parameters at every step (the
freezer checks that), so every process packs the same tensors in the same order.

Example (a plain loop; the callback registers it itself under DDP for a policy that changes):

```python
freezer.prepare()
ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
freezer.reduce_only_trainable(ddp_model)
```
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

__all__ = ["TrainableGradientReduce"]


class TrainableGradientReduce:
    """A DDP communication hook that all-reduces the trainable parameters' gradients only; counts the bytes it sends.

    Attributes:
        bytes_per_step: Bytes all-reduced by this process in each synchronised backward pass (one entry per pass).
    """

    def __init__(self):
        self.bytes_per_step: List[int] = []
        self._pending = False

    def register(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        ddp_model.register_comm_hook(None, self.reduce)

    def begin_step(self) -> None:
        """A new synchronised backward pass begins (called by the freezer at each step)."""
        self._pending = True

    def reduce(self, process_group, bucket):  # no annotation: DDP accepts none or `torch.futures.Future[torch.Tensor]`
        """The hook: DDP calls it with each gradient bucket once per synchronised backward pass."""
        if self._pending or not self.bytes_per_step:
            self.bytes_per_step.append(0)
            self._pending = False
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        buffer = bucket.buffer()
        gradients = bucket.gradients()
        trainable = [grad for parameter, grad in zip(bucket.parameters(), gradients) if parameter.requires_grad]
        if not trainable:
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(buffer)  # frozen parameters' gradients stay as DDP left them (unused: zeros)
            return future
        if len(trainable) == len(gradients):
            packed = buffer.div_(world)
        else:
            packed = torch.cat([grad.reshape(-1) for grad in trainable]).div_(world)
        self.bytes_per_step[-1] += packed.numel() * packed.element_size()
        work = dist.all_reduce(packed, group=group, async_op=True)

        def unpack(done: torch.futures.Future) -> torch.Tensor:
            reduced = done.value()[0]
            if reduced.data_ptr() != buffer.data_ptr():
                offset = 0
                for grad in trainable:
                    grad.copy_(reduced[offset:offset + grad.numel()].view_as(grad))
                    offset += grad.numel()
            return buffer

        return work.get_future().then(unpack)
