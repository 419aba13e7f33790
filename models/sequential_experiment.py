"""Training, evaluation and export of one sequential / multi-interest candidate generator as one
tracked MLflow run -- the sequential counterpart of :mod:`kgrec.models.experiment`.

Library steps (no Prefect), wired together by the pipeline flow:

* :func:`train_sequential_and_log` -- one MLflow run: the validated
  :class:`~kgrec.models.sequential_zoo.SequentialModelConfig` and the data's identity (snapshot hash,
  split seed and sizes) as params, per-epoch ``train_loss`` / ``valid_recall_at_50`` / ... as
  metrics (step = epoch), then ``best_valid_*`` (the promotion gate reads
  ``best_valid_recall_at_50``), ``best_epoch``, ``seconds_per_epoch``;
* :func:`evaluate_sequential_and_log` -- test Recall/HitRate/NDCG@20/50, diversity@50 and interest
  similarity through the serving merge path, logged as ``test_*``;
* :func:`export_multi_interest_bundle` -- the
  :class:`~kgrec.serving.multi_interest.MultiInterestBundle` that registration logs and the service
  loads (model, item embeddings, items with categories, every user's full ordered history).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from kgrec.features.sequences import SequenceSplit, ordered_sequences, raw_id_order
from kgrec.features.snapshot import Snapshot
from kgrec.models.sequential.multi_interest import MultiInterestModel
from kgrec.models.registry import prefixed_metrics, tracked_run
from kgrec.models.sequential_evaluation import category_matrix, evaluate_sequential
from kgrec.models.sequential_trainer import SequentialFitResult, fit_sequential
from kgrec.models.sequential_zoo import SequentialModelConfig, build_sequential_model

logger = logging.getLogger("kgrec.models")

KIND = "multi_interest"


def _metrics_only(metrics: dict[str, Any]) -> dict[str, float]:
    """The metric entries of an evaluation dict (``recall@50``, ..., ``interest_similarity``)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if ("@" in k or k == "interest_similarity") and isinstance(v, int | float)
    }


def _rounded(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {k: (round(v, 5) if math.isfinite(v) else None) for k, v in _metrics_only(metrics).items()}


@dataclass
class TrainedSequentialModel:
    """A trained sequential model, its run and the data it was trained on."""

    run_id: str
    config: SequentialModelConfig
    model: MultiInterestModel
    fit: SequentialFitResult
    snapshot: Snapshot
    split: SequenceSplit
    categories: np.ndarray | None = None
    test_metrics: dict[str, Any] = field(default_factory=dict)

    kind = KIND

    @property
    def name(self) -> str:
        return self.config.model

    @property
    def selection_metric(self) -> str:
        """MLflow metric the promotion gate compares (``best_valid_recall_at_50``)."""
        return self.config.mlflow_selection_metric

    @property
    def seconds_per_epoch(self) -> float:
        return self.fit.train_seconds / max(1, len(self.fit.history))

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "kind": KIND,
            "run_id": self.run_id,
            "best_epoch": self.fit.best_epoch,
            "epochs_run": len(self.fit.history),
            "seconds_per_epoch": round(self.seconds_per_epoch, 4),
            "selection_metric": self.config.selection_metric,
            "valid": _rounded(self.fit.best_valid),
            "test": _rounded(self.test_metrics),
        }


def sequence_data_params(snapshot: Snapshot, split: SequenceSplit) -> dict[str, Any]:
    """What identifies the data a sequential model saw: snapshot hash, split kind, seed and sizes."""
    return {
        "dataset": snapshot.name,
        "snapshot_hash": snapshot.hash,
        "split": "sequential",
        "split_seed": split.seed,
        "split_ratios": ",".join(str(r) for r in split.ratios),
        "target_ratio": split.target_ratio,
        "num_users": split.num_users,
        "num_items": split.num_items,
        **{f"num_{k}": v for k, v in split.summary().items()},
    }


def item_categories(snapshot: Snapshot) -> np.ndarray | None:
    """``[I, G]`` multi-hot item categories (for diversity@50), or None without categories."""
    return category_matrix(snapshot.item_categories())[0] if snapshot.has_categories else None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _epoch_logger(prefix: str = ""):
    def log(entry: dict[str, Any]) -> None:
        metrics = {f"{prefix}train_loss": entry["loss"], f"{prefix}epoch_seconds": entry["seconds"]}
        metrics |= prefixed_metrics(f"{prefix}valid", _metrics_only(entry["valid"]))
        mlflow.log_metrics(metrics, step=entry["epoch"])

    return log


def train_sequential_and_log(
    snapshot: Snapshot,
    split: SequenceSplit,
    config: SequentialModelConfig,
    *,
    categories: np.ndarray | None = None,
    extra_params: dict[str, Any] | None = None,
) -> TrainedSequentialModel:
    """Train ``config.model`` on ``split`` as one MLflow run (module docstring).

    ``mixture`` first trains a YouTube-DNN with the same configuration (its curves are logged as
    ``base_train_loss`` / ``base_valid_*``), then clusters that model's item vectors; its
    ``valid_*`` / ``best_valid_*`` metrics are the mixture's own. ``categories`` (default: the
    snapshot's item categories) add ``diversity@50`` to the validation and test metrics.
    """
    if split.num_items != snapshot.n_items:
        raise ValueError(f"split has {split.num_items} items, snapshot {snapshot.n_items}")
    categories = item_categories(snapshot) if categories is None else categories
    if config.merge_rule == "controllable" and categories is None:
        raise ValueError(
            f"{config.model}: merge_rule 'controllable' chooses by item categories and {snapshot.name} has none"
        )
    params = {**config.to_dict(), **sequence_data_params(snapshot, split), **(extra_params or {})}
    tags = {"kgrec.model": config.model, "kgrec.dataset": snapshot.name, "kgrec.bundle_kind": KIND}
    train_config = config.train_config()
    with tracked_run(f"{config.model}-{snapshot.name}", params, tags) as run_id, torch_threads(
        config.torch_threads
    ):
        torch.manual_seed(config.seed)
        if config.model == "mixture":
            base = build_sequential_model(config.model_copy(update={"model": "youtube_dnn"}), split.num_items)
            base_fit = fit_sequential(base, split, train_config, categories, on_epoch=_epoch_logger("base_"))
            t0 = time.perf_counter()
            model = build_sequential_model(config, split.num_items)
            model.fit(base.item_embeddings().detach().cpu().numpy())
            valid = evaluate_sequential(model, split.valid_inputs, split.valid_targets, categories, ks=config.ks)
            seconds = time.perf_counter() - t0
            mlflow.log_metrics(prefixed_metrics("valid", _metrics_only(valid)), step=1)
            result = SequentialFitResult(
                best_epoch=base_fit.best_epoch,
                best_valid=valid,
                history=base_fit.history,
                train_seconds=base_fit.train_seconds + seconds,
                total_seconds=base_fit.total_seconds + seconds,
                num_samples=base_fit.num_samples,
            )
        else:
            model = build_sequential_model(config, split.num_items)
            result = fit_sequential(model, split, train_config, categories, on_epoch=_epoch_logger())
        if not result.best_valid:
            raise RuntimeError(f"{config.model}: no validation result (no validation users?)")
        trained = TrainedSequentialModel(run_id, config, model, result, snapshot, split, categories)
        mlflow.log_metrics(
            {
                **prefixed_metrics("best_valid", _metrics_only(result.best_valid)),
                "best_epoch": result.best_epoch,
                "seconds_per_epoch": trained.seconds_per_epoch,
                "train_seconds": result.train_seconds,
            }
        )
    logger.info(
        "%s: best epoch %d, valid %s %.4f, %.3f s/epoch",
        config.model, result.best_epoch, config.selection_metric,
        result.best_valid.get(config.selection_metric, float("nan")), trained.seconds_per_epoch,
    )
    return trained


def evaluate_sequential_and_log(trained: TrainedSequentialModel) -> dict[str, Any]:
    """Test metrics of the best-validation weights through the serving merge path, logged as
    ``test_recall_at_50``, ``test_diversity_at_50``, ``test_interest_similarity``, ..."""
    split, config = trained.split, trained.config
    with torch_threads(config.torch_threads):
        metrics = evaluate_sequential(
            trained.model, split.test_inputs, split.test_targets, trained.categories, ks=config.ks
        )
    trained.test_metrics = metrics
    with mlflow.start_run(run_id=trained.run_id):
        mlflow.log_metrics(prefixed_metrics("test", _metrics_only(metrics)))
        if "num_users" in metrics:
            mlflow.log_metric("test_num_users", metrics["num_users"])
    return metrics


def user_histories(snapshot: Snapshot) -> list[np.ndarray]:
    """Every user's FULL time-ordered ``item_idx`` history, indexed by ``user_idx`` (ties broken by
    raw item id, as in the sequential split)."""
    users, sequences = ordered_sequences(snapshot.interactions, raw_id_order(snapshot.items))
    out = [np.zeros(0, np.int64)] * snapshot.n_users
    for u, seq in zip(users.tolist(), sequences):
        out[u] = seq
    return out


def export_multi_interest_bundle(trained: TrainedSequentialModel, directory: Path) -> Path:
    """Write the model's multi-interest serving bundle to ``directory / run_id``; registration
    logs it."""
    from kgrec.serving.multi_interest import MultiInterestBundle

    snapshot, model = trained.snapshot, trained.model
    columns = ["item_id", "item_idx", "name"] + (["categories"] if snapshot.has_categories else [])
    bundle = MultiInterestBundle.from_model(
        model,
        items=snapshot.items.select(columns),
        users=snapshot.users.select("user_id", "user_idx"),
        histories=user_histories(snapshot),
        meta={
            "kind": KIND,
            "model": trained.name,
            "model_class": type(model).__name__,
            "run_id": trained.run_id,
            "dataset": snapshot.name,
            "snapshot_hash": snapshot.hash,
            "split_seed": trained.split.seed,
            "num_interests": int(model.num_interests),
            "active_interests": int(trained.config.num_interests if trained.name != "youtube_dnn" else 1),
            "merge_rule": model.merge_rule,
            "max_length": int(model.max_length),
            "selection_metric": trained.selection_metric,
            "selection_value": trained.fit.best_valid.get(trained.config.selection_metric),
            "test_recall_at_50": trained.test_metrics.get("recall@50"),
        },
    )
    target = directory / trained.run_id
    bundle.write(target)
    return target
