"""`progressive` against Composer's `LayerFreezing` and `gradual_unfreezing`'s learning-rate factors against
Lightning's `BackboneFinetuning`, both transcribed below in our own words.

Composer (composer/algorithms/layer_freezing/layer_freezing.py), at the end of every epoch: no freezing while the
elapsed fraction of training is at most `freeze_start`; after that the fraction of layers to freeze is
`freeze_level` times the fraction of the freezing time elapsed ((elapsed - start) / (1 - start)), and the count is
that fraction times the number of layers, truncated towards zero. (Composer counts flattened leaf modules and never
the last one; hf_freeze counts layers by default: that is the unit, the arithmetic is the same. With
`freeze_granularity: module` it counts Composer's leaves: test_parity_composer_modules.py.)

Lightning (src/lightning/pytorch/callbacks/finetuning.py), at the start of every epoch: at
`unfreeze_backbone_at_epoch` the backbone gets the rest's current rate times `backbone_initial_ratio_lr`; in every
later epoch its previous rate is multiplied by `lambda_func(epoch + 1)` (2.0 by default), and with `should_align`
a rate above the rest's current rate is set to that rate.
"""

import pytest

from hf_freeze import FreezeArguments, ModelLayout, TrainingProgress, decide

# -- Composer ------------------------------------------------------------------------------------------------------


def composer_frozen_count(elapsed_fraction, freeze_start, freeze_level, num_layers):
    if elapsed_fraction <= freeze_start:
        return 0
    fraction_of_freezing_time = (elapsed_fraction - freeze_start) / (1.0 - freeze_start)
    return int(freeze_level * fraction_of_freezing_time * num_layers)


def frozen_count(layout, args, **progress):
    return len(decide(layout, args, TrainingProgress(**progress)).frozen_layers(layout))


def test_composers_own_defaults_example_freezes_no_layer_at_epoch_6():
    layout = ModelLayout.from_layer_sizes([4] * 5)
    args = FreezeArguments(freeze_strategy="progressive", freeze_schedule_unit="epoch")  # start 0.5, level 1.0
    # Composer, 10 epochs, 5 layers: after epoch 6 the count is 0.999...98, truncated to 0; after epoch 7, 1.
    counts = [frozen_count(layout, args, epoch=float(epoch), num_epochs=10.0) for epoch in range(11)]
    assert counts == [composer_frozen_count(epoch / 10, 0.5, 1.0, 5) for epoch in range(11)]
    assert counts[6:8] == [0, 1]


@pytest.mark.parametrize("num_layers", [1, 2, 3, 5, 6, 7, 12])
@pytest.mark.parametrize("freeze_start", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("freeze_level", [0.3, 0.5, 0.75, 1.0])
def test_epoch_unit_reproduces_composers_count_after_every_epoch(num_layers, freeze_start, freeze_level):
    layout = ModelLayout.from_layer_sizes([4] * num_layers)
    args = FreezeArguments(
        freeze_strategy="progressive", freeze_schedule_unit="epoch", freeze_start=freeze_start, freeze_level=freeze_level
    )
    for num_epochs in (1, 3, 7, 10, 12):
        # The set Composer applies at the end of epoch k is the one hf_freeze applies as epoch k + 1 begins.
        for done in range(num_epochs + 1):
            expected = composer_frozen_count(done / num_epochs, freeze_start, freeze_level, num_layers)
            assert frozen_count(layout, args, epoch=float(done), num_epochs=float(num_epochs)) == expected, (num_epochs, done)
            # Mid-epoch progress changes nothing, as Composer acts at epoch ends only.
            if done < num_epochs:
                assert frozen_count(layout, args, epoch=done + 0.6, num_epochs=float(num_epochs)) == expected


def test_step_unit_agrees_with_composer_at_epoch_ends_when_its_duration_is_in_batches():
    layout = ModelLayout.from_layer_sizes([4] * 6)
    args = FreezeArguments(freeze_strategy="progressive", freeze_start=0.3, freeze_level=0.9)
    steps_per_epoch, max_steps = 7, 70
    for epoch_end in range(0, max_steps + 1, steps_per_epoch):
        expected = composer_frozen_count(epoch_end / max_steps, 0.3, 0.9, 6)
        assert frozen_count(layout, args, step=epoch_end, max_steps=max_steps) == expected


# -- Lightning -----------------------------------------------------------------------------------------------------


def lightning_backbone_rates(num_epochs, unfreeze_at, ratio, rest_rate, multiplier=lambda epoch: 2.0, align=True):
    """The backbone's rate in each epoch (None while frozen), given the rest of the model's rate per epoch."""
    rates, previous = [], None
    for epoch in range(num_epochs):
        if epoch < unfreeze_at:
            rates.append(None)
            continue
        rate = rest_rate(epoch) * ratio if epoch == unfreeze_at else multiplier(epoch + 1) * previous
        if epoch > unfreeze_at and align and rate > rest_rate(epoch):
            rate = rest_rate(epoch)
        rates.append(rate)
        previous = rate
    return rates


LAYOUT = ModelLayout.from_layer_sizes([10] * 4, embeddings=5, norm=2, head=3)


def backbone_factors(args, num_epochs):
    factors = []
    for epoch in range(num_epochs):
        decision = decide(LAYOUT, args, TrainingProgress(epoch=float(epoch), num_epochs=float(num_epochs)))
        if "layers.0.weight" in decision.frozen:
            factors.append(None)
        else:
            factors.append(decision.update_factors.get("layers.0.weight", 1.0))
    return factors


def test_lightning_default_rates_unfreezing_at_epoch_3_with_ratio_0_1():
    args = FreezeArguments(
        freeze_strategy="gradual_unfreezing", freeze_schedule_every=3, freeze_unfreeze_layers=99,
        freeze_unfreeze_lr_factor=0.1,
    )
    assert backbone_factors(args, 9) == [None, None, None, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backbone_factors(args, 9) == lightning_backbone_rates(9, 3, 0.1, lambda epoch: 1.0)
    # Every block of the backbone (embeddings, every layer, the final norm) has the same rate, as Lightning's one group.
    decision = decide(LAYOUT, args, TrainingProgress(epoch=4.0, num_epochs=9.0))
    assert set(decision.update_factors) == set(LAYOUT.parameter_names) - {"head.weight", "head.bias"}
    assert set(decision.update_factors.values()) == {0.2}


@pytest.mark.parametrize("ratio", [0.1, 0.05, 0.25, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("growth", [None, 1.5, 3.0, 1.0])
@pytest.mark.parametrize("unfreeze_at", [1, 2, 5])
def test_lightning_rates_for_any_ratio_and_constant_multiplier(ratio, growth, unfreeze_at):
    args = FreezeArguments(
        freeze_strategy="gradual_unfreezing", freeze_schedule_every=unfreeze_at, freeze_unfreeze_layers=99,
        freeze_unfreeze_lr_factor=ratio, freeze_unfreeze_lr_growth=growth,
    )
    multiplier = 2.0 if growth is None else growth
    expected = lightning_backbone_rates(14, unfreeze_at, ratio, lambda epoch: 1.0, lambda epoch: multiplier)
    assert backbone_factors(args, 14) == expected  # the same floats: multiplied step by step, as Lightning does
