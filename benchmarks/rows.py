"""Training only new tokens' rows: hf_freeze's exact rows against the other ways to do it, on one machine, in one run.

The job: a tiny Llama whose vocabulary-to-layers ratio is Llama-3-8B's (128,256 tokens over 32 layers, about 4,000
a layer: here 8,016 tokens over 2 layers, hidden size 64 and 256, untied LM head), resized by 16 new tokens; only the new
tokens' rows of the input embeddings and of the LM head should train, everything else stays frozen; AdamW with
weight decay 0.1, gradient clipping at 1.0. Four ways:

* ``whole``: the two embedding matrices wholly trainable (the rest frozen): what one does without row freezing;
* ``masking``: as ``whole``, with a gradient hook zeroing the gradient of the frozen rows, as axolotl does for
  `unfrozen_parameters: ...$[8000:]` (its documentation says weight decay still moves the "frozen" rows, and the
  optimizer holds state for the whole matrices);
* ``peft``: PEFT's TrainableTokens (`trainable_token_indices`) on `embed_tokens` and `lm_head`;
* ``hf_freeze``: `freeze_trainable_tokens` (with `freeze_patterns: ['.*']` freezing the rest).

Reported per way, as ratios to ``whole``: the median step time (CPU process time, one thread; `--rounds` rounds,
the ways alternating within each round, `--steps` steps per way and round, medians over all), the peak resident
memory added by training (Linux's VmHWM, reset after the model is built; each way in its own process, alternating,
the lower of `--memory-rounds`), the bytes of
gradients and optimizer state after a step, and whether any frozen row changed.

    python benchmarks/rows.py                     # hidden 64 and 256: about 15 minutes here
    python benchmarks/rows.py --markdown benchmarks/results/rows.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WAYS = ("whole", "masking", "peft", "hf_freeze")
BASE_VOCABULARY, NEW_TOKENS, LAYERS = 8000, 16, 2
BATCH, LENGTH = 4, 64


def build(way: str, hidden: int):
    """The model and optimizer of one way, ready to train; the tensors to check for frozen rows that moved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * hidden, vocab_size=BASE_VOCABULARY, max_position_embeddings=LENGTH, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.resize_token_embeddings(BASE_VOCABULARY + NEW_TOKENS, mean_resizing=False)
    new = list(range(BASE_VOCABULARY, BASE_VOCABULARY + NEW_TOKENS))
    embeddings = [model.model.embed_tokens.weight, model.lm_head.weight]
    if way in ("whole", "masking"):
        model.requires_grad_(False)
        for weight in embeddings:
            weight.requires_grad_(True)
            if way == "masking":
                weight.register_hook(_zero_frozen_rows)
    elif way == "peft":
        from peft import TrainableTokensConfig, get_peft_model

        model = get_peft_model(model, TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=new))
    else:
        from hf_freeze import LayerFreezer

        LayerFreezer(model, freeze_strategy="pattern", freeze_patterns=[".*"], freeze_trainable_tokens=new,
                     freeze_health_check="off").apply()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.1)
    originals = [weight.detach()[:BASE_VOCABULARY].clone() for weight in embeddings]
    return model, optimizer, parameters, list(zip(embeddings, originals))


def _zero_frozen_rows(gradient) -> None:
    # axolotl's hook: the gradient of every row outside the trainable ranges is zeroed in place.
    gradient[:BASE_VOCABULARY].zero_()


def batches(count: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        ids = torch.randint(0, BASE_VOCABULARY, (BATCH, LENGTH), generator=generator)
        new = torch.rand(BATCH, LENGTH, generator=generator) < 0.05  # one token in twenty is a new one
        ids[new] = torch.randint(BASE_VOCABULARY, BASE_VOCABULARY + NEW_TOKENS, (int(new.sum()),), generator=generator)
        yield ids


def step(model, optimizer, parameters, ids) -> None:
    import torch

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(optimizer, parameters) -> int:
    import torch

    held = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return held + sum(p.numel() * p.element_size() for p in parameters)  # a gradient for each, at its peak


def _status(key: str) -> int:
    """A field of /proc/self/status, in KiB."""
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(key + ":")).split()[1])


def _reset_peak() -> int:
    """Start the peak resident memory afresh (Linux: /proc/self/clear_refs), after giving freed memory back, so that
    building the model does not count; returns the resident memory now."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def measure_memory(way: str, steps: int, hidden: int) -> dict:
    """In a fresh process: the resident memory training adds at its peak, and what the optimizer holds."""
    import torch

    torch.set_num_threads(1)
    model, optimizer, parameters, watched = build(way, hidden)
    data = list(batches(steps))
    before = _reset_peak()
    for ids in data:
        step(model, optimizer, parameters, ids)
    peak = _status("VmHWM")
    moved = any(not torch.equal(weight.detach()[:BASE_VOCABULARY], original) for weight, original in watched)
    return {"peak_kib": peak - before, "state_bytes": state_bytes(optimizer, parameters), "frozen_rows_moved": moved}


def measure_sizes(hidden: int) -> dict:
    """Bytes on disk: the whole checkpoint (`save_pretrained`) against the file of just the trained rows."""
    import tempfile

    from hf_freeze import LayerFreezer

    model, optimizer, parameters, _ = build("whole", hidden)
    new = list(range(BASE_VOCABULARY, BASE_VOCABULARY + NEW_TOKENS))
    model.requires_grad_(True)
    freezer = LayerFreezer(model, freeze_strategy="pattern", freeze_patterns=[".*"], freeze_trainable_tokens=new,
                           freeze_health_check="off")
    freezer.apply()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        checkpoint = sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))
        rows = freezer.save_rows(os.path.join(directory, "rows.safetensors"))
    return {"checkpoint": checkpoint, "rows": rows}


def measure_times(rounds: int, steps: int, hidden: int) -> dict:
    import torch

    torch.set_num_threads(1)
    built = {way: build(way, hidden) for way in WAYS}
    data = list(batches(steps))
    times = {way: [] for way in WAYS}
    for way in WAYS:  # one warm-up step each
        step(*built[way][:3], data[0])
    for _ in range(rounds):
        for way in WAYS:
            model, optimizer, parameters, _ = built[way]
            for ids in data:
                start = time.process_time()
                step(model, optimizer, parameters, ids)
                times[way].append(time.process_time() - start)
    return {way: statistics.median(values) for way, values in times.items()}


def main() -> None:
    flags = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    flags.add_argument("--rounds", type=int, default=3)
    flags.add_argument("--steps", type=int, default=8)
    flags.add_argument("--memory-rounds", type=int, default=2, help="processes per way for the peak memory")
    flags.add_argument("--hidden", type=int, nargs="+", default=[64, 256], help="hidden sizes, one table each")
    flags.add_argument("--markdown", help="also write the tables to this file")
    flags.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one way's memory, in its own process
    options = flags.parse_args()
    if options.memory_of:
        print(json.dumps(measure_memory(options.memory_of, options.steps, options.hidden[0])))
        return
    text = "\n\n".join(table(options, hidden) for hidden in options.hidden)
    print(text)
    if options.markdown:
        command = "python benchmarks/rows.py " + " ".join(arg for arg in sys.argv[1:])
        with open(options.markdown, "w") as handle:
            handle.write(f"# Training only new tokens' rows\n\nMeasured with `{command}`.\n\n{text}\n")


def table(options, hidden: int) -> str:
    memory = {way: None for way in WAYS}
    for _ in range(options.memory_rounds):
        for way in WAYS:
            command = [sys.executable, __file__, "--memory-of", way, "--steps", str(options.steps), "--hidden", str(hidden)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if memory[way] is None or result["peak_kib"] < memory[way]["peak_kib"]:
                memory[way] = result
    times = measure_times(options.rounds, options.steps, hidden)
    sizes = measure_sizes(hidden)
    lines = [
        f"Tiny Llama, {BASE_VOCABULARY + NEW_TOKENS:,} tokens ({NEW_TOKENS} new) x {LAYERS} layers, hidden {hidden}, "
        f"untied head; batch {BATCH} x {LENGTH}; AdamW, weight decay 0.1, clipping 1.0; CPU, one thread; "
        f"{options.rounds} rounds x {options.steps} steps.",
        "",
        "| way | step time | vs whole | peak memory added | vs whole | gradients + optimizer state | vs whole | frozen rows moved |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for way in WAYS:
        lines.append(
            f"| {way} | {times[way] * 1000:.1f} ms | {times[way] / times['whole']:.2f} | "
            f"{memory[way]['peak_kib'] / 1024:.1f} MiB | {memory[way]['peak_kib'] / memory['whole']['peak_kib']:.2f} | "
            f"{memory[way]['state_bytes'] / 1024:,.1f} KiB | {memory[way]['state_bytes'] / memory['whole']['state_bytes']:.4f} | "
            f"{'yes' if memory[way]['frozen_rows_moved'] else 'no'} |"
        )
    lines += [
        "",
        f"On disk: the whole checkpoint (`save_pretrained`, config included) {sizes['checkpoint'] / 1024:,.1f} KiB; the "
        f"trained rows alone (`save_rows`, with their token ids) {sizes['rows'] / 1024:,.1f} KiB "
        f"({sizes['rows'] / sizes['checkpoint']:.4f} of it).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
