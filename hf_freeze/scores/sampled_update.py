"""`SampledUpdate`: the update an optimizer step would have made, taken on a sample of each parameter's entries.

A probe that withholds its optimizer steps (`freeze_probe_mode: measure`) still scores ``weight_change``: the meter
steps a second optimizer, of the real one's class and with its hyperparameters (read from the real param groups at
every step, so the learning-rate schedule is followed), over copies of its sampled entries, fed the sampled entries
of the real gradients. An optimizer that updates entry by entry (SGD, Adam, AdamW, RMSprop, Adagrad, Lion, ...)
moves the copies exactly as it would have moved those entries; one that looks at whole tensors (Adafactor's factored
moments, LAMB's trust ratio) only approximately. It holds a few floats per sampled entry (4,096 entries a parameter),
and its state is JSON-safe and keyed by parameter name, bit-exact through a checkpoint.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..errors import FreezeConfigError

__all__ = ["SampledUpdate"]


class SampledUpdate:
    """Where a parameter's sampled entries would be after the withheld optimizer steps so far.

    Args:
        start: Parameter name -> its sampled entries when the probe began (float32).

    Example:

    ```python
    >>> import torch
    >>> from hf_freeze.scores.sampled_update import SampledUpdate
    >>> weight = torch.nn.Parameter(torch.ones(3))
    >>> optimizer = torch.optim.SGD([weight], lr=0.5)
    >>> update = SampledUpdate({"weight": weight.detach().clone()})
    >>> update.step(optimizer, {"weight": weight}, {"weight": torch.full((3,), 2.0)})
    >>> update.values["weight"].tolist(), weight.tolist()  # the copy moved, the weight did not
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    ```
    """

    def __init__(self, start: Mapping[str, torch.Tensor]):
        self.values: Dict[str, torch.Tensor] = {name: values.detach().clone() for name, values in start.items()}
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._group_indices: List[int] = []  # the real param group of each of our groups
        self._loaded_state: Dict[str, Dict[str, Any]] = {}  # from a checkpoint, until the optimizer is rebuilt

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: Mapping[str, torch.Tensor],
        gradients: Mapping[str, Optional[torch.Tensor]],
    ) -> None:
        """Take the step ``optimizer`` would take, on the copies, with the sampled ``gradients`` (``None``: no grad,
        skipped as the optimizer skips it). ``parameters`` are the real ones, to find their param groups."""
        if self._optimizer is None:
            self._build(optimizer, parameters)
        for ours, index in zip(self._optimizer.param_groups, self._group_indices):
            ours.update({key: value for key, value in optimizer.param_groups[index].items() if key != "params"})
        for name, values in self.values.items():
            gradient = gradients.get(name)
            values.grad = None if gradient is None else gradient.detach().to(values.dtype)
        self._optimizer.step()
        for values in self.values.values():
            values.grad = None

    def state_dict(self) -> Dict[str, Any]:
        state = dict(self._loaded_state)
        if self._optimizer is not None:
            state = {
                name: {key: _encode(value) for key, value in self._optimizer.state[values].items()}
                for name, values in self.values.items() if values in self._optimizer.state
            }
        return {"values": {name: _encode(values) for name, values in self.values.items()}, "state": state}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device) -> "SampledUpdate":
        update = cls({name: _decode(encoded, device) for name, encoded in (state.get("values") or {}).items()})
        update._loaded_state = dict(state.get("state") or {})
        return update

    def _build(self, optimizer: torch.optim.Optimizer, parameters: Mapping[str, torch.Tensor]) -> None:
        group_of = {id(parameter): index for index, group in enumerate(optimizer.param_groups) for parameter in group["params"]}
        members: Dict[int, List[str]] = {}
        for name in self.values:
            index = group_of.get(id(parameters[name]))
            if index is not None:  # a parameter the optimizer does not hold never moves
                members.setdefault(index, []).append(name)
        self._group_indices = sorted(members)
        groups = [
            {**{key: value for key, value in optimizer.param_groups[index].items() if key != "params"},
             "params": [self.values[name] for name in members[index]]}
            for index in self._group_indices
        ]
        self._optimizer = _same_kind(optimizer, groups)
        for name, entries in self._loaded_state.items():
            if name in self.values:
                values = self.values[name]
                self._optimizer.state[values] = {key: _decode(value, values.device) for key, value in entries.items()}
        self._loaded_state = {}


def _same_kind(optimizer: torch.optim.Optimizer, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    kind = type(optimizer)
    for attempt in (lambda: kind(groups), lambda: kind(groups, **optimizer.defaults)):
        try:
            return attempt()
        except TypeError:
            continue
    raise FreezeConfigError(
        f"`freeze_probe_mode` 'measure' scores 'weight_change' with the update the optimizer would have made, and "
        f"cannot build a {kind.__name__} over the sampled entries (its constructor takes neither param groups alone "
        "nor with its defaults). Use `freeze_probe_mode: train`, or a gradient score ('grad_norm').",
        fields=["freeze_probe_mode", "freeze_score"],
    )


def _encode(value: Any) -> Any:
    """A tensor as exact bytes with its dtype, shape and device kind; a number as it is."""
    if not torch.is_tensor(value):
        return value
    flat = value.detach().reshape(-1).contiguous().cpu()
    return {
        "dtype": str(flat.dtype).removeprefix("torch."), "shape": list(value.shape), "device": value.device.type,
        "bytes": base64.b64encode(flat.view(torch.uint8).numpy().tobytes()).decode("ascii"),
    }


def _decode(encoded: Any, device: torch.device) -> Any:
    """The inverse of `_encode`; a tensor goes back to ``device``, or to the CPU when it was on the CPU."""
    if not isinstance(encoded, dict) or "bytes" not in encoded:
        return encoded
    dtype = getattr(torch, encoded["dtype"])
    raw = bytearray(base64.b64decode(encoded["bytes"]))
    tensor = torch.frombuffer(raw, dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
    return tensor.reshape(encoded["shape"]).to(device if encoded["device"] != "cpu" else "cpu")
