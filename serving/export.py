"""From a trained model to a registered, servable version: bundle export and MLflow registration.

* :func:`export_bundle` -- the artefact of a :class:`~kgrec.models.tracking.experiment.Trained`
  model, by its artefact kind: an embedding retriever's :class:`RetrievalBundle`, a sequential
  model's :class:`MultiInterestBundle`, a ranker's :class:`RankerBundle`.
* :func:`register_bundle` -- log a bundle as an MLflow pyfunc model in its run and register it as
  a version linked to that logged model, tagged with its kind and selection metric.
* :func:`register_trained` -- both, for a trained model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import numpy as np
import torch
from kgrec.features.sequences import ordered_sequences, raw_id_order
from kgrec.features.snapshot import Snapshot
from kgrec.models.explain import attention_graph_of
from kgrec.models.tracking.experiment import Trained
from kgrec.models.tracking.registry import (
    BUNDLE_KIND_TAG,
    MODEL_ARTIFACT,
    RANKER_KIND,
    SELECTION_METRIC,
    SELECTION_METRIC_TAG,
    create_version,
)
from kgrec.serving.bundle import RetrievalBundle, bundle_kind
from kgrec.serving.multi_interest import MultiInterestBundle
from kgrec.serving.publish import publish_index
from kgrec.serving.pyfunc import PairScorer, TopKRecommender, ranker_signature, signature
from kgrec.serving.ranking import RankerBundle
from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger("kgrec.serving")


def _selection(trained: Trained) -> dict[str, object]:
    return {"selection_metric": trained.selection_metric, "selection_value": trained.selection_value}


def _identity(trained: Trained, snapshot: Snapshot) -> dict[str, object]:
    return {"model": trained.name, "run_id": trained.run_id, "dataset": snapshot.name, "snapshot_hash": snapshot.hash}


def _embedding_bundle(trained: Trained, target: Path) -> Path:
    data = trained.inputs
    if data.snapshot is None:
        raise ValueError("exporting a bundle needs the dataset snapshot for the id maps")
    with torch.no_grad():
        user_emb, item_emb = trained.model.embeddings()
    snapshot = data.snapshot
    RetrievalBundle(
        user_embeddings=user_emb.detach().cpu().numpy().astype(np.float32),
        item_embeddings=item_emb.detach().cpu().numpy().astype(np.float32),
        seen=(data.train + data.valid + data.test).tocsr(),
        users=snapshot.users.select("user_id", "user_idx"),
        items=snapshot.items.select("item_id", "item_idx", "name"),
        meta={**_identity(trained, snapshot), "dim": int(item_emb.shape[1]), **_selection(trained)},
        attention_graph=attention_graph_of(trained.model, data),
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


def serving_requirements(with_torch: bool = False) -> list[str]:
    """The installed versions of what the pyfunc model needs at load time (multi-interest models
    and rankers compute with torch)."""
    pins = []
    packages = ("kgrec", "numpy", "scipy", "polars", "pyarrow", "faiss-cpu", "pandas")
    for package in packages + (("torch",) if with_torch else ()):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def register_bundle(
    run_id: str,
    bundle_dir: Path,
    name: str,
    tags: Mapping[str, str],
    selection_metric: str = SELECTION_METRIC,
) -> ModelVersion:
    """Log the bundle as an MLflow pyfunc model inside ``run_id`` and register it under ``name``,
    tagged with the bundle's kind and ``selection_metric`` (the run metric the gate compares)."""
    kind = bundle_kind(bundle_dir)
    ranker = kind == RANKER_KIND
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=PairScorer() if ranker else TopKRecommender(),
            artifacts={"bundle": str(bundle_dir)},
            signature=ranker_signature() if ranker else signature(),
            # Explicit requirements: MLflow's inference would re-import the model in a subprocess.
            pip_requirements=serving_requirements(with_torch=kind in ("multi_interest", RANKER_KIND)),
        )
    tags = {**dict(tags), BUNDLE_KIND_TAG: kind, SELECTION_METRIC_TAG: selection_metric}
    description = "kgrec ranking models" if ranker else "kgrec candidate-retrieval models"
    return create_version(run_id, info, name, tags, description=description)


def register_trained(trained: Trained, bundle_root: Path, name: str) -> tuple[ModelVersion, Path]:
    """Export ``trained``'s bundle and register it as a version of ``name``."""
    bundle_dir = export_bundle(trained, bundle_root)
    snapshot = trained.family.snapshot(trained.inputs)
    tags = {"kgrec.model": trained.name, "kgrec.snapshot_hash": snapshot.hash}
    return register_bundle(trained.run_id, bundle_dir, name, tags, trained.selection_metric), bundle_dir


def publish_index_for(trained: Trained, version: ModelVersion, bundle_dir: Path) -> dict[str, object] | None:
    """Publish the faiss index of a retrieval version; a ranker scores pairs and has none."""
    return None if trained.kind == RANKER_KIND else publish_index(version, bundle_dir)
