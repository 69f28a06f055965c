"""What every policy shares: the decision type, the progress type, the strategy registry.

A policy is pure: from a `ModelLayout`, the options, and the training progress to the set of parameter names to
freeze. No torch, no side effects; the applier does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from ..errors import FreezeConfigError, invalid
from ..layout import EMBEDDINGS, HEAD, LAYER, NORM, OTHER, ModelLayout
from ..registry import Registry

# Options every strategy accepts; the rest belong to the strategies that name them.
COMMON_OPTIONS = ("freeze_strategy", "freeze_embeddings", "freeze_norm", "freeze_head", "freeze_layer_paths")
NON_LAYER_OPTIONS = {"freeze_embeddings": (EMBEDDINGS,), "freeze_norm": (NORM, OTHER), "freeze_head": (HEAD,)}


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
    scores: Dict[str, float] = field(default_factory=dict, compare=False)
    # Trainable parameters whose optimizer update is multiplied by a factor (a per-layer learning-rate factor).
    update_factors: Dict[str, float] = field(default_factory=dict, compare=False)

    def is_frozen(self, parameter_name: str) -> bool:
        return parameter_name in self.frozen

    def frozen_layers(self, layout: ModelLayout) -> List[int]:
        return [
            block.layer_index
            for block in layout.layers
            if block.parameters and all(name in self.frozen for name in block.parameters)
        ]


@dataclass(frozen=True)
class Strategy:
    """A registered policy.

    Args:
        name: The `freeze_strategy` value.
        select: ``(layout, args, progress) -> (frozen parameter names, notes)`` for the layer part of the policy;
            the non-layer blocks are then settled by `defaults` and the user's overrides.
        options: `freeze_*` fields this strategy reads besides the common ones.
        defaults: Whether embeddings / norms / head are frozen when the user leaves them unset.
        check: Configuration-time validation that needs no model.
        dynamic: True when the decision depends on the training progress.
        description: One line for docs and `--help`.
        update_factors: ``(layout, args, progress) -> {parameter name: factor}`` for strategies that scale the
            optimizer update of some trainable parameters (a learning-rate factor); factors of 1 can be left out.
        fixed_overrides: Non-layer options (`freeze_head`, ...) the strategy decides itself and refuses.
        needs_scores: True when the decision reads measured per-layer scores (`TrainingProgress.layer_scores`),
            which `LayerFreezer` measures with a `hf_freeze.probe.LayerProbe`.

    Example:

    ```python
    >>> from hf_freeze import ModelLayout, Strategy
    >>> def odd_layers(layout, args, progress):
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


STRATEGIES: Registry[Strategy] = Registry("strategy", field="freeze_strategy")


def register_strategy(strategy: Strategy) -> Strategy:
    return STRATEGIES.add(strategy.name, strategy)


def validate_arguments(args: Any) -> Strategy:
    """Configuration-time checks shared by every strategy, then the strategy's own."""
    strategy = STRATEGIES.get(args.freeze_strategy)
    from ..config import freeze_fields

    allowed = set(COMMON_OPTIONS) | set(strategy.options)
    unused = [name for name in freeze_fields() if name not in allowed and getattr(args, name) is not None]
    if unused:
        users = {name: [s for s in STRATEGIES.names() if name in STRATEGIES.get(s).options] for name in unused}
        detail = "; ".join(f"`{name}` is read by {users[name] or 'no strategy'}" for name in unused)
        raise FreezeConfigError(
            f"`freeze_strategy` {args.freeze_strategy!r} does not use {', '.join(f'`{n}`' for n in unused)} "
            f"(set to {', '.join(repr(getattr(args, n)) for n in unused)}): {detail}. Remove them or change the strategy."
        )
    for name in strategy.fixed_overrides:
        if getattr(args, name) is not None:
            raise FreezeConfigError(
                f"`{name}` cannot be set with `freeze_strategy` {strategy.name!r} (got {getattr(args, name)!r}): "
                f"{strategy.name!r} decides it itself. Remove `{name}`."
            )
    if strategy.check is not None:
        strategy.check(args)
    return strategy


def decide(layout: ModelLayout, args: Any, progress: Optional[TrainingProgress] = None) -> FreezeDecision:
    """Run the configured policy on a layout: the one entry point from options to a `FreezeDecision`.

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, ModelLayout, decide
    >>> layout = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, head=3)
    >>> sorted(decide(layout, FreezeArguments(freeze_strategy="bottom", freeze_layers=0.5)).frozen)
    ['embeddings.weight', 'layers.0.weight', 'layers.1.weight']
    ```
    """
    strategy = validate_arguments(args)
    progress = progress or TrainingProgress()
    selected, notes = strategy.select(layout, args, progress)
    frozen = set(selected)
    notes = list(notes)
    for option, kinds in NON_LAYER_OPTIONS.items():
        if option in strategy.fixed_overrides:
            continue
        value = getattr(args, option)
        if value is None:
            value = strategy.defaults.get(option, False)
        blocks = layout.blocks_of_kind(*kinds)
        names = set(layout.parameters_of(blocks))
        if value:
            frozen |= names
        elif getattr(args, option) is not None:
            frozen -= names
    notes += _tied_embedding_notes(layout, frozen, args)
    factors = {}
    if strategy.update_factors is not None:
        factors = {
            name: factor
            for name, factor in strategy.update_factors(layout, args, progress).items()
            if factor != 1.0 and name not in frozen
        }
    return FreezeDecision(frozenset(frozen), tuple(notes), update_factors=factors)


def _tied_embedding_notes(layout: ModelLayout, frozen: set, args: Any) -> List[str]:
    shared = set(layout.input_embedding_parameters) & set(layout.output_embedding_parameters)
    if not shared:
        return []
    if args.freeze_embeddings is not None and args.freeze_head is not None and args.freeze_embeddings != args.freeze_head:
        raise FreezeConfigError(
            f"`freeze_embeddings` ({args.freeze_embeddings!r}) and `freeze_head` ({args.freeze_head!r}) contradict "
            f"each other: this model's output embeddings are its input embeddings ({', '.join(sorted(shared))}). "
            "Set both to the same value, or leave one unset."
        )
    state = "frozen" if shared <= frozen else "trainable"
    aliases = sorted(alias for alias, name in layout.tied_parameters.items() if name in shared)
    return [f"{', '.join(sorted(shared))} is shared with {', '.join(aliases) or 'the output embeddings'} (tied weights): {state}."]


def resolve_count(value: Any, num_layers: int, field_name: str = "freeze_layers") -> int:
    """Turn a count or a fraction of layers into a count, refusing values the model cannot honour."""
    if value is None:
        raise invalid(field_name, value, f"set: a count of layers (1..{num_layers}) or a fraction in (0, 1)")
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value < 1:
            raise invalid(field_name, value, f"a whole count of layers (0..{num_layers}) or a fraction in (0, 1)")
        count = int(value * num_layers + 0.5)
        if count == 0:
            raise invalid(
                field_name, value, f"a fraction that selects at least one of the {num_layers} layers (>= {0.5 / num_layers:.3g})"
            )
        return count
    count = int(value)
    if not 0 <= count <= num_layers:
        raise invalid(field_name, value, f"between 0 and the model's {num_layers} layers")
    return count


def layer_parameters(layout: ModelLayout, indices: Iterable[int]) -> List[str]:
    wanted = set(indices)
    return [name for block in layout.layers if block.layer_index in wanted for name in block.parameters]


def require_layers(layout: ModelLayout, strategy: str) -> int:
    if layout.num_layers == 0:
        raise FreezeConfigError(f"`freeze_strategy` {strategy!r} needs layers, and this model has none discovered.")
    return layout.num_layers


__all__ = [
    "COMMON_OPTIONS",
    "FreezeDecision",
    "LAYER",
    "STRATEGIES",
    "Strategy",
    "TrainingProgress",
    "decide",
    "layer_parameters",
    "register_strategy",
    "require_layers",
    "resolve_count",
    "validate_arguments",
]
