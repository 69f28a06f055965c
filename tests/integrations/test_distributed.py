"""Two CPU processes (torchrun, gloo, DDP) running a real Trainer + FreezeCallback: every rank ends identical.

Each launch runs several policies, because starting the processes dominates; `ddp_launch.shared_launch` runs
each launch once per session even when xdist spreads these tests over workers. To test a new policy under DDP,
add it to `STATIC_POLICIES` or `DYNAMIC_POLICIES`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import ddp_launch  # noqa: E402
from tiny import build  # noqa: E402

from hf_freeze import LayerFreezer  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork-free torchrun with gloo on POSIX")

# Policies decided once, before the DDP wrap.
STATIC_POLICIES = {
    "none": {"freeze_strategy": "none"},
    "bottom": {"freeze_strategy": "bottom", "freeze_layers": 0.5},
    "top": {"freeze_strategy": "top", "freeze_layers": 2},
    "interval": {"freeze_strategy": "interval"},
    "bitfit": {"freeze_strategy": "bitfit"},
    "head_only": {"freeze_strategy": "head_only"},
}
# Policies whose trainable set changes during training; schedules and adaptive policies go here. The test-only
# `test_*` strategies (tests/distributed/dynamic_policies.py) are re-applied at every step by the worker, standing in
# for a callback that drives schedules itself; `test_unfreeze_mid_run` unfreezes the bottom layers and freezes the
# head after the first step.
DYNAMIC_POLICIES = {
    "test_unfreeze_mid_run": {"freeze_strategy": "test_unfreeze_mid_run"},
    "gradual_unfreezing": {"freeze_strategy": "gradual_unfreezing", "freeze_schedule_unit": "step",
                           "freeze_schedule_every": 1, "freeze_unfreeze_layers": 1, "freeze_layers": 4},
}
# Policies whose frozen set moves around the model (rotating layers, adaptive selection): checked step by step.
# `test_rank_dependent` (tests/distributed/dynamic_policies.py) measures different scores on each rank.
ROTATING_POLICIES = {
    "lisa": {"freeze_strategy": "lisa", "freeze_active_layers": 1, "freeze_schedule_every": 1},
    "adaptive_weight_change": {"freeze_strategy": "adaptive", "freeze_layers": 2, "freeze_probe_steps": 1,
                               "freeze_reselect_every": 3},
    "adaptive_grad_norm": {"freeze_strategy": "adaptive", "freeze_score": "grad_norm", "freeze_layers": 2,
                           "freeze_probe_steps": 2},
    "adaptive_snr": {"freeze_strategy": "adaptive", "freeze_score": "snr", "freeze_layers": 0.5,
                     "freeze_reselect_every": 2},
    "adaptive_rank_dependent_scores": {"freeze_strategy": "adaptive", "freeze_score": "test_rank_dependent",
                                       "freeze_layers": 2, "freeze_probe_steps": 1},
}
# The negative control needs a policy the worker applies by hand before the wrap.
DRIFT_CONTROL_POLICIES = [name for name in DYNAMIC_POLICIES if name.startswith("test_")]
CHECKPOINTING = {"plain": {}, "checkpointing": {"gradient_checkpointing": True}}
FP32_BYTES = 4


def _static_results():
    runs = [
        {"label": f"{policy}/{mode}", "policy": options, "training": training}
        for mode, training in CHECKPOINTING.items()
        for policy, options in STATIC_POLICIES.items()
    ]
    return ddp_launch.shared_launch("static", runs)


def _dynamic_and_order_results():
    runs = []
    for policy, options in DYNAMIC_POLICIES.items():
        driven = {"reapply_each_step": options["freeze_strategy"].startswith("test_")}
        runs += [
            {"label": f"{policy}/plain", "policy": options, **driven},
            {"label": f"{policy}/checkpointing+find_unused", "policy": options, **driven,
             "training": {"gradient_checkpointing": True, "ddp_find_unused_parameters": True}},
            {"label": f"{policy}/checkpointing", "policy": options, **driven, "expect_error": True,
             "training": {"gradient_checkpointing": True}},
        ]
        if policy in DRIFT_CONTROL_POLICIES:
            runs.append({"label": f"{policy}/applied-before-wrap", "policy": options, **driven,
                         "force_apply_before_wrap": True})
    for policy, options in ROTATING_POLICIES.items():
        runs += [
            {"label": f"{policy}/plain", "policy": options, "training": {"max_steps": 4}},
            {"label": f"{policy}/checkpointing+find_unused", "policy": options,
             "training": {"max_steps": 4, "gradient_checkpointing": True, "ddp_find_unused_parameters": True}},
        ]
    runs += [
        {"label": "everything-frozen", "expect_error": True,
         "policy": {"freeze_strategy": "pattern", "freeze_patterns": [".*"]}},
        {"label": "added-after-init", "expect_error": True, "add_callback_late": True,
         "policy": STATIC_POLICIES["bottom"]},
        {"label": "unfrozen-between-init-and-train", "expect_error": True, "unfreeze_after_init": True,
         "policy": STATIC_POLICIES["bottom"]},
        {"label": "resumed-with-restored-callback", "resume": True, "policy": STATIC_POLICIES["bottom"]},
        {"label": "ranks-disagree", "expect_error": True, "policy": {"freeze_strategy": "test_rank_dependent"}},
    ]
    # This launch goes through `accelerate launch --config_file configs/accelerate/ddp.yaml`, the command of docs/multi-gpu.md.
    return ddp_launch.shared_launch("dynamic-and-orders", runs, launcher="accelerate")


def _expected_frozen(options):
    return LayerFreezer(build("bert", num_hidden_layers=4), **options).decide().frozen


def _both_ok(ranks, label):
    results = [rank[label] for rank in ranks]
    for rank, result in enumerate(results):
        assert result["status"] == "ok", f"rank {rank}: {result.get('traceback', result)}"
    return results


def _drifted(results):
    return sorted(name for name, value in results[0]["digests"].items() if results[1]["digests"][name] != value)


@pytest.mark.parametrize("mode", CHECKPOINTING)
@pytest.mark.parametrize("policy", STATIC_POLICIES)
def test_static_policy_trains_identically_on_every_rank(policy, mode):
    results = _both_ok(_static_results(), f"{policy}/{mode}")
    first = results[0]
    assert first["wrapped"] == "DistributedDataParallel"
    # The Trainer's default flips with gradient checkpointing; static policies must work either way.
    assert first["find_unused_parameters"] is (mode == "plain")
    assert not _drifted(results), f"parameters differ between ranks: {_drifted(results)}"
    expected = _expected_frozen(STATIC_POLICIES[policy])
    assert set(first["frozen"]) == expected
    assert not set(first["changed"]) & expected, "a frozen parameter changed"
    trainable = set(first["digests"]) - expected
    assert trainable <= set(first["changed"]), f"trainable parameters that never moved: {trainable - set(first['changed'])}"


@pytest.mark.parametrize("policy", STATIC_POLICIES)
def test_static_policy_all_reduces_only_trainable_parameters(policy):
    for mode in CHECKPOINTING:
        result = _both_ok(_static_results(), f"{policy}/{mode}")[0]
        assert len(result["bytes_per_step"]) == 3
        # DDP registered the trainable parameters only: each step all-reduces exactly their fp32 gradients.
        assert set(result["bytes_per_step"]) == {FP32_BYTES * result["trainable_params"]}, mode
        if policy != "none":
            assert result["trainable_params"] < result["total_params"]
            assert result["bytes_per_step"][0] < FP32_BYTES * result["total_params"]


@pytest.mark.parametrize("mode", ["plain", "checkpointing+find_unused"])
@pytest.mark.parametrize("policy", DYNAMIC_POLICIES)
def test_dynamic_policy_changes_trainable_set_identically_on_every_rank(policy, mode):
    results = _both_ok(_dynamic_and_order_results(), f"{policy}/{mode}")
    first = results[0]
    assert first["find_unused_parameters"] is True
    assert not _drifted(results), f"parameters differ between ranks: {_drifted(results)}"
    at_start, at_end = set(first["frozen_at_start"]), set(first["frozen"])
    assert not set(first["changed"]) & (at_start & at_end), "a parameter frozen for the whole run changed"
    unfrozen_mid_run = at_start - at_end
    assert unfrozen_mid_run and unfrozen_mid_run <= set(first["changed"]), "layers unfrozen mid-run did not train"
    # Every parameter the policy may train stayed registered with DDP, and its communication hook
    # (hf_freeze.apply.ddp_reduce) all-reduces only the gradients of what trains at each step.
    assert len(first["bytes_per_step"]) == len(first["steps"])
    assert first["bytes_per_step"] == [FP32_BYTES * step["trainable_numel"] for step in first["steps"]]
    assert len(set(first["bytes_per_step"])) > 1  # the bytes follow the trainable set


@pytest.mark.parametrize("mode", ["plain", "checkpointing+find_unused"])
@pytest.mark.parametrize("policy", ROTATING_POLICIES)
def test_rotating_and_adaptive_policies_follow_their_frozen_set_on_every_rank(policy, mode):
    results = _both_ok(_dynamic_and_order_results(), f"{policy}/{mode}")
    first, second = results
    assert not _drifted(results), f"parameters differ between ranks: {_drifted(results)}"
    assert first["steps"] == second["steps"]  # the same frozen set at every step, the same parameters moved
    assert first["selections"] == second["selections"]  # adaptive: the same scores, the same layers
    if policy == "adaptive_snr":  # read off the weights: selected at step 0, re-selected at step 2
        assert [selection["step"] for selection in first["selections"]] == [0, 2]
    else:
        assert len({tuple(step["frozen"]) for step in first["steps"]}) > 1, "the frozen set never changed"
    # An adaptive probe measures every layer and withholds its optimizer steps (`freeze_probe_mode: measure`), the
    # last one too, which ends with training before it selects anything.
    options = ROTATING_POLICIES[policy]
    probe, every = options.get("freeze_probe_steps"), options.get("freeze_reselect_every") or len(first["steps"])
    probing = {step for step in range(len(first["steps"])) if probe and step % every < probe}
    for index, step in enumerate(first["steps"]):
        assert not set(step["frozen"]) & set(step["changed"]), f"step {index}: a frozen parameter changed"
        moved_layers = {name.split(".")[3] for name in step["changed"] if name.startswith("bert.encoder.layer.")}
        frozen_layers = {name.split(".")[3] for name in step["frozen"] if name.startswith("bert.encoder.layer.")}
        trained = set() if index in probing else {"0", "1", "2", "3"} - frozen_layers
        assert moved_layers == trained, f"step {index}: a trainable layer did not train, or a probe's did"
    if policy.startswith("adaptive"):
        assert first["selections"], "no selection was made"
    if policy == "adaptive_rank_dependent_scores":
        # Rank 0 measured [0, 1, 2, 3], rank 1 [1, 2, 3, 0]: both froze rank 0's lowest two.
        assert first["selections"][0]["scores"] == [0.0, 1.0, 2.0, 3.0]
        assert first["selections"][0]["frozen_layers"] == [0, 1]


@pytest.mark.parametrize("policy", DRIFT_CONTROL_POLICIES)
def test_dynamic_policy_applied_before_the_wrap_lets_ranks_drift(policy):
    """The negative control: what the deferral in `applies_before_wrap` prevents, and proof the check can see it."""
    results = _both_ok(_dynamic_and_order_results(), f"{policy}/applied-before-wrap")
    unfrozen_mid_run = set(results[0]["frozen_at_start"]) - set(results[0]["frozen"])
    assert unfrozen_mid_run and set(_drifted(results)) >= unfrozen_mid_run


@pytest.mark.parametrize("policy", DYNAMIC_POLICIES)
def test_dynamic_policy_with_checkpointing_defaults_is_refused_before_training(policy):
    for result in [rank[f"{policy}/checkpointing"] for rank in _dynamic_and_order_results()]:
        assert result["error_type"] == "FreezeConfigError"
        assert "ddp_find_unused_parameters: true" in result["error"] and "gradient checkpointing" in result["error"]
        assert "on_init_end" in result["traceback"]  # refused inside Trainer.__init__, before any step


def test_policy_freezing_everything_is_refused():
    for result in [rank["everything-frozen"] for rank in _dynamic_and_order_results()]:
        assert result["error_type"] == "FreezeConfigError"
        assert "freezes every parameter" in result["error"] and "on_init_end" in result["traceback"]


def test_callback_added_after_the_trainer_is_refused_under_ddp():
    for result in [rank["added-after-init"] for rank in _dynamic_and_order_results()]:
        assert result["error_type"] == "FreezeConfigError"
        assert "after DDP over 2 processes wrapped the model" in result["error"]
        assert "callbacks=[FreezeCallback(...)]" in result["error"]


def test_requires_grad_changed_between_init_and_train_is_refused_under_ddp():
    """DDP wrapped what the user left trainable; re-freezing now would break its gradient reduction."""
    for result in [rank["unfrozen-between-init-and-train"] for rank in _dynamic_and_order_results()]:
        assert result["error_type"] == "FreezeConfigError"
        assert "would change `requires_grad` after DDP" in result["error"] and "on_train_begin" in result["traceback"]


def test_resume_with_restored_callback_state_keeps_ranks_identical():
    """The restored callback is a new instance that never saw on_init_end: it must not refuse nor re-freeze."""
    results = _both_ok(_dynamic_and_order_results(), "resumed-with-restored-callback")
    assert not _drifted(results)
    expected = _expected_frozen(STATIC_POLICIES["bottom"])
    assert set(results[0]["frozen"]) == expected
    assert not set(results[0]["changed"]) & expected
    assert set(results[0]["bytes_per_step"]) == {FP32_BYTES * results[0]["trainable_params"]}


def test_ranks_that_freeze_different_parameters_are_refused_before_training():
    """DDP itself only notices a disagreement in what it registers; a policy applied after the wrap needs this check."""
    for result in [rank["ranks-disagree"] for rank in _dynamic_and_order_results()]:
        assert result["error_type"] == "FreezeConfigError"
        assert "froze different parameters" in result["error"] and "on_train_begin" in result["traceback"]


# A vision-language model trained on text alone: the vision tower and projector get no gradients. DDP without
# unused-parameter detection (the Trainer's default with gradient checkpointing, or set by the user) then stops.
TEXT_ONLY_VLM = {"model": "llava", "training": {"ddp_find_unused_parameters": False}}


def _text_only_vlm_results():
    return ddp_launch.shared_launch("text-only-vlm", [
        {"label": "no-option", **TEXT_ONLY_VLM, "policy": {"freeze_strategy": "none"}, "expect_error": True},
        {"label": "check-off", **TEXT_ONLY_VLM, "policy": {"freeze_strategy": "none", "freeze_unused_modalities": False},
         "expect_error": True},
        {"label": "freeze-unused", **TEXT_ONLY_VLM,
         "policy": {"freeze_strategy": "none", "freeze_unused_modalities": True}},
    ])


def test_text_only_vlm_under_ddp_is_refused_before_training_naming_the_option():
    for result in [rank["no-option"] for rank in _text_only_vlm_results()]:
        assert result["status"] == "error" and result["error_type"] == "FreezeConfigError", result
        assert "`freeze_unused_modalities: true`" in result["error"] and "vision part" in result["error"]
        assert "Trainer.train" in result["traceback"] or "on_train_begin" in result["traceback"]


def test_the_refusal_is_real_ddp_fails_without_it():
    # The negative control: with the check turned off, DDP itself fails on the parameters text never reaches.
    for result in [rank["check-off"] for rank in _text_only_vlm_results()]:
        assert result["status"] == "error" and result["error_type"] != "FreezeConfigError", result
        assert "reduction" in result["error"] or "unused" in result["error"], result["error"]


def test_freeze_unused_modalities_trains_a_text_only_vlm_under_ddp():
    results = _both_ok(_text_only_vlm_results(), "freeze-unused")
    first = results[0]
    assert first["wrapped"] == "DistributedDataParallel" and first["find_unused_parameters"] is False
    assert not _drifted(results)
    unused = {n for n in first["digests"] if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    assert set(first["frozen"]) == unused and not set(first["changed"]) & unused
    assert any(name.startswith("model.language_model.layers.") for name in first["changed"])
    # DDP all-reduces only the language model's gradients.
    language = first["trainable_params"] * FP32_BYTES
    assert all(size == language for size in first["bytes_per_step"]), (first["bytes_per_step"], language)
