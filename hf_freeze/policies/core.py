"""What every policy shares: the progress and decision types, the strategy registry, and `decide`.

A policy is pure: from a `ModelLayout`, the options, and the training progress to the set of parameter names to
freeze. No torch, no side effects; the applier does the rest. Options arrive as any object with ``freeze_*``
attributes (a `FreezeArguments`, or a `SimpleNamespace` in a test): policies never import the configuration.
Options are checked once, by `check_options`, when the configuration is built; `decide` trusts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from ..errors import FreezeConfigError, few, invalid_choice
from ..model.layout import EMBEDDINGS, HEAD, NORM, OTHER, ModelLayout
from ..registry import Registry
from .common import check_cache_options
from .parts import (
    _check_part_options,
    _component_settings,
    _part_settings,
    _pinned_components,
    _pinned_parts,
    policy_view,
)
from .name_patterns import pattern_rows
from .row_selection import ROW_OPTIONS, check_row_options, row_selection

__all__ = [
    "COMMON_OPTIONS",
    "STRATEGIES",
    "FreezeDecision",
    "Strategy",
    "TrainingProgress",
    "check_options",
    "decide",
    "explicitly_trained",
    "register_strategy",
]

# Options every strategy accepts; the rest belong to the strategies that name them.
COMMON_OPTIONS = (
    "freeze_strategy", "freeze_embeddings", "freeze_norm", "freeze_head", "freeze_layer_paths", "freeze_respect_existing",
    "freeze_health_check", "freeze_frozen_modules_eval", "freeze_chunked_loss", "freeze_frozen_dtype", "freeze_layer_stack", "freeze_vision_tower",
    "freeze_multi_modal_projector", "freeze_language_model", "freeze_vit", "freeze_aligner", "freeze_llm",
    "freeze_router", "freeze_shared_experts", "freeze_component_paths", "freeze_unused_modalities",
    "freeze_cache_prefix", "freeze_cache_memory_mb", "freeze_cache_dir", "freeze_cache_dtype", "freeze_cache_keep",
    *ROW_OPTIONS,
    "freeze_learning_rates", "freeze_layer_lr_decay", "freeze_lora",
)
HEALTH_CHECK_MODES = ("warn", "raise", "off")
# The options that settle the blocks outside the layers, and the block kinds each one covers.
NON_LAYER_OPTIONS = {"freeze_embeddings": (EMBEDDINGS,), "freeze_norm": (NORM, OTHER), "freeze_head": (HEAD,)}

Selection = Tuple[List[str], List[str]]


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands, for policies that change over time (static ones ignore it).

    Example:

    ```python
    >>> from hf_freeze import TrainingProgress
    >>> TrainingProgress(step=50, max_steps=100).fraction
    0.5
    ```
    """

    step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    num_epochs: float = 0.0
    seed: int = 0
    # Per-layer scores measured for the current selection (adaptive policies), in layer order.
    layer_scores: Optional[Tuple[float, ...]] = None

    @property
    def fraction(self) -> float:
        return self.step / self.max_steps if self.max_steps else 0.0


@dataclass(frozen=True)
class FreezeDecision:
    """The outcome of a policy: which parameters are frozen, and what the user should be told about it.

    Example:

    ```python
    >>> from hf_freeze import FreezeDecision
    >>> decision = FreezeDecision(frozenset({"h.0.w"}))
    >>> decision.is_frozen("h.0.w"), decision.is_frozen("h.1.w")
    (True, False)
    ```
    """

    frozen: FrozenSet[str]
    notes: Tuple[str, ...] = ()
    # What the user must not miss: an option that had to do more than it says (a tied head frozen with the
    # embeddings), shown at WARNING.
    warnings: Tuple[str, ...] = ()
    # Trainable parameters whose optimizer update is multiplied by a factor (a per-layer learning-rate factor).
    update_factors: Dict[str, float] = field(default_factory=dict, compare=False)
    # Frozen parameters of which some rows train (`freeze_trainable_tokens`, `freeze_trainable_experts`, axolotl's
    # row ranges): parameter name -> sorted row indices along the first dimension.
    trainable_rows: Dict[str, Tuple[int, ...]] = field(default_factory=dict, compare=False)

    def is_frozen(self, parameter_name: str) -> bool:
        return parameter_name in self.frozen

    def frozen_layers(self, layout: ModelLayout) -> List[int]:
        return layout.frozen_layer_indices(self.frozen)


@dataclass(frozen=True)
class Strategy:
    """A registered policy: what `freeze_strategy: <name>` runs.

    Args:
        name: The `freeze_strategy` value.
        select: ``(layout, options, progress) -> (frozen parameter names, notes)`` for the layer part of the
            policy; the non-layer blocks are then settled by `defaults` and the user's overrides.
        options: `freeze_*` fields this strategy reads besides the common ones.
        defaults: Whether embeddings / norms / head are frozen when the user leaves them unset.
        check: Configuration-time validation that needs no model; raises `FreezeConfigError`.
        dynamic: True when the decision depends on the training progress.
        description: One line for docs and `--help`.
        update_factors: ``(layout, options, progress) -> {parameter name: factor}`` for strategies that scale the
            optimizer update of some trainable parameters (a learning-rate factor); factors of 1 can be left out.
        fixed_overrides: Non-layer options (`freeze_head`, ...) the strategy decides itself and refuses.
        needs_scores: True when the decision reads measured per-layer scores (`TrainingProgress.layer_scores`),
            which `LayerFreezer` measures with a `hf_freeze.scores.LayerProbe`.
        trains: ``(layout, options) -> parameter names`` the options name as trainable (LLaMA-Factory's
            `freeze_trainable_layers`, axolotl's patterns): the only parameters frozen by the user before hf_freeze
            saw the model that the policy may unfreeze (`freeze_respect_existing`).
        whole_model: True when the strategy decides every parameter of a multi-part model itself (by name);
            otherwise it sees the part whose layers it counts (`policy_view`) and the part options settle the rest.

    Example:

    ```python
    >>> from hf_freeze import ModelLayout, Strategy
    >>> def odd_layers(layout, options, progress):
    ...     return [n for b in layout.layers if b.layer_index % 2 for n in b.parameters], []
    >>> strategy = Strategy("odd_layers", odd_layers, description="Freeze odd layers.")
    >>> # register_strategy(strategy) makes it available as `freeze_strategy: odd_layers`
    >>> strategy.select(ModelLayout.from_layer_sizes([1, 1, 1, 1]), None, None)[0]
    ['layers.1.weight', 'layers.3.weight']
    ```
    """

    name: str
    select: Callable[[ModelLayout, Any, TrainingProgress], Tuple[Iterable[str], Iterable[str]]]
    options: Tuple[str, ...] = ()
    defaults: Dict[str, bool] = field(default_factory=dict)
    check: Optional[Callable[[Any], None]] = None
    dynamic: bool = False
    description: str = ""
    fixed_overrides: Tuple[str, ...] = ()
    update_factors: Optional[Callable[[ModelLayout, Any, TrainingProgress], Dict[str, float]]] = None
    needs_scores: bool = False
    trains: Optional[Callable[[ModelLayout, Any], Iterable[str]]] = None
    whole_model: bool = False


STRATEGIES: Registry[Strategy] = Registry("strategy", field="freeze_strategy")


def register_strategy(strategy: Strategy) -> Strategy:
    """Make ``strategy`` available as ``freeze_strategy: <strategy.name>`` (in YAML, on the command line, in code).

    Example:

    ```python
    >>> from hf_freeze import STRATEGIES, Strategy, register_strategy
    >>> def first_layer(layout, options, progress):
    ...     return list(layout.layers[0].parameters), []
    >>> _ = register_strategy(Strategy("first_layer_example", first_layer, description="Freeze layer 0."))
    >>> "first_layer_example" in STRATEGIES
    True
    ```
    """
    return STRATEGIES.add(strategy.name, strategy)


def check_options(options: Any, field_names: Iterable[str]) -> Strategy:
    """Configuration-time checks shared by every strategy, then the strategy's own; returns the strategy.

    Args:
        options: An object with the ``freeze_*`` attributes.
        field_names: Every ``freeze_*`` field there is (an option set that its strategy does not read is refused).
    """
    strategy = STRATEGIES.get(options.freeze_strategy)
    allowed = set(COMMON_OPTIONS) | set(strategy.options)
    unused = [name for name in field_names if name not in allowed and getattr(options, name) is not None]
    if unused:
        readers = {name: [s for s in STRATEGIES.names() if name in STRATEGIES.get(s).options] for name in unused}
        detail = "; ".join(f"`{name}` is read by {readers[name] or 'no strategy'}" for name in unused)
        unset = (
            " `freeze_strategy` is 'none', the default: if your file sets a strategy, its key is misspelled."
            if options.freeze_strategy == "none" else ""
        )
        raise FreezeConfigError(
            f"`freeze_strategy` {options.freeze_strategy!r} does not use {', '.join(f'`{n}`' for n in unused)} "
            f"(set to {', '.join(repr(getattr(options, n)) for n in unused)}): {detail}. Remove them or change the "
            f"strategy.{unset}",
            fields=["freeze_strategy", *unused],
        )
    for name in strategy.fixed_overrides:
        if getattr(options, name) is not None:
            raise FreezeConfigError(
                f"`{name}` cannot be set with `freeze_strategy` {strategy.name!r} (got {getattr(options, name)!r}): "
                f"{strategy.name!r} decides it itself. Remove `{name}`.",
                fields=[name],
            )
    if getattr(options, "freeze_health_check", None) not in (None, *HEALTH_CHECK_MODES):
        raise invalid_choice("freeze_health_check", options.freeze_health_check, HEALTH_CHECK_MODES)
    _check_part_options(options, strategy)
    check_cache_options(options, strategy.dynamic)
    check_row_options(options)
    if strategy.check is not None:
        strategy.check(options)
    return strategy


def decide(
    layout: ModelLayout, options: Any, progress: Optional[TrainingProgress] = None, kept_frozen: Iterable[str] = ()
) -> FreezeDecision:
    """Run the configured policy on a layout: the one entry point from options to a `FreezeDecision`.

    ``kept_frozen`` are parameters frozen before hf_freeze saw the model: they stay frozen unless the options name
    them as trainable (`explicitly_trained`).

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, ModelLayout, decide
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, head=3)
    >>> sorted(decide(layout, FreezeArguments(freeze_strategy="bottom", freeze_layers=0.5)).frozen)
    ['embeddings.weight', 'layers.0.weight', 'layers.1.weight']
    ```
    """
    strategy = STRATEGIES.get(options.freeze_strategy)
    progress = progress or TrainingProgress()
    view = policy_view(layout, options, strategy)
    selected, notes = strategy.select(view, options, progress)
    frozen = set(selected)
    pinned_frozen, pinned_trainable = _non_layer_settings(view, options, strategy)
    frozen = (frozen | pinned_frozen) - pinned_trainable
    frozen, part_notes = _part_settings(layout, view, options, strategy, frozen)
    notes = list(notes) + part_notes
    frozen = _component_settings(layout, options, frozen)
    frozen, warnings = _honour_ties(layout, frozen, options)
    notes = list(notes) + _tied_embedding_notes(layout, frozen, options)
    kept, note = _keep_user_frozen(layout, options, strategy, frozen, kept_frozen)
    frozen |= kept
    notes += [note] if note else []
    rows = trainable_rows(layout, options)
    frozen |= set(rows)
    factors = {}
    if strategy.update_factors is not None:
        factors = {
            name: factor
            for name, factor in strategy.update_factors(view, options, progress).items()
            if factor != 1.0 and name not in frozen
        }
    return FreezeDecision(frozenset(frozen), tuple(notes), tuple(warnings), factors, rows)


def trainable_rows(layout: ModelLayout, options: Any) -> Dict[str, Tuple[int, ...]]:
    """The rows that train of parameters otherwise frozen (the same at every step of training)."""
    return row_selection(layout, options, pattern_rows(layout, options))


def explicitly_trained(layout: ModelLayout, options: Any) -> set:
    """The parameters the options name as trainable: blocks set to ``false`` (`freeze_embeddings: false`, ...), and
    what the strategy's own options name (`Strategy.trains`)."""
    strategy = STRATEGIES.get(options.freeze_strategy)
    view = policy_view(layout, options, strategy)
    named = set(_non_layer_settings(view, options, strategy)[1])
    named |= _pinned_parts(layout, view, options, strategy)[1]
    named |= _pinned_components(layout, options)[1]
    if strategy.trains is not None:
        named |= set(strategy.trains(view, options))
    return named


def _keep_user_frozen(layout, options, strategy, frozen: set, kept_frozen: Iterable[str]) -> Tuple[set, Optional[str]]:
    kept_frozen = set(kept_frozen)
    if not kept_frozen:
        return set(), None
    released = kept_frozen & explicitly_trained(layout, options)
    kept = kept_frozen - released
    parts = []
    if kept - frozen:
        parts.append(
            f"{len(kept - frozen)} parameter(s) frozen before hf_freeze saw the model stay frozen although "
            f"{strategy.name!r} would train them ({few(sorted(kept - frozen))}); `freeze_respect_existing: false` lets the "
            "policy decide them."
        )
    if released:
        parts.append(
            f"{len(released)} parameter(s) frozen before hf_freeze saw the model train, because the options name them "
            f"as trainable ({few(sorted(released))})."
        )
    return kept, " ".join(parts) or None


def _honour_ties(layout: ModelLayout, frozen: set, options: Any) -> Tuple[set, List[str]]:
    """An explicit `freeze_head: true` on a head tied to the input embeddings (or `freeze_embeddings: true` with a
    tied head) freezes the one shared parameter, so both: done, and said at WARNING, never silently ignored."""
    shared = set(layout.input_embedding_parameters) & set(layout.output_embedding_parameters)
    if not shared:
        return frozen, []
    if options.freeze_head is True and not shared <= frozen:
        frozen = frozen | shared
    if options.freeze_head is True or options.freeze_embeddings is True:
        aliases = sorted(alias for alias, name in layout.tied_parameters.items() if name in shared)
        set_by = "`freeze_head: true`" if options.freeze_head is True else "`freeze_embeddings: true`"
        return frozen, [
            f"{set_by} freezes {', '.join(sorted(shared))}, which the model ties to "
            f"{', '.join(aliases) or 'its output embeddings'}: the input embeddings and the LM head are frozen together."
        ]
    return frozen, []


def registration_decision(layout: ModelLayout, options: Any, kept_frozen: Iterable[str] = ()) -> FreezeDecision:
    """What a dynamic strategy applies before the optimizer and DDP exist: every parameter it may ever train is
    trainable, so the Trainer's optimizer (built from trainable parameters only) and DDP register them all.

    Only the non-layer blocks that the options (or the strategy's defaults) pin as frozen stay frozen. The step's
    own frozen set is applied once the optimizer exists; a registered but frozen parameter has ``grad=None``, which
    every torch optimizer skips, and gets no optimizer state.
    """
    strategy = STRATEGIES.get(options.freeze_strategy)
    view = policy_view(layout, options, strategy)
    pinned_frozen, _ = _non_layer_settings(view, options, strategy)
    pinned_frozen |= _pinned_parts(layout, view, options, strategy)[0] | _pinned_components(layout, options)[0]
    kept, _ = _keep_user_frozen(layout, options, strategy, set(pinned_frozen), kept_frozen)
    rows = trainable_rows(layout, options)
    return FreezeDecision(frozenset(pinned_frozen | kept | set(rows)), trainable_rows=rows)


def _non_layer_settings(layout: ModelLayout, options: Any, strategy: Strategy) -> Tuple[set, set]:
    """The non-layer parameters pinned frozen (by the user or the strategy's defaults) and pinned trainable (by the
    user only: a strategy's own choice for a block it leaves unset is whatever its `select` decided)."""
    frozen, trainable = set(), set()
    for option, kinds in NON_LAYER_OPTIONS.items():
        if option in strategy.fixed_overrides:
            continue
        value = getattr(options, option)
        names = set(layout.parameters_of(layout.blocks_of_kind(*kinds)))
        if value is None and strategy.defaults.get(option, False):
            frozen |= names
        elif value is True:
            frozen |= names
        elif value is False:
            trainable |= names
    return frozen, trainable


def _tied_embedding_notes(layout: ModelLayout, frozen: set, options: Any) -> List[str]:
    shared = set(layout.input_embedding_parameters) & set(layout.output_embedding_parameters)
    if not shared:
        return []
    embeddings, head = options.freeze_embeddings, options.freeze_head
    if embeddings is not None and head is not None and embeddings != head:
        raise FreezeConfigError(
            f"`freeze_embeddings` ({embeddings!r}) and `freeze_head` ({head!r}) contradict each other: this "
            f"model's output embeddings are its input embeddings ({', '.join(sorted(shared))}). Set both to the same "
            "value, or leave one unset.",
            fields=["freeze_embeddings", "freeze_head"],
        )
    state = "frozen" if shared <= frozen else "trainable"
    aliases = sorted(alias for alias, name in layout.tied_parameters.items() if name in shared)
    return [f"{', '.join(sorted(shared))} is shared with {', '.join(aliases) or 'the output embeddings'} (tied weights): {state}."]
