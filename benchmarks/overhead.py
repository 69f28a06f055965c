"""The callback's own cost per training step, measured directly rather than as a difference of noisy step times.

Two parts, both for the GPT-2 benchmark model with `FreezeCallback(freeze_strategy="bottom", freeze_layers=0.5)`:

* events: the Trainer's per-step callback events (`on_step_begin`, `on_pre_optimizer_step`, `on_optimizer_step`,
  `on_step_end`, and `on_log`, as if logging every step) dispatched through the Trainer's `CallbackHandler` with
  and without the FreezeCallback in it; the difference is what the callback adds per step;
* hooks: the forward hooks `FrozenPrefixHooks` installs, called with the arguments they receive in a real forward
  pass, once per step (they run in the forward pass only; checkpoint recomputation calls `forward` directly).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from configurations import build_model  # noqa: E402


def _per_call(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(5):  # best of five: the CPU is shared, the minimum is the cost itself
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def measure_overhead(seq_len: int = 128, batch_size: int = 8, repeats: int = 2000) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_freeze import FreezeCallback

    model = build_model("gpt2", seq_len)
    callback = FreezeCallback(freeze_strategy="bottom", freeze_layers=0.5)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1,
                                 log_level="warning")
        trainer = Trainer(model=model, args=args, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    model.activation_checkpointing_enable({"use_reentrant": True})
    callback.freezer.apply()  # as on_train_begin does after Trainer.train() switched checkpointing on
    handler, state, control = trainer.callback_handler, trainer.state, trainer.control
    logs = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": 0.1}
    state.global_step = 1
    state.log_history.append(dict(logs, step=1))

    def one_step():
        handler.on_step_begin(args, state, control)
        handler.on_pre_optimizer_step(args, state, control)
        handler.on_optimizer_step(args, state, control)
        handler.on_step_end(args, state, control)
        handler.on_log(args, state, control, dict(logs))

    with_callback = _per_call(one_step, repeats)
    handler.callbacks.remove(callback)
    without_callback = _per_call(one_step, repeats)
    handler.callbacks.insert(0, callback)

    # The hooks, with the arguments they get in a real forward pass (recorded by a hook that runs first).
    calls, recorders = [], []
    for handle in callback.freezer.applier.prefix_hooks._handles:
        for module in model.modules():
            if handle.id in module._forward_pre_hooks:
                function = module._forward_pre_hooks[handle.id]
                recorders.append(module.register_forward_pre_hook(
                    lambda m, a, k, _f=function: calls.append(lambda: _f(m, a, k)), with_kwargs=True, prepend=True))
            elif handle.id in module._forward_hooks:
                function = module._forward_hooks[handle.id]
                recorders.append(module.register_forward_hook(
                    lambda m, a, o, _f=function: calls.append(lambda: _f(m, a, o)), prepend=True))
    model.train()
    ids = torch.randint(1, model.config.vocab_size, (batch_size, seq_len))
    model(ids, labels=ids).loss.backward()
    for recorder in recorders:
        recorder.remove()

    def run_hooks():
        for call in calls:
            call()

    hooks_per_step = _per_call(run_hooks, repeats // 4)
    return {
        "events_with_callback_s": with_callback,
        "events_without_callback_s": without_callback,
        "callback_events_s": with_callback - without_callback,
        "prefix_hooks_s": hooks_per_step,
        "prefix_hook_calls": len(calls),
        "callback_per_step_s": with_callback - without_callback + hooks_per_step,
    }


def run_overhead(options: dict) -> dict:
    result = measure_overhead(options.get("seq_len", 128), options.get("batch_size", 8))
    with open(options["out"], "w") as handle:
        json.dump(result, handle)
    return result


if __name__ == "__main__":
    print(json.dumps(measure_overhead(), indent=2))
