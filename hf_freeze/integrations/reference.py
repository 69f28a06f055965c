"""`reference_model`: the policy as it is now, for the KL term of DPO, GRPO and PPO, sharing what is frozen.

The reference is an instance of the model's own class whose frozen parameters share their storage with the policy
(no memory) and whose trainable parameters are copies taken at the call. Three mechanisms keep it exact:

* **Copy on unfreeze.** Each shared parameter carries a `register_post_accumulate_grad_hook`: the first gradient it
  receives (a schedule, an adaptive policy or the user unfroze it) copies its value into the reference's own
  storage. Backward comes before ``optimizer.step()``, so that is the value before its first update; with gradient
  accumulation the first micro-batch copies; a parameter unfrozen but given no gradient is not updated (optimizers
  skip a ``None`` grad) and stays shared. A gradient that reaches ``.grad`` without local accumulation (DDP can
  fill a parameter unused on this rank from the other ranks'; code may assign ``.grad``) is caught by a global
  optimizer step pre-hook, and ``load_state_dict`` into the policy (resuming) first copies each shared parameter
  it changes.
* **Moves.** ``reference.to(...)`` puts a shared parameter on the policy's tensor when the policy is already there
  with the same values (the Trainer moves the policy before TRL moves the reference): no copy, no transient
  duplicate. A reference left behind by a policy move follows at its next forward.
* **Shared computation** (trlx's ``forward_hydra``): when the reference is called on the inputs the policy has just
  run, the output of the frozen prefix is taken from the policy's forward instead of recomputed. That is exact only
  when all of the following hold; each is checked on every call, and the reference runs its full forward otherwise
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

Refused, with the reason: PEFT models (their reference is the base model with the adapter off), parameters sharded
by FSDP or DeepSpeed ZeRO-3, quantized weights, a model dispatched over several devices. Do not combine with TRL's
``sync_ref_model=True``: it writes the policy into the reference in place, which with shared storage would rewrite
the policy's own frozen weights.
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
_AFTER_THE_LAYERS = {"labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head", "return_dict",
                     "output_router_logits", "use_cache"}
_PER_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")
_RANDOM_NAME = re.compile(r"drop|jitter|noise", re.IGNORECASE)
_UNBOUND = object()


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

    @property
    def shared(self) -> bool:
        return self.reference.data_ptr() == self.policy.data_ptr()


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


class ReferenceState:
    """What `reference_model` keeps about a reference; read it with `reference_state(reference)`.

    ``shared_forwards``/``full_forwards`` count the reference's forwards that did and did not reuse the policy's
    prefix output, ``last_fallback`` says why the last full forward was needed, ``copied_on_unfreeze`` lists the
    parameters copied after the build, `shared_names` those still shared, `memory()` the bytes.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, pairs: Dict[str, _Pair], share_computation: bool,
                 layer_paths: Optional[Sequence[str]]):
        self.policy, self.reference_ref = policy, weakref.ref(reference)
        self.pending: Dict[str, _Pair] = pairs  # shared and never updated: copied before their first update
        self.copied_on_unfreeze: List[str] = []
        self.shared_forwards = self.full_forwards = 0
        self.last_fallback: Optional[str] = None
        self.disabled: Optional[str] = None if share_computation else "share_computation=False"
        self.layout = None
        self.prefix_layers: Tuple[str, ...] = ()
        self._prefix_key: Optional[int] = None
        self._prefix_pairs: List[_Pair] = []
        self._no_prefix: Optional[str] = None
        self._switches: List[Tuple[str, nn.Module, str]] = []
        self._capture_handle = None
        self._armed: Optional[_Call] = None  # the policy forward running now
        self._captured: Optional[_Call] = None  # the policy's last forward, when it can be reused
        self._policy_refusal: Optional[str] = None
        self._replaying: Optional[_Call] = None
        self._handles: List[Any] = []
        if self.disabled is None:
            try:
                self.layout = discover_layout(policy, layer_paths)
            except LayerDiscoveryError as error:
                self.disabled = f"the layers were not found ({error})"

    @property
    def shared_names(self) -> List[str]:
        """Parameters the reference still shares with the policy."""
        return list(self.pending)

    def memory(self) -> "ReferenceMemory":
        """The reference's bytes now, measured on the tensors' storage."""
        policy_storage = {p.untyped_storage().data_ptr() for p in self.policy.parameters()}
        own = shared = 0
        reference = self.reference_ref()
        for parameter in reference.parameters():
            size = parameter.numel() * parameter.element_size()
            if parameter.untyped_storage().data_ptr() in policy_storage:
                shared += size
            else:
                own += size
        return ReferenceMemory(own, shared, sum(b.numel() * b.element_size() for b in reference.buffers()))

    # -- copy on unfreeze ------------------------------------------------------------------------------------------

    def copy(self, name: str, keep: bool = True) -> None:
        """Give the reference its own copy of a shared parameter (``keep=False``: it already holds its own)."""
        pair = self.pending.pop(name, None)
        if pair is None:
            return
        if keep:
            with torch.no_grad():
                pair.reference.data = pair.policy.detach().to(pair.reference.device, pair.reference.dtype, copy=True)
            self.copied_on_unfreeze.append(name)
        if pair.handle is not None:
            pair.handle.remove()  # also safe inside the hook that is running

    def on_gradient(self, name: str, parameter: nn.Parameter) -> None:
        self.copy(name)

    def on_optimizer_step(self, optimizer, args, kwargs) -> None:
        for name in [name for name, pair in self.pending.items() if pair.policy.grad is not None]:
            self.copy(name)

    def on_load(self, names: Dict[str, str], module, state_dict, prefix, *rest) -> None:
        for local, name in names.items():
            pair, incoming = self.pending.get(name), state_dict.get(prefix + local)
            if pair is not None and isinstance(incoming, torch.Tensor):
                current = pair.policy.detach()
                if incoming.shape != current.shape or not torch.equal(incoming.to(current), current):
                    self.copy(name)

    # -- moves -----------------------------------------------------------------------------------------------------

    def resync(self) -> None:
        """Put shared parameters back on the policy's tensors after the policy moved (same place, same values); let
        go of one whose values changed without an update (a lossy cast there and back): the reference keeps its own."""
        for name, pair in list(self.pending.items()):
            if not pair.shared and _same_place(pair.policy, pair.reference):
                if torch.equal(pair.policy.detach(), pair.reference.detach()):
                    pair.reference.data = pair.policy.detach()
                else:
                    self.copy(name, keep=False)

    def sharing_conversion(self, fn):
        """``fn`` of `nn.Module._apply`, except that a shared parameter lands on the policy's tensor when the policy
        already is where ``fn`` sends it, with the same values."""
        by_id = {id(pair.reference): pair for pair in self.pending.values()}

        def convert(tensor):
            pair = by_id.get(id(tensor))
            if pair is not None and not pair.shared:
                target, policy = fn(tensor.detach().new_empty(0)), pair.policy.detach()
                if (policy.device, policy.dtype, policy.shape) == (target.device, target.dtype, tensor.shape):
                    if torch.equal(policy.to(tensor), tensor.detach()):
                        return policy
            return fn(tensor)

        return convert

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
                hook = _Hook(self, "on_prefix_output")
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

    # -- installation ------------------------------------------------------------------------------------------

    def install(self, reference: nn.Module) -> None:
        for pair in self.pending.values():
            pair.handle = _on_first_gradient(pair.policy, _Hook(self, "on_gradient", pair.name))
            self._handles.append(pair.handle)
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handles.append(register_optimizer_step_pre_hook(_Hook(self, "on_optimizer_step")))
        owners: Dict[str, Dict[str, str]] = {}
        for name in self.pending:
            module, _, local = name.rpartition(".")
            owners.setdefault(module, {})[local] = name
        for module, names in owners.items():
            hook = _Hook(self, "on_load", names)
            self._handles.append(self.policy.get_submodule(module).register_load_state_dict_pre_hook(hook))
        # The shared set only shrinks: without a shared prefix now there will never be one.
        self.disabled = self.disabled or self._update_prefix()
        if self.disabled is None:
            self._handles.append(self.policy.register_forward_pre_hook(_Hook(self, "on_policy_forward"),
                                                                       with_kwargs=True))
            self._handles.append(self.policy.register_forward_hook(_Hook(self, "on_policy_forward_end"),
                                                                   always_call=True))
        reference.register_forward_pre_hook(_Hook(self, "on_reference_forward"), with_kwargs=True)
        reference.register_forward_hook(_Hook(self, "on_reference_forward_end"), always_call=True)
        weakref.finalize(self, _remove_all, self._handles)

    def __deepcopy__(self, memo):  # a deep copy of the reference owns all its tensors: a plain frozen model
        return None

    def __reduce__(self):
        return (type(None), ())


def reference_model(model: nn.Module, *, share_computation: bool = True,
                    layer_paths: Optional[Sequence[str]] = None) -> nn.Module:
    """A reference model for preference and RL training (DPO, GRPO, PPO): the policy as it is now, in eval mode,
    holding every frozen parameter by sharing its storage with the policy and a copy of every trainable one.

    Call it once the freezing policy is applied (`LayerFreezer(model, ...).apply()`), before training. The reference
    is an instance of the model's own class with its forward signature, for TRL's ``ref_model=`` or a hand-written
    loop; it is never trainable and stays in eval mode. A parameter unfrozen later (schedules, adaptive policies)
    is copied before its first update; called on the inputs the policy has just run, the reference reuses the
    policy's output of the shared frozen prefix. The module's docstring gives the exact conditions.

    Args:
        model: The policy (wrappers such as DDP are looked through). Under DDP, each process builds its own
            reference from the same weights.
        share_computation: Reuse the policy's frozen-prefix output when that is exact (else always a full forward).
        layer_paths: Dotted paths of the layer containers when discovery cannot find them (``freeze_layer_paths``).

    Returns:
        The reference; `reference_state(reference)` tells what it shares, what it copied and how its forwards ran.

    Raises:
        FreezeConfigError: a PEFT model; parameters sharded by FSDP or ZeRO-3; quantized weights; several devices.

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
    >>> up = lambda m, layer: m.model.layers[layer].mlp.up_proj.weight.data_ptr()
    >>> up(reference, 0) == up(model, 0), up(reference, 3) == up(model, 3)  # frozen: shared; trainable: copied
    (True, False)
    >>> batch = torch.randint(0, 100, (2, 8))
    >>> with torch.no_grad():
    ...     policy_logits = model.train()(batch, use_cache=False).logits
    ...     reference_logits = reference(batch, use_cache=False).logits  # layers 0-2 taken from the policy's forward
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
            memo[id(parameter)] = nn.Parameter(parameter.detach(), requires_grad=False)
            pairs[name] = _Pair(name, parameter, memo[id(parameter)])
    # The reference starts without the policy's hooks and instance wrappers: they are bound to the policy (and
    # hf_freeze's own hooks on it would be copied with their state).
    for module in policy.modules():
        for attribute in _HOOK_DICTS + _BOUND_TO_POLICY:
            if attribute in module.__dict__:
                memo[id(module.__dict__[attribute])] = OrderedDict() if attribute in _HOOK_DICTS else _UNBOUND
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
    state.install(reference)
    _report(state, len(parameters))
    return reference


def reference_state(reference: nn.Module) -> Optional[ReferenceState]:
    """The `ReferenceState` of a module built by `reference_model`, else ``None``."""
    return reference.__dict__.get(_STATE)


def _refusal(policy: nn.Module) -> Optional[str]:
    peft = peft_adapter_reason(policy)
    if peft:
        return (
            f"reference_model does not take a PEFT model ({peft}): its reference is the base model with the adapter "
            "switched off, which costs no memory. Use `with model.disable_adapter(): ...` for the reference "
            "log-probabilities, or pass `ref_model=None` to TRL's trainers, which do exactly that for a PEFT model."
        )
    setup = detect_setup(None, policy)
    fsdp = setup.backend == FSDP or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    zero3 = (setup.backend == DEEPSPEED and setup.zero_stage == 3) or _zero3_configured()
    sharded = _sharded_parameter(policy) or ("FSDP is configured" if fsdp else None) or (
        "DeepSpeed ZeRO-3 is configured" if zero3 else None)
    if sharded:
        return (
            f"reference_model does not support sharded parameters yet ({sharded}): FSDP and ZeRO-3 split each "
            "parameter across processes into storage of their own, so the reference could not share the policy's "
            "frozen tensors, and its copy-on-unfreeze hooks would watch parameters the wrapper no longer updates. "
            "Use DDP or DeepSpeed ZeRO-1/2, or a separately loaded reference (`ref_model=None` in TRL)."
        )
    if getattr(policy, "hf_quantizer", None) is not None or getattr(policy, "is_quantized", False) is True:
        return ("reference_model does not support quantized weights: they are tensor subclasses with state of their "
                "own, which a shared parameter would not carry. Load the reference separately.")
    devices = set((getattr(policy, "hf_device_map", None) or {}).values())
    if len(devices) > 1:
        return (f"reference_model does not support a model dispatched over several devices (device_map over "
                f"{sorted(map(str, devices))}): the reference would lose the dispatch hooks. Load it on one device.")
    return None


def _sharded_parameter(policy: nn.Module) -> Optional[str]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
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
    computation = f"off: {state.disabled}" if state.disabled else f"on over {len(state.prefix_layers)} leading layer(s)"
    logger.info(
        f"reference_model: shares {len(state.pending)} of {count} parameters with the policy "
        f"({memory.shared_parameter_bytes / 2**20:.1f} MiB), holds {memory.own_bytes / 2**20:.1f} MiB of its own "
        f"(a full copy: {memory.full_copy_bytes / 2**20:.1f} MiB); shared computation {computation}."
    )


class _Hook:
    """A hook that calls a `ReferenceState` method through a weak reference: the policy never keeps the reference
    alive. Deep copies and pickles of the models get an inert hook instead (a copy of the policy is no policy)."""

    def __init__(self, state: ReferenceState, method: str, *bound: Any):
        self.state, self.method, self.bound = weakref.ref(state), method, bound

    def __call__(self, *args):
        state = self.state()
        if state is not None:
            getattr(state, self.method)(*self.bound, *args)
        return None

    def __deepcopy__(self, memo):
        return _inert

    def __reduce__(self):
        return (_inert_hook, ())


class _Replay:
    """The forward of a reference layer inside the shared prefix, during one call: the policy's prefix output."""

    def __init__(self, output: Any):
        self.output = output

    def __call__(self, *args, **kwargs):
        return self.output


def _inert(*args, **kwargs):
    return None


def _inert_hook():
    return _inert


def _remove_all(handles: List[Any]) -> None:
    for handle in handles:
        if handle is not None:
            handle.remove()


def _on_first_gradient(parameter: nn.Parameter, hook: _Hook):
    """Register ``hook`` after gradient accumulation, also on a parameter frozen now: torch refuses it on a tensor
    that does not require grad but keeps it once registered, so the flag is raised for the registration only.
    Integer parameters never have gradients: no hook."""
    if not (parameter.is_floating_point() or parameter.is_complex()):
        return None
    if parameter.requires_grad:
        return parameter.register_post_accumulate_grad_hook(hook)
    parameter.requires_grad_(True)
    try:
        return parameter.register_post_accumulate_grad_hook(hook)
    finally:
        parameter.requires_grad_(False)


def _stay_in_eval(self, mode: bool = True):
    """A reference never trains: `train()` keeps it in eval mode (dropout off)."""
    return nn.Module.train(self, False)


def _apply_sharing(self, fn, recurse: bool = True):
    state = reference_state(self)
    return type(self)._apply(self, fn if state is None else state.sharing_conversion(fn), recurse)


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


def _same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape


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
