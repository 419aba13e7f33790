"""MLflow registration: the promotion gate, rollback of half-published versions, failed runs."""

from __future__ import annotations

import mlflow
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from kgrec.models.tracking import registry
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.export import register_bundle
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

NAME = "kgrec-test"


def _bundle(tmp_path, seed: int):
    rng = np.random.default_rng(seed)
    users, items = 5, 12
    bundle = RetrievalBundle(
        user_embeddings=rng.normal(size=(users, 4)).astype(np.float32),
        item_embeddings=rng.normal(size=(items, 4)).astype(np.float32),
        seen=sp.csr_matrix(np.eye(users, items, dtype=np.float32)),
        users=pl.DataFrame({"user_id": [f"u{i}" for i in range(users)],
                            "user_idx": pl.Series(range(users), dtype=pl.Int32)}),
        items=pl.DataFrame({"item_id": [f"i{i}" for i in range(items)],
                            "item_idx": pl.Series(range(items), dtype=pl.Int32),
                            "name": [None] * items}, schema_overrides={"name": pl.String}),
        meta={"model": "test", "dataset": "synthetic", "snapshot_hash": "0" * 64, "dim": 4},
    )
    path = tmp_path / f"bundle-{seed}"
    bundle.write(path)
    return path


def _trained_version(tmp_path, metric: float, seed: int):
    with registry.tracked_run("m", {"seed": seed}, {}) as run_id:
        mlflow.log_metric(registry.SELECTION_METRIC, metric)
    return register_bundle(run_id, _bundle(tmp_path, seed), NAME, {})


def test_tracking_defaults_to_sqlite_inside_workdir(tracking, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolved_tracking_uri == f"sqlite:///{tracking.workdir / 'mlflow.db'}"
    experiment = MlflowClient().get_experiment_by_name("kgrec")
    assert experiment.artifact_location == (tracking.workdir / "mlartifacts").as_uri()


def test_promotion_gate_keeps_the_better_model_as_champion(tracking, tmp_path):
    first = _trained_version(tmp_path, 0.30, seed=1)
    worse = _trained_version(tmp_path, 0.20, seed=2)
    tie = _trained_version(tmp_path, 0.30, seed=3)
    aliases = [registry.promote(NAME, v).alias for v in (first, worse, tie)]
    assert aliases == ["champion", "challenger", "challenger"]
    assert registry.resolve_alias(NAME).version == first.version

    better = _trained_version(tmp_path, 0.35, seed=4)
    promotion = registry.promote(NAME, better)
    assert promotion.alias == "champion"
    assert promotion.previous_champion == str(first.version)
    assert promotion.previous_metric == pytest.approx(0.30)
    assert registry.resolve_alias(NAME).version == better.version


def test_failed_publication_rolls_the_version_back(tracking, tmp_path):
    champion = _trained_version(tmp_path, 0.30, seed=1)
    registry.promote(NAME, champion)
    doomed = _trained_version(tmp_path, 0.50, seed=2)
    with pytest.raises(RuntimeError, match="index build failed"):
        with registry.pending_version(NAME, doomed):
            raise RuntimeError("index build failed")
    client = MlflowClient()
    versions = {v.version for v in client.search_model_versions(f"name='{NAME}'")}
    assert doomed.version not in versions
    assert registry.resolve_alias(NAME).version == champion.version
    with pytest.raises(MlflowException):  # its logged model went with it
        client.get_logged_model(registry.logged_model_id(doomed))
    assert client.get_logged_model(registry.logged_model_id(champion)).name == "test"


def test_a_run_that_raises_is_marked_failed_with_the_error(tracking):
    with pytest.raises(ValueError, match="boom"):
        with registry.tracked_run("m", {"a": 1}, {}) as run_id:
            raise ValueError("boom")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["kgrec.error"] == "ValueError: boom"


def test_resolving_a_missing_alias_names_the_fix(tracking):
    with pytest.raises(LookupError, match="kgrec pipeline"):
        registry.resolve_alias("no-such-model")


def _mi_bundle(tmp_path, seed: int):
    import torch
    from kgrec.models.sequential.youtube_dnn import YouTubeDNN
    from kgrec.serving.multi_interest import MultiInterestBundle

    torch.manual_seed(seed)
    items = 12
    bundle = MultiInterestBundle.from_model(
        YouTubeDNN(items, embedding_dim=4),
        items=pl.DataFrame({"item_id": [f"i{i}" for i in range(items)], "item_idx": list(range(items))}),
        users=pl.DataFrame({"user_id": ["u0", "u1"], "user_idx": [0, 1]}),
        histories=[np.array([3, 1, 4]), np.array([5, 9])],
        meta={"model": "youtube_dnn", "dataset": "synthetic", "snapshot_hash": "0" * 64},
    )
    return bundle.write(tmp_path / f"mi-bundle-{seed}")


def _sequential_version(tmp_path, recall_at_50: float, seed: int):
    with registry.tracked_run("seq", {"seed": seed}, {}) as run_id:
        # recall@20 deliberately ordered the other way: the gate must read recall@50
        mlflow.log_metrics({"best_valid_recall_at_50": recall_at_50, registry.SELECTION_METRIC: 1 - recall_at_50})
    return register_bundle(
        run_id, _mi_bundle(tmp_path, seed), NAME, {}, selection_metric="best_valid_recall_at_50"
    )


def test_the_gate_reads_the_selection_metric_of_the_bundle_kind(tracking, tmp_path):
    first = _sequential_version(tmp_path, 0.30, seed=1)
    tags = MlflowClient().get_model_version(NAME, first.version).tags
    assert tags[registry.SELECTION_METRIC_TAG] == "best_valid_recall_at_50"
    assert tags[registry.BUNDLE_KIND_TAG] == "multi_interest"
    assert registry.promote(NAME, first).alias == "champion"
    better = _sequential_version(tmp_path, 0.40, seed=2)
    promotion = registry.promote(NAME, better)
    assert (promotion.alias, promotion.selection_metric) == ("champion", "best_valid_recall_at_50")
    assert promotion.previous_metric == pytest.approx(0.30)
    # an embedding retriever (selected on recall@20, another protocol) is not comparable: it waits
    embedding = _trained_version(tmp_path, 0.99, seed=3)
    assert MlflowClient().get_model_version(NAME, embedding.version).tags[
        registry.BUNDLE_KIND_TAG] == "embedding"
    assert registry.promote(NAME, embedding).alias == "challenger"
    assert registry.resolve_alias(NAME).version == better.version


def test_a_displaced_champion_becomes_previous_and_every_version_says_why(tracking, tmp_path):
    first = _trained_version(tmp_path, 0.30, seed=1)
    registry.promote(NAME, first)
    better = _trained_version(tmp_path, 0.35, seed=2)
    assert registry.promote(NAME, better).alias == "champion"
    worse = _trained_version(tmp_path, 0.10, seed=3)
    registry.promote(NAME, worse)
    client = MlflowClient()
    aliases = {a: v for a, v in client.get_registered_model(NAME).aliases.items()}
    assert aliases == {"champion": better.version, "previous": first.version, "challenger": worse.version}
    described = {v: client.get_model_version(NAME, v).description for v in (first.version, better.version, worse.version)}
    assert "First version" in described[first.version]
    assert f"Beat champion v{first.version} (0.3000)" in described[better.version]
    assert f"Did not beat champion v{better.version} (0.3500): challenger" in described[worse.version]
    assert "best_valid_recall_at_20 = 0.1000" in described[worse.version]
    assert all(client.get_model_version(NAME, v).tags[registry.STATE_TAG] == "ready" for v in described)


def test_the_experiment_opens_on_training_runs(tracking):
    assert MlflowClient().get_experiment_by_name("kgrec").tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize(
    ("error", "status"),
    [(KeyboardInterrupt(), "KILLED"), (registry.TrainingCancelled("stop"), "KILLED"), (ValueError("x"), "FAILED")],
)
def test_a_cancelled_run_ends_killed_and_a_failed_one_failed(tracking, error, status):
    with pytest.raises(type(error)):
        with registry.tracked_run("m", {}, {}) as run_id:
            raise error
    run = MlflowClient().get_run(run_id)
    assert run.info.status == status
    assert run.data.tags[registry.OWNER_TAG] == registry.process_owner()


def _dead_owner() -> str:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return registry.process_owner().rsplit(":", 2)[0] + f":{child.stdout.strip()}:12345"


def test_orphans_of_dead_processes_are_reaped_and_live_work_is_left_alone(tracking, tmp_path):
    import time

    client = MlflowClient()
    champion = _trained_version(tmp_path, 0.30, seed=1)
    registry.promote(NAME, champion)
    orphan = _trained_version(tmp_path, 0.50, seed=2)  # registered, never published: SIGKILL
    client.set_model_version_tag(NAME, orphan.version, registry.OWNER_TAG, _dead_owner())
    live = _trained_version(tmp_path, 0.40, seed=3)  # pending, owned by this (live) process
    with mlflow.start_run(tags={registry.OWNER_TAG: _dead_owner()}) as stale:
        pass
    client.update_run(stale.info.run_id, status="RUNNING")  # what a SIGKILL mid-training leaves
    by_hand = client.create_model_version(NAME, source=champion.source, run_id=champion.run_id)  # untagged
    before = int(time.time() * 1000) + 1
    later = _trained_version(tmp_path, 0.45, seed=4)  # newer than the run: not its business
    client.set_model_version_tag(NAME, later.version, registry.OWNER_TAG, _dead_owner())

    reaped = registry.reap_orphans([NAME], before, experiment="kgrec")

    left = {v.version for v in client.search_model_versions(f"name='{NAME}'")}
    assert reaped.versions == [(NAME, str(orphan.version))]
    assert left == {champion.version, live.version, by_hand.version, later.version}
    assert client.get_run(orphan.run_id).info.status == "KILLED"
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert "orphan" in client.get_run(stale.info.run_id).data.tags["kgrec.error"]
    assert registry.resolve_alias(NAME).version == champion.version


def test_owner_liveness_tells_a_reused_pid_from_the_process(tracking):
    import os

    assert registry.owner_alive(registry.process_owner()) is True
    host, pid, _ = registry.process_owner().rsplit(":", 2)
    assert registry.owner_alive(f"{host}:{pid}:1") is False  # same pid, another start time
    assert registry.owner_alive(f"elsewhere:{os.getpid()}:1") is None
    assert registry.owner_alive(None) is None


def test_a_failure_after_the_alias_moved_does_not_roll_the_champion_back(tracking, tmp_path):
    first = _trained_version(tmp_path, 0.30, seed=1)
    with pytest.raises(RuntimeError, match="bookkeeping"):
        with registry.pending_version(NAME, first):
            registry.promote(NAME, first)
            raise RuntimeError("bookkeeping after promotion failed")
    assert registry.resolve_alias(NAME).version == first.version
