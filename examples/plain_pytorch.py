#!/usr/bin/env python
"""Layer freezing in a plain PyTorch training loop, without a Trainer: `LayerFreezer` (policy + applier).

    python examples/plain_pytorch.py --freeze_strategy bottom --freeze_layers 4 --max_steps 60

The loop asks the policy at every step and lets the applier bring the model and the optimizer in line: a static
policy changes nothing after step 0, a schedule (a dynamic `freeze_strategy`) freezes or unfreezes layers as it
goes, an adaptive policy probes and then freezes the layers its scores pick, and the applier drops the optimizer
state of what it freezes and adds what it unfreezes. At the end the script
checks that every parameter frozen for the whole run is bit-identical to where it started.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser  # noqa: E402

from hf_freeze import FreezeArguments, LayerFreezer, TrainingProgress  # noqa: E402
from hf_freeze.config import parse_args_with_config_file  # noqa: E402
from hf_freeze.report import describe_selection  # noqa: E402

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


def main(args: Optional[List[str]] = None) -> Dict[str, float]:
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
    freezer.update(TrainingProgress(step=0, max_steps=loop.max_steps), optimizer)
    print(freezer.summary())
    print(freezer.table())

    stream = batches(tokenizer, train_texts, train_labels, loop.batch_size, torch.Generator().manual_seed(loop.seed))
    began = time.perf_counter()
    model.train()
    for step in range(loop.max_steps):
        change = freezer.update(TrainingProgress(step=step, max_steps=loop.max_steps), optimizer)
        if freezer.probe is not None and freezer.probe.last_selection is not None:  # an adaptive selection
            print(describe_selection(freezer.timeline.selections[-1], freezer.layout, freezer.probe))
        if change.changed:
            print(f"step {step}: froze {len(change.frozen)}, unfroze {len(change.unfrozen)} parameters")
        ever_trained |= {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        inputs, labels = next(stream)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        freezer.before_optimizer_step()  # learning-rate factors; the gradient-norm probe of 'adaptive'
        optimizer.step()
        freezer.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began

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
    }
    print(
        f"accuracy {result['accuracy']:.4f} after {loop.max_steps} steps ({seconds:.1f} s); trainable parameters "
        f"{result['trainable_params']:,} of {result['total_params']:,}; {len(untouched)} frozen parameter tensors "
        "bit-identical to the start"
    )
    return result


if __name__ == "__main__":
    main()
