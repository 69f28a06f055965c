"""Adaptive selection, the pure part: which layers a round freezes from given scores, and refused options."""

import pytest

from hf_freeze import FreezeArguments, FreezeConfigError, ModelLayout, TrainingProgress, decide
from hf_freeze.policies.adaptive import adaptive_round, check_against_loss_scaling, select_layers, withholds_updates

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
    # `freeze_embeddings: true` freezes them whatever the selection, as `bottom` does; `freeze_head` as for any strategy.
    pinned = decide(LAYOUT, _adaptive(freeze_probe_steps=5, freeze_embeddings=True, freeze_head=True),
                    TrainingProgress(5, 100, layer_scores=SCORES_6))
    assert {"embeddings.weight", "head.weight", "head.bias"} <= pinned.frozen and pinned.frozen_layers(LAYOUT) == [1, 3]


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


def test_a_measuring_probe_withholds_its_steps_and_leaves_only_the_layers_with_gradients():
    measured, trained = _adaptive(freeze_probe_steps=3), _adaptive(freeze_probe_steps=3, freeze_probe_mode="train")
    outside_layers = {"embeddings.weight", "norm.weight", "head.weight", "head.bias"}
    for step in (0, 2):
        progress = TrainingProgress(step=step, max_steps=100, layer_scores=SCORES_6)
        assert withholds_updates(measured, progress) and not withholds_updates(trained, progress)
        assert decide(LAYOUT, measured, progress).frozen == outside_layers  # only the layers are scored
        assert decide(LAYOUT, trained, progress).frozen == set()  # every layer trains through the probe
    after = TrainingProgress(step=3, max_steps=100, layer_scores=SCORES_6)
    assert not withholds_updates(measured, after)
    assert decide(LAYOUT, measured, after).frozen == decide(LAYOUT, trained, after).frozen  # the same selection
    assert not withholds_updates(_adaptive(freeze_score="snr"), TrainingProgress(step=0, max_steps=100))  # no probe


def test_a_measuring_probe_under_fp16_loss_scaling_without_clipping_is_refused_before_training():
    # torch's GradScaler fails when the gradients it would unscale inside `step` were dropped (no clipping before).
    with pytest.raises(FreezeConfigError, match="Set `max_grad_norm` > 0, train in bf16, or set `freeze_probe_mode: train`"):
        check_against_loss_scaling(_adaptive(), scaled=True, clipped=False)
    check_against_loss_scaling(_adaptive(), scaled=True, clipped=True)  # clipping unscales them first
    check_against_loss_scaling(_adaptive(), scaled=False, clipped=False)
    check_against_loss_scaling(_adaptive(freeze_probe_mode="train"), scaled=True, clipped=False)
    check_against_loss_scaling(_adaptive(freeze_score="snr"), scaled=True, clipped=False)


def test_without_measured_scores_nothing_is_frozen_and_the_decision_says_why():
    decision = decide(LAYOUT, _adaptive(freeze_probe_steps=2), TrainingProgress(step=5, max_steps=100))
    assert decision.frozen_layers(LAYOUT) == []
    assert any("no weight_change scores measured yet" in note for note in decision.notes)


CONFIG_ERRORS = [
    (dict(freeze_score="weight_chnage"), "`freeze_score` must be one of 'weight_change', 'grad_norm', 'grad_norm_change', 'snr'"),
    (dict(freeze_score="grad_norm_change", freeze_probe_steps=1), "must be at least 2 steps for `freeze_score` 'grad_norm_change'"),
    (dict(freeze_select="middle"), "`freeze_select` must be one of 'lowest', 'highest' (got 'middle')"),
    (dict(freeze_score="snr", freeze_probe_steps=5), "`freeze_probe_steps` (5) is not used by `freeze_score` 'snr'"),
    (dict(freeze_score="snr", freeze_probe_mode="train"), "`freeze_probe_mode` ('train') is not used by `freeze_score` 'snr'"),
    (dict(freeze_probe_mode="measured"), "`freeze_probe_mode` must be one of 'measure', 'train' (got 'measured')"),
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
