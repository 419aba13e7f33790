"""Load the registered champion (or any alias) into a ready-to-serve service.

The bundle's kind picks the service: an embedding retriever gives a
:class:`~kgrec.serving.candidates.CandidateService`, a multi-interest retriever a
:class:`~kgrec.serving.multi_interest.MultiInterestService` (:func:`open_service`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from kgrec.models.tracking.registry import CHAMPION, download_version, resolve_alias
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.serving.bundle import RetrievalBundle, bundle_kind
from kgrec.serving.candidates import CandidateService
from kgrec.serving.index import IndexConfig, build_index, load_index
from kgrec.serving.multi_interest import MultiInterestBundle, MultiInterestService
from kgrec.serving.ranking import RankerBundle

logger = logging.getLogger("kgrec.serving")


def open_service(
    bundle_dir: Path, index: Any = None, torch_threads: int | None = None
) -> CandidateService | Any:
    """The service for a bundle directory of either kind (``index``: a faiss index or None to
    build one). ``torch_threads`` applies to multi-interest models only (1 for a serving process:
    one request's tensors are far too small for intra-op threads)."""
    if bundle_kind(bundle_dir) == "multi_interest":

        return MultiInterestService(MultiInterestBundle.load(bundle_dir), index, torch_threads=torch_threads)
    return CandidateService(RetrievalBundle.load(bundle_dir), index)


def load_registered(
    tracking: TrackingSettings,
    model_name: str,
    alias: str = CHAMPION,
    cache_dir: Path | None = None,
    torch_threads: int | None = 1,
) -> tuple[CandidateService | Any, dict[str, Any]]:
    mlflow.set_tracking_uri(tracking.resolved_tracking_uri)
    version = resolve_alias(model_name, alias)
    destination = cache_dir or Path(tempfile.mkdtemp(prefix="kgrec-serve-"))
    bundle_dir, index_dir = download_version(version, destination / f"{model_name}-v{version.version}")
    if index_dir is not None:
        index, index_info = load_index(index_dir)
    else:  # versions registered before index publishing existed still serve, exactly
        logger.warning("%s v%s has no published index; building an exact one", model_name, version.version)
        item_embeddings = np.load(bundle_dir / "item_embeddings.npy", allow_pickle=False)
        index, index_info = build_index(item_embeddings, IndexConfig(kind="flat")), {"kind": "flat"}
    service = open_service(bundle_dir, index, torch_threads=torch_threads)
    bundle = service.bundle
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
    return service, info


def load_registered_ranker(
    tracking: TrackingSettings,
    model_name: str,
    alias: str = CHAMPION,
    cache_dir: Path | None = None,
    required: bool = True,
) -> tuple[Any, dict[str, Any]] | None:
    """The ranking stage's ``(RankerBundle, info)`` for ``model_name@alias``; ``None`` when it is
    not registered and not ``required``."""

    mlflow.set_tracking_uri(tracking.resolved_tracking_uri)
    try:
        version = resolve_alias(model_name, alias)
    except LookupError:
        if required:
            raise
        logger.info("no ranking model %s@%s registered: serving retrieval only", model_name, alias)
        return None
    destination = cache_dir or Path(tempfile.mkdtemp(prefix="kgrec-serve-"))
    bundle_dir, _ = download_version(version, destination / f"{model_name}-v{version.version}")
    bundle = RankerBundle.load(bundle_dir)
    info = {
        "name": model_name,
        "version": str(version.version),
        "alias": alias,
        "run_id": version.run_id,
        "snapshot_hash": bundle.meta.get("snapshot_hash"),
    }
    return bundle, info
