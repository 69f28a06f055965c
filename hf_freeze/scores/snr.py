"""``snr``: signal-to-noise ratio of each layer's weight matrices, read off the weights without a probe (Spectrum).

The singular values above the Marchenko–Pastur edge of a random matrix with the same shape and noise level are
signal, the rest noise; a matrix's score is signal energy / noise energy. Each matrix is divided by the mean score
of its kind (the same parameter name in every layer) before a layer's matrices are averaged, so that every kind of
matrix counts the same, as Spectrum ranks each kind separately.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Tuple

import torch

from ..model.sharded import full_value
from .meter import ScoreMeter

__all__ = ["SnrMeter", "matrix_snr"]


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
                if parameter.dim() < 2 or min(parameter.shape[0], parameter.numel() // parameter.shape[0]) < 2:
                    continue  # biases, norms, vectors: no spectrum
                kind = name[len(block_name) + 1:] if name.startswith(block_name + ".") else name
                by_kind.setdefault(kind, []).append((index, matrix_snr(full_value(parameter))))
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
