"""Errors raised before training starts. An error is data (the fields it concerns, the value, what would be valid,
a hint) rendered to one sentence at the edge, so that tools sort problems by field without reading the text."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Tuple

__all__ = ["FreezeConfigError", "FreezeHealthError", "LayerDiscoveryError", "few", "invalid", "invalid_choice", "one_of"]

_UNSET = object()


class FreezeConfigError(ValueError):
    """A ``freeze_*`` option has a value that cannot work (raised at configuration or set-up time).

    Args:
        message: The whole sentence, for problems that are not "field must be X". Built from the parts otherwise.
        field: The option at fault (``"freeze_layers"``).
        value: The value it has.
        expected: What would be valid ("a fraction in (0, 1)", "one of 'step', 'epoch'").
        hint: What to do about it, appended to the sentence.
        fields: Every option the problem concerns, when it is about several (``field`` is added first).
        options: The valid values, when they are a list (``expected`` then reads "one of ...").

    Example:

    ```python
    >>> from hf_freeze import FreezeConfigError
    >>> error = FreezeConfigError(field="freeze_interval", value=0, expected="an integer >= 1")
    >>> str(error), error.fields
    ('`freeze_interval` must be an integer >= 1 (got 0).', ('freeze_interval',))
    ```
    """

    def __init__(
        self,
        message: Optional[str] = None,
        *,
        field: Optional[str] = None,
        value: Any = _UNSET,
        expected: Optional[str] = None,
        hint: Optional[str] = None,
        fields: Sequence[str] = (),
        options: Sequence[Any] = (),
    ):
        self.field = field
        self.value = None if value is _UNSET else value
        self.expected = expected
        self.hint = hint
        self.options: Tuple[Any, ...] = tuple(options)
        self.fields: Tuple[str, ...] = tuple(dict.fromkeys(([field] if field else []) + list(fields)))
        if message is None:
            if field is None or expected is None:
                raise TypeError("FreezeConfigError needs a message, or a field and what it expects")
            message = f"`{field}` must be {expected} (got {self.value!r})."
        if hint:
            message = f"{message.rstrip('.')}. {hint}" if message.endswith(".") else f"{message}. {hint}"
        self.message = message
        super().__init__(message)

    @property
    def sentence(self) -> str:
        """The message without its final full stop, to go on a list of problems."""
        return self.message.rstrip(".")


class LayerDiscoveryError(FreezeConfigError):
    """The model's layers could not be found, or a named layer container is wrong."""


class FreezeHealthError(RuntimeError):
    """The training health check found a problem and `freeze_health_check` is 'raise'."""


def invalid(field: str, value: Any, expected: str, hint: Optional[str] = None) -> FreezeConfigError:
    """The one error format used everywhere: "`field` must be ... (got value)"."""
    return FreezeConfigError(field=field, value=value, expected=expected, hint=hint)


def invalid_choice(field: str, value: Any, options: Iterable[Any], hint: Optional[str] = None) -> FreezeConfigError:
    """"`field` must be one of 'a', 'b' (got value)", with the valid values kept on the error as ``options``."""
    options = tuple(options)
    return FreezeConfigError(field=field, value=value, expected=one_of(options), hint=hint, options=options)


def few(names: Iterable[str], shown: int = 3) -> str:
    """The first ``shown`` names and how many more, for a message that would otherwise list hundreds."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def one_of(names: Iterable[Any]) -> str:
    return "one of " + ", ".join(repr(name) for name in names)
