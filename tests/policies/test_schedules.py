"""Schedules as pure functions: selection over steps and epochs, determinism, configuration errors, shipped YAML."""

import random
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from hf_freeze import (
    STRATEGIES,
    FreezeArguments,
    FreezeConfigError,
    FreezeTrainingArguments,
    ModelLayout,
    TrainingProgress,
    decide,
)
from hf_freeze.policies import registration_decision
from hf_freeze.report import simulate_timeline

LAYERS = 8
LAYOUT = ModelLayout.from_layer_sizes([10] * LAYERS, embeddings=5, norm=2, head=3)
EMBEDDINGS, NORM, HEAD = {"embeddings.weight"}, {"norm.weight"}, {"head.weight", "head.bias"}
DYNAMIC = [name for name in STRATEGIES.names() if STRATEGIES.get(name).dynamic]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def frozen_layers(args, step=0, max_steps=100, epoch=0.0, num_epochs=0.0, seed=0):
    decision = decide(LAYOUT, args, TrainingProgress(step, max_steps, epoch, num_epochs, seed))
    return decision.frozen_layers(LAYOUT), decision


def test_the_four_schedules_are_registered_as_dynamic():
    assert set(DYNAMIC) >= {"progressive", "gradual_unfreezing", "lisa", "badam"}


# -- progressive freezing -----------------------------------------------------------------------------------------


def test_progressive_follows_composers_linear_schedule():
    args = FreezeArguments(freeze_strategy="progressive", freeze_start=0.2, freeze_level=0.5)
    counts = [len(frozen_layers(args, step)[0]) for step in range(101)]
    assert counts[:21] == [0] * 21  # nothing until freeze_start
    for step, count in enumerate(counts):
        if step > 20:
            assert count == int(0.5 * ((step / 100 - 0.2) / 0.8) * LAYERS), step  # Composer's arithmetic, truncated
    assert counts == sorted(counts) and counts[-1] == LAYERS // 2  # monotone up to freeze_level
    layers, decision = frozen_layers(args, 80)
    assert layers == list(range(len(layers)))  # bottom-up
    assert EMBEDDINGS <= decision.frozen and not (HEAD & decision.frozen)


def test_progressive_defaults_and_epoch_unit():
    args = FreezeArguments(freeze_strategy="progressive")  # Composer's defaults: start 0.5, level 1.0
    assert frozen_layers(args, 50)[0] == [] and len(frozen_layers(args, 99)[0]) == 7
    by_epoch = FreezeArguments(freeze_strategy="progressive", freeze_schedule_unit="epoch", freeze_start=0.0)
    # Only whole epochs count: mid-epoch progress changes nothing.
    assert frozen_layers(by_epoch, epoch=0.9, num_epochs=4)[0] == []
    assert frozen_layers(by_epoch, epoch=1.0, num_epochs=4)[0] == [0, 1]
    assert frozen_layers(by_epoch, epoch=2.5, num_epochs=4)[0] == [0, 1, 2, 3]


# -- gradual unfreezing -------------------------------------------------------------------------------------------


def test_gradual_unfreezing_unfreezes_top_down_every_n_units():
    args = FreezeArguments(freeze_strategy="gradual_unfreezing", freeze_schedule_unit="step", freeze_schedule_every=10)
    layers, decision = frozen_layers(args, 0)
    assert layers == list(range(LAYERS)) and EMBEDDINGS | NORM <= decision.frozen and not HEAD & decision.frozen
    assert frozen_layers(args, 9)[0] == list(range(LAYERS))
    assert frozen_layers(args, 10)[0] == list(range(LAYERS - 1))
    assert frozen_layers(args, 35)[0] == list(range(LAYERS - 3))
    layers, decision = frozen_layers(args, 80)
    assert layers == [] and not decision.frozen  # embeddings unfreeze last, with layer 0 (ULMFiT)
    assert EMBEDDINGS <= frozen_layers(args, 70)[1].frozen


def test_gradual_unfreezing_epoch_default_groups_and_start():
    args = FreezeArguments(freeze_strategy="gradual_unfreezing", freeze_layers=4, freeze_unfreeze_layers=3)
    assert frozen_layers(args, epoch=0.99)[0] == [0, 1, 2, 3]  # default unit: epoch, every 1
    assert frozen_layers(args, epoch=1.0)[0] == [0]
    assert frozen_layers(args, epoch=2.0)[0] == []
    # Lightning's BackboneFinetuning: the whole backbone at epoch 10.
    backbone = FreezeArguments(freeze_strategy="gradual_unfreezing", freeze_schedule_every=10, freeze_unfreeze_layers=99)
    assert frozen_layers(backbone, epoch=9.5)[0] == list(range(LAYERS)) and frozen_layers(backbone, epoch=10)[0] == []


def test_gradual_unfreezing_learning_rate_factor_grows_back_to_one():
    # Growth happens in every unit after unfreezing (Lightning grows the backbone's rate every epoch), not once per
    # schedule period.
    args = FreezeArguments(
        freeze_strategy="gradual_unfreezing", freeze_schedule_unit="step", freeze_schedule_every=10,
        freeze_unfreeze_lr_factor=0.1, freeze_unfreeze_lr_growth=2.0,
    )
    assert frozen_layers(args, 5)[1].update_factors == {}  # head and top layers trainable from the start: factor 1
    factors = frozen_layers(args, 32)[1].update_factors
    assert "layers.7.weight" not in factors and "layers.6.weight" not in factors  # unfrozen at steps 10, 20: back to 1
    assert factors["layers.5.weight"] == pytest.approx(0.1 * 2**2)  # unfrozen at step 30: 0.1, 0.2, 0.4
    assert [frozen_layers(args, s)[1].update_factors["layers.6.weight"] for s in range(20, 24)] == [0.1, 0.2, 0.4, 0.8]
    assert "layers.6.weight" not in frozen_layers(args, 24)[1].update_factors  # 1.6 is capped at 1 (should_align)
    assert frozen_layers(args, 12)[1].update_factors["norm.weight"] == pytest.approx(0.4)  # unfrozen with layer 7
    assert "head.weight" not in factors
    constant = FreezeArguments(**{**args.freeze_options(), "freeze_unfreeze_lr_growth": 1.0})
    assert frozen_layers(constant, 95)[1].update_factors["layers.7.weight"] == pytest.approx(0.1)


# -- LISA -----------------------------------------------------------------------------------------------------------


def test_lisa_trains_gamma_random_layers_per_period_reproducibly():
    args = FreezeArguments(freeze_strategy="lisa", freeze_active_layers=3, freeze_schedule_every=5)
    active_sets = []
    for step in range(0, 200):
        layers, decision = frozen_layers(args, step, seed=7)
        active = sorted(set(range(LAYERS)) - set(layers))
        assert len(active) == 3
        assert not (EMBEDDINGS | HEAD | NORM) & decision.frozen  # LISA always trains embeddings and head
        if step % 5:
            assert active == active_sets[-1]  # constant within a period
        else:
            active_sets.append(active)
    assert len({tuple(a) for a in active_sets}) > 10  # redrawn across periods
    assert {layer for active in active_sets for layer in active} == set(range(LAYERS))
    assert [frozen_layers(args, s, seed=7)[0] for s in range(0, 200, 5)] == [
        frozen_layers(args, s, seed=7)[0] for s in range(0, 200, 5)
    ]
    assert [frozen_layers(args, s, seed=8)[0] for s in range(0, 200, 5)] != [
        frozen_layers(args, s, seed=7)[0] for s in range(0, 200, 5)
    ]


# -- BAdam ----------------------------------------------------------------------------------------------------------


def active_layers(args, step, seed=0):
    return sorted(set(range(LAYERS)) - set(frozen_layers(args, step, seed=seed)[0]))


def test_badam_ascending_and_descending_orders():
    ascending = FreezeArguments(freeze_strategy="badam", freeze_schedule_every=3)
    assert [active_layers(ascending, step) for step in range(0, 30, 3)] == [[i % LAYERS] for i in range(10)]
    descending = FreezeArguments(freeze_strategy="badam", freeze_schedule_every=3, freeze_block_order="descending", freeze_active_layers=3)
    assert [active_layers(descending, step) for step in range(0, 12, 3)] == [[6, 7], [3, 4, 5], [0, 1, 2], [6, 7]]
    decision = frozen_layers(ascending, 0)[1]
    assert EMBEDDINGS | NORM <= decision.frozen and not HEAD & decision.frozen  # BAdam trains the blocks only


def test_badam_random_visits_every_block_once_per_pass():
    args = FreezeArguments(freeze_strategy="badam", freeze_schedule_every=2, freeze_block_order="random", freeze_active_layers=2)
    passes = [[tuple(active_layers(args, 2 * (4 * p + i), seed=3)) for i in range(4)] for p in range(6)]
    for visited in passes:
        assert sorted(visited) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert len(set(map(tuple, passes))) > 1  # a new permutation each pass


# -- generic, over the registry ------------------------------------------------------------------------------------

EXAMPLES = {
    "progressive": dict(freeze_start=0.1),
    "gradual_unfreezing": dict(freeze_schedule_unit="step", freeze_schedule_every=7, freeze_unfreeze_lr_factor=0.5),
    "lisa": dict(freeze_schedule_every=4),
    "badam": dict(freeze_schedule_every=4, freeze_block_order="random"),
    "staged": dict(freeze_stages={0: 6, 20: 3, 40: 0}),
    "adaptive": dict(freeze_layers=2, freeze_probe_steps=3, freeze_reselect_every=20),
}


def _measured_scores(name, step):
    """Scores standing in for measurements: a new draw for each adaptive round (what a probe would measure)."""
    if not STRATEGIES.get(name).needs_scores:
        return None
    return tuple(random.Random(f"scores:{step // 20}").random() for _ in range(LAYOUT.num_layers))


@pytest.mark.parametrize("name", DYNAMIC)
def test_every_schedule_is_pure_and_registers_what_it_trains(name):
    args = FreezeArguments(freeze_strategy=name, **EXAMPLES.get(name, {}))
    never_trained = registration_decision(LAYOUT, args).frozen
    seen = set()
    for step in range(60):
        progress = TrainingProgress(step, 60, step / 6, 10.0, seed=1, layer_scores=_measured_scores(name, step))
        decision = decide(LAYOUT, args, progress)
        assert decision == decide(LAYOUT, args, progress)  # a function of the progress alone
        assert never_trained <= decision.frozen  # what is not registered is never trained
        seen.add(decision.frozen)
    assert len(seen) > 1, "the schedule never changed the frozen set"


@pytest.mark.parametrize("name", DYNAMIC)
def test_every_schedule_has_an_example_config(name):
    path = CONFIGS / f"{name}.yaml"
    (args,) = HfArgumentParser(FreezeTrainingArguments).parse_yaml_file(str(path))
    assert args.freeze_strategy == name
    scores = [float(index % 3) for index in range(LAYOUT.num_layers)]
    timeline = simulate_timeline(LAYOUT, args, max_steps=200, steps_per_epoch=50, seed=args.seed, layer_scores=scores)
    assert len(timeline.changes) > 1


def test_registration_pins_only_what_the_options_freeze():
    lisa = FreezeArguments(freeze_strategy="lisa", freeze_embeddings=True)
    assert registration_decision(LAYOUT, lisa).frozen == EMBEDDINGS
    badam = FreezeArguments(freeze_strategy="badam", freeze_head=True)
    assert registration_decision(LAYOUT, badam).frozen == EMBEDDINGS | NORM | HEAD
    progressive = FreezeArguments(freeze_strategy="progressive")
    assert registration_decision(LAYOUT, progressive).frozen == frozenset()


def test_simulated_timeline_lists_each_change_once():
    args = FreezeArguments(freeze_strategy="gradual_unfreezing", freeze_schedule_every=1)
    timeline = simulate_timeline(LAYOUT, args, max_steps=40, steps_per_epoch=4)
    assert [entry["step"] for entry in timeline.changes] == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert [entry["epoch"] for entry in timeline.changes] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert timeline.changes[-1]["trainable_params"] == LAYOUT.num_parameters


# -- configuration errors ----------------------------------------------------------------------------------------

ERRORS = [
    (dict(freeze_strategy="progressive", freeze_start=1.0), "`freeze_start` must be a fraction of training in [0, 1) (got 1.0)"),
    (dict(freeze_strategy="progressive", freeze_level=0), "`freeze_level` must be a fraction of the layers in (0, 1] (got 0.0)"),
    (dict(freeze_strategy="lisa", freeze_schedule_every=0), "`freeze_schedule_every` must be an integer >= 1 (got 0)"),
    (dict(freeze_strategy="lisa", freeze_schedule_unit="epochs"), "must be one of 'step', 'epoch' (got 'epochs')"),
    (dict(freeze_strategy="badam", freeze_block_order="reverse"), "one of 'ascending', 'descending', 'random', 'fixed' (got 'reverse')"),
    (dict(freeze_strategy="lisa", freeze_active_layers=0), "`freeze_active_layers` must be an integer >= 1 (got 0)"),
    (dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_lr_factor=1.5), "`freeze_unfreeze_lr_factor` must be"),
    (dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_lr_growth=2.0), "needs `freeze_unfreeze_lr_factor`"),
    (dict(freeze_strategy="gradual_unfreezing", freeze_unfreeze_layers=0), "`freeze_unfreeze_layers` must be an integer >= 1"),
    (dict(freeze_strategy="gradual_unfreezing", freeze_layers=1.5), "`freeze_layers` must be layers frozen at the start"),
    (dict(freeze_strategy="bottom", freeze_layers=2, freeze_start=0.5), "does not use `freeze_start`"),
    (dict(freeze_strategy="progressive", freeze_schedule_every=5), "`freeze_schedule_every` is read by ['gradual_unfreezing', 'lisa', 'badam']"),
    (dict(freeze_strategy="lisa", freeze_schedule_every="20"), "`freeze_schedule_every` must be an integer (got '20')"),
    (dict(freeze_strategy="progressive", freeze_start=float("nan")), "`freeze_start` must be a finite number"),
]


@pytest.mark.parametrize("options,message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_configuration_errors_name_the_field_and_the_valid_values(options, message):
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(**options)
    assert message in str(error.value)


def test_model_dependent_errors_are_raised_before_training(tmp_path):
    from hf_freeze import LayerFreezer

    from tiny import tiny_bert

    model = tiny_bert()
    with pytest.raises(FreezeConfigError, match=r"`freeze_active_layers` must be at most the model's 4 layers \(got 5\)"):
        LayerFreezer(model, freeze_strategy="lisa", freeze_active_layers=5)  # checked once, when the freezer is built
    assert all(parameter.requires_grad for parameter in model.parameters())
