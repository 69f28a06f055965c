"""`hf-freeze expand` (LLaMA Pro's block expansion, as LLaMA-Factory's scripts/llama_pro.py writes it) and training
the expanded model with `llama_pro`.

What scripts/llama_pro.py does, in our words: with L layers and N new blocks (N must divide L), after every
(L / N)-th layer it inserts a copy of that layer whose `o_proj` and `down_proj` tensors are zero, renumbers the
layers, sets `num_hidden_layers` to L + N, and saves the weights (sharded, with an index, when large) and the
tokenizer.
"""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_freeze import FreezeCallback, FreezeTrainingArguments
from hf_freeze.tools.cli import main

from tiny import assert_same_outputs, build, snapshot, trainer_for, training_kwargs

CASES = {
    "llama": {},
    # Mixed attention kinds: the per-layer `layer_types` must follow the layers to their new places.
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "gemma2": dict(sliding_window=3),
    "mistral": dict(sliding_window=3),
}


def save(tmp_path, model_type, max_shard_size="5GB", **overrides):
    model = build(model_type, **{**CASES.get(model_type, {}), **overrides}).eval()
    folder = tmp_path / model_type
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model, folder


def expand(source, output, num_new_blocks, *extra):
    return main(["expand", str(source), "--num-new-blocks", str(num_new_blocks), str(output), *extra])


def logits(model, seed=0):
    input_ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("model_type", sorted(CASES))
@pytest.mark.parametrize("num_new_blocks", [1, 2, 4])
def test_the_expanded_model_computes_what_the_original_did(tmp_path, model_type, num_new_blocks):
    original, source = save(tmp_path, model_type)
    assert expand(source, tmp_path / "pro", num_new_blocks) == 0
    expanded = AutoModelForCausalLM.from_pretrained(tmp_path / "pro").eval()
    assert expanded.config.num_hidden_layers == 4 + num_new_blocks
    assert_same_outputs(logits(expanded), logits(original))
    assert_same_outputs(logits(expanded, seed=1), logits(original, seed=1))

    # Layer i of the original is layer i + i // k; after every k-th layer comes its copy, with o_proj and down_proj
    # zero and everything else equal.
    group, before, after = 4 // num_new_blocks, original.state_dict(), expanded.state_dict()
    new_blocks = []
    for old in range(4):
        new = old + old // group
        prefix_old, prefix_new = f"model.layers.{old}.", f"model.layers.{new}."
        names = [name for name in before if name.startswith(prefix_old)]
        for name in names:
            assert torch.equal(after[prefix_new + name[len(prefix_old):]], before[name]), name
        if (old + 1) % group == 0:
            new_blocks.append(new + 1)
            for name in names:
                copy = after[f"model.layers.{new + 1}." + name[len(prefix_old):]]
                zeroed = "o_proj" in name or "down_proj" in name
                assert torch.equal(copy, torch.zeros_like(copy) if zeroed else before[name]), name
    assert new_blocks == [g * (group + 1) + group for g in range(num_new_blocks)]


def test_layer_types_follow_the_layers_and_matter(tmp_path):
    original, source = save(tmp_path, "gemma2")
    assert original.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert expand(source, tmp_path / "pro", 2) == 0
    written = json.loads((tmp_path / "pro" / "config.json").read_text())
    # Each copy takes the kind of the layer it copies.
    expected = ["sliding_attention", "full_attention", "full_attention"] * 2
    assert written["layer_types"] == expected
    # Without the extension, transformers would alternate the kinds over the six layers, and the outputs would
    # differ: the test above would catch a wrong `layer_types`.
    config = AutoConfig.from_pretrained(tmp_path / "pro")
    config.layer_types = ["sliding_attention", "full_attention"] * 3
    misplaced = AutoModelForCausalLM.from_pretrained(tmp_path / "pro", config=config).eval()
    assert not torch.allclose(logits(misplaced), logits(original), rtol=1e-3, atol=1e-3)


def test_sharded_weights_in_and_out_with_index_and_tokenizer_copied(tmp_path):
    original, source = save(tmp_path, "llama", max_shard_size="20KB")
    assert (source / "model.safetensors.index.json").exists()
    _save_tokenizer(source)
    assert expand(source, tmp_path / "pro", 2, "--max-shard-size", "30KB") == 0
    output = tmp_path / "pro"
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((output / shard).exists() for shard in shards)
    assert sorted(name for name in os.listdir(output) if name.endswith(".safetensors")) == shards
    assert "model.layers.5.mlp.down_proj.weight" in index["weight_map"]
    expanded = AutoModelForCausalLM.from_pretrained(output).eval()
    assert_same_outputs(logits(expanded), logits(original))
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("a b")["input_ids"] == AutoTokenizer.from_pretrained(source)("a b")["input_ids"]
    assert (output / "generation_config.json").exists()


def _save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


@pytest.mark.parametrize("num_new_blocks", [3, 5, 0, -1])
def test_a_count_that_does_not_divide_the_layers_is_refused_and_nothing_is_written(tmp_path, capsys, num_new_blocks):
    _, source = save(tmp_path, "llama")
    assert expand(source, tmp_path / "pro", num_new_blocks) == 2
    message = capsys.readouterr().err
    assert "`num_new_blocks`" in message and f"(got {num_new_blocks})" in message
    assert "divisor of the model's 4 layers: 1, 2, 4" in message
    assert not (tmp_path / "pro").exists()


def test_refuses_layers_without_the_projections_to_zero_a_non_empty_output_and_a_folder_without_a_model(
    tmp_path, capsys
):
    build("gpt_neox").save_pretrained(tmp_path / "neox")  # attention.dense and mlp.dense_4h_to_h
    assert expand(tmp_path / "neox", tmp_path / "out", 2) == 2
    assert "'o_proj' and 'down_proj'" in capsys.readouterr().err
    build("gpt2").save_pretrained(tmp_path / "gpt2")  # counts its layers in `n_layer`
    assert expand(tmp_path / "gpt2", tmp_path / "out", 2) == 2
    assert "`num_hidden_layers`" in capsys.readouterr().err and not (tmp_path / "out").exists()
    _, source = save(tmp_path, "llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert expand(source, tmp_path / "full", 2) == 2
    assert "`output_dir`" in capsys.readouterr().err and os.listdir(tmp_path / "full") == ["keep.txt"]
    assert expand(tmp_path / "missing", tmp_path / "out", 2) == 2
    assert "`model_dir`" in capsys.readouterr().err


def test_a_trainer_run_with_llama_pro_trains_only_the_new_blocks(tmp_path):
    original, source = save(tmp_path, "llama", num_hidden_layers=6)
    assert expand(source, tmp_path / "pro", 3) == 0  # 6 layers -> 9, new blocks at 2, 5, 8
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pro")
    before = snapshot(model)
    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path / "run"), freeze_strategy="llama_pro", freeze_num_new_blocks=3
    )
    trainer_for(model, args, [FreezeCallback()]).train()
    new_blocks = ("model.layers.2.", "model.layers.5.", "model.layers.8.")
    for name, parameter in model.named_parameters():
        moved = not torch.equal(parameter, before[name])
        if name.startswith(new_blocks):
            assert parameter.requires_grad
            # The zeroed projections move first (their gradient is not zero); the rest of a new block follows once
            # they are no longer zero, so at least the output projections must have moved.
            if "o_proj" in name or "down_proj" in name:
                assert moved, name
        else:
            assert not parameter.requires_grad and not moved, name
    assert any(
        not torch.equal(parameter, before[name])
        for name, parameter in model.named_parameters()
        if name.startswith(new_blocks) and "o_proj" not in name and "down_proj" not in name
    )


def test_layer_types_that_transformers_derives_are_written_out_extended(tmp_path):
    # An older config.json without `layer_types`: Qwen2 derives it from `max_window_layers` (full attention below
    # it). Derived again for six layers it would give sliding attention to layer 2, the copy of full-attention
    # layer 1: `expand` writes the list, each copy with its layer's kind.
    original, source = save(tmp_path, "qwen2", max_window_layers=2)
    config = json.loads((source / "config.json").read_text())
    del config["layer_types"]
    (source / "config.json").write_text(json.dumps(config))
    assert expand(source, tmp_path / "pro", 2) == 0
    written = json.loads((tmp_path / "pro" / "config.json").read_text())
    assert written["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 3
    assert_same_outputs(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "pro").eval()), logits(original))
