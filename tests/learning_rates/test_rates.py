"""Learning rates per part and per layer, without a Trainer: the rate of every parameter, the param groups a plain
loop builds its optimizer from, the table, and every refusal (field named, value shown, what is valid listed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import build, tiny_llava

from hf_freeze import FreezeArguments, FreezeConfigError, LayerFreezer, ModelLayout
from hf_freeze.apply.param_groups import decay_parameter_names
from hf_freeze.learning_rates import learning_rates
from hf_freeze.tools.validate import check_config

BASE = 1e-3


def _options(**values):
    return SimpleNamespace(**{"freeze_learning_rates": None, "freeze_layer_lr_decay": None, **values})


def _rate_of_each_parameter(groups):
    return {id(parameter): group["lr"] for group in groups for parameter in group["params"]}


def test_layer_wise_decay_factors_are_exact():
    layout = ModelLayout.from_layer_sizes([10] * 5, embeddings=5, norm=2, head=3)
    rates = learning_rates(layout, _options(freeze_layer_lr_decay=0.8))
    for index in range(5):
        assert rates[f"layers.{index}.weight"].factor == 0.8 ** (5 - 1 - index)
        assert rates[f"layers.{index}.weight"].group == f"layer.{index}"
    assert rates["embeddings.weight"].factor == 0.8 ** 5  # below layer 0
    assert rates["norm.weight"].factor == rates["head.weight"].factor == 1.0  # the top rate
    assert learning_rates(layout, _options()) == {}  # no option: no groups of its own


def test_every_parameter_of_a_real_model_trains_at_base_times_its_decay():
    model = build("llama", num_hidden_layers=4)
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=1, freeze_layer_lr_decay=0.5)
    freezer.apply()
    groups = freezer.parameter_groups(BASE, weight_decay=0.01)
    rate = _rate_of_each_parameter(groups)
    named = dict(model.named_parameters())
    trainable = {name for name, parameter in named.items() if parameter.requires_grad}
    assert {id(named[name]) for name in trainable} == set(rate)  # every trainable parameter, once; nothing frozen
    for name in trainable:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            assert rate[id(named[name])] == BASE * 0.5 ** (4 - 1 - layer), name
        else:  # the final norm and the head (embeddings are frozen by 'bottom')
            assert rate[id(named[name])] == BASE, name
    # The Trainer's weight-decay split is kept inside every rate group.
    decays = set(decay_parameter_names(model))
    by_id = {id(parameter): name for name, parameter in named.items()}
    for group in groups:
        names = [by_id[id(p)] for p in group["params"]]
        assert all((name in decays) == (group["weight_decay"] == 0.01) for name in names), group["hf_freeze_group"]
    # The Trainer logs the first group's rate as `learning_rate`: it is the base rate's group.
    assert groups[0]["lr"] == BASE


def test_rates_by_part_and_by_pattern_on_a_vision_language_model():
    model = tiny_llava()
    rates = {"vision_tower": 2.0e-6, "multi_modal_projector": 1.0e-4, "language_model": 1.0e-5,
             "model.language_model.embed_tokens": "3e-5"}  # PyYAML reads 3e-5 as text: read as a number
    freezer = LayerFreezer(model, freeze_learning_rates=rates, freeze_layer_lr_decay=0.8)
    freezer.apply()
    rate = _rate_of_each_parameter(freezer.parameter_groups(BASE))
    language_layers = 3
    for name, parameter in model.named_parameters():
        got = rate[id(parameter)]
        if name.startswith("model.vision_tower."):
            assert got == 2.0e-6, name  # outside the counted stack: no decay
        elif name.startswith("model.multi_modal_projector."):
            assert got == 1.0e-4, name
        elif name.startswith("model.language_model.embed_tokens"):
            assert got == 3e-5 * 0.8 ** language_layers, name  # the pattern wins over the part, decay below layer 0
        elif name.startswith("model.language_model.layers."):
            layer = int(name.split(".")[3])
            assert got == 1.0e-5 * 0.8 ** (language_layers - 1 - layer), name
        else:  # the language model's final norm and the LM head: its rate, at the top
            assert got == 1.0e-5, name
    table = freezer.table()
    assert table.splitlines()[0].split()[-1] == "lr"
    assert "2e-06" in table and "1e-05 ×0.64" in table


def test_without_rate_options_the_groups_are_the_trainers_two():
    model = build("bert")
    freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2)
    freezer.apply()
    groups = freezer.parameter_groups(BASE, weight_decay=0.1)
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0]
    assert not any("hf_freeze_group" in group for group in groups) and not freezer.sets_learning_rates
    assert "lr" not in freezer.table().splitlines()[0].split()


def test_an_optimizer_built_without_the_groups_is_refused():
    model = build("gpt2")
    freezer = LayerFreezer(model, freeze_layer_lr_decay=0.9)
    freezer.apply()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(FreezeConfigError, match="parameter_groups") as error:
        freezer.apply(optimizer=optimizer)
    assert error.value.fields == ("freeze_layer_lr_decay",)
    freezer.apply(optimizer=torch.optim.AdamW(freezer.parameter_groups(BASE)))  # built from the groups: accepted


@pytest.mark.parametrize("decay", [0, -0.5, 1.5])
def test_a_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(FreezeConfigError) as error:
        LayerFreezer(build("gpt2"), freeze_layer_lr_decay=decay)
    assert error.value.fields == ("freeze_layer_lr_decay",)
    assert repr(float(decay)) in str(error.value) and "(0, 1]" in str(error.value)


@pytest.mark.parametrize("rates, expected", [
    ({"language_model": 0}, "a learning rate > 0"),
    ({"language_model": "fast"}, "a learning rate > 0"),
    ({"vision_tower": 1e-5, "vision": 2e-5}, "names one part twice"),
    ({"transformer.h.[": 1e-5}, "valid regular expression"),
    ([1e-5], "a mapping from a part or a parameter-name pattern"),
])
def test_bad_rate_mappings_are_refused_naming_the_field(rates, expected):
    with pytest.raises(FreezeConfigError, match=expected) as error:
        LayerFreezer(build("gpt2"), freeze_learning_rates=rates)
    assert error.value.fields == ("freeze_learning_rates",)


def test_a_part_the_model_does_not_have_is_refused_listing_what_it_has():
    with pytest.raises(FreezeConfigError) as error:
        LayerFreezer(build("gpt2"), freeze_learning_rates={"vision_tower": 2e-6})
    message = str(error.value)
    assert error.value.fields == ("freeze_learning_rates",)
    assert "'vision_tower'" in message and "2e-06" in message and "single-part model" in message
    assert "transformer.wte.weight" in message  # what a pattern would name
    with pytest.raises(FreezeConfigError, match="its parts are vision, projector, language") as error:
        LayerFreezer(tiny_llava(), freeze_learning_rates={"audio_tower": 2e-6})
    with pytest.raises(FreezeConfigError, match="nor a pattern that matches") as error:
        LayerFreezer(build("gpt2"), freeze_learning_rates={"model.layers": 2e-6})


def test_rates_on_a_model_with_a_peft_adapter_are_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(FreezeConfigError, match="PEFT adapter") as error:
        LayerFreezer(model, freeze_layer_lr_decay=0.8)
    assert error.value.fields == ("freeze_layer_lr_decay",)


def test_validate_refuses_the_rate_options_before_training():
    problems = check_config({"freeze_layer_lr_decay": 2.0, "learning_rate": 1e-4})
    assert [problem.fields for problem in problems] == [("freeze_layer_lr_decay",)]
    problems = check_config({"freeze_learning_rates": {"vision_tower": 1e-5}}, model=build("gpt2"))
    assert [problem.fields for problem in problems] == [("freeze_learning_rates",)]
    assert "no vision part" in problems[0].message
    assert check_config({"freeze_learning_rates": {"transformer.h.0": 1e-5}, "freeze_layer_lr_decay": 0.9}, model=build("gpt2")) == []


def test_the_rate_options_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(FreezeArguments).parse_args_into_dataclasses(
        ["--freeze_learning_rates", '{"transformer.h.0": 1e-5}', "--freeze_layer_lr_decay", "0.8"])
    assert arguments.freeze_layer_lr_decay == 0.8
    rate = learning_rates(LayerFreezer(build("gpt2"), arguments).layout, arguments)["transformer.h.0.attn.c_attn.weight"]
    assert (rate.group, rate.rate, rate.factor) == ("transformer.h.0/layer.0", 1e-5, 0.8 ** 3)
