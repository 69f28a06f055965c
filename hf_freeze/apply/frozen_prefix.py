"""Make freezing pay under activation checkpointing.

With activation checkpointing on, transformers calls `enable_input_require_grads()`: a forward hook makes the
input embeddings' output require grad, so that reentrant checkpointing (which only propagates gradients through
inputs that require grad) still reaches the trainable weights. For a model whose bottom layers are frozen that
hook throws the savings away: autograd records the frozen layers, checkpointing recomputes them in the backward
pass, and the backward pass runs through them to the embeddings, for nothing.

When the model's leading blocks (embeddings, then the first layers) are all frozen, `FrozenPrefixHooks` makes
that *frozen prefix* run forward once and leave no graph behind:

* each prefix layer runs without checkpointing (its `gradient_checkpointing` flag is switched off while it is in
  the prefix and back on when it leaves it) and detaches its inputs when they require grad only because of
  transformers' hook on the input embeddings (inputs that carry gradients of something else, such as trainable
  `inputs_embeds` passed by the user, are left alone);
* on single-stack models the input embeddings' output is detached after transformers' hook has run, so not even
  the embedding sums and norms between the embeddings and the first layer are recorded;
* the first trainable layer's hidden-state input is made a leaf that requires grad when that layer is checkpointed
  reentrantly, so its weights still get their gradients (the hook transformers installs did that job before).

The trainable layers' gradients are unchanged: everything upstream of the cut is frozen. The prefix is derived
again on every application, so it follows policies whose frozen set changes during training.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..model.layout import LAYER, ModelLayout

__all__ = ["FrozenPrefix", "FrozenPrefixHooks", "frozen_prefix"]


@dataclass(frozen=True)
class FrozenPrefix:
    """The leading blocks of a model that are entirely frozen, and what comes right after them.

    Args:
        blocks: Names of the leading frozen blocks, in forward order.
        layers: The layer blocks among them.
        first_trainable_layer: The first layer after the prefix, when it has trainable parameters.
        single_stack: Whether the model has one stack of layers (decoder-only or encoder-only).

    Example:

    ```python
    >>> from hf_freeze import ModelLayout
    >>> from hf_freeze.apply import frozen_prefix
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, head=3)
    >>> prefix = frozen_prefix(layout, {"embeddings.weight", "layers.0.weight", "layers.1.weight"})
    >>> prefix.layers, prefix.first_trainable_layer
    (('layers.0', 'layers.1'), 'layers.2')
    ```
    """

    blocks: Tuple[str, ...] = ()
    layers: Tuple[str, ...] = ()
    first_trainable_layer: Optional[str] = None
    single_stack: bool = True

    @property
    def active(self) -> bool:
        """Whether there is anything to cut: at least one frozen layer at the input end."""
        return bool(self.layers)


def frozen_prefix(layout: ModelLayout, frozen: Collection[str]) -> FrozenPrefix:
    """The frozen prefix of ``layout`` when the parameters named in ``frozen`` are frozen (pure, no torch)."""
    frozen = set(frozen)
    blocks: List[str] = []
    layers: List[str] = []
    first_trainable_layer = None
    for block in layout.blocks:
        if all(name in frozen for name in block.parameters):
            blocks.append(block.name)
            if block.kind == LAYER:
                layers.append(block.name)
            continue
        next_layers = [b for b in layout.blocks[len(blocks):] if b.kind == LAYER]
        if next_layers and any(name not in frozen for name in next_layers[0].parameters):
            first_trainable_layer = next_layers[0].name
        break
    stacks = {block.stack for block in layout.layers}
    return FrozenPrefix(tuple(blocks), tuple(layers), first_trainable_layer, single_stack=len(stacks) <= 1)


class FrozenPrefixHooks:
    """Installs (and keeps up to date) the hooks that cut a model's frozen prefix out of the autograd graph.

    `FreezeApplier` calls `update` after every application, so a plain training loop gets it through
    `LayerFreezer.apply()` and the Trainer through `FreezeCallback`. Without activation checkpointing the hooks
    change nothing (a frozen prefix records no graph then anyway).

    Args:
        model: The (unwrapped) model the hooks go on.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_freeze import LayerFreezer
    >>> config = AutoConfig.for_model("gpt2", n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> model.gradient_checkpointing_enable({"use_reentrant": True})
    >>> freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2)
    >>> _ = freezer.apply()
    >>> freezer.applier.prefix_hooks.prefix.layers
    ('transformer.h.0', 'transformer.h.1')
    >>> model.train()(torch.randint(0, 100, (2, 8)), labels=torch.randint(0, 100, (2, 8))).loss.backward()
    >>> model.transformer.h[2].attn.c_attn.weight.grad is not None
    True
    ```
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix = FrozenPrefix()
        self._handles: List[Any] = []
        self._embedding_hook: Optional[Tuple[nn.Module, Any]] = None
        # The input embeddings' recent outputs, by id: the leaves transformers' hook makes require grad.
        self._embedding_outputs: Dict[int, Any] = {}
        self._layer_hooks: List[Tuple["_RunWithoutGraph", nn.Module]] = []
        # Layers whose `gradient_checkpointing` flag was switched off, by name.
        self._suspended: Dict[str, nn.Module] = {}

    def update(self, layout: ModelLayout, frozen: Collection[str]) -> FrozenPrefix:
        """Re-derive the prefix from the current frozen set and (re)install the hooks."""
        prefix = frozen_prefix(layout, frozen)
        if not all(_is_checkpointing_layer(self.model.get_submodule(name)) for name in prefix.layers):
            # Layers that transformers does not checkpoint one by one may sit inside a checkpoint taken by their
            # container; cutting the graph inside it would break that checkpoint's recomputation.
            prefix = FrozenPrefix(single_stack=prefix.single_stack)
        if prefix == self.prefix and (self._handles or not prefix.active):
            # Policies may apply on every step: keep the unchanged case cheap.
            for hook, module in self._layer_hooks:
                hook.suspend_checkpointing(module)
            self._keep_embedding_hook_last()
            return prefix
        self.remove()
        self.prefix = prefix
        self._restore_flags(keep=set(prefix.layers))
        if not prefix.active:
            return prefix
        for name in prefix.layers:
            module = self.model.get_submodule(name)
            hook = _RunWithoutGraph(self, name)
            hook.suspend_checkpointing(module)
            self._layer_hooks.append((hook, module))
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if prefix.first_trainable_layer is not None:
            module = self.model.get_submodule(prefix.first_trainable_layer)
            self._handles.append(module.register_forward_pre_hook(_make_input_require_grad, with_kwargs=True))
        embeddings = self._input_embeddings(layout, prefix)
        if embeddings is not None:
            handle = embeddings.register_forward_hook(_EmbeddingHook(self))
            self._handles.append(handle)
            self._embedding_hook = (embeddings, handle)
        return prefix

    def remove(self) -> None:
        """Take the hooks off (the suspended checkpointing flags stay until the next `update` or `restore`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._layer_hooks = []
        self._embedding_hook = None

    def restore(self) -> None:
        """Take everything off and give the prefix layers their checkpointing back."""
        self.remove()
        self.prefix = FrozenPrefix()
        self._restore_flags(keep=set())

    # -- internals ------------------------------------------------------------------------------------------------

    def _keep_embedding_hook_last(self) -> None:
        # It must run after transformers' `make_inputs_require_grads`, which `Trainer.train()` registers on the
        # same module after the policy was first applied.
        if self._embedding_hook is None:
            return
        module, handle = self._embedding_hook
        if next(reversed(module._forward_hooks), None) != handle.id:
            hook = module._forward_hooks[handle.id]
            handle.remove()
            self._handles.remove(handle)
            handle = module.register_forward_hook(hook)
            self._handles.append(handle)
            self._embedding_hook = (module, handle)

    def _restore_flags(self, keep: set) -> None:
        leaving = {name: module for name, module in self._suspended.items() if name not in keep}
        if not leaving:
            return
        suspended = {id(module) for module in self._suspended.values()}
        others = [
            module
            for module in self.model.modules()
            if _is_checkpointing_layer(module) and id(module) not in suspended
        ]
        # Give checkpointing back only while the rest of the model still uses it: the user may have switched
        # it off since (`activation_checkpointing_disable`), which clears every layer's flag.
        still_on = not others or any(getattr(module, "gradient_checkpointing", False) for module in others)
        for name, module in leaving.items():
            if still_on:
                module.gradient_checkpointing = True
            del self._suspended[name]

    def _input_embeddings(self, layout: ModelLayout, prefix: FrozenPrefix) -> Optional[nn.Module]:
        if not layout.input_embedding_parameters:
            return None
        in_prefix = {name for block in layout.blocks if block.name in prefix.blocks for name in block.parameters}
        if not set(layout.input_embedding_parameters) <= in_prefix:
            return None
        try:
            return self.model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            return None

    def __getstate__(self):
        # Weak references do not pickle; the remembered outputs only matter within one forward pass.
        return {**self.__dict__, "_embedding_outputs": {}}

    def _remember_embedding_output(self, tensor: torch.Tensor) -> None:
        if len(self._embedding_outputs) > 8:
            self._embedding_outputs = {key: ref for key, ref in self._embedding_outputs.items() if ref() is not None}
        self._embedding_outputs[id(tensor)] = weakref.ref(tensor)

    def _is_embedding_output(self, tensor: torch.Tensor) -> bool:
        ref = self._embedding_outputs.get(id(tensor))
        return ref is not None and ref() is tensor

    def _only_from_embeddings(self, tensor: torch.Tensor, limit: int = 256) -> bool:
        """Whether every leaf ``tensor`` depends on is an output of the input embeddings (a short walk up the graph)."""
        if tensor.grad_fn is None:
            return self._is_embedding_output(tensor)
        stack, visited = [tensor.grad_fn], 0
        while stack:
            node = stack.pop()
            visited += 1
            if visited > limit:  # a long graph before the first layer is not transformers' hook: keep it
                return False
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None:
                if not self._is_embedding_output(variable):
                    return False
                continue
            stack.extend(parent for parent, _ in node.next_functions if parent is not None)
        return True


class _EmbeddingHook:
    """Forward hook of the input embeddings: remembers their output; detaches it on single-stack models.

    With several stacks (encoder-decoder) the token embeddings also feed the decoder, whose first layer may be
    trainable and need an input that requires grad, so the output is left as it is there.
    """

    def __init__(self, owner: "FrozenPrefixHooks"):
        self.owner = owner

    def __call__(self, module, args, output):
        if not isinstance(output, torch.Tensor):
            return None
        self.owner._remember_embedding_output(output)
        if self.owner.prefix.single_stack and output.requires_grad:
            detached = output.detach()
            # A hook registered after this one (transformers', when it came later) makes this one require grad.
            self.owner._remember_embedding_output(detached)
            return detached
        return None


class _RunWithoutGraph:
    """Forward pre-hook of a prefix layer: no checkpointing, inputs detached (a class, so models still pickle)."""

    def __init__(self, owner: FrozenPrefixHooks, name: str):
        self.owner, self.name = owner, name

    def suspend_checkpointing(self, module: nn.Module) -> None:
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
            self.owner._suspended[self.name] = module

    def __call__(self, module, args, kwargs):
        # Checked on every call: `Trainer.train()` switches checkpointing on for every layer after the freezing
        # policy was applied, and a plain loop may do the same.
        self.suspend_checkpointing(module)
        grad_inputs = [t for value in list(args) + list(kwargs.values()) for t in _tensors_requiring_grad(value)]
        if not grad_inputs or not all(self.owner._only_from_embeddings(t) for t in grad_inputs):
            return None
        return tuple(_detached(value) for value in args), {key: _detached(value) for key, value in kwargs.items()}


def _is_checkpointing_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52 checkpoints layers from their container
        return False
    return isinstance(module, GradientCheckpointingLayer)


def _tensors_requiring_grad(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.requires_grad else []
    if isinstance(value, tuple):
        return [item for item in value if isinstance(item, torch.Tensor) and item.requires_grad]
    return []


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if _tensors_requiring_grad(value):
        return tuple(_detached(item) for item in value)
    return value


def _uses_reentrant_checkpoint(module: nn.Module) -> bool:
    function = getattr(module, "_gradient_checkpointing_func", None)
    keywords = getattr(function, "keywords", None) or {}
    # torch's own default when `use_reentrant` is not given is the reentrant implementation.
    return keywords.get("use_reentrant") is not False


def _make_input_require_grad(module, args, kwargs):
    """Reentrant checkpointing only back-propagates through inputs that require grad: give it one."""
    if not (torch.is_grad_enabled() and module.training and getattr(module, "gradient_checkpointing", False)):
        return None
    if not _uses_reentrant_checkpoint(module):
        return None
    if args and isinstance(args[0], torch.Tensor):
        hidden = args[0]
        if hidden.is_floating_point() and not hidden.requires_grad:
            return (hidden.detach().requires_grad_(True),) + tuple(args[1:]), kwargs
    return None
