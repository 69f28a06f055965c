"""Integrations: the flow plugged into a training loop. `LayerFreezer` for any loop, `FreezeCallback` for the
Trainer (thin glue over it), and the checks against the distributed backend the Trainer wraps the model with."""

from .callback import FreezeCallback

__all__ = ["FreezeCallback", "LayerFreezer"]
