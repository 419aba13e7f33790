"""Prefect flows: ingest → build graph → train → evaluate → register → publish index → promote.

With ``ranker="kcan"`` the run then trains the ranking stage on the candidates of its best embedding
retriever (KCAN's global layer starting from the run's KGAT, if it trained one) and registers it as ``<registered model>-ranker`` (promoted on validation NDCG@20 of the
re-ranked list; no index).

Two branches share the registration steps: embedding retrievers (bprmf, lightgcn, kgat) train on
the random/temporal split's graph; sequential / multi-interest generators (youtube_dnn, mind,
comirec_dr, comirec_sa, comirec_sa_mos, comirec_sa_max, mixture) on the sequential split with the
same seed. One run may list both;
each model is one MLflow run in the same experiment and one version of the dataset's registered
model, promoted on its own selection metric.

Only wiring lives here; every step is a library function that works (and is tested) without Prefect.
I/O steps retry; a version whose index could not be published is rolled back, and the run that
produced it is marked FAILED, so a failed flow leaves no half-published model behind.
"""

# No `from __future__ import annotations` here: with it, runs of the served deployment failed
# Prefect's parameter validation ("`Pipeline_FlowModel` is not fully defined").

import os
from pathlib import Path
from typing import Any

from kgrec.features.dataset import InteractionData
from kgrec.features.ingest import IngestReport, ingest
from kgrec.features.sequences import SequenceSplit, sequential_split
from kgrec.features.snapshot import Snapshot, load_snapshot
from kgrec.features.spec import load_spec
from kgrec.features.split import random_split, temporal_leave_last_out
from kgrec.models import registry
from kgrec.models.config import TrainConfig
from kgrec.models.experiment import TrainedModel, evaluate_and_log, export_bundle, train_and_log
from kgrec.models.ranking_experiment import (
    TrainedRanker,
    best_retriever,
    evaluate_ranker_and_log,
    export_ranker_bundle,
    ranker_config,
    train_ranker_and_log,
    trained_kgat,
)
from kgrec.models.reranking import KCANConfig
from kgrec.models.sequential_experiment import (
    TrainedSequentialModel,
    evaluate_sequential_and_log,
    export_multi_interest_bundle,
    train_sequential_and_log,
)
from kgrec.models.sequential_zoo import SequentialModelConfig, is_sequential
from kgrec.serving.publish import publish_index
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from kgrec.config import PipelineConfig, registered_model_name, registered_ranker_name

IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2}


@task(name="ingest", cache_policy=NO_CACHE, **IO_RETRIES)
def ingest_task(dataset: str, out_dir: Path, progress: bool) -> IngestReport:
    return ingest(load_spec(dataset), out_dir, progress=progress)


@task(name="build-graph", cache_policy=NO_CACHE)
def build_graph_task(snapshot_dir: Path, split: str, seed: int) -> InteractionData:
    snapshot = load_snapshot(snapshot_dir)
    parts = (
        random_split(snapshot.interactions, seed=seed)
        if split == "random"
        else temporal_leave_last_out(snapshot.interactions)
    )
    data = InteractionData.from_snapshot(snapshot, parts)
    get_run_logger().info(
        "graph: %d nodes, %d CKG edges, %d relation types",
        data.ckg.num_nodes, data.ckg.edge_index.shape[1], data.ckg.num_relations,
    )
    return data


@task(name="train", cache_policy=NO_CACHE)
def train_task(data: InteractionData, config: TrainConfig, progress: bool) -> TrainedModel:
    return train_and_log(data, config, progress=progress)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(trained: TrainedModel, data: InteractionData) -> dict[str, float]:
    return evaluate_and_log(trained, data)


@task(name="register", cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(trained: TrainedModel, data: InteractionData, bundle_root: Path, name: str):
    bundle_dir = export_bundle(trained, data, bundle_root)
    tags = {"kgrec.model": trained.name, "kgrec.snapshot_hash": data.snapshot.hash}
    return registry.register_bundle(trained.run_id, bundle_dir, name, tags), bundle_dir


@task(name="train-ranker", cache_policy=NO_CACHE)
def train_ranker_task(
    data: InteractionData, retriever: TrainedModel, config: KCANConfig, global_init: TrainedModel | None
) -> TrainedRanker:
    return train_ranker_and_log(data, retriever, config, global_init)


@task(name="evaluate-ranker", cache_policy=NO_CACHE)
def evaluate_ranker_task(trained: TrainedRanker, retriever: TrainedModel, data: InteractionData):
    return evaluate_ranker_and_log(trained, retriever, data)


@task(name="register-ranker", cache_policy=NO_CACHE, **IO_RETRIES)
def register_ranker_task(trained: TrainedRanker, data: InteractionData, bundle_root: Path, name: str):
    bundle_dir = export_ranker_bundle(trained, data, bundle_root)
    tags = {
        "kgrec.model": trained.name,
        "kgrec.snapshot_hash": data.snapshot.hash,
        "kgrec.retriever": trained.retriever,
    }
    return registry.register_bundle(
        trained.run_id, bundle_dir, name, tags, selection_metric=trained.selection_metric
    )


@task(name="sequential-split", cache_policy=NO_CACHE)
def sequential_split_task(snapshot_dir: Path, seed: int) -> tuple[Snapshot, SequenceSplit]:
    snapshot = load_snapshot(snapshot_dir)
    split = sequential_split(snapshot, seed=seed)
    get_run_logger().info("sequential split (seed %d): %s", seed, split.summary())
    return snapshot, split


@task(name="train-sequential", cache_policy=NO_CACHE)
def train_sequential_task(
    snapshot: Snapshot, split: SequenceSplit, config: SequentialModelConfig
) -> TrainedSequentialModel:
    return train_sequential_and_log(snapshot, split, config)


@task(name="evaluate-sequential", cache_policy=NO_CACHE)
def evaluate_sequential_task(trained: TrainedSequentialModel) -> dict[str, Any]:
    return evaluate_sequential_and_log(trained)


@task(name="register-sequential", cache_policy=NO_CACHE, **IO_RETRIES)
def register_sequential_task(trained: TrainedSequentialModel, bundle_root: Path, name: str):
    bundle_dir = export_multi_interest_bundle(trained, bundle_root)
    tags = {"kgrec.model": trained.name, "kgrec.snapshot_hash": trained.snapshot.hash}
    version = registry.register_bundle(
        trained.run_id, bundle_dir, name, tags, selection_metric=trained.selection_metric
    )
    return version, bundle_dir


@task(name="publish-index", cache_policy=NO_CACHE, **IO_RETRIES)
def publish_index_task(version, bundle_dir: Path) -> dict[str, Any]:
    return publish_index(version, bundle_dir)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(name: str, version) -> registry.Promotion:
    return registry.promote(name, version)


def finish_ranker(
    retriever: TrainedModel,
    global_init: TrainedModel | None,
    data: InteractionData,
    config: KCANConfig,
    name: str,
    bundle_root: Path,
) -> dict[str, Any]:
    """Train, evaluate, register and promote the ranking stage on ``retriever``'s candidates."""
    trained = train_ranker_task(data, retriever, config, global_init)
    try:
        evaluate_ranker_task(trained, retriever, data)
        version = register_ranker_task(trained, data, bundle_root, name)
        with registry.pending_version(name, version):
            promotion = promote_task(name, version)
    except BaseException as exc:
        registry.mark_failed(trained.run_id, exc)
        raise
    return trained.summary() | {"registered_model": name, "registered": promotion.to_dict()}


def finish_one(
    trained: TrainedModel | TrainedSequentialModel,
    data: InteractionData | None,
    name: str,
    bundle_root: Path,
) -> dict[str, Any]:
    """Evaluate, register, publish and promote one trained model (tasks of the calling flow)."""
    try:
        if isinstance(trained, TrainedSequentialModel):
            evaluate_sequential_task(trained)
            version, bundle_dir = register_sequential_task(trained, bundle_root, name)
        else:
            evaluate_task(trained, data)
            version, bundle_dir = register_task(trained, data, bundle_root, name)
        with registry.pending_version(name, version):
            index = publish_index_task(version, bundle_dir)
            promotion = promote_task(name, version)
    except BaseException as exc:
        registry.mark_failed(trained.run_id, exc)
        raise
    return trained.summary() | {"registered": promotion.to_dict(), "index": index}


@flow(name="kgrec-pipeline")
def pipeline_flow(config: PipelineConfig) -> dict[str, Any]:
    """The whole pipeline on one dataset; returns the figures the CLI prints."""
    logger = get_run_logger()
    tracking = config.tracking
    registry.configure_tracking(tracking)
    report = ingest_task(config.dataset, tracking.snapshot_dir, config.progress)
    sequential = [m for m in config.models if is_sequential(m)]
    data = (
        build_graph_task(report.snapshot_dir, config.split, config.seed)
        if len(sequential) < len(config.models)
        else None
    )
    snapshot, split = (
        sequential_split_task(report.snapshot_dir, config.seed) if sequential else (None, None)
    )
    snapshot = snapshot if snapshot is not None else data.snapshot
    name = config.registered_model or registered_model_name(snapshot.name)
    # Training runs as concurrent tasks on the flow's task runner (config.parallel_training
    # workers); registration and promotion then go in the order the models were listed.
    futures = []
    for model_name in config.models:
        logger.info("training %s on %s", model_name, snapshot.name)
        if is_sequential(model_name):
            seq_config = SequentialModelConfig.for_model(model_name, epochs=config.epochs, seed=config.seed)
            futures.append(train_sequential_task.submit(snapshot, split, seq_config))
        else:
            train_config = TrainConfig.for_model(model_name, epochs=config.epochs, seed=config.seed)
            futures.append(train_task.submit(data, train_config, config.progress))
    trained_models = [future.result() for future in futures]
    results = [finish_one(t, data, name, tracking.workdir / "bundles") for t in trained_models]
    ranker = None
    if config.ranker is not None:
        ranker = finish_ranker(
            best_retriever(trained_models), trained_kgat(trained_models), data,
            ranker_config(config.seed, config.epochs),
            registered_ranker_name(name), tracking.workdir / "bundles",
        )
    champion = registry.resolve_alias(name, registry.CHAMPION)
    return {
        "dataset": snapshot.name,
        "snapshot_hash": snapshot.hash,
        **({"sequential_split": split.summary() | {"seed": split.seed}} if split is not None else {}),
        "ingest": report.to_dict(),
        "registered_model": name,
        "champion_version": str(champion.version),
        "tracking_uri": tracking.resolved_tracking_uri,
        "models": results,
        **({"ranker": ranker} if ranker is not None else {}),
    }


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the pipeline flow with ``config.parallel_training`` concurrent training tasks."""
    return configured_flow(config)(config)


def configured_flow(config: PipelineConfig):
    workers = config.parallel_training
    if workers > 1:  # share the cores between the concurrent trainings instead of oversubscribing
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return pipeline_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
