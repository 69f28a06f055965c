"""`reference_model`: the policy as it is now, for the KL term of DPO, GRPO and PPO, sharing what is frozen.

The reference is a copy of the model's class whose frozen parameters share their storage with the policy (they
cost no memory) and whose trainable parameters are copies taken at the call. Three mechanisms keep it exact:

* **Copy on unfreeze.** A shared parameter carries a `register_post_accumulate_grad_hook`: the first gradient it
  receives (it was unfrozen by a schedule, an adaptive policy or the user) copies its value into the reference's
  own storage. Backward comes before ``optimizer.step()``, so the copy is the value before its first update; with
  gradient accumulation the first micro-batch copies; a parameter unfrozen but given no gradient is not updated
  (optimizers skip a ``None`` grad) and stays shared. A gradient that reaches ``.grad`` without local accumulation
  (DDP fills a parameter unused on this rank from the others', or code assigns ``.grad``) is caught by a global
  optimizer step pre-hook, and a ``load_state_dict`` into the policy (resuming a run) copies first each shared
  parameter whose loaded value differs.
* **Device and dtype moves.** ``reference.to(...)`` re-points a shared parameter at the policy's tensor when the
  policy is already there with the same values (the Trainer moves the policy before TRL moves the reference), so the
  move costs no copy; a reference moved where the policy is not holds copies, and shares again once the policy
  follows. A reference that is never moved re-points itself at its next forward after the policy moved.
* **Shared computation** (trlx's ``forward_hydra``). When the reference is called on the inputs the policy has just
  run, the output of the frozen prefix (embeddings and leading layers still shared) is taken from the policy's
  forward instead of recomputed. That is exact only when all of these hold, and the reference checks each of them
  on every call, falling back to its full forward otherwise (``last_fallback`` says why):

  - the model has one stack of layers (decoder-only or encoder-only), and its leading blocks, embeddings first, are
    still shared (frozen when the reference was built and not copied since), at least one layer among them;
  - the reference gets the very tensor objects of the policy's last forward, positional and keyword, none
    modified in place since (version counters), and equal non-tensor arguments, except those that act after the
    layers (``labels``, ``logits_to_keep``, TRL's ``fused_lm_head``, ...); no ``past_key_values``;
  - the policy's forward over the prefix ran nothing random or batch-dependent: in train mode every dropout
    module there has ``p == 0``, every number named like ``*drop*``, ``*jitter*``, ``*noise*`` (functional attention
    dropout, layer drop, router jitter) is 0, and no batch norm runs (otherwise its train-mode hidden states differ
    from the eval-mode reference's; TRL's ``disable_dropout=True`` sets dropout modules to 0, not float attributes);
  - the same autocast state in both calls, and the reference asks for no per-layer outputs
    (``output_hidden_states``, ``output_attentions``, ``output_router_logits``) and no cache (``use_cache=False``,
    which TRL's trainers pass);
  - the prefix layer runs once per forward (no weight sharing across positions), and a capture is used once.

Not supported (refused with the reason): PEFT models (the base model with the adapter disabled is their
reference), parameters sharded by FSDP or DeepSpeed ZeRO-3, quantized weights, a model dispatched over several
devices. Not to be combined with TRL's ``sync_ref_model=True``: it writes the policy into the reference in place,
which with shared storage would rewrite the policy's own frozen weights.
"""

from __future__ import annotations

import copy
import os
import re
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..apply.frozen_prefix import frozen_prefix
from ..errors import FreezeConfigError, LayerDiscoveryError
from ..logging import get_logger
from ..model import discover_layout, peft_adapter_reason, unwrap_model
from ..processes import is_main_process
from .backends import DEEPSPEED, FSDP, detect_setup

__all__ = ["ReferenceMemory", "ReferenceState", "reference_model", "reference_state"]

logger = get_logger(__name__)

_STATE = "_hf_freeze_reference"
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
# Instance attributes that bind a module to the policy (accelerate's device hooks, autocast or TRL forward wrappers).
_BOUND_TO_POLICY = ("forward", "_original_forward", "_old_forward", "_hf_hook")
# Arguments that act after the layers: they may differ between the policy's call and the reference's.
_AFTER_THE_LAYERS = {"labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head", "return_dict",
                     "output_router_logits", "use_cache"}
_PER_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")
_STOCHASTIC_NAME = re.compile(r"drop|jitter|noise", re.IGNORECASE)


@dataclass(frozen=True)
class ReferenceMemory:
    """Bytes the reference holds: its own parameters, those it shares with the policy, and its buffers (copied)."""

    own_parameter_bytes: int
    shared_parameter_bytes: int
    buffer_bytes: int

    @property
    def own_bytes(self) -> int:
        return self.own_parameter_bytes + self.buffer_bytes

    @property
    def full_copy_bytes(self) -> int:
        """What a deep copy of the policy would hold."""
        return self.own_parameter_bytes + self.shared_parameter_bytes + self.buffer_bytes


class _Pair:
    """A policy parameter the reference shares, and the reference's parameter over the same storage."""

    __slots__ = ("name", "policy", "reference", "handle")

    def __init__(self, name: str, policy: nn.Parameter, reference: nn.Parameter):
        self.name, self.policy, self.reference, self.handle = name, policy, reference, None


class _Call:
    """The arguments of one forward (tensors by identity and version), and what the policy's prefix produced."""

    def __init__(self, args: tuple, kwargs: dict, layers: Tuple[str, ...] = ()):
        self.args = tuple(_fingerprint(value) for value in args)
        self.kwargs = {key: _fingerprint(value) for key, value in kwargs.items() if key not in _AFTER_THE_LAYERS}
        self.autocast = _autocast_state(args, kwargs)
        self.layers = layers
        self.output: Any = None
        self.output_version: Optional[int] = None
        self.repeated = False

    def differs_from(self, other: "_Call") -> Optional[str]:
        if len(self.args) != len(other.args) or set(self.kwargs) != set(other.kwargs):
            return "the reference got other arguments than the policy's last forward"
        pairs = list(zip(self.args, other.args)) + [(self.kwargs[key], other.kwargs[key]) for key in self.kwargs]
        if not all(_same(mine, theirs) for mine, theirs in pairs):
            return "the reference got other input tensors (or ones modified in place) than the policy's last forward"
        if self.autocast != other.autocast:
            return "the autocast state differs from the policy's last forward"
        return None


class ReferenceState:
    """What `reference_model` keeps about a reference: the shared pairs, the copies, the shared-computation record.

    Read it with `reference_state(reference)`. ``shared_forwards``/``full_forwards`` count the reference's forwards
    that did and did not reuse the policy's prefix, ``last_fallback`` says why the last full forward was needed,
    ``copied_on_unfreeze`` lists the parameters copied after the reference was built.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, pairs: Dict[str, _Pair], share_computation: bool,
                 layer_paths: Optional[Sequence[str]]):
        self.policy, self.reference_ref = policy, weakref.ref(reference)
        self.pending: Dict[str, _Pair] = pairs  # shared and never updated: copy before the first update
        self.copied_on_unfreeze: List[str] = []
        self.shared_forwards = self.full_forwards = 0
        self.last_fallback: Optional[str] = None
        self._handles: List[Any] = []
        self._prefix_key: Optional[int] = None  # len(pending) when the prefix below was derived
        self._capture_layer: Optional[str] = None
        self._prefix_layers: Tuple[str, ...] = ()
        self._switches: List[Tuple[str, nn.Module, str]] = []
        self._capture_handle = None
        self._armed: Optional[_Call] = None
        self._captured: Optional[_Call] = None
        self._policy_refusal: Optional[str] = None  # why the policy's last forward left nothing to reuse
        self._no_prefix_reason: Optional[str] = None
        self._replaying: Optional[_Call] = None
        self.layout, self.disabled = None, None if share_computation else "share_computation=False"
        if self.disabled is None:
            try:
                self.layout = discover_layout(policy, layer_paths)
            except LayerDiscoveryError as error:
                self.disabled = f"the layers were not found ({error})"

    # -- copy on unfreeze ---------------------------------------------------------------------------------------

    def copy(self, name: str) -> None:
        """Give the reference its own copy of a shared parameter, before the policy's first update of it."""
        pair = self.pending.pop(name, None)
        if pair is None:
            return
        with torch.no_grad():
            pair.reference.data = pair.policy.detach().to(pair.reference.device, pair.reference.dtype, copy=True)
        if pair.handle is not None:
            pair.handle.remove()  # safe inside the hook that is running
        self.copied_on_unfreeze.append(name)

    def copy_pending_with_gradients(self) -> None:
        for name in [name for name, pair in self.pending.items() if pair.policy.grad is not None]:
            self.copy(name)

    def copy_before_load(self, module_names: Dict[str, str], state_dict: dict, prefix: str) -> None:
        for local, name in module_names.items():
            pair, incoming = self.pending.get(name), state_dict.get(prefix + local)
            if pair is None or not isinstance(incoming, torch.Tensor):
                continue
            current = pair.policy.detach()
            if incoming.shape != current.shape or not torch.equal(incoming.to(current.device, current.dtype), current):
                self.copy(name)

    # -- sharing across device and dtype moves ------------------------------------------------------------------

    def resync(self) -> None:
        """Re-point shared parameters at the policy's tensors when the policy was moved (same values, same place)."""
        for pair in self.pending.values():
            if pair.reference.data_ptr() != pair.policy.data_ptr() and _same_place(pair.policy, pair.reference):
                if torch.equal(pair.policy.detach(), pair.reference.detach()):
                    pair.reference.data = pair.policy.detach()

    def sharing_conversion(self, fn):
        """``fn`` of `nn.Module._apply`, except that a shared parameter lands on the policy's tensor when the policy
        already is where ``fn`` sends it, with the same values: no copy, no transient duplicate."""
        by_id = {id(pair.reference): pair for pair in self.pending.values()}

        def convert(tensor):
            pair = by_id.get(id(tensor))
            if pair is not None:
                target = fn(tensor.detach().new_empty(0))
                policy = pair.policy.detach()
                if policy.data_ptr() == tensor.data_ptr():
                    return fn(tensor)
                if policy.device == target.device and policy.dtype == target.dtype and policy.shape == tensor.shape:
                    if torch.equal(policy.to(tensor.device, tensor.dtype), tensor.detach()):
                        return policy
            return fn(tensor)

        return convert

    # -- shared computation --------------------------------------------------------------------------------------

    def on_policy_forward(self, args: tuple, kwargs: dict) -> None:
        self._captured = self._armed = None  # one slot: the policy's last forward
        reason = self.disabled or self._update_prefix()
        if reason is None and kwargs.get("past_key_values") is not None:
            reason = "the policy ran with past_key_values"
        if reason is None:
            reason = self._active_randomness()
        self._policy_refusal = reason
        if reason is None:
            self._armed = _Call(args, kwargs, self._prefix_layers)

    def on_prefix_output(self, output: Any) -> None:
        call = self._armed
        if call is None:
            return
        if call.output is not None:
            call.repeated = True
            return
        call.output = _detached(output)
        tensor = _first_tensor(call.output)
        call.output_version = None if tensor is None else tensor._version

    def on_policy_forward_end(self) -> None:
        call, self._armed = self._armed, None
        if call is None:
            return
        if call.repeated or call.output is None:
            self._policy_refusal = "the prefix layer ran more than once per forward" if call.repeated else (
                "the policy's forward never reached its prefix layer")
            return
        self._captured = call

    def on_reference_forward(self, reference: nn.Module, args: tuple, kwargs: dict) -> None:
        self.resync()
        captured, self._captured = self._captured, None
        reason = self._replay_refusal(reference, captured, args, kwargs)
        if reason is not None:
            self.full_forwards += 1
            self.last_fallback = reason
            return
        output = _detached(captured.output, clone=True)  # the reference must not write into the policy's tensors
        self._replaying = captured
        replay = _Replay(output)
        for name in captured.layers:
            reference.get_submodule(name).__dict__["forward"] = replay
        self.shared_forwards += 1

    def on_reference_forward_end(self, reference: nn.Module) -> None:
        if self._replaying is None:
            return
        captured, self._replaying = self._replaying, None
        for name in captured.layers:
            reference.get_submodule(name).__dict__.pop("forward", None)

    def _replay_refusal(self, reference, captured: Optional[_Call], args: tuple, kwargs: dict) -> Optional[str]:
        if captured is None:
            return self.disabled or self._policy_refusal or (
                "no policy forward to reuse (the policy did not just run, or its output was used already)")
        config = getattr(reference, "config", None)
        for flag in _PER_LAYER_OUTPUTS:
            if kwargs.get(flag, getattr(config, flag, False)):
                return f"the reference call asks for per-layer outputs ({flag})"
        if kwargs.get("past_key_values") is not None:
            return "the reference call passes past_key_values"
        if kwargs.get("use_cache", getattr(config, "use_cache", False)):
            return "the reference call builds a cache (pass use_cache=False)"
        tensor = _first_tensor(captured.output)
        if tensor is not None and tensor._version != captured.output_version:
            return "the policy's prefix output was modified in place"
        return _Call(args, kwargs).differs_from(captured)

    def _update_prefix(self) -> Optional[str]:
        if self._prefix_key != len(self.pending):  # the shared set only shrinks: its size identifies it
            self._prefix_key = len(self.pending)
            prefix = frozen_prefix(self.layout, set(self.pending))
            self._prefix_layers = prefix.layers if prefix.single_stack else ()
            self._capture_layer = prefix.layers[-1] if self._prefix_layers else None
            self._switches = _randomness_switches(self.policy, self.layout, prefix.blocks) if self._capture_layer else []
            if self._capture_handle is not None:
                self._capture_handle.remove()
                self._capture_handle = None
            if self._capture_layer is not None:
                module = self.policy.get_submodule(self._capture_layer)
                self._capture_handle = module.register_forward_hook(_PolicyHook(self, "on_prefix_output", output=True))
                self._handles.append(self._capture_handle)
            self._no_prefix_reason = (
                "the model has several stacks of layers (encoder-decoder)" if not prefix.single_stack
                else "no leading layer is shared with the policy (frozen at the build and never copied)")
        return None if self._capture_layer else self._no_prefix_reason

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

    # -- report and clean-up -------------------------------------------------------------------------------------

    def memory(self) -> ReferenceMemory:
        """The reference's bytes now, measured on the tensors' storage."""
        policy_storages = {p.untyped_storage().data_ptr() for p in self.policy.parameters()}
        own = shared = 0
        reference = self.reference_ref()
        for parameter in reference.parameters():
            size = parameter.numel() * parameter.element_size()
            if parameter.untyped_storage().data_ptr() in policy_storages:
                shared += size
            else:
                own += size
        buffers = sum(buffer.numel() * buffer.element_size() for buffer in reference.buffers())
        return ReferenceMemory(own, shared, buffers)

    @property
    def shared_names(self) -> List[str]:
        """Parameters the reference still shares with the policy."""
        return list(self.pending)

    def _install(self, reference: nn.Module) -> None:
        for pair in self.pending.values():
            pair.handle = _on_first_gradient(pair.policy, _CopyOnFirstGradient(self, pair.name))
            self._handles.append(pair.handle)
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handles.append(register_optimizer_step_pre_hook(_PolicyHook(self, "copy_pending_with_gradients")))
        owners: Dict[str, Dict[str, str]] = {}
        for name in self.pending:
            module, _, local = name.rpartition(".")
            owners.setdefault(module, {})[local] = name
        for module_name, names in owners.items():
            hook = _CopyBeforeLoad(self, names)
            self._handles.append(self.policy.get_submodule(module_name).register_load_state_dict_pre_hook(hook))
        if self.disabled is None:
            self._handles.append(self.policy.register_forward_pre_hook(
                _PolicyHook(self, "on_policy_forward", inputs=True), with_kwargs=True))
            self._handles.append(self.policy.register_forward_hook(
                _PolicyHook(self, "on_policy_forward_end"), always_call=True))
            self._update_prefix()
        reference.register_forward_pre_hook(_ReferenceHook(self, start=True), with_kwargs=True)
        reference.register_forward_hook(_ReferenceHook(self, start=False), always_call=True)
        weakref.finalize(self, _remove_all, self._handles)

    def __deepcopy__(self, memo):  # a copy of the reference owns all its tensors: it is a plain frozen model
        return None

    def __reduce__(self):
        return (type(None), ())


# -- the public function ----------------------------------------------------------------------------------------


def reference_model(model: nn.Module, *, share_computation: bool = True,
                    layer_paths: Optional[Sequence[str]] = None) -> nn.Module:
    """A reference model for preference and RL training (DPO, GRPO, PPO): the policy as it is now, in eval mode,
    holding every frozen parameter by sharing its storage with the policy and a copy of every trainable one.

    Call it after the freezing policy is applied (`LayerFreezer(model, ...).apply()`), before training. It is an
    instance of the model's own class with the same forward signature, usable as TRL's ``ref_model`` or in a
    hand-written loop. A parameter that becomes trainable later (schedules, adaptive policies) is copied before its
    first update, and when called on the inputs the policy has just run, the reference reuses the policy's output
    of the shared frozen prefix instead of recomputing it; the module docstring lists the exact conditions.

    Args:
        model: The policy (wrappers such as DDP are looked through). Under DDP, each process builds its own
            reference from the same weights.
        share_computation: Reuse the policy's frozen-prefix output when the conditions hold (else always a full
            forward).
        layer_paths: Dotted paths of the layer containers when discovery cannot find them (``freeze_layer_paths``).

    Returns:
        The reference; `reference_state(reference)` tells what it shares, what it copied and how it ran.

    Raises:
        FreezeConfigError: a PEFT model, sharded (FSDP, ZeRO-3) or quantized parameters, several devices.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_freeze import LayerFreezer
    >>> from hf_freeze.integrations.reference import reference_model, reference_state
    >>> config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> _ = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=3).apply()
    >>> reference = reference_model(model)
    >>> layer = lambda m, i: m.model.layers[i].mlp.up_proj.weight
    >>> layer(reference, 0).data_ptr() == layer(model, 0).data_ptr(), layer(reference, 3).data_ptr() == layer(model, 3).data_ptr()
    (True, False)
    >>> batch = torch.randint(0, 100, (2, 8))
    >>> with torch.no_grad():
    ...     policy_logits = model.train()(batch, use_cache=False).logits
    ...     reference_logits = reference(batch, use_cache=False).logits
    >>> reference_state(reference).shared_forwards, torch.allclose(policy_logits, reference_logits, atol=1e-6)
    (1, True)
    ```
    """
    policy = unwrap_model(model)
    refusal = _refusal(policy)
    if refusal:
        raise FreezeConfigError(refusal)
    parameters = list(policy.named_parameters())
    memo: Dict[int, Any] = {}
    pairs: Dict[str, _Pair] = {}
    for name, parameter in parameters:
        if parameter.requires_grad:
            memo[id(parameter)] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
        else:
            shared = nn.Parameter(parameter.detach(), requires_grad=False)
            memo[id(parameter)] = shared
            pairs[name] = _Pair(name, parameter, shared)
    # The reference starts without the policy's hooks and wrappers: they are bound to the policy (and hf_freeze's
    # own hooks on it would otherwise be copied with their state).
    for module in policy.modules():
        for attribute in _HOOK_DICTS:
            if attribute in module.__dict__:
                memo[id(module.__dict__[attribute])] = OrderedDict()
        for attribute in _BOUND_TO_POLICY:
            if attribute in module.__dict__:
                memo[id(module.__dict__[attribute])] = _UNBOUND
    reference = copy.deepcopy(policy, memo)
    for module in reference.modules():
        for attribute in _BOUND_TO_POLICY:
            if module.__dict__.get(attribute) is _UNBOUND:
                del module.__dict__[attribute]
    reference.eval()
    reference.train = types.MethodType(_stay_in_eval, reference)
    reference._apply = types.MethodType(_apply_sharing, reference)
    state = ReferenceState(policy, reference, pairs, share_computation, layer_paths)
    reference.__dict__[_STATE] = state
    state._install(reference)
    _report(state, len(parameters))
    return reference


def reference_state(reference: nn.Module) -> Optional[ReferenceState]:
    """The `ReferenceState` of a module built by `reference_model`, else ``None``."""
    return reference.__dict__.get(_STATE)


# -- checks and report ------------------------------------------------------------------------------------------


def _refusal(policy: nn.Module) -> Optional[str]:
    peft = peft_adapter_reason(policy)
    if peft:
        return (
            f"reference_model does not take a PEFT model ({peft}): its reference is the base model with the adapter "
            "switched off, which costs no memory. Use `with model.disable_adapter(): ...` for the reference "
            "log-probabilities, or pass `ref_model=None` to TRL's trainers, which do exactly that for a PEFT model."
        )
    sharded = _sharded_parameter(policy)
    setup = detect_setup(None, policy)
    zero3 = setup.backend == DEEPSPEED and setup.zero_stage == 3
    fsdp = setup.backend == FSDP or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if sharded or zero3 or fsdp or _zero3_configured():
        what = sharded or ("FSDP is configured" if fsdp else "DeepSpeed ZeRO-3 is configured")
        return (
            f"reference_model does not support sharded parameters yet ({what}): FSDP and ZeRO-3 split each parameter "
            "across processes into storage of their own, so the reference could not share the policy's frozen "
            "tensors, and its copy-on-unfreeze hooks would watch parameters the wrapper no longer updates. Use DDP "
            "or DeepSpeed ZeRO-1/2, or a separately loaded reference (`ref_model=None` in TRL)."
        )
    if getattr(policy, "hf_quantizer", None) is not None or getattr(policy, "is_quantized", False) is True:
        return ("reference_model does not support quantized weights: they are tensor subclasses with their own "
                "state, which a shared parameter would not carry. Load the reference separately.")
    devices = set((getattr(policy, "hf_device_map", None) or {}).values())
    if len(devices) > 1:
        return (f"reference_model does not support a model dispatched over several devices (device_map over "
                f"{sorted(map(str, devices))}): the reference would lose the dispatch hooks. Load it on one device.")
    return None


def _sharded_parameter(policy: nn.Module) -> Optional[str]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        DTensor = ()
    for name, parameter in policy.named_parameters():
        if isinstance(parameter, DTensor):
            return f"{name!r} is a DTensor (FSDP2 or tensor parallelism)"
        if getattr(parameter, "_is_flat_param", False):
            return f"{name!r} is an FSDP1 FlatParameter"
        if hasattr(parameter, "ds_id"):
            return f"{name!r} is partitioned by DeepSpeed ZeRO-3 (it has a `ds_id`)"
    return None


def _zero3_configured() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _report(state: ReferenceState, count: int) -> None:
    if not is_main_process():
        return
    memory = state.memory()
    if not state.pending:
        logger.warning(
            f"reference_model: nothing is frozen in the model, so the reference is a full copy "
            f"({memory.own_bytes / 2**20:.1f} MiB). Apply the freezing policy first "
            "(`LayerFreezer(model, ...).apply()`) to share the frozen parameters."
        )
        return
    prefix = "off" if state.disabled else (
        f"on over {len(state._prefix_layers)} leading layer(s)" if state._prefix_layers else "off (no shared prefix)")
    logger.info(
        f"reference_model: shares {len(state.pending)} of {count} parameters with the policy "
        f"({memory.shared_parameter_bytes / 2**20:.1f} MiB), holds {memory.own_bytes / 2**20:.1f} MiB of its own "
        f"(a full copy: {memory.full_copy_bytes / 2**20:.1f} MiB); shared computation {prefix}."
    )


# -- hooks (deep copies and pickles of the models get inert ones) ---------------------------------------------


class _Hook:
    def __init__(self, state: ReferenceState):
        self.state = weakref.ref(state)

    def __deepcopy__(self, memo):
        return _inert

    def __reduce__(self):
        return (_inert_hook, ())


class _PolicyHook(_Hook):
    def __init__(self, state, method: str, inputs: bool = False, output: bool = False):
        super().__init__(state)
        self.method, self.inputs, self.output = method, inputs, output

    def __call__(self, *hook_args):
        state = self.state()
        if state is None:
            return None
        if self.inputs:  # (module, args, kwargs)
            state.on_policy_forward(hook_args[1], hook_args[2])
        elif self.output:  # (module, args, output)
            state.on_prefix_output(hook_args[2])
        else:
            getattr(state, self.method)()
        return None


class _CopyOnFirstGradient(_Hook):
    def __init__(self, state, name: str):
        super().__init__(state)
        self.name = name

    def __call__(self, parameter):
        state = self.state()
        if state is not None:
            state.copy(self.name)


class _CopyBeforeLoad(_Hook):
    def __init__(self, state, names: Dict[str, str]):
        super().__init__(state)
        self.names = names

    def __call__(self, module, state_dict, prefix, *rest):
        state = self.state()
        if state is not None:
            state.copy_before_load(self.names, state_dict, prefix)


class _ReferenceHook(_Hook):
    def __init__(self, state, start: bool):
        super().__init__(state)
        self.start = start

    def __call__(self, module, args, *rest):
        state = reference_state(module)
        if state is None:
            return None
        if self.start:
            state.on_reference_forward(module, args, rest[0])
        else:
            state.on_reference_forward_end(module)
        return None


def _inert(*args, **kwargs):
    return None


def _inert_hook():
    return _inert


_UNBOUND = object()


def _remove_all(handles: List[Any]) -> None:
    for handle in handles:
        if handle is not None:
            handle.remove()


def _on_first_gradient(parameter: nn.Parameter, hook: "_CopyOnFirstGradient"):
    """Register ``hook`` after gradient accumulation on a parameter that may be frozen now.

    torch refuses the hook on a tensor that does not require grad, but keeps it once registered: the flag is raised
    just for the registration. Parameters that cannot have gradients (integer ones) are never updated: no hook.
    """
    if not (parameter.is_floating_point() or parameter.is_complex()):
        return None
    if parameter.requires_grad:
        return parameter.register_post_accumulate_grad_hook(hook)
    parameter.requires_grad_(True)
    try:
        return parameter.register_post_accumulate_grad_hook(hook)
    finally:
        parameter.requires_grad_(False)


class _Replay:
    """The forward of a reference layer inside the shared prefix, during one call: the policy's prefix output."""

    def __init__(self, output: Any):
        self.output = output

    def __call__(self, *args, **kwargs):
        return self.output


def _stay_in_eval(self, mode: bool = True):
    """A reference never trains: `train()` keeps it in eval mode (dropout off)."""
    return nn.Module.train(self, False)


def _apply_sharing(self, fn, recurse: bool = True):
    state = reference_state(self)
    return type(self)._apply(self, fn if state is None else state.sharing_conversion(fn), recurse)


# -- small helpers --------------------------------------------------------------------------------------------


def _fingerprint(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", weakref.ref(value), value._version)
    if isinstance(value, (tuple, list)):
        return tuple(_fingerprint(item) for item in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return ("object", id(value))


def _same(mine: Any, theirs: Any) -> bool:
    if isinstance(mine, tuple) and mine and mine[0] == "tensor":
        if not (isinstance(theirs, tuple) and theirs and theirs[0] == "tensor"):
            return False
        tensor = mine[1]()
        return tensor is not None and tensor is theirs[1]() and mine[2] == theirs[2] == tensor._version
    return mine == theirs


def _autocast_state(args: tuple, kwargs: dict) -> tuple:
    tensor = _first_tensor(list(args) + list(kwargs.values()))
    device = tensor.device.type if tensor is not None else "cpu"
    try:
        return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except (AttributeError, RuntimeError, TypeError):
        return device, torch.is_autocast_enabled()


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
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


def _same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape


def _randomness_switches(policy: nn.Module, layout, prefix_blocks: Sequence[str]) -> List[Tuple[str, nn.Module, str]]:
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
            if isinstance(value, (int, float)) and not isinstance(value, bool) and _STOCHASTIC_NAME.search(attribute):
                switches.append((name, module, attribute))
    return switches
