"""A real Trainer run on a tiny LLaVA with pixel inputs: the parts the policy freezes stay bit-identical."""

import torch
from tiny import snapshot, trainer_for, training_kwargs
from transformers import AutoConfig, AutoModelForImageTextToText

from hf_freeze import FreezeCallback, FreezeTrainingArguments

_IMAGE_TOKEN = 127
_PATCHES = (32 // 8) ** 2  # image tokens per image: one per patch (the CLS feature is dropped)


def tiny_llava():
    config = AutoConfig.for_model(
        "llava", image_token_index=_IMAGE_TOKEN,
        text_config=dict(model_type="llama", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=128, max_position_embeddings=64),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=32, patch_size=8, projection_dim=32),
    )
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config)


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
