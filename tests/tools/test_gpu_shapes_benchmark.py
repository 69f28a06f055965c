"""benchmarks/gpu_shapes.py, the GPU benchmark of issue 28, run on CPU with a tiny Llama: it measures, skips what
this installation cannot run with the reason, writes its JSON and table, and leaves transformers' Llama code as it
found it after a configuration that patches it (Liger does)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu_shapes = pytest.importorskip("gpu_shapes")
from gpu_shapes_report import with_ratios  # noqa: E402


def test_tiny_run_on_cpu_measures_skips_and_writes_the_table(tmp_path):
    configs = ["full", "bottom50_unchunked", "bottom50_hand", "full_liger", "bottom50_bf16frozen", "adaptive50"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_shapes.py", "--device", "cpu", "--tiny", "--warmup", "1", "--steps", "2",
         "--configs", *configs, "--output", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_shapes.json").read_text())
    assert {"device", "versions", "date", "command", "settings", "plans", "results"} <= set(report)
    assert report["settings"]["shape"] == "tiny" and report["versions"]["transformers"]
    rows = {row["name"]: row for row in report["results"]}
    assert list(rows) == configs
    for name in ("full", "bottom50_unchunked", "bottom50_hand"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert len(row["step_ms_all"]) == 2 and row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
        assert {"step_ratio", "peak_ratio", "peak_bytes", "trainable_params", "total_params", "estimate_bytes"} <= set(row)
    assert rows["full"]["step_ratio"] == 1.0
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    # By hand freezes what hf_freeze's bottom 50% freezes: the embeddings (tied to the head) and the bottom layers.
    assert rows["bottom50_hand"]["trainable_params"] == rows["bottom50_unchunked"]["trainable_params"]
    assert rows["bottom50_unchunked"]["trainable_params"] < rows["full"]["trainable_params"] / 2
    assert rows["full_liger"]["status"] == "skipped" and "CUDA" in rows["full_liger"]["message"]
    # `freeze_frozen_dtype` is skipped by an hf_freeze that does not know it, measured by one that does.
    assert rows["bottom50_bf16frozen"]["status"] in ("ok", "skipped")
    # The adaptive row's probe (3 steps) ends inside the run: it records the layers it chose, half of the 4.
    assert rows["adaptive50"]["status"] == "ok" and rows["adaptive50"]["selected_at_step"] == 3
    assert len(rows["adaptive50"]["selected_layers"]) == 2
    assert rows["adaptive50"]["trainable_params"] < rows["full"]["trainable_params"]
    plan = report["plans"]["llama-3.1-8b"]
    assert plan["full"] > plan["bottom50_unchunked"] > 0 and plan["full_ckpt"] < plan["full"]
    table = (tmp_path / "gpu_shapes.md").read_text()
    assert "python benchmarks/gpu_shapes.py --device cpu --tiny" in table
    assert "| full fine-tuning, Liger | skipped: liger-kernel needs a CUDA GPU" in table
    assert "| configuration | trainable | step | ratio | peak memory | ratio | plan estimate |" in result.stdout


def test_checkpointing_rows_are_compared_with_full_fine_tuning_with_checkpointing():
    def row(name, baseline, step, peak):
        return dict(name=name, baseline=baseline, status="ok", step_ms=step, peak_bytes=peak)

    rows = with_ratios([row("full", "full", 200.0, 40), row("full_ckpt", "full_ckpt", 250.0, 20),
                        row("bottom50_ckpt", "full_ckpt", 125.0, 10), row("bottom50", "full", 100.0, None),
                        dict(name="lora16", baseline="full", status="skipped", message="peft is not installed")])
    ratios = {r["name"]: (r["step_ratio"], r["peak_ratio"]) for r in rows}
    assert ratios == {"full": (1.0, 1.0), "full_ckpt": (1.0, 1.0), "bottom50_ckpt": (0.5, 0.5), "bottom50": (0.5, None),
                      "lora16": (None, None)}


def test_a_patch_of_transformers_llama_module_is_undone_after_the_configuration():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm
    with gpu_shapes.LlamaModulePatchesUndone():
        modeling_llama.LlamaRMSNorm = object  # what Liger does with its own RMSNorm
    assert modeling_llama.LlamaRMSNorm is original
