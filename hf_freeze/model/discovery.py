"""Discovery: turn a model into an ordered list of blocks (embeddings, layers, norms, head).

It knows architectures by a general rule, not by a table of model names:

* the *layers* are the outermost ``nn.ModuleList``/``nn.ModuleDict`` containers whose entries hold parameters
  (``transformer.h``, ``model.layers``, ``encoder.block`` then ``decoder.block``), in registration order;
* every other parameter belongs to the largest module around it that holds no layer container; that module is
  classified as the task head (outside the base model, or the output embeddings), embeddings (the input
  embeddings, or a name that says ``embed``/``wte``/``wpe``/``shared``/``patch``), a norm, or other;
* a module that is not a transformers model is split by the recursive traversal of the Frozen Layers paper
  (unwrapping ``nn.Sequential``/``nn.ModuleList``/``nn.ModuleDict``).

Discovery knows nothing about policies.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from torch import nn

from ..errors import LayerDiscoveryError
from .layout import (
    EMBEDDINGS,
    HEAD,
    LANGUAGE,
    LAYER,
    NORM,
    OTHER,
    ROUTED_EXPERTS,
    ROWS_MODULE,
    Block,
    ModelLayout,
    inside,
    refuse_overlapping_paths,
)
from .leaves import leaf_modules
from .parts import base_model_prefix, find_parts, find_part_stacks, with_parts
from .stacks import UNWRAP, Stack, find_stacks, has_parameters, no_layers_message, stack_at

# Task heads by their usual attribute names, for models whose base model is not a separate attribute.
_HEAD_NAME = re.compile(r"^(lm_head|classifier|score|qa_outputs|head|heads|cls|pre_classifier|embed_out|proj_out)$")
_EMBEDDING_NAME = re.compile(r"embed|^wte$|^wpe$|^shared$|patch|^cls_token$|^mask_token$", re.IGNORECASE)

__all__ = ["discover_layout", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/DeepSpeed/``torch.compile`` wrappers (accelerate's own unwrapping): the module whose parameters
    are named as the user knows them (a compiled model would show one block, ``_orig_mod``)."""
    import inspect

    from accelerate.utils import extract_model_from_parallel

    if "keep_torch_compile" in inspect.signature(extract_model_from_parallel).parameters:
        return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
    return extract_model_from_parallel(model, keep_fp32_wrapper=True)


def discover_layout(
    model: nn.Module,
    layer_paths: Optional[Sequence[str]] = None,
    component_paths: Optional[Dict[str, List[str]]] = None,
) -> ModelLayout:
    """Describe ``model`` as ordered blocks.

    Args:
        model: A transformers ``PreTrainedModel`` or any ``nn.Module``.
        layer_paths: Dotted paths of the layer containers, in forward order, when the general rule does not
            find them (``["model.layers"]``). This is the ``freeze_layer_paths`` option.
        component_paths: The parts of a multi-part model by hand, ``{"vision_tower": [...], "projector": [...],
            "language_model": [...]}``, when they are not found automatically: the ``freeze_component_paths``
            option, as `check_component_paths` returns it.

    Raises:
        LayerDiscoveryError: no layers could be found, or a given path is not a container of layers.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_freeze import discover_layout
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    >>> [block.name for block in discover_layout(net).layers]
    ['0', '2', '3']
    ```
    """
    model = unwrap_model(model)
    canonical = _canonical_parameter_names(model)
    layout = _discover(model, canonical, layer_paths, component_paths)
    return replace(layout, leaf_modules=leaf_modules(model, canonical))


def _discover(model: nn.Module, canonical: Dict[str, str], layer_paths, part_paths) -> ModelLayout:
    parts = find_parts(model, part_paths) if _is_transformers_model(model) or part_paths else []
    if layer_paths:
        refuse_overlapping_paths(layer_paths)
        stacks = [stack_at(model, path) for path in layer_paths]
        # Containers named by the user are the layers, every one of them counted.
        return _with_rows(model, with_parts(model, _layout_from_stacks(model, stacks, canonical, notes=[]), parts, counted=None))
    if _is_transformers_model(model) or parts:
        if parts:
            stacks, notes = find_part_stacks(model, parts)
        else:
            stacks, notes = find_stacks(model)
        if not stacks:
            raise LayerDiscoveryError(no_layers_message(model), fields=["freeze_layer_paths"])
        layout = _layout_from_stacks(model, stacks, canonical, notes)
        return _with_rows(model, with_parts(model, layout, parts, counted=(LANGUAGE,) if parts else None))
    return _layout_by_traversal(model, canonical)


def _with_rows(model: nn.Module, layout: ModelLayout) -> ModelLayout:
    """Record the parameters that can train by rows: the token embeddings (a row per token) and the fused
    routed-expert tensors of transformers 5 (``(experts, out, in)``: a slice per expert)."""
    parameters = dict(_own_parameters(model))
    candidates = [*layout.input_embedding_parameters, *layout.output_embedding_parameters]
    candidates += [name for name in layout.components.get(ROUTED_EXPERTS, ()) if parameters[name].dim() == 3]
    counts = {name: parameters[name].shape[0] for name in candidates if name in parameters and parameters[name].dim() >= 2}
    return replace(layout, row_counts=counts)


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


# ---------------------------------------------------------------------------------------------------------------
# Layout assembly


def _canonical_parameter_names(model: nn.Module) -> Dict[str, str]:
    """Map every parameter name, aliases included, to the name ``named_parameters()`` reports for it."""
    first_name = {id(parameter): name for name, parameter in reversed(list(_own_parameters(model)))}
    return {name: first_name[id(parameter)] for name, parameter in _own_parameters(model, remove_duplicate=False)}


def _own_parameters(model: nn.Module, remove_duplicate: bool = True):
    """The model's parameters without the trainable rows hf_freeze added (they stand for rows of other parameters)."""
    for name, parameter in model.named_parameters(remove_duplicate=remove_duplicate):
        if not name.startswith(ROWS_MODULE + "."):
            yield name, parameter


def _module_parameter_names(module: Optional[nn.Module], prefix_of: Dict[int, str], canonical: Dict[str, str]):
    if module is None or id(module) not in prefix_of:
        return ()
    prefix = prefix_of[id(module)]
    return tuple(
        dict.fromkeys(canonical[f"{prefix}.{name}" if prefix else name] for name, _ in module.named_parameters())
    )


def _embedding_facts(model: nn.Module, canonical: Dict[str, str]):
    prefix_of = {}
    for path, module in model.named_modules(remove_duplicate=False):
        prefix_of.setdefault(id(module), path)
    input_embeddings = output_embeddings = None
    if hasattr(model, "get_input_embeddings"):
        try:
            input_embeddings = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            input_embeddings = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output_embeddings = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            output_embeddings = None
    return (
        _module_parameter_names(input_embeddings, prefix_of, canonical),
        _module_parameter_names(output_embeddings, prefix_of, canonical),
        prefix_of.get(id(input_embeddings)) if input_embeddings is not None else None,
    )


def _layout_from_stacks(
    model: nn.Module, stacks: List[Stack], canonical: Dict[str, str], notes: List[str]
) -> ModelLayout:
    parameters = dict(_own_parameters(model))
    tied = {alias: name for alias, name in canonical.items() if alias != name}
    input_params, output_params, input_module_path = _embedding_facts(model, canonical)
    for stack in stacks:
        if stack.positions > len(stack.entries):
            notes.append(
                f"{stack.path} repeats {len(stack.entries)} distinct module(s) over {stack.positions} positions "
                "(shared weights): each distinct module is one block."
            )
    stack_paths = [stack.path for stack in stacks]

    layer_blocks: Dict[str, List[Block]] = {stack.path: [] for stack in stacks}
    in_layer = set()
    layer_index = 0
    for stack in stacks:
        for entry_path, _ in stack.entries:
            names = tuple(name for name in parameters if name.startswith(entry_path + "."))
            if not names:
                continue
            in_layer.update(names)
            layer_blocks[stack.path].append(
                Block(entry_path, LAYER, names, tuple(parameters[n].numel() for n in names), layer_index, stack.path)
            )
            layer_index += 1

    # Group the remaining parameters by the largest module around them that holds no layer container.
    groups: Dict[str, List[str]] = {}
    for name in parameters:
        if name in in_layer:
            continue
        # A tied embedding may be reported under the head's name (lm_head.decoder.weight when the head is
        # registered first): it still belongs with the input embeddings.
        owner_path = f"{input_module_path}.weight" if name in input_params and input_module_path else name
        groups.setdefault(_owning_block(owner_path, stack_paths), []).append(name)
    module_order = {path: index for index, (path, _) in enumerate(model.named_modules())}

    base_prefix = base_model_prefix(model)
    before: Dict[str, List[Block]] = {path: [] for path in stack_paths}
    after: Dict[str, List[Block]] = {path: [] for path in stack_paths}
    heads: List[Block] = []
    for block_name, names in groups.items():
        kind = _classify(model, block_name, names, base_prefix, input_params, output_params)
        anchor = _anchor_stack(block_name, stacks, kind)
        if kind in (NORM, OTHER) and _registered_before(block_name, anchor, module_order):
            # A stem registered before the layers beside it (Whisper's convolutions, CLIP's pre-layernorm) feeds
            # them: it is on the input side, like the embeddings.
            kind = EMBEDDINGS
        block = Block(block_name, kind, tuple(names), tuple(parameters[n].numel() for n in names), None, anchor)
        if kind == HEAD:
            heads.append(block)
        elif kind == EMBEDDINGS:
            before[anchor].append(block)
        else:
            after[anchor].append(block)

    ordered: List[Block] = []
    for path in stack_paths:
        ordered += before[path] + layer_blocks[path] + after[path]
    ordered += heads

    if output_params and set(output_params) & set(input_params):
        aliases = [alias for alias, name in tied.items() if name in input_params]
        notes.append(
            f"Input and output embeddings are tied ({', '.join(aliases) or output_params[0]} shares its weight with "
            f"{input_params[0]}): freezing one freezes the other."
        )
    return ModelLayout(
        blocks=tuple(ordered),
        tied_parameters=tied,
        input_embedding_parameters=input_params,
        output_embedding_parameters=output_params,
        notes=tuple(notes),
    )


def _owning_block(parameter_name: str, stack_paths: Sequence[str]) -> str:
    segments = parameter_name.split(".")
    for length in range(1, len(segments) + 1):
        prefix = ".".join(segments[:length])
        if not any(inside(path, prefix) for path in stack_paths):
            return prefix
    return parameter_name


def _registered_before(block_name: str, stack_path: str, module_order: Dict[str, int]) -> bool:
    # named_modules() is a pre-order walk: a module registered before the branch holding the layers comes first.
    block_module = block_name if block_name in module_order else block_name.rpartition(".")[0]
    if inside(stack_path, block_module):  # a bare parameter on a module that holds the layers
        return False
    return module_order.get(block_module, -1) < module_order.get(stack_path, -1)


def _classify(model, block_name, names, base_prefix, input_params, output_params) -> str:
    # Tied embeddings are one parameter: it belongs to the input side, and the head follows it.
    if set(names) & set(input_params):
        return EMBEDDINGS
    if set(names) & set(output_params):
        return HEAD
    if base_prefix is not None and not inside(block_name, base_prefix):
        return HEAD
    if _HEAD_NAME.match(block_name.split(".")[0]) and "." not in block_name:
        return HEAD
    if any(_EMBEDDING_NAME.search(part) for part in block_name.split(".")):
        return EMBEDDINGS
    try:
        module = model.get_submodule(block_name)
    except AttributeError:  # a bare parameter hanging off a container
        return OTHER
    if isinstance(module, nn.Embedding):
        return EMBEDDINGS
    if "norm" in type(module).__name__.lower():
        return NORM
    return OTHER


def _shared_segments(path: str, other: str) -> int:
    count = 0
    for mine, theirs in zip(path.split("."), other.split(".")):
        if mine != theirs:
            break
        count += 1
    return count


def _anchor_stack(block_name: str, stacks: List[Stack], kind: str) -> str:
    """The layer container a non-layer block sits next to: the one whose parent encloses it most closely."""
    enclosing = [stack for stack in stacks if stack.parent and inside(block_name, stack.parent)]
    if enclosing:
        return max(enclosing, key=lambda stack: len(stack.parent)).path
    # Otherwise the stack it shares the longest path with (a vision encoder's pre-norm sits beside its encoder's
    # layers, not the language model's); on a tie, the first stack for embeddings and the last for the rest.
    shared = [_shared_segments(block_name, stack.path) for stack in stacks]
    best = max(shared)
    closest = [stack for stack, length in zip(stacks, shared) if length == best]
    if len(closest) < len(stacks):
        return (closest[0] if kind == EMBEDDINGS else closest[-1]).path
    return stacks[0].path if kind == EMBEDDINGS else stacks[-1].path


def _layout_by_traversal(model: nn.Module, canonical: Dict[str, str]) -> ModelLayout:
    """Frozen Layers paper, Algorithm 1: unwrap containers recursively; every other child with parameters is a layer."""
    parameters = dict(_own_parameters(model))
    block_paths: List[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, _ in module.named_parameters(recurse=False):
            block_paths.append(f"{prefix}.{name}" if prefix else name)
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path == ROWS_MODULE:
                continue
            if isinstance(child, UNWRAP):
                visit(child, path)
            elif has_parameters(child):
                block_paths.append(path)

    visit(model, "")
    blocks = []
    for path in block_paths:
        names = tuple(name for name in parameters if name == path or name.startswith(path + "."))
        if names:
            blocks.append(Block(path, LAYER, names, tuple(parameters[n].numel() for n in names), len(blocks), ""))
    if not blocks:
        raise LayerDiscoveryError(
            f"{type(model).__name__} has no parameters to freeze, so no layers could be found. "
            "Name the layer container(s) with `freeze_layer_paths`.",
            fields=["freeze_layer_paths"],
        )
    tied = {alias: name for alias, name in canonical.items() if alias != name}
    return ModelLayout(blocks=tuple(blocks), tied_parameters=tied)
