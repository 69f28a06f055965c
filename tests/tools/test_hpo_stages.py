"""The layer fidelity inside one training run, through `Trainer.hyperparameter_search` on Optuna and on Ray Tune (a
local Ray instance): rungs train the stated layers, low-ranking trials stop at a rung, a study resumes."""

import os
import shutil
import tempfile

import pytest
from transformers import Trainer

optuna = pytest.importorskip("optuna")

from tiny import TokenClassificationData, tiny_bert, training_kwargs  # noqa: E402

from hf_freeze import FreezeCallback, FreezeConfigError, FreezeTrainingArguments  # noqa: E402
from hf_freeze.tools.hpo_stages import LayerFidelityStages  # noqa: E402

SPACE = {"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}
STAGES = LayerFidelityStages(fidelities=(0.25, 0.5, 1.0), rung_steps=2)
# tiny_bert has 4 layers: 1, 2 and 4 of them trainable; the embeddings train only at the last rung.
TRAINABLE = {1: 9666, 2: 18210, 4: 55906}


@pytest.fixture(autouse=True)
def one_thread(quiet_one_thread):
    yield


def make_trainer(tmp_path, **overrides):
    data = TokenClassificationData(size=16)
    args = FreezeTrainingArguments(**training_kwargs(tmp_path / "out", **{
        "max_steps": -1, "logging_steps": 100, "log_level": "warning", **overrides}))
    args = STAGES.training_arguments(args, tiny_bert())
    return Trainer(model_init=lambda: tiny_bert(), args=args, train_dataset=data, eval_dataset=data,
                   callbacks=[FreezeCallback()])


def test_the_stages_follow_the_fidelity_grid():
    assert STAGES.freeze_stages(num_layers=4) == {0: 3, 2: 2, 4: 0}
    assert STAGES.rung_ends == [2, 4, 8] and STAGES.max_steps == 8
    three = LayerFidelityStages(fidelities=(0.2, 0.4, 0.6, 1.0), rung_steps=5, reduction_factor=3)
    assert three.freeze_stages(num_layers=10) == {0: 8, 5: 6, 15: 4, 45: 0} and three.max_steps == 135


@pytest.mark.parametrize("options, field", [
    (dict(fidelities=(0.5, 0.25)), "fidelities"),
    (dict(fidelities=()), "fidelities"),
    (dict(fidelities=(0.0, 1.0)), "fidelities"),
    (dict(rung_steps=0), "rung_steps"),
    (dict(rung_steps=4, reduction_factor=1), "reduction_factor"),
])
def test_a_bad_grid_is_refused_before_any_trial(options, field):
    with pytest.raises(FreezeConfigError, match=field):
        LayerFidelityStages(**{"rung_steps": 2, **options})


def test_options_the_stages_set_are_refused_in_the_training_arguments(tmp_path):
    args = FreezeTrainingArguments(**training_kwargs(tmp_path, max_steps=10, freeze_strategy="bottom", freeze_layers=1))
    with pytest.raises(FreezeConfigError, match="`freeze_strategy`, `freeze_layers`, `max_steps`.*Remove them"):
        STAGES.training_arguments(args, tiny_bert())
    with pytest.raises(FreezeConfigError, match="search space"):
        STAGES.search_arguments("optuna", {}, "eval_loss")


def test_optuna_rungs_train_the_stated_layers_and_low_ranking_trials_stop(tmp_path):
    storage = "sqlite:///" + str(tmp_path / "optuna.db")
    study = optuna.create_study(study_name="stages", storage=storage, direction="minimize")
    study.enqueue_trial({"learning_rate": 1.0e-2})  # trains: its loss falls
    study.enqueue_trial({"learning_rate": 1.0e-4})  # barely moves: ranks below at the first rung
    trainer = make_trainer(tmp_path)
    search = STAGES.search_arguments("optuna", SPACE, "eval_loss", "minimize", n_trials=2, storage=storage,
                                     study_name="stages", load_if_exists=True,
                                     sampler=optuna.samplers.RandomSampler(seed=0))
    best = trainer.hyperparameter_search(**search)
    first, second = optuna.load_study(study_name="stages", storage=storage).trials
    assert first.state == optuna.trial.TrialState.COMPLETE and sorted(first.intermediate_values) == [2, 4, 6, 8]
    assert second.state == optuna.trial.TrialState.PRUNED and sorted(second.intermediate_values) == [2]
    assert best.run_id == "0" and best.objective == first.intermediate_values[8]
    # The trained layers at each evaluation: the Trainer's log of the last (complete) trial is the first one's.
    logged = {entry["step"]: entry["freeze/trainable_params"] for entry in trainer.state.log_history
              if "eval_loss" in entry}
    assert logged == {2: TRAINABLE[1], 4: TRAINABLE[2], 6: TRAINABLE[4], 8: TRAINABLE[4]} or logged == {
        2: TRAINABLE[1]}  # the pruned trial ran last

    # Resumed: the same command again keeps both trials and runs one more.
    make_trainer(tmp_path).hyperparameter_search(**{**search, "n_trials": 1})
    assert len(optuna.load_study(study_name="stages", storage=storage).trials) == 3


def test_ray_tune_asha_stops_trials_at_the_rungs(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from ray import tune

    # A private, short folder: Ray's socket paths must stay under 108 bytes, and another copy of the suite may run.
    ray_dir = tempfile.mkdtemp(prefix="ray")
    # Ray's workers import the trainer's pieces by name, this folder's `tiny` too; they inherit this environment
    # (a `runtime_env` would start a fresh worker per trial, minutes on a busy machine).
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    # Ray runs its workers at niceness 15 by default: on a busy machine they would wait minutes for a core.
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20, log_to_driver=False,
             _temp_dir=ray_dir, configure_logging=False, _system_config={"worker_niceness": 0})
    try:
        # accelerate's GradientState is shared by every Accelerator of the process and keeps weak references to the
        # dataloaders of earlier trainings (of other tests here), which Ray cannot pickle with the Trainer.
        from accelerate.state import GradientState

        GradientState._reset_state()
        trainer = make_trainer(tmp_path)
        # Two trials at a time: one that learns and one that barely moves reach the first rung; the third (barely
        # moving too) ranks below their median there, and ASHA stops it.
        points = [{"learning_rate": rate} for rate in (1.0e-2, 1.0e-7, 1.0e-7)]
        search = STAGES.search_arguments(
            "ray", {"learning_rate": {"choices": [1.0e-2, 1.0e-7]}}, "eval_loss", "minimize", n_trials=3,
            resources_per_trial={"cpu": 1}, storage_path=str(tmp_path / "ray_results"), name="stages", verbose=0,
            search_alg=tune.search.BasicVariantGenerator(points_to_evaluate=points, random_state=0))
        best = trainer.hyperparameter_search(**search)
        # The same search again resumes the experiment from its storage: the finished trials are not run again.
        results = sorted((tmp_path / "ray_results" / "stages").glob("*/result.json"))
        before = [path.read_text() for path in results]
        resumed = trainer.hyperparameter_search(**{**search, "resume": "AUTO"})
        assert sorted((tmp_path / "ray_results" / "stages").glob("*/result.json")) == results
        assert [path.read_text() for path in results] == before and resumed.run_id == best.run_id
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    analysis = best.run_summary
    frames = analysis.trial_dataframes.values()
    iterations = sorted(int(frame["training_iteration"].max()) for frame in frames)
    assert iterations[-1] == 4 and iterations[0] < 4  # one trial went to the end, ASHA stopped another at a rung
    for frame in frames:
        expected = [TRAINABLE[1], TRAINABLE[2], TRAINABLE[4], TRAINABLE[4]][: len(frame)]
        assert list(frame["freeze/trainable_params"]) == expected
        assert list(frame["epoch"]) == [1.0, 2.0, 3.0, 4.0][: len(frame)]  # an evaluation every 2 of 8 steps
    assert best.hyperparameters["learning_rate"] == 1.0e-2
