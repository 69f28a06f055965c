"""The training health check.

After the first optimizer step and after every change of the frozen set, `HealthCheck` looks once:

* every trainable parameter received a gradient (one that never does is unused by the forward pass, cut off by a
  broken graph under checkpointing, or missed by a stale compiled graph);
* every frozen parameter is bit-identical to its value when it froze (checked on a fixed sample of entries, so the
  check costs a few small copies, not a copy of the model);
* with `freeze_frozen_modules_eval`, the buffers of frozen modules (BatchNorm running statistics) did not change.

It reads the parameters as the engine holds them (`hf_freeze.model.sharded`): FSDP2's DTensor shards, ZeRO-3's
partitions. A gradient counts when autograd accumulated one into the parameter in the step (a hook, so that ZeRO,
which moves gradients into its own buffers and leaves ``.grad`` empty, is seen) or when ``.grad`` holds one before the
optimizer step (FSDP2 sets the reduced shard there; its autograd leaf is an unsharded copy).

Frozen modules in eval mode (`freeze_frozen_modules_eval`) are `hf_freeze.apply.eval_mode`'s.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from ..errors import FreezeHealthError, few
from ..model.sharded import local_value

__all__ = ["HealthCheck"]

# Entries of each frozen parameter compared before and after a step.
SAMPLE_SIZE = 16


class HealthCheck:
    """Checks a step after it was armed (after the first step and after every change of the frozen set).

    Args:
        parameters: The model's parameters by name.
        buffers: The model's buffers by name (those of frozen modules in eval mode are checked).
        mode: 'warn' (log at WARNING), 'raise' (`FreezeHealthError`) or 'off'.
        report: How to log a warning.
    """

    def __init__(
        self,
        parameters: Dict[str, nn.Parameter],
        buffers: Dict[str, torch.Tensor],
        mode: str = "warn",
        report: Optional[Callable[[str], None]] = None,
    ):
        self.parameters, self.buffers, self.mode = parameters, buffers, mode
        self.report = report or (lambda message: None)
        self._frozen_samples: Dict[str, torch.Tensor] = {}
        self._buffer_copies: Dict[str, torch.Tensor] = {}
        self._armed = False
        self._without_gradient: List[str] = []
        self._received: set = set()
        self._eval_modules: tuple = ()
        self._hooks: List[Any] = []
        self.checks = 0

    def arm(self, eval_modules: Iterable[str] = ()) -> None:
        """Look at the next optimizer step; ``eval_modules`` are the module paths run in eval mode."""
        if self.mode == "off":
            return
        self._armed, self._eval_modules = True, tuple(eval_modules)
        self._frozen_samples = {
            name: _sample(parameter) for name, parameter in self.parameters.items() if not parameter.requires_grad
        }
        self._remove_hooks()
        self._received = set()
        for name, parameter in self.parameters.items():
            if parameter.requires_grad and hasattr(parameter, "register_post_accumulate_grad_hook"):
                self._hooks.append(parameter.register_post_accumulate_grad_hook(
                    lambda _, name=name: self._received.add(name)))
        prefixes = tuple(path + "." for path in eval_modules)
        self._buffer_copies = {
            name: buffer.detach().clone()
            for name, buffer in self.buffers.items()
            if prefixes and name.startswith(prefixes) and buffer.is_floating_point()
        }

    def rearm(self) -> None:
        """The engine replaced the parameters since `arm` (FSDP2's wrap): look at the live ones instead."""
        if self._armed:
            self.arm(self._eval_modules)

    def before_optimizer_step(self) -> None:
        if self._armed:
            self._without_gradient = [
                name for name, parameter in self.parameters.items()
                if parameter.requires_grad and parameter.grad is None and name not in self._received
            ]

    def after_optimizer_step(self) -> None:
        if not self._armed:
            return
        self._armed = False
        self.checks += 1
        self._remove_hooks()
        problems = []
        if self._without_gradient:
            problems.append(
                f"{len(self._without_gradient)} trainable parameter(s) received no gradient in this step "
                f"({few(self._without_gradient)}): they are not used by the forward pass, or the graph to them is "
                "cut (checkpointing, a stale compiled graph): they are in the optimizer but never train."
            )
        moved = [name for name, sample in self._frozen_samples.items() if not torch.equal(_sample(self.parameters[name]), sample)]
        if moved:
            problems.append(
                f"{len(moved)} frozen parameter(s) changed in this step ({few(moved)}): something outside hf_freeze "
                "updates them (an optimizer built before they froze that steps zero gradients with weight decay, or "
                "code that writes to them)."
            )
        changed = [name for name, copy in self._buffer_copies.items() if not torch.equal(self.buffers[name], copy)]
        if changed:
            problems.append(
                f"{len(changed)} buffer(s) of frozen modules changed in this step ({few(changed)}), although "
                "`freeze_frozen_modules_eval` runs those modules in eval mode."
            )
        self._frozen_samples, self._buffer_copies, self._without_gradient = {}, {}, []
        for problem in problems:
            if self.mode == "raise":
                raise FreezeHealthError(f"Training health check: {problem} (`freeze_health_check: warn` only warns.)")
            self.report(f"Training health check: {problem}")

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _sample(parameter: torch.Tensor) -> torch.Tensor:
    flat = local_value(parameter).detach().reshape(-1)
    if flat.numel() <= SAMPLE_SIZE:
        return flat.clone()
    step = flat.numel() // SAMPLE_SIZE
    return flat[::step][:SAMPLE_SIZE].clone()

