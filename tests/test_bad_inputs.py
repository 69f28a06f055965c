"""The bad-input corpus: every case is refused before training (naming the field), warned about, or accepted and
right; none is silently wrong. `hf-freeze validate --model` must agree with training on every case.

Add a case here for every new class of bad input. `test_corpus_size_and_outcomes` prints the tally.
"""

import collections
import logging
import sys

import pytest

from hf_freeze import FreezeArguments, FreezeConfigError, LayerFreezer, TrainingProgress
from hf_freeze.tools.validate import check_config

from tiny import build

REFUSED, WARNED, ACCEPTED = "refused", "warned", "accepted"
B = dict(freeze_strategy="bottom")
ADAPTIVE = dict(freeze_strategy="adaptive", freeze_layers=2)


def _case(options, outcome, detail="", max_steps=20, **model):
    return (options, outcome, detail, max_steps, model)


# Wrong types, as YAML hands them over: the field is named.
TYPES = {
    "freeze_strategy": 3, "freeze_layers": "half", "freeze_interval": "2", "freeze_interval_offset": 1.5,
    "freeze_layer_indices": "0,1", "freeze_patterns": {"a": 1}, "freeze_trainable_patterns": 3,
    "freeze_num_layers_unfrozen": "all", "freeze_trainable_layers": 1.5, "freeze_embeddings": "yes",
    "freeze_norm": "no", "freeze_head": 1, "freeze_respect_existing": "true", "freeze_health_check": True,
    "freeze_frozen_modules_eval": "on", "freeze_chunked_loss": "yes", "freeze_layer_paths": 5, "freeze_schedule_unit": 1, "freeze_schedule_every": "20",
    "freeze_start": "0.5", "freeze_level": [1], "freeze_unfreeze_layers": 1.5, "freeze_unfreeze_lr_factor": "0.1",
    "freeze_unfreeze_lr_growth": True, "freeze_active_layers": "2", "freeze_block_order": 0, "freeze_score": 3,
    "freeze_select": False, "freeze_probe_steps": "5", "freeze_reselect_every": 2.5, "freeze_component_paths": 3,
    "freeze_unused_modalities": "yes", "freeze_num_new_blocks": "2", "freeze_granularity": 1,
    "freeze_cache_prefix": "yes", "freeze_cache_memory_mb": "1GB", "freeze_cache_dir": 3, "freeze_cache_dtype": 16,
    "freeze_cache_keep": "no",
    "freeze_trainable_tokens": {"new": True}, "freeze_trainable_experts": 1.5, "freeze_pattern_syntax": 3,
}
CASES = {f"type/{name}": _case({name: value}, REFUSED, name) for name, value in TYPES.items()}

# Values out of range or not allowed: refused when the options are built, the field named.
CASES.update({
    "value/strategy-typo": _case(dict(freeze_strategy="bottm"), REFUSED, "freeze_strategy"),
    "value/layers-negative": _case(dict(B, freeze_layers=-1), REFUSED, "freeze_layers"),
    "value/layers-1.5": _case(dict(B, freeze_layers=1.5), REFUSED, "freeze_layers"),
    "value/layers-nan": _case(dict(B, freeze_layers=float("nan")), REFUSED, "freeze_layers"),
    "value/chunked-loss-without-lm-head": _case(dict(B, freeze_layers=1, freeze_chunked_loss=True), REFUSED, "freeze_chunked_loss"),
    "value/layers-inf": _case(dict(B, freeze_layers=float("inf")), REFUSED, "freeze_layers"),
    "value/bottom-without-layers": _case(B, REFUSED, "freeze_layers"),
    "value/top-without-layers": _case(dict(freeze_strategy="top"), REFUSED, "freeze_layers"),
    "value/interval-0": _case(dict(freeze_strategy="interval", freeze_interval=0), REFUSED, "freeze_interval"),
    "value/interval-offset": _case(dict(freeze_strategy="interval", freeze_interval=2, freeze_interval_offset=2), REFUSED, "freeze_interval_offset"),
    "value/interval-offset-negative": _case(dict(freeze_strategy="interval", freeze_interval_offset=-1), REFUSED, "freeze_interval_offset"),
    "value/layers-without-indices": _case(dict(freeze_strategy="layers"), REFUSED, "freeze_layer_indices"),
    "value/indices-empty": _case(dict(freeze_strategy="layers", freeze_layer_indices=[]), REFUSED, "freeze_layer_indices"),
    "value/pattern-without-patterns": _case(dict(freeze_strategy="pattern"), REFUSED, "freeze_patterns"),
    "value/pattern-bad-regex": _case(dict(freeze_strategy="pattern", freeze_patterns=["a(b"]), REFUSED, "freeze_patterns"),
    "value/trainable-bad-regex": _case(dict(freeze_strategy="pattern", freeze_trainable_patterns=["[x"]), REFUSED, "freeze_trainable_patterns"),
    "value/trlx-missing": _case(dict(freeze_strategy="trlx"), REFUSED, "freeze_num_layers_unfrozen"),
    "value/trlx-minus-2": _case(dict(freeze_strategy="trlx", freeze_num_layers_unfrozen=-2), REFUSED, "freeze_num_layers_unfrozen"),
    "value/llama-factory-0": _case(dict(freeze_strategy="llama_factory", freeze_trainable_layers=0), REFUSED, "freeze_trainable_layers"),
    "value/llama-factory-missing": _case(dict(freeze_strategy="llama_factory"), REFUSED, "freeze_trainable_layers"),
    "value/llama-pro-missing": _case(dict(freeze_strategy="llama_pro"), REFUSED, "freeze_num_new_blocks"),
    "value/llama-pro-0": _case(dict(freeze_strategy="llama_pro", freeze_num_new_blocks=0), REFUSED, "freeze_num_new_blocks"),
    "value/llama-pro-empty-modules": _case(dict(freeze_strategy="llama_pro", freeze_num_new_blocks=2, freeze_trainable_modules=[]), REFUSED, "freeze_trainable_modules"),
    "value/health-mode": _case(dict(freeze_health_check="loud"), REFUSED, "freeze_health_check"),
    "value/schedule-unit": _case(dict(freeze_strategy="lisa", freeze_schedule_unit="epochs"), REFUSED, "freeze_schedule_unit"),
    "value/schedule-every-0": _case(dict(freeze_strategy="lisa", freeze_schedule_every=0), REFUSED, "freeze_schedule_every"),
    "value/start-1": _case(dict(freeze_strategy="progressive", freeze_start=1.0), REFUSED, "freeze_start"),
    "value/start-negative": _case(dict(freeze_strategy="progressive", freeze_start=-0.1), REFUSED, "freeze_start"),
    "value/granularity": _case(dict(freeze_strategy="progressive", freeze_granularity="leaf"), REFUSED, "freeze_granularity"),
    "value/level-0": _case(dict(freeze_strategy="progressive", freeze_level=0), REFUSED, "freeze_level"),
    "value/level-above-1": _case(dict(freeze_strategy="progressive", freeze_level=1.5), REFUSED, "freeze_level"),
    "value/unfreeze-layers-0": _case(dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_layers=0), REFUSED, "freeze_unfreeze_layers"),
    "value/lr-factor-0": _case(dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_lr_factor=0), REFUSED, "freeze_unfreeze_lr_factor"),
    "value/lr-factor-above-1": _case(dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_lr_factor=2), REFUSED, "freeze_unfreeze_lr_factor"),
    "value/lr-growth-below-1": _case(dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_lr_factor=0.1, freeze_unfreeze_lr_growth=0.5), REFUSED, "freeze_unfreeze_lr_growth"),
    "value/lr-growth-without-factor": _case(dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_lr_growth=2), REFUSED, "freeze_unfreeze_lr_factor"),
    "value/gradual-layers-1.5": _case(dict(freeze_strategy="gradual_unfreezing", freeze_layers=1.5), REFUSED, "freeze_layers"),
    "value/active-0": _case(dict(freeze_strategy="lisa", freeze_active_layers=0), REFUSED, "freeze_active_layers"),
    "value/badam-order": _case(dict(freeze_strategy="badam", freeze_block_order="sideways"), REFUSED, "freeze_block_order"),
    "value/score-typo": _case(dict(ADAPTIVE, freeze_score="weight_chnge"), REFUSED, "freeze_score"),
    "value/select": _case(dict(ADAPTIVE, freeze_select="middle"), REFUSED, "freeze_select"),
    "value/probe-0": _case(dict(ADAPTIVE, freeze_probe_steps=0), REFUSED, "freeze_probe_steps"),
    "value/probe-1.5": _case(dict(ADAPTIVE, freeze_probe_steps=1.5), REFUSED, "freeze_probe_steps"),
    "value/probe-short-for-score": _case(dict(ADAPTIVE, freeze_score="grad_norm_change", freeze_probe_steps=1), REFUSED, "freeze_probe_steps"),
    "value/probe-with-snr": _case(dict(ADAPTIVE, freeze_score="snr", freeze_probe_steps=3), REFUSED, "freeze_probe_steps"),
    "value/reselect-0": _case(dict(ADAPTIVE, freeze_reselect_every=0), REFUSED, "freeze_reselect_every"),
    "value/probe-not-shorter-than-round": _case(dict(ADAPTIVE, freeze_probe_steps=5, freeze_reselect_every=5), REFUSED, "freeze_reselect_every"),
    "value/adaptive-without-layers": _case(dict(freeze_strategy="adaptive"), REFUSED, "freeze_layers"),
    "value/layer-paths-empty": _case(dict(B, freeze_layers=1, freeze_layer_paths=[]), REFUSED, "freeze_layer_paths"),
    "value/layer-paths-twice": _case(dict(B, freeze_layers=1, freeze_layer_paths=["bert.encoder.layer"] * 2), REFUSED, "freeze_layer_paths"),
    "value/layer-paths-nested": _case(dict(B, freeze_layers=1, freeze_layer_paths=["bert.encoder", "bert.encoder.layer"]), REFUSED, "freeze_layer_paths"),
})

# Options that belong to another strategy, or that a strategy decides itself.
CASES.update({
    "unused/none-with-layers": _case(dict(freeze_layers=1), REFUSED, "freeze_layers"),
    "unused/top-with-interval": _case(dict(freeze_strategy="top", freeze_layers=1, freeze_interval=2), REFUSED, "freeze_interval"),
    "unused/bottom-with-score": _case(dict(B, freeze_layers=1, freeze_score="snr"), REFUSED, "freeze_score"),
    "unused/lisa-with-start": _case(dict(freeze_strategy="lisa", freeze_start=0.5), REFUSED, "freeze_start"),
    "unused/bitfit-with-layers": _case(dict(freeze_strategy="bitfit", freeze_layers=2), REFUSED, "freeze_layers"),
    "unused/bottom-with-granularity": _case(dict(B, freeze_layers=1, freeze_granularity="module"), REFUSED, "freeze_granularity"),
    "unused/progressive-with-every": _case(dict(freeze_strategy="progressive", freeze_schedule_every=3), REFUSED, "freeze_schedule_every"),
    "unused/badam-with-lr-factor": _case(dict(freeze_strategy="badam", freeze_unfreeze_lr_factor=0.5), REFUSED, "freeze_unfreeze_lr_factor"),
    "unused/llama-factory-with-new-blocks": _case(dict(freeze_strategy="llama_factory", freeze_trainable_layers=1, freeze_num_new_blocks=2), REFUSED, "freeze_num_new_blocks"),
    "unused/trlx-with-trainable-layers": _case(dict(freeze_strategy="trlx", freeze_num_layers_unfrozen=1, freeze_trainable_layers=1), REFUSED, "freeze_trainable_layers"),
    "fixed/pattern-with-head": _case(dict(freeze_strategy="pattern", freeze_patterns=["bert.encoder.*"], freeze_head=False), REFUSED, "freeze_head"),
    "fixed/head-only-with-head": _case(dict(freeze_strategy="head_only", freeze_head=True), REFUSED, "freeze_head"),
})

# Values this model cannot honour: refused when the freezer meets the model, before anything changes.
CASES.update({
    "model/bottom-9-of-4": _case(dict(B, freeze_layers=9), REFUSED, "freeze_layers"),
    "model/top-5-of-4": _case(dict(freeze_strategy="top", freeze_layers=5), REFUSED, "freeze_layers"),
    "model/fraction-too-small": _case(dict(B, freeze_layers=0.01), REFUSED, "freeze_layers"),
    "model/index-past-end": _case(dict(freeze_strategy="layers", freeze_layer_indices=[0, 4]), REFUSED, "freeze_layer_indices"),
    "model/index-twice": _case(dict(freeze_strategy="layers", freeze_layer_indices=[1, -3]), REFUSED, "freeze_layer_indices"),
    "model/interval-offset-past-end": _case(dict(freeze_strategy="interval", freeze_interval=8, freeze_interval_offset=5), REFUSED, "freeze_interval_offset"),
    "model/pattern-matches-nothing": _case(dict(freeze_strategy="pattern", freeze_patterns=["decoder.*"]), REFUSED, "freeze_patterns"),
    "model/trainable-pattern-matches-nothing": _case(dict(freeze_strategy="pattern", freeze_trainable_patterns=["lm_head.*"]), REFUSED, "freeze_trainable_patterns"),
    "model/trlx-5-of-4": _case(dict(freeze_strategy="trlx", freeze_num_layers_unfrozen=5), REFUSED, "freeze_num_layers_unfrozen"),
    "model/llama-factory-minus-5": _case(dict(freeze_strategy="llama_factory", freeze_trainable_layers=-5), REFUSED, "freeze_trainable_layers"),
    "model/llama-pro-3-of-4": _case(dict(freeze_strategy="llama_pro", freeze_num_new_blocks=3), REFUSED, "freeze_num_new_blocks"),
    "model/llama-pro-4-of-4": _case(dict(freeze_strategy="llama_pro", freeze_num_new_blocks=4), REFUSED, "freeze_num_new_blocks"),
    "model/llama-pro-unknown-module": _case(dict(freeze_strategy="llama_pro", freeze_num_new_blocks=2, freeze_trainable_modules=["mlp"]), REFUSED, "freeze_trainable_modules"),
    "model/lisa-5-of-4": _case(dict(freeze_strategy="lisa", freeze_active_layers=5), REFUSED, "freeze_active_layers"),
    "model/badam-5-of-4": _case(dict(freeze_strategy="badam", freeze_active_layers=5), REFUSED, "freeze_active_layers"),
    "model/adaptive-5-of-4": _case(dict(ADAPTIVE, freeze_layers=5), REFUSED, "freeze_layers"),
    "model/gradual-9-of-4": _case(dict(freeze_strategy="gradual_unfreezing", freeze_layers=9), REFUSED, "freeze_layers"),
    "model/layer-path-missing": _case(dict(B, freeze_layers=1, freeze_layer_paths=["model.layers"]), REFUSED, "freeze_layer_paths"),
    "model/layer-path-not-a-container": _case(dict(B, freeze_layers=1, freeze_layer_paths=["bert.pooler"]), REFUSED, "freeze_layer_paths"),
    "model/everything-by-pattern": _case(dict(freeze_strategy="pattern", freeze_patterns=[".*"]), REFUSED, "freeze_strategy"),
    "model/everything-by-options": _case(dict(B, freeze_layers=4, freeze_norm=True, freeze_head=True), REFUSED, "freeze_strategy"),
    "model/everything-head-only-on-frozen-head": _case(dict(freeze_strategy="llama_factory", freeze_trainable_layers=1, freeze_head=True), ACCEPTED),
    "model/probe-as-long-as-training": _case(dict(ADAPTIVE, freeze_probe_steps=20), REFUSED, "freeze_probe_steps", max_steps=20),
    "model/component-path-missing": _case(dict(B, freeze_layers=1, freeze_component_paths={"vision_tower": "vision", "language_model": "bert"}), REFUSED, "freeze_component_paths"),
    "model/component-paths-single-part-model": _case(dict(B, freeze_layers=1, freeze_component_paths={"language_model": "bert"}), REFUSED, "freeze_component_paths"),
    "value/component-paths-unknown-key": _case(dict(B, freeze_layers=1, freeze_component_paths={"vision": "bert.embeddings"}), REFUSED, "freeze_component_paths"),
    "value/component-paths-empty-list": _case(dict(B, freeze_layers=1, freeze_component_paths={"vision_tower": []}), REFUSED, "freeze_component_paths"),
    "value/component-paths-overlap": _case(dict(B, freeze_layers=1, freeze_component_paths={"vision_tower": "bert.encoder", "language_model": "bert.encoder.layer"}), REFUSED, "freeze_component_paths"),
    "value/component-paths-not-json": _case(dict(B, freeze_layers=1, freeze_component_paths="{vision_tower: [a"), REFUSED, "freeze_component_paths"),
    "model/unused-modalities-on-a-text-model": _case(dict(B, freeze_layers=1, freeze_unused_modalities=True), REFUSED, "freeze_unused_modalities"),
    "model/contradicting-tie": _case(dict(freeze_strategy="top", freeze_layers=1, freeze_embeddings=True, freeze_head=False), REFUSED, "freeze_embeddings", tied=True),
})

# The frozen-prefix cache: a policy without a fixed frozen prefix, or a prefix that is not deterministic.
CACHE = dict(freeze_cache_prefix=True, freeze_frozen_modules_eval=True)
CASES.update({
    "cache/schedule": _case(dict(CACHE, freeze_strategy="progressive"), REFUSED, "freeze_cache_prefix"),
    "cache/adaptive": _case(dict(CACHE, **ADAPTIVE), REFUSED, "freeze_cache_prefix"),
    "cache/without-eval-mode": _case(dict(B, freeze_layers=2, freeze_cache_prefix=True), REFUSED, "freeze_frozen_modules_eval"),
    "cache/top": _case(dict(CACHE, freeze_strategy="top", freeze_layers=2), REFUSED, "freeze_cache_prefix"),
    "cache/interval": _case(dict(CACHE, freeze_strategy="interval", freeze_interval=2, freeze_interval_offset=1), REFUSED, "freeze_cache_prefix"),
    "cache/every-layer": _case(dict(CACHE, freeze_strategy="bottom", freeze_layers=4), REFUSED, "freeze_cache_prefix"),
    "cache/embeddings-trainable": _case(dict(CACHE, freeze_strategy="bottom", freeze_layers=2, freeze_embeddings=False), REFUSED, "freeze_cache_prefix"),
    "cache/options-without-cache": _case(dict(B, freeze_layers=2, freeze_cache_keep=True), REFUSED, "freeze_cache_keep"),
    "cache/dtype": _case(dict(CACHE, freeze_strategy="bottom", freeze_layers=2, freeze_cache_dtype="half"), REFUSED, "freeze_cache_dtype"),
    "cache/memory-negative": _case(dict(CACHE, freeze_strategy="bottom", freeze_layers=2, freeze_cache_memory_mb=-1), REFUSED, "freeze_cache_memory_mb"),
    "ok/cache-bottom": _case(dict(CACHE, freeze_strategy="bottom", freeze_layers=2, freeze_cache_dtype="float16"), ACCEPTED),
})

# Rows of frozen parameters (new tokens, single experts, axolotl's row ranges): refused with the valid range.
AXOLOTL = dict(freeze_strategy="pattern", freeze_pattern_syntax="axolotl")
WORDS = "bert.embeddings.word_embeddings.weight"
CASES.update({
    "rows/tokens-negative": _case(dict(freeze_trainable_tokens=[-1]), REFUSED, "freeze_trainable_tokens"),
    "rows/tokens-new-and-ids": _case(dict(freeze_trainable_tokens=["new", 5]), REFUSED, "freeze_trainable_tokens"),
    "rows/tokens-outside-vocabulary": _case(dict(freeze_trainable_tokens=[3, 128]), REFUSED, "freeze_trainable_tokens"),
    "rows/tokens-new-size-unknown": _case(dict(freeze_trainable_tokens="new"), REFUSED, "freeze_trainable_tokens"),
    "rows/tokens-new-never-resized": _case(dict(freeze_trainable_tokens="new"), REFUSED, "freeze_trainable_tokens", recorded=True),
    "rows/experts-not-an-index": _case(dict(freeze_trainable_experts=["first"]), REFUSED, "freeze_trainable_experts"),
    "rows/experts-on-dense-model": _case(dict(freeze_trainable_experts=[0]), REFUSED, "freeze_trainable_experts"),
    "rows/expert-past-the-last": _case(dict(freeze_trainable_experts=[4]), REFUSED, "freeze_trainable_experts", model_type="qwen3_moe"),
    "rows/expert-layer-past-the-last": _case(dict(freeze_trainable_experts=["4:1"]), REFUSED, "freeze_trainable_experts", model_type="qwen3_moe"),
    "rows/syntax-typo": _case(dict(AXOLOTL, freeze_pattern_syntax="axolotol", freeze_trainable_patterns=[WORDS]), REFUSED, "freeze_pattern_syntax"),
    "rows/range-in-freeze-patterns": _case(dict(AXOLOTL, freeze_patterns=[WORDS + "$[:10]"]), REFUSED, "freeze_patterns"),
    "rows/range-on-layers": _case(dict(AXOLOTL, freeze_trainable_patterns=["bert.encoder.layer.[23]"]), REFUSED, "freeze_trainable_patterns"),
    "rows/range-past-the-rows": _case(dict(AXOLOTL, freeze_trainable_patterns=[WORDS + "$[100:200]"]), REFUSED, "freeze_trainable_patterns"),
    "rows/range-empty": _case(dict(AXOLOTL, freeze_trainable_patterns=[WORDS + "$[9:3]"]), REFUSED, "freeze_trainable_patterns"),
    "rows/axolotl-dot-star-matches-nothing": _case(dict(AXOLOTL, freeze_trainable_patterns=["bert.encoder.*dense"]), REFUSED, "freeze_trainable_patterns"),
    "rows/axolotl-escaped-dots-match-nothing": _case(dict(AXOLOTL, freeze_trainable_patterns=[r"bert\.pooler"]), REFUSED, "freeze_trainable_patterns"),
    "ok/tokens-ids": _case(dict(freeze_trainable_tokens=[3, 127]), ACCEPTED),
    "ok/only-token-rows-train": _case(dict(freeze_strategy="pattern", freeze_patterns=[".*"], freeze_trainable_tokens=[5]), ACCEPTED),
    "ok/axolotl-range": _case(dict(AXOLOTL, freeze_trainable_patterns=[WORDS + "$[100:]", "bert.encoder.+dense"]), ACCEPTED),
    "ok/expert-with-router": _case(dict(freeze_trainable_experts=[1, "3:2"], freeze_router=True), ACCEPTED, model_type="qwen3_moe"),
})

# Policies that do nothing useful here, or options that do more than they say: warned once, with the reason.
CASES.update({
    "warn/bottom-0": _case(dict(B, freeze_layers=0), WARNED, "freezes no part of any layer"),
    "warn/trlx-minus-1": _case(dict(freeze_strategy="trlx", freeze_num_layers_unfrozen=-1), WARNED, "freezes no part of any layer"),
    "warn/top-0": _case(dict(freeze_strategy="top", freeze_layers=0), WARNED, "freezes no part of any layer"),
    "warn/pattern-trains-everything": _case(dict(freeze_strategy="pattern", freeze_trainable_patterns=[".*"]), WARNED, "freezes no part of any layer"),
    "warn/layers-via-trainable-all": _case(dict(freeze_strategy="llama_factory", freeze_trainable_layers=4), WARNED, "freezes no part of any layer"),
    "warn/lisa-all-layers": _case(dict(freeze_strategy="lisa", freeze_active_layers=4), WARNED, "never freezes any part of a layer"),
    "warn/badam-all-layers": _case(dict(freeze_strategy="badam", freeze_active_layers=4), WARNED, "never freezes any part of a layer"),
    "warn/gradual-epochs-in-short-run": _case(dict(freeze_strategy="gradual_unfreezing", freeze_layers=2), WARNED, "never changes the frozen set", num_epochs=0.5),
    "warn/lisa-period-longer-than-run": _case(dict(freeze_strategy="lisa", freeze_schedule_every=50), WARNED, "never changes the frozen set"),
    "warn/progressive-level-too-low": _case(dict(freeze_strategy="progressive", freeze_level=0.1), WARNED, "never freezes any part of a layer"),
    "warn/adaptive-0-layers": _case(dict(ADAPTIVE, freeze_layers=0), WARNED, "never freezes any part of a layer"),
    "warn/tied-freeze-head": _case(dict(freeze_strategy="top", freeze_layers=1, freeze_head=True), WARNED, "frozen together", tied=True),
    "warn/tied-freeze-embeddings": _case(dict(freeze_strategy="top", freeze_layers=1, freeze_embeddings=True), WARNED, "frozen together", tied=True),
})

# Edge values that are right as they are: accepted, with the frozen set they should give.
CASES.update({
    "ok/none": _case({}, ACCEPTED),
    "ok/bottom-fraction": _case(dict(B, freeze_layers=0.5), ACCEPTED),
    "ok/bottom-all": _case(dict(B, freeze_layers=4), ACCEPTED),
    "ok/bottom-2.0-is-a-count": _case(dict(B, freeze_layers=2.0), ACCEPTED),
    "ok/layers-negative-index": _case(dict(freeze_strategy="layers", freeze_layer_indices=[-1]), ACCEPTED),
    "ok/layers-single-int": _case(dict(freeze_strategy="layers", freeze_layer_indices=3), ACCEPTED),
    "ok/pattern-single-string": _case(dict(freeze_strategy="pattern", freeze_patterns="bert.encoder.layer.0.*"), ACCEPTED),
    "ok/llama-factory-first": _case(dict(freeze_strategy="llama_factory", freeze_trainable_layers=-1), ACCEPTED),
    "ok/llama-pro-2-of-4": _case(dict(freeze_strategy="llama_pro", freeze_num_new_blocks=2), ACCEPTED),
    "ok/health-off": _case(dict(B, freeze_layers=1, freeze_health_check="off"), ACCEPTED),
    "ok/eval-mode": _case(dict(B, freeze_layers=1, freeze_frozen_modules_eval=True), ACCEPTED),
    "ok/chunked-loss-on-a-causal-lm": _case(dict(B, freeze_layers=1, freeze_chunked_loss=True), ACCEPTED, tied=True),
    "ok/respect-existing-false": _case(dict(B, freeze_layers=1, freeze_respect_existing=False), ACCEPTED),
    "ok/layer-paths": _case(dict(B, freeze_layers=1, freeze_layer_paths=["bert.encoder.layer"]), ACCEPTED),
    "ok/progressive-modules": _case(dict(freeze_strategy="progressive", freeze_granularity="module"), ACCEPTED),
    "ok/lisa-defaults": _case(dict(freeze_strategy="lisa", freeze_active_layers=1, freeze_schedule_every=5), ACCEPTED),
    "ok/adaptive-snr": _case(dict(ADAPTIVE, freeze_score="snr"), ACCEPTED),
})

# Learning rates per part and layer, freeze + LoRA (hf_freeze/learning_rates/, hf_freeze/lora/).
CASES.update({
    "type/freeze_learning_rates": _case({"freeze_learning_rates": 3}, REFUSED, "freeze_learning_rates"),
    "type/freeze_layer_lr_decay": _case({"freeze_layer_lr_decay": "fast"}, REFUSED, "freeze_layer_lr_decay"),
    "type/freeze_lora": _case(dict(B, freeze_layers=1, freeze_lora=3), REFUSED, "freeze_lora"),
    "value/lr-decay-0": _case(dict(freeze_layer_lr_decay=0), REFUSED, "freeze_layer_lr_decay"),
    "value/lr-decay-above-1": _case(dict(freeze_layer_lr_decay=1.2), REFUSED, "freeze_layer_lr_decay"),
    "value/lr-negative": _case(dict(freeze_learning_rates={"bert.encoder": -1e-5}), REFUSED, "freeze_learning_rates"),
    "value/lr-missing-part": _case(dict(freeze_learning_rates={"vision_tower": 1e-5}), REFUSED, "freeze_learning_rates"),
    "value/lr-pattern-matches-nothing": _case(dict(freeze_learning_rates={"model.layers": 1e-5}), REFUSED, "freeze_learning_rates"),
    "value/lora-dynamic": _case(dict(freeze_strategy="lisa", freeze_lora={"r": 4}), REFUSED, "freeze_lora"),
    "value/lora-nothing-frozen": _case(dict(freeze_lora={"r": 4}), REFUSED, "freeze_lora"),
    "value/lora-rank-0": _case(dict(B, freeze_layers=1, freeze_lora={"r": 0}), REFUSED, "freeze_lora"),
    "ok/lr-decay-and-rates": _case(dict(B, freeze_layers=1, freeze_layer_lr_decay=0.8, freeze_learning_rates={"classifier": 1e-4}), ACCEPTED),
    "ok/lora-bottom": _case(dict(B, freeze_layers=2, freeze_lora={"r": 4, "alpha": 8}), ACCEPTED),
})


def _model(tied=False, model_type=None, recorded=False):
    model = build(model_type or ("gpt2" if tied else "bert"))
    if recorded:  # the vocabulary size recorded, and never resized
        from hf_freeze.model import record_vocabulary_size

        record_vocabulary_size(model)
    return model


def _outcome(options, max_steps, model_kwargs, caplog):
    """What happens to ``options`` on the way to training: refused (and the fields), warned (and the text), or
    accepted."""
    num_epochs = model_kwargs.pop("num_epochs", 1.0)
    logging.getLogger("hf_freeze").addHandler(caplog.handler)  # hf_freeze's logger does not propagate to the root
    try:
        arguments = FreezeArguments(**options)
        freezer = LayerFreezer(_model(**model_kwargs), arguments)
        freezer.check(max_steps)
        caplog.clear()
        freezer.prepare(TrainingProgress(step=0, max_steps=max_steps, num_epochs=num_epochs))
        freezer.start(TrainingProgress(step=0, max_steps=max_steps, num_epochs=num_epochs))
    except FreezeConfigError as error:
        return REFUSED, error
    finally:
        logging.getLogger("hf_freeze").removeHandler(caplog.handler)
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    return (WARNED, warnings) if warnings else (ACCEPTED, None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_bad_input_is_refused_or_warned_and_validate_agrees(case, caplog, monkeypatch):
    monkeypatch.setattr(sys.modules["hf_freeze.engine.freezer"], "is_main_process", lambda: True)
    options, expected, detail, max_steps, model_kwargs = CASES[case]
    outcome, info = _outcome(options, max_steps, dict(model_kwargs), caplog)
    assert outcome == expected, (case, outcome, info)
    if outcome == REFUSED:
        assert detail in info.fields, (case, info.fields, str(info))
        assert f"`{detail}`" in str(info) or detail == "freeze_strategy", str(info)
    if outcome == WARNED:
        assert any(detail in message for message in info), info
    # `hf-freeze validate --model` runs the checks training runs: it refuses exactly what training refuses.
    values = dict(options, max_steps=max_steps, output_dir="unused")
    model_kwargs = {key: value for key, value in model_kwargs.items() if key != "num_epochs"}
    problems = check_config(values, model=_model(**model_kwargs))
    if outcome == REFUSED:
        assert any(detail in problem.fields for problem in problems), (case, [str(p) for p in problems])
    else:
        assert not problems, (case, [str(p) for p in problems])


def test_corpus_size_and_outcomes():
    tally = collections.Counter(outcome for _, outcome, _, _, _ in CASES.values())
    print(f"bad-input corpus: {len(CASES)} cases: {dict(tally)}")
    assert len(CASES) >= 100 and tally[REFUSED] and tally[WARNED] and tally[ACCEPTED]
