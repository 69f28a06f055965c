"""The report stage (`hf_freeze.report`): counts and metrics, the block table, log lines, the timeline and its chart.

Hand-made layouts give exact numbers; one tiny GPT-2 (LM head tied to the input embeddings) checks `model_metrics`.
"""

import json

import pytest
from matplotlib.image import imread

from hf_freeze import Block, FreezeArguments, ModelLayout, TrainingProgress
from hf_freeze.policies import frozen_sets_over_training
from hf_freeze.report import (
    TIMELINE_JSON,
    TIMELINE_PNG,
    FreezeTimeline,
    block_rows,
    compact_blocks,
    count_metrics,
    describe_change,
    describe_selection,
    format_block_table,
    freeze_metrics,
    layer_ranges,
    model_metrics,
    plot_timeline,
    simulate_timeline,
    summary_line,
)
from tiny import build

# 5 + 4 * 10 + 2 + (3 + 1) = 51 parameters; one parameter per block except the head (weight 3, bias 1).
LAYOUT = ModelLayout.from_layer_sizes([10, 10, 10, 10], embeddings=5, norm=2, head=3)
# Layer 0 owns two parameters (so it can be partly frozen); the head's weight is an alias of the embeddings.
TWO_PARAMS = ModelLayout(blocks=(
    Block("emb", "embeddings", ("emb.weight",), (8,)),
    Block("h.0", "layer", ("h.0.a", "h.0.b"), (6, 2), layer_index=0),
    Block("h.1", "layer", ("h.1.a",), (1_000_000,), layer_index=1),
), tied_parameters={"head.weight": "emb.weight"})
PROGRESSIVE = FreezeArguments(freeze_strategy="progressive", freeze_start=0.5)


def test_freeze_metrics_exact_counts():
    assert freeze_metrics(LAYOUT, {"embeddings.weight", "layers.0.weight", "layers.1.weight", "head.bias"}) == {
        "freeze/trainable_params": 25, "freeze/total_params": 51,
        "freeze/trainable_fraction": round(25 / 51, 6), "freeze/frozen_layers": 2,
    }


def test_partly_frozen_layer_is_not_frozen_and_tied_alias_counts_once():
    metrics = freeze_metrics(TWO_PARAMS, {"h.0.a", "emb.weight"})
    assert metrics["freeze/total_params"] == 1_000_016  # the tied head weight is not counted again
    assert metrics["freeze/trainable_params"] == 1_000_002
    assert metrics["freeze/frozen_layers"] == 0


def test_count_metrics_of_nothing():
    assert count_metrics(0, 0) == {
        "freeze/trainable_params": 0, "freeze/total_params": 0, "freeze/trainable_fraction": 0.0,
    }


def test_model_metrics_reads_requires_grad_and_counts_tied_weights_once():
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    for parameter in [model.transformer.wte.weight, *model.transformer.h[0].parameters()]:
        parameter.requires_grad_(False)
    # 4 layers of 12,704 + wte 4,096 + wpe 2,048 + ln_f 64; the tied LM head adds nothing.
    assert model_metrics(model) == {
        "freeze/trainable_params": 40_224, "freeze/total_params": 57_024,
        "freeze/trainable_fraction": round(40_224 / 57_024, 6),
    }


def test_summary_line_with_and_without_layers():
    metrics = freeze_metrics(LAYOUT, {"layers.0.weight", "layers.1.weight"})
    assert summary_line(metrics) == "trainable params: 31 || all params: 51"
    assert summary_line(metrics, 4) == (
        "trainable params: 31 || all params: 51 || trainable%: 60.7843 || frozen layers: 2/4"
    )


def test_block_rows_states():
    rows = block_rows(TWO_PARAMS, {"h.0.a", "h.1.a"})
    assert [row["state"] for row in rows] == ["trainable", "partial (25.0% trainable)", "frozen"]
    assert rows[1] == {"position": 1, "name": "h.0", "kind": "layer", "layer": 0, "parameters": 8,
                       "trainable_parameters": 2, "state": "partial (25.0% trainable)"}
    assert rows[0]["layer"] == ""
    assert block_rows(LAYOUT, {"head.weight"})[-1]["state"] == "partial (25.0% trainable)"
    assert block_rows(ModelLayout(blocks=(Block("x", "layer", ("a", "b", "c"), (1, 1, 1), 0),)), {"a"})[0]["state"] == (
        "partial (66.7% trainable)"
    )


def test_format_block_table_lines_up():
    lines = format_block_table(TWO_PARAMS, {"h.0.b", "h.1.a"}).splitlines()
    assert lines[0].split() == ["#", "block", "kind", "layer", "params", "state"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["0", "emb", "embeddings", "8", "trainable"]
    assert lines[3].split() == ["1", "h.0", "layer", "0", "8", "partial", "(75.0%", "trainable)"]
    assert lines[4].split() == ["2", "h.1", "layer", "1", "1,000,000", "frozen"]
    # Right-aligned: the rule and every count end where the header "params" ends, and so do the layer indices.
    end, layer_end = lines[0].index("params") + len("params"), lines[0].index("layer") + len("layer")
    assert [line[:end].split()[-1] for line in lines[2:]] == ["8", "8", "1,000,000"]
    assert all(line[end - 1] != " " and line[end] == " " for line in lines[1:])
    assert (lines[3][layer_end - 1], lines[4][layer_end - 1]) == ("0", "1")


def test_layer_ranges():
    assert layer_ranges([]) == "none"
    assert layer_ranges([5, 0, 2, 1]) == "0-2, 5"
    assert layer_ranges([7, 3, 9, 8]) == "3, 7-9"
    assert layer_ranges([4]) == "4"


def test_compact_blocks():
    assert compact_blocks(["embeddings", "layers.0", "layers.1", "layers.3"], LAYOUT) == "layers 0-1, 3 + embeddings"
    assert compact_blocks(["layers.2", "head"], LAYOUT) == "layer 2 + head"
    assert compact_blocks(["norm"], LAYOUT) == "norm"


def test_describe_change_wording():
    first = {"step": 0, "epoch": 0.0, "frozen_blocks": [], "trainable_params": 51, "trainable_fraction": 1.0}
    assert describe_change(first, None, LAYOUT) == "step 0 (epoch 0): frozen: nothing || trainable params: 51 (100.00%)"
    second = {"step": 5, "epoch": 2.5, "frozen_blocks": ["embeddings", "layers.0"], "trainable_params": 36,
              "trainable_fraction": 0.705882, "released_optimizer_state_bytes": 3 * 2**20}
    assert describe_change(second, first, LAYOUT) == (
        "step 5 (epoch 2.5): froze layer 0 + embeddings || trainable params: 36 (70.59%)"
        " || released 3.00 MiB of optimizer state"
    )
    third = dict(first, step=9, epoch=4.5, frozen_blocks=["layers.1", "layers.2"], trainable_params=31,
                 trainable_fraction=0.607843)
    assert describe_change(third, second, LAYOUT) == (
        "step 9 (epoch 4.5): froze layers 1-2; unfroze layer 0 + embeddings || trainable params: 31 (60.78%)"
    )
    assert describe_change(dict(third, step=10), third, LAYOUT).startswith("step 10 (epoch 4.5): frozen: layers 1-2 ||")


def test_describe_selection():
    selection = {"step": 6, "probe_start_step": 2, "round": 0, "scores": [0.5, 1.25e-7, 3.0, 12345678.0],
                 "frozen_layers": [1, 2]}
    assert describe_selection(selection, LAYOUT).splitlines() == [
        "adaptive round 0: score per layer from the probe of steps 2-5; frozen: layers 1-2",
        "  layer   0           0.5  trainable",
        "  layer   1      1.25e-07  frozen",
        "  layer   2             3  frozen",
        "  layer   3   1.23457e+07  trainable",
    ]
    weights = dict(selection, step=4, probe_start_step=4, round=1, frozen_layers=[])
    assert describe_selection(weights, LAYOUT).splitlines()[0] == (
        "adaptive round 1: score per layer from the weights at step 4; frozen: nothing"
    )


SELECTION = {"step": 8, "probe_start_step": 4, "round": 0, "scores": [0.1, 0.2], "frozen_layers": [1]}


def recorded():
    timeline = FreezeTimeline(TWO_PARAMS, strategy="progressive", options={"freeze_start": 0.5, "freeze_level": None})
    timeline.record(TrainingProgress(step=0, max_steps=20, epoch=0.0, num_epochs=2.0), frozen=[])
    timeline.record(TrainingProgress(step=4, max_steps=20, epoch=0.4), {"h.0.a", "emb.weight"}, 1000, 24)
    timeline.record_selection(SELECTION)
    timeline.record(TrainingProgress(step=8, max_steps=20, epoch=0.8), {"h.0.a", "h.0.b", "h.1.a"})
    return timeline


def test_record_entries_and_no_entry_without_change():
    timeline = recorded()
    assert timeline.record(TrainingProgress(step=9, max_steps=20), {"h.1.a", "h.0.b", "h.0.a"}) is None
    assert timeline.changes == [
        {"step": 0, "epoch": 0.0, "frozen_blocks": [], "partial_blocks": {}, "frozen_layers": [],
         "trainable_params": 1_000_016, "trainable_fraction": 1.0},
        {"step": 4, "epoch": 0.4, "frozen_blocks": ["emb"], "partial_blocks": {"h.0": 0.25}, "frozen_layers": [],
         "trainable_params": 1_000_002, "trainable_fraction": round(1_000_002 / 1_000_016, 6),
         "optimizer_state_bytes": 1000, "released_optimizer_state_bytes": 24},
        {"step": 8, "epoch": 0.8, "frozen_blocks": ["h.0", "h.1"], "partial_blocks": {}, "frozen_layers": [0, 1],
         "trainable_params": 8, "trainable_fraction": round(8 / 1_000_016, 6)},
    ]
    assert timeline.selections == [SELECTION]


def test_state_dict_round_trip_resume_and_clear():
    timeline = recorded()
    state = json.loads(json.dumps(timeline.state_dict()))
    assert state == timeline.state_dict()
    restored = FreezeTimeline(TWO_PARAMS)
    restored.load_state_dict(state)
    assert restored.state_dict() == timeline.state_dict()
    restored.load_state_dict(state, before_step=8)
    assert [entry["step"] for entry in restored.changes] == [0, 4] and restored.selections == []
    timeline.clear()
    assert timeline.state_dict() == {"changes": [], "selections": []}


def test_to_dict_end_step():
    timeline = recorded()
    data = timeline.to_dict()
    assert (data["strategy"], data["options"], data["max_steps"], data["num_epochs"], data["end_step"]) == (
        "progressive", {"freeze_start": 0.5}, 20, 2.0, 20,  # options left unset (None) are not recorded
    )
    assert data["total_params"] == 1_000_016
    assert data["blocks"][1] == {"name": "h.0", "kind": "layer", "layer_index": 0, "parameters": 8}
    assert data["changes"] == timeline.changes and data["selections"] == timeline.selections
    assert timeline.to_dict(end_step=3)["end_step"] == 9  # never before the last change + 1
    assert timeline.to_dict(end_step=50)["end_step"] == 50
    assert "selections" not in FreezeTimeline(LAYOUT).to_dict()


def test_write_json_and_png(tmp_path):
    timeline = recorded()
    json_path, png_path = timeline.write(str(tmp_path / "out"), end_step=12)
    assert json_path == str(tmp_path / "out" / TIMELINE_JSON) and png_path == str(tmp_path / "out" / TIMELINE_PNG)
    with open(json_path) as handle:
        assert json.load(handle) == timeline.to_dict(12)
    with open(png_path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / TIMELINE_PNG).stat().st_size > 1024
    assert timeline.write(str(tmp_path / "plain"), chart=False) == (str(tmp_path / "plain" / TIMELINE_JSON), None)
    assert not (tmp_path / "plain" / TIMELINE_PNG).exists()


def test_plot_timeline_with_selections(tmp_path):
    data = simulate_timeline(LAYOUT, PROGRESSIVE, 8).to_dict()
    data["changes"][1]["released_optimizer_state_bytes"] = 2**21
    plain = imread(plot_timeline(data, str(tmp_path / "plain.png")))
    data["selections"] = [{"step": 2, "round": 0, "scores": [0.5, 0.1, 2.0, 0.0], "frozen_layers": [1, 3]},
                          {"step": 6, "round": 1, "scores": [1.0, 1.0, 1.0, 1.0], "frozen_layers": [0]}]
    drawn = imread(plot_timeline(data, str(tmp_path / "chart.png")))
    assert drawn.shape[0] > 100 and (drawn.shape != plain.shape or (drawn != plain).any())  # the selections show


def test_simulate_progressive():
    timeline = simulate_timeline(LAYOUT, PROGRESSIVE, 8, steps_per_epoch=2)
    assert [(e["step"], e["epoch"], e["frozen_layers"]) for e in timeline.changes] == [
        (0, 0.0, []), (5, 2.5, [0]), (6, 3.0, [0, 1]), (7, 3.5, [0, 1, 2]),
    ]
    assert timeline.changes[-1]["frozen_blocks"] == ["embeddings", "layers.0", "layers.1", "layers.2"]
    assert (timeline.max_steps, timeline.num_epochs, timeline.strategy) == (8, 4.0, "progressive")
    assert timeline.to_dict()["end_step"] == 8
    assert simulate_timeline(LAYOUT, PROGRESSIVE, 8, steps_per_epoch=3).num_epochs == 3.0  # a partial epoch counts
    assert [e["epoch"] for e in simulate_timeline(LAYOUT, PROGRESSIVE, 8).changes] == [0.0, 0.625, 0.75, 0.875]


def test_simulate_static_policy_is_one_entry():
    changes = simulate_timeline(LAYOUT, FreezeArguments(freeze_strategy="bottom", freeze_layers=2), 100).changes
    assert [(e["step"], e["frozen_blocks"]) for e in changes] == [(0, ["embeddings", "layers.0", "layers.1"])]


@pytest.mark.parametrize("args", [
    PROGRESSIVE,
    FreezeArguments(freeze_strategy="lisa", freeze_active_layers=1, freeze_schedule_every=3),
    FreezeArguments(freeze_strategy="gradual_unfreezing", freeze_schedule_every=1),
], ids=["progressive", "lisa", "gradual_unfreezing"])
def test_simulate_timeline_agrees_with_frozen_sets_over_training(args):
    changes = frozen_sets_over_training(LAYOUT, args, 24, steps_per_epoch=6, seed=1)
    timeline = simulate_timeline(LAYOUT, args, 24, steps_per_epoch=6, seed=1)
    assert len(changes) > 1
    assert [(e["step"], e["epoch"]) for e in timeline.changes] == [(c.step, c.epoch) for c in changes]
    expected = [[b.name for b in LAYOUT.blocks if set(b.parameters) <= c.frozen] for c in changes]
    assert [e["frozen_blocks"] for e in timeline.changes] == expected
