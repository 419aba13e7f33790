"""Publish a registered version's faiss index next to it in MLflow.

The index is saved with its checksum manifest (``save_index`` writes ``MANIFEST.json`` last), and the
manifest's own sha256 is recorded on the version (``INDEX_MANIFEST_TAG``) so the serving cache can
tell the published index from a rewritten one."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from kgrec.models.tracking.registry import INDEX_ARTIFACT, INDEX_TAG
from kgrec.serving.bundle import RetrievalBundle, bundle_kind
from kgrec.serving.index import IndexConfig, build_and_measure, save_index
from kgrec.serving.integrity import INDEX_MANIFEST_TAG, manifest_digest
from kgrec.serving.multi_interest import MultiInterestBundle
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger("kgrec.serving")

RECALL_K = 100


def publish_index(
    version: ModelVersion, bundle_dir: Path, config: IndexConfig | None = None
) -> dict[str, Any]:
    """Build the item index, measure recall@100 against exact search, store it with the version.

    The recall check's queries are what the service searches with: the user vectors of an embedding
    retriever, the interest vectors of (a sample of) the stored users' histories of a multi-interest
    retriever -- whose per-interest queries all search this one item index.
    """
    if bundle_kind(bundle_dir) == "multi_interest":

        mi_bundle = MultiInterestBundle.load(bundle_dir)
        items, queries = mi_bundle.item_embeddings, mi_bundle.sample_queries()
    else:
        bundle = RetrievalBundle.load(bundle_dir)
        items, queries = bundle.item_embeddings, bundle.user_embeddings
    index, info = build_and_measure(items, config, queries=queries, k=RECALL_K)
    info["model_version"] = str(version.version)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / INDEX_ARTIFACT
        save_index(index, index_dir, info)
        digest = manifest_digest(index_dir)  # save_index wrote the manifest last
        MlflowClient().log_artifacts(version.run_id, str(index_dir), artifact_path=INDEX_ARTIFACT)
    with mlflow.start_run(run_id=version.run_id):
        mlflow.log_metrics(
            {
                f"index_ann_recall_at_{info['ann_recall_k']}": info["ann_recall"],
                "index_build_seconds": info["build_seconds"],
            }
        )
        mlflow.set_tag("kgrec.index_kind", info["kind"])
    client = MlflowClient()
    client.set_model_version_tag(version.name, version.version, INDEX_MANIFEST_TAG, digest)
    client.set_model_version_tag(version.name, version.version, INDEX_TAG, INDEX_ARTIFACT)  # last
    logger.info(
        "published %s index for %s v%s: recall@%d=%.4f",
        info["kind"], version.name, version.version, info["ann_recall_k"], info["ann_recall"],
    )
    return info
