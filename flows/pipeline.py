"""Prefect flows: ingest → train → evaluate → register → publish index → promote, per model.

The flow loops over the requested model specs (:mod:`kgrec.models.spec`); each model's family
supplies its configuration and training inputs (the random/temporal split's graph for retrievers,
the sequential split for multi-interest models), so one run may list both. Each model is one MLflow
run and one version of the dataset's registered model, promoted on its own selection metric. With
``ranker`` the run then trains the ranking stage on the candidates of its best retriever (KCAN's
global layer starting from the run's KGAT, if it trained one) and registers it as
``<registered model>-ranker``.

Only wiring lives here; every step is a library function that works (and is tested) without Prefect.
I/O steps retry; a version whose index could not be published is rolled back, and the run that
produced it is marked FAILED, so a failed flow leaves no half-published model behind.
"""

# No `from __future__ import annotations` here: with it, runs of the served deployment failed
# Prefect's parameter validation ("`Pipeline_FlowModel` is not fully defined").

from pathlib import Path
from typing import Any

from kgrec.features.ingest import IngestReport, ingest
from kgrec.features.spec import load_spec
from kgrec.flows.config import PipelineConfig
from kgrec.models.families import PipelineInputs, family_of
from kgrec.models.spec import get_spec
from kgrec.models.tracking import registry
from kgrec.models.tracking.experiment import Trained, evaluate_and_log, ranker_inputs, train_and_log
from kgrec.models.tracking.settings import registered_model_name, registered_ranker_name
from kgrec.serving.export import publish_index_for, register_trained
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2}


@task(name="ingest", cache_policy=NO_CACHE, **IO_RETRIES)
def ingest_task(dataset: str, out_dir: Path, progress: bool) -> IngestReport:
    return ingest(load_spec(dataset), out_dir, progress=progress)


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{model}")
def train_task(model: str, config: Any, inputs: Any, progress: bool) -> Trained:
    return train_and_log(get_spec(model), config, inputs, progress=progress)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(trained: Trained) -> dict[str, float]:
    return evaluate_and_log(trained)


@task(name="register", cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(trained: Trained, bundle_root: Path, name: str):
    return register_trained(trained, bundle_root, name)


@task(name="publish-index", cache_policy=NO_CACHE, **IO_RETRIES)
def publish_index_task(trained: Trained, version, bundle_dir: Path) -> dict[str, Any] | None:
    return publish_index_for(trained, version, bundle_dir)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(name: str, version) -> registry.Promotion:
    return registry.promote(name, version)


def finish_one(trained: Trained, name: str, bundle_root: Path) -> dict[str, Any]:
    """Evaluate, register, publish (retrievers) and promote one trained model; a failure marks
    its run FAILED and rolls the version back."""
    try:
        evaluate_task(trained)
        version, bundle_dir = register_task(trained, bundle_root, name)
        with registry.pending_version(name, version):
            index = publish_index_task(trained, version, bundle_dir)
            promotion = promote_task(name, version)
    except BaseException as exc:
        registry.mark_failed(trained.run_id, exc)
        raise
    return trained.summary() | {"registered_model": name, "registered": promotion.to_dict(), "index": index}


@flow(name="kgrec-pipeline")
def pipeline_flow(config: PipelineConfig) -> dict[str, Any]:
    """The whole pipeline on one dataset; returns the figures the CLI prints."""
    logger = get_run_logger()
    tracking = config.tracking
    registry.configure_tracking(tracking)
    report = ingest_task(config.dataset, tracking.snapshot_dir, config.progress)
    inputs = PipelineInputs(report.snapshot_dir, config.split, config.seed)
    name = config.registered_model or registered_model_name(inputs.snapshot.name)
    bundle_root = tracking.workdir / "bundles"
    # Training runs as concurrent tasks on the flow's task runner (config.parallel_training
    # workers); registration and promotion then go in the order the models were listed.
    futures = []
    for model in config.models:
        spec = get_spec(model)
        model_config = family_of(spec).config(spec, epochs=config.epochs, seed=config.seed)
        logger.info("training %s on %s", model, inputs.snapshot.name)
        futures.append(train_task.submit(model, model_config, inputs.for_family(spec.family), config.progress))
    trained = [future.result() for future in futures]
    results = [finish_one(t, name, bundle_root) for t in trained]
    ranker = None
    if config.ranker is not None:
        spec = get_spec(config.ranker)
        ranker_config = family_of(spec).config(spec, epochs=config.epochs, seed=config.seed)
        ranked = train_task(spec.name, ranker_config, ranker_inputs(inputs.for_family("retriever"), trained), False)
        ranker = finish_one(ranked, registered_ranker_name(name), bundle_root)
    champion = registry.resolve_alias(name, registry.CHAMPION)
    return {
        **inputs.describe(),
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
    return pipeline_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=config.parallel_training))
