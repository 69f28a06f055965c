"""`FreezeTrainingArguments`: the Trainer's `TrainingArguments` with the `freeze_*` fields.

Apart from `FreezeArguments` because `TrainingArguments` imports torch and much of transformers: reading the
`freeze_*` options alone (`hf-freeze plan --help`) does not need them.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from .arguments import FreezeArguments

__all__ = ["FreezeTrainingArguments"]


@dataclass
class FreezeTrainingArguments(FreezeArguments, TrainingArguments):
    """`TrainingArguments` that also carry the `freeze_*` fields, so one YAML file holds both.

    Example:

    ```python
    >>> from hf_freeze import FreezeTrainingArguments
    >>> args = FreezeTrainingArguments(output_dir="out", freeze_strategy="top", freeze_layers=2)
    >>> args.freeze_strategy, args.learning_rate
    ('top', 5e-05)
    ```
    """
