"""Multi-process training: which freezing policies each backend (DDP, FSDP1, FSDP2, DeepSpeed ZeRO) can run.

Facts about the backend (`DistributedSetup`) and about the policy (`PolicyFacts`) go into one pure function,
`check_support`, which says "ok" (``None``) or why the combination cannot work and which setting fixes it. The
callback asks it before training starts, so that a combination that would crash mid-run or, worse, let the ranks
drift apart silently is refused with a clear message instead. What the wrappers do, measured on this stack:

- DDP registers only the parameters that require grad when it wraps the model; only those are all-reduced
  (frozen parameters cost no communication). A parameter unfrozen after the wrap is never all-reduced: the ranks
  drift apart without an error. Freezing after the wrap works only with ``find_unused_parameters=True`` and no
  ``static_graph`` (the frozen parameters then stay registered and are all-reduced as zeros); with
  ``find_unused_parameters=False`` the next step silently skips the all-reduce and the one after raises
  "Expected to have finished reduction in the prior iteration".
- FSDP1 with ``use_orig_params=False`` flattens each wrapped unit into one `FlatParameter`, which must be all
  frozen or all trainable (torch raises "Must flatten tensors with uniform `requires_grad`" at the wrap).
- FSDP1 with ``use_orig_params=True`` accepts mixed units; frozen parameters are still reduce-scattered (as zeros).
- FSDP2 (`fully_shard`) shards each parameter on its own; it accepts frozen parameters, and `requires_grad`
  changes after the wrap, but it replaces the parameter objects, so a policy that changes during training would
  need its applier to look them up again after the wrap (not done yet: refused).
- DeepSpeed ZeRO builds its optimizer partitions from the trainable parameters at `deepspeed.initialize`: frozen
  parameters get no optimizer state and no gradient partition; the trainable set is fixed from then on.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from torch import nn

from .errors import FreezeConfigError

__all__ = [
    "DistributedSetup",
    "PolicyFacts",
    "applies_before_wrap",
    "check_support",
    "detect_setup",
    "flat_parameter_units",
    "mixed_units",
    "plan_for",
    "policy_changes_during_training",
    "raise_if_changed_after_wrap",
    "raise_if_ranks_disagree",
]

SINGLE, DDP, FSDP, DEEPSPEED = "single", "ddp", "fsdp", "deepspeed"


@dataclass(frozen=True)
class DistributedSetup:
    """What the backend fixes at wrap time, as far as freezing is concerned.

    Args:
        backend: ``"single"`` (one process, no wrapper), ``"ddp"``, ``"fsdp"`` or ``"deepspeed"``.
        world_size: Number of processes.
        fsdp_version: 1 or 2 under FSDP.
        fsdp_use_orig_params: FSDP1's ``use_orig_params``.
        fsdp_wrap_classes: Module class names FSDP1 wraps as units (``None``: not known, e.g. size-based wrapping;
            ``()``: no auto-wrap, the whole model is one unit).
        zero_stage: DeepSpeed ZeRO stage.
        find_unused_parameters: DDP's ``find_unused_parameters`` as the Trainer will pass it.
        static_graph: DDP's ``static_graph``.
        gradient_checkpointing: Whether gradient checkpointing is on (it turns the Trainer's default for
            ``ddp_find_unused_parameters`` to False).

    Example:

    ```python
    >>> from hf_freeze.distributed import DistributedSetup
    >>> DistributedSetup("ddp", world_size=2, find_unused_parameters=True).multi_process
    True
    ```
    """

    backend: str = SINGLE
    world_size: int = 1
    fsdp_version: Optional[int] = None
    fsdp_use_orig_params: Optional[bool] = None
    fsdp_wrap_classes: Optional[Tuple[str, ...]] = None
    zero_stage: Optional[int] = None
    find_unused_parameters: Optional[bool] = None
    static_graph: bool = False
    gradient_checkpointing: bool = False

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if self.backend == FSDP:
            extra = f", use_orig_params={self.fsdp_use_orig_params}" if self.fsdp_version == 1 else ""
            return f"FSDP{self.fsdp_version}{extra}"
        if self.backend == DEEPSPEED:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        if self.backend == DDP:
            return f"DDP over {self.world_size} processes"
        return "a single process"


@dataclass(frozen=True)
class PolicyFacts:
    """What a policy does to the trainable set, as far as the backend is concerned.

    Args:
        strategy: The `freeze_strategy` value (for messages).
        dynamic: True when the trainable set changes during training (schedules, adaptive selection).
        trainable: Number of parameter tensors the first decision leaves trainable.
        frozen: Number of parameter tensors it freezes.
        mixed_units: FSDP1 units that the first decision would leave partly frozen, as
            ``(unit, a frozen parameter, a trainable parameter)``.

    Example:

    ```python
    >>> from hf_freeze.distributed import DistributedSetup, PolicyFacts, check_support
    >>> ddp = DistributedSetup("ddp", world_size=2, find_unused_parameters=False)
    >>> check_support(ddp, PolicyFacts("bottom", dynamic=False, trainable=10, frozen=5)) is None
    True
    >>> "`ddp_find_unused_parameters: true`" in check_support(ddp, PolicyFacts("lisa", dynamic=True, trainable=10, frozen=5))
    True
    ```
    """

    strategy: str
    dynamic: bool
    trainable: int
    frozen: int
    mixed_units: Tuple[Tuple[str, str, str], ...] = ()


def check_support(setup: DistributedSetup, policy: PolicyFacts) -> Optional[str]:
    """``None`` when the policy can run on this backend, otherwise why not and the setting that fixes it."""
    name = f"`freeze_strategy` {policy.strategy!r}"
    if policy.trainable == 0 and policy.frozen > 0:
        return (
            f"{name} freezes every parameter, so nothing would train: the first backward pass fails, and under "
            "multi-process training accelerate skips (GPU) or fails (CPU) the DDP wrap. Leave something "
            "trainable, e.g. `freeze_head: false`."
        )
    if setup.backend == FSDP and setup.fsdp_version == 1 and not setup.fsdp_use_orig_params:
        if policy.mixed_units:
            unit, frozen, trainable = policy.mixed_units[0]
            where = "the root unit" if unit == "" else f"unit {unit!r}"
            return (
                f"{name} freezes part of a unit that FSDP1 flattens into one FlatParameter, which must be all "
                f"frozen or all trainable with `use_orig_params=False` (in {where}: {frozen!r} is frozen, "
                f"{trainable!r} trains; {len(policy.mixed_units)} unit(s) mixed; PEFT #1702). Set "
                "`fsdp_config: {use_orig_params: true}` in the TrainingArguments (`fsdp_use_orig_params: true` in "
                "an accelerate config), or use FSDP2 (`fsdp_version: 2`)."
            )
    if policy.dynamic:
        if setup.backend in (FSDP, DEEPSPEED):
            return (
                f"{name} changes the trainable parameters during training, which {setup.describe()} does not "
                f"support: {_FIXED_AT_WRAP[(setup.backend, setup.fsdp_version)]} Train with DDP (`accelerate "
                "launch` without an FSDP/DeepSpeed config, and `ddp_find_unused_parameters: true`), or use a "
                "static strategy."
            )
        if setup.backend == DDP and setup.multi_process:
            if setup.static_graph:
                return (
                    f"{name} changes the trainable parameters during training, and DDP's `static_graph` assumes "
                    "the set of parameters that get gradients never changes (the step after a change raises). "
                    "Set `ddp_static_graph: false`."
                )
            if not setup.find_unused_parameters:
                because = (
                    " (the Trainer turns it off by default when gradient checkpointing is on)"
                    if setup.gradient_checkpointing
                    else ""
                )
                return (
                    f"{name} changes the trainable parameters during training, and under DDP a parameter frozen "
                    "after the wrap needs `find_unused_parameters=True`: without it the next step skips the "
                    "gradient all-reduce silently and the one after raises. `ddp_find_unused_parameters` resolves "
                    f"to False here{because}. Set `ddp_find_unused_parameters: true` (it works with the default "
                    "non-reentrant gradient checkpointing)."
                )
    return None


_FIXED_AT_WRAP = {
    (DEEPSPEED, None): "ZeRO builds its optimizer partitions and gradient hooks from the parameters that are "
    "trainable at `deepspeed.initialize`, so a parameter unfrozen later is never updated.",
    (FSDP, 1): "FSDP1 fixes at the wrap whether each flat parameter needs a gradient, so a unit that was wholly "
    "frozen then never trains when it is unfrozen later.",
    (FSDP, 2): "FSDP2 replaces every parameter object when it shards the model, and hf_freeze does not yet look "
    "them up again after the wrap, so changes after the wrap would miss the sharded parameters.",
}


def applies_before_wrap(setup: DistributedSetup, policy: PolicyFacts) -> bool:
    """Whether the first decision is applied before the model is wrapped (`on_init_end`) or after (`on_train_begin`).

    Static policies are applied before the wrap, so that DDP registers (and all-reduces) the trainable parameters
    only. A policy that changes the trainable set under DDP must leave every parameter trainable at the wrap, so
    that DDP registers them all: a parameter DDP did not register is never all-reduced once it is unfrozen.
    """
    return not (policy.dynamic and setup.backend == DDP and setup.multi_process)


def policy_changes_during_training(arguments: Any) -> bool:
    """Whether the configured policy can change the trainable set after training starts.

    The one place that answers it: a new kind of dynamic policy (a schedule, an adaptive selector) adds its test
    here, and every distributed rule follows.
    """
    from .policies import STRATEGIES

    return bool(STRATEGIES.get(arguments.freeze_strategy).dynamic)


def plan_for(args: Any, model: nn.Module, arguments: Any, decision: Any) -> Tuple[DistributedSetup, bool]:
    """Check the first decision against the backend; return the setup and whether to apply before the wrap.

    Raises:
        FreezeConfigError: the policy cannot run on this backend (the message names the setting that fixes it).
    """
    setup = detect_setup(args, model)
    names = [name for name, _ in model.named_parameters()]
    frozen = [name for name in names if decision.is_frozen(name)]
    units = ()
    if setup.backend == FSDP and setup.fsdp_version == 1 and not setup.fsdp_use_orig_params:
        units = mixed_units(flat_parameter_units(model, setup.fsdp_wrap_classes), frozen)
    facts = PolicyFacts(
        arguments.freeze_strategy, policy_changes_during_training(arguments), len(names) - len(frozen), len(frozen), units
    )
    error = check_support(setup, facts)
    if error:
        raise FreezeConfigError(error)
    return setup, applies_before_wrap(setup, facts)


def raise_if_changed_after_wrap(setup: DistributedSetup, parameters: Mapping[str, nn.Parameter], decision: Any) -> None:
    """Refuse to flip `requires_grad` once a backend has wrapped the model (the policy is static here).

    DDP, FSDP and DeepSpeed fixed what they synchronise at the wrap; flipping flags now leaves a parameter that
    is never synchronised, or makes the next steps skip or fail the gradient reduction.
    """
    if setup.backend == SINGLE:
        return
    flips = [name for name, parameter in parameters.items() if parameter.requires_grad == decision.is_frozen(name)]
    if flips:
        raise FreezeConfigError(
            f"{len(flips)} parameter(s) would change `requires_grad` after {setup.describe()} wrapped the model "
            f"(e.g. {flips[:3]}), and the wrapper fixed at the wrap which gradients it synchronises. Pass the "
            "callback to the Trainer, `Trainer(..., callbacks=[FreezeCallback(...)])`, not `add_callback` after "
            "it is built, and do not change `requires_grad` between building the Trainer and `train()`."
        )


# -- facts about the backend, read from the Trainer's arguments and accelerate's state ---------------------------


_ACCELERATE_STATE = object()


def detect_setup(args: Any, model: Optional[nn.Module] = None, state: Any = _ACCELERATE_STATE) -> DistributedSetup:
    """The backend the Trainer will wrap the model with.

    Reads accelerate's `AcceleratorState` (the Trainer builds it in its ``__init__``, before any callback runs),
    else (or with ``state=None``) the `TrainingArguments` alone. ``state`` can also be given, for tests.
    """
    if state is _ACCELERATE_STATE:
        from accelerate.state import AcceleratorState, is_initialized

        state = AcceleratorState() if is_initialized() else None
    world_size = int(getattr(state, "num_processes", 0) or getattr(args, "world_size", 1) or 1)
    on_model = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5; before: is_gradient_...
    if on_model is None:
        on_model = getattr(model, "is_gradient_checkpointing", False)
    checkpointing = bool(
        getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False) or on_model
    )
    fsdp_plugin = getattr(state, "fsdp_plugin", None) if state is not None else None
    deepspeed_plugin = getattr(state, "deepspeed_plugin", None) if state is not None else None
    if state is None:
        deepspeed_plugin = getattr(args, "deepspeed_plugin", None)
        fsdp_arguments = getattr(args, "fsdp_plugin_args", None)
        fsdp_plugin = _PluginView(fsdp_arguments) if fsdp_arguments else None
    if deepspeed_plugin is not None:
        return DistributedSetup(DEEPSPEED, world_size, zero_stage=getattr(deepspeed_plugin, "zero_stage", None),
                                gradient_checkpointing=checkpointing)
    if fsdp_plugin is not None:
        version = int(getattr(fsdp_plugin, "fsdp_version", 1) or 1)
        return DistributedSetup(
            FSDP,
            world_size,
            fsdp_version=version,
            fsdp_use_orig_params=bool(getattr(fsdp_plugin, "use_orig_params", False)) if version == 1 else None,
            fsdp_wrap_classes=_fsdp_wrap_classes(fsdp_plugin, model),
            gradient_checkpointing=checkpointing,
        )
    if world_size <= 1:
        return DistributedSetup(SINGLE, 1, gradient_checkpointing=checkpointing)
    find_unused = getattr(args, "ddp_find_unused_parameters", None)
    if find_unused is None:
        # The Trainer's own default (`Trainer._build_accelerator_args`).
        from transformers import PreTrainedModel

        find_unused = not checkpointing if isinstance(model, PreTrainedModel) else True
    return DistributedSetup(
        DDP,
        world_size,
        find_unused_parameters=bool(find_unused),
        static_graph=bool(getattr(args, "ddp_static_graph", False)),
        gradient_checkpointing=checkpointing,
    )


class _PluginView:
    """The FSDP plugin's fields from `TrainingArguments.fsdp_plugin_args`, before accelerate builds the plugin."""

    def __init__(self, plugin_arguments: Mapping[str, Any]):
        self.fsdp_version = plugin_arguments.get("fsdp_version", 1)
        # accelerate's own default for FSDP1 when the Trainer does not pass it (`FSDP_USE_ORIG_PARAMS`, False).
        self.use_orig_params = plugin_arguments.get(
            "use_orig_params", os.environ.get("FSDP_USE_ORIG_PARAMS", "false").lower() in ("1", "true")
        )
        self.auto_wrap_policy = plugin_arguments.get("auto_wrap_policy", "NO_WRAP")
        names = plugin_arguments.get("transformer_cls_names_to_wrap")
        self.transformer_cls_names_to_wrap = names.split(",") if isinstance(names, str) else names


def _fsdp_wrap_classes(plugin: Any, model: Optional[nn.Module]) -> Optional[Tuple[str, ...]]:
    policy = getattr(plugin, "auto_wrap_policy", None)
    policy_name = policy.upper() if isinstance(policy, str) else getattr(getattr(policy, "func", policy), "__name__", "")
    if policy is None or policy_name == "NO_WRAP":
        return ()
    if "TRANSFORMER" in policy_name.upper():
        names = getattr(plugin, "transformer_cls_names_to_wrap", None) or getattr(model, "_no_split_modules", None)
        return tuple(names) if names else None
    return None  # size-based (or custom) wrapping: the units depend on sizes, treat them as unknown


def flat_parameter_units(model: nn.Module, wrap_classes: Optional[Sequence[str]]) -> Dict[str, str]:
    """Map each parameter name to the FSDP1 unit that flattens it: the innermost wrapped module's path ('' = root).

    Unknown wrapping (``None``) is treated as one unit, the strictest assumption.
    """
    wrapped = set(wrap_classes or ())
    unit_paths = [name for name, module in model.named_modules() if name and type(module).__name__ in wrapped]
    units = {}
    for name, _ in model.named_parameters():
        owners = [path for path in unit_paths if name.startswith(path + ".")]
        units[name] = max(owners, key=len) if owners else ""
    return units


def mixed_units(units: Mapping[str, str], frozen: Iterable[str]) -> Tuple[Tuple[str, str, str], ...]:
    """Units holding both frozen and trainable parameters, as ``(unit, a frozen name, a trainable name)``."""
    frozen = set(frozen)
    by_unit: Dict[str, Tuple[list, list]] = {}
    for name, unit in units.items():
        by_unit.setdefault(unit, ([], []))[0 if name in frozen else 1].append(name)
    return tuple(
        (unit, frozen_names[0], trainable_names[0])
        for unit, (frozen_names, trainable_names) in sorted(by_unit.items())
        if frozen_names and trainable_names
    )


# -- agreement between ranks ------------------------------------------------------------------------------------


def raise_if_ranks_disagree(frozen_names: Iterable[str]) -> None:
    """Refuse to train when the ranks froze different parameters (a collective: every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    fingerprint = hashlib.sha256("\n".join(sorted(frozen_names)).encode()).hexdigest()[:16]
    fingerprints = [None] * dist.get_world_size()
    dist.all_gather_object(fingerprints, fingerprint)
    if len(set(fingerprints)) > 1:
        raise FreezeConfigError(
            f"The processes froze different parameters (frozen-set fingerprints by rank: {fingerprints}). DDP "
            "would average gradients of parameters that some ranks keep frozen. A policy must decide the same "
            "on every rank: derive it from the step, the seed and values that are identical across processes."
        )
