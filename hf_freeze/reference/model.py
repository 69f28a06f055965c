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
  run, the output of the frozen prefix is taken from the policy's forward instead of recomputed, where that is exact
  (`hf_freeze.reference.sharing` gives the conditions, checked on every call); otherwise the reference
  runs its full forward (``reference_state(reference).last_fallback`` says why).

Refused, with the reason: PEFT models (their reference is the base model with the adapter off), parameters sharded
by FSDP or DeepSpeed ZeRO-3, quantized weights, a model dispatched over several devices. Do not combine with TRL's
``sync_ref_model=True``: it writes the policy into the reference in place, which with shared storage would rewrite
the policy's own frozen weights.
"""

from __future__ import annotations

import copy
import os
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import FreezeConfigError
from ..logs import get_logger
from ..model import peft_adapter_reason, unwrap_model
from ..processes import is_main_process
from ..integrations.backends import DEEPSPEED, FSDP, detect_setup
from .hooks import SharedPair, WeakHook, remove_all
from .sharing import SharedComputation

__all__ = ["ReferenceMemory", "ReferenceState", "reference_model", "reference_state"]

logger = get_logger(__name__)

_STATE = "_hf_freeze_reference"
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
# Instance attributes that bind a module to the policy (accelerate's device hooks, autocast or TRL forward wrappers).
_BOUND_TO_POLICY = ("forward", "_original_forward", "_old_forward", "_hf_hook")
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


class ReferenceState(SharedComputation):
    """What `reference_model` keeps about a reference; read it with `reference_state(reference)`.

    ``shared_forwards``/``full_forwards`` count the reference's forwards that did and did not reuse the policy's
    prefix output, ``last_fallback`` says why the last full forward was needed, ``copied_on_unfreeze`` lists the
    parameters copied after the build, `shared_names` those still shared, `memory()` the bytes.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, pairs: Dict[str, SharedPair], share_computation: bool,
                 layer_paths: Optional[Sequence[str]]):
        self.policy, self.reference_ref = policy, weakref.ref(reference)
        self.pending: Dict[str, SharedPair] = pairs  # shared and never updated: copied before their first update
        self.copied_on_unfreeze: List[str] = []
        self._handles: List[Any] = []
        self._init_shared_computation(share_computation, layer_paths)

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

    # -- installation ------------------------------------------------------------------------------------------

    def install(self, reference: nn.Module) -> None:
        for pair in self.pending.values():
            pair.handle = _on_first_gradient(pair.policy, WeakHook(self, "on_gradient", pair.name))
            self._handles.append(pair.handle)
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handles.append(register_optimizer_step_pre_hook(WeakHook(self, "on_optimizer_step")))
        owners: Dict[str, Dict[str, str]] = {}
        for name in self.pending:
            module, _, local = name.rpartition(".")
            owners.setdefault(module, {})[local] = name
        for module, names in owners.items():
            hook = WeakHook(self, "on_load", names)
            self._handles.append(self.policy.get_submodule(module).register_load_state_dict_pre_hook(hook))
        self._install_shared_computation(reference)
        weakref.finalize(self, remove_all, self._handles)

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
    policy's output of the shared frozen prefix; `hf_freeze.reference.sharing` gives the exact
    conditions.

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
    >>> from hf_freeze.reference import reference_model, reference_state
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
    pairs: Dict[str, SharedPair] = {}
    for name, parameter in parameters:
        if parameter.requires_grad:
            memo[id(parameter)] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
        else:
            memo[id(parameter)] = nn.Parameter(parameter.detach(), requires_grad=False)
            pairs[name] = SharedPair(name, parameter, memo[id(parameter)])
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


def _on_first_gradient(parameter: nn.Parameter, hook: WeakHook):
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


def _same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
