"""The rows applier on its own: outputs equal those of the merged full parameter, a second freezer takes the rows
over, removing them leaves an ordinary model, and state dicts round-trip."""

import torch

from tiny import build

from hf_freeze import LayerFreezer
from hf_freeze.apply import TrainableRows


def _model_with_trained_rows(tied: bool):
    model = build("llama", tie_word_embeddings=tied)
    freezer = LayerFreezer(model, freeze_trainable_tokens=[3, 70, 127])
    freezer.apply()
    with torch.no_grad():
        for rows in freezer.applier.rows.parameters.values():
            rows.add_(torch.randn_like(rows))  # as if trained
    return model, freezer


def test_forward_uses_the_rows_as_if_merged_into_the_full_parameters():
    for tied in (True, False):
        model, freezer = _model_with_trained_rows(tied)
        ids = torch.tensor([[3, 5, 70, 127, 9]])
        hooked = model(ids).logits
        freezer.applier.rows.remove()  # merged, hooks and small parameters gone
        assert not [name for name, _ in model.named_parameters() if name.startswith("hf_freeze_rows.")]
        torch.testing.assert_close(model(ids).logits, hooked)


def test_a_second_freezer_takes_the_rows_over():
    model, freezer = _model_with_trained_rows(tied=False)
    rows = dict(freezer.applier.rows.parameters)
    again = LayerFreezer(model, freeze_trainable_tokens=[3, 70, 127])
    again.apply()
    assert again.applier.rows.parameters == rows  # the same parameters, with what they learnt
    assert len([name for name, _ in model.named_parameters() if name.startswith("hf_freeze_rows.")]) == 2
    assert again.layout.parameter_names == freezer.layout.parameter_names  # discovery looks through the rows


def test_state_dict_is_ordinary_and_loads_back_into_the_rows():
    model, freezer = _model_with_trained_rows(tied=False)
    state = model.state_dict()
    assert not [key for key in state if "hf_freeze" in key]
    trained = {name: rows.detach().clone() for name, rows in freezer.applier.rows.parameters.items()}
    assert torch.equal(state["lm_head.weight"][[3, 70, 127]], trained["lm_head.weight"])
    with torch.no_grad():
        for rows in freezer.applier.rows.parameters.values():
            rows.zero_()
    model.load_state_dict(state)
    for name, rows in freezer.applier.rows.parameters.items():
        assert torch.equal(rows, trained[name])


def test_rows_of_a_fused_expert_tensor():
    model = build("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    rows = TrainableRows(model)
    rows.update({"model.layers.0.mlp.experts.down_proj": (2,)})
    experts.down_proj.requires_grad_(False)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    model(ids).logits.sum().backward()
    assert experts.down_proj.grad is None
    assert rows.parameters["model.layers.0.mlp.experts.down_proj"].grad.shape == (1, *experts.down_proj.shape[1:])
    assert isinstance(experts.down_proj, torch.nn.Parameter)  # put back after the forward pass
