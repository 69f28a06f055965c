"""A real Trainer run on a tiny LLaVA with pixel inputs: the parts the policy freezes stay bit-identical."""

import torch
from tiny import snapshot, tiny_llava, trainer_for, training_kwargs

from hf_freeze import FreezeCallback, FreezeTrainingArguments

_IMAGE_TOKEN = 127
_PATCHES = (32 // 8) ** 2  # image tokens per image: one per patch (the CLS feature is dropped)


class ImageTextData(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        text = torch.randint(1, _IMAGE_TOKEN - 1, (8,), generator=generator)
        input_ids = torch.cat([torch.full((_PATCHES,), _IMAGE_TOKEN), text])
        labels = input_ids.clone()
        labels[:_PATCHES] = -100
        return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.randn(3, 32, 32, generator=generator)}


def test_llava_llama_factory_trainer_run(tmp_path):
    model = tiny_llava()
    before = snapshot(model)
    args = FreezeTrainingArguments(
        **training_kwargs(tmp_path), freeze_strategy="llama_factory", freeze_trainable_layers=-1,
        freeze_multi_modal_projector=False,
    )
    trainer_for(model, args, [FreezeCallback()], data=ImageTextData()).train()
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {
        name for name in before
        if name.startswith("model.language_model.layers.0.") or name.startswith("model.multi_modal_projector.")
    }
    assert changed == trainable  # the vision tower, the other language layers, the embeddings and head: untouched


def _changed(before, model):
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def test_text_only_training_says_what_freeze_unused_modalities_would_save(tmp_path, caplog):
    import logging

    model = tiny_llava()
    before = snapshot(model)
    args = FreezeTrainingArguments(**training_kwargs(tmp_path), freeze_strategy="none")
    logging.getLogger("hf_freeze").addHandler(caplog.handler)
    try:
        trainer_for(model, args, [FreezeCallback()]).train()  # text only: input_ids and labels
    finally:
        logging.getLogger("hf_freeze").removeHandler(caplog.handler)
    notes = [r.getMessage() for r in caplog.records if "freeze_unused_modalities" in r.getMessage()]
    assert len(notes) == 1 and "vision part" in notes[0] and "projector part" in notes[0]
    # What the line says is true: the vision tower and projector got no update from text-only batches.
    assert not any(name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for name in _changed(before, model))


def test_freeze_unused_modalities_freezes_the_encoder_and_projector(tmp_path):
    model = tiny_llava()
    before = snapshot(model)
    args = FreezeTrainingArguments(**training_kwargs(tmp_path), freeze_strategy="none", freeze_unused_modalities=True)
    trainer = trainer_for(model, args, [FreezeCallback()])
    trainer.train()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in before if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    # The optimizer holds only the language model's parameters, and the language model trained.
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all((id(p) in in_optimizer) == p.requires_grad for p in model.parameters())
    assert _changed(before, model) and all(n.startswith(("model.language_model.", "lm_head.")) for n in _changed(before, model))


class Gemma3ImageTextData(torch.utils.data.Dataset):
    """Gemma 3 (image-text): 4 image tokens per 32 x 32 image (the projector pools 16 patches to 4)."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        input_ids = torch.cat([torch.full((4,), _IMAGE_TOKEN), torch.randint(1, 120, (8,), generator=generator)])
        labels = input_ids.clone()
        labels[:4] = -100
        return {
            "input_ids": input_ids, "labels": labels, "token_type_ids": (input_ids == _IMAGE_TOKEN).long(),
            "pixel_values": torch.randn(3, 32, 32, generator=generator),
        }


def test_gemma3_bottom_trainer_run_with_images(tmp_path):
    # A second vision-language model, with `bottom`: the vision tower and projector follow the frozen embeddings,
    # the language model's first layer freezes, the rest trains.
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(
        "gemma3", mm_tokens_per_image=4, image_token_index=_IMAGE_TOKEN, boi_token_index=125, eoi_token_index=126,
        text_config=dict(model_type="gemma3_text", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=128, head_dim=8, sliding_window=16),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    before = snapshot(model)
    args = FreezeTrainingArguments(**training_kwargs(tmp_path), freeze_strategy="bottom", freeze_layers=1)
    trainer_for(model, args, [FreezeCallback()], data=Gemma3ImageTextData()).train()
    changed = _changed(before, model)
    frozen_prefixes = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.embed_tokens.",
                       "model.language_model.layers.0.")
    assert not any(name.startswith(frozen_prefixes) for name in changed)
    trains = [name for name in before if name.startswith(("model.language_model.layers.1.", "model.language_model.layers.2."))]
    assert set(trains) <= changed
