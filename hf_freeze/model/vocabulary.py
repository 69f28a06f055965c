"""The vocabulary size a model had before `resize_token_embeddings`: what `freeze_trainable_tokens: new` counts from.

transformers keeps no record of the size before resizing (it overwrites ``config.vocab_size``), so it is read from
where it survives: a size an earlier freezer recorded on the model object, else the ``config.json`` of the checkpoint
the model was loaded from (``config._name_or_path``: a local folder, or the local hub cache; nothing is downloaded).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from torch import nn

__all__ = ["loaded_vocabulary_size", "record_vocabulary_size"]

# The attribute of the model where the first freezer records the size, so that later freezers agree with it.
_RECORDED = "_hf_freeze_base_vocabulary"


def record_vocabulary_size(model: nn.Module, size: Optional[int] = None) -> None:
    """Record the vocabulary size `freeze_trainable_tokens: new` counts from (default: the model's size now), unless
    one is recorded already. Call it before `resize_token_embeddings` on a model built with ``from_config``; a model
    loaded with ``from_pretrained`` needs nothing.

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_freeze.model import loaded_vocabulary_size, record_vocabulary_size
    >>> config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> record_vocabulary_size(model)
    >>> _ = model.resize_token_embeddings(12)
    >>> loaded_vocabulary_size(model)
    10
    ```
    """
    if size is None:
        size = model.get_input_embeddings().weight.shape[0]
    if getattr(model, _RECORDED, None) is None:
        object.__setattr__(model, _RECORDED, int(size))


def loaded_vocabulary_size(model: nn.Module) -> Optional[int]:
    """The vocabulary size before any resizing, or ``None`` when it cannot be known.

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_freeze.model.vocabulary import loaded_vocabulary_size
    >>> config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8)
    >>> print(loaded_vocabulary_size(AutoModelForCausalLM.from_config(config)))  # built, not loaded
    None
    ```
    """
    recorded = getattr(model, _RECORDED, None)
    if recorded is not None:
        return recorded
    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not source:
        return None
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        try:
            from transformers.utils import cached_file

            path = cached_file(source, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False)
        except Exception:  # not in the local cache, or not a hub name: unknown, and the caller says so
            return None
        if not path:
            return None
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return None
    size = saved.get("vocab_size", (saved.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None
