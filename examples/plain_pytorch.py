#!/usr/bin/env python
"""Layer freezing in a plain PyTorch training loop, without a Trainer: `LayerFreezer` (policy + applier).

    python examples/plain_pytorch.py --freeze_strategy bottom --freeze_layers 4 --max_steps 60

    # stop after 30 steps, then resume in a new process: the same weights as one uninterrupted run
    python examples/plain_pytorch.py --freeze_strategy lisa --stop_after 30 --checkpoint_dir outputs/plain_ckpt
    python examples/plain_pytorch.py --freeze_strategy lisa --resume_from outputs/plain_ckpt

The loop asks the policy at every step and lets the applier bring the model and the optimizer in line: a static
policy changes nothing after step 0, a schedule (a dynamic `freeze_strategy`) freezes or unfreezes layers as it
goes, an adaptive policy probes and then freezes the layers its scores pick, and the applier drops the optimizer
state of what it freezes and adds what it unfreezes. At the end the script
checks that every parameter frozen for the whole run is bit-identical to where it started.

A checkpoint holds the model, the optimizer, the freezer's state (`LayerFreezer.state_dict()`: JSON-safe, the
timeline and an adaptive policy's scores and probe in progress) and the random state; resuming rebuilds the three
in a new process (`prepare()` before the optimizer is built) and loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

from offline import offline_unless_hub_model  # noqa: E402  (examples/offline.py, next to this script)

offline_unless_hub_model()  # before transformers reads HF_HUB_OFFLINE

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser  # noqa: E402

from hf_freeze import FreezeArguments, LayerFreezer, TrainingProgress  # noqa: E402
from hf_freeze.config import freeze_fields, load_config_file, parse_args_with_config_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_classification import default_model_path, read_table  # noqa: E402
from sentiment_data import write_sentiment_data  # noqa: E402


@dataclass
class LoopArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Default: the MiniLM package's model."})
    data_dir: str = field(default="outputs/plain_pytorch", metadata={"help": "Where the generated data are written."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Sentences per step."})
    learning_rate: float = field(default=1.0e-4, metadata={"help": "AdamW learning rate."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    stop_after: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many steps in all (resumed ones included) and write a checkpoint."}
    )
    checkpoint_dir: Optional[str] = field(default=None, metadata={"help": "Write a checkpoint here when stopping."})
    resume_from: Optional[str] = field(default=None, metadata={"help": "A checkpoint_dir to resume from."})


def save_checkpoint(directory: str, step: int, model, optimizer, freezer: LayerFreezer) -> None:
    os.makedirs(directory, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
               os.path.join(directory, "training_state.pt"))
    with open(os.path.join(directory, "freezer_state.json"), "w") as handle:
        json.dump({"step": step, "freezer": freezer.state_dict()}, handle)


def load_checkpoint(directory: str, model, optimizer, freezer: LayerFreezer) -> int:
    with open(os.path.join(directory, "freezer_state.json")) as handle:
        saved = json.load(handle)
    # The freezer's state first: it refuses an optimizer state that belongs to other parameters (another policy).
    freezer.load_state_dict(saved["freezer"], step=saved["step"])
    state = torch.load(os.path.join(directory, "training_state.pt"), weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return saved["step"]


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.state_dict().items()):
        digest.update(name.encode() + parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def batches(tokenizer, texts: List[str], labels: List[str], batch_size: int, generator: torch.Generator):
    while True:
        order = torch.randperm(len(texts), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = order[start : start + batch_size]
            inputs = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=64, return_tensors="pt")
            yield inputs, torch.tensor([int(labels[i]) for i in chosen])


@torch.no_grad()
def accuracy(model, tokenizer, texts: List[str], labels: List[str]) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(texts), 128):
        inputs = tokenizer(texts[start : start + 128], padding=True, truncation=True, max_length=64, return_tensors="pt")
        predictions = model(**inputs).logits.argmax(-1)
        correct += int((predictions == torch.tensor([int(x) for x in labels[start : start + 128]])).sum())
    model.train()
    return correct / len(texts)


def loop_file(args: List[str]) -> List[str]:
    """A Trainer YAML of configs/ works here too: its freeze_* options and the training options this loop has
    (learning_rate, max_steps, seed, per_device_train_batch_size) are used, the others are the Trainer's."""
    if not args or not args[0].endswith((".yaml", ".yml")):
        return args
    values = load_config_file(args[0])
    renamed = {"per_device_train_batch_size": "batch_size"}
    known = {f.name for f in fields(LoopArguments)} | set(freeze_fields())
    kept = {renamed.get(key, key): value for key, value in values.items() if renamed.get(key, key) in known}
    ignored = sorted(key for key in values if renamed.get(key, key) not in known)
    if ignored:
        print(f"{args[0]}: using its freeze_* and loop options; ignoring {', '.join(ignored)} (Trainer options)")
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with handle:
        yaml.safe_dump(kept, handle)
    return [handle.name, *args[1:]]


def main(args: Optional[List[str]] = None) -> Dict[str, float]:
    args = loop_file(list(sys.argv[1:] if args is None else args))
    loop, policy = parse_args_with_config_file(HfArgumentParser((LoopArguments, FreezeArguments)), args)
    torch.manual_seed(loop.seed)
    path = loop.model_name_or_path or default_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_file, dev_file = write_sentiment_data(loop.data_dir)
    train_texts, train_labels = read_table(train_file, None, "label")
    dev_texts, dev_labels = read_table(dev_file, None, "label")

    freezer = LayerFreezer(model, policy)
    # Before the optimizer exists: a static policy is applied; a schedule or an adaptive policy makes trainable
    # everything it may train, so that the optimizer holds it all.
    freezer.prepare(TrainingProgress(step=0, max_steps=loop.max_steps))
    start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    ever_trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=loop.learning_rate)
    first_step = load_checkpoint(loop.resume_from, model, optimizer, freezer) if loop.resume_from else 0
    freezer.update(TrainingProgress(step=first_step, max_steps=loop.max_steps), optimizer)
    print(freezer.summary())
    print(freezer.table())

    stream = batches(tokenizer, train_texts, train_labels, loop.batch_size, torch.Generator().manual_seed(loop.seed))
    for _ in range(first_step):  # the batches the interrupted run already trained on
        next(stream)
    last_step = min(loop.max_steps, loop.stop_after or loop.max_steps)
    began = time.perf_counter()
    model.train()
    for step in range(first_step, last_step):
        change = freezer.update(TrainingProgress(step=step, max_steps=loop.max_steps), optimizer)
        for line in freezer.describe_update(change):  # an adaptive selection, a change of the frozen set
            print(line)
        ever_trained |= {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        inputs, labels = next(stream)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        freezer.before_optimizer_step()  # learning-rate factors; the gradient-norm probe of 'adaptive'
        optimizer.step()
        freezer.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began
    if last_step < loop.max_steps:
        directory = loop.checkpoint_dir or "outputs/plain_pytorch_checkpoint"
        save_checkpoint(directory, last_step, model, optimizer, freezer)
        # Counted as --stop_after and the Trainer's global_step count them: steps done, not the last step's index.
        print(f"stopped after {last_step} of {loop.max_steps} steps; checkpoint written to {directory} "
              f"(continue with --resume_from {directory}; weights {weights_digest(model)})")
        return {"stopped_after": last_step}

    moved = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, start[name])]
    untouched = [name for name in start if name not in ever_trained]
    assert not set(moved) & set(untouched), "a frozen parameter changed"
    metrics = freezer.metrics()
    result = {
        "accuracy": accuracy(model, tokenizer, dev_texts, dev_labels),
        "train_seconds": seconds,
        "trainable_params": metrics["freeze/trainable_params"],
        "total_params": metrics["freeze/total_params"],
        "frozen_parameters_unchanged": len(untouched),
        "weights": weights_digest(model),
    }
    print(
        f"accuracy {result['accuracy']:.4f} after {loop.max_steps} steps ({seconds:.1f} s); trainable parameters "
        f"{result['trainable_params']:,} of {result['total_params']:,}; {len(untouched)} frozen parameter tensors "
        f"bit-identical to the start{' (of this process)' if first_step else ''}; weights {result['weights']}"
    )
    return result


if __name__ == "__main__":
    main()
