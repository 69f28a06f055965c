"""Cache the frozen prefix's output across epochs (`freeze_cache_prefix`).

With a static policy whose bottom blocks (the embeddings and the first layers) are frozen, those blocks compute
the same hidden states for the same example in every epoch. `FrozenPrefixCache` computes them once per example
and feeds the stored states to the first trainable layer from then on, without any change to the model's code:

* a forward pre-hook on the model keys every example of the batch by its content (`row_keys`); the examples not
  yet stored are run through the model once more, without gradients, only up to the first trainable layer, whose
  input is stored (the run stops there);
* then the batch's real forward pass runs with the prefix short-circuited: the token and position embeddings
  return zeros, the frozen layers hand their input through, and a pre-hook on the first trainable layer replaces
  its hidden-state input with the stored states. Everything else the model computes before its layers (the
  attention mask, rotary position embeddings) it still computes itself, so the first trainable layer gets what it
  always got.

Only training-mode forward passes use the cache: evaluation (``model.eval()``) runs the model untouched. The
stored states are right only when the prefix is deterministic; the first filling checks that by computing the same
examples twice (dropout between the embeddings and the first trainable layer fails it).
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import FreezeConfigError, few
from ..model.layout import EMBEDDINGS, ModelLayout
from ..apply.frozen_prefix import FrozenPrefix
from .store import PrefixStore, row_keys

__all__ = ["FrozenPrefixCache"]

# Inputs that do not reach the frozen prefix: never part of an example's key, never passed to the filling run.
_NOT_PREFIX_INPUTS = ("labels", "start_positions", "end_positions", "num_items_in_batch", "return_dict", "use_cache")
# Inputs the cache cannot key (the states would not be a function of the token ids): the batch runs uncached.
_UNCACHEABLE_INPUTS = ("inputs_embeds", "past_key_values", "encoder_hidden_states")


class _ReachedBoundary(Exception):
    """Stops a filling run at the first trainable layer: nothing after it is needed."""


class FrozenPrefixCache:
    """Feeds a model's first trainable layer from stored hidden states instead of running the frozen prefix.

    Built by `LayerFreezer` when `freeze_cache_prefix` is set (after the policy is applied); `close` deletes the
    stored states (unless `freeze_cache_keep`), `remove` also takes the hooks off.

    Args:
        model: The (unwrapped) model.
        layout: Its layout.
        prefix: The frozen prefix (`frozen_prefix`); it must end at a trainable layer.
        store: Where the states go.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForSequenceClassification
    >>> from hf_freeze import LayerFreezer
    >>> config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
    ...                               intermediate_size=64, vocab_size=100, hidden_dropout_prob=0.0,
    ...                               attention_probs_dropout_prob=0.0)
    >>> model = AutoModelForSequenceClassification.from_config(config)
    >>> freezer = LayerFreezer(model, freeze_strategy="bottom", freeze_layers=2, freeze_cache_prefix=True,
    ...                        freeze_frozen_modules_eval=True)
    >>> _ = freezer.apply()
    >>> batch = torch.randint(0, 100, (4, 8))
    >>> first = model.train()(batch).logits  # fills the cache (4 examples)
    >>> stats = freezer.prefix_cache.stats()
    >>> stats["examples"], stats["misses"]
    (4, 4)
    >>> again = model(batch).logits  # from the stored states
    >>> freezer.prefix_cache.stats()["hits"], torch.allclose(first, again, atol=1e-6)
    (4, True)
    >>> freezer.close()
    ```
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, prefix: FrozenPrefix, store: PrefixStore):
        if prefix.first_trainable_layer is None or not prefix.active:
            raise ValueError("FrozenPrefixCache needs a frozen prefix that ends at a trainable layer")
        self.model, self.layout, self.prefix, self.store = model, layout, prefix, store
        self._signature = inspect.signature(model.forward)
        self._handles: List[Any] = []
        self._replaced: List[nn.Module] = []
        self._templates: Dict[str, Tuple[str, int]] = {}
        self._replay: Optional[torch.Tensor] = None
        self._capturing = False
        self._captured: Optional[torch.Tensor] = None
        self._hidden_like: Optional[torch.Tensor] = None
        self._checked = False
        self.hits = self.misses = self.uncached_batches = 0
        self.fill_seconds = 0.0
        self._install()

    # -- public ---------------------------------------------------------------------------------------------------

    def stats(self) -> Dict[str, float]:
        """Examples stored, bytes in memory and on disk, hits and misses (examples), seconds spent filling."""
        return {
            "examples": len(self.store), "memory_bytes": self.store.bytes_in_memory, "disk_bytes": self.store.bytes_on_disk,
            "hits": self.hits, "misses": self.misses, "uncached_batches": self.uncached_batches,
            "fill_seconds": self.fill_seconds,
        }

    def close(self) -> None:
        """Delete the stored states (or keep them, with `freeze_cache_keep`); the hooks stay and fill again."""
        self.store.close()

    def remove(self) -> None:
        """Take every hook off and give the short-circuited modules their own forward back."""
        for handle in self._handles:
            handle.remove()
        for module in self._replaced:
            if "forward" in module.__dict__:
                del module.forward
        self._handles, self._replaced = [], []

    # -- installation ---------------------------------------------------------------------------------------------

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_model, always_call=True))
        for block in self.layout.blocks:
            if block.name not in self.prefix.blocks or block.kind != EMBEDDINGS:
                continue
            module = _submodule(self.model, block.name)
            for embedding in (m for m in (module.modules() if module is not None else ()) if isinstance(m, nn.Embedding)):
                embedding.forward = _ZerosWhileReplaying(self, embedding)
                self._replaced.append(embedding)
        for name in self.prefix.layers:
            layer = self.model.get_submodule(name)
            layer.forward = _PassThroughWhileReplaying(self, name, layer)
            self._replaced.append(layer)
        boundary = self.model.get_submodule(self.prefix.first_trainable_layer)
        # Before every other pre-hook, so that `FrozenPrefixHooks` sees the stored states as this layer's input.
        self._handles.append(boundary.register_forward_pre_hook(self._at_boundary, with_kwargs=True, prepend=True))

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _before_model(self, module, args, kwargs):
        self._replay = None
        if self._capturing or not module.training:
            return None
        inputs = self._bind(args, kwargs)
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or any(
            inputs.get(name) is not None for name in _UNCACHEABLE_INPUTS
        ):
            self.uncached_batches += 1
            return None
        batch_size, length = input_ids.shape
        keyed = {
            name: value for name, value in inputs.items()
            if isinstance(value, torch.Tensor) and name not in _NOT_PREFIX_INPUTS and value.dim() >= 1 and value.shape[0] == batch_size
        }
        keys, kept = row_keys(keyed, batch_size, length)
        missing = [index for index, key in enumerate(keys) if key not in self.store]
        self.misses += len(missing)
        self.hits += batch_size - len(missing)
        if missing:
            self._fill(inputs, batch_size, missing, keys, kept)
        self._replay = self._assemble(keys, kept, batch_size, length)
        return None

    def _after_model(self, module, args, output):
        self._replay = None
        return None

    def _at_boundary(self, module, args, kwargs):
        if self._capturing:
            self._captured = _hidden_input(args, kwargs).detach()
            raise _ReachedBoundary()
        if self._replay is None:
            return None
        hidden = _hidden_input(args, kwargs)
        if hidden.shape != self._replay.shape:
            raise RuntimeError(
                f"freeze_cache_prefix: {self.prefix.first_trainable_layer} received hidden states of shape "
                f"{tuple(hidden.shape)} while the stored ones have {tuple(self._replay.shape)}; this model does "
                "not lay its hidden states out as (batch, tokens, hidden); turn `freeze_cache_prefix` off."
            )
        replay = self._replay.to(device=hidden.device, dtype=hidden.dtype)
        if args:
            return (replay,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replay}

    # -- filling and reading --------------------------------------------------------------------------------------

    def _bind(self, args, kwargs) -> Dict[str, Any]:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        flat: Dict[str, Any] = {}
        for name, value in bound.items():
            if self._signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                flat.update(value)
            else:
                flat[name] = value
        return flat

    def _run_prefix(self, inputs: Dict[str, Any], rows: List[int], batch_size: int) -> torch.Tensor:
        """The first trainable layer's input for ``rows`` of the batch, from a run that stops there."""
        index = torch.tensor(rows, device=inputs["input_ids"].device)
        sub = {
            name: value.index_select(0, index) if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size else value
            for name, value in inputs.items() if name not in _NOT_PREFIX_INPUTS
        }
        self._capturing, self._captured = True, None
        try:
            with torch.no_grad():
                self.model(**sub)
        except _ReachedBoundary:
            pass
        finally:
            self._capturing = False
        if self._captured is None:
            raise RuntimeError(
                f"freeze_cache_prefix: the model's forward pass never reached {self.prefix.first_trainable_layer}, "
                "the first trainable layer; turn `freeze_cache_prefix` off for this model."
            )
        captured, self._captured = self._captured, None
        return captured

    def _fill(self, inputs, batch_size, missing, keys, kept) -> None:
        started = time.perf_counter()
        states = self._run_prefix(inputs, missing, batch_size)
        if not self._checked:
            self._checked = True
            # A tolerance for kernels that add in a varying order (on GPUs); dropout differs by far more.
            if not torch.allclose(states, self._run_prefix(inputs, missing, batch_size), rtol=1e-4, atol=1e-5):
                raise FreezeConfigError(
                    "`freeze_cache_prefix` needs a deterministic frozen prefix, and the same examples gave different "
                    "hidden states at the first trainable layer "
                    f"({self.prefix.first_trainable_layer}) in two runs" + self._random_modules() + ": stored states "
                    "would not be what training sees. Set that dropout to 0 (e.g. GPT-2's `embd_pdrop`), or turn "
                    "`freeze_cache_prefix` off.",
                    fields=["freeze_cache_prefix"],
                )
        self._hidden_like = states[:0]
        for row, index in enumerate(missing):
            self.store.put(keys[index], states[row, : kept[index]])
        self.fill_seconds += time.perf_counter() - started

    def _random_modules(self) -> str:
        trainable = [name for name in (block.name for block in self.layout.blocks) if name not in self.prefix.blocks]
        suspects = [
            name for name, module in self.model.named_modules()
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0
            and not any(name == owner or name.startswith(owner + ".") for owner in trainable)
        ]
        return f" (dropout in training mode outside the trainable layers: {few(suspects)})" if suspects else ""

    def _assemble(self, keys: List[bytes], kept: List[int], batch_size: int, length: int) -> torch.Tensor:
        like = self._hidden_like
        first = self.store.get(keys[0])
        hidden_size = first.shape[-1]
        dtype = like.dtype if like is not None else first.dtype
        # Padding positions get zeros: the attention mask keeps them out of every real token's computation.
        batch = torch.zeros(batch_size, length, hidden_size, dtype=dtype)
        for index, key in enumerate(keys):
            batch[index, : kept[index]] = self.store.get(key)
        return batch if like is None else batch.to(like.device)


class _ZerosWhileReplaying:
    """An input embedding's forward: zeros while the stored states replace what it would feed (a class, so that the
    model still pickles)."""

    def __init__(self, cache: FrozenPrefixCache, module: nn.Embedding):
        self.cache, self.module = cache, module

    def __call__(self, input, *args, **kwargs):
        if self.cache._replay is not None:
            weight = self.module.weight
            return torch.zeros(tuple(input.shape) + (weight.shape[1],), dtype=weight.dtype, device=weight.device)
        return type(self.module).forward(self.module, input, *args, **kwargs)


class _PassThroughWhileReplaying:
    """A frozen layer's forward: hands its hidden-state input through while replaying, in the form the layer
    returns (a tensor, or a tuple whose first item is the hidden states)."""

    def __init__(self, cache: FrozenPrefixCache, name: str, module: nn.Module):
        self.cache, self.name, self.module = cache, name, module

    def __call__(self, *args, **kwargs):
        template = self.cache._templates.get(self.name)
        if self.cache._replay is not None and template is not None:
            hidden = _hidden_input(args, kwargs)
            return hidden if template[0] == "tensor" else (hidden,) + (None,) * (template[1] - 1)
        output = type(self.module).forward(self.module, *args, **kwargs)
        self.cache._templates[self.name] = ("tensor", 1) if isinstance(output, torch.Tensor) else ("tuple", len(output))
        return output


def _hidden_input(args, kwargs) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError("freeze_cache_prefix: the first trainable layer got no hidden-state tensor as its first input")
    return hidden


def _submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
