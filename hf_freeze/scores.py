"""Per-layer scores for adaptive freezing, and the meters that measure them (the torch side of `adaptive`).

A score is registered in `SCORES` with a meter: `start()` as the probe begins, `observe_gradients()` before each
optimizer step of the probe, `finish()` as it ends, returning one number per layer (higher = changed more, larger
gradients, more signal). Meter state is JSON-safe and keyed by parameter name, so a checkpoint taken in the middle
of a probe resumes it exactly.

* ``weight_change``: relative weight change ‖w_end − w_start‖ / ‖w_start‖ of each layer over the probe. Instead of
  a copy of the whole model, the meter keeps a fixed random sample of each parameter's entries
  (`WEIGHT_SAMPLE_SIZE`; smaller tensors are kept whole): the sums of squares of the sampled entries, scaled by
  numel / sample size, estimate the full ones, so the ratio does too (about 1% error per layer at the default).
* ``grad_norm``: the layer's gradient norm (after clipping, as the optimizer sees it), averaged over the probe's
  optimizer steps: small gradients mean the layer has little left to learn.
* ``grad_norm_change``: how much that norm still moves, |second half's mean − first half's mean| / first half's
  mean over the probe: layers whose gradients have settled freeze first (AutoFreeze's gradient-norm change rate).
* ``snr``: signal-to-noise ratio of the layer's weight matrices, read off the weights without a probe (Spectrum):
  the singular values above the Marchenko–Pastur edge of a random matrix with the same shape and noise level are
  signal, the rest noise; a matrix's score is signal energy / noise energy. Each matrix is divided by the mean
  score of its kind (the same parameter name in every layer) before a layer's matrices are averaged, so that every
  kind of matrix counts the same, as Spectrum ranks each kind separately.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .registry import Registry

__all__ = [
    "SCORES",
    "WEIGHT_SAMPLE_SIZE",
    "GradNormChangeMeter",
    "GradNormMeter",
    "Score",
    "ScoreMeter",
    "SnrMeter",
    "WeightChangeMeter",
    "matrix_snr",
    "register_score",
]

# Entries of each parameter that the weight-change meter keeps (4 bytes each).
WEIGHT_SAMPLE_SIZE = 4096

# Layers in forward order: (block name, [(parameter name, parameter), ...]).
Layers = Sequence[Tuple[str, Sequence[Tuple[str, nn.Parameter]]]]


class ScoreMeter:
    """Measures one score for every layer. Subclasses override what they need.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_freeze.scores import SCORES
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> layers = [(f"{i}", [(f"{i}.{name}", p) for name, p in module.named_parameters()]) for i, module in enumerate(net)]
    >>> meter = SCORES.get("weight_change").meter(layers, 0)
    >>> meter.start()
    >>> _ = net[1].weight.data.mul_(2.0)
    >>> [round(score, 2) for score in meter.finish()][0]
    0.0
    ```
    """

    def __init__(self, layers: Layers, seed: int = 0):
        self.layers = [(name, list(parameters)) for name, parameters in layers]
        self.seed = seed

    def start(self) -> None:
        """The probe begins."""

    def observe_gradients(self) -> None:
        """Before an optimizer step of the probe (gradients are final)."""

    def finish(self) -> List[float]:
        """The probe ends: one score per layer."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    @property
    def device(self) -> torch.device:
        for _, parameters in self.layers:
            for _, parameter in parameters:
                return parameter.device
        return torch.device("cpu")


@dataclass(frozen=True)
class Score:
    """A registered layer score.

    Args:
        name: The `freeze_score` value.
        meter: ``(layers, seed) -> ScoreMeter``.
        needs_probe: True when the score is measured over probe steps; False when read off the weights at once.
        description: One line for docs.
        min_probe_steps: The shortest probe the score can be measured over.

    Example:

    ```python
    >>> from hf_freeze.scores import SCORES
    >>> SCORES.get("snr").needs_probe
    False
    ```
    """

    name: str
    meter: Callable[[Layers, int], ScoreMeter]
    needs_probe: bool = True
    description: str = ""
    min_probe_steps: int = 1


SCORES: Registry[Score] = Registry("score", field="freeze_score")


def register_score(score: Score) -> Score:
    return SCORES.add(score.name, score)


# -- weight change -------------------------------------------------------------------------------------------------


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
    """‖Δw‖ / ‖w‖ of each layer over the probe, from a fixed sample of each parameter's entries."""

    def __init__(self, layers: Layers, seed: int = 0):
        super().__init__(layers, seed)
        self._indices: Dict[str, Optional[torch.Tensor]] = {}
        self._start: Dict[str, torch.Tensor] = {}

    def _sample(self, name: str, parameter: nn.Parameter) -> torch.Tensor:
        if name not in self._indices:
            self._indices[name] = _sample_indices(name, parameter.numel(), self.seed, parameter.device)
        flat = parameter.detach().reshape(-1)
        indices = self._indices[name]
        return (flat if indices is None else flat[indices]).float()

    def start(self) -> None:
        self._start = {
            name: self._sample(name, parameter).clone() for _, parameters in self.layers for name, parameter in parameters
        }

    def finish(self) -> List[float]:
        change, size = [], []
        for _, parameters in self.layers:
            layer_change = layer_size = torch.zeros((), device=self.device)
            for name, parameter in parameters:
                before = self._start[name].to(parameter.device)
                # Sums over a sample stand for sums over numel entries.
                scale = parameter.numel() / before.numel()
                layer_change = layer_change + scale * (self._sample(name, parameter) - before).square().sum().to(self.device)
                layer_size = layer_size + scale * before.square().sum().to(self.device)
            change.append(layer_change)
            size.append(layer_size)
        change, size = torch.stack(change), torch.stack(size)
        ratios = (change.sqrt() / size.sqrt().clamp_min(torch.finfo(torch.float32).tiny)).tolist()
        self._start = {}
        return ratios

    def state_dict(self) -> Dict[str, Any]:
        return {"start": {name: _encode(values) for name, values in self._start.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._start = {name: _decode(text, self.device) for name, text in (state.get("start") or {}).items()}


# -- gradient norm -------------------------------------------------------------------------------------------------


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
            grads = [parameter.grad for _, parameter in parameters if parameter.grad is not None]
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


# -- signal-to-noise ratio (Spectrum) ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _marchenko_pastur_median(ratio: float) -> float:
    """Median of the Marchenko–Pastur law with variance 1 and aspect ratio `ratio` = rows / columns <= 1."""
    import numpy as np

    low, high = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    # x = low + (high - low) t^2 takes the 1/sqrt singularity at x = low (ratio 1) out of the integrand.
    t = np.linspace(0.0, 1.0, 20001)
    x = low + (high - low) * t**2
    density = np.sqrt(np.clip((high - x) * (x - low), 0.0, None)) / (2 * math.pi * ratio * np.maximum(x, 1e-300))
    weight = density * 2 * (high - low) * t
    cdf = np.concatenate([[0.0], np.cumsum((weight[1:] + weight[:-1]) / 2 * np.diff(t))])
    return float(np.interp(0.5 * cdf[-1], cdf, x))


def matrix_snr(weight: torch.Tensor) -> float:
    """Signal energy over noise energy of a weight matrix, against the Marchenko–Pastur edge.

    The noise level is estimated from the median singular value (the bulk of a matrix with few strong directions is
    its noise); singular values above the edge that noise of that level reaches, σ(√rows + √columns), are signal.

    Example:

    ```python
    >>> import torch
    >>> from hf_freeze.scores import matrix_snr
    >>> g = torch.Generator().manual_seed(0)
    >>> noise = torch.randn(256, 512, generator=g)
    >>> low_rank = 3 * torch.randn(256, 4, generator=g) @ torch.randn(4, 512, generator=g)
    >>> matrix_snr(noise) < 0.05 < 1 < matrix_snr(noise + low_rank)
    True
    ```
    """
    matrix = weight.detach().float()
    if matrix.dim() > 2:
        matrix = matrix.flatten(1)
    rows, columns = sorted(matrix.shape)
    singular = torch.linalg.svdvals(matrix)
    median = singular.median()
    if median <= 0:
        return 0.0
    noise_level = median / math.sqrt(columns * _marchenko_pastur_median(rows / columns))
    edge = noise_level * (math.sqrt(rows) + math.sqrt(columns))
    energy = singular.square()
    signal, noise = energy[singular > edge].sum(), energy[singular <= edge].sum()
    return float(signal / noise) if noise > 0 else float("inf")


class SnrMeter(ScoreMeter):
    """Spectrum's signal-to-noise ratio of each layer's weight matrices, read off the current weights."""

    def finish(self) -> List[float]:
        by_kind: Dict[str, List[Tuple[int, float]]] = {}
        for index, (block_name, parameters) in enumerate(self.layers):
            for name, parameter in parameters:
                if parameter.dim() < 2 or min(parameter.shape[0], parameter[0].numel()) < 2:
                    continue  # biases, norms, vectors: no spectrum
                kind = name[len(block_name) + 1:] if name.startswith(block_name + ".") else name
                by_kind.setdefault(kind, []).append((index, matrix_snr(parameter)))
        totals, counts = [0.0] * len(self.layers), [0] * len(self.layers)
        for values in by_kind.values():
            finite = [value for _, value in values if math.isfinite(value)]
            mean = sum(finite) / len(finite) if finite else 0.0
            for index, value in values:
                if not math.isfinite(value):
                    value = max(finite, default=1.0) * 2 if finite else 1.0
                totals[index] += value / mean if mean > 0 else 0.0
                counts[index] += 1
        return [total / count if count else 0.0 for total, count in zip(totals, counts)]


register_score(
    Score("weight_change", WeightChangeMeter, True, "Relative weight change |dw|/|w| over the probe (seed 002).")
)
register_score(Score("grad_norm", GradNormMeter, True, "Mean gradient norm over the probe."))
register_score(
    Score(
        "grad_norm_change", GradNormChangeMeter, True,
        "Relative change of the gradient norm between the probe's halves (AutoFreeze); needs 2+ probe steps.",
        min_probe_steps=2,
    )
)
register_score(
    Score("snr", SnrMeter, False, "Signal-to-noise ratio of the weight matrices, no probe (Spectrum).")
)
