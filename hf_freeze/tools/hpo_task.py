"""The task `hf-freeze hpo` searches on: sequence classification from a CSV/TSV file with a header line (the setting
of `examples/run_classification.py`), its model and data options read from the training YAML next to the training
and `freeze_*` ones. From Python, `run_search` takes any model and datasets."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import FreezeConfigError, invalid

__all__ = ["HpoTaskArguments", "build_classification_task"]


@dataclass
class HpoTaskArguments:
    """Model and data of the `hf-freeze hpo` command, given in the training YAML.

    Example:

    ```python
    >>> from hf_freeze.tools.hpo_task import HpoTaskArguments
    >>> HpoTaskArguments(model_name_or_path="path/to/model", train_file="train.tsv").max_seq_length
    128
    ```
    """

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local model folder (with its tokenizer). Required."})
    train_file: Optional[str] = field(default=None, metadata={"help": "A .csv or .tsv file with a header line."})
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "A .csv or .tsv file like train_file; every rung is evaluated on it."})
    text_column: Optional[str] = field(
        default=None, metadata={"help": "Column with the text. Default: 'sentence', 'text', else the first other column."})
    label_column: str = field(default="label", metadata={"help": "Column with the label (integers or names)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer texts are truncated to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N validation examples."})
    from_scratch: bool = field(
        default=False, metadata={"help": "Train from a random initialisation of the model's config (the Frozen Layers "
                                 "paper's setting) instead of its pretrained weights."})


def _read_table(path: str, text_column: Optional[str], label_column: str) -> Tuple[List[str], List[str]]:
    tab = path.endswith(".tsv")
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            # GLUE's TSVs are not quoted: a sentence may start with a quotation mark.
            reader = csv.DictReader(handle, delimiter="\t" if tab else ",",
                                    quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL)
            rows, columns = list(reader), reader.fieldnames or []
    except OSError as error:
        raise FreezeConfigError(f"Cannot read {path!r}: {error.strerror}.", fields=["train_file"]) from None
    if label_column not in columns:
        raise invalid("label_column", label_column, f"a column of {path} ({columns})")
    if text_column is None:
        others = [name for name in columns if name != label_column]
        text_column = next((name for name in ("sentence", "text") if name in others), others[0] if others else None)
    if text_column not in columns:
        raise invalid("text_column", text_column, f"a column of {path} ({columns})")
    return [row[text_column] for row in rows], [row[label_column] for row in rows]


class _Encoded:
    def __init__(self, items: List[Dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.items[index]


def build_classification_task(task: HpoTaskArguments) -> Tuple[Callable[[], Any], Any, Any, Dict[str, Any]]:
    """`model_init`, the training and validation datasets, and the Trainer keywords (collator, accuracy) of a
    classification task, for `run_search`."""
    import numpy as np
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    for name in ("model_name_or_path", "train_file", "validation_file"):
        if getattr(task, name) is None:
            raise invalid(name, None, "set in the training YAML (or on the command line)")
    train = _read_table(task.train_file, task.text_column, task.label_column)
    validation = _read_table(task.validation_file, task.text_column, task.label_column)
    train = tuple(column[: task.max_train_samples] for column in train)
    validation = tuple(column[: task.max_eval_samples] for column in validation)
    names = sorted(set(train[1]) | set(validation[1]))
    numeric = all(name.lstrip("-").isdigit() for name in names)
    label_ids = {name: int(name) if numeric else index for index, name in enumerate(names)}
    num_labels = max(label_ids.values()) + 1
    tokenizer = AutoTokenizer.from_pretrained(task.model_name_or_path)

    def encode(texts, labels):
        encodings = tokenizer(list(texts), truncation=True, max_length=task.max_seq_length)
        return _Encoded([{**{key: values[index] for key, values in encodings.items()}, "labels": label_ids[labels[index]]}
                         for index in range(len(texts))])

    def model_init():
        if task.from_scratch:
            config = AutoConfig.from_pretrained(task.model_name_or_path, num_labels=num_labels)
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForSequenceClassification.from_pretrained(task.model_name_or_path, num_labels=num_labels)

    def accuracy(prediction) -> Dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    extras = {"data_collator": DataCollatorWithPadding(tokenizer), "compute_metrics": accuracy}
    return model_init, encode(*train), encode(*validation), extras
