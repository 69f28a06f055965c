"""`llama_pro` against LLaMA-Factory's freeze tuning with `use_llama_pro` (`_setup_freeze_tuning` in
src/llamafactory/model/adapter.py), transcribed below in our own words.

What LLaMA-Factory does with `use_llama_pro`: `freeze_trainable_layers` is the number N of blocks the expansion
added; the model's layer count must be a multiple of N (an error otherwise); with stride = layers // N, the trainable
layer indices start at stride - 1 and go up by stride, N of them: the last layer of each group, where
scripts/llama_pro.py put its copies. `freeze_trainable_modules` and `freeze_extra_modules` then work as in plain
freeze tuning ('.<index>.<module>' markers for the trainable layers, extra module names as substrings).
"""

import functools

import pytest

from hf_freeze import FreezeArguments, FreezeConfigError, ModelLayout, decide, discover_layout

from tiny import build


def llama_factory_pro_layers(num_layers, num_new_blocks):
    stride = num_layers // num_new_blocks
    return list(range(stride - 1, num_layers + stride - 1, stride))


def llama_factory_pro_trainable(names, num_layers, num_new_blocks, trainable_modules=("all",), extra_modules=()):
    indices = llama_factory_pro_layers(num_layers, num_new_blocks)
    markers = [f".{index}.{'' if module == 'all' else module}" for module in trainable_modules for index in indices]
    markers += list(extra_modules)
    return {name for name in names if any(marker in name for marker in markers)}


def trainable(layout, **options):
    decision = decide(layout, FreezeArguments(freeze_strategy="llama_pro", **options))
    return set(layout.parameter_names) - decision.frozen


@pytest.mark.parametrize(
    "num_layers,num_new_blocks",
    [(2, 1), (6, 2), (6, 3), (8, 4), (10, 2), (12, 3), (12, 4), (12, 6), (40, 8), (48, 16)],
)
def test_trains_exactly_llama_factorys_layers(num_layers, num_new_blocks):
    layout = ModelLayout.from_layer_sizes([4] * num_layers, embeddings=8, norm=2, head=8)
    expected = {f"layers.{index}.weight" for index in llama_factory_pro_layers(num_layers, num_new_blocks)}
    assert trainable(layout, freeze_num_new_blocks=num_new_blocks) == expected
    # The new blocks of an expansion by N, each after k = layers / N - 1 original layers.
    group = num_layers // num_new_blocks
    new_blocks = sorted(int(name.split(".")[1]) for name in expected)
    assert new_blocks == [g * group + group - 1 for g in range(num_new_blocks)]


@functools.lru_cache(maxsize=None)
def expanded_llama_facts(num_layers):
    model = build("llama", num_hidden_layers=num_layers)
    return discover_layout(model), tuple(name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    "num_layers,num_new_blocks,modules,extra",
    [
        (6, 2, None, None),
        (6, 3, ["self_attn"], None),
        (6, 1, ["mlp", "post_attention_layernorm"], ["norm"]),
        (8, 4, None, ["embed_tokens", "lm_head"]),
    ],
)
def test_module_options_work_as_in_llama_factory(num_layers, num_new_blocks, modules, extra):
    layout, names = expanded_llama_facts(num_layers)
    expected = llama_factory_pro_trainable(names, num_layers, num_new_blocks, modules or ("all",), extra or ())
    got = trainable(
        layout, freeze_num_new_blocks=num_new_blocks, freeze_trainable_modules=modules, freeze_extra_modules=extra
    )
    assert got == expected


@pytest.mark.parametrize("num_new_blocks", [4, 5, 6, 7])
def test_a_count_that_does_not_split_the_layers_is_refused_with_the_valid_ones(num_new_blocks):
    layout = ModelLayout.from_layer_sizes([4] * 6)
    with pytest.raises(FreezeConfigError) as error:
        decide(layout, FreezeArguments(freeze_strategy="llama_pro", freeze_num_new_blocks=num_new_blocks))
    assert list(error.value.fields) == ["freeze_num_new_blocks"]
    # 6 layers hold 1, 2 or 3 new blocks (groups of 6, 3 or 2); 6 would leave no original layer at all.
    assert f"(got {num_new_blocks})" in str(error.value) and "1, 2, 3" in str(error.value)


@pytest.mark.parametrize("value", [None, 0, -2])
def test_a_missing_or_non_positive_count_is_refused_when_the_options_are_built(value):
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(freeze_strategy="llama_pro", freeze_num_new_blocks=value)
    assert "freeze_num_new_blocks" in error.value.fields
