"""`badam` against BAdam's `BlockOptimizer`, whose block-switching behaviour is transcribed below in our own words.

What BAdam does (src/badam/block_optim.py): the block index starts at `start_block` when given, else at the first
block ('ascending') or the last ('descending'); after every optimizer step it adds one to its step counter and, when
the counter plus one is a multiple of `switch_block_every`, it moves to the next block ('ascending': +1,
'descending': -1, cyclically; 'fixed': stays). So the first block trains one step fewer than the others.
LLaMA-Factory passes `badam_start_block`, `badam_switch_mode` and `badam_switch_interval` straight to it.
"""

import pytest

from hf_freeze import FreezeArguments, FreezeConfigError, ModelLayout, TrainingProgress, decide
from hf_freeze.policies.schedules import active_block

LAYERS = 8
LAYOUT = ModelLayout.from_layer_sizes([10] * LAYERS, embeddings=5, norm=2, head=3)


def badam_reference(num_blocks, every, mode, start_block, steps):
    """The block BAdam's optimizer trains at each of `steps` optimizer steps."""
    if start_block is not None:
        current = start_block
    else:
        current = num_blocks - 1 if mode == "descending" else 0
    counter, trained = 0, []
    for _ in range(steps):
        trained.append(current)
        counter += 1
        if (counter + 1) % every == 0:
            current = {"ascending": current + 1, "descending": current - 1, "fixed": current}[mode] % num_blocks
    return trained


def hf_freeze_blocks(args, steps, block_size):
    first_layers = [active_block(args, TrainingProgress(step=step), LAYERS)[0] for step in range(steps)]
    return [layer // block_size for layer in first_layers]


def test_the_first_block_trains_one_step_fewer_as_in_badam():
    args = FreezeArguments(freeze_strategy="badam", freeze_schedule_every=3)
    trained = [sorted(set(range(LAYERS)) - set(decide(LAYOUT, args, TrainingProgress(step=s)).frozen_layers(LAYOUT)))
               for s in range(9)]
    assert trained == [[0], [0], [1], [1], [1], [2], [2], [2], [3]]  # the real optimizer gave 0,0,1,1,1,2,...


# BAdam's 'fixed' needs a start block (its optimizer fails without one; hf_freeze refuses it).
ORDERS = [(mode, start) for mode in ("ascending", "descending", "fixed") for start in (None, 0, 1, 2)
          if not (mode == "fixed" and start is None)]


@pytest.mark.parametrize("mode,start_block", ORDERS)
@pytest.mark.parametrize("every", [1, 2, 3, 5, 50])
@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_badam_switches_exactly_when_blocks_optimizer_does(mode, start_block, every, block_size):
    num_blocks = -(-LAYERS // block_size)
    args = FreezeArguments(
        freeze_strategy="badam", freeze_schedule_every=every, freeze_block_order=mode,
        freeze_active_layers=block_size, freeze_start_block=start_block,
    )
    steps = 3 * every * num_blocks + 7
    assert hf_freeze_blocks(args, steps, block_size) == badam_reference(num_blocks, every, mode, start_block, steps)


def test_random_order_keeps_badams_timing_and_visits_every_block_once_per_pass():
    args = FreezeArguments(freeze_strategy="badam", freeze_schedule_every=3, freeze_block_order="random")
    blocks = [tuple(active_block(args, TrainingProgress(step=s, seed=5), LAYERS)) for s in range(2 + 3 * 8 * 2)]
    assert blocks[0] == blocks[1] != blocks[2]  # first period two steps long, as in BAdam
    periods = [blocks[0]] + [blocks[s] for s in range(2, len(blocks), 3)]
    assert sorted(periods[:8]) == [(i,) for i in range(LAYERS)] and sorted(periods[8:16]) == [(i,) for i in range(LAYERS)]


@pytest.mark.parametrize(
    "options,fields",
    [
        (dict(freeze_block_order="fixed"), {"freeze_block_order", "freeze_start_block"}),
        (dict(freeze_block_order="random", freeze_start_block=1), {"freeze_block_order", "freeze_start_block"}),
        (dict(freeze_start_block=-1), {"freeze_start_block"}),
    ],
)
def test_start_block_misuse_is_refused_when_the_options_are_built(options, fields):
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(freeze_strategy="badam", **options)
    assert set(error.value.fields) == fields and "`freeze_start_block`" in str(error.value)


def test_a_start_block_beyond_the_model_is_refused_with_the_number_of_blocks():
    args = FreezeArguments(freeze_strategy="badam", freeze_active_layers=3, freeze_start_block=3)
    with pytest.raises(FreezeConfigError, match=r"`freeze_start_block` must be a block index below 3") as error:
        decide(LAYOUT, args, TrainingProgress())
    assert error.value.fields == ("freeze_start_block",)
