"""Publish a registered version's faiss index next to it in MLflow."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from kgrec.models.registry import INDEX_ARTIFACT, INDEX_TAG
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.index import IndexConfig, ann_recall, build_index, save_index

logger = logging.getLogger("kgrec.serving")

RECALL_K = 100
RECALL_QUERIES = 2000


def publish_index(
    version: ModelVersion, bundle_dir: Path, config: IndexConfig | None = None, seed: int = 0
) -> dict[str, Any]:
    """Build the item index, measure its recall against exact search, store it with the version.

    The user vectors are the queries of the recall check: they are what the service searches with.
    """
    config = config or IndexConfig()
    bundle = RetrievalBundle.load(bundle_dir)
    started = time.perf_counter()
    index = build_index(bundle.item_embeddings, config)
    build_seconds = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    n_queries = min(RECALL_QUERIES, len(bundle.user_embeddings))
    queries = bundle.user_embeddings[rng.choice(len(bundle.user_embeddings), n_queries, replace=False)]
    k = min(RECALL_K, len(bundle.item_embeddings))
    recall = ann_recall(index, bundle.item_embeddings, queries, k)
    info = {
        "ntotal": int(index.ntotal),
        "dim": int(bundle.item_embeddings.shape[1]),
        "ann_recall_k": k,
        "ann_recall": recall,
        "build_seconds": build_seconds,
        "model_version": str(version.version),
    }
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / INDEX_ARTIFACT
        save_index(index, index_dir, info | {"config": config_dict(config)})
        client = MlflowClient()
        client.log_artifacts(version.run_id, str(index_dir), artifact_path=INDEX_ARTIFACT)
    with mlflow.start_run(run_id=version.run_id):
        mlflow.log_metrics({f"index_ann_recall_at_{k}": recall, "index_build_seconds": build_seconds})
    client.set_model_version_tag(version.name, version.version, INDEX_TAG, INDEX_ARTIFACT)
    logger.info("published index for %s v%s: recall@%d=%.4f", version.name, version.version, k, recall)
    return info


def config_dict(config: IndexConfig) -> dict[str, Any]:
    dump = getattr(config, "model_dump", None)
    return dump() if dump else dict(config.__dict__)
