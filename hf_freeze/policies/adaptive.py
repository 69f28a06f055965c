"""Adaptive freezing: the layers to freeze are chosen from per-layer scores measured during training.

Training is divided into *rounds*. A round starts with a probe of `freeze_probe_steps` steps during which every
layer is measured; the probe's per-layer scores (`hf_freeze.scores`) then pick the `freeze_layers` layers that stay
frozen for the rest of the round. By default (`freeze_probe_mode: measure`) the probe's optimizer steps are withheld:
nothing trains and the optimizer holds no state while it runs, so a probe needs no more memory than weights,
gradients and activations; with 'train' every layer trains through the probe (full fine-tuning's memory). Without
`freeze_reselect_every` there is one round, the whole run; with it, a new round (and a new probe) starts every
`freeze_reselect_every` steps. A score that needs no probe (``snr``) is measured on the weights as the round begins,
and the selection applies from the round's first step.

Everything here is pure: the scores come in through `TrainingProgress.layer_scores`, measured by the torch side
(`hf_freeze.scores.LayerProbe`), so the same step and scores give the same frozen set on every process and in a
resumed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence, get_args

from ..errors import FreezeConfigError, invalid
from ..model.layout import ModelLayout
from .core import Selection, Strategy, TrainingProgress, register_strategy
from .common import bottom_prefix, layer_parameters, require_layers, resolve_count
from .scoring import SCORES
from .static import check_count

__all__ = [
    "PROBE_MODES",
    "SELECT_ENDS",
    "AdaptiveRound",
    "ProbeMode",
    "adaptive_round",
    "probe_length",
    "probe_mode",
    "score_name",
    "select_layers",
    "withholds_updates",
]

SELECT_ENDS = ("lowest", "highest")
# What a probe's optimizer steps do: 'measure' withholds them (no update, no optimizer state), 'train' takes them.
ProbeMode = Literal["measure", "train"]
PROBE_MODES = get_args(ProbeMode)
DEFAULT_PROBE_MODE = "measure"
DEFAULT_SCORE = "weight_change"
# The probe covers this fraction of training when `freeze_probe_steps` is unset (the paper Exploring Selective Layer Freezing Strategies probed 5 steps).
DEFAULT_PROBE_FRACTION = 0.05

def score_name(options) -> str:
    return options.freeze_score or DEFAULT_SCORE


def _score(options):
    return SCORES.get(score_name(options))


def _needs_probe(options) -> bool:
    return _score(options).needs_probe


def probe_mode(options) -> str:
    return getattr(options, "freeze_probe_mode", None) or DEFAULT_PROBE_MODE


def withholds_updates(options, progress: TrainingProgress) -> bool:
    """True when `progress`'s step is a probe step whose optimizer step is withheld (`freeze_probe_mode: measure`):
    the gradients are measured, then dropped, so nothing trains and the optimizer allocates no state.

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, TrainingProgress
    >>> from hf_freeze.policies.adaptive import withholds_updates
    >>> options = FreezeArguments(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=3)
    >>> [withholds_updates(options, TrainingProgress(step=step, max_steps=10)) for step in (0, 2, 3)]
    [True, True, False]
    ```
    """
    if options.freeze_strategy != "adaptive" or probe_mode(options) != "measure" or not _needs_probe(options):
        return False
    return adaptive_round(options, progress).probing(progress.step)


def probe_length(options, max_steps: int) -> int:
    """Steps each probe lasts: 0 for a score read off the weights, else `freeze_probe_steps` (a count, or a
    fraction of `max_steps`, at least the score's minimum)."""
    if not _needs_probe(options):
        return 0
    value = DEFAULT_PROBE_FRACTION if options.freeze_probe_steps is None else options.freeze_probe_steps
    if isinstance(value, float) and not value.is_integer():
        return max(_score(options).min_probe_steps, int(value * max_steps + 0.5))
    return int(value)


@dataclass(frozen=True)
class AdaptiveRound:
    """Where a step falls: which round, whether that round's probe is still running, and when it ends.

    Example:

    ```python
    >>> from hf_freeze import FreezeArguments, TrainingProgress
    >>> from hf_freeze.policies.adaptive import adaptive_round
    >>> options = FreezeArguments(freeze_strategy="adaptive", freeze_layers=2, freeze_probe_steps=5,
    ...                        freeze_reselect_every=50)
    >>> adaptive_round(options, TrainingProgress(step=53, max_steps=100))
    AdaptiveRound(index=1, start=50, probe_end=55)
    >>> adaptive_round(options, TrainingProgress(step=53, max_steps=100)).probing(53)
    True
    ```
    """

    index: int
    start: int
    probe_end: int

    def probing(self, step: int) -> bool:
        return step < self.probe_end


def adaptive_round(options, progress: TrainingProgress) -> AdaptiveRound:
    every = options.freeze_reselect_every
    index = progress.step // every if every else 0
    start = index * every if every else 0
    return AdaptiveRound(index, start, start + probe_length(options, progress.max_steps))


def select_layers(scores: Sequence[float], count: int, end: str = "lowest") -> List[int]:
    """Indices of the `count` layers with the lowest (or highest) scores; ties go to the lower index.

    Example:

    ```python
    >>> from hf_freeze.policies.adaptive import select_layers
    >>> select_layers([0.3, 0.1, 0.5, 0.2], 2)
    [1, 3]
    >>> select_layers([0.3, 0.1, 0.5, 0.2], 2, "highest")
    [0, 2]
    ```
    """
    sign = -1.0 if end == "highest" else 1.0
    order = sorted(range(len(scores)), key=lambda index: (sign * scores[index], index))
    return sorted(order[:count])


def _check(options) -> None:
    if options.freeze_score is not None:
        SCORES.get(options.freeze_score)
    check_count(options)
    probe = options.freeze_probe_steps
    if probe is not None:
        if not _needs_probe(options):
            probed = [name for name in SCORES.names() if SCORES.get(name).needs_probe]
            raise FreezeConfigError(
                f"`freeze_probe_steps` ({probe!r}) is not used by `freeze_score` {score_name(options)!r}, which is "
                "measured on the weights without a probe. Remove `freeze_probe_steps`, or choose a score measured "
                f"by a probe ({', '.join(map(repr, probed))}).",
                fields=["freeze_probe_steps", "freeze_score"],
            )
        if probe <= 0 or (isinstance(probe, float) and not probe.is_integer() and not probe < 1):
            raise invalid("freeze_probe_steps", probe, "a count of steps >= 1 or a fraction of training in (0, 1)")
        shortest = _score(options).min_probe_steps
        if isinstance(probe, int) and probe < shortest:
            raise invalid(
                "freeze_probe_steps", probe, f"at least {shortest} steps for `freeze_score` {score_name(options)!r}"
            )
    mode = getattr(options, "freeze_probe_mode", None)
    if mode is not None and not _needs_probe(options):
        raise FreezeConfigError(
            f"`freeze_probe_mode` ({mode!r}) is not used by `freeze_score` {score_name(options)!r}, which is measured "
            "on the weights without a probe. Remove `freeze_probe_mode`, or choose a score measured by a probe.",
            fields=["freeze_probe_mode", "freeze_score"],
        )
    every = options.freeze_reselect_every
    if every is not None:
        if every < 1:
            raise invalid("freeze_reselect_every", every, "a number of steps >= 1")
        if isinstance(probe, int) and probe >= every:  # a count (whole numbers are normalised to int)
            raise FreezeConfigError(
                f"`freeze_probe_steps` ({probe!r}) must be shorter than `freeze_reselect_every` ({every!r}): each "
                "round starts with a probe and needs steps left to train with the selection. Lengthen the rounds "
                "or shorten the probe.",
                fields=["freeze_probe_steps", "freeze_reselect_every"],
            )


def check_against_training(options, max_steps: int) -> None:
    """Checks that need the length of training, made before the first step (`FreezeCallback.on_train_begin`)."""
    if not max_steps:
        return
    probe = probe_length(options, max_steps)
    if probe >= max_steps:
        raise FreezeConfigError(
            f"`freeze_probe_steps` ({options.freeze_probe_steps!r}, {probe} steps) is not shorter than training "
            f"({max_steps} steps): no step would be left to train with the selected layers frozen. Use fewer probe "
            "steps (or a fraction such as 0.05), or train longer.",
            fields=["freeze_probe_steps"],
        )
    every = options.freeze_reselect_every
    if every and probe >= every:
        raise FreezeConfigError(
            f"`freeze_probe_steps` ({options.freeze_probe_steps!r}, {probe} steps of {max_steps}) must be shorter than "
            f"`freeze_reselect_every` ({every!r}). Lengthen the rounds or shorten the probe.",
            fields=["freeze_probe_steps", "freeze_reselect_every"],
        )


def check_against_loss_scaling(options, scaled: bool, clipped: bool) -> None:
    """Refuse, before the first step, a measuring probe under fp16 loss scaling without gradient clipping: the probe
    drops every gradient before the optimizer step, and a GradScaler that unscales them only inside its `step` (the
    Trainer's with `max_grad_norm: 0`) then finds none and fails ("No inf checks were recorded"). Clipping unscales
    them before the probe drops them."""
    if not scaled or clipped or options.freeze_strategy != "adaptive" or probe_mode(options) != "measure":
        return
    if _needs_probe(options):
        raise FreezeConfigError(
            "`freeze_probe_mode` 'measure' (the default) withholds each probe step by dropping its gradients, and "
            "fp16 mixed precision without gradient clipping unscales them only inside the optimizer step, which "
            "then finds none and fails. Set `max_grad_norm` > 0, train in bf16, or set `freeze_probe_mode: train`.",
            fields=["freeze_probe_mode", "max_grad_norm", "fp16"],
        )


def _adaptive(layout: ModelLayout, options, progress: TrainingProgress) -> Selection:
    total = require_layers(layout, "adaptive")
    count = resolve_count(options.freeze_layers, total)
    if withholds_updates(options, progress):
        # A probe that only measures scores the layers: nothing else needs a gradient while it runs (the embeddings'
        # and the head's would be the largest), and the layers' gradients do not depend on theirs.
        candidates = set(layer_parameters(layout, range(total)))
        return [name for name in layout.parameter_names if name not in candidates], []
    if adaptive_round(options, progress).probing(progress.step):
        return [], []
    scores: Optional[Sequence[float]] = progress.layer_scores
    if scores is None:
        return [], [f"`freeze_strategy` 'adaptive': no {score_name(options)} scores measured yet, so nothing is frozen."]
    if len(scores) != total:
        raise FreezeConfigError(
            f"`freeze_strategy` 'adaptive' got {len(scores)} layer scores for a model with {total} layers.",
            fields=["freeze_strategy"],
        )
    # As with 'bottom': when layer 0 is chosen, what sits below it freezes too.
    return bottom_prefix(layout, options, select_layers(scores, count, options.freeze_select or "lowest")), []


register_strategy(
    Strategy(
        "adaptive",
        _adaptive,
        ("freeze_layers", "freeze_score", "freeze_select", "freeze_probe_steps", "freeze_reselect_every",
         "freeze_probe_mode"),
        {},
        _check,
        dynamic=True,
        needs_scores=True,
        description=(
            "Freeze the `freeze_layers` layers with the lowest (or highest) score, measured by a probe of "
            "`freeze_probe_steps` steps (weight change, gradient norm; by default without optimizer steps or state) "
            "or on the weights (SNR); optionally re-selected every `freeze_reselect_every` steps."
        ),
    )
)
