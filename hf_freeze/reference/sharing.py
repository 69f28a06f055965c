"""The shared computation of a reference built by `reference_model` (trlx's ``forward_hydra``).

When the reference is called on the inputs the policy has just run, the output of the frozen prefix is taken from the
policy's forward instead of recomputed: a hook on the policy's last prefix layer captures that output, and during
the reference's next forward its prefix layers return it instead of running. That is exact only when all of the
following hold; each is checked on every call, and the reference runs its full forward otherwise
(``reference_state(reference).last_fallback`` says why):

- one stack of layers (decoder-only or encoder-only) whose leading blocks, embeddings first, still share storage
  with the reference (frozen when it was built, never copied, not moved away), at least one layer among them;
- the very tensor objects of the policy's last forward, positional and keyword, none modified in place since
  (version counters), and equal other arguments, except those acting after the layers (``labels``,
  ``logits_to_keep``, TRL's ``fused_lm_head``, ...); no ``past_key_values``; the same autocast state;
- nothing random or batch-dependent in the policy's forward over the prefix: where a module is in train mode,
  every dropout module has ``p == 0``, every number named like ``*drop*``, ``*jitter*``, ``*noise*`` (Llama's
  functional ``attention_dropout``, layer drop, router jitter) is 0, and no batch norm runs; otherwise the
  policy's train-mode hidden states differ from the eval-mode reference's. (TRL's ``disable_dropout=True`` zeroes
  dropout modules, not such numbers.) Modules outside the blocks after the prefix all count: conservative;
- the reference asks for no per-layer outputs (``output_hidden_states``, ``output_attentions``,
  ``output_router_logits``) and no cache (``use_cache=False``, as TRL's trainers pass);
- the last prefix layer runs once per forward and returns tensors; a captured output is used once.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..apply.frozen_prefix import frozen_prefix
from ..errors import LayerDiscoveryError
from ..model import discover_layout
from .hooks import SharedPair, WeakHook

__all__ = ["SharedComputation"]

_AFTER_THE_LAYERS = {"labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head", "return_dict",
                     "output_router_logits", "use_cache"}
_PER_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")
_RANDOM_NAME = re.compile(r"drop|jitter|noise", re.IGNORECASE)


class _Call:
    """The arguments of one forward (tensors by identity and version), and what the policy's prefix produced."""

    def __init__(self, args: tuple, kwargs: dict, layers: Tuple[str, ...] = ()):
        self.args = tuple(_fingerprint(value) for value in args)
        self.kwargs = {key: _fingerprint(value) for key, value in kwargs.items() if key not in _AFTER_THE_LAYERS}
        self.autocast = _autocast_state(args, kwargs)
        self.layers = layers
        self.output: Any = None
        self.output_version: Optional[int] = None
        self.refusal: Optional[str] = None

    def differs_from(self, other: "_Call") -> Optional[str]:
        if len(self.args) != len(other.args) or set(self.kwargs) != set(other.kwargs):
            return "the reference got other arguments than the policy's last forward"
        if self.args != other.args or self.kwargs != other.kwargs:
            return "the reference got other input tensors (or ones modified in place) than the policy's last forward"
        if self.autocast != other.autocast:
            return "the autocast state differs from the policy's last forward"
        return None


class SharedComputation:
    """The shared computation half of `ReferenceState`: capturing the policy's prefix output, replaying it in the
    reference, and the reason for each full forward. The state provides ``policy``, ``pending`` (the shared
    `SharedPair` by name), ``_handles`` and ``resync()``.
    """

    def _init_shared_computation(self, share_computation: bool, layer_paths: Optional[Sequence[str]]) -> None:
        self.shared_forwards = self.full_forwards = 0
        self.last_fallback: Optional[str] = None
        self.disabled: Optional[str] = None if share_computation else "share_computation=False"
        self.layout = None
        self.prefix_layers: Tuple[str, ...] = ()
        self._prefix_key: Optional[int] = None
        self._prefix_pairs: List[SharedPair] = []
        self._no_prefix: Optional[str] = None
        self._switches: List[Tuple[str, nn.Module, str]] = []
        self._capture_handle = None
        self._armed: Optional[_Call] = None  # the policy forward running now
        self._captured: Optional[_Call] = None  # the policy's last forward, when it can be reused
        self._policy_refusal: Optional[str] = None
        self._replaying: Optional[_Call] = None
        if self.disabled is None:
            try:
                self.layout = discover_layout(self.policy, layer_paths)
            except LayerDiscoveryError as error:
                self.disabled = f"the layers were not found ({error})"

    def _install_shared_computation(self, reference: nn.Module) -> None:
        # The shared set only shrinks: without a shared prefix now there will never be one.
        self.disabled = self.disabled or self._update_prefix()
        if self.disabled is None:
            self._handles.append(self.policy.register_forward_pre_hook(WeakHook(self, "on_policy_forward"),
                                                                       with_kwargs=True))
            self._handles.append(self.policy.register_forward_hook(WeakHook(self, "on_policy_forward_end"),
                                                                   always_call=True))
        reference.register_forward_pre_hook(WeakHook(self, "on_reference_forward"), with_kwargs=True)
        reference.register_forward_hook(WeakHook(self, "on_reference_forward_end"), always_call=True)

    # -- shared computation: the policy's side ----------------------------------------------------------------

    def on_policy_forward(self, module, args: tuple, kwargs: dict) -> None:
        self._captured = self._armed = None  # one slot: the policy's last forward
        reason = self._update_prefix()
        if reason is None and kwargs.get("past_key_values") is not None:
            reason = "the policy ran with past_key_values"
        if reason is None and not all(pair.shared for pair in self._prefix_pairs):
            reason = "the policy's frozen prefix was moved away from the reference's (it follows at its next forward)"
        if reason is None:
            reason = self._active_randomness()
        self._policy_refusal = reason
        if reason is None:
            self._armed = _Call(args, kwargs, self.prefix_layers)

    def on_prefix_output(self, module, args, output) -> None:
        call = self._armed
        if call is None:
            return
        if call.output is not None:
            call.refusal = "the last prefix layer ran more than once per forward (weight sharing)"
        elif not isinstance(output, (torch.Tensor, tuple, list)):
            call.refusal = f"the last prefix layer returned a {type(output).__name__}, not tensors"
        else:
            call.output = _detached(output)
            tensor = _first_tensor(call.output)
            call.output_version = None if tensor is None else tensor._version

    def on_policy_forward_end(self, module, args, output) -> None:
        call, self._armed = self._armed, None
        if call is not None:
            self._policy_refusal = call.refusal or (None if call.output is not None else "the prefix layer did not run")
            self._captured = None if self._policy_refusal else call

    def _update_prefix(self) -> Optional[str]:
        if self._prefix_key != len(self.pending):  # the shared set only shrinks: its size identifies it
            self._prefix_key = len(self.pending)
            prefix = frozen_prefix(self.layout, set(self.pending))
            self.prefix_layers = prefix.layers if prefix.single_stack else ()
            blocks = [block for block in self.layout.blocks if block.name in set(prefix.blocks)]
            self._prefix_pairs = [self.pending[name] for name in self.layout.parameters_of(blocks)]
            self._switches = _random_switches(self.policy, self.layout, prefix.blocks) if self.prefix_layers else []
            if self._capture_handle is not None:
                self._capture_handle.remove()
                self._capture_handle = None
            if self.prefix_layers:
                hook = WeakHook(self, "on_prefix_output")
                self._capture_handle = self.policy.get_submodule(self.prefix_layers[-1]).register_forward_hook(hook)
                self._handles.append(self._capture_handle)
            self._no_prefix = ("the model has several stacks of layers (encoder-decoder)" if not prefix.single_stack
                               else "no leading layer is shared with the policy (frozen at the build, never copied)")
        return None if self.prefix_layers else self._no_prefix

    def _active_randomness(self) -> Optional[str]:
        for name, module, attribute in self._switches:
            if not module.training:
                continue
            if attribute == "batch_norm":
                return f"{name} is a batch norm in train mode in the policy's frozen prefix"
            value = getattr(module, attribute, 0)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return f"{name}.{attribute}={value} is active in the policy's frozen prefix (train mode)"
        return None

    # -- shared computation: the reference's side -------------------------------------------------------------

    def on_reference_forward(self, reference, args: tuple, kwargs: dict) -> None:
        self.resync()
        captured, self._captured = self._captured, None
        reason = self._replay_refusal(reference, captured, args, kwargs)
        if reason is not None:
            self.full_forwards += 1
            self.last_fallback = reason
            return
        replay = _Replay(_detached(captured.output, clone=True))  # never write into the policy's tensors
        for name in captured.layers:
            reference.get_submodule(name).__dict__["forward"] = replay
        self._replaying = captured
        self.shared_forwards += 1

    def on_reference_forward_end(self, reference, args, output) -> None:
        captured, self._replaying = self._replaying, None
        for name in captured.layers if captured is not None else ():
            reference.get_submodule(name).__dict__.pop("forward", None)

    def _replay_refusal(self, reference, captured: Optional[_Call], args: tuple, kwargs: dict) -> Optional[str]:
        if captured is None:
            return self.disabled or self._policy_refusal or (
                "no policy forward to reuse (the policy did not just run, or its output was used already)")
        config = getattr(reference, "config", None)
        resolved = lambda flag: getattr(config, flag, False) if kwargs.get(flag) is None else kwargs[flag]  # noqa: E731
        for flag in _PER_LAYER_OUTPUTS:
            if resolved(flag):
                return f"the reference call asks for per-layer outputs ({flag})"
        if kwargs.get("past_key_values") is not None:
            return "the reference call passes past_key_values"
        if resolved("use_cache"):
            return "the reference call builds a cache (pass use_cache=False)"
        tensor = _first_tensor(captured.output)
        if tensor is not None and tensor._version != captured.output_version:
            return "the policy's prefix output was modified in place"
        return _Call(args, kwargs).differs_from(captured)


class _Replay:
    """The forward of a reference layer inside the shared prefix, during one call: the policy's prefix output."""

    def __init__(self, output: Any):
        self.output = output

    def __call__(self, *args, **kwargs):
        return self.output


class _TensorMark:
    """A tensor argument, equal to another only if it is the same tensor object, unmodified in place since."""

    __slots__ = ("ref", "version")
    __hash__ = None

    def __init__(self, tensor: torch.Tensor):
        self.ref, self.version = weakref.ref(tensor), tensor._version

    def __eq__(self, other) -> bool:
        tensor = self.ref()
        return (isinstance(other, _TensorMark) and tensor is not None and tensor is other.ref()
                and self.version == other.version == tensor._version)


class _ObjectMark:
    """Any other object argument (a cache, a config): equal only to the same object."""

    __slots__ = ("identity",)
    __hash__ = None

    def __init__(self, value: Any):
        self.identity = id(value)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ObjectMark) and self.identity == other.identity


def _fingerprint(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _TensorMark(value)
    if isinstance(value, (tuple, list)):
        return tuple(_fingerprint(item) for item in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _ObjectMark(value)


def _autocast_state(args: tuple, kwargs: dict) -> tuple:
    tensor = _first_tensor(list(args) + list(kwargs.values()))
    device = tensor.device.type if tensor is not None else "cpu"
    try:
        return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except (AttributeError, RuntimeError, TypeError):  # torch < 2.4
        return device, torch.is_autocast_enabled()


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    for item in value if isinstance(value, (tuple, list)) else ():
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _detached(value: Any, clone: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone() if clone else value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(item, clone) for item in value)
    return value


def _random_switches(policy: nn.Module, layout, prefix_blocks: Sequence[str]) -> List[Tuple[str, nn.Module, str]]:
    """What could make the policy's train-mode forward over the prefix differ from an eval-mode one: dropout
    modules, batch norms and numbers named like dropout, in every module outside the blocks after the prefix."""
    after = [block.name for block in layout.blocks if block.name not in set(prefix_blocks)]
    switches = []
    for name, module in policy.named_modules():
        if any(name == block or name.startswith(block + ".") for block in after):
            continue
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            switches.append((name, module, "batch_norm"))
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            switches.append((name, module, "p"))
        for attribute, value in vars(module).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and _RANDOM_NAME.search(attribute):
                switches.append((name, module, attribute))
    return switches
