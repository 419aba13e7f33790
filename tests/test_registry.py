"""MLflow registration: the promotion gate, rollback of half-published versions, failed runs."""

from __future__ import annotations

import mlflow
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from kgrec.models.tracking import registry
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.export import register_bundle
from mlflow import MlflowClient

NAME = "kgrec-test"


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; undo it after each test.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KGREC_TRACKING_URI", raising=False)
    settings = TrackingSettings(workdir=tmp_path / "work", tracking_uri=None)
    registry.configure_tracking(settings)
    return settings


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
