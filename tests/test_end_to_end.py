"""The whole path on real data: `kgrec pipeline` on music (two retrievers and the KCAN ranking
stage), then `kgrec serve` over loopback HTTP (retrieval and two-stage endpoints)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from kgrec.serving.process import running_service

pytestmark = pytest.mark.e2e

KGREC = str(Path(sys.executable).with_name("kgrec"))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, shared_data):
    work = tmp_path_factory.mktemp("e2e")
    env = os.environ | {"PREFECT_HOME": str(work / "prefect"), "KGREC_HOME": str(work / "kgrec")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("KGREC_TRACKING_URI", None)
    proc = subprocess.run(
        [KGREC, "pipeline", "--dataset", "music", "--epochs", "2", "--ranker", "kcan", "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), env


def test_pipeline_registers_a_champion_trained_on_the_real_snapshot(pipeline_run):
    result, env = pipeline_run
    assert result["dataset"] == "music"
    assert result["ingest"]["rows_accepted"]["interactions"] == 21_173
    assert [m["model"] for m in result["models"]] == ["bprmf", "lightgcn"]
    first, second = (m["registered"] for m in result["models"])
    assert first["alias"] == "champion" and first["previous_champion"] is None
    # the second version takes over only when strictly better on the selection metric
    assert second["previous_champion"] == first["version"]
    assert second["alias"] == ("champion" if second["metric"] > first["metric"] else "challenger")
    for model in result["models"]:
        assert 0.0 < model["test"]["recall@20"] <= 1.0
        assert model["epochs_run"] == 2
        assert model["index"]["ann_recall"] == pytest.approx(1.0)  # exact index at this size
    champion = max(result["models"], key=lambda m: m["valid"]["recall@20"])
    assert result["champion_version"] == champion["registered"]["version"]
    # the ranking stage learns from the best retriever of the run, under its own registered name
    ranker = result["ranker"]
    assert ranker["retriever"] == champion["model"]
    assert ranker["registered_model"] == "kgrec-music-ranker"
    assert ranker["registered"]["alias"] == "champion"
    assert ranker["registered"]["selection_metric"] == "best_valid_ndcg_at_20"
    assert 0.0 <= ranker["alpha"] <= 1.0 and ranker["epochs_run"] == 2
    assert 0.0 < ranker["test"]["ndcg@20"] <= 1.0 and "retrieval_ndcg@20" in ranker["test"]


def test_service_answers_candidates_over_loopback(pipeline_run):
    result, env = pipeline_run
    with running_service(result["registered_model"], env) as base_url, httpx.Client(
        base_url=base_url, timeout=10
    ) as client:
        ready = client.get("/readyz").json()
        assert str(ready["model"]["version"]) == result["champion_version"]

        snapshot = Path(result["ingest"]["snapshot_dir"])
        users = pl.read_parquet(snapshot / "users.parquet")
        items = pl.read_parquet(snapshot / "items.parquet")
        inter = pl.read_parquet(snapshot / "interactions.parquet")
        user_idx, user_id = 0, users.filter(pl.col("user_idx") == 0)["user_id"][0]
        seen = set(
            items.join(inter.filter(pl.col("user_idx") == user_idx), on="item_idx")["item_id"]
        )

        response = client.get(f"/v1/users/{user_id}/candidates", params={"k": 100})
        assert response.status_code == 200, response.text
        candidates = response.json()["candidates"]
        ids = [c["item_id"] for c in candidates]
        assert len(ids) == 100 and len(set(ids)) == 100
        assert not seen & set(ids)
        scores = [c["score"] for c in candidates]
        assert scores == sorted(scores, reverse=True)

        history = sorted(seen)[:5]
        response = client.post("/v1/candidates", json={"item_ids": history, "k": 20})
        assert response.status_code == 200, response.text
        posted = [c["item_id"] for c in response.json()["candidates"]]
        assert len(posted) == 20 and not set(history) & set(posted)

        # two stages: the champion retriever's top 200 re-ranked by the ranking champion
        response = client.get(f"/v1/users/{user_id}/ranked", params={"k": 20, "n": 200})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["ranker"]["name"] == "kgrec-music-ranker"
        ranked = body["candidates"]
        assert len(ranked) == 20 and not seen & {c["item_id"] for c in ranked}
        top200 = client.get(f"/v1/users/{user_id}/candidates", params={"k": 200}).json()["candidates"]
        assert {c["item_id"] for c in ranked} <= {c["item_id"] for c in top200}
        assert all(c["ranking_score"] is not None for c in ranked)
        assert client.get(f"/v1/users/{user_id}/ranked", params={"k": 30, "n": 20}).status_code == 422
        stages = client.get("/v1/latency").json()["two_stage"]
        assert stages["requests"] == 1 and stages["ranking"]["p50_ms"] > 0

        assert client.get("/v1/users/no-such-user/candidates").status_code == 404
        assert client.get(f"/v1/users/{user_id}/candidates", params={"k": 0}).status_code == 422
        malformed = client.post("/v1/candidates", content=b"{not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 400


def test_a_new_champion_is_served_without_a_restart(pipeline_run, tmp_path):
    """Two workers watching the registry: moving the alias changes every answer's version within
    a few polls, with no failed request; nothing is left in $TMPDIR."""
    import mlflow
    from mlflow import MlflowClient

    result, env = pipeline_run
    name = result["registered_model"]
    env = env | {"KGREC_SERVE_TOKEN": "e2e-token", "TMPDIR": str(tmp_path)}
    mlflow.set_tracking_uri(f"sqlite:///{Path(env['KGREC_HOME']) / 'mlflow.db'}")
    client = MlflowClient()
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    other = next(str(m["registered"]["version"]) for m in result["models"]
                 if str(m["registered"]["version"]) != champion)
    args = ["--workers", "2", "--poll-interval", "0.5", "--fail-fast", "--no-ranker"]
    with running_service(name, env, extra_args=args) as base_url, httpx.Client(base_url=base_url, timeout=10) as http:
        # /readyz answers as soon as one worker is up: wait for both to serve the champion before
        # moving the alias, else a late worker's first load already finds the new version and
        # there is no second reload to count (seen on a busy 2-core machine)
        _wait_for_ready_workers(base_url, 2)
        user = "2"
        assert http.get(f"/v1/users/{user}/candidates", params={"k": 5}).json()["model"]["version"] == champion
        try:
            client.set_registered_model_alias(name, "champion", other)
            # a new connection per request: uvicorn's workers share the socket, so requests on
            # fresh connections spread over both
            fresh = httpx.Client(base_url=base_url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0))
            statuses, reloaded = [], 0.0
            deadline = time.monotonic() + 60
            with fresh:
                while time.monotonic() < deadline and reloaded < 2:
                    statuses.append(fresh.get(f"/v1/users/{user}/candidates", params={"k": 5}).status_code)
                    metrics = fresh.get("/metrics").text
                    found = re.search(r'kgrec_model_reloads_total\{result="success"\} ([0-9.]+)', metrics)
                    reloaded = float(found[1]) if found else 0.0
                assert reloaded == 2, "both workers reload (the counter is summed over workers)"
                versions = [fresh.get(f"/v1/users/{user}/candidates", params={"k": 5}).json()["model"]["version"]
                            for _ in range(20)]
            assert set(statuses) == {200} and versions == [other] * 20, versions
            assert http.post("/admin/reload").status_code == 401
            reload = http.post("/admin/reload", headers={"Authorization": "Bearer e2e-token"}).json()
            assert reload["status"] == "unchanged" and reload["model"]["version"] == other
        finally:
            client.set_registered_model_alias(name, "champion", champion)
    assert not list(tmp_path.glob("kgrec-serve-*"))


def _wait_for_ready_workers(base_url: str, workers: int, timeout: float = 120) -> None:
    """Until ``workers`` service workers serve a model (``kgrec_model_ready`` is one sample per
    live worker process under ``--workers``)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as probe:
        while True:
            ready = re.findall(r'^kgrec_model_ready\{pid="\d+"\} 1\.0$', probe.get("/metrics").text, re.M)
            if len(ready) >= workers:
                return
            assert time.monotonic() < deadline, f"{len(ready)} of {workers} workers ready"
            time.sleep(0.2)


def test_fail_fast_exits_when_there_is_no_champion(pipeline_run):
    _, env = pipeline_run
    proc = subprocess.run(
        [KGREC, "serve", "--model-name", "no-such-model", "--fail-fast", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "--fail-fast: the model cannot be loaded" in proc.stderr and "no-such-model" in proc.stderr
