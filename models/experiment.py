"""Training, evaluation and export of one model as one tracked MLflow run.

These are the library steps the Prefect flow wires together; each is usable without Prefect.
Sequential / multi-interest generators: :mod:`kgrec.models.sequential_experiment`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from kgrec.features.dataset import InteractionData
from kgrec.models.base import Recommender
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate_split
from kgrec.models.registry import SELECTION_METRIC, prefixed_metrics, tracked_run
from kgrec.models.trainer import EpochLog, FitResult, fit
from kgrec.models.zoo import build_model

logger = logging.getLogger("kgrec.models")


@dataclass
class TrainedModel:
    run_id: str
    config: TrainConfig
    model: Recommender
    fit: FitResult
    test_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.model

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "kind": "embedding",
            "run_id": self.run_id,
            "best_epoch": self.fit.best_epoch,
            "epochs_run": len(self.fit.history),
            "seconds_per_epoch": round(self.fit.seconds_per_epoch, 4),
            "selection_metric": self.config.selection_metric,
            "valid": {k: round(v, 5) for k, v in self.fit.best_valid.items() if "@" in k},
            "test": {k: round(v, 5) for k, v in self.test_metrics.items() if "@" in k},
        }


def data_params(data: InteractionData) -> dict[str, Any]:
    """What identifies the data a model saw: the snapshot hash and the split."""
    params: dict[str, Any] = {
        "num_users": data.num_users,
        "num_items": data.num_items,
        "num_train": int(data.train.nnz),
        "num_valid": int(data.valid.nnz),
        "num_test": int(data.test.nnz),
    }
    if data.snapshot is not None:
        params |= {"dataset": data.snapshot.name, "snapshot_hash": data.snapshot.hash}
    if data.split is not None:
        params |= {"split": data.split.kind, "split_seed": data.split.seed}
    return params


def _log_epoch(log: EpochLog) -> None:
    metrics = {"train_loss": log.loss, "epoch_seconds": log.seconds}
    if log.valid is not None:
        metrics |= prefixed_metrics("valid", log.valid)
    mlflow.log_metrics(metrics, step=log.epoch)


def train_and_log(
    data: InteractionData,
    config: TrainConfig,
    *,
    extra_params: dict[str, Any] | None = None,
    progress: bool = False,
) -> TrainedModel:
    """Train ``config.model`` with per-epoch logging; the run records config, data hash and curves."""
    params = {**config.to_dict(), **data_params(data), **(extra_params or {})}
    tags = {"kgrec.model": config.model, "kgrec.dataset": str(params.get("dataset", "unknown"))}
    run_name = f"{config.model}-{params.get('dataset', 'data')}"
    with tracked_run(run_name, params, tags) as run_id:
        torch.manual_seed(config.seed)
        model = build_model(config, data)
        result = fit(model, data, config, on_epoch=_log_epoch, progress=progress)
        mlflow.log_metrics(
            {
                **prefixed_metrics("best_valid", result.best_valid),
                "best_epoch": result.best_epoch,
                "seconds_per_epoch": result.seconds_per_epoch,
                "train_seconds": result.total_seconds,
            }
        )
    logger.info(
        "%s: best epoch %d, valid recall@20 %.4f, %.3f s/epoch",
        config.model, result.best_epoch, result.best_valid.get("recall@20", float("nan")),
        result.seconds_per_epoch,
    )
    return TrainedModel(run_id=run_id, config=config, model=model, fit=result)


def evaluate_and_log(trained: TrainedModel, data: InteractionData) -> dict[str, float]:
    """Full-ranking test metrics of the best-validation weights, logged to the model's run."""
    trained.model.eval()
    metrics = evaluate_split(trained.model, data, part="test")
    trained.test_metrics = metrics
    with mlflow.start_run(run_id=trained.run_id):
        mlflow.log_metrics(prefixed_metrics("test", metrics))
    return metrics


def export_bundle(trained: TrainedModel, data: InteractionData, directory: Path) -> Path:
    """Write the model's serving bundle (embeddings, id maps, seen items); registration logs it."""
    from kgrec.models.explain import attention_graph_of
    from kgrec.serving.bundle import RetrievalBundle

    if data.snapshot is None:
        raise ValueError("exporting a bundle needs the dataset snapshot for the id maps")
    with torch.no_grad():
        user_emb, item_emb = trained.model.embeddings()
    snapshot = data.snapshot
    bundle = RetrievalBundle(
        user_embeddings=user_emb.detach().cpu().numpy().astype(np.float32),
        item_embeddings=item_emb.detach().cpu().numpy().astype(np.float32),
        seen=(data.train + data.valid + data.test).tocsr(),
        users=snapshot.users.select("user_id", "user_idx"),
        items=snapshot.items.select("item_id", "item_idx", "name"),
        meta={
            "model": trained.name,
            "run_id": trained.run_id,
            "dataset": snapshot.name,
            "snapshot_hash": snapshot.hash,
            "dim": int(item_emb.shape[1]),
            "selection_metric": SELECTION_METRIC,
            "selection_value": trained.fit.best_valid.get("recall@20"),
        },
        attention_graph=attention_graph_of(trained.model, data),
    )
    target = directory / trained.run_id
    bundle.write(target)
    return target
