"""What `gpu_shapes.py` measures: the model shapes (LlamaConfig arguments) and the configurations, in the order they run.

Kept apart from the measuring, as `configurations.py` is for `run.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# LlamaConfig keyword arguments. The 8B shape is only planned (on the meta device), never trained here.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=2048),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         max_position_embeddings=131072),
    # 4 layers, so that bottom 25%, 50% and 75% freeze 1, 2 and 3 of them.
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 vocab_size=1000, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=64),
}
PLANNED_SHAPE = "llama-3.1-8b"


@dataclass(frozen=True)
class Row:
    """One configuration of the table.

    Args:
        name: What `--configs` selects.
        label: The table's text.
        freeze: Options of a `FreezeCallback`, or None for none.
        by_hand: Freeze what hf_freeze's bottom 50% freezes with `requires_grad_(False)` alone (no hf_freeze).
        frozen_dtype: With `by_hand`: store the frozen parameters in this dtype.
        lora_rank: Wrap the model in a PEFT LoRA adapter of this rank on every linear layer.
        liger: `use_liger_kernel=True` in the TrainingArguments.
        checkpointing: `activation_checkpointing=True` (transformers' default, non-reentrant).
        estimate: The plan estimate that describes this row (`plan_estimates`' key without "_ckpt"), if any.
    """

    name: str
    label: str
    freeze: Optional[dict] = None
    by_hand: bool = False
    frozen_dtype: Optional[str] = None
    lora_rank: Optional[int] = None
    liger: bool = False
    checkpointing: bool = False
    estimate: Optional[str] = None

    @property
    def baseline(self) -> str:
        return "full_ckpt" if self.checkpointing else "full"


def _bottom(fraction: float, **options) -> dict:
    return dict(freeze_strategy="bottom", freeze_layers=fraction, **options)


def _adaptive(fraction: float, **options) -> dict:
    # A probe of 3 steps: inside the 3 warm-up steps of the GPU run, so that the measured steps are the selection's
    # (the peak memory counts the probe: it is taken over the whole run).
    return dict(freeze_strategy="adaptive", freeze_layers=fraction, freeze_probe_steps=3, **options)


UNCHUNKED = dict(freeze_chunked_loss=False)
BF16_FROZEN = dict(freeze_frozen_dtype="bfloat16")  # a newer hf_freeze option; an older one refuses it (skipped)
# In the order they run: what the table turns on first, so that a cut-short run has it.
ROWS = {
    row.name: row
    for row in [
        Row("full", "full fine-tuning", estimate="full"),
        Row("bottom50", "bottom 50%, hf_freeze defaults", _bottom(0.5), estimate="bottom50_unchunked"),
        Row("bottom50_unchunked", "bottom 50%, `freeze_chunked_loss=False`", _bottom(0.5, **UNCHUNKED),
            estimate="bottom50_unchunked"),
        Row("bottom50_hand", "bottom 50% by hand (requires_grad, no hf_freeze)", by_hand=True, estimate="bottom50_unchunked"),
        Row("bottom50_lever", "bottom 50%, `freeze_chunked_loss=True` (Liger's fused loss)", _bottom(0.5, freeze_chunked_loss=True),
            estimate="bottom50"),
        Row("full_liger", "full fine-tuning, Liger", liger=True),
        Row("bottom50_unchunked_liger", "bottom 50%, unchunked, Liger", _bottom(0.5, **UNCHUNKED), liger=True),
        Row("bottom50_bf16frozen", "bottom 50%, unchunked, frozen stored bf16 (`freeze_frozen_dtype`)",
            _bottom(0.5, **UNCHUNKED, **BF16_FROZEN)),
        Row("bottom50_bf16frozen_chunked", "bottom 50%, `freeze_chunked_loss=True`, frozen stored bf16 (`freeze_frozen_dtype`)",
            _bottom(0.5, freeze_chunked_loss=True, **BF16_FROZEN)),
        Row("full_ckpt", "full fine-tuning, checkpointing", checkpointing=True, estimate="full"),
        Row("bottom50_ckpt", "bottom 50%, defaults, checkpointing", _bottom(0.5), checkpointing=True, estimate="bottom50_unchunked"),
        Row("bottom50_unchunked_ckpt", "bottom 50%, unchunked, checkpointing", _bottom(0.5, **UNCHUNKED),
            checkpointing=True, estimate="bottom50_unchunked"),
        Row("bottom50_hand_ckpt", "bottom 50% by hand, checkpointing", by_hand=True, checkpointing=True,
            estimate="bottom50_unchunked"),
        Row("bottom50_unchunked_liger_ckpt", "bottom 50%, unchunked, Liger, checkpointing", _bottom(0.5, **UNCHUNKED),
            liger=True, checkpointing=True),
        Row("full_chunked", "full fine-tuning + FreezeCallback(none, `freeze_chunked_loss=True`)",
            dict(freeze_strategy="none", freeze_chunked_loss=True)),
        Row("lora16", "LoRA r=16, all linear layers (peft)", lora_rank=16),
        Row("bottom25", "bottom 25%, defaults", _bottom(0.25)),
        Row("bottom75", "bottom 75%, defaults", _bottom(0.75)),
        Row("bottom50_hand_bf16", "bottom 50% by hand, frozen stored bf16 (no hf_freeze)", by_hand=True,
            frozen_dtype="bfloat16"),
        # What a user gets with both on: hf_freeze's defaults leave Liger's fused loss alone.
        Row("bottom50_liger", "bottom 50%, hf_freeze defaults, Liger", _bottom(0.5), liger=True),
        # Issue 32: the layers chosen by a probe that measures (no optimizer state), then the selection's cost.
        Row("adaptive50", "adaptive 50% (weight change, probe of 3 steps)", _adaptive(0.5)),
        Row("adaptive50_frozen_embeddings", "adaptive 50%, embeddings and tied head frozen like bottom's",
            _adaptive(0.5, freeze_embeddings=True)),
    ]
}
