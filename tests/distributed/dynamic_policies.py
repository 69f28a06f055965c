"""A test-only dynamic strategy, registered in the worker processes only (generic tests iterate the registry).

It stands in for the schedules until they land: the trainable set changes after the first step, in both
directions (the bottom layers are unfrozen, the head is frozen), which is what a schedule does under DDP.
"""

from hf_freeze.layout import HEAD
from hf_freeze.policies.base import STRATEGIES, Strategy, layer_parameters, register_strategy

NAME = "test_unfreeze_mid_run"


def _select(layout, args, progress):
    if progress.step < 1:
        return layer_parameters(layout, range(layout.num_layers // 2)), []
    return list(layout.parameters_of(layout.blocks_of_kind(HEAD))), []


if NAME not in STRATEGIES:
    register_strategy(
        Strategy(NAME, _select, (), {"freeze_embeddings": True}, dynamic=True,
                 description="Test only: bottom half frozen at step 0, then the head instead.")
    )
