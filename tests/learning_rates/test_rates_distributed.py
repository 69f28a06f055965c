"""Learning rates per part and per layer under DDP (2 CPU processes, gloo, a real Trainer): every rank builds the
same groups at the same rates and ends with identical weights, a static policy, a schedule that unfreezes layers
mid-run, a resumed run and LoRA adapters on the frozen layers alike."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import ddp_launch  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork-free torchrun with gloo on POSIX")

DECAY = 0.8
RUNS = {
    "bottom": {"policy": {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_layer_lr_decay": DECAY,
                          "freeze_learning_rates": {"classifier": 5.0e-3}}},
    "gradual_unfreezing": {"policy": {"freeze_strategy": "gradual_unfreezing", "freeze_schedule_unit": "step",
                                      "freeze_schedule_every": 1, "freeze_layers": 4, "freeze_layer_lr_decay": DECAY},
                           "training": {"ddp_find_unused_parameters": True}},
    "resumed": {"resume": True, "policy": {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_layer_lr_decay": DECAY}},
    # Freeze + LoRA (`freeze_lora`): the adapters go on before the DDP wrap, which registers and all-reduces them.
    "lora": {"model": "llama", "policy": {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_lora": {"r": 4},
                                          "freeze_layer_lr_decay": DECAY}},
}


def _digest(tensor):  # as tests/distributed/train_worker.py digests a parameter
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def _results(label):
    ranks = ddp_launch.shared_launch("learning-rates", [{"label": label, **run} for label, run in RUNS.items()])
    results = [rank[label] for rank in ranks]
    for rank, result in enumerate(results):
        assert result["status"] == "ok", f"rank {rank}: {result.get('traceback', result)}"
    return results


@pytest.mark.parametrize("label", RUNS)
def test_every_rank_builds_the_same_groups_and_ends_identical(label):
    first, second = _results(label)
    assert first["wrapped"] == "DistributedDataParallel"
    assert first["group_rates"] == second["group_rates"]
    assert first["digests"] == second["digests"], "parameters differ between ranks"
    base = {name: initial for name, _, initial, _ in first["group_rates"]}
    learning_rate = 1e-3  # tests/tiny.py's training_kwargs
    for index in range(4):  # the 4 BERT layers: base x decay^(L-1-i), where they train
        if f"layer.{index}" in base:
            assert base[f"layer.{index}"] == learning_rate * DECAY ** (3 - index)
    if label == "bottom":
        assert base["classifier"] == 5.0e-3 and set(base) == {"base", "classifier", "layer.2", "layer.3"}
    if label == "lora":  # the adapters trained, at their layer's rate, identically on both ranks
        adapters = [name for name in first["digests"] if ".lora_B." in name]
        untrained = {_digest(torch.zeros(out_features, 4)) for out_features in (16, 32, 64)}  # lora_B starts at 0
        assert adapters and not {first["digests"][name] for name in adapters} & untrained
        assert {"layer.0", "layer.1"} <= set(base)
    if label == "resumed":  # trained 2 steps, saved, resumed in a new Trainer to step 4
        assert first["max_step"] == 4
    if label == "gradual_unfreezing":  # every layer has its group from the start, frozen or not
        assert {f"layer.{index}" for index in range(4)} <= set(base)
        unfrozen = set(first["frozen_at_start"]) - set(first["frozen"])
        assert unfrozen and unfrozen <= set(first["changed"])
