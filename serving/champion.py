"""Load the registered champion (or any alias) into a ready-to-serve service.

The bundle's kind picks the service: an embedding retriever gives a
:class:`~kgrec.serving.candidates.CandidateService`, a multi-interest retriever a
:class:`~kgrec.serving.multi_interest.MultiInterestService` (:func:`open_service`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from kgrec.models.tracking.registry import CHAMPION, resolve_alias
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.serving.bundle import RetrievalBundle, bundle_kind, read_meta
from kgrec.serving.cache import ServeCache
from kgrec.serving.candidates import CandidateService
from kgrec.serving.index import IndexConfig, build_index, check_index_matches, load_index
from kgrec.serving.multi_interest import MultiInterestBundle, MultiInterestService
from kgrec.serving.ranking import RankerBundle

logger = logging.getLogger("kgrec.serving")


def open_service(
    bundle_dir: Path, index: Any = None, torch_threads: int | None = None, exact: bool = False
) -> CandidateService | Any:
    """The service for a bundle directory of either kind (``index``: a faiss index or None to
    build one; ``exact``: build the exact index instead of the measured choice, for offline
    passes over a few hundred users that must not pay an ANN build). ``torch_threads`` applies
    to multi-interest models only (1 for a serving process: one request's tensors are far too
    small for intra-op threads)."""
    multi = bundle_kind(bundle_dir) == "multi_interest"
    bundle = MultiInterestBundle.load(bundle_dir) if multi else RetrievalBundle.load(bundle_dir)
    if index is None and exact:
        index = build_index(bundle.item_embeddings, IndexConfig(kind="flat"))
    if multi:
        return MultiInterestService(bundle, index, torch_threads=torch_threads)
    return CandidateService(bundle, index)


def load_registered(
    tracking: TrackingSettings,
    model_name: str,
    alias: str = CHAMPION,
    cache_dir: Path | None = None,
    torch_threads: int | None = 1,
    cache: ServeCache | None = None,
) -> tuple[CandidateService | Any, dict[str, Any]]:
    """The service for ``model_name@alias`` and its info. The version comes from the serving cache
    (``cache``, else a :class:`ServeCache` rooted at ``cache_dir``, else at its default root):
    reused when a verified copy is there, else downloaded and verified. A damaged bundle or index,
    or an index that does not fit the bundle, raises :class:`~kgrec.serving.integrity.IntegrityError`."""
    mlflow.set_tracking_uri(tracking.resolved_tracking_uri)
    version = resolve_alias(model_name, alias)
    fetched = (cache or ServeCache(cache_dir)).fetch(version)
    bundle_dir, index_dir = fetched.bundle_dir, fetched.index_dir
    if index_dir is not None:
        index, index_info = load_index(index_dir)
        meta = read_meta(bundle_dir)  # sizes checked against the payload when the bundle loads
        if "n_items" in meta and "dim" in meta:
            check_index_matches(index, meta["n_items"], meta["dim"], f"{model_name} v{version.version}'s index")
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
    cache: ServeCache | None = None,
) -> tuple[Any, dict[str, Any]] | None:
    """The ranking stage's ``(RankerBundle, info)`` for ``model_name@alias``; ``None`` when it is
    not registered and not ``required``. Fetched through the serving cache as :func:`load_registered`."""

    mlflow.set_tracking_uri(tracking.resolved_tracking_uri)
    try:
        version = resolve_alias(model_name, alias)
    except LookupError:
        if required:
            raise
        logger.info("no ranking model %s@%s registered: serving retrieval only", model_name, alias)
        return None
    bundle = RankerBundle.load((cache or ServeCache(cache_dir)).fetch(version).bundle_dir)
    info = {
        "name": model_name,
        "version": str(version.version),
        "alias": alias,
        "run_id": version.run_id,
        "snapshot_hash": bundle.meta.get("snapshot_hash"),
    }
    return bundle, info


class RegisteredModel:
    """A loader of ``model_name@alias`` that the service can watch: ``probe()`` names the version
    the alias points at now, ``()`` loads it (through the serve cache), ``retain(versions)`` prunes
    the cache to the versions still needed."""

    def __init__(self, tracking: TrackingSettings, model_name: str, alias: str = CHAMPION,
                 cache: ServeCache | None = None, torch_threads: int | None = 1) -> None:
        self.tracking, self.model_name, self.alias = tracking, model_name, alias
        self.cache = cache or ServeCache()
        self.torch_threads = torch_threads

    def probe(self) -> str:
        mlflow.set_tracking_uri(self.tracking.resolved_tracking_uri)
        return str(resolve_alias(self.model_name, self.alias).version)

    def __call__(self) -> tuple[CandidateService | Any, dict[str, Any]]:
        return load_registered(self.tracking, self.model_name, self.alias, cache=self.cache,
                               torch_threads=self.torch_threads)

    def retain(self, versions: set[str]) -> None:
        self.cache.prune(self.model_name, versions)


class RegisteredRanker(RegisteredModel):
    """The ranking stage's loader: like :class:`RegisteredModel`; an optional one (``required``
    False) that is not registered probes and loads as ``None``."""

    def __init__(self, tracking: TrackingSettings, model_name: str, alias: str = CHAMPION,
                 cache: ServeCache | None = None, required: bool = True) -> None:
        super().__init__(tracking, model_name, alias, cache)
        self.required = required

    def probe(self) -> str | None:
        try:
            return super().probe()
        except LookupError:
            if self.required:
                raise
            return None

    def __call__(self) -> tuple[Any, dict[str, Any]] | None:  # type: ignore[override]
        return load_registered_ranker(self.tracking, self.model_name, self.alias, cache=self.cache,
                                      required=self.required)
