"""Which policy runs on which backend: the pure rules, reading the backend's settings, and the callback's refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils.constants import FSDP_AUTO_WRAP_POLICY
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import Trainer, TrainingArguments

import hf_freeze.integrations.support as distributed
from hf_freeze import FreezeCallback, FreezeConfigError, LayerFreezer
from hf_freeze.integrations.backends import DistributedSetup, detect_setup
from hf_freeze.integrations.support import (
    PolicyFacts,
    applies_before_wrap,
    check_support,
    flat_parameter_units,
    mixed_units,
    raise_if_changed_after_wrap,
)
from hf_freeze.processes import raise_if_ranks_disagree
from tiny import build, trainer_for, training_kwargs

SINGLE = DistributedSetup()
DDP = DistributedSetup("ddp", world_size=2, find_unused_parameters=True)
DDP_CHECKPOINTING = DistributedSetup("ddp", world_size=2, find_unused_parameters=False, gradient_checkpointing=True)
DDP_STATIC_GRAPH = DistributedSetup("ddp", world_size=2, find_unused_parameters=True, static_graph=True)
FSDP1 = DistributedSetup("fsdp", world_size=2, fsdp_version=1, fsdp_use_orig_params=False, fsdp_wrap_classes=("BertLayer",))
FSDP1_ORIG = DistributedSetup("fsdp", world_size=2, fsdp_version=1, fsdp_use_orig_params=True)
FSDP2 = DistributedSetup("fsdp", world_size=2, fsdp_version=2)
ZERO3 = DistributedSetup("deepspeed", world_size=2, zero_stage=3)

STATIC = PolicyFacts("bottom", dynamic=False, trainable=20, frozen=10)
STATIC_MIXED_UNIT = PolicyFacts("bitfit", dynamic=False, trainable=20, frozen=10,
                                mixed_units=(("bert.encoder.layer.0", "bert.encoder.layer.0.output.dense.weight",
                                              "bert.encoder.layer.0.output.dense.bias"),))
DYNAMIC = PolicyFacts("a_schedule", dynamic=True, trainable=20, frozen=10)


@pytest.mark.parametrize(
    "setup, policy",
    [
        (SINGLE, STATIC), (SINGLE, DYNAMIC), (DDP, STATIC), (DDP, DYNAMIC), (DDP_CHECKPOINTING, STATIC),
        (DDP_STATIC_GRAPH, STATIC), (FSDP1, STATIC), (FSDP1_ORIG, STATIC_MIXED_UNIT), (FSDP2, STATIC_MIXED_UNIT),
        (FSDP2, DYNAMIC), (ZERO3, STATIC_MIXED_UNIT), (ZERO3, DYNAMIC),
    ],
)
def test_supported_combinations(setup, policy):
    assert check_support(setup, policy) is None


@pytest.mark.parametrize(
    "setup, policy, fragments",
    [
        (DDP_CHECKPOINTING, DYNAMIC, ["'a_schedule'", "`ddp_find_unused_parameters: true`", "gradient checkpointing"]),
        (DistributedSetup("ddp", 2, find_unused_parameters=False), DYNAMIC, ["`ddp_find_unused_parameters: true`"]),
        (DDP_STATIC_GRAPH, DYNAMIC, ["`ddp_static_graph: false`"]),
        (FSDP1, STATIC_MIXED_UNIT, ["use_orig_params: true", "fsdp_version: 2", "'bert.encoder.layer.0'", "#1702"]),
        (FSDP1_ORIG, DYNAMIC, ["FSDP1", "FSDP2", "DDP", "ddp_find_unused_parameters: true"]),
        (ZERO3, PolicyFacts("adaptive", dynamic=True, trainable=20, frozen=10, probes=True),
         ["DeepSpeed ZeRO-3", "probe", "inside `backward`", "FSDP2", "LISA"]),
        (ZERO3, PolicyFacts("gradual_unfreezing", dynamic=True, trainable=20, frozen=10, scales_updates=True),
         ["DeepSpeed ZeRO-3", "`freeze_unfreeze_lr_factor`", "FSDP2"]),
    ],
)
def test_unsupported_combinations_name_the_fix(setup, policy, fragments):
    message = check_support(setup, policy)
    assert message is not None
    for fragment in fragments:
        assert fragment in message


def test_only_a_dynamic_policy_under_multi_process_ddp_waits_for_the_wrap():
    assert applies_before_wrap(DDP, STATIC) and applies_before_wrap(SINGLE, DYNAMIC)
    assert not applies_before_wrap(DDP, DYNAMIC)


# -- reading the backend from the Trainer's settings -------------------------------------------------------------


def test_ddp_find_unused_parameters_follows_the_trainer_default():
    model = build("bert")
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=None, ddp_static_graph=None)
    assert detect_setup(args, model, state=None).find_unused_parameters is True
    args.gradient_checkpointing = True  # the Trainer turns its default off with checkpointing
    setup = detect_setup(args, model, state=None)
    assert (setup.backend, setup.find_unused_parameters, setup.gradient_checkpointing) == ("ddp", False, True)
    args.ddp_find_unused_parameters = True
    assert detect_setup(args, model, state=None).find_unused_parameters is True
    assert detect_setup(SimpleNamespace(world_size=1), model, state=None).backend == "single"


def test_fsdp1_settings_from_training_arguments(tmp_path):
    args = TrainingArguments(
        **training_kwargs(tmp_path),
        fsdp="full_shard",
        fsdp_config={"version": 1, "use_orig_params": False, "transformer_layer_cls_to_wrap": ["BertLayer"]},
    )
    setup = detect_setup(args, build("bert"), state=None)
    assert (setup.backend, setup.fsdp_version, setup.fsdp_use_orig_params) == ("fsdp", 1, False)
    assert setup.fsdp_wrap_classes == ("BertLayer",)


def test_backends_from_accelerate_state():
    model = build("bert")
    fsdp1 = SimpleNamespace(num_processes=2, deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(
        fsdp_version=1, use_orig_params=False, auto_wrap_policy=transformer_auto_wrap_policy,
        transformer_cls_names_to_wrap=None))
    setup = detect_setup(None, model, state=fsdp1)
    assert (setup.backend, setup.fsdp_use_orig_params) == ("fsdp", False)
    assert setup.fsdp_wrap_classes == tuple(model._no_split_modules)  # accelerate's default units
    fsdp2 = SimpleNamespace(num_processes=2, deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(
        fsdp_version=2, use_orig_params=None, auto_wrap_policy=FSDP_AUTO_WRAP_POLICY[0]))
    assert detect_setup(None, model, state=fsdp2).describe() == "FSDP2"
    zero = SimpleNamespace(num_processes=2, fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    assert detect_setup(None, model, state=zero).describe() == "DeepSpeed ZeRO-3"


# -- FSDP1 units -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, wrap_classes, mixed",
    [
        ({"freeze_strategy": "top", "freeze_layers": 2}, ("BertLayer",), []),
        # bottom freezes the embeddings, which share the root unit with the trainable pooler and classifier.
        ({"freeze_strategy": "bottom", "freeze_layers": 2}, ("BertLayer",), [""]),
        ({"freeze_strategy": "bottom", "freeze_layers": 2}, ("BertLayer", "BertEmbeddings"), []),
        ({"freeze_strategy": "bitfit"}, ("BertLayer",), [""] + [f"bert.encoder.layer.{i}" for i in range(4)]),
        ({"freeze_strategy": "top", "freeze_layers": 2}, (), [""]),  # no auto-wrap: one unit
    ],
)
def test_fsdp1_units_that_a_policy_would_mix(policy, wrap_classes, mixed):
    model = build("bert")
    frozen = LayerFreezer(model, **policy).decide().frozen
    units = flat_parameter_units(model, wrap_classes)
    assert [unit for unit, _, _ in mixed_units(units, frozen)] == mixed


# -- the callback refuses before any step ------------------------------------------------------------------------


def test_callback_refuses_fsdp1_without_orig_params_in_trainer_init(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "detect_setup", lambda args, model: FSDP1)
    with pytest.raises(FreezeConfigError, match="use_orig_params: true"):
        trainer_for(build("bert"), TrainingArguments(**training_kwargs(tmp_path)),
                    callbacks=[FreezeCallback(freeze_strategy="bottom", freeze_layers=2)])


def test_callback_accepts_fsdp1_units_that_stay_uniform(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "detect_setup", lambda args, model: FSDP1)
    model = build("bert")
    trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)),
                callbacks=[FreezeCallback(freeze_strategy="top", freeze_layers=2)])
    assert not model.bert.encoder.layer[3].output.dense.weight.requires_grad


def test_callback_refuses_a_policy_that_freezes_everything(tmp_path):
    model = build("bert")
    with pytest.raises(FreezeConfigError, match="freezes every parameter"):
        trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)),
                    callbacks=[FreezeCallback(freeze_strategy="pattern", freeze_patterns=[".*"])])
    assert all(parameter.requires_grad for parameter in model.parameters())  # refused before changing anything


def test_flipping_requires_grad_after_a_wrap_is_refused():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    freezer = LayerFreezer(net, freeze_strategy="pattern", freeze_patterns=["0.bias"])
    flips = freezer.would_change()
    raise_if_changed_after_wrap(SINGLE, flips)  # one process, no wrapper: re-applying is fine
    with pytest.raises(FreezeConfigError, match=r"1 parameter\(s\) would change `requires_grad` after DDP"):
        raise_if_changed_after_wrap(DDP, flips)
    net[0].bias.requires_grad_(False)
    raise_if_changed_after_wrap(DDP, freezer.would_change())  # already matching: nothing flips


def test_rank_agreement_is_a_no_op_without_a_process_group():
    raise_if_ranks_disagree(["anything"])  # one process: nothing to compare, no collective


@pytest.mark.parametrize("setup", [FSDP2, ZERO3], ids=["fsdp2", "zero3"])
def test_callback_refuses_trainable_rows_on_sharded_parameters(tmp_path, monkeypatch, setup):
    monkeypatch.setattr(distributed, "detect_setup", lambda args, model: setup)
    model = build("bert")
    with pytest.raises(FreezeConfigError, match="shards the parameters they belong to"):
        trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)),
                    callbacks=[FreezeCallback(freeze_trainable_tokens=[5])])
    assert not hasattr(model, "hf_freeze_rows")  # refused before anything was attached


@pytest.mark.parametrize("setup", [FSDP2, ZERO3], ids=["fsdp2", "zero3"])
def test_frozen_weights_in_half_precision_are_refused_under_sharding(tmp_path, monkeypatch, setup):
    monkeypatch.setattr(distributed, "detect_setup", lambda args, model: setup)
    model = build("bert")
    with pytest.raises(FreezeConfigError, match="`freeze_frozen_dtype` cannot run under") as error:
        trainer_for(model, TrainingArguments(**training_kwargs(tmp_path)),
                    callbacks=[FreezeCallback(freeze_strategy="bottom", freeze_layers=2, freeze_frozen_dtype="bfloat16")])
    assert error.value.fields == ("freeze_frozen_dtype",)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # refused before anything was converted


def test_a_changing_policy_under_deepspeed_refuses_an_optimizer_it_cannot_group(tmp_path, monkeypatch):
    """Under ZeRO a schedule needs the optimizer built over one param group per block (`apply.frozen_groups`): an
    optimizer passed to the Trainer cannot be, and is refused in `Trainer.__init__`."""
    monkeypatch.setattr(distributed, "detect_setup", lambda args, model: ZERO3)
    model = build("bert")
    given = torch.optim.AdamW(model.parameters())
    with pytest.raises(FreezeConfigError, match=r"`freeze_strategy` 'lisa' cannot change the frozen set under DeepSpeed"):
        Trainer(model=model, args=TrainingArguments(**training_kwargs(tmp_path)), optimizers=(given, None),
                callbacks=[FreezeCallback(freeze_strategy="lisa", freeze_active_layers=1)])
