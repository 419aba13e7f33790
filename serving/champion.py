"""Load the registered champion (or any alias) into a ready-to-serve CandidateService."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from kgrec.models.registry import CHAMPION, download_version, resolve_alias
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.candidates import CandidateService
from kgrec.serving.index import IndexConfig, build_index, load_index

from kgrec.config import TrackingSettings

logger = logging.getLogger("kgrec.serving")


def load_registered(
    tracking: TrackingSettings, model_name: str, alias: str = CHAMPION, cache_dir: Path | None = None
) -> tuple[CandidateService, dict[str, Any]]:
    mlflow.set_tracking_uri(tracking.resolved_tracking_uri)
    version = resolve_alias(model_name, alias)
    destination = cache_dir or Path(tempfile.mkdtemp(prefix="kgrec-serve-"))
    bundle_dir, index_dir = download_version(version, destination / f"{model_name}-v{version.version}")
    bundle = RetrievalBundle.load(bundle_dir)
    if index_dir is not None:
        index, index_info = load_index(index_dir)
    else:  # versions registered before index publishing existed still serve, exactly
        logger.warning("%s v%s has no published index; building an exact one", model_name, version.version)
        index, index_info = build_index(bundle.item_embeddings, IndexConfig(kind="flat")), {"kind": "flat"}
    info = {
        "name": model_name,
        "version": str(version.version),
        "alias": alias,
        "run_id": version.run_id,
        "model": bundle.meta.get("model"),
        "dataset": bundle.meta.get("dataset"),
        "snapshot_hash": bundle.meta.get("snapshot_hash"),
        "index": {k: index_info.get(k) for k in ("kind", "ntotal", "ann_recall") if k in index_info},
    }
    return CandidateService(bundle, index), info
