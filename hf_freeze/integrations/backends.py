"""Facts about the backend the Trainer will wrap the model with (DDP, FSDP1, FSDP2, DeepSpeed ZeRO), as far as
freezing is concerned: read from accelerate's state, or from the `TrainingArguments` before accelerate has one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from torch import nn

__all__ = ["DEEPSPEED", "DDP", "FSDP", "SINGLE", "DistributedSetup", "detect_setup"]

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
    >>> from hf_freeze.integrations.backends import DistributedSetup
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

    @property
    def strict_ddp(self) -> bool:
        """DDP without ``find_unused_parameters``: a trainable parameter that gets no gradient stops the first step."""
        return self.backend == DDP and not self.find_unused_parameters

    def describe(self) -> str:
        if self.backend == FSDP:
            extra = f", use_orig_params={self.fsdp_use_orig_params}" if self.fsdp_version == 1 else ""
            return f"FSDP{self.fsdp_version}{extra}"
        if self.backend == DEEPSPEED:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        if self.backend == DDP:
            return f"DDP over {self.world_size} processes"
        return "a single process"


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
