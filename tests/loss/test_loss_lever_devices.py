"""The loss lever by device: the hand-written chunks under CPU autocast compute in bf16; on a GPU the model's own loss
stays unless the lever is asked for, and then Liger-Kernel's fused kernel computes it; a loss already fused is left
alone. The CUDA tests run only where a GPU is (the project's GPU check runs them; CI has none)."""

import logging

import pytest
import torch
from torch import nn

from hf_freeze import LayerFreezer
from hf_freeze.loss import chunked_cross_entropy
from hf_freeze.loss.chunked import fused_loss_owner, liger_available
from tiny import build

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _llama(seed=0):
    return build("llama", seed=seed)


def _ids(device="cpu"):
    return torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3)).to(device)


def test_under_cpu_autocast_the_chunks_multiply_in_bf16(monkeypatch):
    """The head's products follow the training's autocast dtype (module hooks on the model run outside autocast,
    so the lever must carry the dtype over from the head's own call)."""
    model = _llama().train()
    LayerFreezer(model, freeze_strategy="bottom", freeze_layers=1)
    seen = []
    linear = nn.functional.linear

    def recording(x, weight, bias=None):
        seen.append((x.dtype, weight.dtype))
        return linear(x, weight, bias)

    monkeypatch.setattr(nn.functional, "linear", recording)
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    monkeypatch.undo()
    head_calls = [dtypes for dtypes in seen if dtypes[1] == torch.bfloat16 and dtypes[0] == torch.bfloat16]
    assert head_calls, seen  # the chunk products ran in bf16
    reference = _llama().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(ids, labels=ids).loss
    # bf16 products in both, summed in another order: equal to bf16 rounding of the logits (8 bits of mantissa)
    assert torch.allclose(loss, expected, rtol=2e-2), (loss.item(), expected.item())


def test_chunks_in_bf16_match_float32_to_bf16_precision():
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (40,))
    exact = chunked_cross_entropy(hidden, weight, None, labels, chunk_tokens=7)
    half = chunked_cross_entropy(hidden, weight, None, labels, chunk_tokens=7, compute_dtype=torch.bfloat16)
    half.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32  # accumulated in the params' dtype
    assert torch.allclose(exact, half, rtol=2e-2)


def test_a_loss_fused_by_another_library_is_left_alone(caplog):
    model = _llama().train()
    LayerFreezer(model, freeze_strategy="bottom", freeze_layers=1, freeze_chunked_loss=True)

    def fused_forward(self, *args, **kwargs):  # what Liger-Kernel's monkey patch binds to the model
        return type(self).forward(self, *args, **kwargs)

    fused_forward.__module__ = "liger_kernel.transformers.model.llama"
    model.forward = fused_forward.__get__(model)
    assert fused_loss_owner(model) == "Liger-Kernel"
    ids = _ids()
    logging.getLogger("hf_freeze").addHandler(caplog.handler)  # hf_freeze's logger does not propagate to the root
    try:
        output = model(ids, labels=ids)
        model(ids, labels=ids)
    finally:
        logging.getLogger("hf_freeze").removeHandler(caplog.handler)
    assert output.logits is not None  # the model computed its own loss: the lever did not step in
    said = [r for r in caplog.records if "Liger-Kernel already computes" in r.getMessage()]
    assert len(said) == 1


@CUDA
def test_on_a_gpu_the_default_keeps_the_models_own_loss():
    model = _llama().cuda().train()
    LayerFreezer(model, freeze_strategy="bottom", freeze_layers=1)
    ids = _ids("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = model(ids, labels=ids)
    assert output.logits is not None


@CUDA
@pytest.mark.skipif(not liger_available(), reason="needs liger-kernel")
def test_on_a_gpu_the_lever_is_ligers_kernel_with_the_models_loss_and_gradients():
    ids = _ids("cuda")
    losses, grads = [], []
    for lever in (False, True):
        model = _llama().cuda().train()
        LayerFreezer(model, freeze_strategy="bottom", freeze_layers=1, freeze_chunked_loss=lever)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = model(ids, labels=ids)
        assert (output.logits is None) == lever
        output.loss.backward()
        losses.append(output.loss.detach())
        grads.append(model.get_output_embeddings().weight.grad.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-2)
    assert torch.allclose(grads[0], grads[1], rtol=5e-2, atol=1e-4)


@CUDA
def test_frozen_weights_in_bf16_give_the_same_loss_under_cuda_autocast():
    ids = _ids("cuda")
    losses, sizes = [], []
    for dtype in (None, "bfloat16"):
        model = _llama().cuda().train()
        LayerFreezer(model, freeze_strategy="bottom", freeze_layers=1, freeze_frozen_dtype=dtype).apply()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(model(ids, labels=ids).loss.detach())
        sizes.append(sum(p.numel() * p.element_size() for p in model.parameters()))
    assert torch.equal(losses[0], losses[1])  # autocast casts the same weights to the same bf16 values
    assert sizes[1] < sizes[0]
