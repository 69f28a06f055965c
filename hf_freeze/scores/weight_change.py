"""``weight_change``: relative weight change ‖w_end − w_start‖ / ‖w_start‖ of each layer over the probe.

Instead of a copy of the whole model, the meter keeps a fixed random sample of each parameter's entries
(`WEIGHT_SAMPLE_SIZE`; smaller tensors are kept whole): the sums of squares of the sampled entries, scaled by
numel / sample size, estimate the full ones, so the ratio does too (about 1% error per layer at the default).
When the probe withholds its optimizer steps (`freeze_probe_mode: measure`), the change is the one those steps would
have made: the optimizer's update taken on the sampled entries alone (`SampledUpdate`).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Dict, List, Optional

import torch

from ..errors import FreezeConfigError
from ..model.sharded import full_value
from .meter import Layers, ScoreMeter
from .sampled_update import SampledUpdate

__all__ = ["WEIGHT_SAMPLE_SIZE", "WeightChangeMeter"]

# Entries of each parameter that the weight-change meter keeps (4 bytes each).
WEIGHT_SAMPLE_SIZE = 4096


def _sample_indices(name: str, numel: int, seed: int, device: torch.device) -> Optional[torch.Tensor]:
    """The entries of a parameter the weight-change meter keeps: all of a small one, else a fixed random sample."""
    if numel <= WEIGHT_SAMPLE_SIZE:
        return None
    key = int.from_bytes(hashlib.sha256(f"hf_freeze.sample:{seed}:{name}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(key)
    return torch.randint(numel, (WEIGHT_SAMPLE_SIZE,), generator=generator).to(device)


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.detach().float().cpu().contiguous().numpy().tobytes()).decode("ascii")


def _decode(text: str, device: torch.device) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy()).to(device)


class WeightChangeMeter(ScoreMeter):
    """‖Δw‖ / ‖w‖ of each layer over the probe, from a fixed sample of each parameter's entries (with the updates the
    probe withheld, when it withholds them)."""

    def __init__(self, layers: Layers, seed: int = 0):
        super().__init__(layers, seed)
        self._indices: Dict[str, Optional[torch.Tensor]] = {}
        self._start: Dict[str, torch.Tensor] = {}
        self._withheld: Optional[SampledUpdate] = None

    def _sample(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        if name not in self._indices:
            self._indices[name] = _sample_indices(name, parameter.numel(), self.seed, parameter.device)
        flat = full_value(parameter).detach().reshape(-1)  # the whole tensor (gathered under FSDP2)
        indices = self._indices[name]
        return (flat if indices is None else flat[indices]).float()

    def start(self) -> None:
        self._start = {
            name: self._sample(name, parameter).clone() for _, parameters in self.layers for name, parameter in parameters
        }
        self._withheld = None

    def withheld_step(self, optimizer) -> None:
        if optimizer is None:
            raise FreezeConfigError(
                "`freeze_probe_mode` 'measure' scores 'weight_change' with the update the optimizer would have made, "
                "and no optimizer was given: pass it to `LayerFreezer.update(progress, optimizer)` (or to "
                "`before_optimizer_step(optimizer)`), or use `freeze_probe_mode: train`.",
                fields=["freeze_probe_mode"],
            )
        if self._withheld is None:
            self._withheld = SampledUpdate(self._start)
        parameters = {name: parameter for _, named in self.layers for name, parameter in named}
        gradients = {
            name: None if parameter.grad is None else self._sample(name, parameter.grad)
            for name, parameter in parameters.items()
        }
        self._withheld.step(optimizer, parameters, gradients)

    def finish(self) -> List[float]:
        change, size = [], []
        for _, parameters in self.layers:
            layer_change = layer_size = torch.zeros((), device=self.device)
            for name, parameter in parameters:
                before = self._start[name].to(parameter.device)
                # Sums over a sample stand for sums over numel entries.
                scale = parameter.numel() / before.numel()
                moved = self._sample(name, parameter) - before
                if self._withheld is not None:
                    moved = moved + (self._withheld.values[name].to(parameter.device) - before)
                layer_change = layer_change + scale * moved.square().sum().to(self.device)
                layer_size = layer_size + scale * before.square().sum().to(self.device)
            change.append(layer_change)
            size.append(layer_size)
        change, size = torch.stack(change), torch.stack(size)
        ratios = (change.sqrt() / size.sqrt().clamp_min(torch.finfo(torch.float32).tiny)).tolist()
        self._start, self._withheld = {}, None
        return ratios

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"start": {name: _encode(values) for name, values in self._start.items()}}
        if self._withheld is not None:
            state["withheld"] = self._withheld.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._start = {name: _decode(text, self.device) for name, text in (state.get("start") or {}).items()}
        withheld = state.get("withheld")
        self._withheld = SampledUpdate.from_state_dict(withheld, self.device) if withheld else None
