"""What the training health check costs, next to the training step it checks, measured in the same run.

The check runs once after the first optimizer step and once after every change of the frozen set: it copies a fixed
sample of 16 entries of every frozen parameter when it is armed, lists the trainable parameters without a gradient
before the optimizer step, and compares the samples after it. Both parts are timed directly (CPU time of this
process with one thread, best of repeated blocks, because the machine is shared) and divided by a training step
(forward, backward, AdamW) of the same model, timed the same way and alternated with it.

    python benchmarks/health_check.py            # GPT-2 8 x 256 and Llama 8 x 256, bottom 50%, batch 8 x 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from configurations import build_model  # noqa: E402


def _cpu(function, repeats: int = 1) -> float:
    start = time.process_time()
    for _ in range(repeats):
        function()
    return (time.process_time() - start) / repeats


def measure(name: str, seq_len: int, batch_size: int, rounds: int) -> dict:
    import torch

    from hf_freeze import LayerFreezer

    model = build_model(name, seq_len)
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=0.5)
    freezer.apply()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def gradients():
        model(ids, labels=ids).loss.backward()

    health = freezer.health

    def checked_cycle():  # arm, then the two checks around an optimizer step (the step itself is not timed here)
        health.arm()
        health.before_optimizer_step()
        health.after_optimizer_step()

    step()  # warm-up
    gradients()  # the check reads the gradients as they are before the optimizer step
    steps, checks = [], []
    for _ in range(rounds):  # alternate: a burst of load from other jobs hits both
        steps.append(_cpu(step))
        gradients()
        checks.append(_cpu(checked_cycle, 20))
    step_time, check_time = statistics.median(steps), min(checks)
    return {
        "model": name, "step_s": step_time, "check_s": check_time, "ratio": check_time / step_time,
        "frozen_tensors": len(freezer.frozen_names()), "trainable_tensors": len(freezer.applier.parameters) - len(freezer.frozen_names()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print("| model | frozen / trainable tensors | training step | health check (armed step) | ratio |")
    print("|---|---|---|---|---|")
    for name in args.models:
        row = measure(name, args.seq_len, args.batch_size, args.rounds)
        print(f"| {row['model']} 8 x 256 | {row['frozen_tensors']} / {row['trainable_tensors']} | {row['step_s'] * 1e3:.0f} ms "
              f"| {row['check_s'] * 1e3:.3f} ms | {100 * row['ratio']:.3f}% |")


if __name__ == "__main__":
    main()
