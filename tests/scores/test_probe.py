"""`LayerProbe` on its own: a probe whose start was missed (a checkpoint without its measurements) begins late."""

import torch

from hf_freeze import FreezeArguments, TrainingProgress, discover_layout
from hf_freeze.scores import LayerProbe

from tiny import tiny_bert


def test_a_probe_whose_measurements_are_missing_starts_late_instead_of_never(capsys):
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
