"""The reference model of DPO: hf_freeze's `reference_model` against a full copy and TRL's `create_reference_model`.

One process, one model setting (the Llama-style 8 x 256 of `configurations.py`, vocabulary 2048, untied head), the
bottom 75% frozen (`freeze_strategy: bottom`, `freeze_layers: 0.75`: embeddings and layers 0-5). Four references,
each with its own policy (same initial weights) and its own TRL `DPOTrainer`:

* ``full copy``: TRL's ``create_reference_model(model)``, a deep copy (what ``ref_model=None`` loads);
* ``TRL shared layers``: ``create_reference_model(model, num_shared_layers=6)``: shares the frozen bottom;
* ``hf_freeze, no shared computation``: ``reference_model(model, share_computation=False)``;
* ``hf_freeze``: ``reference_model(model)``: also reuses the policy's output of the frozen prefix.

Measured:

* the DPO step: ``DPOTrainer.compute_loss`` (policy forward on the chosen and rejected sequences, reference forward,
  loss), backward, AdamW step, without the Trainer's callbacks and logging; and the reference's forward alone, right
  after a policy forward on the same batch (as in a DPO step);
* the reference's memory: bytes of its own parameters and buffers (storage it does not share with its policy),
  against a full copy; on a GPU also the allocated bytes it adds, and the peak while it is built.

Measurements alternate between the four (one step of each, in a rotating order, every round), and each ratio is the
median over rounds of the ratio to the full copy measured in the same round. On CPU a step's time is the process's
CPU time with one thread (the CPUs here are shared with other jobs); on a GPU, synchronized wall time. fp32, dropout
off (DPOConfig's `disable_dropout`), no activation checkpointing.

    python benchmarks/reference_model.py                 # CPU here: about 2 minutes
    python benchmarks/reference_model.py --device cuda --rounds 30
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from configurations import VOCAB, build_model  # noqa: E402

VARIANTS = ["full copy", "TRL shared layers", "hf_freeze, no shared computation", "hf_freeze"]
FROZEN = 0.75


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer built in memory: `vocab_size` ids, so the model keeps the benchmark's vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[EOS]"]
    tokens = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def preference_data(count: int, seq_len: int, vocab_size: int):
    """Random word sequences: a prompt of 3/4 of `seq_len`, completions filling the rest (with the EOS TRL adds)."""
    import random

    from datasets import Dataset

    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(n))  # noqa: E731
    prompt, completion = (3 * seq_len) // 4, seq_len - (3 * seq_len) // 4 - 1
    return Dataset.from_dict({
        "prompt": [words(prompt) for _ in range(count)],
        "chosen": [" " + words(completion) for _ in range(count)],
        "rejected": [" " + words(completion) for _ in range(count)],
    })


def own_bytes(reference, policy) -> int:
    """Bytes of the reference's parameters and buffers that do not share storage with the policy."""
    policy_storage = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    tensors = {id(t): t for t in list(reference.parameters()) + list(reference.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors if t.untyped_storage().data_ptr() not in policy_storage)


def build_reference(variant: str, policy, device):
    import torch
    from hf_freeze.reference import reference_model

    try:
        from trl.experimental.utils import create_reference_model
    except ImportError:  # older TRL
        from trl import create_reference_model

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    if variant == "full copy":
        reference = create_reference_model(policy)
    elif variant == "TRL shared layers":
        layers = len(policy.model.layers)
        reference = create_reference_model(policy, num_shared_layers=round(FROZEN * layers))
    else:
        reference = reference_model(policy, share_computation=variant == "hf_freeze")
    memory = {"own_bytes": own_bytes(reference, policy)}
    if cuda:
        memory.update(allocated=torch.cuda.memory_allocated() - before, peak=torch.cuda.max_memory_allocated() - before)
    return reference, memory


def setup(variant: str, args, device, data, tokenizer, output_dir: str):
    from trl import DPOConfig, DPOTrainer

    from hf_freeze import LayerFreezer

    policy = build_model("llama", args.seq_len).to(device)
    LayerFreezer(policy, freeze_strategy="bottom", freeze_layers=FROZEN).apply()
    reference, memory = build_reference(variant, policy, device)
    config = DPOConfig(
        output_dir=os.path.join(output_dir, variant.replace(" ", "_").replace(",", "")), report_to="none",
        per_device_train_batch_size=args.batch_size, max_length=args.seq_len + 8, bf16=False,
        gradient_checkpointing=False, use_cpu=device.type == "cpu", disable_tqdm=True, save_strategy="no",
        dataloader_num_workers=0, learning_rate=1e-5, seed=0,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=data,
                         processing_class=tokenizer)
    trainer.create_optimizer()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    tensors = list(policy.parameters()) + list(policy.buffers())
    return {"trainer": trainer, "policy": policy, "reference": trainer.ref_model, "batch": batch, "memory": memory,
            "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in policy.parameters()),
            "full_copy_bytes": sum(t.numel() * t.element_size() for t in tensors)}


def make_clock(device):
    import torch

    if device.type == "cuda":
        def clock():
            torch.cuda.synchronize()
            return time.perf_counter()
        return clock
    return time.process_time


def dpo_step(run) -> None:
    trainer, policy = run["trainer"], run["policy"]
    policy.train()
    trainer.compute_loss(policy, run["batch"]).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def reference_forward(run, clock) -> float:
    """The reference's forward, right after the policy's forward on the same inputs (as in `compute_loss`)."""
    import torch

    batch = run["batch"]
    inputs = {key: value for key, value in batch.items() if key not in {"completion_mask", "ref_chosen_logps",
                                                                        "ref_rejected_logps"}}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        run["policy"].train()(**inputs, labels=labels, use_cache=False, fused_lm_head=True)
        start = clock()
        run["reference"](**inputs, labels=labels, use_cache=False, fused_lm_head=True)
        return clock() - start


def measure(args) -> dict:
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = make_clock(device)
    tokenizer = word_tokenizer(VOCAB)
    data = preference_data(max(args.batch_size, 8), args.seq_len, VOCAB)
    with tempfile.TemporaryDirectory() as output_dir:
        runs = {variant: setup(variant, args, device, data, tokenizer, output_dir) for variant in VARIANTS}
        for run in runs.values():
            for _ in range(args.warmup):
                dpo_step(run)
        steps = {variant: [] for variant in VARIANTS}
        forwards = {variant: [] for variant in VARIANTS}
        for round_index in range(args.rounds):
            order = VARIANTS[round_index % len(VARIANTS):] + VARIANTS[: round_index % len(VARIANTS)]
            for variant in order:
                start = clock()
                dpo_step(runs[variant])
                steps[variant].append(clock() - start)
            for variant in order:
                forwards[variant].append(reference_forward(runs[variant], clock))
    from hf_freeze.reference import reference_state

    shared = {variant: getattr(reference_state(runs[variant]["reference"]), "shared_forwards", 0)
              for variant in VARIANTS}
    return {"device": device, "runs": runs, "steps": steps, "forwards": forwards, "shared_forwards": shared}


def ratio(values, baseline) -> float:
    return statistics.median(value / base for value, base in zip(values, baseline))


def report(result: dict, args, seconds: float) -> str:
    import torch
    import transformers
    import trl

    device, runs, steps, forwards = result["device"], result["runs"], result["steps"], result["forwards"]
    first = runs[VARIANTS[0]]
    where = (torch.cuda.get_device_name(device) + ", synchronized wall time" if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}), CPU time, 1 thread")
    lines = [
        f"Llama style 8 x 256 (vocab {VOCAB}, untied head), bottom {FROZEN:.0%} frozen (embeddings and layers 0-5): "
        f"{first['trainable']:,} of {first['total']:,} parameters train. DPO batch {args.batch_size} pairs "
        f"({2 * args.batch_size} sequences) x {args.seq_len} tokens, fp32, {args.rounds} rounds after {args.warmup} "
        f"warm-up steps. {where}. torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}. Command: `python benchmarks/reference_model.py"
        f"{' --device cuda' if device.type == 'cuda' else ''}` ({seconds:.0f} s).",
        "",
        "| reference | own memory | vs full copy | DPO step (median) | vs full copy | reference forward | vs full copy "
        "| shared forwards |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        run = runs[variant]
        memory = run["memory"]["own_bytes"]
        lines.append(
            f"| {variant} | {memory / 2**20:.1f} MiB | {memory / first['full_copy_bytes']:.3f} | "
            f"{1000 * statistics.median(steps[variant]):.0f} ms | {ratio(steps[variant], steps[VARIANTS[0]]):.3f} | "
            f"{1000 * statistics.median(forwards[variant]):.0f} ms | "
            f"{ratio(forwards[variant], forwards[VARIANTS[0]]):.3f} | "
            f"{result['shared_forwards'][variant]} |"
        )
    if device.type == "cuda":
        lines += ["", "| reference | allocated by the reference | peak while building it |", "|---|---|---|"]
        for variant in VARIANTS:
            memory = runs[variant]["memory"]
            lines.append(f"| {variant} | {memory['allocated'] / 2**20:.1f} MiB | {memory['peak'] / 2**20:.1f} MiB |")
    lines += [
        "",
        f"A full copy holds {first['full_copy_bytes'] / 2**20:.1f} MiB (parameters and buffers). Ratios are medians "
        "over rounds of the ratio to the full copy in the same round. 'shared forwards' counts the reference's "
        "forwards that reused the policy's frozen-prefix output (hf_freeze only; the others always run in full).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "reference_model.md"),
                        help="where to write the table ('' to print only)")
    args = parser.parse_args(argv)
    import datasets

    from hf_freeze.logs import get_logger

    datasets.disable_progress_bars()
    get_logger("hf_freeze").setLevel("WARNING")  # the reference's one-line summary, four times
    start = time.perf_counter()
    result = measure(args)
    text = report(result, args, time.perf_counter() - start)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
