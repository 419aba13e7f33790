"""Training, evaluation and export of the ranking stage (KCAN) as one tracked MLflow run.

The ranking counterpart of :mod:`kgrec.models.experiment`; library steps the flow wires together:

* :func:`train_ranker_and_log` -- one MLflow run: :class:`~kgrec.models.reranking.KCANConfig`, the
  data's identity and the retriever it re-ranks as params; per-epoch validation NDCG@20 (KCAN alone
  and fused) as metrics; then ``best_valid_ndcg_at_20`` (fused list, the promotion gate's metric),
  ``alpha`` and ``best_epoch``;
* :func:`evaluate_ranker_and_log` -- test Recall/NDCG@20 of retrieval alone, KCAN alone and the
  fused list on the retriever's top-N, logged as ``test_retrieval_*``, ``test_kcan_*``, ``test_*``;
* :func:`export_ranker_bundle` -- the :class:`~kgrec.serving.ranking.RankerBundle` that
  registration logs and the service loads.

A ranker is trained on one retriever's candidates (hard negatives, fusion weight) but scores any
``(user, item)`` pair of its snapshot, so the service may pair it with a later retrieval champion.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from kgrec.features.dataset import InteractionData
from kgrec.models.experiment import TrainedModel, data_params
from kgrec.models.rankers.kcan import KCAN
from kgrec.models.registry import prefixed_metrics, tracked_run
from kgrec.models.reranking import KCANConfig, KCANFitResult, evaluate_reranking, train_kcan

logger = logging.getLogger("kgrec.models")

RANKER_SELECTION_METRIC = "best_valid_ndcg_at_20"


@dataclass
class TrainedRanker:
    run_id: str
    config: KCANConfig
    model: KCAN
    fit: KCANFitResult
    retriever: str
    retriever_run_id: str
    test_metrics: dict[str, Any] = field(default_factory=dict)

    name = "kcan"
    kind = "ranker"
    selection_metric = RANKER_SELECTION_METRIC

    def summary(self) -> dict[str, Any]:
        test = self.test_metrics
        return {
            "model": self.name,
            "kind": self.kind,
            "run_id": self.run_id,
            "retriever": self.retriever,
            "num_candidates": self.config.num_candidates,
            "best_epoch": self.fit.best_epoch,
            "epochs_run": len(self.fit.history),
            "alpha": self.fit.alpha,
            "selection_metric": "ndcg@20 (fused list)",
            "valid": {"ndcg@20": round(self.fit.best_valid_ndcg, 5)},
            "test": {
                f"{part}_{k}": round(v, 5)
                for part in ("retrieval", "fused")
                for k, v in test.get(part, {}).items()
            },
        }


def best_retriever(trained: Iterable[object]) -> TrainedModel:
    """The embedding retriever of a run with the best validation Recall@20: the ranker learns from
    (hard negatives among) its candidates."""
    retrievers = [t for t in trained if isinstance(t, TrainedModel)]
    if not retrievers:
        raise ValueError("the ranking stage needs an embedding retriever trained in the same run")
    return max(retrievers, key=lambda t: t.fit.best_valid.get("recall@20", float("-inf")))


def trained_kgat(trained: Iterable[object]) -> TrainedModel | None:
    """The run's KGAT, if it trained one: KCAN's global layer starts from it
    (:meth:`~kgrec.models.rankers.kcan.KCAN.init_global`; on `music` test NDCG@20 of KCAN alone 0.086 ->
    0.137, of the fused list -0.002 -> +0.003 against retrieval alone)."""
    return next((t for t in trained if isinstance(t, TrainedModel) and t.name == "kgat"), None)


def ranker_config(seed: int, epoch_cap: int | None = None) -> KCANConfig:
    """KCAN's defaults with the run's seed; ``epoch_cap`` (the pipeline's ``--epochs``) only lowers
    the number of epochs."""
    default = KCANConfig()
    return KCANConfig(seed=seed, epochs=min(epoch_cap, default.epochs) if epoch_cap else default.epochs)


def train_ranker_and_log(
    data: InteractionData,
    retriever: TrainedModel,
    config: KCANConfig | None = None,
    global_init: TrainedModel | None = None,
) -> TrainedRanker:
    """Train KCAN as the re-ranker of ``retriever``'s top-N (one MLflow run); ``global_init``: a
    trained KGAT that KCAN's global layer starts from."""
    config = config or KCANConfig()
    params = {
        **{f"kcan_{k}": v for k, v in config.model_dump().items()},
        **data_params(data),
        "retriever": retriever.name,
        "retriever_run_id": retriever.run_id,
        "global_init_run_id": global_init.run_id if global_init is not None else "none",
    }
    tags = {"kgrec.model": "kcan", "kgrec.kind": "ranker", "kgrec.dataset": str(params.get("dataset", "unknown"))}

    def log_epoch(log: dict[str, float]) -> None:
        step = int(log["epoch"])
        mlflow.log_metrics(
            {
                "train_loss": log["loss"],
                "epoch_seconds": log["seconds"],
                "valid_ndcg_at_20_kcan": log["valid_ndcg@20_kcan"],
                "valid_ndcg_at_20": log["valid_ndcg@20_fused"],
                "alpha": log["alpha"],
            },
            step=step,
        )

    with tracked_run(f"kcan-{params.get('dataset', 'data')}", params, tags) as run_id:
        model, result = train_kcan(
            data, retriever.model, config, on_epoch=log_epoch,
            global_init=global_init.model if global_init is not None else None,
        )
        mlflow.log_metrics(
            {
                RANKER_SELECTION_METRIC: result.best_valid_ndcg,
                "best_valid_ndcg_at_20_kcan": result.best_valid_ndcg_kcan_only,
                "best_alpha": result.alpha,
                "best_epoch": result.best_epoch,
                "train_seconds": result.total_seconds,
            }
        )
    logger.info(
        "kcan on %s: best epoch %d, valid ndcg@20 %.4f (alpha %.1f)",
        retriever.name, result.best_epoch, result.best_valid_ndcg, result.alpha,
    )
    return TrainedRanker(
        run_id=run_id, config=config, model=model, fit=result,
        retriever=retriever.name, retriever_run_id=retriever.run_id,
    )


def evaluate_ranker_and_log(
    trained: TrainedRanker, retriever: TrainedModel, data: InteractionData
) -> dict[str, Any]:
    """Test metrics of the final list versus retrieval alone, logged to the ranker's run."""
    out = evaluate_reranking(
        retriever.model, trained.model, data, "test", N=trained.config.num_candidates, ks=(20,)
    )
    trained.test_metrics = out
    with mlflow.start_run(run_id=trained.run_id):
        mlflow.log_metrics(
            {
                **prefixed_metrics("test", out["fused"]),
                **prefixed_metrics("test_kcan", out["kcan"]),
                **prefixed_metrics("test_retrieval", out["retrieval"]),
                **prefixed_metrics("test", {k: v for k, v in out.items() if k.startswith("candidate_")}),
            }
        )
    return out


def export_ranker_bundle(trained: TrainedRanker, data: InteractionData, directory: Path) -> Path:
    """Write the ranker's serving bundle (KCAN artefact, id maps, fusion weight)."""
    from kgrec.serving.ranking import RankerBundle

    if data.snapshot is None:
        raise ValueError("exporting a ranker needs the dataset snapshot for the id maps")
    snapshot = data.snapshot
    bundle = RankerBundle(
        model=trained.model,
        users=snapshot.users.select("user_id", "user_idx"),
        items=snapshot.items.select("item_id", "item_idx"),
        meta={
            "model": trained.name,
            "run_id": trained.run_id,
            "dataset": snapshot.name,
            "snapshot_hash": snapshot.hash,
            "alpha": trained.fit.alpha,
            "num_candidates": trained.config.num_candidates,
            "retriever": trained.retriever,
            "retriever_run_id": trained.retriever_run_id,
            "selection_metric": RANKER_SELECTION_METRIC,
            "selection_value": trained.fit.best_valid_ndcg,
        },
    )
    target = directory / trained.run_id
    bundle.write(target)
    return target
