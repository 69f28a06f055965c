"""Step time and peak memory of hf_freeze's configurations on a Llama-3.2-1B-shaped model, on one CUDA GPU (issue 28).

    PYTHONUNBUFFERED=1 python benchmarks/gpu_shapes.py            # every configuration (estimated 3-5 min on an H200)
    python benchmarks/gpu_shapes.py --configs full bottom50 --steps 5
    python benchmarks/gpu_shapes.py --device cpu --tiny           # the same code on CPU with a tiny Llama (a test)

The model is built from a config with random weights, in float32, directly on the GPU, and trained by the real
`transformers.Trainer` (bf16 autocast, fused AdamW, batch 8 x 1024 random tokens, labels = the inputs). The
configurations run one after another in this process, most important first; between two of them the trainer,
model and optimizer are deleted, garbage is collected, the CUDA cache emptied and the peak counter reset. A
configuration whose option the installed hf_freeze refuses, or that needs a missing package (Liger needs CUDA), is
reported as skipped; one that fails (out of memory, say) is reported with its error, and the run goes on. The run
keeps to `--time-budget` seconds (default 420, counted from the start of the process, imports included): a
configuration that would end after them, judged by the longest one so far, is skipped, and so is the rest.

Step time: the synchronized wall time from the start of one step to the start of the next, the median (and the
min-max) of `--steps` steps after `--warmup` steps. Peak memory: `torch.cuda.max_memory_allocated()` over the
configuration's run (model build included); not measured on CPU. Rows with activation checkpointing are compared
with full fine-tuning with activation checkpointing. Beside the measurement: `hf-freeze plan`'s memory estimate
(`hf_freeze/tools/memory.py`) for this shape and for a Llama-3.1-8B shape (built on the meta device).

Writes `gpu_shapes.json` (after every configuration, so that a run cut short keeps what it measured) and
`gpu_shapes.md` into `--output` (default `benchmarks/results/cuda`; `--tiny`: `benchmarks/results/tiny`).
"""

from __future__ import annotations

import time

STARTED = time.time()  # the time budget counts the imports too

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Optional  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the checkout's hf_freeze, not another installed copy

from transformers import TrainerCallback  # noqa: E402

from gpu_shapes_configurations import PLANNED_SHAPE, ROWS, SHAPES, Row  # noqa: E402
from gpu_shapes_report import GIB, gib, write_outputs  # noqa: E402
from worker import RandomTokens, freeze_by_hand  # noqa: E402


class Skipped(Exception):
    """A configuration this installation cannot run: an option hf_freeze refuses, a missing package."""


class StepStarts(TrainerCallback):
    """The synchronized wall time at the start of every step; a step takes until the next one starts."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.starts = []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(ROWS), metavar="NAME",
                        help=f"Configurations to run, in this order (default: all). Choices: {' '.join(ROWS)}.")
    parser.add_argument("--warmup", type=int, default=3, help="Warm-up steps per configuration (default 3).")
    parser.add_argument("--steps", type=int, default=11, help="Measured steps per configuration (default 11).")
    parser.add_argument("--batch-size", type=int, help="Default 8 (--tiny: 2).")
    parser.add_argument("--seq-len", type=int, help="Tokens per sequence; default 1024 (--tiny: 32).")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help=f"A tiny Llama ({SHAPES['tiny']['num_hidden_layers']} layers, "
                        f"hidden {SHAPES['tiny']['hidden_size']}) instead of the 1B shape: a test of this script.")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="Seconds from the start of the process after which no configuration starts that would "
                             "take longer than the longest so far to finish (default 420).")
    parser.add_argument("--output", help="Folder for gpu_shapes.json and gpu_shapes.md (default: see above).")
    args = parser.parse_args(argv)
    args.shape = "tiny" if args.tiny else "llama-3.2-1b"
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.seq_len = args.seq_len or (32 if args.tiny else 1024)
    args.output = args.output or os.path.join(HERE, "results", "tiny" if args.tiny else "cuda")
    args.command = " ".join(["python benchmarks/gpu_shapes.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def plan_estimates(shape: str, batch_size: int, seq_len: int) -> dict:
    """`hf-freeze plan`'s estimate of the training memory, in bytes, of full fine-tuning and of bottom 50% with and
    without the chunked loss, each without and with activation checkpointing ("_ckpt"): bf16 autocast over float32
    weights, AdamW. The model is built on the meta device (no memory, no GPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_freeze import FreezeArguments
    from hf_freeze.tools.plan import make_plan

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    estimates = {}
    for checkpointing in (False, True):
        suffix = "_ckpt" if checkpointing else ""
        for name, chunked in (("bottom50", None), ("bottom50_unchunked", False)):
            arguments = FreezeArguments(freeze_strategy="bottom", freeze_layers=0.5, freeze_chunked_loss=chunked)
            plan = make_plan(model, arguments, batch_size=batch_size, sequence_length=seq_len, precision="bf16-mixed",
                             optimizer="adamw", gradient_checkpointing=checkpointing)
            estimates[name + suffix] = plan.policy_memory.total
            if chunked is False:  # full fine-tuning computes transformers' loss: the estimate without chunks
                estimates["full" + suffix] = plan.full_memory.total
    return estimates


def check_runnable(row: Row, cuda: bool):
    """The row's `FreezeCallback` (None without one), made before anything is built; raises `Skipped`."""
    from hf_freeze import FreezeCallback, FreezeConfigError

    if row.liger:
        from transformers.utils import is_liger_kernel_available

        if not cuda:
            raise Skipped("liger-kernel needs a CUDA GPU (Triton kernels)")
        if not is_liger_kernel_available():
            raise Skipped("liger-kernel is not installed")
    if row.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise Skipped("peft is not installed") from None
    if row.freeze is None:
        return None
    try:
        return FreezeCallback(**row.freeze)
    except (FreezeConfigError, TypeError) as error:  # an option this hf_freeze does not know (yet)
        raise Skipped(_first_sentence(error)) from None


def _first_sentence(error: BaseException) -> str:
    text = str(error).split(" Valid options:")[0].strip()
    return text if len(text) <= 200 else text[:197] + "..."


def measure(row: Row, args, cuda: bool) -> dict:
    """Train ``row`` for warm-up + measured steps + 1 (the last step's end is the next one's start)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_freeze import FreezeConfigError, discover_layout

    callback = check_runnable(row, cuda)
    timer = StepStarts(cuda)
    max_steps = args.warmup + args.steps + 1
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape]))
    if row.by_hand:
        frozen = freeze_by_hand(model, discover_layout(model))
        if row.frozen_dtype:
            for name, parameter in model.named_parameters():
                if name in frozen:
                    parameter.data = parameter.data.to(getattr(torch, row.frozen_dtype))
    if row.lora_rank:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(r=row.lora_rank, lora_alpha=2 * row.lora_rank,
                                                 target_modules="all-linear", task_type=TaskType.CAUSAL_LM))
    data = RandomTokens(max_steps * args.batch_size, args.seq_len, model, "causal_lm")
    with tempfile.TemporaryDirectory(prefix="hf_freeze_gpu_shapes_") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-5, bf16=True, optim="adamw_torch_fused", report_to=[], save_strategy="no",
            disable_tqdm=True, log_level="warning", use_cpu=not cuda, seed=0, dataloader_num_workers=0,
            activation_checkpointing=row.checkpointing, use_liger_kernel=row.liger,
        )
        try:
            trainer = Trainer(model=model, args=training_args, train_dataset=data,
                              callbacks=[callback, timer] if callback else [timer])
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        except FreezeConfigError as error:  # hf_freeze refuses this model or set-up
            raise Skipped(_first_sentence(error)) from None
    steps = [(end - start) * 1000 for start, end in zip(timer.starts, timer.starts[1:])][args.warmup:]
    result = dict(
        step_ms=statistics.median(steps), step_ms_min=min(steps), step_ms_max=max(steps), step_ms_all=steps,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        attention=getattr(model.config, "_attn_implementation", None),
    )
    selections = callback.freezer.timeline.selections if callback is not None and callback.freezer.probe else []
    if selections:  # an adaptive row: which layers its probe chose, and at which step
        result.update(selected_layers=selections[-1]["frozen_layers"], selected_at_step=selections[-1]["step"])
    trainer.accelerator.free_memory()  # the accelerator keeps the model and optimizer it prepared
    return result


class LlamaModulePatchesUndone:
    """Liger patches transformers' Llama module itself (its rotary embedding function, RMSNorm and MLP classes), not
    only the model it is given: restoring the module's names keeps the configurations after a Liger one on
    transformers' own code."""

    MODULES = ("transformers.models.llama.modeling_llama", "torch.nn.functional")

    def __enter__(self):
        import importlib

        # Imported now if not yet: a module first imported inside the block would keep what was patched into it.
        self.saved = {name: dict(vars(importlib.import_module(name))) for name in self.MODULES}

    def __exit__(self, *exc):
        for name, saved in self.saved.items():
            namespace = vars(sys.modules[name])
            for key, value in saved.items():
                if namespace.get(key) is not value:
                    namespace[key] = value
        return False


def release_memory(cuda: bool) -> Optional[int]:
    """Collect what the last configuration left, and reset the peak counter; returns the bytes still allocated."""
    import torch

    gc.collect()
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def run_row(row: Row, args, cuda: bool) -> dict:
    """Measure one row; never raises: a skip or a failure is the row's status."""
    started = time.time()
    try:
        with LlamaModulePatchesUndone():
            outcome = dict(status="ok", **measure(row, args, cuda))
    except Skipped as reason:
        outcome = dict(status="skipped", message=str(reason))
    except Exception as error:  # out of memory, a missing kernel: the other rows still run
        outcome = dict(status="error", message=f"{type(error).__name__}: {_first_sentence(error)}")
    # The exception (and its traceback's frames, which hold the model) is gone here.
    leftover = release_memory(cuda)
    return dict(name=row.name, label=row.label, baseline=row.baseline, seconds=round(time.time() - started, 1),
                leftover_bytes=leftover, **outcome)


def environment(args, cuda: bool) -> dict:
    import datetime
    import importlib.metadata
    import subprocess

    import torch

    versions = {}
    for package in ("torch", "transformers", "accelerate", "peft", "liger-kernel", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        versions=versions, hf_freeze_commit=commit,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=args.command,
        settings=dict(shape=args.shape, model_config=SHAPES[args.shape], batch_size=args.batch_size, seq_len=args.seq_len,
                      warmup=args.warmup, steps=args.steps, precision="float32 weights, bf16 autocast (bf16=True)",
                      optimizer="adamw_torch_fused", checkpointing="transformers' default (non-reentrant)",
                      time_budget_s=args.time_budget),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --tiny to test this script on CPU)")
    if not cuda:
        torch.set_num_threads(1)  # a tiny model: more threads only wait on each other (and on a shared machine's load)
    rows = [ROWS[name] for name in (args.configs or ROWS)]
    report = dict(environment(args, cuda), results=[], plans={})
    print(f"{report['device']}, {report['versions']}; {len(rows)} configurations of {args.shape}, batch "
          f"{args.batch_size} x {args.seq_len}, {args.warmup} + {args.steps} steps ({time.time() - STARTED:.0f} s)", flush=True)
    for shape in dict.fromkeys([args.shape, PLANNED_SHAPE]):
        try:
            report["plans"][shape] = plan_estimates(shape, args.batch_size, args.seq_len)
        except Exception as error:  # an estimate is a side dish: the measurements still run
            report["plans"][shape] = {"error": f"{type(error).__name__}: {error}"}
        print(f"[plan] {shape}: " + ", ".join(f"{key} {gib(value)}" if isinstance(value, int) else f"{key} {value}"
                                              for key, value in report["plans"][shape].items()), flush=True)
    longest = 0.0
    for index, row in enumerate(rows, 1):
        elapsed = time.time() - STARTED
        if elapsed + longest > args.time_budget:
            result = dict(name=row.name, label=row.label, baseline=row.baseline, status="skipped",
                          message=f"time budget: {elapsed:.0f} s of {args.time_budget:.0f} s spent")
        else:
            result = run_row(row, args, cuda)
            longest = max(longest, result["seconds"])
        result["estimate_bytes"] = report["plans"].get(args.shape, {}).get(
            row.estimate + ("_ckpt" if row.checkpointing else "")) if row.estimate else None
        report["results"].append(result)
        print(f"[{index}/{len(rows)}] {row.name}: {_progress_line(result)} ({time.time() - STARTED:.0f} s)", flush=True)
        report["wall_time_s"] = round(time.time() - STARTED)
        paths = write_outputs(report, args.output)
    with open(paths[1]) as table:
        print("\n" + table.read() + f"\nwritten: {', '.join(paths)}", flush=True)
    return report


def _progress_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result['message']}"
    peak = f", peak {gib(result['peak_bytes'])}" if result["peak_bytes"] is not None else ""
    leftover = result.get("leftover_bytes") or 0
    warning = f" (WARNING: {leftover / GIB:.2f} GiB still allocated afterwards)" if leftover > 2**26 else ""
    return (f"{result['step_ms']:.1f} ms/step ({result['step_ms_min']:.1f}-{result['step_ms_max']:.1f}){peak}, "
            f"{result['trainable_params'] / 1e6:.1f}M trainable, {result['seconds']:.0f} s{warning}")


if __name__ == "__main__":
    main()
