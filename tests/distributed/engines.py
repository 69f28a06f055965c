"""The training engines a 2-process test run can use on CPU, for `train_worker.py`: DDP (the default), FSDP2 and
DeepSpeed ZeRO-2/3; reading parameters whole under each; fingerprints for comparing runs across engines.

FSDP2 on CPU: accelerate picks FSDP only for GPU-like devices and runs an FSDP config on CPU as DDP
(`AcceleratorState.__init__`, accelerate 1.16). `force_fsdp_on_cpu` sets the distributed type to FSDP whenever an
FSDP plugin is given, after accelerate's own initialisation: the Trainer then takes its real FSDP2 path
(`Accelerator.prepare` → `fsdp2_prepare_model` → `fully_shard` over gloo, the optimizer built over the DTensors).

DeepSpeed runs on CPU with its CPU accelerator when the TrainingArguments leave `use_cpu` off (accelerate picks
DeepSpeed only then) and the backend is gloo.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch

# ZeRO configurations for the Trainer ("auto" values are filled from the TrainingArguments): fp32, no offload, the
# Trainer's own optimizer (a client optimizer, as DeepSpeed calls it).
ZERO = {
    stage: {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    for stage in (2, 3)
}


def training_arguments(engine: str) -> dict:
    """TrainingArguments overrides that put a run on ``engine``."""
    if engine == "ddp":
        return {}
    if engine == "fsdp2":
        force_fsdp_on_cpu()
        return {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}
    if engine in ("zero2", "zero3"):
        use_gloo_for_deepspeed()
        return {"deepspeed": ZERO[int(engine[-1])], "use_cpu": False, "accelerator_config": {"use_configured_state": True}}
    if engine == "accelerate-config":  # `accelerate launch --config_file` decides (a DeepSpeed config: off the `cpu` flag)
        return {"use_cpu": False}
    raise ValueError(f"unknown engine {engine!r}")


def use_gloo_for_deepspeed() -> None:
    """The TrainingArguments do not pass `ddp_backend` on when `deepspeed` is set (transformers 5.23): accelerate then
    finds no process group backend on CPU and runs as one process, so every rank trains on the same batches while
    DeepSpeed averages over two. Set up accelerate's process state with gloo first, for DeepSpeed, and have the
    Trainer use it (`accelerator_config.use_configured_state`)."""
    import os

    from accelerate import PartialState

    from accelerate.state import AcceleratorState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    # Each Trainer of the launch (several runs, an interrupted one and its resumption) brings its DeepSpeed plugin: a
    # configured state keeps the first one's, and refuses another.
    AcceleratorState._reset_state(reset_partial_state=False)


def force_fsdp_on_cpu() -> None:
    """Make accelerate use its FSDP path on CPU processes (see the module docstring). Idempotent."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    if getattr(state.AcceleratorState.__init__, "forces_fsdp", False):
        return
    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.forces_fsdp = True
    state.AcceleratorState.__init__ = init


def whole_parameters(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter's whole value (a copy): gathered from FSDP2's shards or ZeRO-3's partitions (collectives)."""
    from torch.distributed.tensor import DTensor

    parameters = list(model.named_parameters())
    partitioned = [p for _, p in parameters if getattr(p, "ds_tensor", None) is not None]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return {name: p.detach().clone() for name, p in parameters}
    return {name: (p.detach().full_tensor() if isinstance(p, DTensor) else p.detach().clone()) for name, p in parameters}


def fingerprint(value: torch.Tensor) -> List[float]:
    """Three float64 sums of a tensor (plain, of squares, weighted by a fixed pattern): equal to a tolerance when two
    engines computed the same values in a different reduction order."""
    flat = value.detach().reshape(-1).double()
    pattern = torch.sin(torch.arange(flat.numel(), dtype=torch.float64))
    return [float(flat.sum()), float(flat.square().sum()), float((flat * pattern).sum())]


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this process holds (Adam's moments; step counters left out): the torch optimizer inside
    accelerate's and DeepSpeed's wrappers, its state tensors as this process holds them (a DTensor's local shard,
    ZeRO's flat partitions)."""
    from hf_freeze.model.sharded import local_value

    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return sum(local_value(value).numel() * value.element_size() for state in optimizer.state.values()
               for key, value in state.items() if torch.is_tensor(value) and key != "step")


def describe(trainer) -> str:
    return f"{type(trainer.model_wrapped).__name__} ({trainer.accelerator.distributed_type})"


class _HealthWarnings(logging.Handler):
    """The health check's warnings (logged on the main process), collected per run."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []
        logging.getLogger("hf_freeze").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Training health check"):
            self.messages.append(message)

    def take(self) -> List[str]:
        messages, self.messages = self.messages, []
        return messages


HEALTH_WARNINGS = _HealthWarnings()
