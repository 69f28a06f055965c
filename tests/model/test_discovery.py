import pytest
import torch
from torch import nn

from hf_freeze import LayerDiscoveryError, discover_layout
from hf_freeze.model.layout import EMBEDDINGS, HEAD, LAYER

from tiny import ARCHITECTURES, build


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_is_split_into_ordered_blocks(model_type):
    model = build(model_type)
    layout = discover_layout(model)
    expected_layers = ARCHITECTURES[model_type][2]

    assert layout.num_layers == expected_layers
    assert [block.layer_index for block in layout.layers] == list(range(expected_layers))
    # Every parameter belongs to exactly one block (tied aliases are listed separately).
    names = layout.parameter_names
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    assert len(names) == len(set(names))
    # Forward order: input embeddings come before the first layer, the head after the last one.
    kinds = [block.kind for block in layout.blocks]
    first_layer, last_layer = kinds.index(LAYER), len(kinds) - 1 - kinds[::-1].index(LAYER)
    assert any(block.kind == EMBEDDINGS for block in layout.blocks[:first_layer])
    assert all(kind != HEAD for kind in kinds[: last_layer + 1])
    # The token embedding is recognised as the model's input embeddings.
    canonical = {id(p): n for n, p in model.named_parameters()}
    embedding_names = [canonical[id(p)] for p in model.get_input_embeddings().parameters()]
    assert embedding_names and set(embedding_names) <= set(layout.input_embedding_parameters)
    assert all(layout.block_of()[name].kind == EMBEDDINGS for name in embedding_names)


def test_layers_follow_forward_order_in_encoder_decoder_models():
    layout = discover_layout(build("t5"))
    assert [block.name for block in layout.layers] == [
        "encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"
    ]
    names = [block.name for block in layout.blocks]
    assert names.index("encoder.final_layer_norm") < names.index("decoder.block.0")

    bart = discover_layout(build("bart"))
    names = [block.name for block in bart.blocks]
    # BART registers layernorm_embedding after its layers, but it runs before them.
    assert names.index("model.encoder.layernorm_embedding") < names.index("model.encoder.layers.0")
    assert names.index("model.decoder.embed_positions") < names.index("model.decoder.layers.0")


def test_classifier_heads_and_norms_are_classified():
    bert = discover_layout(build("bert"))
    kinds = {block.name: block.kind for block in bert.blocks}
    assert kinds["bert.embeddings"] == "embeddings"
    assert kinds["classifier"] == "head"
    llama = discover_layout(build("llama"))
    kinds = {block.name: block.kind for block in llama.blocks}
    assert kinds == {**kinds, "model.embed_tokens": "embeddings", "model.norm": "norm", "lm_head": "head"}


def test_tied_embeddings_are_recognised_and_explained():
    layout = discover_layout(build("gpt2"))
    assert layout.tied_parameters == {"lm_head.weight": "transformer.wte.weight"}
    assert layout.output_embedding_parameters == ("transformer.wte.weight",)
    assert any("tied" in note and "lm_head.weight" in note for note in layout.notes)
    untied = discover_layout(build("llama"))
    assert untied.tied_parameters == {}
    assert untied.output_embedding_parameters == ("lm_head.weight",)


def test_weight_shared_albert_is_one_block_never_split():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    model = AlbertForSequenceClassification(
        AlbertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, embedding_size=16)
    )
    layout = discover_layout(model)
    assert [block.name for block in layout.layers] == ["albert.encoder.albert_layer_groups.0"]
    assert any("shared" in note and "6 positions" in note for note in layout.notes)


def test_a_module_list_repeating_one_module_is_one_block():
    shared = nn.Linear(4, 4)

    class Universal(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([shared] * 3)

    layout = discover_layout(Universal(), layer_paths=["layers"])
    assert [block.name for block in layout.layers] == ["layers.0"]
    assert any("3 positions" in note for note in layout.notes)


def test_plain_sequential_is_split_by_recursive_traversal():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 2))
    layout = discover_layout(net)
    assert [block.name for block in layout.layers] == ["0", "2.0", "2.1", "3"]
    assert all(block.kind == LAYER for block in layout.blocks)


class BasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.layer2 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def test_resnet_like_cnn_is_split_into_its_blocks():
    layout = discover_layout(TinyResNet())
    assert [block.name for block in layout.layers] == [
        "conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"
    ]


def test_user_named_layer_container():
    model = build("llama")
    layout = discover_layout(model, layer_paths=["model.layers"])
    assert [block.name for block in layout.layers] == [f"model.layers.{i}" for i in range(4)]


def test_bad_layer_path_is_refused_with_the_candidates():
    with pytest.raises(LayerDiscoveryError, match=r"`freeze_layer_paths` entry 'model.blocks'.*model.layers"):
        discover_layout(build("llama"), layer_paths=["model.blocks"])
    with pytest.raises(LayerDiscoveryError, match=r"'model.norm' is a LlamaRMSNorm, not a container"):
        discover_layout(build("llama"), layer_paths=["model.norm"])


def test_transformers_model_without_layers_says_how_to_name_them():
    from transformers import PretrainedConfig, PreTrainedModel

    class Flat(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 4)

    with pytest.raises(LayerDiscoveryError, match="freeze_layer_paths"):
        discover_layout(Flat(PretrainedConfig()))


def test_architectures_beyond_the_list():
    """Stems registered before the layers are input side; a head registered first keeps its tied weight apart."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration, XLMRobertaConfig, XLMRobertaForCausalLM

    whisper = discover_layout(WhisperForConditionalGeneration(WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)))
    kinds = {block.name: block.kind for block in whisper.blocks}
    assert kinds["model.encoder.conv1"] == kinds["model.encoder.conv2"] == "embeddings"
    assert kinds["model.encoder.layer_norm"] == "norm"
    assert whisper.num_layers == 4

    xlmr = discover_layout(XLMRobertaForCausalLM(XLMRobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128,
        is_decoder=True)))
    kinds = {block.name: block.kind for block in xlmr.blocks}
    assert kinds["lm_head"] == "head" and kinds["roberta.embeddings"] == "embeddings"
