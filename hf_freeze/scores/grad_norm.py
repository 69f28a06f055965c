"""Gradient-norm scores, read before each optimizer step of the probe (after clipping, as the optimizer sees them).

* ``grad_norm``: the layer's gradient norm averaged over the probe's optimizer steps: small gradients mean the layer
  has little left to learn.
* ``grad_norm_change``: how much that norm still moves, |second half's mean − first half's mean| / first half's
  mean over the probe: layers whose gradients have settled freeze first (AutoFreeze's gradient-norm change rate).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from ..model.sharded import full_value
from .meter import Layers, ScoreMeter

__all__ = ["GradNormChangeMeter", "GradNormMeter"]


class GradNormMeter(ScoreMeter):
    """Each layer's gradient norm, averaged over the probe's optimizer steps."""

    def __init__(self, layers: Layers, seed: int = 0):
        super().__init__(layers, seed)
        self._norms: List[torch.Tensor] = []  # one row of per-layer norms per optimizer step

    def start(self) -> None:
        self._norms = []

    def observe_gradients(self) -> None:
        row = []
        for _, parameters in self.layers:
            # Whole gradients (gathered under FSDP2): the norms every engine measures are the same numbers.
            grads = [full_value(parameter.grad) for _, parameter in parameters if parameter.grad is not None]
            if grads:
                norms = torch.stack([norm.to(self.device, torch.float64) for norm in torch._foreach_norm(grads)])
                row.append(norms.square().sum().sqrt())
            else:
                row.append(torch.zeros((), dtype=torch.float64, device=self.device))
        self._norms.append(torch.stack(row))

    def finish(self) -> List[float]:
        if not self._norms:
            return [0.0] * len(self.layers)
        scores = self._score(torch.stack(self._norms)).tolist()
        self._norms = []
        return scores

    def _score(self, norms: torch.Tensor) -> torch.Tensor:
        """Scores from the probe's norms (steps × layers)."""
        return norms.mean(dim=0)

    def state_dict(self) -> Dict[str, Any]:
        return {"norms": [row.tolist() for row in self._norms]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._norms = [torch.tensor(row, dtype=torch.float64, device=self.device) for row in state.get("norms") or []]


class GradNormChangeMeter(GradNormMeter):
    """How much each layer's gradient norm still moves: |mean of the probe's second half − mean of its first half|
    / mean of its first half. Layers whose gradients have settled score low (AutoFreeze's criterion)."""

    def _score(self, norms: torch.Tensor) -> torch.Tensor:
        half = norms.shape[0] // 2
        if half == 0:
            return torch.zeros(norms.shape[1], dtype=norms.dtype, device=norms.device)
        first, second = norms[:half].mean(dim=0), norms[half:].mean(dim=0)
        return (second - first).abs() / first.clamp_min(torch.finfo(first.dtype).tiny)
