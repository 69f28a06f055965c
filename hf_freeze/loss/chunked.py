"""The causal-LM loss computed in chunks of tokens, so that the logits (batch × sequence × vocabulary) and their
gradient never exist in full.

With freezing and activation checkpointing, the logits and their gradient are what is left of a training step's
activation memory: they do not shrink with the frozen set, and for a 128k vocabulary they are larger than all the
layers' checkpoints together. `ChunkedLossHooks` leaves the model's code alone:

* a forward pre-hook on the model takes `labels` (and `num_items_in_batch`, `shift_labels`) out of a training call,
  so that the model computes no loss of its own;
* a forward pre-hook on the LM head keeps the hidden states the head receives and hands it an empty sequence, so
  that the head computes logits for no token;
* a forward hook on the model computes transformers' causal-LM loss (`ForCausalLMLoss`: labels shifted by one,
  `ignore_index` -100, divided by `num_items_in_batch` when the Trainer passes it for gradient accumulation, else
  the mean) with `chunked_cross_entropy`, and returns the model's output with that loss and ``logits=None``.

`chunked_cross_entropy` computes the gradients of the hidden states and of the head in the forward pass, one chunk
at a time (Liger-Kernel's "fused linear cross entropy"): the head's matrix products are the same three as without
chunks, and no chunk's logits outlive the chunk. The backward pass only scales them by the incoming gradient.
Evaluation calls, calls without labels, and calls under `torch.no_grad()` run the model as it is, logits included.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..logs import get_logger
from ..processes import is_main_process

__all__ = [
    "CHUNK_TOKENS", "ChunkedLossHooks", "chunked_cross_entropy", "chunked_loss_unsupported", "fused_loss_owner", "set_chunked_loss",
]

logger = get_logger(__name__)

# Tokens per chunk: the logits of one chunk are CHUNK_TOKENS × vocabulary floats (128 MiB for Llama-3's 128k
# vocabulary), large enough that each chunk's matrix products read the head's weights efficiently.
CHUNK_TOKENS = 256
IGNORE_INDEX = -100
# Config attributes that change the logits between the head and the loss: the hooks would compute another loss.
_LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")
# The attribute of the model that holds its installed hooks: a second freezer on the same model reuses them.
_INSTALLED = "_hf_freeze_chunked_loss"


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor, chunk_tokens, compute_dtype):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        # The matrix products run in the training's autocast dtype (as the head's own forward would under autocast),
        # the gradients accumulate in the parameters' dtype.
        dtype = compute_dtype or hidden.dtype
        head = weight.to(dtype)
        head_bias = bias.to(dtype) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk, target = hidden[rows].to(dtype), labels[rows]
            # As `ForCausalLMLoss`: logits in the model's precision, the loss in float32.
            logits = nn.functional.linear(chunk, head, head_bias).float()
            counted = target != IGNORE_INDEX
            safe_target = torch.where(counted, target, 0)
            picked = logits.gather(1, safe_target[:, None]).squeeze(1)
            # The log-sum-exp as torch computes it (the row's maximum taken out first), but in place: the chunk's
            # logits become the softmax's numerators, and no second chunk-sized tensor exists.
            largest = logits.amax(dim=-1, keepdim=True)
            exponentials = logits.sub_(largest).exp_()
            totals = exponentials.sum(dim=-1)
            log_normalizer = largest.squeeze(1) + totals.log()
            loss += torch.where(counted, log_normalizer - picked, 0.0).sum()
            if not (needs_hidden or needs_weight or needs_bias):
                continue
            # d loss / d logits = (softmax - one-hot) / divisor, zero for ignored tokens; computed in place.
            grad_logits = exponentials.div_(totals[:, None])
            grad_logits.scatter_add_(1, safe_target[:, None], torch.full_like(picked[:, None], -1.0))
            grad_logits.mul_((counted.float() / divisor)[:, None])
            grad_logits = grad_logits.to(dtype)
            if needs_hidden:
                grad_hidden[rows] = grad_logits @ head
            if needs_weight:
                if dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad_logits.t(), chunk)
                else:
                    grad_weight += grad_logits.t() @ chunk
            if needs_bias:
                grad_bias += grad_logits.sum(0)
        ctx.gradients = (grad_hidden, grad_weight, grad_bias)  # computed here, scaled in backward
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place and handed over: a copy would hold the head's gradient twice until the graph is freed.
        grads, ctx.gradients = ctx.gradients, None
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return grads[0], grads[1], grads[2], None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    num_items_in_batch: Optional[Any] = None,
    chunk_tokens: int = CHUNK_TOKENS,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Cross-entropy of ``linear(hidden, weight, bias)`` against ``labels`` (already aligned with ``hidden``;
    ``-100`` is ignored), computed ``chunk_tokens`` rows at a time: the sum divided by ``num_items_in_batch`` when
    given, else the mean over the counted tokens, as transformers' `fixed_cross_entropy`. ``compute_dtype``: the
    dtype of the matrix products (the training's autocast dtype); default the dtype of ``hidden``.

    Example:

    ```python
    >>> import torch
    >>> from hf_freeze.loss.chunked import chunked_cross_entropy
    >>> hidden, weight = torch.randn(10, 4), torch.randn(7, 4)
    >>> labels = torch.tensor([1, 2, 3, -100, 4, 5, 6, 0, 1, 2])
    >>> full = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels)
    >>> torch.allclose(chunked_cross_entropy(hidden, weight, None, labels, chunk_tokens=3), full)
    True
    ```
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        divisor = (labels != IGNORE_INDEX).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, labels, divisor, chunk_tokens, compute_dtype)


def chunked_loss_unsupported(model: nn.Module) -> Optional[str]:
    """Why the chunked loss cannot stand in for this model's own loss, or None when it can."""
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "config"):
        return "the model is not a transformers model"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return "the model has no linear LM head" if head is None else f"its LM head is a {type(head).__name__}, not a Linear"
    if getattr(model, "loss_type", None) not in (None, "ForCausalLM") or "_loss_function" in vars(model):
        return "its loss is not transformers' causal-LM loss"
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return f"{type(model).__name__} is not a causal language model"
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    changes = [name for name in _LOGIT_CHANGES if getattr(config, name, None) not in (None, False)]
    if changes:
        return f"its config changes the logits before the loss ({', '.join(changes)})"
    return None


def fused_loss_owner(model: nn.Module) -> Optional[str]:
    """The library whose fused loss already computes ``model``'s training loss (Liger-Kernel, as `use_liger_kernel=True`
    patches the model in `Trainer.train`, or Apple's Cut Cross-Entropy), or None."""
    for function in (getattr(model.forward, "__func__", model.forward), type(model).forward):
        module = getattr(function, "__module__", "") or ""
        if module.startswith("liger_kernel"):
            return "Liger-Kernel"
        if module.startswith("cut_cross_entropy"):
            return "Cut Cross-Entropy"
    return None


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    """Whether Liger-Kernel's fused linear cross entropy can be imported (it needs Triton and a GPU); asked on every
    training call on a GPU, so a failed import is tried once, not at every step."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception:  # not installed, or Triton without a GPU: both mean "not here"
        return False
    return True


def set_chunked_loss(model: nn.Module, enabled: bool, on_accelerator: str = "model") -> Optional["ChunkedLossHooks"]:
    """Install the hooks on ``model`` (once, however many freezers are built on it; a later freezer's
    ``on_accelerator`` wins) or remove them."""
    installed = getattr(model, _INSTALLED, None)
    if not enabled:
        if installed is not None:
            installed.remove()
        return None
    if installed is None:
        installed = ChunkedLossHooks(model)
    installed.on_accelerator = on_accelerator
    return installed


class ChunkedLossHooks:
    """Compute a causal LM's training loss with `chunked_cross_entropy` instead of from the full logits.

    Training calls (module in training mode, gradients enabled, ``labels`` given as a keyword, a dict-like output)
    return the same loss and gradients as the model's own loss, with ``logits=None``; every other call is untouched.
    The matrix products run in the autocast dtype of the training (bf16 under ``bf16=True``), as the head would.

    On an accelerator (CUDA) the hand-written chunks are slower than the model's own loss (measured on an H200:
    docs/performance.md), so ``on_accelerator`` decides there: ``"model"`` leaves the model's own loss alone,
    ``"liger"`` computes it with Liger-Kernel's fused linear cross entropy (the chunks where Liger is missing). A
    model whose loss is already fused (`fused_loss_owner`: the Trainer's ``use_liger_kernel=True``) is left alone.

    Args:
        model: A transformers causal LM (see `chunked_loss_unsupported`).
        chunk_tokens: Tokens per chunk.
        on_accelerator: ``"model"`` or ``"liger"``, see above.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_freeze.loss import ChunkedLossHooks
    >>> config = AutoConfig.for_model(
    ...     "llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=100)
    >>> model = AutoModelForCausalLM.from_config(config).train()
    >>> ids = torch.randint(0, 100, (2, 16))
    >>> reference = model(ids, labels=ids).loss
    >>> hooks = ChunkedLossHooks(model, chunk_tokens=8)
    >>> output = model(ids, labels=ids)
    >>> torch.allclose(output.loss, reference), output.logits
    (True, None)
    >>> hooks.remove()
    ```
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = CHUNK_TOKENS, on_accelerator: str = "model"):
        reason = chunked_loss_unsupported(model)
        if reason is not None:
            raise ValueError(f"the chunked loss does not apply: {reason}")
        self.model, self.head, self.chunk_tokens = model, model.get_output_embeddings(), chunk_tokens
        self.on_accelerator = on_accelerator
        self._call: Optional[Dict[str, Any]] = None
        self._said: set = set()
        self._handles = [
            model.register_forward_pre_hook(self._take_labels, with_kwargs=True),
            self.head.register_forward_pre_hook(self._keep_hidden_states),
            model.register_forward_hook(self._compute_loss),
        ]
        object.__setattr__(model, _INSTALLED, self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(self.model, _INSTALLED, None) is self:
            object.__delattr__(self.model, _INSTALLED)

    def _take_labels(self, module, args, kwargs):
        self._call = None
        if (
            not module.training or not torch.is_grad_enabled() or kwargs.get("labels") is None
            or kwargs.get("return_dict") is False or kwargs.get("logits_to_keep") not in (None, 0)
            or "fused_lm_head" in kwargs  # TRL's own fused head computes the loss and the metrics it needs
        ):
            return None
        owner = fused_loss_owner(module)
        if owner is not None:
            self._say_once(owner, f"hf_freeze: {owner} already computes this model's loss without the full logits; "
                                  "`freeze_chunked_loss` leaves it alone.")
            return None
        liger = False
        device = _input_device(args, kwargs)
        if device is not None and device.type != "cpu":
            if self.on_accelerator == "model":
                return None  # the model's own loss is the faster one there
            liger = liger_available()
            if not liger:
                self._say_once("no liger", "hf_freeze: `freeze_chunked_loss: true` on a GPU computes the loss with "
                                           "Liger-Kernel's fused kernel, which is not installed (`pip install "
                                           "hf_freeze[gpu]`); the slower hand-written chunks stand in.")
        kwargs = dict(kwargs)
        self._call = {
            "labels": kwargs.pop("labels"),
            "num_items_in_batch": kwargs.pop("num_items_in_batch", None),
            "shift_labels": kwargs.pop("shift_labels", None),
            "liger": liger,
        }
        return args, kwargs

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            if is_main_process():
                logger.warning(message)

    def _keep_hidden_states(self, module, args):
        if self._call is None or "hidden" in self._call:
            return None
        (hidden,) = args
        self._call["hidden"] = hidden
        # Module hooks on the model run outside the autocast that wraps its forward; this one runs inside it.
        kind = hidden.device.type
        self._call["dtype"] = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return (hidden[..., :0, :],)

    def _compute_loss(self, module, args, output):
        call, self._call = self._call, None
        if call is None:
            return None
        if "hidden" not in call:
            raise RuntimeError("the chunked loss saw no call of the LM head: set `freeze_chunked_loss: false`")
        shifted = call["shift_labels"]
        if shifted is None:  # as `ForCausalLMLoss`: token t predicts label t + 1
            shifted = nn.functional.pad(call["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
        if call["liger"]:
            loss = _liger_loss(call["hidden"], self.head, shifted, call["num_items_in_batch"], call["dtype"])
        else:
            loss = chunked_cross_entropy(
                call["hidden"], self.head.weight, self.head.bias, shifted, call["num_items_in_batch"], self.chunk_tokens,
                call["dtype"],
            )
        fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
        return type(output)(loss=loss, logits=None, **fields)


def _input_device(args, kwargs) -> Optional[torch.device]:
    for value in list(kwargs.values()) + list(args):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _liger_loss(hidden, head: nn.Linear, labels, num_items_in_batch, dtype) -> torch.Tensor:
    """Transformers' causal-LM loss (labels already shifted) with Liger-Kernel's fused linear cross entropy, its
    operands in the training's autocast dtype. (Handing Liger the float32 weight under autocast instead measured
    slower on an H200 at the same peak: 0.733 against 0.618 of full fine-tuning's step, bottom 50% + frozen bf16.)"""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = dtype or hidden.dtype
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    labels = labels.reshape(-1).to(hidden.device)
    bias = head.bias.to(dtype) if head.bias is not None else None
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = liger_fused_linear_cross_entropy(hidden, head.weight.to(dtype), labels, bias, reduction=reduction).float()
    if num_items_in_batch is None:
        return loss
    return loss / torch.as_tensor(num_items_in_batch, device=loss.device).float()
