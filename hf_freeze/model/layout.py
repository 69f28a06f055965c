"""The model's blocks as plain data: what discovery produces and what policies read.

Nothing here touches torch, so policies built on these types can be tested with hand-written layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Dict, Iterable, List, Optional, Sequence, Tuple

EMBEDDINGS = "embeddings"
LAYER = "layer"
NORM = "norm"
OTHER = "other"
HEAD = "head"
BLOCK_KINDS = (EMBEDDINGS, LAYER, NORM, OTHER, HEAD)


@dataclass(frozen=True)
class Block:
    """One freezable unit of a model, in forward order.

    Args:
        name: Dotted module path of the block (``"transformer.h.3"``), or of its parameter when a parameter
            hangs directly off a container.
        kind: One of ``"embeddings"``, ``"layer"``, ``"norm"``, ``"other"``, ``"head"``.
        parameters: Names of the parameters the block owns (as in ``model.named_parameters()``).
        sizes: Number of elements of each parameter, in the same order.
        layer_index: Position among the repeated layers (0 = closest to the input), ``None`` for non-layers.
        stack: Dotted path of the layer container the block belongs to or sits beside (``"encoder.block"``).

    Example:

    ```python
    >>> from hf_freeze import Block
    >>> Block("h.0", "layer", ("h.0.w",), (16,), layer_index=0).num_parameters
    16
    ```
    """

    name: str
    kind: str
    parameters: Tuple[str, ...]
    sizes: Tuple[int, ...]
    layer_index: Optional[int] = None
    stack: Optional[str] = None

    @property
    def num_parameters(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class ModelLayout:
    """Ordered blocks of a model plus the facts policies need (tied weights, token embeddings).

    Args:
        blocks: Blocks in forward order (embeddings, layers, norms, head).
        tied_parameters: Maps an alias name (``"lm_head.weight"``) to the parameter it shares storage with
            (``"transformer.wte.weight"``). Aliases are not listed in any block.
        input_embedding_parameters: Parameters of ``model.get_input_embeddings()`` (the token embedding).
        output_embedding_parameters: Parameters of ``model.get_output_embeddings()``, canonical names.
        notes: Facts discovery wants the user to know (weight sharing, tied embeddings).

    Example:

    ```python
    >>> from hf_freeze import Block, ModelLayout
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10])
    >>> [block.name for block in layout.layers]
    ['layers.0', 'layers.1', 'layers.2']
    ```
    """

    blocks: Tuple[Block, ...]
    tied_parameters: Dict[str, str] = field(default_factory=dict)
    input_embedding_parameters: Tuple[str, ...] = ()
    output_embedding_parameters: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()

    @property
    def layers(self) -> List[Block]:
        return [block for block in self.blocks if block.kind == LAYER]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def blocks_of_kind(self, *kinds: str) -> List[Block]:
        return [block for block in self.blocks if block.kind in kinds]

    @property
    def parameter_names(self) -> List[str]:
        return [name for block in self.blocks for name in block.parameters]

    @property
    def parameter_sizes(self) -> Dict[str, int]:
        return {name: size for block in self.blocks for name, size in zip(block.parameters, block.sizes)}

    @property
    def num_parameters(self) -> int:
        return sum(block.num_parameters for block in self.blocks)

    def block_of(self) -> Dict[str, Block]:
        """Map each parameter name to its block."""
        return {name: block for block in self.blocks for name in block.parameters}

    def parameters_of(self, blocks: Iterable[Block]) -> List[str]:
        return [name for block in blocks for name in block.parameters]

    def frozen_layer_indices(self, frozen: Collection[str]) -> List[int]:
        """Indices of the layers whose parameters are all in ``frozen`` (parameter names)."""
        frozen = frozen if isinstance(frozen, (set, frozenset)) else set(frozen)
        return [
            block.layer_index for block in self.layers if block.parameters and all(name in frozen for name in block.parameters)
        ]

    @classmethod
    def from_layer_sizes(
        cls,
        layer_sizes: Sequence[int],
        embeddings: Optional[int] = None,
        norm: Optional[int] = None,
        head: Optional[int] = None,
    ) -> "ModelLayout":
        """Build a synthetic layout (one parameter per block): handy for trying policies without a model."""
        blocks: List[Block] = []
        if embeddings:
            blocks.append(Block("embeddings", EMBEDDINGS, ("embeddings.weight",), (embeddings,)))
        for index, size in enumerate(layer_sizes):
            blocks.append(
                Block(f"layers.{index}", LAYER, (f"layers.{index}.weight",), (size,), layer_index=index, stack="layers")
            )
        if norm:
            blocks.append(Block("norm", NORM, ("norm.weight",), (norm,)))
        if head:
            blocks.append(Block("head", HEAD, ("head.weight", "head.bias"), (head, 1)))
        input_embeddings = ("embeddings.weight",) if embeddings else ()
        return cls(blocks=tuple(blocks), input_embedding_parameters=input_embeddings)
