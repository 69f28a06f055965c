"""`llama_factory` against LLaMA-Factory's freeze tuning (`_setup_freeze_tuning` in
src/llamafactory/model/adapter.py), transcribed below in our own words, on eleven decoder architectures.

What LLaMA-Factory does: the trainable layer indices are the last N (N > 0) or the first |N| (N < 0) of the
config's layer count. For every module name in `freeze_trainable_modules` it makes the marker '.<index>.<module>'
('.<index>.' for 'all') for each trainable index; for every name in `freeze_extra_modules` the marker is the name
itself. A parameter trains when its name contains any marker, as a substring; all others are frozen. A
`freeze_trainable_modules` name must be a direct submodule of the layers, a `freeze_extra_modules` name the module
holding a parameter whose name has no '.<number>.' part; anything else is an error that lists the choices.
(LLaMA-Factory's vision-tower exclusions are left out: these are text models.)
"""

import functools
import re

import pytest

from hf_freeze import FreezeArguments, FreezeConfigError, decide, discover_layout

from tiny import build

ARCHITECTURES = ["gpt2", "llama", "mistral", "qwen2", "qwen3_moe", "gemma2", "phi3", "gpt_neox", "opt", "falcon", "bloom"]


def llama_factory_trainable(names, num_layers, trainable_layers, trainable_modules=("all",), extra_modules=()):
    if trainable_layers > 0:
        indices = range(max(0, num_layers - trainable_layers), num_layers)
    else:
        indices = range(min(-trainable_layers, num_layers))
    markers = [f".{index}.{'' if module == 'all' else module}" for module in trainable_modules for index in indices]
    markers += list(extra_modules)
    return {name for name in names if any(marker in name for marker in markers)}


def layer_submodules(names):
    """The module names LLaMA-Factory accepts in `freeze_trainable_modules` (those after '.0.' or '.1.')."""
    found = set()
    for name in names:
        for marker in (".0.", ".1."):
            if marker in name:
                found.add(name.split(marker)[-1].split(".")[0])
                break
    return found


def outside_modules(names):
    return {name.split(".")[-2] for name in names if re.search(r"\.\d+\.", name) is None}


@functools.lru_cache(maxsize=None)
def model_facts(architecture):
    model = build(architecture)
    names = tuple(name for name, _ in model.named_parameters())
    return discover_layout(model), names, model.config.num_hidden_layers


def hf_freeze_trainable(layout, **options):
    decision = decide(layout, FreezeArguments(freeze_strategy="llama_factory", **options))
    return set(layout.parameter_names) - decision.frozen


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trainable_layers_modules_and_extra_modules_match_llama_factory(architecture):
    layout, names, num_layers = model_facts(architecture)
    assert layout.num_layers == num_layers
    submodules, extras = sorted(layer_submodules(names)), sorted(outside_modules(names))
    assert len(submodules) >= 2 and extras, architecture
    checked = 0
    for count in (1, 2, -1, -3, num_layers):
        cases = [dict(), dict(freeze_trainable_modules=submodules[-2:])]
        cases += [dict(freeze_trainable_modules=[module]) for module in submodules]  # each one LLaMA-Factory accepts
        cases += [dict(freeze_extra_modules=[extra]) for extra in extras]
        cases += [dict(freeze_trainable_modules=[submodules[-1]], freeze_extra_modules=extras)]
        for case in cases:
            expected = llama_factory_trainable(
                names, num_layers, count, case.get("freeze_trainable_modules", ["all"]), case.get("freeze_extra_modules", [])
            )
            assert hf_freeze_trainable(layout, freeze_trainable_layers=count, **case) == expected, (count, case)
            checked += 1
    assert checked >= 20


def test_norm_as_an_extra_module_trains_every_layers_norms_too():
    layout, names, _ = model_facts("llama")
    trainable = hf_freeze_trainable(layout, freeze_trainable_layers=1, freeze_extra_modules=["norm"])
    assert "model.norm.weight" in trainable
    assert {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"} <= trainable
    assert "model.layers.0.mlp.up_proj.weight" not in trainable and "model.layers.3.mlp.up_proj.weight" in trainable
    only_attention = hf_freeze_trainable(layout, freeze_trainable_layers=-1, freeze_trainable_modules=["self_attn"])
    assert only_attention == {name for name in names if name.startswith("model.layers.0.self_attn.")}


@pytest.mark.parametrize(
    "options,field,listed",
    [
        (dict(freeze_trainable_modules=["attention"]), "freeze_trainable_modules", "'self_attn'"),
        (dict(freeze_extra_modules=["final_norm"]), "freeze_extra_modules", "'embed_tokens'"),
        (dict(freeze_extra_modules=["layers"]), "freeze_extra_modules", "'lm_head'"),
    ],
)
def test_a_module_the_model_does_not_have_is_refused_listing_the_choices(options, field, listed):
    layout, _, _ = model_facts("llama")
    with pytest.raises(FreezeConfigError) as error:
        decide(layout, FreezeArguments(freeze_strategy="llama_factory", freeze_trainable_layers=1, **options))
    assert error.value.fields == (field,) and listed in str(error.value) and f"`{field}`" in str(error.value)


@pytest.mark.parametrize("options", [dict(freeze_trainable_modules=[]), dict(freeze_extra_modules=[""])])
def test_empty_module_lists_are_refused_when_the_options_are_built(options):
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(freeze_strategy="llama_factory", freeze_trainable_layers=1, **options)
    assert error.value.fields == tuple(options)


def test_an_explicit_non_layer_option_still_wins():
    layout, _, _ = model_facts("llama")
    trainable = hf_freeze_trainable(layout, freeze_trainable_layers=1, freeze_extra_modules=["lm_head"], freeze_head=True)
    assert "lm_head.weight" not in trainable
    trainable = hf_freeze_trainable(layout, freeze_trainable_layers=1, freeze_head=False)
    assert "lm_head.weight" in trainable and "model.embed_tokens.weight" not in trainable
