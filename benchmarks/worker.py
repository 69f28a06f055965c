"""Measure one benchmark configuration in this process: step time and peak memory under a real Trainer.

Run by `benchmarks/run.py`, one process per configuration (so that no configuration inherits another's memory
or allocator state), or by hand: `python benchmarks/worker.py --model gpt2 --config bottom50 --out r.json`.

Step time: the time between consecutive `on_step_end` events, i.e. everything a training step costs (forward,
backward, gradient clipping, optimizer, scheduler, logging, every callback); the median over the measured steps
after the warm-up steps. On a GPU it is wall time read after `torch.cuda.synchronize()`. On CPU it is the
process's CPU time with one intra-op thread (`--threads 1`): on a shared machine the wall time of a step mostly
measures the other jobs (with two threads, each descheduled thread stalls the other at every barrier), while the
CPU time of one thread measures the work the step does. Wall times are recorded too.

Peak memory: the peak of the bytes held by torch tensors during a training step (weights, buffers, gradients,
optimizer state, saved activations, temporaries). On a GPU, `torch.cuda.max_memory_allocated()` over the
steps. On CPU, where torch keeps no such counter, one extra (untimed) step runs under the profiler with memory
profiling: the running sum of its allocation events gives the peak allocated during the step, to which the
tensors alive when it starts are added.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the checkout's hf_freeze, not another installed copy

from transformers import TrainerCallback  # noqa: E402

from configurations import CONFIGURATIONS, MODELS, build_model  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--config", choices=sorted(CONFIGURATIONS), required=True)
    parser.add_argument("--checkpointing", choices=["off", "non_reentrant", "reentrant"], default="off")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU.")
    parser.add_argument("--no-memory", dest="measure_memory", action="store_false", help="Skip the memory step (CPU).")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    run_one(vars(args))


def run_one(options: dict) -> dict:
    """Measure one configuration (options as the command line names them) and write the result to `out`."""
    args = argparse.Namespace(**options)
    result = dict(model=args.model, config=args.config, checkpointing=args.checkpointing)
    try:
        result.update(measure(args))
        result["status"] = "ok"
    except Exception as error:  # a strategy that does not apply to a model (BitFit without biases) is a row too
        from hf_freeze import FreezeConfigError

        if not isinstance(error, FreezeConfigError):
            raise
        result.update(status="n/a", message=str(error).split(". ")[0].split(":")[0])
    with open(args.out + ".partial", "w") as handle:  # a run cut short leaves no file that looks finished
        json.dump(result, handle)
    os.replace(args.out + ".partial", args.out)
    return result


def build_trainer(args, callbacks, max_steps: int):
    """The model of ``args.model`` with configuration ``args.config`` applied, under a real Trainer.

    Returns (trainer, model, layout); raises `FreezeConfigError` for a configuration that does not apply.
    """
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as transformers_logging

    from hf_freeze import FreezeCallback, FreezeConfigError, discover_layout

    transformers_logging.disable_progress_bar()
    cuda = _on_gpu(args)
    if not cuda:
        torch.set_num_threads(getattr(args, "threads", 1) or 1)
    configuration = CONFIGURATIONS[args.config]
    if configuration.causal_lm_only and MODELS[args.model]["kind"] != "causal_lm":
        raise FreezeConfigError(f"{configuration.label!r} needs a causal language model")
    model = build_model(args.model, args.seq_len)
    layout = discover_layout(model)
    callbacks = list(callbacks)
    if configuration.freeze:
        callbacks.insert(0, FreezeCallback(**configuration.freeze))
    if configuration.by_hand:
        freeze_by_hand(model, layout)
    if configuration.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        task = TaskType.CAUSAL_LM if MODELS[args.model]["kind"] == "causal_lm" else TaskType.SEQ_CLS
        model = get_peft_model(model, LoraConfig(r=configuration.lora, lora_alpha=2 * configuration.lora, task_type=task))
    checkpointing = args.checkpointing != "off"
    output_dir = tempfile.mkdtemp(prefix="hf_freeze_bench_")
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        logging_steps=1,  # the worst case for a callback that reports on every log
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_level="warning",  # keeps hf_freeze's block table out of the benchmark's output
        use_cpu=not cuda,
        seed=0,
        dataloader_num_workers=0,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": args.checkpointing == "reentrant"} if checkpointing else None,
    )
    data = RandomTokens(max_steps * args.batch_size, args.seq_len, model, MODELS[args.model]["kind"])
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer, model, layout


def freeze_by_hand(model, layout, fraction: float = 0.5) -> set:
    """Freeze, with `requires_grad_(False)` alone, the parameters hf_freeze's bottom strategy freezes at ``fraction``
    (the input embeddings and the bottom layers): the way a user does it without hf_freeze. Returns their names."""
    from hf_freeze import FreezeArguments, decide

    frozen = decide(layout, FreezeArguments(freeze_strategy="bottom", freeze_layers=fraction)).frozen
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    return set(frozen)


def describe(args, model, layout) -> dict:
    """What a configuration trains: parameter counts and frozen layers."""
    configuration = CONFIGURATIONS[args.config]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    frozen_layers = len(layout.frozen_layer_indices(frozen)) if not configuration.lora else 0
    return dict(trainable_params=trainable, total_params=total, frozen_layers=frozen_layers,
                num_layers=layout.num_layers, frozen_fraction=frozen_layers / layout.num_layers)


def _on_gpu(args) -> bool:
    import torch

    return torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"


def measure(args) -> dict:
    import torch

    cuda = _on_gpu(args)
    # On CPU one more step, untimed, is profiled for its memory.
    extra = 0 if cuda or not getattr(args, "measure_memory", True) else 1
    timer = StepTimer(cuda, profiled_step=args.warmup + args.steps)
    trainer, model, layout = build_trainer(args, [timer], args.warmup + args.steps + extra)
    model.register_forward_pre_hook(timer.forward_begins)
    model.register_forward_hook(timer.forward_ends)
    try:
        trainer.train()
    finally:
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    measured = timer.step_times[args.warmup:]
    return dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        clock="wall time (cuda synchronized)" if cuda else f"process CPU time, {torch.get_num_threads()} thread(s)",
        step_times=timer.step_times,
        wall_times=timer.wall_times,
        step_time=statistics.median(measured) if measured else None,
        forward_times=timer.forward_times,
        forward_time=statistics.median(timer.forward_times[args.warmup:args.warmup + args.steps]) if measured else None,
        wall_time=statistics.median(timer.wall_times[args.warmup:]) if measured else None,
        peak_memory=timer.peak_memory,
        memory_method=timer.memory_method,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        **describe(args, model, layout),
    )


class RandomTokens:
    """Fixed random token ids: the step time does not depend on the text."""

    def __init__(self, size, seq_len, model, kind):
        import torch

        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (size, seq_len), generator=generator)
        self.kind = kind

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        import torch

        ids = self.ids[index]
        label = ids.clone() if self.kind == "causal_lm" else torch.tensor(int(ids[0]) % 2)
        return {"input_ids": ids, "labels": label}


class StepTimer(TrainerCallback):
    """Time between consecutive steps (CPU time on CPU, wall time on GPU), and the peak tensor memory."""

    def __init__(self, cuda: bool, profiled_step: int):
        self.cuda = cuda
        self.profiled_step = profiled_step
        self.step_times = []
        self.wall_times = []
        self.forward_times = []  # the model's forward pass in each step (recomputation excluded)
        self.peak_memory = None
        self.memory_method = (
            "torch.cuda.max_memory_allocated" if cuda else "profiler allocation events + tensors alive at step start"
        )
        self._profiler = None

    def _now(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            wall = time.perf_counter()
            return wall, wall
        return time.process_time(), time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.last = self._now()
        self.forward_times.append(0.0)

    def forward_begins(self, module, args):
        self._forward_start = self._now()[0]

    def forward_ends(self, module, args, output):
        self.forward_times[-1] += self._now()[0] - self._forward_start

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.cuda or state.global_step != self.profiled_step:
            return
        from torch.profiler import ProfilerActivity, profile

        self._alive_at_start = _tensor_bytes(model, optimizer)
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.peak_memory = self._alive_at_start + _peak_allocated(self._profiler)
            self._profiler = None
            return
        now = self._now()
        self.step_times.append(now[0] - self.last[0])
        self.wall_times.append(now[1] - self.last[1])
        self.forward_times.append(0.0)
        self.last = now

    def on_train_end(self, args, state, control, **kwargs):
        if self.cuda:
            import torch

            self.peak_memory = torch.cuda.max_memory_allocated()


def _tensor_bytes(model, optimizer) -> int:
    """Bytes of the tensors alive between steps: parameters, buffers, gradients, optimizer state."""
    import torch

    tensors = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensors[id(tensor)] = tensor
        if getattr(tensor, "grad", None) is not None:
            tensors[id(tensor.grad)] = tensor.grad
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if torch.is_tensor(value):
                tensors[id(value)] = value
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _peak_allocated(profiler) -> int:
    """The peak of the running sum of the profiled allocation (+) and free (-) events."""
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


if __name__ == "__main__":
    main()
