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
- FSDP2 (`fully_shard`) shards each parameter on its own; it accepts frozen parameters and `requires_grad` changes
  after the wrap (each all-gather copies the flag onto the unsharded parameter, and only parameters with a gradient
  are reduce-scattered). It replaces the parameter objects: the applier, the health check and an adaptive probe look
  them up again by name (`FreezeApplier.follow_live_parameters`), so every policy runs on it.
- DeepSpeed ZeRO builds its optimizer partitions from the trainable parameters at `deepspeed.initialize`: frozen
  parameters get no optimizer state and no gradient partition. A parameter frozen later gets a zero gradient that
  ZeRO still steps (weight decay and momentum move it), so a policy that changes keeps every parameter it may train
  trainable at the wrap, one param group per block, and an optimizer that skips the groups frozen at each step
  (`hf_freeze.apply.frozen_groups`). DeepSpeed runs the optimizer step inside `backward`: what must act around the
  step (an adaptive probe, `freeze_unfreeze_lr_factor`) cannot, and is refused.
- Learning rates per part or layer (`freeze_learning_rates`, `freeze_layer_lr_decay`) need the optimizer built from
  hf_freeze's param groups: the Trainer builds it from them on every engine (FSDP2 after the wrap, over the sharded
  parameters; DeepSpeed takes it as its client optimizer, one flat partition per group), tested on each.
  `freeze_lora` (adapters injected before the wrap, saved by the main process from whole parameters) runs on one
  process, DDP and ZeRO-1/2, and is refused under FSDP and ZeRO-3, which shard the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..apply.compiled import refuse_stale_compiled_graph
from ..policies.adaptive import probe_mode
from ..scores.meter import reads_gradients
from ..errors import FreezeConfigError
from .backends import DDP, DEEPSPEED, FSDP, SINGLE, DistributedSetup, detect_setup

__all__ = [
    "PolicyFacts",
    "applies_before_wrap",
    "check_backend",
    "check_support",
    "flat_parameter_units",
    "mixed_units",
    "raise_if_changed_after_wrap",
]


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
        add_ons: The names of the `LayerFreezer` add-ons the policy runs (``"learning_rates"``, ...).
        probes: An adaptive policy measures scores from the gradients around the optimizer step.
        scales_updates: The policy scales some parameters' updates around the optimizer step
            (`freeze_unfreeze_lr_factor`).

    Example:

    ```python
    >>> from hf_freeze.integrations.backends import DistributedSetup
    >>> from hf_freeze.integrations.support import PolicyFacts, check_support
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
    add_ons: Tuple[str, ...] = ()
    probes: bool = False
    scales_updates: bool = False


def check_support(setup: DistributedSetup, policy: PolicyFacts) -> Optional[str]:
    """``None`` when the policy can run on this backend, otherwise why not and the setting that fixes it."""
    # A policy that freezes every parameter never gets here: `LayerFreezer` refuses it on any backend.
    name = f"`freeze_strategy` {policy.strategy!r}"
    refused = _refused_add_on(setup, policy)
    if refused is not None:
        fields, why, _ = _NOT_UNDER_SHARDING[refused]
        return (
            f"{' and '.join(f'`{field}`' for field in fields)} cannot run under {setup.describe()} yet: {why} Train on "
            "one device or with DDP (`accelerate launch` without an FSDP/DeepSpeed config), or remove them."
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
        if setup.backend == DEEPSPEED and (policy.probes or policy.scales_updates):
            what = ("an adaptive policy's probe reads each step's gradients before the optimizer step, or withholds "
                    "that step (`freeze_probe_mode: measure`), or reads whole weights that ZeRO-3 partitions"
                    if policy.probes else
                    "`freeze_unfreeze_lr_factor` scales the update of newly unfrozen layers around the optimizer step")
            return (
                f"{name} cannot run under {setup.describe()}: {what}, and DeepSpeed runs the optimizer step inside "
                "`backward` and keeps the gradients in its own partitions, so no Trainer event comes between them. "
                "Train it with FSDP2 (`fsdp_version: 2`) or DDP; under DeepSpeed, use a schedule without "
                "`freeze_unfreeze_lr_factor` (LISA, BAdam, progressive, gradual unfreezing, staged), or under ZeRO-2 "
                "an adaptive policy with `freeze_probe_mode: train` and a score read off the weights ('weight_change', "
                "'snr')."
            )
        if setup.backend == FSDP and setup.fsdp_version == 1:
            return (
                f"{name} changes the trainable parameters during training, which {setup.describe()} does not "
                f"support: {_FIXED_AT_WRAP[(setup.backend, setup.fsdp_version)]} Train with FSDP2 (`fsdp_version: "
                "2`) or DDP (`accelerate launch` without an FSDP/DeepSpeed config, and `ddp_find_unused_parameters: "
                "true`), or use a static strategy."
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
    (FSDP, 1): "FSDP1 fixes at the wrap whether each flat parameter needs a gradient, so a unit that was wholly "
    "frozen then never trains when it is unfrozen later.",
}


def _keeps_parameters_whole(setup: DistributedSetup) -> bool:
    """DeepSpeed ZeRO-1/2 partition gradients and optimizer states, not the parameters."""
    return setup.backend == DEEPSPEED and setup.zero_stage in (0, 1, 2)


# What is not supported under the sharding backends (FSDP, DeepSpeed): the options that turn it on, why, and the
# sharding setups it runs under nevertheless.
_NOT_UNDER_SHARDING = {
    "frozen_dtype": (
        ("freeze_frozen_dtype",),
        "it converts frozen weights in place, and FSDP and DeepSpeed own the parameters' storage after the wrap "
        "(FSDP2's sharded parameters and all-gather buffers, ZeRO's partitions): tested on one process and under DDP "
        "only.",
        lambda setup: False,
    ),
    "lora": (
        ("freeze_lora",),
        "the adapter is saved by the main process from whole parameters, which FSDP and DeepSpeed ZeRO-3 shard "
        "across the processes (tested on one process, under DDP and under ZeRO-1/2, which keep them whole).",
        _keeps_parameters_whole,
    ),
}


def _refused_add_on(setup: DistributedSetup, policy: PolicyFacts) -> Optional[str]:
    if setup.backend not in (FSDP, DEEPSPEED):
        return None
    return next((name for name in policy.add_ons if name in _NOT_UNDER_SHARDING and not _NOT_UNDER_SHARDING[name][2](setup)),
                None)


def applies_before_wrap(setup: DistributedSetup, policy: PolicyFacts) -> bool:
    """Whether the first decision is applied before the model is wrapped (`on_init_end`) or after (`on_train_begin`).

    Static policies are applied before the wrap, so that DDP registers (and all-reduces) the trainable parameters
    only. A policy that changes the trainable set under DDP must leave every parameter trainable at the wrap, so
    that DDP registers them all: a parameter DDP did not register is never all-reduced once it is unfrozen.
    """
    return not (policy.dynamic and setup.backend == DDP and setup.multi_process)


def check_backend(args: Any, freezer: Any, decision: Any) -> DistributedSetup:
    """Check a `LayerFreezer`'s first decision (and the add-ons its policy runs) against the backend the Trainer will
    use; return that backend's facts.

    Raises:
        FreezeConfigError: the policy cannot run on this backend (the message names the setting that fixes it).
    """
    model, strategy, dynamic = freezer.model, freezer.strategy.name, freezer.dynamic
    factor = getattr(freezer.arguments, "freeze_unfreeze_lr_factor", None)
    refuse_stale_compiled_graph(bool(getattr(args, "torch_compile", False)), dynamic, strategy)
    setup = detect_setup(args, model)
    names = [name for name, _ in model.named_parameters()]
    frozen = [name for name in names if decision.is_frozen(name)]
    units = ()
    if setup.backend == FSDP and setup.fsdp_version == 1 and not setup.fsdp_use_orig_params:
        units = mixed_units(flat_parameter_units(model, setup.fsdp_wrap_classes), frozen)
    probe = freezer.probe
    # A probe acts around the optimizer step when it withholds it, or reads gradients; ZeRO-3 weights are partitions.
    probes = probe is not None and (probe_mode(freezer.arguments) == "measure" or reads_gradients(probe.score)
                                    or (setup.backend == DEEPSPEED and setup.zero_stage == 3))
    add_ons = tuple(freezer.add_ons) + (("frozen_dtype",) if getattr(freezer.arguments, "freeze_frozen_dtype", None) else ())
    facts = PolicyFacts(strategy, dynamic, len(names) - len(frozen), len(frozen), units, add_ons,
                        probes=probes, scales_updates=factor not in (None, 1.0))
    error = check_support(setup, facts)
    if error:
        refused = _refused_add_on(setup, facts)
        raise FreezeConfigError(error, fields=_NOT_UNDER_SHARDING[refused][0] if refused else ())
    rows = getattr(decision, "trainable_rows", None)
    if rows and (setup.backend == FSDP or (setup.backend == DEEPSPEED and setup.zero_stage != 1 and setup.zero_stage != 2)):
        # The rows are put into the full parameter at every forward pass; a sharded parameter is not there whole.
        raise FreezeConfigError(
            f"Trainable rows ({', '.join(sorted(rows)[:3])}) cannot run under {setup.describe()}, which shards the "
            "parameters they belong to. Train them on one device, with DDP, or with DeepSpeed ZeRO-1/2.",
            fields=["freeze_trainable_tokens", "freeze_trainable_experts"],
        )
    return setup


def raise_if_changed_after_wrap(setup: DistributedSetup, flips: Sequence[str], model_init: bool = False) -> None:
    """Refuse to flip `requires_grad` of the parameters ``flips`` once a backend has wrapped the model (the policy
    is static here); ``model_init``: the model was built by the Trainer's `model_init` in `train()`.

    DDP, FSDP and DeepSpeed fixed what they synchronise at the wrap; flipping flags now leaves a parameter that
    is never synchronised, or makes the next steps skip or fail the gradient reduction.
    """
    if setup.backend == SINGLE:
        return
    if flips and model_init:
        raise FreezeConfigError(
            f"the Trainer built the model with `model_init` in `train()` and {setup.describe()} wrapped it before "
            f"the callback could freeze {len(flips)} parameter(s) (e.g. {flips[:3]}); the wrapper fixed at the wrap "
            "which gradients it synchronises. Under several processes, freeze inside `model_init`: "
            "`LayerFreezer(model, **options).apply()` before returning the model, or pass `model=` instead."
        )
    if flips:
        raise FreezeConfigError(
            f"{len(flips)} parameter(s) would change `requires_grad` after {setup.describe()} wrapped the model "
            f"(e.g. {flips[:3]}), and the wrapper fixed at the wrap which gradients it synchronises. Pass the "
            "callback to the Trainer, `Trainer(..., callbacks=[FreezeCallback(...)])`, not `add_callback` after "
            "it is built, and do not change `requires_grad` between building the Trainer and `train()`."
        )


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
