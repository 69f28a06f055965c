"""One rank of a multi-process test run: a real `Trainer` + `FreezeCallback` on a tiny model, CPU, gloo.

Launched by `tests/distributed/launch.py` (``torchrun --standalone --nproc_per_node 2 train_worker.py SPEC``).
SPEC is a JSON file: ``{"output_dir": ..., "runs": [RUN, ...]}``; several runs share one launch because process
start-up dominates. A RUN is ``{"label", "policy": {freeze_* options}, "training": {TrainingArguments overrides}}``
plus optional scenario keys:

- ``"add_callback_late": true``: build the Trainer without the callback, then ``trainer.add_callback(...)``.
- ``"resume": true``: train half, save a checkpoint, then resume in a new Trainer with
  ``restore_callback_states_from_checkpoint=True`` (the callback is rebuilt from its saved state).
- ``"interrupt_at": N``: the run is interrupted after step N (its checkpoint saved), then resumed from that checkpoint
  on a new model in a new Trainer, as a fresh launch would; the result must equal the uninterrupted run's.
- ``"plant_frozen_change": true``: before the first optimizer step, add 1 to this process's part of a frozen
  parameter (what a bug outside hf_freeze would do): the health check must see it.
- ``"reapply_each_step": true``: re-decide and re-apply the policy at every step (what a schedule does).
- ``"force_apply_before_wrap": true``: apply a dynamic policy before the DDP wrap anyway (a negative control).
- ``"unfreeze_after_init": true``: make every parameter trainable between ``Trainer(...)`` and ``train()``.
- ``"model": "llama"``, ``"resize_to": N``: another tiny model, its vocabulary resized to N (the original size
  recorded for `freeze_trainable_tokens: new`), trained on tokens drawn from all N.
- ``"engine": "fsdp2" | "zero2" | "zero3"``: train under FSDP2 (accelerate's FSDP plugin, `fsdp_version: 2`, forced on
  CPU by `engines.force_fsdp_on_cpu`) or DeepSpeed ZeRO-2/3 (its CPU accelerator) instead of DDP. Values are read
  whole (gathered from the shards) for the digests and the per-step record.

Per step it also records which parameters were frozen and which changed, and the adaptive selections (scores).

Each rank writes ``rank<N>.json``: per run, a digest of every final parameter, which parameters changed, which
are frozen, the bytes DDP all-reduced per step, or the error the run raised (refusals are expected results).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # tiny, dynamic_policies

import tiny  # noqa: E402
import dynamic_policies  # noqa: E402,F401 - registers the test-only dynamic strategy
import engines  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import hf_freeze  # noqa: E402
from hf_freeze import FreezeCallback  # noqa: E402
from hf_freeze.integrations.trainer_events import progress_of  # noqa: E402


class ReducedBytesMeter(TrainerCallback):
    """Counts the bytes DDP all-reduces per optimizer step, with a communication hook on the wrapped model.

    DDP hands the hook each gradient bucket once per backward pass; buckets hold only the parameters DDP
    registered at the wrap.
    """

    def __init__(self):
        self.trainer = None
        self.ddp = None
        self.per_step = []
        self.frozen_at_start = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # FreezeCallback runs first (it moves itself to the front), so its on_train_begin decision is applied.
        self.frozen_at_start = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            self.ddp = wrapped
            try:
                wrapped.register_comm_hook(dist.group.WORLD, self._count)
            except RuntimeError:  # a changing policy's own hook (hf_freeze.apply.ddp_reduce) counts its bytes
                self.ddp = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.per_step.append(0)

    def _count(self, process_group, bucket):
        buffer = bucket.buffer()
        self.per_step[-1] += buffer.numel() * buffer.element_size()
        return allreduce_hook(process_group, bucket)


class StepRecorder(TrainerCallback):
    """Per optimizer step: the parameters frozen while it ran, and the parameters it changed.

    Listed after the FreezeCallback (which moves itself first), so each step's frozen set is already applied.
    """

    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = engines.whole_parameters(model)
        self.frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
        # A ZeRO-3 partitioned parameter is empty outside the forward pass; `ds_numel` is its size.
        self.trainable_numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        after = engines.whole_parameters(model)
        changed = sorted(name for name, value in after.items() if not torch.equal(self.before[name], value))
        self.steps.append({"frozen": self.frozen, "changed": changed, "trainable_numel": self.trainable_numel})


class GradientBytes(TrainerCallback):
    """Bytes of gradients this process holds before each optimizer step (a DTensor's local shard; ZeRO keeps its
    gradients in its own buffers: not counted)."""

    def __init__(self):
        self.per_step = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        from hf_freeze.model.sharded import local_value

        self.per_step.append(sum(local_value(p.grad).numel() * p.grad.element_size()
                                 for p in model.parameters() if p.grad is not None))


class StopAfter(TrainerCallback):
    """Ends training after a given step, once its checkpoint is saved (an interrupted run)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save, control.should_training_stop = True, True


class PlantFrozenChange(TrainerCallback):
    """Changes a frozen parameter in the first step, on every process (listed after the FreezeCallback)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            from hf_freeze.model.sharded import local_value

            name, parameter = next((n, p) for n, p in model.named_parameters() if not p.requires_grad)
            with torch.no_grad():
                local_value(parameter).add_(1.0)


class ReapplyEachStep(TrainerCallback):
    """Stands in for a schedule: re-decides the policy at every step and applies it (after the wrap)."""

    def __init__(self, freeze_callback: FreezeCallback):
        self.freeze_callback = freeze_callback

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        progress = progress_of(args, state)
        self.freeze_callback.freezer.apply(progress, optimizer)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _other_rows(tensor: torch.Tensor, rows) -> torch.Tensor:
    keep = torch.ones(tensor.shape[0], dtype=torch.bool)
    keep[list(rows)] = False
    return tensor.detach()[keep]


def build_trainer(run: dict, model, output_dir: Path, stop_after=None, **training_overrides):
    training = dict(ddp_backend="gloo", max_steps=3, per_device_train_batch_size=4)
    training.update(engines.training_arguments(run.get("engine", "ddp")))
    training.update(run.get("training", {}))
    training.update(training_overrides)
    args = TrainingArguments(**tiny.training_kwargs(output_dir, **training))
    freeze_callback = FreezeCallback(**run["policy"])
    meter = ReducedBytesMeter()
    meter.recorder = StepRecorder()
    meter.gradients = GradientBytes()
    callbacks = [meter] + ([] if run.get("add_callback_late") else [freeze_callback]) + [meter.recorder, meter.gradients]
    if run.get("reapply_each_step"):
        callbacks.append(ReapplyEachStep(freeze_callback))
    if run.get("plant_frozen_change"):
        callbacks.append(PlantFrozenChange())
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    data = None
    if run.get("resize_to"):
        data = tiny.TokenClassificationData(vocab=run["resize_to"], causal_lm=True)
    trainer = tiny.trainer_for(model, args, callbacks=callbacks, data=data)
    if run.get("add_callback_late"):
        trainer.add_callback(freeze_callback)
    if run.get("force_apply_before_wrap"):
        # What the callback must not do: apply the step-0 frozen set before DDP wraps the model.
        freezer = freeze_callback.freezer
        freezer.applier.apply(freezer.decide(hf_freeze.TrainingProgress(step=0, max_steps=args.max_steps)))
    if run.get("unfreeze_after_init"):  # user code between Trainer(...) and train()
        model.requires_grad_(True)
    meter.trainer = trainer
    return trainer, meter


def new_model(run: dict):
    # An earlier run's ZeRO-3 TrainingArguments declared ZeRO-3 for the process: transformers would build this model
    # inside `deepspeed.zero.Init` (partitioned, initialised differently). Each run starts from the same weights.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if run.get("pretrained"):  # a local model directory (the communication figures for a real model)
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)  # the new classifier head: identical on every rank
        return AutoModelForSequenceClassification.from_pretrained(run["pretrained"], num_labels=2)
    if run.get("model") == "llava":  # a vision-language model, trained here on text alone
        return tiny.tiny_llava(seed=0)
    model = tiny.build(run.get("model", "bert"), seed=0, num_hidden_layers=4)
    if run.get("resize_to"):
        from hf_freeze.model import record_vocabulary_size

        record_vocabulary_size(model)
        model.resize_token_embeddings(run["resize_to"])
    return model


def _adapter_reloads(run: dict, model, output_dir: Path):
    """`freeze_lora`: whether the adapter the main process saved reloads with plain peft onto a new base model to the
    trained model's logits (``None`` without an adapter, or on another process)."""
    folder = output_dir / "lora_adapter"
    if not run["policy"].get("freeze_lora") or int(os.environ.get("RANK", "0")) != 0 or not folder.is_dir():
        return None
    from peft import PeftModel

    inputs = torch.arange(1, 17).reshape(2, 8)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=inputs).logits
        reloaded = PeftModel.from_pretrained(new_model(run), str(folder)).eval()(input_ids=inputs).logits
    return bool(torch.allclose(trained, reloaded, rtol=1e-5, atol=1e-6))


def run_one(run: dict, output_dir: Path) -> dict:
    model = new_model(run)
    before = engines.whole_parameters(model)
    if run.get("resume"):
        half, meter = build_trainer(run, model, output_dir, max_steps=2, save_strategy="steps", save_steps=2)
        half.train()
        model = new_model(run)
        trainer, meter = build_trainer(run, model, output_dir, max_steps=4, restore_callback_states_from_checkpoint=True)
        trainer.train(resume_from_checkpoint=True)
    elif run.get("interrupt_at"):
        step = run["interrupt_at"]
        first, _ = build_trainer(run, model, output_dir, save_strategy="steps", save_steps=step, stop_after=step)
        first.train()
        model = new_model(run)
        trainer, meter = build_trainer(run, model, output_dir, restore_callback_states_from_checkpoint=True)
        trainer.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{step}"))
    else:
        trainer, meter = build_trainer(run, model, output_dir)
        trainer.train()
    after = engines.whole_parameters(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapped = trainer.model_wrapped
    freezer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FreezeCallback)).freezer
    return {
        "status": "ok",
        "max_step": trainer.state.global_step,
        "wrapped": type(wrapped).__name__,
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
        "total_params": sum(p.numel() for p in after.values()),
        "trainable_params": sum(p.numel() for name, p in after.items() if requires_grad[name]),
        "frozen_at_start": meter.frozen_at_start,
        "frozen": sorted(name for name, trains in requires_grad.items() if not trains),
        "changed": sorted(name for name, p in after.items() if name in before and not torch.equal(before[name], p)),
        # Parameters that train by rows: whether every other row is bit-identical, and a digest of the trained rows.
        "frozen_rows_unchanged": {
            name: bool(torch.equal(_other_rows(before[name], rows), _other_rows(after[name], rows)))
            for name, rows in freezer.applier.rows.selection().items()
        },
        "row_digests": {name: digest(p) for name, p in freezer.applier.rows.parameters.items()},
        "rows_changed": {
            name: not torch.equal(before[name][list(rows)], freezer.applier.rows.parameters[name].detach())
            for name, rows in freezer.applier.rows.selection().items()
        },
        "digests": {name: digest(p) for name, p in after.items()},
        # For comparisons across engines, whose reductions differ in order: float sums, compared with a tolerance.
        "fingerprints": {name: engines.fingerprint(p) for name, p in after.items()},
        "engine": engines.describe(trainer),
        "adapter_reloads": _adapter_reloads(run, model, output_dir),
        "optimizer_state_bytes": engines.optimizer_state_bytes(trainer.optimizer),
        "gradient_bytes_per_step": meter.gradients.per_step,
        "grad_norms": [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry],
        "health_warnings": engines.HEALTH_WARNINGS.take(),
        "bytes_per_step": freezer.communication.bytes_per_step if freezer.communication else meter.per_step,
        "steps": meter.recorder.steps,
        "selections": freezer.timeline.selections if freezer.timeline else [],
        # Learning-rate groups (`freeze_learning_rates`, `freeze_layer_lr_decay`): name, rate now, base rate, size.
        "group_rates": [[group.get("hf_freeze_group"), group["lr"], group.get("initial_lr"), len(group["params"])]
                        for group in trainer.optimizer.param_groups],
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    output_dir = Path(spec["output_dir"])
    rank = int(os.environ.get("RANK", "0"))
    results = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    for run in spec["runs"]:
        try:
            results[run["label"]] = run_one(run, output_dir / "runs" / run["label"])
        except Exception as error:  # noqa: BLE001 - the test judges the error (refusals are expected results)
            results[run["label"]] = {
                "status": "error",
                "error_type": type(error).__name__,
                "error": str(error),
                "traceback": traceback.format_exc()[-3000:],
            }
            if not run.get("expect_error"):
                break  # a failure mid-collective can leave the other rank waiting: stop, the test reports it
    (output_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    if dist.is_initialized():
        dist.destroy_process_group()
    # Every result is written: leave without the interpreter's teardown. Under load (a fresh venv, the suite on 2
    # busy cores) a rank once aborted there, after writing its results ("terminate called without an active
    # exception", SIGABRT from a C++ thread's destructor), which failed a launch whose training had all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
