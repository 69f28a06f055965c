"""A plain PyTorch loop with `LayerFreezer`, interrupted and resumed "as in a fresh process", matches the
uninterrupted run bit for bit, for every dynamic strategy.

The protocol is the one `LayerFreezer`'s docstring gives: save the model's, the optimizer's and the freezer's
state at step k; build a new model, `LayerFreezer(model, same options)`, `prepare()`, a new optimizer over the
trainable parameters; load the three; go on with `update`. The reference is the same loop run without a break.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import build

from hf_freeze import STRATEGIES, LayerFreezer, TrainingProgress

N = 12  # steps per run
STEPS_PER_EPOCH = 4  # only to give TrainingProgress a plausible epoch
SEED = 0  # the training seed (LISA's and BAdam's draws depend on it)

ADAPTIVE = dict(freeze_strategy="adaptive", freeze_layers=2, freeze_reselect_every=6)
PROBED = dict(ADAPTIVE, freeze_probe_steps=4)  # rounds at 0 and 6; probes 0-3 and 6-9; selections at 4 and 10

# (case id, options, k values). Each k is chosen to stress something; see the comment on each line.
CASES = [
    ("progressive", dict(freeze_strategy="progressive", freeze_start=0.25, freeze_schedule_unit="step"),
     [6, 7]),  # 6: right at a change of the frozen set; 7: between two changes
    ("gradual_unfreezing",
     dict(freeze_strategy="gradual_unfreezing", freeze_layers=3, freeze_schedule_unit="step", freeze_schedule_every=3,
          freeze_unfreeze_lr_factor=0.1),
     [3, 7]),  # 3: right at the first unfreezing; 7: mid-period, with learning-rate factors in force
    ("lisa", dict(freeze_strategy="lisa", freeze_active_layers=1, freeze_schedule_every=3),
     [6, 4]),  # 6: right at a redraw; 4: mid-period
    # Period 2 (not 3) so that the 12 steps cover a second pass of 4 blocks, i.e. a second random permutation.
    ("badam", dict(freeze_strategy="badam", freeze_schedule_every=2, freeze_block_order="random"),
     [8, 5]),  # 8: right at the start of the second pass; 5: mid-period
    # Freezes more layers again at step 8: the optimizer drops the re-frozen layers' state and a resume must agree.
    ("staged", dict(freeze_strategy="staged", freeze_stages={0: 3, 4: 1, 8: 2}),
     [4, 6]),  # 4: right at a stage change; 6: mid-stage
    ("adaptive-weight_change", dict(PROBED, freeze_score="weight_change"),
     [2, 4, 8]),  # 2: mid-probe (the sampled start weights carry over); 4: at the selection; 8: mid second probe
    ("adaptive-grad_norm", dict(PROBED, freeze_score="grad_norm"),
     [2, 10]),  # 2: mid-probe (the norms so far carry over); 10: at the second selection
    ("adaptive-grad_norm_change", dict(PROBED, freeze_score="grad_norm_change"),
     [3, 7]),  # mid-probe, both halves of the probe split across the break
    # 'highest': round 1 then selects other layers (the trained layers' normalised SNR overtakes the frozen ones').
    ("adaptive-snr", dict(ADAPTIVE, freeze_score="snr", freeze_select="highest"),
     [6, 3]),  # 6: right at the second round, measured on the loaded weights; 3: mid-round
]
PARAMS = [pytest.param(options, k, id=f"{name}-k{k}") for name, options, ks in CASES for k in ks]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Ops this small are dominated by thread hand-offs (5-20x slower with 2 threads on a busy machine); one
    thread also keeps the reductions' order fixed for both runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def progress(step: int) -> TrainingProgress:
    return TrainingProgress(
        step=step, max_steps=N, epoch=step / STEPS_PER_EPOCH, num_epochs=N / STEPS_PER_EPOCH, seed=SEED
    )


def batch(step: int) -> torch.Tensor:
    """The step's batch, a function of the step alone, so that both runs see the same data."""
    return torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(1000 + step))


class Loop:
    """One "process": a model with random init `init_seed`, its freezer, its optimizer, built as a new run does."""

    def __init__(self, options, init_seed: int, start: int = 0):
        self.model = build("gpt2", seed=init_seed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.freezer = LayerFreezer(self.model, **options)
        self.freezer.prepare(progress(start))
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        # weight_decay > 0: AdamW would move a frozen parameter with a zero (not None) grad.
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
        self.frozen = {}  # step -> names frozen after that step's update

    def run(self, steps) -> "Loop":
        for step in steps:
            self.freezer.update(progress(step), self.optimizer)
            self.frozen[step] = frozenset(self.freezer.frozen_names())
            input_ids = batch(step)
            self.model(input_ids=input_ids, labels=input_ids).loss.backward()
            self.freezer.before_optimizer_step()
            self.optimizer.step()
            self.freezer.after_optimizer_step()
            self.optimizer.zero_grad(set_to_none=True)
        return self

    def save(self):
        # Deep copies: the state dicts hold references to live tensors. The freezer's goes through JSON.
        return (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
            json.loads(json.dumps(self.freezer.state_dict())),
        )

    @classmethod
    def resumed(cls, options, saved, k: int, load_freezer: bool = True, **load_options) -> "Loop":
        # A different random init: anything that is not loaded shows up as a difference.
        loop = cls(options, init_seed=1, start=k)
        model_state, optimizer_state, freezer_state = saved
        loop.model.load_state_dict(model_state)
        loop.optimizer.load_state_dict(optimizer_state)
        if load_freezer:
            loop.freezer.load_state_dict(freezer_state, **load_options)
        return loop


_REFERENCES = {}


def reference_run(options) -> Loop:
    """The uninterrupted run (once per options: several k share it, and nothing below changes it)."""
    key = json.dumps(options, sort_keys=True)
    if key not in _REFERENCES:
        _REFERENCES[key] = Loop(options, init_seed=0).run(range(N))
    return _REFERENCES[key]


def interrupted(options, k: int, **resume_options) -> Loop:
    return Loop.resumed(options, Loop(options, init_seed=0).run(range(k)).save(), k, **resume_options).run(range(k, N))


def without_wall_clock(state):
    """The freezer's state without the probe's timings: `scoring_seconds`/`probe_seconds` are wall-clock time spent
    (carried over on resume, so the resumed totals differ from the reference's by timing noise alone)."""
    state = copy.deepcopy(state)
    if state.get("probe"):
        state["probe"].pop("scoring_seconds", None)
        state["probe"].pop("probe_seconds", None)
    return state


def score_metrics(freezer: LayerFreezer):
    return {key: value for key, value in freezer.metrics().items() if key.startswith("freeze/score_layer_")}


def test_every_dynamic_strategy_is_covered():
    dynamic = {name for name in STRATEGIES.names() if STRATEGIES.get(name).dynamic}
    covered = {options["freeze_strategy"] for _, options, _ in CASES}
    assert dynamic <= covered, f"dynamic strategies without a resume test: {sorted(dynamic - covered)}"


@pytest.mark.parametrize("options, k", PARAMS)
def test_resumed_run_is_bit_identical(options, k):
    reference = reference_run(options)
    # The options must make the frozen set change during the run, or there is nothing to resume.
    assert len(set(reference.frozen.values())) >= 2, reference.freezer.timeline.changes
    resumed = interrupted(options, k)

    for step in range(k, N):
        assert resumed.frozen[step] == reference.frozen[step], step
    expected = dict(reference.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        assert torch.equal(parameter, expected[name]), name
    # The whole entries, optimizer_state_bytes and released_optimizer_state_bytes included: after loading, the
    # optimizer holds state for exactly the parameters the reference's held state for (frozen ones released), so
    # the bytes measured at a change are the same.
    assert resumed.freezer.timeline.changes == reference.freezer.timeline.changes
    assert resumed.freezer.timeline.selections == reference.freezer.timeline.selections
    assert score_metrics(resumed.freezer) == score_metrics(reference.freezer)
    if options["freeze_strategy"] == "adaptive":
        assert len(reference.freezer.timeline.selections) == 2  # both rounds selected: the cases are not vacuous
    if options.get("freeze_unfreeze_lr_factor"):
        assert reference.freezer.decide(progress(k)).update_factors  # a factor is in force where the run resumes
    assert without_wall_clock(resumed.freezer.state_dict()) == without_wall_clock(reference.freezer.state_dict())


def test_a_resume_that_skips_the_freezer_state_is_seen():
    """Negative control: the assertions above can fail. Saved mid-probe (k=2) and resumed without
    `freezer.load_state_dict`, the probe's start weights are lost: it starts over late, and round 0 never selects."""
    options = dict(PROBED, freeze_score="weight_change")
    reference = reference_run(options)
    broken = interrupted(options, 2, load_freezer=False)
    assert broken.freezer.timeline.selections != reference.freezer.timeline.selections
    expected = dict(reference.model.named_parameters())
    assert any(not torch.equal(parameter, expected[name]) for name, parameter in broken.model.named_parameters())


def test_a_state_saved_under_other_options_warns_and_still_resumes(capsys):
    saved_options = dict(freeze_strategy="lisa", freeze_active_layers=1, freeze_schedule_every=3)
    options = dict(saved_options, freeze_schedule_every=4)
    k = 5
    interrupted_run = Loop(saved_options, init_seed=0).run(range(k))
    saved = interrupted_run.save()
    capsys.readouterr()
    resumed = Loop.resumed(options, saved, k, step=k)  # `step`: where the resumed run starts (as the Trainer passes)
    assert "differs from the one in the saved state" in capsys.readouterr().err
    resumed.run(range(k, N))
    # The frozen set follows the current policy (a pure function of the step for LISA), not the saved one ...
    for step in range(k, N):
        assert resumed.frozen[step] == resumed.freezer.decide(progress(step)).frozen, step
    assert any(resumed.frozen[step] != interrupted_run.freezer.decide(progress(step)).frozen for step in range(k, N))
    # ... and the timeline goes on from the saved one.
    before = saved[2]["timeline"]["changes"]
    assert before and resumed.freezer.timeline.changes[: len(before)] == before


def test_a_changing_policy_started_past_step_0_without_its_state_warns(capsys):
    """Resumed mid-probe without the freezing state, an adaptive policy starts its probe afresh: the run diverges
    from the uninterrupted one (the test above), so the user is warned, not told at INFO."""
    model = build("llama")
    freezer = LayerFreezer(model, **dict(PROBED, freeze_score="weight_change"))
    freezer.prepare()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    capsys.readouterr()
    freezer.start(progress(2), optimizer)
    assert "without the freezing state of the interrupted run" in capsys.readouterr().err
    freezer.start(progress(0), optimizer)  # a fresh start says nothing of the kind
    assert "without the freezing state" not in capsys.readouterr().err


@pytest.mark.parametrize("step", [True, -1, "2", 2.0])
def test_a_saved_entry_whose_step_is_not_a_step_is_refused_naming_the_entry(step):
    freezer = LayerFreezer(build("llama"), freeze_strategy="lisa", freeze_active_layers=1)
    freezer.prepare()
    state = freezer.state_dict()
    state["timeline"] = {"changes": [{"step": step, "frozen_blocks": []}], "selections": []}
    with pytest.raises(Exception, match=r"damaged: 'timeline.changes\[0\]' has no integer 'step'"):
        freezer.load_state_dict(state)
