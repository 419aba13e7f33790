"""`kgrec tune` and `kgrec pipeline --tuned` as a user types them: real processes, Prefect's
temporary server, the embedded MLflow store, the music data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kgrec.flows.config import TuneConfig
from mlflow import MlflowClient
from pydantic import ValidationError

pytestmark = pytest.mark.e2e

KGREC = str(Path(sys.executable).with_name("kgrec"))


def _run(work: Path, *argv: str) -> tuple[dict, str]:
    env = os.environ | {"PREFECT_HOME": str(work / "prefect"), "KGREC_HOME": str(work / "kgrec"), "OMP_NUM_THREADS": "1"}
    for name in ("MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    done = subprocess.run([KGREC, *argv, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_tune_then_pipeline_tuned_train_with_the_recommended_config(tmp_path, shared_data):
    client = MlflowClient(f"sqlite:///{tmp_path / 'kgrec' / 'mlflow.db'}")
    tuned, _ = _run(tmp_path, "tune", "--dataset", "music", "--models", "bprmf", "--trials", "3", "--epochs", "3")

    (study,) = tuned["studies"]
    assert study["trials"]["complete"] + study["trials"]["pruned"] + study["trials"]["fail"] == 3
    parent = client.get_run(study["study_run_id"])
    assert parent.data.tags["kgrec.snapshot_hash"] == tuned["snapshot_hash"]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    # the flow then trained the best point once more as a normal run, tested it once and promoted it
    (final,) = tuned["models"]
    assert final["registered"]["alias"] == "champion"
    run = client.get_run(final["run_id"])
    assert run.data.tags["kgrec.tuned_from"] == parent.info.run_id
    assert float(run.data.params["learning_rate"]) == pytest.approx(study["best"]["params"]["learning_rate"])
    assert final["valid"]["recall@20"] == pytest.approx(study["best"]["value"], abs=1e-5)  # same seed, same point
    assert "recall@20" in final["test"]

    # later pipelines find the recommendation by the snapshot's hash; a model without a study
    # trains with its defaults and says so
    again, stderr = _run(tmp_path, "pipeline", "--dataset", "music", "--models", "bprmf,lightgcn",
                         "--epochs", "2", "--tuned")
    runs = {m["model"]: client.get_run(m["run_id"]) for m in again["models"]}
    assert runs["bprmf"].data.tags["kgrec.tuned_from"] == parent.info.run_id
    assert float(runs["bprmf"].data.params["batch_size"]) == study["best"]["params"]["batch_size"]
    assert "kgrec.tuned_from" not in runs["lightgcn"].data.tags
    assert "lightgcn: no tuned configuration for snapshot" in stderr


def test_a_model_without_a_search_space_is_refused_at_the_edge():
    with pytest.raises(ValidationError, match="declare no search space"):
        TuneConfig(dataset="ml-100k-seq", models=["mixture"])
    done = subprocess.run([KGREC, "tune", "--models", "mixture", "--dataset", "ml-100k-seq"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "declare no search space" in done.stderr
