"""Multi-interest path on real data: `kgrec pipeline --dataset ml-100k-seq` with two sequential
models, then `kgrec serve` answering an ordered history over loopback HTTP (< 90 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from kgrec.serving.process import running_service

pytestmark = pytest.mark.e2e

KGREC = str(Path(sys.executable).with_name("kgrec"))
MODELS = ["youtube_dnn", "comirec_sa_mos"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, shared_data):
    work = tmp_path_factory.mktemp("e2e-mi")
    env = os.environ | {"PREFECT_HOME": str(work / "prefect"), "KGREC_HOME": str(work / "kgrec")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("KGREC_TRACKING_URI", None)
    proc = subprocess.run(
        [KGREC, "pipeline", "--dataset", "ml-100k-seq", "--models", ",".join(MODELS), "--epochs", "2",
         "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), env


def test_sequential_models_are_tracked_registered_and_promoted(pipeline_run):
    from mlflow import MlflowClient

    result, env = pipeline_run
    assert result["registered_model"] == "kgrec-ml-100k-seq"
    assert result["sequential_split"]["test_users"] == 94 and result["sequential_split"]["seed"] == 2020
    assert [m["model"] for m in result["models"]] == MODELS
    for m in result["models"]:
        assert m["kind"] == "multi_interest" and m["epochs_run"] == 2
        assert m["registered"]["selection_metric"] == "best_valid_recall_at_50"
        assert 0.1 < m["test"]["recall@50"] <= 1.0 and 0.0 < m["test"]["diversity@50"] < 1.0
        assert m["index"]["ntotal"] == 1682
    assert result["models"][0]["test"]["interest_similarity"] is None  # single vector
    assert 0.0 < result["models"][1]["test"]["interest_similarity"] < 1.0
    champion = max(result["models"], key=lambda m: m["valid"]["recall@50"])
    assert result["champion_version"] == champion["registered"]["version"]

    client = MlflowClient(result["tracking_uri"])
    runs = {m["model"]: client.get_run(m["run_id"]) for m in result["models"]}
    assert len({r.info.experiment_id for r in runs.values()}) == 1
    run = runs["comirec_sa_mos"]
    assert run.data.params["snapshot_hash"] == result["snapshot_hash"]
    assert run.data.params["split_seed"] == "2020" and run.data.params["num_interests"] == "4"
    assert (run.data.params["readout"], run.data.params["decorrelation"]) == ("mixture", "1.0")
    # ml-100k's 1,682 items: the catalogue size chose the exact softmax, and the run says so
    assert (run.data.params["softmax"], run.data.params["softmax_negatives"]) == ("exact", "0")
    curve = client.get_metric_history(run.info.run_id, "valid_recall_at_50")
    assert [p.step for p in curve] == [1, 2]
    assert {"best_valid_recall_at_50", "test_ndcg_at_50", "test_diversity_at_50"} <= set(run.data.metrics)


def genre_diversity(env: dict[str, str]):
    """diversity@K of a list of raw ml-100k item ids, from the snapshot the pipeline ingested."""
    import numpy as np
    from kgrec.features.ingest import ingest
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import load_spec
    from kgrec.models.sequential_evaluation import category_matrix, diversity

    snapshot = load_snapshot(ingest(load_spec("ml-100k-seq"), Path(env["KGREC_HOME"]) / "snapshots").snapshot_dir)
    categories, _ = category_matrix(snapshot.item_categories())
    index = dict(zip(snapshot.items["item_id"].to_list(), snapshot.items["item_idx"].to_list()))
    return lambda item_ids: float(diversity(np.array([[index[i] for i in item_ids]]), categories)[0])


def test_service_answers_an_ordered_history_over_loopback(pipeline_run):
    result, env = pipeline_run
    with running_service(result["registered_model"], env) as base_url, httpx.Client(
        base_url=base_url, timeout=10
    ) as client:
        model = client.get("/v1/model").json()
        assert model["kind"] == "multi_interest" and str(model["version"]) == result["champion_version"]
        history = ["50", "172", "181", "1", "121", "98", "28", "94", "71", "95"]  # oldest first
        response = client.post("/v1/candidates", json={"item_ids": history, "k": 50})
        assert response.status_code == 200, response.text
        body = response.json()
        ids = [c["item_id"] for c in body["candidates"]]
        assert len(ids) == len(set(ids)) == 50 and not set(history) & set(ids)
        assert all(0 <= c["interest"] < len(body["interest_weights"]) for c in body["candidates"])
        for rule in ("weighted", "mixture"):
            other = client.post("/v1/candidates", json={"item_ids": history, "k": 50, "merge": rule})
            assert other.status_code == 200 and other.json()["merge"] == rule
            other_ids = [c["item_id"] for c in other.json()["candidates"]]
            assert len(other_ids) == len(set(other_ids)) == 50 and not set(history) & set(other_ids)
        # ComiRec's controllable aggregation over the ml-100k genres: lambda 0 is the max list, a
        # large lambda spreads the list over more genre-disjoint pairs
        def ids_of(**extra):
            answer = client.post("/v1/candidates", json={"item_ids": history, "k": 50, **extra})
            assert answer.status_code == 200, answer.text
            return [c["item_id"] for c in answer.json()["candidates"]]
        assert ids_of(merge="controllable", diversity=0) == ids_of(merge="max")
        spread = ids_of(merge="controllable", diversity=5)
        assert len(spread) == len(set(spread)) == 50 and not set(history) & set(spread)
        share = genre_diversity(env)
        assert share(spread) > share(ids_of(merge="max")) + 0.05
        user = client.get("/v1/users/1/candidates", params={"k": 20})
        assert user.status_code == 200 and len(user.json()["candidates"]) == 20
        assert client.post("/v1/candidates", json={"item_ids": history, "merge": "mmr"}).status_code == 422
        assert client.post("/v1/candidates", json={"item_ids": ["no-such-item"]}).status_code == 422
