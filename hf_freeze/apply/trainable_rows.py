"""Training a few rows of frozen parameters exactly: new token embeddings, single experts, axolotl's row ranges.

The full parameter stays frozen (``requires_grad=False``), so the optimizer, weight decay, gradient clipping and DDP
never see it: its frozen rows stay bit-identical and no optimizer state or gradient is ever allocated for them. The
rows that train are a small parameter of their own, held at ``model.hf_freeze_rows``, and a hook puts them where
the full parameter's rows are at every forward pass:

* a plain ``nn.Embedding``: its output is taken from the trainable rows wherever the input is one of their tokens;
* a plain ``nn.Linear`` (an LM head): the logits of the trainable rows' tokens are computed from them;
* anything else (fused expert tensors, scaled embeddings): the module sees, during its forward pass, the full
  parameter with the trainable rows put in (an out-of-place copy through which gradients reach the rows only).

A tied LM head is the input embedding's parameter: both modules read the same trainable rows. ``state_dict()`` (and
so ``save_pretrained`` and the Trainer's checkpoints) writes the rows into the full parameter and leaves the small
parameter out: the saved model is an ordinary one. Loading a state dict (a resumed Trainer) takes the rows back from
the full parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..model.layout import ROWS_MODULE

__all__ = ["TrainableRows", "merge_rows_file", "rows_key", "save_rows_file"]

# The version of the file `save_rows_file` writes, and the keys of its metadata.
_ROWS_FORMAT = "hf_freeze.rows/1"


def rows_key(parameter_name: str) -> str:
    """The name of a parameter's trainable rows inside ``model.hf_freeze_rows`` (dots are not allowed there)."""
    return parameter_name.replace(".", "__")


@dataclass
class _Attachment:
    name: str
    full: nn.Parameter
    container: "_RowsContainer"
    handles: List[Any]

    @property
    def key(self) -> str:
        return rows_key(self.name)

    @property
    def rows(self) -> nn.Parameter:
        return self.container.rows[self.key]

    @property
    def indices(self) -> torch.Tensor:
        """The trainable rows, sorted (a buffer, so that it follows the model to its device)."""
        return self.container.get_buffer(f"{self.key}_indices")

    @property
    def positions(self) -> torch.Tensor:
        """For each row of the full parameter, its position among the trainable rows, or -1."""
        return self.container.get_buffer(f"{self.key}_positions")


class _RowsContainer(nn.Module):
    """``model.hf_freeze_rows``: the trainable rows, out of every state dict (they are merged into their parameter)."""

    def __init__(self):
        super().__init__()
        self.rows = nn.ParameterDict()
        self.owners: Dict[str, "TrainableRows"] = {}


class TrainableRows:
    """Trains given rows (along the first dimension) of parameters that are otherwise frozen (`FreezeApplier`
    freezes the full parameters and keeps this in step with its decision).

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from hf_freeze.apply import TrainableRows
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 10)
    ...     def forward(self, ids):
    ...         return self.head(self.embed(ids))
    >>> net = Net()
    >>> _ = net.embed.weight.requires_grad_(False)  # the applier freezes the full parameter
    >>> rows = TrainableRows(net)
    >>> rows.update({"embed.weight": (8, 9)})
    True
    >>> [name for name, p in net.named_parameters() if p.requires_grad]
    ['head.weight', 'head.bias', 'hf_freeze_rows.rows.embed__weight']
    >>> net(torch.tensor([[1, 9]])).sum().backward()
    >>> net.embed.weight.grad is None, rows.parameters["embed.weight"].grad.shape
    (True, torch.Size([2, 4]))
    ```
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.attachments: Dict[str, _Attachment] = {}

    @property
    def parameters(self) -> Dict[str, nn.Parameter]:
        """The trainable rows of each parameter, by the full parameter's name."""
        return {name: attachment.rows for name, attachment in self.attachments.items()}

    def selection(self) -> Dict[str, Tuple[int, ...]]:
        return {name: tuple(attachment.indices.tolist()) for name, attachment in self.attachments.items()}

    def registered_names(self) -> List[str]:
        """The trainable rows' names in ``model.named_parameters()``."""
        return [f"{ROWS_MODULE}.rows.{rows_key(name)}" for name in self.attachments]

    def update(self, selection: Mapping[str, Sequence[int]], optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Make the trainable rows match ``selection``; True when something changed. A parameter already trained by
        rows (by an earlier freezer on the same model) keeps its rows parameter when its rows are the same. Rows
        taken away leave ``optimizer`` (the innermost one, not accelerate's wrapper)."""
        wanted = {name: tuple(int(row) for row in rows) for name, rows in selection.items()}
        self._adopt_existing()
        if wanted == self.selection():
            return False
        for name in [name for name, attachment in self.attachments.items() if wanted.get(name) != self.selection()[name]]:
            self._detach(name, optimizer)
        parameters = dict(self.model.named_parameters())
        for name, rows in wanted.items():
            if name not in self.attachments:
                self._attach(name, parameters[name], rows)
        return True

    def merge(self) -> None:
        """Write the trained rows into their full parameters (``state_dict`` does it too)."""
        with torch.no_grad():
            for attachment in self.attachments.values():
                attachment.full.index_copy_(0, attachment.indices, attachment.rows.detach().to(attachment.full.dtype))

    def remove(self) -> None:
        """Merge the rows and take the hooks and the rows parameters away: the model is an ordinary one again."""
        for name in list(self.attachments):
            self._detach(name, None)

    # -- attaching -------------------------------------------------------------------------------------------------

    def _container(self) -> _RowsContainer:
        container = getattr(self.model, ROWS_MODULE, None)
        if container is None:
            container = _RowsContainer()
            self.model.add_module(ROWS_MODULE, container)
            container.register_state_dict_post_hook(_merge_into_state_dict)
            # On the model itself: a module's load hooks see only its own keys, and the rows come from the full ones.
            self.model.register_load_state_dict_pre_hook(_rows_from_state_dict)
        return container

    def _adopt_existing(self) -> None:
        """Take over the rows a previous freezer attached to this model (a second Trainer, a rebuilt callback)."""
        container = getattr(self.model, ROWS_MODULE, None)
        if container is None or self.attachments:
            return
        for other in list(container.owners.values()):
            if other is not self:
                self.attachments.update(other.attachments)
                other.attachments = {}
        container.owners = {name: self for name in self.attachments}

    def _attach(self, name: str, full: nn.Parameter, rows: Tuple[int, ...]) -> None:
        container = self._container()
        indices = torch.tensor(rows, dtype=torch.long, device=full.device)
        container.rows[rows_key(name)] = nn.Parameter(full.detach()[indices].clone())
        positions = torch.full((full.shape[0],), -1, dtype=torch.long, device=full.device)
        positions[indices] = torch.arange(len(rows), device=full.device)
        container.register_buffer(f"{rows_key(name)}_indices", indices, persistent=False)
        container.register_buffer(f"{rows_key(name)}_positions", positions, persistent=False)
        attachment = _Attachment(name, full, container, [])
        for module, attribute in _holders(self.model, full):
            attachment.handles += _hooks(module, attribute, attachment)
        self.attachments[name] = attachment
        container.owners[name] = self

    def _detach(self, name: str, optimizer: Optional[torch.optim.Optimizer]) -> None:
        attachment = self.attachments[name]
        with torch.no_grad():  # what the rows learnt stays in the full parameter
            attachment.full.index_copy_(0, attachment.indices, attachment.rows.detach().to(attachment.full.dtype))
        del self.attachments[name]
        for handle in attachment.handles:
            handle.remove()
        rows = attachment.rows
        container = attachment.container
        del container.rows[attachment.key]
        for suffix in ("_indices", "_positions"):
            delattr(container, attachment.key + suffix)
        container.owners.pop(name, None)
        if optimizer is not None:  # the real optimizer, not a wrapper
            optimizer.state.pop(rows, None)
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not rows]


def _holders(model: nn.Module, full: nn.Parameter) -> List[Tuple[nn.Module, str]]:
    """Every (module, attribute) holding ``full``: two for a tied embedding and LM head."""
    found = []
    for module in model.modules():
        for attribute, parameter in module._parameters.items():
            if parameter is full:
                found.append((module, attribute))
    return found


def _hooks(module: nn.Module, attribute: str, attachment: _Attachment) -> List[Any]:
    if type(module) is nn.Embedding and attribute == "weight":
        return [module.register_forward_hook(_embedding_hook(attachment))]
    if type(module) is nn.Linear and attribute == "weight":
        return [module.register_forward_hook(_linear_hook(attachment))]
    return [
        module.register_forward_pre_hook(_swap_in(attribute, attachment)),
        module.register_forward_hook(_swap_out(attribute, attachment), always_call=True),
    ]


def _embedding_hook(attachment: _Attachment):
    def hook(module, args, output):
        # Every step, even without a trainable token in the batch: DDP expects the rows in every backward pass.
        position = attachment.positions[args[0]]
        replacement = F.embedding(position.clamp(min=0), attachment.rows).to(output.dtype)
        return torch.where((position >= 0).unsqueeze(-1), replacement, output)

    return hook


def _linear_hook(attachment: _Attachment):
    def hook(module, args, output):
        bias = module.bias[attachment.indices] if module.bias is not None else None
        logits = F.linear(args[0].to(attachment.rows.dtype), attachment.rows, bias).to(output.dtype)
        # In place: the linear layer's backward needs its input and weight, not its output.
        return output.index_copy_(-1, attachment.indices, logits)

    return hook


def _swap_in(attribute: str, attachment: _Attachment):
    def hook(module, args):
        merged = attachment.full.index_put((attachment.indices,), attachment.rows.to(attachment.full.dtype))
        module._parameters[attribute] = merged  # a plain tensor for the length of the forward pass

    return hook


def _swap_out(attribute: str, attachment: _Attachment):
    def hook(module, args, output):
        module._parameters[attribute] = attachment.full

    return hook


def _merge_into_state_dict(container: _RowsContainer, state_dict, prefix: str, local_metadata) -> None:
    """Saved models are ordinary ones: the rows go into their full parameter, the small parameters stay out."""
    for owner in set(container.owners.values()):
        owner.merge()
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def _rows_from_state_dict(model: nn.Module, state_dict, prefix: str, *args) -> None:
    """Loading an ordinary state dict (a Trainer resuming from its checkpoint): the rows come from the full tensor."""
    container = getattr(model, ROWS_MODULE, None)
    if container is None:
        return
    for owner in set(container.owners.values()):
        for name, attachment in owner.attachments.items():
            key, full_key = f"{prefix}{ROWS_MODULE}.rows.{rows_key(name)}", prefix + name
            if key not in state_dict and full_key in state_dict:
                state_dict[key] = state_dict[full_key][attachment.indices.to(state_dict[full_key].device)]


# -- a file with just the trained rows ------------------------------------------------------------------------------


def save_rows_file(rows: TrainableRows, path: str, metadata: Optional[Mapping[str, Any]] = None) -> int:
    """Write the trained rows (with their row indices) as a safetensors file; returns its size in bytes."""
    import json
    import os

    from safetensors.torch import save_file

    from ..errors import FreezeConfigError

    if not rows.attachments:
        raise FreezeConfigError(
            "There are no trained rows to save: set `freeze_trainable_tokens`, `freeze_trainable_experts` or an "
            "axolotl row range.", fields=["freeze_trainable_tokens", "freeze_trainable_experts"],
        )
    tensors, indices = {}, {}
    for name, attachment in rows.attachments.items():
        tensors[name] = attachment.rows.detach().to("cpu").contiguous()
        indices[name] = attachment.indices.tolist()
    header = {"format": _ROWS_FORMAT, "rows": json.dumps(indices), **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, path, metadata=header)
    return os.path.getsize(path)


def merge_rows_file(model: nn.Module, path: str) -> Dict[str, int]:
    """Write the rows saved by `save_rows_file` into ``model``'s parameters (a base model, resized the same way);
    returns the number of rows merged per parameter. Refuses a file for other shapes."""
    import json

    from safetensors import safe_open

    from ..errors import FreezeConfigError

    parameters = dict(model.named_parameters())
    merged = {}
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != _ROWS_FORMAT:
            raise FreezeConfigError(f"{path} is not a rows file written by hf_freeze (its format is {header.get('format')!r}).")
        indices = json.loads(header["rows"])
        for name, rows in indices.items():
            tensor = handle.get_tensor(name)
            parameter = parameters.get(name)
            if parameter is None or parameter.shape[1:] != tensor.shape[1:] or max(rows) >= parameter.shape[0]:
                shape = None if parameter is None else tuple(parameter.shape)
                raise FreezeConfigError(
                    f"{path} holds rows {rows[:5]}... of {name} shaped {tuple(tensor.shape[1:])}, but this model's "
                    f"{name} is {shape}: merge it into the model it was trained from (resized the same way)."
                )
            with torch.no_grad():
                index = torch.tensor(rows, dtype=torch.long, device=parameter.device)
                parameter.index_copy_(0, index, tensor.to(parameter.device, parameter.dtype))
            merged[name] = len(rows)
    return merged
