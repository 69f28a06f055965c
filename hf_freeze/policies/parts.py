"""Multi-part models in the pure policies: which part's layers a strategy counts (`policy_view`), and how the part
options (`freeze_vision_tower`, ..., with ms-swift's aliases) and the mixture-of-experts options (`freeze_router`,
`freeze_shared_experts`) settle what lies outside the strategy's view."""

from __future__ import annotations

import re
from typing import Any, Collection, Dict, List, Optional, Tuple

from ..errors import FreezeConfigError, few, invalid
from ..model.layout import EMBEDDINGS, LANGUAGE, PROJECTOR, ROUTER, SHARED_EXPERTS, VISION, ModelLayout

__all__ = [
    "LAYER_STACKS", "MOE_OPTIONS", "PART_OPTIONS", "check_part_options", "check_unused_parts", "component_settings",
    "counted_layout", "part_option", "part_settings", "pinned_components", "pinned_parts", "policy_view", "unused_parts",
]


# The options that settle a whole part of a multi-part model (LLaMA-Factory's names), with their ms-swift alias,
# the part they cover and what to call it in an error.
PART_OPTIONS = {
    "freeze_vision_tower": ("freeze_vit", VISION, "vision tower"),
    "freeze_multi_modal_projector": ("freeze_aligner", PROJECTOR, "multi-modal projector"),
    "freeze_language_model": ("freeze_llm", LANGUAGE, "separate language model"),
}
# The options that settle a component inside mixture-of-experts layers (`ModelLayout.components`).
MOE_OPTIONS = {"freeze_router": (ROUTER, "router (gate)"), "freeze_shared_experts": (SHARED_EXPERTS, "shared experts")}
# `freeze_layer_stack`: whose layers the layer strategies count on a multi-part model.
LAYER_STACKS = ("language", "vision", "all")

def part_option(options: Any, name: str) -> Optional[bool]:
    """The value of a part option (`freeze_vision_tower`, ...), given under its own name or its ms-swift alias."""
    value = getattr(options, name, None)
    return getattr(options, PART_OPTIONS[name][0], None) if value is None else value


def _part_fields(options: Any, name: str) -> List[str]:
    alias = PART_OPTIONS[name][0]
    return [name] + ([alias] if getattr(options, alias, None) is not None else [])


def check_part_options(options: Any, strategy: Any) -> None:
    """Configuration-time checks of the part options: an option and its ms-swift alias agree,
    `freeze_unused_modalities` does not contradict a part set to train, and `freeze_layer_stack` other than the
    language model's is not used with a strategy whose scores are measured on the language model's layers."""
    for name, (alias, _, _) in PART_OPTIONS.items():
        value, alias_value = getattr(options, name, None), getattr(options, alias, None)
        if value is not None and alias_value is not None and value != alias_value:
            raise FreezeConfigError(
                f"`{name}` ({value!r}) and its ms-swift alias `{alias}` ({alias_value!r}) contradict each other. "
                f"Set one of them.",
                fields=[name, alias],
            )
    if getattr(options, "freeze_unused_modalities", None):
        for name, (alias, part, _) in PART_OPTIONS.items():
            if part != LANGUAGE and part_option(options, name) is False:
                raise FreezeConfigError(
                    f"`freeze_unused_modalities` freezes the vision tower and the projector, but "
                    f"`{_part_fields(options, name)[-1]}` is false (trains them). Set one of them.",
                    fields=["freeze_unused_modalities", *_part_fields(options, name)],
                )
    stack = getattr(options, "freeze_layer_stack", None)
    if stack not in (None, "language") and strategy.needs_scores:
        raise FreezeConfigError(
            f"`freeze_layer_stack` {stack!r} cannot be used with `freeze_strategy` {strategy.name!r}: its scores are "
            "measured on the language model's layers. Remove `freeze_layer_stack` (the language model's layers are "
            "the default).",
            fields=["freeze_layer_stack", "freeze_strategy"],
        )


def _refuse_missing_parts(layout: ModelLayout, options: Any) -> None:
    parts = layout.parts
    for name, (_, part, words) in PART_OPTIONS.items():
        value = part_option(options, name)
        if value is not None and part not in parts:
            what = f"this model has no {words}" + (
                f" (its parts: {', '.join(parts)})" if parts else ": discovery found a single-part model"
            )
            raise FreezeConfigError(
                f"`{_part_fields(options, name)[-1]}` is set (got {value!r}), but {what}. Remove it"
                + (", or freeze the whole model's layers with a layer strategy." if part == LANGUAGE else "."),
                fields=_part_fields(options, name),
            )
    unused = getattr(options, "freeze_unused_modalities", None)
    if unused is not None and not [part for part in parts if part != LANGUAGE]:
        raise FreezeConfigError(
            f"`freeze_unused_modalities` is set (got {unused!r}), but this model has no vision or audio encoder"
            + (f" (its parts: {', '.join(parts)})" if parts else ": discovery found a single-part model")
            + ". Remove it.",
            fields=["freeze_unused_modalities"],
        )
    stack = getattr(options, "freeze_layer_stack", None)
    if stack == "vision" and VISION not in parts:
        raise invalid(
            "freeze_layer_stack", stack, "'language' or 'all' for this model, which has no vision tower",
        )


def policy_view(layout: ModelLayout, options: Any, strategy: Any = None) -> ModelLayout:
    """The layout a strategy sees on a multi-part model: the part whose layers it counts (`freeze_layer_stack`:
    the language model by default), with those layers numbered from 0. The other parts are settled afterwards by
    the part options. Single-part models, and strategies that decide every parameter by name, see the whole layout.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> from hf_freeze import Block, ModelLayout
    >>> from hf_freeze.policies.parts import policy_view
    >>> layout = ModelLayout((
    ...     Block("vision.0", "layer", ("vision.0.w",), (4,), None, "vision", part="vision"),
    ...     Block("text.0", "layer", ("text.0.w",), (4,), 0, "text", part="language"),
    ... ), layer_parts=("language",))
    >>> [b.name for b in policy_view(layout, SimpleNamespace(freeze_layer_stack="all")).layers]
    ['vision.0', 'text.0']
    ```
    """
    _refuse_missing_parts(layout, options)
    if not layout.parts or (strategy is not None and strategy.whole_model):
        return layout
    stack = getattr(options, "freeze_layer_stack", None)
    if stack == "all" or (stack is None and layout.layer_parts is None):
        return layout.counting(None)
    counted = (VISION,) if stack == "vision" else (LANGUAGE,)
    return layout.counting(counted).restricted_to(counted)


def counted_layout(layout: ModelLayout, options: Any) -> ModelLayout:
    """The whole layout with the layers of `freeze_layer_stack` counted, as the strategy counts them: what the
    block table, the ``freeze/frozen_layers`` metric, the timeline and `hf-freeze plan` number and count.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> from hf_freeze import Block, ModelLayout
    >>> from hf_freeze.policies.parts import counted_layout
    >>> layout = ModelLayout((
    ...     Block("vision.0", "layer", ("vision.0.w",), (4,), None, "vision", part="vision"),
    ...     Block("text.0", "layer", ("text.0.w",), (4,), 0, "text", part="language"),
    ... ), layer_parts=("language",))
    >>> [b.name for b in counted_layout(layout, SimpleNamespace(freeze_layer_stack="vision")).layers]
    ['vision.0']
    ```
    """
    stack = getattr(options, "freeze_layer_stack", None)
    if not layout.parts or stack is None:
        return layout
    return layout.counting(None if stack == "all" else (VISION,) if stack == "vision" else (LANGUAGE,))


def _outside_view(layout: ModelLayout, view: ModelLayout) -> Dict[str, set]:
    """The parts the strategy did not see, with their parameters, in forward order."""
    seen = set(view.parameter_names)
    outside = {}
    for part in layout.parts:
        names = set(layout.parameters_of(layout.blocks_of_part(part))) - seen
        if names:
            outside[part] = names
    return outside


def _option_for_part(part: str) -> Optional[str]:
    return next((name for name, (_, covered, _) in PART_OPTIONS.items() if covered == part), None)


def pinned_parts(layout: ModelLayout, view: ModelLayout, options: Any, strategy: Any) -> Tuple[set, set]:
    """Parameters of whole parts pinned frozen / trainable by the part options (or the strategy's defaults)."""
    frozen, trainable = set(), set()
    for part in layout.parts:
        option = _option_for_part(part)
        value = part_option(options, option) if option else None
        if value is None and option and part in _outside_view(layout, view):
            value = strategy.defaults.get(option)
        if value is None and part != LANGUAGE and getattr(options, "freeze_unused_modalities", None):
            value = True
        names = set(layout.parameters_of(layout.blocks_of_part(part)))
        if value is True:
            frozen |= names
        elif value is False:
            trainable |= names
    return frozen, trainable


def part_settings(layout: ModelLayout, view: ModelLayout, options: Any, strategy: Any, frozen: set):
    """Settle the parts: a part option set (or a strategy default) wins; a part the strategy did not see follows
    the input side: the parts that feed the counted layers (the vision tower and projector, for the language model's
    layers) freeze when the counted part's input embeddings are frozen, so that a frozen prefix stays a prefix
    and freezing the bottom layers still saves their backward pass; the parts after it train."""
    if not layout.parts:
        return frozen, []
    pinned_frozen, pinned_trainable = pinned_parts(layout, view, options, strategy)
    embeddings = set(view.input_embedding_parameters) or set(view.parameters_of(view.blocks_of_kind(EMBEDDINGS)))
    input_frozen = bool(embeddings) and embeddings <= frozen
    counted = [block.part for block in view.layers]
    first_counted = layout.parts.index(counted[0]) if counted else len(layout.parts)
    notes, followed = [], []
    for part, names in _outside_view(layout, view).items():
        if names & (pinned_frozen | pinned_trainable):
            continue
        if layout.parts.index(part) < first_counted and input_frozen:
            frozen |= names
            followed.append(part)
    if followed:
        notes.append(
            f"The {' and '.join(followed)} part(s) freeze with the input embeddings of the counted layers "
            "(a trainable part there would make backward run through the frozen layers); set "
            "`freeze_vision_tower` / `freeze_multi_modal_projector` to decide them."
        )
    return (frozen | pinned_frozen) - pinned_trainable, notes


def pinned_components(layout: ModelLayout, options: Any) -> Tuple[set, set]:
    """Parameters of the mixture-of-experts components (routers, shared experts) pinned frozen / trainable by
    `freeze_router` and `freeze_shared_experts`; refuses an option whose component this model does not have."""
    frozen, trainable = set(), set()
    for option, (component, words) in MOE_OPTIONS.items():
        value = getattr(options, option, None)
        if value is None:
            continue
        names = set(layout.components.get(component, ()))
        if not names:
            kind = "a mixture-of-experts model without shared experts" if layout.components else "a dense model"
            raise FreezeConfigError(
                f"`{option}` is set (got {value!r}), but this model has no {words}: discovery found {kind}. "
                f"Remove `{option}`.",
                fields=[option],
            )
        (frozen if value else trainable).update(names)
    return frozen, trainable


def component_settings(layout: ModelLayout, options: Any, frozen: set) -> set:
    """``frozen`` with the mixture-of-experts components settled as `pinned_components` says (they win over the
    strategy's choice for their layer)."""
    pinned_frozen, pinned_trainable = pinned_components(layout, options)
    return (frozen | pinned_frozen) - pinned_trainable


# Input names that carry another modality than text: pixel_values, image_grid_thw, pixel_values_videos,
# input_features (speech), input_values (audio), and raw `image`/`images`/`audio` columns a collator turns into them.
_MODALITY_INPUT = re.compile(r"pixel|image|video|audio|vision|input_features|input_values", re.IGNORECASE)


def unused_parts(layout: ModelLayout, frozen: Collection[str], input_names: Optional[Collection[str]]) -> Dict[str, int]:
    """The trainable parameters, by part, that a text-only run never reaches: ``{part: count}`` for the encoders
    and projectors of a multi-part model when ``input_names`` (the training data's columns, or the keys of its
    first example) hold no image, video or audio input; ``{}`` when they do, when they are unknown (``None``),
    or on a single-part model.

    Example:

    ```python
    >>> from hf_freeze import Block, ModelLayout
    >>> from hf_freeze.policies.parts import unused_parts
    >>> layout = ModelLayout((
    ...     Block("vision.0", "layer", ("vision.0.w",), (4,), None, "vision", part="vision"),
    ...     Block("text.0", "layer", ("text.0.w",), (6,), 0, "text", part="language"),
    ... ), layer_parts=("language",))
    >>> unused_parts(layout, set(), ["input_ids", "labels"]), unused_parts(layout, set(), ["input_ids", "pixel_values"])
    ({'vision': 4}, {})
    ```
    """
    if input_names is None or any(_MODALITY_INPUT.search(str(name)) for name in input_names):
        return {}
    frozen = set(frozen)
    unused = {}
    for part in layout.parts:
        if part == LANGUAGE:
            continue
        count = layout.part_parameters(part, frozen)
        if count:
            unused[part] = count
    return unused


def check_unused_parts(
    layout: ModelLayout, frozen: Collection[str], input_names: Optional[Collection[str]], ddp_without_unused_search: bool
) -> List[str]:
    """Check a multi-part model's trainable parts against the training data's inputs: on text-only data the encoders
    and projector train nothing. Under DDP without ``find_unused_parameters`` that would fail at the first step, so
    it is refused here, naming `freeze_unused_modalities`; otherwise the returned lines say what that option would
    save.

    Example (`LayerFreezer.check_inputs` runs it on the model's layout):

    ```python
    >>> from transformers import AutoConfig, AutoModelForImageTextToText
    >>> from hf_freeze import LayerFreezer
    >>> config = AutoConfig.for_model("llava", image_token_index=127,
    ...     text_config=dict(model_type="llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                      num_key_value_heads=1, intermediate_size=32, vocab_size=128),
    ...     vision_config=dict(model_type="clip_vision_model", hidden_size=16, num_hidden_layers=1,
    ...                        num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8))
    >>> freezer = LayerFreezer(AutoModelForImageTextToText.from_config(config), freeze_strategy="none")
    >>> freezer.check_inputs(["input_ids", "pixel_values", "labels"])
    []
    >>> len(freezer.check_inputs(["input_ids", "labels"]))
    1
    ```
    """
    unused = unused_parts(layout, frozen, input_names)
    if not unused:
        return []
    what = " and ".join(f"the {part} part ({count:,} trainable parameters)" for part, count in unused.items())
    if ddp_without_unused_search:
        raise FreezeConfigError(
            f"The training data has no image, video or audio input (its inputs: {few(input_names, 6)}), so {what} "
            "will get no gradients, and DDP without unused-parameter detection stops at the first step waiting for "
            "them. Set `freeze_unused_modalities: true` to freeze them (the run is otherwise the same), or "
            "`ddp_find_unused_parameters: true`, or `freeze_unused_modalities: false` if a data collator adds "
            "the image inputs.",
            fields=["freeze_unused_modalities"],
        )
    return [
        f"The training data has no image, video or audio input, so {what} train nothing; "
        "`freeze_unused_modalities: true` would spare their gradients and optimizer states (and DDP's search "
        "for unused parameters)."
    ]
