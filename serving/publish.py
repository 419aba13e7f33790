"""Publish a registered version's faiss index next to it in MLflow."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from kgrec.models.registry import INDEX_ARTIFACT, INDEX_TAG
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.index import IndexConfig, build_and_measure, save_index
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger("kgrec.serving")

RECALL_K = 100


def publish_index(
    version: ModelVersion, bundle_dir: Path, config: IndexConfig | None = None
) -> dict[str, Any]:
    """Build the item index, measure recall@100 against exact search, store it with the version.

    The user vectors are the recall check's queries: they are what the service searches with.
    """
    bundle = RetrievalBundle.load(bundle_dir)
    index, info = build_and_measure(
        bundle.item_embeddings, config, queries=bundle.user_embeddings, k=RECALL_K
    )
    info["model_version"] = str(version.version)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / INDEX_ARTIFACT
        save_index(index, index_dir, info)
        MlflowClient().log_artifacts(version.run_id, str(index_dir), artifact_path=INDEX_ARTIFACT)
    with mlflow.start_run(run_id=version.run_id):
        mlflow.log_metrics(
            {
                f"index_ann_recall_at_{info['ann_recall_k']}": info["ann_recall"],
                "index_build_seconds": info["build_seconds"],
            }
        )
        mlflow.set_tag("kgrec.index_kind", info["kind"])
    MlflowClient().set_model_version_tag(version.name, version.version, INDEX_TAG, INDEX_ARTIFACT)
    logger.info(
        "published %s index for %s v%s: recall@%d=%.4f",
        info["kind"], version.name, version.version, info["ann_recall_k"], info["ann_recall"],
    )
    return info
