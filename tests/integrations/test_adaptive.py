"""Adaptive freezing: pure selection, scores with known answers, a real Trainer, re-selection, resume, config errors."""

import json

import pytest
import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from hf_freeze import FreezeArguments, FreezeCallback, FreezeConfigError, LayerFreezer, ModelLayout, TrainingProgress, decide
from hf_freeze.policies.adaptive import adaptive_round, select_layers
from hf_freeze.scores import SCORES, WEIGHT_SAMPLE_SIZE, SnrMeter, WeightChangeMeter, matrix_snr
from hf_freeze.report import TIMELINE_JSON, TIMELINE_PNG

from tiny import SaveAt, TokenClassificationData, snapshot, tiny_bert, trainer_for, training_kwargs

LAYOUT = ModelLayout.from_layer_sizes([10] * 6, embeddings=5, norm=2, head=3)
SCORES_6 = (0.4, 0.1, 0.6, 0.2, 0.5, 0.3)


def _adaptive(**options):
    return FreezeArguments(freeze_strategy="adaptive", **{"freeze_layers": 2, **options})


def _frozen_layers(args, step, scores=SCORES_6, max_steps=100):
    progress = TrainingProgress(step=step, max_steps=max_steps, layer_scores=scores)
    return decide(LAYOUT, args, progress).frozen_layers(LAYOUT)


# -- the pure policy -----------------------------------------------------------------------------------------------


def test_selection_freezes_the_lowest_or_the_highest_scores():
    assert _frozen_layers(_adaptive(freeze_probe_steps=5), step=5) == [1, 3]
    assert _frozen_layers(_adaptive(freeze_probe_steps=5, freeze_select="highest"), step=5) == [2, 4]
    assert _frozen_layers(_adaptive(freeze_probe_steps=5, freeze_layers=0.5), step=5) == [1, 3, 5]
    assert select_layers([1.0, 1.0, 0.0, 1.0], 2) == [0, 2]  # ties go to the lower index: the same on every rank


def test_embeddings_freeze_with_the_first_layer_unless_told_otherwise():
    scores = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
    progress = TrainingProgress(step=5, max_steps=100, layer_scores=scores)
    assert "embeddings.weight" in decide(LAYOUT, _adaptive(freeze_probe_steps=5), progress).frozen
    assert "embeddings.weight" not in decide(LAYOUT, _adaptive(freeze_probe_steps=5, freeze_embeddings=False), progress).frozen
    assert "embeddings.weight" not in decide(LAYOUT, _adaptive(freeze_probe_steps=5), TrainingProgress(5, 100, layer_scores=SCORES_6)).frozen


def test_rounds_probe_with_every_layer_then_apply_the_selection():
    args = _adaptive(freeze_probe_steps=3, freeze_reselect_every=10)
    frozen = [_frozen_layers(args, step) for step in range(25)]
    for step in range(25):
        assert frozen[step] == ([] if step % 10 < 3 else [1, 3]), step
    assert adaptive_round(args, TrainingProgress(step=12, max_steps=25)).index == 1
    # The default probe is 5% of training, at least one step.
    assert adaptive_round(_adaptive(), TrainingProgress(step=0, max_steps=200)).probe_end == 10
    assert adaptive_round(_adaptive(), TrainingProgress(step=0, max_steps=4)).probe_end == 1
    # A score read off the weights needs no probe: the selection applies from the round's first step.
    assert _frozen_layers(_adaptive(freeze_score="snr"), step=0) == [1, 3]


def test_without_measured_scores_nothing_is_frozen_and_the_decision_says_why():
    decision = decide(LAYOUT, _adaptive(freeze_probe_steps=2), TrainingProgress(step=5, max_steps=100))
    assert decision.frozen_layers(LAYOUT) == []
    assert any("no weight_change scores measured yet" in note for note in decision.notes)


CONFIG_ERRORS = [
    (dict(freeze_score="weight_chnage"), "`freeze_score` must be one of 'weight_change', 'grad_norm', 'grad_norm_change', 'snr'"),
    (dict(freeze_score="grad_norm_change", freeze_probe_steps=1), "must be at least 2 steps for `freeze_score` 'grad_norm_change'"),
    (dict(freeze_select="middle"), "`freeze_select` must be one of 'lowest', 'highest' (got 'middle')"),
    (dict(freeze_score="snr", freeze_probe_steps=5), "`freeze_probe_steps` (5) is not used by `freeze_score` 'snr'"),
    (dict(freeze_probe_steps=0), "`freeze_probe_steps` must be a count of steps >= 1"),
    (dict(freeze_probe_steps=1.5), "`freeze_probe_steps` must be a count of steps >= 1 or a fraction"),
    (dict(freeze_probe_steps=10, freeze_reselect_every=10), "must be shorter than `freeze_reselect_every` (10)"),
    (dict(freeze_reselect_every=0), "`freeze_reselect_every` must be a number of steps >= 1 (got 0)"),
    (dict(freeze_layers=None), "`freeze_layers` must be set for this strategy"),
    (dict(freeze_layers=1.5), "`freeze_layers` must be a whole count of layers >= 0 or a fraction in (0, 1)"),
    (dict(freeze_score=3), "`freeze_score` must be a score name"),
]


@pytest.mark.parametrize("options, message", CONFIG_ERRORS)
def test_bad_options_are_refused_when_the_config_is_built(options, message):
    with pytest.raises(FreezeConfigError) as error:
        _adaptive(**options)
    assert message in str(error.value)


def test_options_of_adaptive_are_refused_by_other_strategies():
    with pytest.raises(FreezeConfigError, match="does not use `freeze_score`.*read by \\['adaptive'\\]"):
        FreezeArguments(freeze_strategy="bottom", freeze_layers=2, freeze_score="snr")


def test_a_probe_as_long_as_training_is_refused_before_the_first_step(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    callback = FreezeCallback(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=4)
    trainer = trainer_for(model, TrainingArguments(**training_kwargs(tmp_path, max_steps=4)), [callback])
    with pytest.raises(FreezeConfigError, match=r"`freeze_probe_steps` \(4, 4 steps\) is not shorter than training \(4 steps\)"):
        trainer.train()
    assert all(torch.equal(value, dict(model.named_parameters())[name]) for name, value in before.items())


# -- scores with known answers -------------------------------------------------------------------------------------


def _layer_names(model, index):
    return [name for name, _ in model.named_parameters() if name.startswith(f"bert.encoder.layer.{index}.")]


def _probe_scores(score, max_steps=4, probe_steps=3, zeroed=2, boosted=1):
    """Plain loop, SGD: layer `zeroed` gets no gradient, layer `boosted` a gradient 20 times larger."""
    torch.manual_seed(0)
    model = tiny_bert(4)
    parameters = dict(model.named_parameters())
    for name in _layer_names(model, zeroed):
        parameters[name].register_hook(lambda grad: grad * 0)
    for name in _layer_names(model, boosted):
        parameters[name].register_hook(lambda grad: grad * 20)
    freezer = LayerFreezer(model, freeze_strategy="adaptive", freeze_layers=1, freeze_score=score,
                           freeze_probe_steps=probe_steps)
    freezer.prepare(TrainingProgress(step=0, max_steps=max_steps))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    data = TokenClassificationData(size=8)
    batch = {key: torch.stack([data[i][key] for i in range(8)]) for key in ("input_ids", "labels")}
    for step in range(max_steps):
        freezer.update(TrainingProgress(step=step, max_steps=max_steps), optimizer)
        model(**batch).loss.backward()
        freezer.before_optimizer_step()
        optimizer.step()
        freezer.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    (selection,) = freezer.timeline.selections
    return selection, freezer


@pytest.mark.parametrize("score", ["weight_change", "grad_norm"])
def test_a_layer_without_gradient_scores_lowest_and_a_boosted_layer_highest(score):
    selection, freezer = _probe_scores(score)
    scores = selection["scores"]
    assert scores[2] == 0.0 and min(scores[i] for i in (0, 1, 3)) > 0
    assert max(range(4), key=scores.__getitem__) == 1
    assert scores[1] > 5 * max(scores[0], scores[3])
    assert selection["step"] == 3 and selection["probe_start_step"] == 0
    assert selection["frozen_layers"] == [2]  # the lowest score froze
    assert freezer.metrics()["freeze/score_layer_2"] == 0.0


def test_the_sampled_weight_change_estimates_the_exact_one():
    torch.manual_seed(0)
    big, small = nn.Linear(300, 300), nn.Linear(30, 30)
    assert big.weight.numel() > WEIGHT_SAMPLE_SIZE >= small.weight.numel()  # sampled, and kept whole
    layers = [(block, [(f"{block}.{name}", p) for name, p in module.named_parameters()])
              for block, module in (("big", big), ("small", small))]
    meter = WeightChangeMeter(layers)
    meter.start()
    start = [p.detach().clone() for _, module in layers for _, p in module]
    with torch.no_grad():
        for _, module in layers:
            for _, p in module:
                p.add_(0.1 * torch.randn_like(p) * p.abs().mean())
    # The state survives a JSON round trip (a checkpoint in the middle of a probe).
    resumed = WeightChangeMeter(layers)
    resumed.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    estimated = meter.finish()
    assert resumed.finish() == estimated
    after = [p.detach() for _, module in layers for _, p in module]
    exact_big = torch.cat([(a - b).flatten() for a, b in zip(after[:2], start[:2])]).norm() / torch.cat([b.flatten() for b in start[:2]]).norm()
    exact_small = torch.cat([(a - b).flatten() for a, b in zip(after[2:], start[2:])]).norm() / torch.cat([b.flatten() for b in start[2:]]).norm()
    assert estimated[0] == pytest.approx(exact_big.item(), rel=0.03)
    assert estimated[1] == pytest.approx(exact_small.item(), rel=1e-5)
    assert len(meter.state_dict()["start"]) == 0  # finished: nothing kept


def test_settled_gradients_score_lowest_on_grad_norm_change():
    from hf_freeze.scores import GradNormChangeMeter

    layers = [(f"layers.{i}", [(f"layers.{i}.weight", nn.Parameter(torch.ones(3)))]) for i in range(3)]
    meter = GradNormChangeMeter(layers)
    meter.start()
    # Layer 0: the same gradient every step (settled); layer 1: doubling; layer 2: shrinking by a third each step.
    for step in range(4):
        for (_, [(_, parameter)]), scale in zip(layers, (1.0, 2.0**step, (2 / 3) ** step)):
            parameter.grad = torch.full((3,), scale)
        meter.observe_gradients()
    resumed = GradNormChangeMeter(layers)
    resumed.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    scores = meter.finish()
    assert resumed.finish() == scores
    assert scores[0] == 0.0 and scores[1] == pytest.approx((6 - 1.5) / 1.5) and scores[2] == pytest.approx(5 / 9)
    assert select_layers(scores, 1) == [0]


def test_snr_tells_a_random_matrix_from_low_rank_plus_noise():
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(128, 256, generator=generator) for _ in range(3)]
    signal = 4 * torch.randn(128, 3, generator=generator) @ torch.randn(3, 256, generator=generator)
    assert matrix_snr(noise[0]) < 0.05 and matrix_snr(noise[1] + signal) > 1.0
    layers = [(f"layers.{i}", [(f"layers.{i}.weight", nn.Parameter(matrix))])
              for i, matrix in enumerate([noise[0], noise[1] + signal, noise[2]])]
    scores = SnrMeter(layers).finish()
    assert max(range(3), key=scores.__getitem__) == 1
    assert SCORES.get("snr").needs_probe is False


# -- a real Trainer ------------------------------------------------------------------------------------------------


class Steps(TrainerCallback):
    """Which layers changed in each optimizer step."""

    def __init__(self):
        self.moved = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        after = dict(model.named_parameters())
        self.moved.append(sorted({
            int(name.split(".")[3]) for name, value in self.before.items()
            if name.startswith("bert.encoder.layer.") and not torch.equal(value, after[name])
        }))


def test_probe_then_select_in_a_real_trainer(tmp_path):
    steps = Steps()
    callback = FreezeCallback(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=3)
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=8, logging_steps=2))
    trainer = trainer_for(tiny_bert(), args, [callback, steps])
    trainer.train()
    data = json.loads((tmp_path / TIMELINE_JSON).read_text())
    (selection,) = data["selections"]
    scores, chosen = selection["scores"], selection["frozen_layers"]
    assert selection["step"] == 3 and chosen == sorted(sorted(range(4), key=scores.__getitem__)[:2])
    assert steps.moved[:3] == [[0, 1, 2, 3]] * 3  # the probe trains every layer
    assert all(moved == sorted(set(range(4)) - set(chosen)) for moved in steps.moved[3:])  # then the selection holds
    change = data["changes"][-1]
    assert change["step"] == 3 and change["frozen_layers"] == chosen and change["released_optimizer_state_bytes"] > 0
    logged = [entry for entry in trainer.state.log_history if "freeze/score_layer_0" in entry]
    assert logged and all(logged[-1][f"freeze/score_layer_{i}"] == scores[i] for i in range(4))
    assert logged[-1]["freeze/probe_scoring_seconds"] > 0
    assert (tmp_path / TIMELINE_PNG).read_bytes()[:4] == b"\x89PNG"


def test_reselection_probes_again_every_round(tmp_path):
    options = dict(freeze_strategy="adaptive", freeze_layers=1, freeze_score="grad_norm", freeze_probe_steps=2,
                   freeze_reselect_every=4)
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=10))
    trainer_for(tiny_bert(), args, [FreezeCallback(**options)]).train()
    data = json.loads((tmp_path / TIMELINE_JSON).read_text())
    assert [(s["round"], s["probe_start_step"], s["step"]) for s in data["selections"]] == [(0, 0, 2), (1, 4, 6)]
    changes = [(c["step"], c["frozen_layers"]) for c in data["changes"]]
    assert [step for step, _ in changes] == [0, 2, 4, 6, 8]
    assert [layers for step, layers in changes if step in (0, 4, 8)] == [[], [], []]  # every probe trains all layers
    assert changes[1][1] == data["selections"][0]["frozen_layers"] and changes[3][1] == data["selections"][1]["frozen_layers"]


# -- resume ---------------------------------------------------------------------------------------------------------


def _run(output_dir, options, resume=None, **overrides):
    model = tiny_bert()
    args = TrainingArguments(**training_kwargs(output_dir, max_steps=9, weight_decay=0.1, seed=3, **overrides))
    callbacks = [FreezeCallback(**options)] + ([] if resume else [SaveAt(5)])
    trainer_for(model, args, callbacks, data=TokenClassificationData(size=16)).train(resume_from_checkpoint=resume)
    return snapshot(model), json.loads((output_dir / TIMELINE_JSON).read_text())


@pytest.mark.parametrize("score", ["weight_change", "grad_norm", "grad_norm_change", "snr"])
def test_a_run_resumed_in_the_middle_of_a_probe_matches_the_uninterrupted_one(tmp_path, score):
    # Rounds of 4 steps: probe 4-6 of the second round is running when the checkpoint at step 5 is taken.
    options = dict(freeze_strategy="adaptive", freeze_layers=2, freeze_score=score, freeze_reselect_every=4)
    if score != "snr":
        options["freeze_probe_steps"] = 3
    weights, timeline = _run(tmp_path / "full", options)
    assert len(timeline["selections"]) == 3 if score == "snr" else 2
    for restore_flag in (False, True) if score == "weight_change" else (False,):
        resumed_weights, resumed = _run(
            tmp_path / f"resumed-{restore_flag}", options, resume=str(tmp_path / "full" / "checkpoint-5"),
            restore_callback_states_from_checkpoint=restore_flag,
        )
        assert resumed["changes"] == timeline["changes"]
        assert resumed["selections"] == timeline["selections"]  # the same scores, bit for bit
        for name, value in weights.items():
            assert torch.equal(resumed_weights[name], value), (restore_flag, name)


def test_a_probe_whose_measurements_are_missing_starts_late_instead_of_never(capsys):
    from hf_freeze import discover_layout
    from hf_freeze.scores import LayerProbe

    model = tiny_bert()
    args = FreezeArguments(freeze_strategy="adaptive", freeze_layers=1, freeze_probe_steps=3)
    probe = LayerProbe(model, discover_layout(model), args)
    # Entering the run at step 5 (say, from a checkpoint written without the probe's state): probe steps 5-7.
    assert probe.at(TrainingProgress(step=5, max_steps=20)).layer_scores is None
    assert "probing from step 5" in capsys.readouterr().err
    assert probe.at(TrainingProgress(step=7, max_steps=20)).layer_scores is None
    with torch.no_grad():
        model.bert.encoder.layer[3].output.dense.weight.mul_(1.5)
    scores = probe.at(TrainingProgress(step=8, max_steps=20)).layer_scores
    assert max(range(4), key=scores.__getitem__) == 3 and probe.last_selection["probe_start_step"] == 5
