"""What `freeze_cache_prefix` saves: per-epoch time of epochs 2+ with the frozen prefix read from the cache, against
full fine-tuning and against the same policy without the cache, measured in one run.

Every configuration is a model of its own, trained by a plain loop (AdamW, shuffled batches, padding to the longest
sentence of each batch). After one epoch each (the cached ones fill their cache there), the configurations take
turns epoch by epoch, in an order that rotates every round, so that load from other processes on this shared machine
falls on all of them alike; one torch thread, CPU time of this process. Ratios are of medians.

The FLOP limits (per layer: forward 1, backward 2; a frozen layer costs its forward, a cached one nothing):
cached / full = 1 - f, cached / uncached bottom-f = 3 (1 - f) / (3 - 2 f). "Saving reached" is the fraction of the
ideal saving measured: (1 - measured ratio) / (1 - limit).

    python benchmarks/prefix_cache.py                         # MiniLM on SST-2 and GPT-2 8 x 256, 25/50/75%
    python benchmarks/prefix_cache.py --models minilm --examples 256 --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from configurations import build_model, minilm_path  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75)


def sst2_batches(path: Path, examples: int, batch_size: int, max_length: int):
    """The first ``examples`` training sentences, tokenized, in batches padded to their longest sentence."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    with open(path) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:examples]
    encoded = [tokenizer(row["sentence"], truncation=True, max_length=max_length)["input_ids"] for row in rows]
    labels = [int(row["label"]) for row in rows]
    return [(torch.tensor(ids), label) for ids, label in zip(encoded, labels)], tokenizer.pad_token_id


def lm_examples(examples: int, seq_len: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(1, vocab, (seq_len,), generator=generator), None) for _ in range(examples)], 0


def collate(examples, pad_id: int, causal: bool):
    import torch

    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)], mask[row, : len(ids)] = ids, 1
    labels = input_ids.masked_fill(mask == 0, -100) if causal else torch.tensor([label for _, label in examples])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class Run:
    """One configuration: its own model, optimizer and freezer; `epoch()` trains one shuffled epoch."""

    def __init__(self, label, model_name, seq_len, data, pad_id, batch_size, fraction, cache, cache_dtype=None):
        import torch

        from hf_freeze import LayerFreezer

        self.label, self.fraction, self.cache = label, fraction, cache
        self.model = build_model(model_name, seq_len)
        if model_name == "gpt2":
            self.model.config.embd_pdrop = 0.0  # the dropout after GPT-2's embeddings would make the prefix random
            self.model.transformer.drop.p = 0.0
        self.freezer = None
        if fraction:
            options = dict(freeze_strategy="bottom", freeze_layers=fraction, freeze_frozen_modules_eval=True)
            if cache:
                options.update(freeze_cache_prefix=True, freeze_cache_dir=tempfile.mkdtemp(prefix="prefix_cache_bench_"))
                if cache_dtype:
                    options["freeze_cache_dtype"] = cache_dtype
            self.freezer = LayerFreezer(self.model, **options)
            self.freezer.apply()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.data, self.pad_id, self.batch_size = data, pad_id, batch_size
        self.causal = model_name == "gpt2"
        self.epochs = 0
        self.times = []

    def epoch(self) -> float:
        import torch

        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.epochs)).tolist()
        # The same dropout masks in every configuration's epoch e: the cached and uncached runs stay comparable.
        torch.manual_seed(1000 + self.epochs)
        self.model.train()
        start = time.process_time()
        for begin in range(0, len(order), self.batch_size):
            batch = collate([self.data[i] for i in order[begin: begin + self.batch_size]], self.pad_id, self.causal)
            self.model(**batch).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.process_time() - start
        self.epochs += 1
        return elapsed

    def accuracy(self, data, pad_id) -> float:
        import torch

        self.model.eval()
        correct = 0
        with torch.no_grad():
            for begin in range(0, len(data), 64):
                batch = collate(data[begin: begin + 64], pad_id, causal=False)
                correct += int((self.model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        return correct / len(data)


def measure(model_name: str, args) -> dict:
    import torch

    if model_name == "minilm":
        data, pad_id = sst2_batches(Path(args.data) / "train.tsv", args.examples, args.batch_size, args.max_length)
        seq_len = args.max_length
    else:
        seq_len = args.seq_len
        data, pad_id = lm_examples(args.lm_examples, seq_len, build_model(model_name, seq_len).config.vocab_size)
    batch = args.batch_size if model_name == "minilm" else args.lm_batch_size
    runs = [Run("full", model_name, seq_len, data, pad_id, batch, 0, False)]
    for fraction in FRACTIONS:
        runs.append(Run(f"bottom-{fraction:.0%}", model_name, seq_len, data, pad_id, batch, fraction, False))
        runs.append(Run(f"bottom-{fraction:.0%} cached", model_name, seq_len, data, pad_id, batch, fraction, True))
    if model_name == "minilm":
        runs.append(Run("bottom-50% cached fp16", model_name, seq_len, data, pad_id, batch, 0.5, True, "float16"))
    first = {run.label: run.epoch() for run in runs}  # the cached runs fill their cache here
    for round_index in range(args.rounds):
        shift = round_index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.times.append(run.epoch())
    result = {"model": model_name, "examples": len(data), "runs": {}}
    for run in runs:
        entry = {"first_epoch": first[run.label], "epoch": statistics.median(run.times), "fraction": run.fraction,
                 "cache": run.cache}
        if run.freezer is not None and run.freezer.prefix_cache is not None:
            stats = run.freezer.prefix_cache.stats()
            entry.update(cache_mib=(stats["memory_bytes"] + stats["disk_bytes"]) / 2**20, fill_seconds=stats["fill_seconds"],
                         examples_stored=stats["examples"])
        result["runs"][run.label] = entry
    if model_name == "minilm":
        dev, pad_id = sst2_batches(Path(args.data) / "dev.tsv", 10**6, 64, args.max_length)
        for label in ("bottom-50%", "bottom-50% cached", "bottom-50% cached fp16"):
            run = next(r for r in runs if r.label == label)
            result["runs"][label]["dev_accuracy"] = run.accuracy(dev, pad_id)
    for run in runs:
        if run.freezer is not None:
            run.freezer.close()
    del torch
    return result


def table(result: dict) -> str:
    runs = result["runs"]
    full = runs["full"]["epoch"]
    lines = [
        "| configuration | epoch 2+ (CPU s) | vs full | limit | vs uncached | limit | saving reached | first epoch (CPU s) | cache MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in runs.items():
        f = entry["fraction"]
        vs_full = entry["epoch"] / full
        row = [label, f"{entry['epoch']:.2f}", f"{vs_full:.3f}"]
        if entry["cache"]:
            uncached = runs[f"bottom-{f:.0%}"]["epoch"]
            limit_full, limit_uncached = 1 - f, 3 * (1 - f) / (3 - 2 * f)
            vs_uncached = entry["epoch"] / uncached
            reached = (1 - vs_uncached) / (1 - limit_uncached)
            row += [f"{limit_full:.3f}", f"{vs_uncached:.3f}", f"{limit_uncached:.3f}", f"{reached:.0%}",
                    f"{entry['first_epoch']:.2f}", f"{entry['cache_mib']:.1f}"]
        elif f:
            row += [f"{(3 - 2 * f) / 3:.3f}", "", "", "", f"{entry['first_epoch']:.2f}", ""]
        else:
            row += ["1", "", "", "", f"{entry['first_epoch']:.2f}", ""]
        lines.append("| " + " | ".join(row) + " |")
    accuracy = {label: entry["dev_accuracy"] for label, entry in runs.items() if "dev_accuracy" in entry}
    if accuracy:
        lines.append("")
        lines.append("SST-2 dev accuracy after the run (872 sentences): " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "gpt2"], choices=["minilm", "gpt2"])
    parser.add_argument("--examples", type=int, default=1024, help="SST-2 sentences for MiniLM")
    parser.add_argument("--lm_examples", type=int, default=128, help="random sequences of --seq_len tokens for GPT-2")
    parser.add_argument("--batch_size", type=int, default=32, help="MiniLM batch")
    parser.add_argument("--lm_batch_size", type=int, default=8, help="GPT-2 batch")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="measured epochs per configuration, after the first")
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    for model_name in args.models:
        result = measure(model_name, args)
        batch = args.batch_size if model_name == "minilm" else args.lm_batch_size
        print(f"\n## {model_name}: {result['examples']} examples, batch {batch}, {args.rounds} measured epochs each\n")
        print(table(result), flush=True)


if __name__ == "__main__":
    main()
