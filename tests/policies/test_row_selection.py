"""Which rows train, decided from the layout alone: token ids, new tokens, experts, and axolotl's row ranges.

The axolotl cases transcribe, in our own words, what axolotl's `unfrozen_parameters` does: every '.' that is not
followed by '+' is made a literal dot before the pattern is compiled, the pattern is matched from the start of the
name, and a trailing bracket is a range of rows (``[start:end]`` with either end optional, or a single ``[index]``),
not part of the expression. A parameter matched by any ranged pattern trains only the rows of its ranges.
"""

from dataclasses import replace

import pytest

from tiny import build

from hf_freeze import FreezeArguments, FreezeConfigError, decide, discover_layout

LLAMA = discover_layout(build("llama"))  # untied head, 128 tokens
MOE = discover_layout(build("qwen3_moe"))  # 4 experts in each of 4 layers
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def axolotl(*patterns, layout=LLAMA):
    options = FreezeArguments(freeze_strategy="pattern", freeze_pattern_syntax="axolotl", freeze_trainable_patterns=list(patterns))
    return decide(layout, options)


def trainable(decision, layout=LLAMA):
    return sorted(set(layout.parameter_names) - decision.frozen)


def test_token_ids_train_their_input_and_output_rows_untied_and_tied():
    decision = decide(LLAMA, FreezeArguments(freeze_trainable_tokens=[5, 3]))
    assert decision.trainable_rows == {EMBED: (3, 5), HEAD: (3, 5)}
    assert {EMBED, HEAD} <= decision.frozen  # the full matrices are frozen; only the rows train
    tied = discover_layout(build("llama", tie_word_embeddings=True))
    assert decide(tied, FreezeArguments(freeze_trainable_tokens=[5])).trainable_rows == {EMBED: (5,)}


def test_new_tokens_are_the_rows_past_the_loaded_vocabulary():
    resized = replace(LLAMA, base_vocabulary=120)
    assert decide(resized, FreezeArguments(freeze_trainable_tokens="new")).trainable_rows[HEAD] == tuple(range(120, 128))


def test_rows_narrow_a_trainable_embedding_and_leave_the_layers_to_the_strategy():
    decision = decide(LLAMA, FreezeArguments(freeze_strategy="bottom", freeze_layers=1, freeze_trainable_tokens=[7]))
    assert decision.frozen_layers(LLAMA) == [0]
    assert EMBED in decision.frozen and HEAD in decision.frozen


def test_experts_every_layer_or_one_layer():
    decision = decide(MOE, FreezeArguments(freeze_trainable_experts=[1, "2:3"], freeze_router=True))
    assert decision.trainable_rows["model.layers.0.mlp.experts.gate_up_proj"] == (1,)
    assert decision.trainable_rows["model.layers.2.mlp.experts.down_proj"] == (1, 3)
    assert len(decision.trainable_rows) == 8
    assert "model.layers.0.mlp.gate.weight" in decision.frozen  # freeze_router
    assert "model.layers.0.self_attn.q_proj.weight" not in decision.frozen


def test_refusals_name_the_valid_range():
    with pytest.raises(FreezeConfigError, match=r"token ids in \[0, 127\]"):
        decide(LLAMA, FreezeArguments(freeze_trainable_tokens=[128]))
    with pytest.raises(FreezeConfigError, match="never resized"):
        decide(replace(LLAMA, base_vocabulary=128), FreezeArguments(freeze_trainable_tokens="new"))
    with pytest.raises(FreezeConfigError, match=r"expert indices in \[0, 3\]"):
        decide(MOE, FreezeArguments(freeze_trainable_experts=[4]))
    with pytest.raises(FreezeConfigError, match=r"layer index in \[0, 3\]"):
        decide(MOE, FreezeArguments(freeze_trainable_experts=["9:0"]))


# -- axolotl's syntax, side by side with the default -------------------------------------------------------------


def test_axolotl_makes_dots_literal_so_dot_star_matches_nothing():
    regex = decide(LLAMA, FreezeArguments(freeze_strategy="pattern", freeze_trainable_patterns=["model.layers.*mlp"]))
    assert "model.layers.0.mlp.up_proj.weight" in trainable(regex)  # our rule: '.*' is any text
    with pytest.raises(FreezeConfigError, match="matches at least one parameter"):
        axolotl("model.layers.*mlp")  # axolotl: 'model.layers' + any number of dots + 'mlp'
    assert "model.layers.0.mlp.up_proj.weight" in trainable(axolotl("model.layers.+mlp"))  # '.+' is kept


def test_axolotl_escaped_dots_break():
    assert trainable(decide(LLAMA, FreezeArguments(freeze_strategy="pattern", freeze_trainable_patterns=[r"model\.norm\.weight"]))) == ["model.norm.weight"]
    with pytest.raises(FreezeConfigError, match="backslash"):
        axolotl(r"model\.norm\.weight")


def test_axolotl_matches_from_the_start_of_the_name():
    with pytest.raises(FreezeConfigError):
        axolotl("embed_tokens")
    assert trainable(axolotl("model.norm")) == ["model.norm.weight"]


def test_axolotl_row_ranges():
    assert axolotl(EMBED + "$[:32]").trainable_rows == {EMBED: tuple(range(32))}
    assert axolotl(EMBED + "$[120:]").trainable_rows == {EMBED: tuple(range(120, 128))}
    assert axolotl(EMBED + "$[10:12]", EMBED + "$[40:41]").trainable_rows == {EMBED: (10, 11, 40)}
    # A single index is one row of every parameter the prefix matches, not a character class.
    assert axolotl("model.embed_tokens.[23]").trainable_rows == {EMBED: (23,)}
    decision = axolotl(EMBED + "$[:4]", "model.norm")
    assert EMBED in decision.frozen and trainable(decision) == ["model.norm.weight"]


def test_axolotl_a_ranged_match_restricts_an_unranged_one():
    decision = axolotl("model.embed_tokens", EMBED + "$[0:2]")
    assert decision.trainable_rows == {EMBED: (0, 1)} and EMBED in decision.frozen


def test_axolotl_ranges_on_expert_tensors_and_refusals():
    assert axolotl("model.layers.0.mlp.experts.gate_up_proj$[1:3]", layout=MOE).trainable_rows == {
        "model.layers.0.mlp.experts.gate_up_proj": (1, 2)}
    with pytest.raises(FreezeConfigError, match="only on token embeddings or fused expert tensors"):
        axolotl("model.layers.[23]")  # row 23 of every layer weight in axolotl: refused here
    with pytest.raises(FreezeConfigError, match=r"within \[0:128\]"):
        axolotl(EMBED + "$[100:200]")
    with pytest.raises(FreezeConfigError, match="start < end"):
        FreezeArguments(freeze_strategy="pattern", freeze_pattern_syntax="axolotl", freeze_trainable_patterns=[EMBED + "$[5:5]"])
