"""Prefect flows: ingest → train → evaluate → register → publish index → promote, per model.

The flow loops over the requested model specs (:mod:`kgrec.models.spec`); each model's family
supplies its configuration and training inputs (the random/temporal split's graph for retrievers,
the sequential split for multi-interest models), so one run may list both. Each model is one MLflow
run and one version of the dataset's registered model, promoted on its own selection metric. With
``ranker`` the run then trains the ranking stage on the candidates of its best retriever (KCAN's
global layer starting from the run's KGAT, if it trained one) and registers it as
``<registered model>-ranker``.

Items posted to the service (``POST /v1/items``) join the run's data: after ingestion the overlays
of the registered model (in the serve cache, :mod:`kgrec.serving.overlay`) are merged into the
snapshot (:func:`kgrec.features.overlay.apply_overlay`: KG-only items, their counts in the ingest
report's ``overlay``), unless ``config.overlay`` is off.

Only wiring lives here; every step is a library function that works (and is tested) without Prefect.
I/O steps retry; a version whose index could not be published is rolled back, and the run that
produced it is marked FAILED (KILLED when cancelled), so a failed flow leaves no half-published model
behind. Each run first reaps what an interrupted one left (:func:`registry.reap_orphans`).

Cancellation: :func:`run_pipeline` takes a ``threading.Event``; once it is set, training stops at
the next optimiser step. The caller (the CLI's signal handler) also interrupts the main thread. On
a Dask or Ray task runner the event is relayed to the worker processes (:mod:`kgrec.flows.runners`).

Prefect's UI gets the library's log lines (epochs, metrics, promotion) and, per run, a Markdown
artifact with the summary table and a link artifact to each model's MLflow run.
"""

# No `from __future__ import annotations` here: with it, runs of the served deployment failed
# Prefect's parameter validation ("`Pipeline_FlowModel` is not fully defined").

import contextlib
import contextvars
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kgrec.features.ingest import IngestReport, ingest
from kgrec.features.overlay import apply_overlay
from kgrec.features.spec import load_spec
from kgrec.flows.config import PipelineConfig
from kgrec.flows.runners import WorkerSetup, build_task_runner, on_task_runner
from kgrec.models.families import PipelineInputs, family_of
from kgrec.models.spec import ModelSpec, get_spec
from kgrec.models.tracking import registry, tuning
from kgrec.models.tracking.experiment import Trained, evaluate_and_log, ranker_inputs, train_and_log
from kgrec.models.tracking.settings import registered_model_name, registered_ranker_name
from kgrec.models.training.trainer import TrainingCancelled
from kgrec.serving.export import publish_index_for, register_trained
from kgrec.serving.overlay import read_overlay_items
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed, wait
from prefect.logging.handlers import APILogHandler

IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2}
_log = logging.getLogger("kgrec.flows")  # a kgrec logger: shown in the flow run (library_logs_to_prefect)
#: The cancellation event of the pipeline running in this context (flow parameters must be JSON).
_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("kgrec_cancel", default=None)


@task(name="ingest", cache_policy=NO_CACHE, **IO_RETRIES)
def ingest_task(dataset: str, out_dir: Path, progress: bool) -> IngestReport:
    return ingest(load_spec(dataset), out_dir, progress=progress)


@task(name="overlay", cache_policy=NO_CACHE)
def overlay_task(report: IngestReport, model_name: str, overlay_root: Path, out_dir: Path) -> IngestReport:
    """The snapshot with the items posted to ``model_name``'s versions merged in (the same report
    when none was posted)."""
    items = read_overlay_items(overlay_root, model_name)
    if not items:
        return report
    merged = apply_overlay(report, items, out_dir)
    _log.info("merged %d items posted to %s into the snapshot (%s): %s", merged.overlay["added"], model_name,
              merged.snapshot_dir.name, merged.overlay)
    return merged


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{model}")
def train_task(
    model: str, config: Any, inputs: Any, progress: bool, cancel: Any, worker: WorkerSetup | None = None,
    tags: dict[str, str] | None = None,
) -> Trained:
    """``cancel``: anything with ``is_set()``; ``worker``: set when the task runs in a worker process
    of a Dask or Ray cluster, which must first be pointed at the flow's tracking store (and sends
    the library's log lines to the task run, as the flow does in its own process)."""
    if worker is not None:
        worker.configure()
    if cancel is not None and cancel.is_set():  # queued behind a model that failed or was stopped
        raise TrainingCancelled(f"{model}: cancelled before it started")
    with library_logs_to_prefect() if worker is not None else contextlib.nullcontext():
        return train_and_log(get_spec(model), config, inputs, progress=progress, cancel=cancel,
                             extra_params=worker.params if worker is not None else None, extra_tags=tags)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(trained: Trained) -> dict[str, float]:
    return evaluate_and_log(trained)


# No retries: a retry after a partial failure would log the model a second time in the same run.
@task(name="register", cache_policy=NO_CACHE)
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
        registry.mark_ended(trained.run_id, exc)
        raise
    return trained.summary() | {"registered_model": name, "registered": promotion.to_dict(), "index": index}


@contextlib.contextmanager
def library_logs_to_prefect() -> Iterator[None]:
    """Send the ``kgrec`` loggers' records to the flow run in Prefect's UI (what
    ``PREFECT_LOGGING_EXTRA_LOGGERS=kgrec`` does, but also for a worker's flow runs)."""
    library = logging.getLogger("kgrec")
    handler, level = APILogHandler(), library.level
    if library.getEffectiveLevel() > logging.INFO:
        library.setLevel(logging.INFO)
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


def summary_markdown(result: dict[str, Any]) -> str:
    """The run's summary as a Markdown table (a Prefect artifact)."""
    rows = registered_rows(result)
    lines = [
        f"### kgrec pipeline on {result['dataset']} (snapshot `{result['snapshot_hash'][:12]}`)",
        "",
        "| model | epochs | best | valid (selection) | test R@20 | test N@20 | version | alias | MLflow run |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    for m in rows:
        reg, test, selection = m["registered"], m["test"], m["selection_metric"]
        lines.append(
            f"| {m['model']} | {m['epochs_run']} | {m['best_epoch']} | "
            f"{selection} {_fmt(m['valid'].get(selection))} | {_fmt(test.get('recall@20'))} | "
            f"{_fmt(test.get('ndcg@20'))} | {m['registered_model']} v{reg['version']} | {reg['alias']} | "
            f"`{m['run_id']}` |"
        )
    lines += ["", f"Champion: {result['registered_model']} v{result['champion_version']}; "
              f"tracking: `{result['tracking_uri']}`."]
    return "\n".join(lines)


def format_metric(value: float | None, digits: int = 4, missing: str = "—") -> str:
    """A metric for people: ``digits`` decimals, ``missing`` for an absent or NaN value."""
    return missing if value is None or value != value else f"{value:.{digits}f}"


def _fmt(value: float | None) -> str:
    return format_metric(value, missing="-")  # Markdown tables


def registered_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-model results of a pipeline run: its retrievers, then its ranker if it trained one."""
    return [*result["models"], *([result["ranker"]] if "ranker" in result else [])]


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, for a tracking server (the embedded store has no UI URL)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def publish_artifacts(result: dict[str, Any], experiment_id: str) -> None:
    """Best effort: the models are registered and promoted by now, and a Prefect API hiccup must
    not turn that into a failed run (which a retry would train again)."""
    try:
        _publish_artifacts(result, experiment_id)
    except Exception as exc:
        get_run_logger().warning("could not create the Prefect artifacts: %s: %s", type(exc).__name__, exc)


def _publish_artifacts(result: dict[str, Any], experiment_id: str) -> None:
    create_markdown_artifact(
        markdown=summary_markdown(result), key=f"kgrec-summary-{_artifact_key(result['dataset'])}",
        description="kgrec pipeline summary",
    )
    for m in registered_rows(result):
        if url := mlflow_run_url(result["tracking_uri"], experiment_id, m["run_id"]):
            create_link_artifact(
                link=url, link_text=f"MLflow run of {m['model']}",
                key=f"mlflow-run-{_artifact_key(m['model'])}",
            )


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]", "-", text.lower())


@flow(name="kgrec-pipeline")
def pipeline_flow(config: PipelineConfig) -> dict[str, Any]:
    """The whole pipeline on one dataset; returns the figures the CLI prints."""
    with library_logs_to_prefect():
        return pipeline_steps(config, current_cancel())


def current_cancel() -> threading.Event | None:
    # Not read in the flow's body: a Dask client pickles the flow function by value with the
    # globals it names, and a ContextVar cannot be pickled (a module function goes by reference).
    return _cancel.get()


def pipeline_steps(
    config: PipelineConfig, cancel: threading.Event | None, report: IngestReport | None = None
) -> dict[str, Any]:
    """The pipeline flow's body (also the last step of the tune flow, which passes the ``report``
    of the ingestion it already ran), inside a running flow."""
    logger = get_run_logger()
    cancel = cancel or threading.Event()
    started_ms = int(time.time() * 1000)
    tracking = config.tracking
    client = registry.configure_tracking(tracking)
    report = report or ingest_task(config.dataset, tracking.snapshot_dir, config.progress)
    name = config.registered_model or registered_model_name(report.name)
    if config.overlay:
        report = overlay_task(report, name, config.overlay_dir or tracking.workdir / "serve-cache", tracking.snapshot_dir)
    inputs = PipelineInputs(report.snapshot_dir, config.split, config.seed)
    reaped = registry.reap_orphans([name, registered_ranker_name(name)], started_ms, tracking.experiment)
    if reaped.versions or reaped.runs:
        logger.warning("cleaned up after an interrupted run: versions %s, runs %s", reaped.versions, reaped.runs)
    bundle_root = tracking.workdir / "bundles"
    # Training runs as concurrent tasks on the flow's task runner (config.parallel_training
    # threads, or the worker processes of a Dask or Ray cluster: flows/runners.py); registration
    # and promotion then go in the order the models were listed, in the flow's process.
    futures = []
    with on_task_runner(config, tracking, cancel, futures) as side:
        for model in config.models:
            spec = get_spec(model)
            model_config, tags = model_config_of(spec, config, inputs)
            logger.info("training %s on %s", model, inputs.snapshot.name)
            futures.append(train_task.submit(
                model, model_config, inputs.for_family(spec.family), config.progress, side.cancel, side.worker,
                tags,
            ))
        try:
            for future in as_completed(futures):  # the first failure stops the others at once
                future.result()
            trained = [future.result() for future in futures]
        except BaseException:
            cancel.set()  # a failed or interrupted run trains nothing more ...
            wait(futures)  # ... and its training tasks end their MLflow runs before the flow ends
            raise
    results = []
    for i, one in enumerate(trained):
        try:
            results.append(finish_one(one, name, bundle_root))
        except BaseException as exc:
            for rest in trained[i + 1:]:  # trained, never registered: their runs say why
                registry.mark_ended(rest.run_id, exc)
            raise
    ranker = None
    if config.ranker is not None:
        spec = get_spec(config.ranker)
        ranker_config = family_of(spec).config(
            spec, epochs=config.epochs, seed=config.seed, time_budget_s=config.time_cap_s
        )
        ranked = train_task(
            spec.name, ranker_config, ranker_inputs(inputs.for_family("retriever"), trained), False, cancel
        )
        ranker = finish_one(ranked, registered_ranker_name(name), bundle_root)
    champion = registry.resolve_alias(name, registry.CHAMPION)
    result = {
        **inputs.describe(),
        "ingest": report.to_dict(),
        "registered_model": name,
        "champion_version": str(champion.version),
        "tracking_uri": tracking.resolved_tracking_uri,
        "models": results,
        **({"ranker": ranker} if ranker is not None else {}),
    }
    publish_artifacts(result, client.get_experiment_by_name(tracking.experiment).experiment_id)
    logger.info("champion of %s: v%s", name, champion.version)
    return result


def model_config_of(spec: ModelSpec, config: PipelineConfig, inputs: PipelineInputs) -> tuple[Any, dict[str, str]]:
    """The config ``spec`` trains with in this run and the run's extra tags: with
    ``config.tuned``, the snapshot's recommendation from ``kgrec tune`` where one exists."""
    # posted items merged in (overlay) leave the data the studies tuned on otherwise unchanged
    tuned_hash = (inputs.snapshot.manifest.get("overlay") or {}).get("base_hash") or inputs.snapshot.hash
    model_config, recommendation = tuning.configured(
        spec, tuned_hash, config.tracking.experiment, config.tuned,
        epochs=config.epochs, seed=config.seed, time_budget_s=config.time_cap_s,
    )
    if recommendation is not None:
        get_run_logger().info(
            "%s: the configuration tuned for snapshot %s (study %s, valid %s %.4f): %s", spec.name,
            inputs.snapshot.hash[:12], recommendation.run_id, recommendation.metric, recommendation.value,
            recommendation.overrides,
        )
        return model_config, {tuning.TUNED_FROM_TAG: recommendation.run_id}
    if config.tuned:
        get_run_logger().warning(
            "%s: no tuned configuration for snapshot %s in experiment %r (run `kgrec tune`): training "
            "with the defaults", spec.name, inputs.snapshot.hash[:12], config.tracking.experiment,
        )
    return model_config, {}


def run_pipeline(config: PipelineConfig, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run the pipeline flow on ``config.task_runner`` (``config.parallel_training`` concurrent
    training threads by default); setting ``cancel`` stops training at its next optimiser step."""
    return run_flow(pipeline_flow, config, cancel)


def run_flow(flow_function: Any, config: PipelineConfig, cancel: threading.Event | None) -> dict[str, Any]:
    """Run ``flow_function(config)`` on ``config``'s task runner with ``cancel`` as the event its
    steps read through :func:`current_cancel`."""
    token = _cancel.set(cancel)
    try:
        return configured_flow(config, flow_function)(config)
    finally:
        _cancel.reset(token)


def configured_flow(config: PipelineConfig, flow_function: Any = pipeline_flow):
    return flow_function.with_options(task_runner=build_task_runner(config))
