"""The engine: `LayerFreezer`, the whole flow (model → blocks → decision → application → report) for any training
loop. `FreezeCallback` drives it from Trainer events; a plain loop calls it directly."""

from .freezer import LayerFreezer

__all__ = ["LayerFreezer"]
