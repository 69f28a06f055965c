"""What one training run of the quality study costs, measured tensor by tensor (`quality.py`).

Peak training memory of a step = weights + gradients of the trainable parameters + optimizer states + every tensor
autograd saved for the backward pass (counted once per storage; the weights it saves are already counted). This is
what the accelerator's memory would hold at the end of the forward pass, before the allocator's slack: exact,
the same on any machine and under any load, and it moves with the policy as the frozen set changes.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from transformers import TrainerCallback


class CostMeter(TrainerCallback):
    """Per optimizer step: the trainable parameters and the peak training memory (see the module docstring).

    The FreezeCallback moves itself first, so each step is measured with its frozen set already applied.
    """

    def __init__(self):
        self.trainer = None
        self.trainable: List[int] = []
        self.peaks: List[int] = []
        self._hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self._saved: Dict[int, int] = {}
        self._parameter_storages: set = set()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        parameters = list(model.parameters())
        self.trainable.append(sum(p.numel() for p in parameters if p.requires_grad))
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._saved = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._parameter_storages:
            self._saved[key] = storage.nbytes()
        return tensor

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        parameters = list(model.parameters())
        weights = sum(p.numel() * p.element_size() for p in parameters)
        gradients = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
        optimizer = self.trainer.optimizer if self.trainer is not None else None
        states = 0
        if optimizer is not None:
            states = sum(
                value.numel() * value.element_size()
                for per_parameter in optimizer.state.values()
                for value in per_parameter.values()
                if torch.is_tensor(value) and value.dim() > 0
            )
        self.peaks.append(weights + gradients + states + sum(self._saved.values()))

    def summary(self) -> Dict[str, float]:
        return {
            "trainable_params_mean": sum(self.trainable) / len(self.trainable) if self.trainable else 0,
            "trainable_params_final": self.trainable[-1] if self.trainable else 0,
            "peak_training_bytes": max(self.peaks) if self.peaks else 0,
        }
