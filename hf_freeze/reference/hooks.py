"""What ties a reference built by `reference_model` to its policy: the pair of parameters over one storage, and the
hooks its `ReferenceState` installs on both models, which reach that state through a weak reference only.

Both halves of the state use them: copying on unfreeze and moves (`reference`), and the shared prefix computation
(`reference_sharing`).
"""

from __future__ import annotations

import weakref
from typing import Any, List

from torch import nn

__all__ = ["SharedPair", "WeakHook", "remove_all"]


class SharedPair:
    """A policy parameter the reference shares, and the reference's parameter over the same storage."""

    __slots__ = ("name", "policy", "reference", "handle")

    def __init__(self, name: str, policy: nn.Parameter, reference: nn.Parameter):
        self.name, self.policy, self.reference, self.handle = name, policy, reference, None

    @property
    def shared(self) -> bool:
        return self.reference.data_ptr() == self.policy.data_ptr()


class WeakHook:
    """A hook that calls a `ReferenceState` method through a weak reference: the policy never keeps the reference
    alive. Deep copies and pickles of the models get an inert hook instead (a copy of the policy is no policy)."""

    def __init__(self, state: Any, method: str, *bound: Any):
        self.state, self.method, self.bound = weakref.ref(state), method, bound

    def __call__(self, *args):
        state = self.state()
        if state is not None:
            getattr(state, self.method)(*self.bound, *args)
        return None

    def __deepcopy__(self, memo):
        return _inert

    def __reduce__(self):
        return (_inert_hook, ())


def _inert(*args, **kwargs):
    return None


def _inert_hook():
    return _inert


def remove_all(handles: List[Any]) -> None:
    for handle in handles:
        if handle is not None:
            handle.remove()
