"""Tiny models and data for the tests: built from configs, random init, no downloads."""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
)

_SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=128)
_DECODER = dict(_SMALL, num_key_value_heads=2, max_position_embeddings=64)

# model_type -> (auto class, config overrides, number of layers discovery must find)
ARCHITECTURES: Dict[str, tuple] = {
    "gpt2": (AutoModelForCausalLM, dict(n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0), 4),
    "llama": (AutoModelForCausalLM, _DECODER, 4),
    "mistral": (AutoModelForCausalLM, _DECODER, 4),
    "qwen2": (AutoModelForCausalLM, _DECODER, 4),
    "qwen3_moe": (AutoModelForCausalLM, dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8), 4),
    "gemma2": (AutoModelForCausalLM, dict(_DECODER, head_dim=8), 4),
    "phi3": (AutoModelForCausalLM, dict(_DECODER, pad_token_id=0), 4),
    "gpt_neox": (AutoModelForCausalLM, dict(_SMALL, max_position_embeddings=64), 4),
    "opt": (AutoModelForCausalLM, dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64, vocab_size=128, word_embed_proj_dim=32, max_position_embeddings=64), 4),
    "falcon": (AutoModelForCausalLM, dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, vocab_size=128), 4),
    "bloom": (AutoModelForCausalLM, dict(hidden_size=32, n_layer=4, n_head=4, vocab_size=128), 4),
    "bert": (AutoModelForSequenceClassification, _SMALL, 4),
    "roberta": (AutoModelForSequenceClassification, dict(_SMALL, max_position_embeddings=70, pad_token_id=1), 4),
    "distilbert": (AutoModelForSequenceClassification, dict(dim=32, n_layers=4, n_heads=4, hidden_dim=64, vocab_size=128), 4),
    "deberta-v2": (AutoModelForSequenceClassification, _SMALL, 4),
    "electra": (AutoModelForSequenceClassification, dict(_SMALL, embedding_size=16), 4),
    "vit": (AutoModelForImageClassification, dict(_SMALL, image_size=32, patch_size=8), 4),
    "t5": (AutoModelForSeq2SeqLM, dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=128), 4),
    "bart": (AutoModelForSeq2SeqLM, dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64), 4),
}


def build(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny model of the given transformers `model_type`."""
    auto, kwargs, _ = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    return auto.from_config(config)


def tiny_llava(seed: int = 0, image_token_index: int = 127) -> nn.Module:
    """A tiny LLaVA (CLIP vision tower, projector, Llama language model): 32 x 32 images of 16 patches."""
    from transformers import AutoModelForImageTextToText

    config = AutoConfig.for_model(
        "llava", image_token_index=image_token_index,
        text_config=dict(model_type="llama", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=128, max_position_embeddings=64),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=32, patch_size=8, projection_dim=32),
    )
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config)


def tiny_bert(num_layers: int = 4, seed: int = 0) -> nn.Module:
    return build("bert", seed=seed, num_hidden_layers=num_layers)


def tiny_gpt2(num_layers: int = 4, seed: int = 0) -> nn.Module:
    return build("gpt2", seed=seed, n_layer=num_layers)


class TokenClassificationData(torch.utils.data.Dataset):
    """Deterministic random token sequences with a learnable label (parity of the first token)."""

    def __init__(self, size: int = 64, length: int = 12, vocab: int = 128, causal_lm: bool = False):
        self.size, self.length, self.vocab, self.causal_lm = size, length, vocab, causal_lm

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        input_ids = torch.randint(1, self.vocab, (self.length,), generator=generator)
        if self.causal_lm:
            return {"input_ids": input_ids, "labels": input_ids.clone()}
        return {"input_ids": input_ids, "labels": torch.tensor(int(input_ids[0]) % 2)}


def trainer_for(model: nn.Module, args, callbacks=None, data: Optional[torch.utils.data.Dataset] = None) -> Trainer:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generative = {**MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}.values()
    causal = type(base).__name__ in set(generative)
    data = data or TokenClassificationData(causal_lm=causal)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def training_kwargs(output_dir, **overrides) -> dict:
    """TrainingArguments keywords for a quick, quiet, deterministic CPU run."""
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return kwargs


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


class SaveAt(TrainerCallback):
    """One checkpoint, at one step (saving is what makes resume tests slow)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step == self.step


def assert_same_outputs(actual: torch.Tensor, expected: torch.Tensor, msg: Optional[str] = None) -> None:
    """The outputs of two models with the same weights, one of them loaded or built apart from the other (a saved and
    reloaded checkpoint, an expanded copy), agree to float32 rounding.

    Bit-equality is a fair test only where the same kernels run on the same data in the same order (a frozen weight
    untouched by training, a resumed run against an uninterrupted one). Two separately allocated models do not
    guarantee that: the CPU's matrix kernels may take another path for other buffers (weights read from a
    safetensors file among them), and the outputs then differ in the last bits: 2.98e-08 apart on one CPU where
    another gives identical bits. A wrong weight moves them by orders of magnitude more than this tolerance.
    """
    torch.testing.assert_close(actual, expected, rtol=1.3e-6, atol=1e-5, msg=msg)
