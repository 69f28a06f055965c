"""Unit tests of `FreezeApplier`: flipping `requires_grad`, releasing and extending optimizer state the way the
Trainer's optimizer needs it, and scaling updates without new param groups."""

import pytest
import torch
from torch import nn
from transformers import Trainer

from hf_freeze import FreezeDecision
from hf_freeze.apply import AppliedChange, FreezeApplier, optimizer_state_bytes
from tiny import build

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _gpt2():
    return build("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _loss(model):
    if isinstance(model, nn.Sequential):
        return model(X).pow(2).sum()
    return model(input_ids=IDS, labels=IDS).loss


def _step(model, optimizer):
    optimizer.zero_grad()
    _loss(model).backward()
    optimizer.step()


def _freeze(*names):
    return FreezeDecision(frozenset(names))


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _bytes(state):
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def _trainer_groups(model, weight_decay=0.01):
    """The groups `Trainer.create_optimizer` builds: trainable parameters only, split by the Trainer's own rule."""
    decay = set(Trainer.get_decay_parameter_names(None, model))  # does not use `self`
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]


def _holders(optimizer, parameter):
    return [i for i, group in enumerate(optimizer.param_groups) for p in group["params"] if p is parameter]


def test_freeze_flips_exactly_the_named_parameters_drops_their_grads_and_is_idempotent():
    net = _net()
    applier = FreezeApplier(net)
    _loss(net).backward()
    change = applier.apply(_freeze("2.weight", "0.bias"))
    # Parameter order, not the decision's (unordered) set order: reports and logs rely on it.
    assert change == AppliedChange(frozen=["0.bias", "2.weight"], unfrozen=[]) and change.changed
    for name, p in net.named_parameters():
        frozen = name in ("0.bias", "2.weight")
        assert p.requires_grad is not frozen, name
        assert (p.grad is None) is frozen, name  # trainable parameters keep the grad they accumulated
    again = applier.apply(_freeze("2.weight", "0.bias"))
    assert again == AppliedChange([], []) and not again.changed
    assert applier.frozen_names() == ["0.bias", "2.weight"]


def test_unfreeze_restores_requires_grad_and_reports_it():
    net = _net()
    applier = FreezeApplier(net)
    applier.apply(_freeze("0.weight", "1.weight", "2.bias"))
    change = applier.apply(_freeze("1.weight"))
    assert change == AppliedChange(frozen=[], unfrozen=["0.weight", "2.bias"])
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["1.weight"]


def test_freezing_releases_exactly_that_parameters_optimizer_state():
    net = _net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    _step(net, optimizer)
    target = net[0].weight
    released = _bytes(optimizer.state[target])
    assert released > 0
    before = optimizer_state_bytes(optimizer)
    others = {p: dict(s) for p, s in optimizer.state.items() if p is not target}
    values = {p: {k: v.clone() for k, v in s.items()} for p, s in others.items()}
    FreezeApplier(net).apply(_freeze("0.weight"), optimizer)
    assert target not in optimizer.state
    assert optimizer_state_bytes(optimizer) == before - released
    assert set(optimizer.state) == set(others)
    for p, state in others.items():
        for key, tensor in state.items():
            assert optimizer.state[p][key] is tensor and torch.equal(tensor, values[p][key]), key


@pytest.mark.parametrize(
    "make, name, expected",
    [
        (_net, "0.weight", 0),
        (_net, "0.bias", 1),
        (_net, "1.bias", 1),
        pytest.param(_net, "1.weight", 1, id="LayerNorm weight, not named norm"),
        (_gpt2, "transformer.h.0.mlp.c_fc.weight", 0),
        (_gpt2, "transformer.h.0.attn.c_attn.bias", 1),
        pytest.param(_gpt2, "transformer.h.0.ln_1.weight", 1, id="GPT-2 ln_1"),
    ],
)
def test_unfrozen_parameter_joins_the_group_the_trainer_would_have_put_it_in(make, name, expected):
    # 0 = weight-decay group, 1 = no-decay group, following `Trainer.get_decay_parameter_names`: the Trainer also
    # puts every `nn.LayerNorm` parameter in the no-decay group, so a LayerNorm weight not named "*norm*" (GPT-2's
    # ln_1, an nn.Sequential's "1.weight") must not be decayed once unfrozen.
    model = make()
    applier = FreezeApplier(model)
    applier.apply(_freeze(name))
    optimizer = torch.optim.AdamW(_trainer_groups(model), lr=1e-2)
    assert (name in Trainer.get_decay_parameter_names(None, model)) is (expected == 0)
    parameter = dict(model.named_parameters())[name]
    assert not _holders(optimizer, parameter)
    assert applier.apply(_freeze(), optimizer).unfrozen == [name]
    assert len(optimizer.param_groups) == 2  # a new group would break LambdaLR-style schedulers
    assert _holders(optimizer, parameter) == [expected]
    before = parameter.detach().clone()
    _step(model, optimizer)
    assert not torch.equal(parameter, before)


def test_unfreezing_a_parameter_the_optimizer_already_holds_does_not_add_it_again():
    net = _net()
    optimizer = torch.optim.AdamW(_trainer_groups(net), lr=1e-2)
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    applier = FreezeApplier(net)
    applier.apply(_freeze("0.weight", "0.bias"), optimizer)
    applier.apply(_freeze(), optimizer)
    assert [len(g["params"]) for g in optimizer.param_groups] == sizes
    assert _holders(optimizer, net[0].weight) == [0] and _holders(optimizer, net[0].bias) == [1]


def test_single_group_optimizer_takes_the_unfrozen_parameter():
    net = _net()
    applier = FreezeApplier(net)
    applier.apply(_freeze("1.weight", "2.weight"))
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    applier.apply(_freeze("2.weight"), optimizer)
    assert len(optimizer.param_groups) == 1 and _holders(optimizer, net[1].weight) == [0]
    before = _snapshot(net)
    _step(net, optimizer)
    assert not torch.equal(net[1].weight, before["1.weight"])
    assert torch.equal(net[2].weight, before["2.weight"])


class _Wrapped:
    """Stands in for accelerate's `AcceleratedOptimizer` (which needs an initialised `Accelerator`): the real
    optimizer is `.optimizer`. Its own `state` / `param_groups` are decoys, so only the inner one can satisfy."""

    def __init__(self, optimizer):
        self.optimizer, self.state, self.param_groups = optimizer, {}, []


def test_wrapped_optimizer_is_released_and_extended_through_its_inner_optimizer():
    net = _net()
    applier = FreezeApplier(net)
    applier.apply(_freeze("2.bias"))
    inner = torch.optim.AdamW(_trainer_groups(net), lr=1e-2)
    wrapped = _Wrapped(inner)
    _step(net, inner)
    assert optimizer_state_bytes(wrapped) == optimizer_state_bytes(inner) > 0
    released = _bytes(inner.state[net[0].weight])
    before = optimizer_state_bytes(wrapped)
    change = applier.apply(_freeze("0.weight"), wrapped)
    assert change == AppliedChange(frozen=["0.weight"], unfrozen=["2.bias"])
    assert net[0].weight not in inner.state
    assert optimizer_state_bytes(wrapped) == before - released
    assert _holders(inner, net[2].bias) == [1] and len(inner.param_groups) == 2


def test_scaled_step_shrinks_only_the_named_trainable_updates():
    full, scaled = _net(), _net()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (full, scaled)]
    applier = FreezeApplier(scaled)
    for model in (full, scaled):
        FreezeApplier(model).apply(_freeze("2.weight"))
    start = _snapshot(scaled)
    _step(full, optimizers[0])
    applier.begin_scaled_step({"0.weight": 0.25, "0.bias": 1.0, "2.weight": 0.5})
    _step(scaled, optimizers[1])
    # A frozen parameter is not remembered, so a write between step and end survives (a remembered one would be
    # pulled halfway back); a factor of 1.0 must leave the full update.
    with torch.no_grad():
        scaled[0].bias.add_(1.0)
        scaled[2].weight.add_(1.0)
    applier.end_scaled_step()
    after, reference = _snapshot(scaled), _snapshot(full)
    delta_full = reference["0.weight"] - start["0.weight"]
    assert delta_full.abs().max() > 1e-3
    assert torch.allclose(after["0.weight"] - start["0.weight"], 0.25 * delta_full, rtol=1e-5, atol=1e-7)
    assert torch.equal(after["0.bias"], reference["0.bias"] + 1.0)
    assert torch.equal(after["2.weight"], start["2.weight"] + 1.0)
    for name in ("1.weight", "1.bias", "2.bias"):
        assert torch.equal(after[name], reference[name]), name
    # Nothing begun since: a later change (an unscaled step, here a write) must not be pulled back.
    with torch.no_grad():
        scaled[0].weight.add_(1.0)
    applier.end_scaled_step()
    assert torch.equal(scaled[0].weight, after["0.weight"] + 1.0)


def test_frozen_parameters_stay_bit_identical_under_adamw_with_weight_decay():
    net = _net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    _step(net, optimizer)  # every parameter now has momentum, and (after this) a zero grad tensor
    optimizer.zero_grad(set_to_none=False)
    FreezeApplier(net).apply(_freeze("0.weight", "1.weight"), optimizer)
    before = _snapshot(net)
    for _ in range(2):
        _loss(net).backward()  # no zero_grad first: a leftover zero grad would make AdamW move (and decay) them
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]) is (name in ("0.weight", "1.weight")), name


def test_would_flip_lists_the_flips_in_parameter_order_and_changes_nothing():
    net = _net()
    applier = FreezeApplier(net)
    applier.apply(_freeze("0.weight", "1.weight"))
    _loss(net).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    decision = _freeze("2.bias", "0.weight")
    assert applier.would_flip(decision) == ["1.weight", "2.bias"]
    assert applier.frozen_names() == ["0.weight", "1.weight"]
    for name, p in net.named_parameters():
        assert (p.grad is None) is (grads[name] is None) and (p.grad is None or torch.equal(p.grad, grads[name]))
    assert applier.apply(decision) == AppliedChange(frozen=["2.bias"], unfrozen=["1.weight"])
    assert applier.would_flip(decision) == []
