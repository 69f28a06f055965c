"""Where a policy comes from: a `FreezeArguments`, ``freeze_*`` keywords, or `TrainingArguments` that carry the
fields (`FreezeTrainingArguments`); and the one rule for a policy given in two places."""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional

from ..errors import FreezeConfigError
from .arguments import FreezeArguments, freeze_fields

__all__ = ["arguments_from", "freeze_arguments_from", "raise_if_unknown", "resolve_arguments"]


def arguments_from(arguments: Optional[FreezeArguments] = None, options: Optional[Mapping[str, Any]] = None):
    """One `FreezeArguments` from either a ready object or `freeze_*` keyword options (not both); ``None`` for
    neither."""
    options = dict(options or {})
    if arguments is not None and options:
        raise FreezeConfigError(
            f"Give the policy either as a FreezeArguments or as freeze_* keywords, not both (got keywords "
            f"{sorted(options)})."
        )
    if arguments is not None:
        if not isinstance(arguments, FreezeArguments):
            raise FreezeConfigError(f"`arguments` must be a FreezeArguments (got {type(arguments).__name__}).")
        return FreezeArguments(**arguments.freeze_options())
    if options:
        raise_if_unknown(options)
        return FreezeArguments(**options)
    return None


def freeze_arguments_from(source: Any) -> Optional[FreezeArguments]:
    """The `FreezeArguments` carried by ``source`` (e.g. a `FreezeTrainingArguments`), or ``None``."""
    if isinstance(source, FreezeArguments):
        return FreezeArguments(**source.freeze_options())
    if source is not None and all(hasattr(source, name) for name in freeze_fields()):
        return FreezeArguments(**{name: getattr(source, name) for name in freeze_fields()})
    return None


def resolve_arguments(given: Optional[FreezeArguments], training_args: Any) -> FreezeArguments:
    """The policy of a run: the one given to the callback, else the one the `TrainingArguments` carry, else none.

    Giving an active policy in both places is allowed only when the two agree: which one should win is not
    something to guess.
    """
    from_training_args = freeze_arguments_from(training_args)
    if given is None:
        return from_training_args or FreezeArguments()
    if from_training_args is not None and from_training_args.is_active():
        theirs, ours = from_training_args.freeze_options(), given.freeze_options()
        differing = {key: (ours[key], theirs[key]) for key in ours if ours[key] != theirs[key]}
        if differing:
            detail = ", ".join(f"`{key}`: {a!r} vs {b!r}" for key, (a, b) in differing.items())
            raise FreezeConfigError(
                "The freezing policy is given twice, by FreezeCallback(...) and by the TrainingArguments, and "
                f"they differ ({detail}). Give it in one place.",
                fields=list(differing),
            )
    return given


def raise_if_unknown(options: Mapping[str, Any]) -> None:
    """Refuse option names that are not `freeze_*` fields, naming the closest valid one."""
    known = set(freeze_fields())
    unknown = sorted(set(options) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise FreezeConfigError(
            f"Unknown freeze option(s): {', '.join(hints)}. Valid options: {', '.join(sorted(known))}."
        )
