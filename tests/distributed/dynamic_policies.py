"""A test-only dynamic strategy, registered in the worker processes only (generic tests iterate the registry).

It stands in for the schedules until they land: the trainable set changes after the first step, in both
directions (the bottom layers are unfrozen, the head is frozen), which is what a schedule does under DDP.
"""

from hf_freeze.model.layout import HEAD
from hf_freeze.policies.core import STRATEGIES, Strategy, register_strategy
from hf_freeze.policies.common import layer_parameters
from hf_freeze.scores import SCORES, GradNormMeter, Score, register_score

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


def _select_by_rank(layout, args, progress):
    import os

    # Wrong on purpose: a policy must decide the same on every process (e.g. from local, unsynchronised scores).
    return layer_parameters(layout, [int(os.environ.get("RANK", "0")) % layout.num_layers]), []


if "test_rank_dependent" not in STRATEGIES:
    register_strategy(
        Strategy("test_rank_dependent", _select_by_rank, (), {}, dynamic=True,
                 description="Test only: freezes a different layer on every rank.")
    )


class _RankDependentScores(GradNormMeter):
    """Wrong on purpose: every rank measures different scores (as local statistics could); the probe must agree."""

    def finish(self):
        import os

        super().finish()
        rank, count = int(os.environ.get("RANK", "0")), len(self.layers)
        return [float((index + rank) % count) for index in range(count)]


if "test_rank_dependent" not in SCORES:
    register_score(Score("test_rank_dependent", _RankDependentScores, True, "Test only: differs by rank."))
