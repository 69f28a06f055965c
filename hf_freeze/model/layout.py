"""The model's blocks as plain data: what discovery produces and what policies read.

Nothing here touches torch, so policies built on these types can be tested with hand-written layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Collection, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import LayerDiscoveryError, invalid, invalid_choice

EMBEDDINGS = "embeddings"
LAYER = "layer"
NORM = "norm"
OTHER = "other"
HEAD = "head"
BLOCK_KINDS = (EMBEDDINGS, LAYER, NORM, OTHER, HEAD)

# Parts of a multi-part model (a vision-language model), in forward order. Single-part models have none.
AUDIO = "audio"
VISION = "vision"
PROJECTOR = "projector"
LANGUAGE = "language"
PARTS = (AUDIO, VISION, PROJECTOR, LANGUAGE)
# Components inside the layers of a mixture-of-experts model (parameter groups, not blocks).
ROUTER = "router"
SHARED_EXPERTS = "shared_experts"
ROUTED_EXPERTS = "routed_experts"
# The module hf_freeze adds at the root of a model to hold the trainable rows of frozen parameters
# (`freeze_trainable_tokens`, `freeze_trainable_experts`): discovery looks through it, saving leaves it out.
ROWS_MODULE = "hf_freeze_rows"


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
        part: The part of a multi-part model the block belongs to (``"vision"``, ``"projector"``,
            ``"language"``), ``None`` on a single-part model.

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
    part: Optional[str] = None

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
        layer_parts: The parts whose layers are *the layers* that layer strategies count and ``layer_index``
            numbers (the language model's, on a vision-language model); ``None``: every layer block.
        components: Parameter groups inside the layers, by component (``"router"``, ``"shared_experts"``,
            ``"routed_experts"`` of a mixture-of-experts model); empty on dense models.
        leaf_modules: The modules with no submodules and at least one parameter, in Composer's depth-first order,
            each as (module path, its parameter names): what `freeze_granularity: module` counts. Empty when the
            layout was written by hand.
        row_counts: The parameters that can train by rows, with their number of rows (first dimension): the token
            embeddings (input and output; a row per token) and the fused routed-expert tensors (a slice per expert).
        base_vocabulary: The vocabulary size before the model was resized (`freeze_trainable_tokens: new` trains the
            rows past it); ``None`` when unknown.

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
    layer_parts: Optional[Tuple[str, ...]] = None
    components: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    leaf_modules: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    row_counts: Dict[str, int] = field(default_factory=dict)
    base_vocabulary: Optional[int] = None

    @property
    def layers(self) -> List[Block]:
        """The counted layers (those of `layer_parts`), in forward order."""
        return [block for block in self.blocks if block.kind == LAYER and self._counts(block)]

    def _counts(self, block: Block) -> bool:
        return self.layer_parts is None or block.part is None or block.part in self.layer_parts

    @property
    def parts(self) -> List[str]:
        """The model's parts in forward order; empty on a single-part model."""
        return list(dict.fromkeys(block.part for block in self.blocks if block.part is not None))

    def blocks_of_part(self, *parts: str) -> List[Block]:
        return [block for block in self.blocks if block.part in parts]

    def part_parameters(self, part: str, frozen: Collection[str] = ()) -> int:
        """The parameters of ``part`` not in ``frozen`` (all of them with the default)."""
        return sum(size for block in self.blocks_of_part(part) for name, size in zip(block.parameters, block.sizes)
                   if name not in frozen)

    def counting(self, parts: Optional[Sequence[str]]) -> "ModelLayout":
        """The same blocks with the layers of ``parts`` counted (``None``: all): they are numbered 0, 1, ... in
        forward order, and the layers of other parts get ``layer_index=None``."""
        counted = replace(self, layer_parts=None if parts is None else tuple(parts))
        blocks, index = [], 0
        for block in self.blocks:
            if block.kind == LAYER:
                if counted._counts(block):
                    block, index = replace(block, layer_index=index), index + 1
                else:
                    block = replace(block, layer_index=None)
            blocks.append(block)
        return replace(counted, blocks=tuple(blocks))

    def restricted_to(self, parts: Sequence[str], keep_kinds: Sequence[str] = ()) -> "ModelLayout":
        """Only the blocks of ``parts`` (and blocks of the kinds in ``keep_kinds``, wherever they are): what a
        policy that counts one part's layers sees."""
        blocks = tuple(block for block in self.blocks if block.part is None or block.part in parts or block.kind in keep_kinds)
        kept = {name for block in blocks for name in block.parameters}
        return replace(
            self,
            blocks=blocks,
            input_embedding_parameters=tuple(n for n in self.input_embedding_parameters if n in kept),
            output_embedding_parameters=tuple(n for n in self.output_embedding_parameters if n in kept),
            components={key: tuple(n for n in names if n in kept) for key, names in self.components.items()},
            leaf_modules=tuple(leaf for leaf in self.leaf_modules if set(leaf[1]) <= kept),
            row_counts={name: count for name, count in self.row_counts.items() if name in kept},
        )

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
        # Each block is one module here: its leaf.
        leaves = tuple((block.name, block.parameters) for block in blocks)
        return cls(blocks=tuple(blocks), input_embedding_parameters=input_embeddings, leaf_modules=leaves)


def inside(path: str, ancestor: str) -> bool:
    """Whether the module at dotted ``path`` is ``ancestor`` or inside it (``""`` is the whole model)."""
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def refuse_overlapping_paths(layer_paths: Sequence[str]) -> None:
    """Each layer belongs to one container: a path given twice, or inside another, would count its layers twice."""
    for index, path in enumerate(layer_paths):
        for other in layer_paths[:index]:
            if path == other or inside(path, other) or inside(other, path):
                relation = "is given twice" if path == other else f"overlaps {other!r}"
                raise LayerDiscoveryError(
                    f"`freeze_layer_paths` entry {path!r} {relation}: every layer would be counted twice. Name each "
                    f"container of layers once (got {list(layer_paths)!r}).",
                    fields=["freeze_layer_paths"],
                )


# `freeze_component_paths` keys (the names users know from LLaMA-Factory and ms-swift) -> parts.
COMPONENT_KEYS = {"vision_tower": VISION, "audio_tower": AUDIO, "projector": PROJECTOR, "language_model": LANGUAGE}


def check_component_paths(value: Optional[Dict[str, object]]) -> Optional[Dict[str, List[str]]]:
    """``freeze_component_paths`` as ``{key: [module paths]}``: the parts of a multi-part model named by hand, for
    models whose parts discovery cannot tell apart. Keys are those of `COMPONENT_KEYS`; a part may span several
    modules (two projectors), the language model is one."""
    if value is None:
        return None
    name = "freeze_component_paths"
    expected = "a mapping from " + ", ".join(repr(key) for key in COMPONENT_KEYS) + " to dotted module paths"
    if not isinstance(value, dict) or not value:
        raise invalid(name, value, expected, hint="e.g. {vision_tower: model.vision_tower, language_model: model.language_model}")
    checked: Dict[str, List[str]] = {}
    for key, paths in value.items():
        if key not in COMPONENT_KEYS:
            raise invalid_choice(name, key, COMPONENT_KEYS, hint="the keys of the mapping name the parts")
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(path, str) and path for path in paths):
            raise invalid(name, {key: value[key]}, f"for {key!r}, a dotted module path or a non-empty list of them")
        if key == "language_model" and len(paths) != 1:
            raise invalid(name, {key: value[key]}, "for 'language_model', one dotted module path (it is one module)")
        checked[key] = list(paths)
    owned = [(key, path) for key, paths in checked.items() for path in paths]
    for index, (key, path) in enumerate(owned):
        for other_key, other in owned[:index]:
            if not (inside(path, other) or inside(other, path)):
                continue
            outer_key, inner_key = (other_key, key) if inside(path, other) else (key, other_key)
            # Qwen2-VL keeps its projector (`visual.merger`) inside the vision encoder: the one meaningful overlap.
            if path == other or not (inner_key == "projector" and outer_key in ("vision_tower", "audio_tower")):
                raise invalid(
                    name, value, "paths that do not overlap (a projector inside an encoder is the one exception)",
                    hint=f"{path!r} and {other!r} overlap",
                )
    return checked

