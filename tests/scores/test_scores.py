"""Per-layer scores with known answers: a layer without gradients, a boosted layer, settled gradients, the
sampled weight change against the exact one, the SNR of noise against low rank plus noise."""

import json

import pytest
import torch
from torch import nn

from hf_freeze import LayerFreezer, TrainingProgress
from hf_freeze.policies.adaptive import select_layers
from hf_freeze.scores import SCORES, WEIGHT_SAMPLE_SIZE, SnrMeter, WeightChangeMeter, matrix_snr

from tiny import TokenClassificationData, tiny_bert


def _layer_names(model, index):
    return [name for name, _ in model.named_parameters() if name.startswith(f"bert.encoder.layer.{index}.")]


def _probe_scores(score, max_steps=4, probe_steps=3, zeroed=2, boosted=1, mode=None):
    """Plain loop, SGD: layer `zeroed` gets no gradient, layer `boosted` a gradient 20 times larger; the probe
    measures (`freeze_probe_mode` unset: 'measure') or trains ('train')."""
    torch.manual_seed(0)
    model = tiny_bert(4)
    parameters = dict(model.named_parameters())
    for name in _layer_names(model, zeroed):
        parameters[name].register_hook(lambda grad: grad * 0)
    for name in _layer_names(model, boosted):
        parameters[name].register_hook(lambda grad: grad * 20)
    freezer = LayerFreezer(model, freeze_strategy="adaptive", freeze_layers=1, freeze_score=score,
                           freeze_probe_steps=probe_steps, freeze_probe_mode=mode)
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


@pytest.mark.parametrize("mode", [None, "train"])
@pytest.mark.parametrize("score", ["weight_change", "grad_norm"])
def test_a_layer_without_gradient_scores_lowest_and_a_boosted_layer_highest(score, mode):
    selection, freezer = _probe_scores(score, mode=mode)
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


@pytest.mark.parametrize("make_optimizer", [
    lambda parameters: torch.optim.AdamW(parameters, lr=0.01, weight_decay=0.1),
    lambda parameters: torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=0.01),
], ids=["adamw", "sgd-momentum"])
def test_a_withheld_update_scores_the_weight_change_the_optimizer_would_have_made(make_optimizer):
    """The same gradients, once applied by the optimizer and once withheld: the same weight change, through a JSON
    round trip in the middle of the probe too."""
    torch.manual_seed(0)
    modules = [nn.Linear(100, 100), nn.Linear(20, 20)]  # sampled (10,000 entries), and kept whole
    gradients = [[torch.randn_like(p) * (index + 1) for p in module.parameters()] for index, module in enumerate(modules)]

    def meter_for(copies):
        return WeightChangeMeter([(f"{i}", [(f"{i}.{name}", p) for name, p in module.named_parameters()])
                                  for i, module in enumerate(copies)])

    def run(withhold: bool):
        copies = [nn.Linear(m.in_features, m.out_features) for m in modules]
        for copy, module in zip(copies, modules):
            copy.load_state_dict(module.state_dict())
        optimizer = make_optimizer([p for copy in copies for p in copy.parameters()])
        meter = meter_for(copies)
        meter.start()
        for step in range(3):
            for copy, grads in zip(copies, gradients):
                for p, grad in zip(copy.parameters(), grads):
                    p.grad = grad * (1 + step)
            if withhold:
                meter.withheld_step(optimizer)
                if step == 1:  # a checkpoint: the meter is rebuilt from its saved state
                    saved = json.loads(json.dumps(meter.state_dict()))
                    meter = meter_for(copies)
                    meter.load_state_dict(saved)
                for copy in copies:
                    for p in copy.parameters():
                        p.grad = None
            optimizer.step()
        moved = [not torch.equal(a, b) for copy, module in zip(copies, modules)
                 for a, b in zip(copy.parameters(), module.parameters())]
        return meter.finish(), moved, optimizer

    trained, moved, _ = run(withhold=False)
    measured, unmoved, optimizer = run(withhold=True)
    assert all(moved) and not any(unmoved) and not optimizer.state  # withheld: nothing moved, no state
    assert measured == pytest.approx(trained, rel=1e-5) and min(measured) > 0


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
