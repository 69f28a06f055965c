"""Integrations: the engine plugged into the Trainer. `FreezeCallback` is thin glue from Trainer events to
`hf_freeze.engine.LayerFreezer` (which a plain loop calls directly), and the checks against the distributed backend
the Trainer wraps the model with."""

from .callback import FreezeCallback

__all__ = ["FreezeCallback"]
