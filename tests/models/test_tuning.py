"""The tuning library (models/tracking/tuning.py) without Prefect: search spaces, the study's MLflow
runs, pruning, failures, the budget and the stored recommendation."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from kgrec.features.ingest import ingest
from kgrec.features.spec import load_spec
from kgrec.models.families import PipelineInputs, family_of
from kgrec.models.spec import get_spec, model_specs
from kgrec.models.tracking.tuning import (
    RECOMMENDATION_FILE,
    TuneSettings,
    config_overrides,
    configured,
    recommended_config,
    trial_config,
    tune,
)


@pytest.mark.parametrize("spec", [s for s in model_specs() if s.search_space], ids=lambda s: s.name)
def test_every_point_of_a_search_space_is_a_valid_config(spec):
    """A key that names no config field (or no model parameter) fails here, not in a study."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    defaults = family_of(spec).config(spec)
    for _ in range(10):
        trial = study.ask(dict(spec.search_space))
        config = trial_config(spec, trial.params)
        for key, value in trial.params.items():
            field, _, param = key.partition(".")
            got = config.params[param] if field == "params" else getattr(config, field)
            assert got == value, (spec.name, key)
        # what the space does not search keeps the model's recommended default
        assert config.epochs == defaults.epochs
        study.tell(trial, 0.0)


def test_config_overrides_nest_model_parameters():
    assert config_overrides({"learning_rate": 0.01, "params.mess_dropout": 0.2}) == {
        "learning_rate": 0.01, "params": {"mess_dropout": 0.2},
    }
    # merged into the model's default params key by key: KGAT's other params keep their defaults
    config = trial_config(get_spec("kgat"), {"params.mess_dropout": 0.2})
    assert config.params["mess_dropout"] == 0.2
    assert config.params["layer_sizes"] == (64, 32, 16)


@pytest.fixture(scope="module")
def music_inputs(tmp_path_factory, shared_data):
    report = ingest(load_spec("music"), tmp_path_factory.mktemp("snapshots"))
    return PipelineInputs(report.snapshot_dir).for_family("retriever")


class ScriptedPruner(optuna.pruners.BasePruner):
    """Prunes trial 1 at epoch 2 and fails trial 2 (an error inside its fit) at epoch 1."""

    def prune(self, study, trial) -> bool:
        epoch = max(trial.intermediate_values)
        if trial.number == 2:
            raise FloatingPointError("diverged (scripted)")
        return trial.number == 1 and epoch >= 2


def test_a_study_is_a_parent_run_with_a_child_run_per_trial(tracking, music_inputs):
    spec = get_spec("bprmf")
    result = tune(spec, music_inputs, TuneSettings(trials=4, epochs=3), pruner=ScriptedPruner())

    assert result.counts == {"complete": 2, "pruned": 1, "fail": 1}
    assert result.stop_reason == "trials"
    client = mlflow.MlflowClient()
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kgrec.kind"] == "tune"
    assert parent.data.tags["kgrec.snapshot_hash"] == music_inputs.snapshot.hash
    assert parent.data.metrics["trials_complete"] == 2 and parent.data.metrics["trials_pruned"] == 1
    artefacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert RECOMMENDATION_FILE in artefacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "optuna")}
    assert {"optuna/trials.csv", "optuna/optimization_history.png", "optuna/intermediate_values.png"} <= plots

    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result.run_id}'",
    )
    by_trial = {int(r.data.params["tune.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2, 3]
    assert by_trial[1].info.status == "FINISHED"
    assert by_trial[1].data.tags["kgrec.stopped"].startswith("pruned by ScriptedPruner at epoch 2")
    assert by_trial[2].info.status == "FAILED"
    assert "diverged (scripted)" in by_trial[2].data.tags["kgrec.error"]
    # every trial logged its validation curve, and none touched the test split
    assert len(client.get_metric_history(by_trial[0].info.run_id, "valid_recall_at_20")) == 3
    for run in [parent, *children]:
        assert not [k for k in run.data.metrics if k.startswith("test_")], run.info.run_name

    # the recommendation is the best completed trial's point, found by model and snapshot hash
    best = max((by_trial[n] for n in (0, 3)), key=lambda r: r.data.metrics["best_valid_recall_at_20"])
    found = recommended_config("bprmf", music_inputs.snapshot.hash, tracking.experiment)
    assert found is not None and found.run_id == result.run_id
    assert found.value == pytest.approx(best.data.metrics["best_valid_recall_at_20"])
    assert found.overrides["learning_rate"] == pytest.approx(float(best.data.params["learning_rate"]))
    assert recommended_config("bprmf", "0" * 64, tracking.experiment) is None
    assert recommended_config("lightgcn", music_inputs.snapshot.hash, tracking.experiment) is None

    tuned, recommendation = configured(spec, music_inputs.snapshot.hash, tracking.experiment, True, epochs=7)
    assert recommendation == found
    assert tuned.learning_rate == pytest.approx(found.overrides["learning_rate"]) and tuned.epochs == 7
    default, none = configured(spec, music_inputs.snapshot.hash, tracking.experiment, False)
    assert none is None and default == family_of(spec).config(spec)


def test_the_timeout_ends_a_study(tracking, music_inputs):
    result = tune(get_spec("bprmf"), music_inputs, TuneSettings(trials=50, epochs=50, timeout_s=1.0))
    assert result.stop_reason == "timeout"
    assert result.counts["complete"] >= 1
    assert sum(result.counts.values()) < 50


def test_a_study_with_no_completed_trial_fails_and_its_run_says_so(tracking, music_inputs):
    with pytest.raises(RuntimeError, match="no trial completed"):
        tune(get_spec("bprmf"), music_inputs, TuneSettings(trials=1, epochs=2),
             pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # recall is never 2: always pruned
    parent = mlflow.search_runs(experiment_names=[tracking.experiment], filter_string="tags.`kgrec.kind` = 'tune'",
                                output_format="list")[0]
    assert parent.info.status == "FAILED"
    assert recommended_config("bprmf", music_inputs.snapshot.hash, tracking.experiment) is None


def test_a_model_without_a_search_space_cannot_be_tuned(music_inputs):
    with pytest.raises(ValueError, match="no search space"):
        tune(get_spec("mixture"), music_inputs, TuneSettings(trials=1))
