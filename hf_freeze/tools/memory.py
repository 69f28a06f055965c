"""Estimate the memory a training step needs: weights, gradients, optimizer states and activations.

Pure arithmetic over a `ModelLayout` and a frozen set, so a policy can be judged before any weight is loaded. It is an
estimate, not a measurement: it leaves out the CUDA context, allocator fragmentation, temporary buffers and the
attention score matrix (fused attention kernels such as SDPA/FlashAttention do not store it).

Activations follow what autograd really keeps:

* blocks before the first trainable block (in forward order) keep nothing: no gradient flows through them. This is
  where freezing the bottom layers *and all input embeddings* saves memory;
* every layer from the first trainable block on keeps its activations, frozen or not, because the gradient flows
  through it; a frozen one keeps less (no inputs of its linear layers: measured 29/36 on GPT-2 and BERT, 32/40 on
  Llama, hence `FROZEN_ON_PATH_RATIO`);
* with gradient checkpointing, a layer on the gradient path keeps only its input, plus one layer's activations at
  a time while it is recomputed;
* an LM head adds the logits, in the activation precision and in float32 for the loss; with the chunked loss
  (`freeze_chunked_loss`) one chunk's logits at a time (and their float32 copy in lower precision), plus the gradient of the hidden states that the loss computes
  in the forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Collection, Dict, Mapping, Optional, Sequence

from ..errors import invalid_choice
from ..model.layout import LAYER, ModelLayout
from ..policies.row_selection import trainable_row_elements

__all__ = [
    "FROZEN_ON_PATH_RATIO",
    "OPTIMIZERS",
    "PRECISIONS",
    "ActivationShape",
    "MemoryEstimate",
    "Precision",
    "estimate_training_memory",
    "part_memory",
]

# Saved activations of a frozen layer that the gradient still flows through, relative to a trainable one.
FROZEN_ON_PATH_RATIO = 0.8


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of training memory under one precision setting."""

    weight: int
    gradient: int
    optimizer_state: int
    activation: int
    description: str


PRECISIONS: Dict[str, Precision] = {
    "fp32": Precision(4, 4, 4, 4, "float32 everywhere (the Trainer's default)"),
    "bf16-mixed": Precision(4, 4, 4, 2, "float32 weights, bfloat16 autocast (TrainingArguments bf16=True)"),
    "fp16-mixed": Precision(4, 4, 4, 2, "float32 weights, float16 autocast (TrainingArguments fp16=True)"),
    "bf16": Precision(2, 2, 2, 2, "weights loaded in bfloat16 (dtype=torch.bfloat16), optimizer states too"),
    "fp16": Precision(2, 2, 2, 2, "weights loaded in float16, optimizer states too"),
}

# Optimizer states per trainable parameter, and bytes per state (None: the precision's optimizer_state bytes).
OPTIMIZERS: Dict[str, tuple] = {
    "adamw": (2, None),
    "adamw-8bit": (2, 1),
    "sgd-momentum": (1, None),
    "sgd": (0, None),
}


@dataclass(frozen=True)
class ActivationShape:
    """The sizes that set how many activations one token leaves in one layer.

    Args:
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the MLP for one token (for a mixture of experts: expert width × experts per token).
        kv_size: Width of the key (and of the value) projection (smaller than `hidden_size` with grouped-query
            attention).
        gated_mlp: True for SwiGLU/GeGLU MLPs (gate and up projections).
        vocab_size: Size of the LM head's output, for the logits (0 when the model has no LM head).

    Example:

    ```python
    >>> from hf_freeze.tools.memory import ActivationShape
    >>> ActivationShape(hidden_size=768, intermediate_size=3072, kv_size=768).elements_per_token_per_layer
    12288
    ```
    """

    hidden_size: int
    intermediate_size: int
    kv_size: int
    gated_mlp: bool = False
    vocab_size: int = 0

    @property
    def elements_per_token_per_layer(self) -> int:
        # Attention: input, query, key, value, output; MLP: input and 2 (or 3 when gated) widths of the
        # intermediate; two norm inputs. GPT-2 sizes give 16 × hidden, Korthikanti et al. (2022) count 17 × hidden
        # with dropout masks.
        attention = 3 * self.hidden_size + 2 * self.kv_size
        mlp = self.hidden_size + (3 if self.gated_mlp else 2) * self.intermediate_size
        norms = 2 * self.hidden_size
        return attention + mlp + norms

    @classmethod
    def from_config(cls, config: Any, layout: Optional[ModelLayout] = None) -> Optional["ActivationShape"]:
        """Read the sizes from a transformers config; ``None`` when it names no hidden size."""
        config = getattr(config, "text_config", None) or config
        hidden = _first_int(config, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
        if not hidden:
            return None
        intermediate = _first_int(config, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim", "encoder_ffn_dim")
        experts_per_token = _first_int(config, "num_experts_per_tok", "moe_top_k", "top_k")
        expert_width = _first_int(config, "moe_intermediate_size")
        if expert_width and experts_per_token:
            intermediate = expert_width * experts_per_token
        heads = _first_int(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        kv_heads = _first_int(config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
        if getattr(config, "multi_query", False):
            kv_heads = 1
        kv_size = hidden
        if heads and kv_heads:
            head_dim = _first_int(config, "head_dim", "d_kv") or hidden // heads
            kv_size = head_dim * kv_heads
        gated = False
        if layout is not None and layout.layers:
            gated = any(
                marker in name for name in layout.layers[0].parameters for marker in ("gate_proj", "w3", "wi_0", "gate_up")
            )
        has_lm_head = layout is None or bool(layout.output_embedding_parameters)
        vocab = _first_int(config, "vocab_size") if has_lm_head else 0
        return cls(hidden, intermediate or 4 * hidden, kv_size, gated, vocab or 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory, in bytes, by kind (``activations`` is ``None`` when the shape is unknown)."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: Optional[int]

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + (self.activations or 0)

    def as_dict(self) -> Dict[str, Optional[int]]:
        return {**asdict(self), "total": self.total}


def estimate_training_memory(
    layout: ModelLayout,
    frozen: Collection[str],
    shape: Optional[ActivationShape],
    batch_size: int = 1,
    sequence_length: int = 512,
    precision: str = "fp32",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    trainable_rows: Optional[Mapping[str, Sequence[int]]] = None,
    loss_chunk_tokens: Optional[int] = None,
    adapter_parameters: int = 0,
    in_backward: Collection[str] = (),
) -> MemoryEstimate:
    """Estimate the memory of one training step with the parameters in ``frozen`` frozen (``trainable_rows``: rows
    of frozen parameters that train, with gradients and optimizer states of their own; ``loss_chunk_tokens``: the
    causal-LM loss is computed that many tokens at a time, `freeze_chunked_loss`; ``adapter_parameters``: adapter
    weights added to the model, all trained (`freeze_lora`), on the frozen parameters ``in_backward``, which the
    backward pass then runs through).

    Example:

    ```python
    >>> from hf_freeze import ModelLayout
    >>> from hf_freeze.tools.memory import estimate_training_memory
    >>> layout = ModelLayout.from_layer_sizes([1000, 1000], embeddings=500)
    >>> full = estimate_training_memory(layout, frozen=[], shape=None)
    >>> frozen = estimate_training_memory(layout, frozen=["embeddings.weight", "layers.0.weight"], shape=None)
    >>> full.optimizer_states, frozen.optimizer_states  # AdamW: 2 float32 states per trainable parameter
    (20000, 8000)
    ```
    """
    if precision not in PRECISIONS:
        raise invalid_choice("precision", precision, PRECISIONS)
    if optimizer not in OPTIMIZERS:
        raise invalid_choice("optimizer", optimizer, OPTIMIZERS)
    bytes_of = PRECISIONS[precision]
    states, state_bytes = OPTIMIZERS[optimizer]
    frozen = set(frozen)
    sizes = layout.parameter_sizes
    total = sum(sizes.values())
    trainable = total - sum(size for name, size in sizes.items() if name in frozen)
    trainable += sum(trainable_row_elements(layout, trainable_rows).values()) + adapter_parameters
    activations = None
    if shape is not None:
        # A parameter that trains by rows takes part in the backward pass.
        activations = _activation_bytes(
            layout, frozen - set(trainable_rows or ()) - set(in_backward), shape, batch_size * sequence_length, bytes_of.activation,
            gradient_checkpointing, loss_chunk_tokens,
        )
    return MemoryEstimate(
        weights=(total + adapter_parameters) * bytes_of.weight,
        gradients=trainable * bytes_of.gradient,
        optimizer_states=trainable * states * (state_bytes or bytes_of.optimizer_state),
        activations=activations,
    )


def part_memory(
    layout: ModelLayout, frozen: Collection[str], precision: str = "fp32", optimizer: str = "adamw"
) -> Dict[str, MemoryEstimate]:
    """Weights, gradients and optimizer states of each part of a multi-part model (``{}`` for a single-part model);
    activations are not split by part (``None``).

    Example:

    ```python
    >>> from hf_freeze import Block, ModelLayout
    >>> from hf_freeze.tools.memory import part_memory
    >>> layout = ModelLayout((
    ...     Block("vision.0", "layer", ("vision.0.w",), (100,), None, "vision", part="vision"),
    ...     Block("text.0", "layer", ("text.0.w",), (100,), 0, "text", part="language"),
    ... ), layer_parts=("language",))
    >>> {part: estimate.total for part, estimate in part_memory(layout, {"vision.0.w"}).items()}
    {'vision': 400, 'language': 1600}
    ```
    """
    return {
        part: estimate_training_memory(layout.restricted_to((part,)), frozen, None, precision=precision, optimizer=optimizer)
        for part in layout.parts
    }


def _activation_bytes(
    layout, frozen, shape: ActivationShape, tokens: int, element_bytes: int, checkpointing: bool,
    loss_chunk_tokens: Optional[int] = None,
) -> int:
    trains = [any(name not in frozen for name in block.parameters) for block in layout.blocks]
    if not any(trains):
        return 0
    per_layer = shape.elements_per_token_per_layer * tokens * element_bytes
    total = 0.0
    on_path_layers = 0
    for block, block_trains in list(zip(layout.blocks, trains))[trains.index(True):]:
        if block.kind != LAYER:
            continue
        on_path_layers += 1
        if checkpointing:
            total += shape.hidden_size * tokens * element_bytes
        else:
            total += per_layer * (1.0 if block_trains else FROZEN_ON_PATH_RATIO)
    if checkpointing and on_path_layers:
        total += per_layer  # the one layer being recomputed during backward
    if loss_chunk_tokens and shape.vocab_size:
        # One chunk's logits at a time (the softmax is computed in them, in place), with their float32 copy when the
        # model computes in lower precision, and the hidden states' gradient, held from the loss (computed in the
        # forward pass) until the backward pass reaches the head.
        chunk_bytes = 4 if element_bytes == 4 else element_bytes + 4
        total += min(tokens, loss_chunk_tokens) * shape.vocab_size * chunk_bytes
        total += tokens * shape.hidden_size * element_bytes
    else:
        # The loss upcasts the logits to float32 and keeps both copies for its backward.
        total += tokens * shape.vocab_size * (element_bytes + 4)
    return int(total)


def _first_int(config: Any, *names: str) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
