"""An optimizer that leaves frozen param groups alone: how a policy that changes the trainable set runs under
DeepSpeed ZeRO-2 and ZeRO-3.

ZeRO builds its gradient partitions and flat fp32 master weights from the parameters that are trainable at
`deepspeed.initialize`, one flat master per param group, and steps the client optimizer group by group over those
flat tensors. A parameter frozen after that gets no gradient (no reduce hook fires), but ZeRO fills its gradient
partition with zeros and steps it: weight decay and Adam's momentum would still move it (measured, DeepSpeed 0.19.8:
a frozen layer drifted every step). So under ZeRO a changing policy builds the optimizer with one param group per
block (and weight-decay half), every parameter it may train in one of them, and the optimizer class wrapped by
`skipping_frozen_groups`: at each step a group whose model parameters are all frozen gets no gradient (torch
optimizers skip such a parameter: no decay, no moments, no step count) and its state is released, as the applier
releases a frozen parameter's state on one process or under DDP (a block that trains again starts afresh). No
DeepSpeed internals are touched; DeepSpeed then copies the unchanged fp32 master back into the model.

A group that is partly frozen cannot be skipped without moving its frozen members: it is refused, never stepped.

Example:

```python
>>> import torch
>>> from hf_freeze.apply.frozen_groups import skipping_frozen_groups
>>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
>>> optimizer = skipping_frozen_groups(torch.optim.AdamW)([{"params": list(a.parameters())}, {"params": list(b.parameters())}], lr=0.1)
>>> b.requires_grad_(False)
Linear(in_features=2, out_features=2, bias=True)
>>> before = b.weight.detach().clone()
>>> for p in optimizer.param_groups[1]["params"]:  # what ZeRO does: a zero gradient for the frozen block
...     p.grad = torch.zeros_like(p)
>>> a(torch.ones(1, 2)).sum().backward()
>>> optimizer.step()
>>> torch.equal(before, b.weight)
True
```
"""

from __future__ import annotations

import functools
from typing import Any, List, Tuple

import torch

from ..errors import FreezeConfigError

__all__ = ["BLOCK_KEY", "skips_frozen_groups", "skipping_frozen_groups"]

# The key of a param group that names the block its parameters belong to.
BLOCK_KEY = "hf_freeze_block"


@functools.lru_cache(maxsize=None)
def skipping_frozen_groups(optimizer_class: type) -> type:
    """``optimizer_class`` whose `step` leaves alone every param group whose model parameters are all frozen (and
    releases its state), and refuses a group that is partly frozen."""

    class SkippingFrozenGroups(optimizer_class):  # type: ignore[misc, valid-type]
        skips_frozen_groups = True

        def __init__(self, params: Any, *args: Any, **kwargs: Any):
            super().__init__(params, *args, **kwargs)
            # The model parameters of each group, before ZeRO swaps in its flat fp32 partitions.
            self._hf_freeze_members: List[List[torch.Tensor]] = [list(group["params"]) for group in self.param_groups]
            for index, group in enumerate(self.param_groups):
                group["hf_freeze_index"] = index

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            withheld: List[Tuple[torch.Tensor, Any]] = []
            for group in self.param_groups:
                trainable = [member.requires_grad for member in self._hf_freeze_members[group.get("hf_freeze_index", 0)]]
                if not group["params"] or all(trainable):
                    continue
                if any(trainable):
                    raise FreezeConfigError(
                        f"param group {group.get(BLOCK_KEY, group.get('hf_freeze_index'))!r} is partly frozen: under "
                        "DeepSpeed ZeRO a frozen parameter in a group that steps would still move (ZeRO gives it a "
                        "zero gradient; weight decay and momentum act on it). The policy must freeze whole blocks here; "
                        "train with FSDP2 or DDP to freeze parts of a block that changes.",
                        fields=["freeze_strategy"],
                    )
                for parameter in group["params"]:
                    withheld.append((parameter, parameter.grad))
                    parameter.grad = None
                    self.state.pop(parameter, None)
            try:
                return super().step(closure) if closure is not None else super().step()
            finally:
                for parameter, grad in withheld:
                    parameter.grad = grad

    SkippingFrozenGroups.__name__ = SkippingFrozenGroups.__qualname__ = f"{optimizer_class.__name__}SkippingFrozenGroups"
    return SkippingFrozenGroups



def skips_frozen_groups(optimizer: Any) -> bool:
    """True when ``optimizer``, or one it wraps (accelerate's wrapper, DeepSpeed's ZeRO optimizer), was built by
    `skipping_frozen_groups`: the optimizer, not the applier, then leaves frozen parameters alone and drops their state."""
    for _ in range(4):
        if optimizer is None:
            return False
        if getattr(type(optimizer), "skips_frozen_groups", False):
            return True
        optimizer = getattr(optimizer, "optimizer", None)
    return False
