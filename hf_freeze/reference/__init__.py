"""A frozen-trunk reference model for DPO, GRPO and PPO (`reference_model`): the policy's frozen layers are shared
with the reference instead of copied, and their forward pass runs once for both. `model.py` builds the reference,
`sharing.py` runs the shared frozen computation once, `hooks.py` holds the hooks both use."""

from .model import reference_model, reference_state

__all__ = ["reference_model", "reference_state"]
