"""Errors raised before training starts, each naming the field, the value and what would be valid."""

from __future__ import annotations

from typing import Iterable


class FreezeConfigError(ValueError):
    """A ``freeze_*`` option has a value that cannot work (raised at configuration or set-up time)."""


class LayerDiscoveryError(FreezeConfigError):
    """The model's layers could not be found, or a named layer container is wrong."""


def invalid(field: str, value, expected: str) -> FreezeConfigError:
    """Build the one error format used everywhere: "`field` must be ... (got value)"."""
    return FreezeConfigError(f"`{field}` must be {expected} (got {value!r}).")


def one_of(names: Iterable[str]) -> str:
    names = [repr(name) for name in names]
    return "one of " + ", ".join(names)
