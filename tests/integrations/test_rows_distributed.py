"""Trainable rows under two CPU processes (torchrun, gloo, DDP, a real Trainer): both ranks end identical, the
frozen rows stay bit-identical, and DDP all-reduces the trainable rows' gradients only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import ddp_launch  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork-free torchrun with gloo on POSIX")

HIDDEN, NEW_TOKENS, FP32_BYTES = 32, 8, 4
RUNS = [
    # Only the new tokens' rows train (input embeddings and the untied LM head).
    {"label": "only_new_tokens", "model": "llama", "resize_to": 136,
     "policy": {"freeze_strategy": "pattern", "freeze_patterns": [".*"], "freeze_trainable_tokens": "new"}},
    # With the top layers, resumed halfway from a checkpoint.
    {"label": "tokens_resumed", "model": "llama", "resize_to": 136, "resume": True,
     "policy": {"freeze_strategy": "bottom", "freeze_layers": 2, "freeze_trainable_tokens": "new"}},
    {"label": "one_expert", "model": "qwen3_moe",
     "policy": {"freeze_strategy": "none", "freeze_trainable_experts": [1], "freeze_router": True}},
]


@pytest.fixture(scope="module")
def ranks():
    return ddp_launch.shared_launch("rows", RUNS)


@pytest.mark.parametrize("label", [run["label"] for run in RUNS])
def test_ranks_agree_and_frozen_rows_are_bit_identical(ranks, label):
    results = [rank[label] for rank in ranks]
    assert all(result["status"] == "ok" for result in results), [r.get("traceback") for r in results]
    assert results[0]["wrapped"] == "DistributedDataParallel"
    assert results[0]["digests"] == results[1]["digests"]
    assert results[0]["row_digests"] == results[1]["row_digests"] and results[0]["row_digests"]
    for result in results:
        assert result["frozen_rows_unchanged"] and all(result["frozen_rows_unchanged"].values())
        assert all(result["rows_changed"].values())


def test_ddp_all_reduces_only_the_trainable_rows(ranks):
    result = ranks[0]["only_new_tokens"]
    rows_bytes = 2 * NEW_TOKENS * HIDDEN * FP32_BYTES  # input embedding rows and LM head rows
    assert set(result["bytes_per_step"]) == {rows_bytes}
    full_bytes = 2 * 136 * HIDDEN * FP32_BYTES
    assert rows_bytes / full_bytes == pytest.approx(NEW_TOKENS / 136)
