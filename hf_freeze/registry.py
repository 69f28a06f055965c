"""One small registry type, used once per pluggable kind (strategies, schedules, scores)."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, TypeVar

from .errors import invalid_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; a failed look-up lists the valid names.

    Example:

    ```python
    >>> from hf_freeze.registry import Registry
    >>> colours = Registry("colour", field="paint_colour")
    >>> colours.add("red", 1)
    1
    >>> colours.get("red")
    1
    ```
    """

    def __init__(self, kind: str, field: str):
        self.kind = kind
        self.field = field
        self._entries: Dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            return self.add(name, entry)

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise invalid_choice(self.field, name, self.names())
        return self._entries[name]

    def names(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
