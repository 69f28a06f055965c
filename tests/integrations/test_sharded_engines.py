"""Every policy on every engine: DDP, FSDP2 and DeepSpeed ZeRO-2/3, 2 CPU processes (gloo), a real `Trainer` +
`FreezeCallback` on a tiny Llama.

One launch per engine runs every policy (process start-up dominates; `ddp_launch.shared_launch` runs each launch once
per test session). For each engine × policy: the run trains with `freeze_health_check: raise` (a false health warning
would stop it), the ranks end identical, nothing frozen in a step changes in that step, the frozen set changes at the
steps DDP's does and the result equals DDP's to float tolerance; an interrupted run resumed from its checkpoint on a
new model equals the uninterrupted one; a frozen parameter changed behind hf_freeze's back is reported.

FSDP2 runs through the Trainer's real FSDP2 path (accelerate's plugin, `fully_shard` over gloo), which accelerate
only takes on GPUs: `tests/distributed/engines.py` forces it on CPU. DeepSpeed runs on its CPU accelerator.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import ddp_launch  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs torchrun with gloo on POSIX")

RAISE = {"freeze_health_check": "raise"}
POLICIES = {
    "none": {"freeze_strategy": "none"},
    "bottom": {"freeze_strategy": "bottom", "freeze_layers": 0.5},
    "progressive": {"freeze_strategy": "progressive", "freeze_schedule_unit": "step", "freeze_start": 0.25,
                    "freeze_level": 0.5},
    "gradual_unfreezing": {"freeze_strategy": "gradual_unfreezing", "freeze_schedule_unit": "step",
                           "freeze_schedule_every": 1, "freeze_unfreeze_layers": 1},
    "gradual_unfreezing_lr_factor": {"freeze_strategy": "gradual_unfreezing", "freeze_schedule_unit": "step",
                                     "freeze_schedule_every": 1, "freeze_unfreeze_layers": 1,
                                     "freeze_unfreeze_lr_factor": 0.5},
    "staged": {"freeze_strategy": "staged", "freeze_schedule_unit": "step", "freeze_stages": {"0": 3, "2": 1}},
    "lisa": {"freeze_strategy": "lisa", "freeze_active_layers": 1, "freeze_schedule_every": 1},
    "badam": {"freeze_strategy": "badam", "freeze_schedule_every": 1},
    "adaptive": {"freeze_strategy": "adaptive", "freeze_layers": 2, "freeze_probe_steps": 1},
    # A probe that trains and scores the weights: nothing acts between backward and the step (DeepSpeed ZeRO-2 too).
    "adaptive_probe_trains": {"freeze_strategy": "adaptive", "freeze_layers": 2, "freeze_probe_steps": 1,
                              "freeze_probe_mode": "train", "freeze_score": "weight_change"},
    # LoRA on the frozen half (issue 30): the adapter the main process saves reloads with plain peft.
    "bottom_lora": {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_lora": {"r": 4, "alpha": 8, "on": "frozen"}},
    # Learning rates per layer (issue 30) over a schedule: the groups reach every engine's optimizer.
    "lisa_layer_lr_decay": {"freeze_strategy": "lisa", "freeze_active_layers": 1, "freeze_schedule_every": 1,
                            "freeze_layer_lr_decay": 0.5},
}
DYNAMIC = [name for name in POLICIES if name not in ("none", "bottom", "bottom_lora")]
# What DeepSpeed runs inside `backward` (the optimizer step) leaves no room for what acts around the step: refused.
REFUSED = {(engine, policy): fragment for engine in ("zero2", "zero3")
           for policy, fragment in [("adaptive", "probe"), ("gradual_unfreezing_lr_factor", "freeze_unfreeze_lr_factor")]}
REFUSED[("zero3", "adaptive_probe_trains")] = "ZeRO-3 partitions"
REFUSED.update({(engine, "bottom_lora"): "`freeze_lora` cannot run under" for engine in ("fsdp2", "zero3")})
RESUMED = ["none", "bottom", "gradual_unfreezing", "lisa", "adaptive"]  # interrupted after step 2, resumed on a new model
STEPS = 4


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or it cannot start here
        return False
    return True


ENGINES = ["ddp", "fsdp2"] + (["zero2", "zero3"] if _deepspeed_available() else [])


def _results(engine: str):
    base = {"model": "llama", "engine": engine, "training": {"max_steps": STEPS}}
    runs = [{"label": name, **base, "policy": {**options, **RAISE}, "expect_error": (engine, name) in REFUSED}
            for name, options in POLICIES.items()]
    runs += [{"label": f"{name}/resumed", **base, "policy": {**POLICIES[name], **RAISE}, "interrupt_at": 2}
             for name in RESUMED if (engine, name) not in REFUSED]
    runs.append({"label": "planted", **base, "policy": POLICIES["bottom"], "plant_frozen_change": True})
    return ddp_launch.shared_launch(f"engines-{engine}", runs, timeout=600)


def _ok(engine: str, label: str):
    results = [rank[label] for rank in _results(engine)]
    for rank, result in enumerate(results):
        assert result["status"] == "ok", f"{engine}, rank {rank}: {result.get('traceback', result)}"
    return results


def _close(expected, actual, tolerance=1e-5):
    """Fingerprints (sum, sum of squares, weighted sum) equal to ``tolerance`` relative to the tensor's size."""
    scale = math.sqrt(expected[1]) or 1.0
    return (abs(expected[0] - actual[0]) <= tolerance * scale and abs(expected[1] - actual[1]) <= tolerance * expected[1]
            and abs(expected[2] - actual[2]) <= tolerance * scale)


def _different(expected: dict, actual: dict):
    return sorted(name for name in expected if not _close(expected[name], actual[name]))


def _cells(engines):
    return [(engine, policy) for engine in engines for policy in POLICIES if (engine, policy) not in REFUSED]


@pytest.mark.parametrize("engine, policy", _cells(ENGINES))
def test_every_policy_trains_on_every_engine_without_moving_what_is_frozen(engine, policy):
    first, second = _ok(engine, policy)
    assert first["engine"].startswith({"ddp": "DistributedDataParallel", "fsdp2": "FSDP", "zero2": "DeepSpeedEngine",
                                       "zero3": "DeepSpeedEngine"}[engine]), first["engine"]
    drifted = sorted(name for name, value in first["digests"].items() if second["digests"][name] != value)
    assert not drifted, f"the ranks differ: {drifted}"
    assert first["steps"] == second["steps"]
    assert len(first["steps"]) == STEPS
    for index, step in enumerate(first["steps"]):
        assert not set(step["frozen"]) & set(step["changed"]), f"step {index}: a frozen parameter changed"
    if policy in DYNAMIC:
        assert len({tuple(step["frozen"]) for step in first["steps"]}) > 1, "the frozen set never changed"
    assert not first["health_warnings"]
    if "freeze_lora" in POLICIES[policy]:
        assert first["adapter_reloads"] is True


@pytest.mark.parametrize("engine, policy", _cells([engine for engine in ENGINES if engine != "ddp"]))
def test_every_engine_trains_what_ddp_trains(engine, policy):
    """The same frozen set at every step, the same parameters moved, the same selections, the same weights (to float
    tolerance: the engines reduce gradients in their own order)."""
    (ddp, _), (other, _) = _ok("ddp", policy), _ok(engine, policy)
    assert other["steps"] == ddp["steps"]
    assert [s["frozen_layers"] for s in other["selections"]] == [s["frozen_layers"] for s in ddp["selections"]]
    assert not _different(ddp["fingerprints"], other["fingerprints"])
    # The learning rate of every named group at the end (DeepSpeed's block groups repeat them, block by block).
    rates = {name: (rate, base) for name, rate, base, _ in ddp["group_rates"] if name}
    assert {name: (rate, base) for name, rate, base, _ in other["group_rates"] if name} == rates
    if "layer_lr_decay" in policy:
        assert rates["layer.0"][1] == pytest.approx(rates["layer.3"][1] * 0.5 ** 3)
    # Optimizer state for what trains at the last step only, sharded: each of the 2 processes holds half of DDP's
    # (ZeRO pads its partitions a little).
    assert ddp["optimizer_state_bytes"] == 2 * 4 * ddp["steps"][-1]["trainable_numel"]
    assert abs(other["optimizer_state_bytes"] - ddp["optimizer_state_bytes"] / 2) <= 0.02 * ddp["optimizer_state_bytes"]
    # Gradients before each step: only what trains then (FSDP2's shards: half of DDP's; ZeRO keeps its own buffers).
    if engine == "fsdp2":
        for step, ddp_bytes, fsdp_bytes in zip(ddp["steps"], ddp["gradient_bytes_per_step"], other["gradient_bytes_per_step"]):
            assert ddp_bytes in (0, 4 * step["trainable_numel"])  # 0: a probe step, its gradients withheld
            assert abs(fsdp_bytes - ddp_bytes / 2) <= 0.02 * max(ddp_bytes, 1)


@pytest.mark.parametrize("engine, policy", [cell for cell in _cells(ENGINES) if cell[1] in RESUMED])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(engine, policy):
    (whole, _), (resumed, _) = _ok(engine, policy), _ok(engine, f"{policy}/resumed")
    assert resumed["max_step"] == STEPS
    assert resumed["steps"] == whole["steps"][2:]  # the resumed steps froze and moved the same parameters
    if engine != "fsdp2":
        assert resumed["digests"] == whole["digests"]  # bit-identical
    else:
        # FSDP2 through accelerate 1.16 does not resume bit-identically even with nothing frozen ("none" differs by a
        # few float32 roundings, measured): the engine's resume, not the policy's. Equal to float tolerance.
        assert not _different(whole["fingerprints"], resumed["fingerprints"])


@pytest.mark.parametrize("engine", ENGINES)
def test_the_health_check_sees_a_frozen_parameter_changed_on_every_engine(engine):
    first, _ = _ok(engine, "planted")
    assert any("frozen parameter(s) changed in this step" in warning and "model.embed_tokens.weight" in warning
               for warning in first["health_warnings"]), first["health_warnings"]


@pytest.mark.parametrize("engine, policy", [cell for cell in REFUSED if cell[0] in ENGINES])
def test_what_an_engine_cannot_run_is_refused_before_training_with_the_fix(engine, policy):
    for result in [rank[policy] for rank in _results(engine)]:
        assert result["status"] == "error" and result["error_type"] == "FreezeConfigError", result
        assert REFUSED[(engine, policy)] in result["error"]
        assert ("FSDP2" if policy != "bottom_lora" else "ZeRO-1/2") in result["error"]
        assert "on_init_end" in result["traceback"]  # in Trainer.__init__, before any step


# -- a plain loop with LayerFreezer (docs/without-trainer.md) under FSDP2 and DDP ------------------------------------


def _loop_results():
    return ddp_launch.shared_launch("engines-plain-loop", [], timeout=600, worker=ddp_launch.LOOP_WORKER)


@pytest.mark.parametrize("policy", ["lisa", "adaptive", "bottom"])
def test_a_plain_loop_under_fsdp2_trains_what_it_trains_under_ddp(policy):
    ranks = _loop_results()
    for rank, results in enumerate(ranks):
        for engine in ("ddp", "fsdp2"):
            assert results[f"{engine}/{policy}"]["status"] == "ok", f"rank {rank}: {results[f'{engine}/{policy}']}"
    ddp, fsdp2 = ranks[0][f"ddp/{policy}"], ranks[0][f"fsdp2/{policy}"]
    assert fsdp2["steps"] == ddp["steps"] == ranks[1][f"fsdp2/{policy}"]["steps"]
    for index, step in enumerate(fsdp2["steps"]):
        assert not set(step["frozen"]) & set(step["changed"]), f"step {index}: a frozen parameter changed"
    assert [s["frozen_layers"] for s in fsdp2["selections"]] == [s["frozen_layers"] for s in ddp["selections"]]
    assert not _different(ddp["fingerprints"], fsdp2["fingerprints"])
    assert fsdp2["health_checks"] >= 1  # the check ran (with `raise`: it found nothing)
    # Adam's two moments for what trains at the last step, sharded: each rank holds half of DDP's.
    assert ddp["optimizer_state_bytes"] == 2 * 4 * ddp["trainable_params"]
    assert abs(fsdp2["optimizer_state_bytes"] - ddp["optimizer_state_bytes"] / 2) <= 0.05 * ddp["optimizer_state_bytes"]


# -- the support table of docs/multi-gpu.md, generated from the matrix these tests prove --------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "multi-gpu.md"
TABLE_BEGIN, TABLE_END = "<!-- support-table: generated by python tests/integrations/test_sharded_engines.py -->", "<!-- /support-table -->"
ENGINE_NAMES = {"ddp": "DDP", "fsdp2": "FSDP2 (`fsdp_version: 2`)", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
COLUMNS = {  # column -> the policies of the matrix it stands for
    "static (`bottom`, ...)": ["none", "bottom"],
    "schedules (progressive, gradual unfreezing, staged)": ["progressive", "gradual_unfreezing", "staged"],
    "rotation (LISA, BAdam)": ["lisa", "badam"],
    "adaptive (`freeze_probe_mode: measure`, gradient scores)": ["adaptive"],
    "adaptive (`freeze_probe_mode: train`, weight scores)": ["adaptive_probe_trains"],
    "`freeze_unfreeze_lr_factor`": ["gradual_unfreezing_lr_factor"],
    "rates per layer (`freeze_layer_lr_decay`)": ["lisa_layer_lr_decay"],
    "LoRA on the frozen layers (`freeze_lora`)": ["bottom_lora"],
}


_WHY = {  # a refusal's fragment (what the test finds in the message) -> the table's short reason
    "probe": "the step runs inside `backward`", "freeze_unfreeze_lr_factor": "the step runs inside `backward`",
    "ZeRO-3 partitions": "the probe reads whole weights, ZeRO-3 partitions them",
    "`freeze_lora` cannot run under": "parameters sharded at saving",
}


def support_table() -> str:
    """The table of docs/multi-gpu.md: a cell reads "yes" when every policy it stands for is trained by the tests above
    on that engine (ranks agree, nothing frozen moves, DDP's result, resume), else the refusal the tests check."""
    from hf_freeze.integrations.backends import DistributedSetup
    from hf_freeze.integrations.support import PolicyFacts, check_support

    lines = ["| engine | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for engine in ("ddp", "fsdp2", "zero2", "zero3"):
        cells = []
        for policies in COLUMNS.values():
            refused = [policy for policy in policies if (engine, policy) in REFUSED]
            cells.append(f"refused ({_WHY[REFUSED[(engine, refused[0])]]})" if refused else "yes")
        lines.append(f"| {ENGINE_NAMES[engine]} | " + " | ".join(cells) + " |")
    fsdp1 = DistributedSetup("fsdp", world_size=2, fsdp_version=1, fsdp_use_orig_params=True)
    changing = check_support(fsdp1, PolicyFacts("lisa", dynamic=True, trainable=2, frozen=1))
    assert changing and check_support(fsdp1, PolicyFacts("bottom", dynamic=False, trainable=2, frozen=1)) is None
    lines.append("| FSDP1 (not run here: it needs an accelerator on torch 2.13) | yes (see below) | refused | refused | "
                 "refused | refused | refused | not tested | refused |")
    return "\n".join(lines)


def _docs_block() -> str:
    text = DOCS.read_text()
    return text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN):text.index(TABLE_END)].strip()


def test_the_support_table_in_the_docs_is_the_tested_matrix():
    assert set(ENGINES) >= {"ddp", "fsdp2"}
    assert sorted(policy for policies in COLUMNS.values() for policy in policies) == sorted(POLICIES)
    assert _docs_block() == support_table(), "run: python tests/integrations/test_sharded_engines.py"


if __name__ == "__main__":
    text = DOCS.read_text()
    start, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    DOCS.write_text(text[:start] + "\n" + support_table() + "\n" + text[end:])
    print(f"wrote the support table of {DOCS}")
