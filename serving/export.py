"""From a trained model to a registered, servable version: bundle export and MLflow registration.

* :func:`export_bundle` -- the artefact of a :class:`~kgrec.models.tracking.experiment.Trained`
  model, by its artefact kind: an embedding retriever's :class:`RetrievalBundle`, a sequential
  model's :class:`MultiInterestBundle`, a ranker's :class:`RankerBundle`. A KGAT bundle also
  carries what embeds an item posted after training (:func:`item_embedder`, ``inductive/``).
* :func:`register_bundle` -- log a bundle as an MLflow pyfunc model (models from code, named
  after the model: :func:`kgrec.serving.pyfunc.log_bundle_model`) in its run and register it as
  a version linked to that logged model, tagged with its kind and selection metric.
* :func:`log_run_plots` -- the diagnostic plots of the run (:mod:`kgrec.models.tracking.plots`):
  test Recall/NDCG@K, training curves, and the popularity bias of the served top-k lists
  (:func:`log_popularity_bias`, through the exported bundle's service).
* :func:`register_trained` -- all of them, for a trained model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
import numpy as np
import torch
from kgrec.features.sequences import ordered_sequences, raw_id_order
from kgrec.features.snapshot import Snapshot
from kgrec.models.cold_start import InductiveKGAT, choose_ego
from kgrec.models.explain import attention_graph_of
from kgrec.models.retrievers.kgat import KGAT
from kgrec.models.tracking import plots
from kgrec.models.tracking.experiment import Trained
from kgrec.models.tracking.registry import (
    BUNDLE_KIND_TAG,
    MODEL_ARTIFACT,
    RANKER_KIND,
    SELECTION_METRIC,
    SELECTION_METRIC_TAG,
    create_version,
)
from kgrec.serving.bundle import RetrievalBundle, bundle_kind, id_lookup, read_meta
from kgrec.serving.champion import open_service
from kgrec.serving.inductive import ItemEmbedder
from kgrec.serving.multi_interest import MultiInterestBundle
from kgrec.serving.publish import publish_index
from kgrec.serving.pyfunc import log_bundle_model
from kgrec.serving.ranking import RankerBundle
from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger("kgrec.serving")


def _selection(trained: Trained) -> dict[str, object]:
    return {"selection_metric": trained.selection_metric, "selection_value": trained.selection_value}


def _identity(trained: Trained, snapshot: Snapshot) -> dict[str, object]:
    return {"model": trained.name, "run_id": trained.run_id, "dataset": snapshot.name, "snapshot_hash": snapshot.hash}


#: choose_ego re-embeds every warm item four times and ranks the validation users: up to this many
#: items that is seconds; above it the export takes the "regress" estimate without a selection.
CHOOSE_EGO_MAX_ITEMS = 100_000
DEFAULT_EGO = "regress"


def item_embedder(model: object, data: object) -> ItemEmbedder | None:
    """What a KGAT bundle stores to embed posted items (:mod:`kgrec.serving.inductive`), None for
    other models (no inductive path) or data without a knowledge graph. The ego estimate is picked
    on validation (:func:`~kgrec.models.cold_start.choose_ego`) up to :data:`CHOOSE_EGO_MAX_ITEMS`
    items, else :data:`DEFAULT_EGO`; which one and how are recorded."""
    snapshot = getattr(data, "snapshot", None)
    if not isinstance(model, KGAT) or snapshot is None or snapshot.n_relations == 0:
        return None
    if model.num_relations != 2 + 2 * snapshot.n_relations or model.num_items != snapshot.n_items:
        logger.warning("KGAT's graph does not match the snapshot's KG: its bundle cannot embed new items")
        return None
    inductive = InductiveKGAT(model)
    info: dict[str, object]
    if snapshot.n_items <= CHOOSE_EGO_MAX_ITEMS and getattr(data, "valid", None) is not None and data.valid.nnz:
        ego, figures = choose_ego(inductive, data)
        info = {"ego_selection": "validation", "ego_valid_recall@20": figures}
    else:
        ego, info = DEFAULT_EGO, {"ego_selection": "default"}
    logger.info("KGAT bundle: posted items are embedded with the %r ego estimate (%s)", ego, info["ego_selection"])
    return ItemEmbedder.from_model(inductive, snapshot, ego, info)


def _embedding_bundle(trained: Trained, target: Path) -> Path:
    data = trained.inputs
    if data.snapshot is None:
        raise ValueError("exporting a bundle needs the dataset snapshot for the id maps")
    with torch.no_grad():
        user_emb, item_emb = trained.model.embeddings()
    snapshot = data.snapshot
    embedder = item_embedder(trained.model, data)
    inductive_meta = {} if embedder is None else {"item_embedding": embedder.describe()}
    RetrievalBundle(
        user_embeddings=user_emb.detach().cpu().numpy().astype(np.float32),
        item_embeddings=item_emb.detach().cpu().numpy().astype(np.float32),
        seen=(data.train + data.valid + data.test).tocsr(),
        users=snapshot.users.select("user_id", "user_idx"),
        items=snapshot.items.select("item_id", "item_idx", "name"),
        meta={**_identity(trained, snapshot), "dim": int(item_emb.shape[1]), **_selection(trained),
              **inductive_meta},
        attention_graph=attention_graph_of(trained.model, data),
        inductive=embedder,
    ).write(target)
    return target


def user_histories(snapshot: Snapshot) -> list[np.ndarray]:
    """Every user's FULL time-ordered ``item_idx`` history, indexed by ``user_idx`` (ties broken by
    raw item id, as in the sequential split)."""
    users, sequences = ordered_sequences(snapshot.interactions, raw_id_order(snapshot.items))
    out = [np.zeros(0, np.int64)] * snapshot.n_users
    for u, seq in zip(users.tolist(), sequences):
        out[u] = seq
    return out


def _multi_interest_bundle(trained: Trained, target: Path) -> Path:
    snapshot, model = trained.inputs.snapshot, trained.model
    columns = ["item_id", "item_idx", "name"] + (["categories"] if snapshot.has_categories else [])
    MultiInterestBundle.from_model(
        model,
        items=snapshot.items.select(columns),
        users=snapshot.users.select("user_id", "user_idx"),
        histories=user_histories(snapshot),
        meta={
            **_identity(trained, snapshot),
            "kind": "multi_interest",
            "model_class": type(model).__name__,
            "split_seed": trained.inputs.split.seed,
            "num_interests": int(model.num_interests),
            "active_interests": int(1 if model.num_interests == 1 else trained.config.num_interests),
            "merge_rule": model.merge_rule,
            "max_length": int(model.max_length),
            "test_recall_at_50": trained.test_metrics.get("recall@50"),
            **_selection(trained),
        },
    ).write(target)
    return target


def _ranker_bundle(trained: Trained, target: Path) -> Path:
    inputs = trained.inputs
    snapshot = inputs.data.snapshot
    if snapshot is None:
        raise ValueError("exporting a ranker needs the dataset snapshot for the id maps")
    RankerBundle(
        model=trained.model,
        users=snapshot.users.select("user_id", "user_idx"),
        items=snapshot.items.select("item_id", "item_idx"),
        meta={
            **_identity(trained, snapshot),
            "alpha": trained.fit.best_valid["alpha"],
            "num_candidates": trained.config.num_candidates,
            "retriever": inputs.retriever_name,
            "retriever_run_id": inputs.retriever_run_id,
            **_selection(trained),
        },
    ).write(target)
    return target


#: Artefact kind -> exporter (the kinds of :mod:`kgrec.models.families`).
EXPORTERS: Mapping[str, Callable[[Trained, Path], Path]] = {
    "embedding": _embedding_bundle,
    "multi_interest": _multi_interest_bundle,
    RANKER_KIND: _ranker_bundle,
}


def export_bundle(trained: Trained, directory: Path) -> Path:
    """Write ``trained``'s serving bundle to ``directory / run_id`` (atomically) and return it."""
    return EXPORTERS[trained.kind](trained, Path(directory) / trained.run_id)


def register_bundle(
    run_id: str,
    bundle_dir: Path,
    name: str,
    tags: Mapping[str, str],
    selection_metric: str = SELECTION_METRIC,
    model_name: str | None = None,
) -> ModelVersion:
    """Log the bundle as an MLflow pyfunc model inside ``run_id`` and register it under ``name``,
    tagged with the bundle's kind and ``selection_metric`` (the run metric the gate compares).

    The logged model is named after the model (``model_name``, else the bundle's ``meta.json``
    ``model``): ``lightgcn``, ``kcan``, ... in the run's and the experiment's model lists."""
    kind = bundle_kind(bundle_dir)
    ranker = kind == RANKER_KIND
    logged_name = model_name or str(read_meta(bundle_dir).get("model") or MODEL_ARTIFACT)
    with mlflow.start_run(run_id=run_id):
        info = log_bundle_model(bundle_dir, logged_name)
    tags = {**dict(tags), BUNDLE_KIND_TAG: kind, SELECTION_METRIC_TAG: selection_metric}
    description = "kgrec ranking models" if ranker else "kgrec candidate-retrieval models"
    return create_version(run_id, info, name, tags, description=description)


#: Users sampled (fixed seed) for the popularity-bias plot, and the list length examined.
POPULARITY_USERS = 500
POPULARITY_K = 20
POPULARITY_SEED = 0


def log_popularity_bias(
    trained: Trained, bundle_dir: Path, k: int = POPULARITY_K, n_users: int = POPULARITY_USERS,
    seed: int = POPULARITY_SEED,
) -> dict[str, float] | None:
    """The popularity bias of the served top-``k`` lists of ``n_users`` users sampled with
    ``seed`` (the exported bundle through :func:`~kgrec.serving.champion.open_service`, as served),
    against the popularity of the items in the snapshot's interactions: metrics and
    :data:`~kgrec.models.tracking.plots.POPULARITY_BIAS_PLOT` logged to the run. None for a
    ranker (it scores given pairs and serves no lists of its own)."""
    if bundle_kind(bundle_dir) == RANKER_KIND:
        return None
    # 500 users against an exact index: cheaper than the ANN build it would otherwise trigger
    # above exact_threshold (the published index is built once, by publish_index).
    service = open_service(bundle_dir, exact=True)
    bundle = service.bundle
    user_ids = sorted(bundle.users["user_id"].to_list())
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(user_ids), size=min(n_users, len(user_ids)), replace=False)
    k = max(1, min(k, service.n_items))
    results = service.for_users([user_ids[i] for i in sorted(sample)], k)
    item_index = id_lookup(bundle.items, "item_id", "item_idx")
    recommended = [np.array([item_index[i] for i in r.item_ids], np.int64) for r in results if r is not None]
    snapshot = trained.family.snapshot(trained.inputs)
    counts = np.bincount(snapshot.interactions["item_idx"].to_numpy(), minlength=bundle.n_items)
    bias = plots.popularity_bias(recommended, counts, k, title=trained.name)
    plots.log_popularity_bias(trained.run_id, bias)
    return bias.metrics


def log_run_plots(trained: Trained, bundle_dir: Path) -> list[str]:
    """Log the run's diagnostic plots (module docstring); returns the artefact paths logged. A
    plot that fails is logged as a warning: diagnostics never fail a registration."""
    logged: list[str] = []
    try:
        logged += plots.log_model_plots(
            trained.run_id, trained.test_metrics, trained.fit.history, trained.config.selection_metric,
            trained.fit.best_epoch, title=trained.name,
        )
    except Exception:
        logger.warning("%s: could not plot the test metrics / training curves", trained.name, exc_info=True)
    try:
        if log_popularity_bias(trained, bundle_dir) is not None:
            logged.append(plots.POPULARITY_BIAS_PLOT)
    except Exception:
        logger.warning("%s: could not plot the popularity bias", trained.name, exc_info=True)
    return logged


def register_trained(trained: Trained, bundle_root: Path, name: str) -> tuple[ModelVersion, Path]:
    """Export ``trained``'s bundle, log its run's plots and register it as a version of ``name``
    (the logged model named after the model)."""
    bundle_dir = export_bundle(trained, bundle_root)
    log_run_plots(trained, bundle_dir)
    snapshot = trained.family.snapshot(trained.inputs)
    tags = {"kgrec.model": trained.name, "kgrec.snapshot_hash": snapshot.hash}
    version = register_bundle(
        trained.run_id, bundle_dir, name, tags, trained.selection_metric, model_name=trained.name
    )
    return version, bundle_dir


def publish_index_for(trained: Trained, version: ModelVersion, bundle_dir: Path) -> dict[str, object] | None:
    """Publish the faiss index of a retrieval version; a ranker scores pairs and has none."""
    return None if trained.kind == RANKER_KIND else publish_index(version, bundle_dir)
