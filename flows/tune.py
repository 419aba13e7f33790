"""Prefect flow ``kgrec-tune``: ingest, one Optuna study per model, then the pipeline with the
recommended configurations.

Each study is one task (:func:`kgrec.models.tracking.tuning.tune`: an MLflow parent run with a
child run per trial, on the training and validation splits only). The studies store their best
configuration with the snapshot's hash; the flow then runs the pipeline's own steps with
``tuned`` set, so each model trains once more with its recommendation, is tested once, and goes
through the normal registration, index publication and champion gate. ``kgrec pipeline --tuned``
later finds the same recommendations for as long as the snapshot is unchanged.

Cancellation as in :mod:`kgrec.flows.pipeline`: the event stops the running trial at its next
optimiser step and the study with it.
"""

# No `from __future__ import annotations`: Prefect validates the flow's parameters from the hints.

import threading
from typing import Any

from kgrec.features.ingest import IngestReport
from kgrec.flows.config import TuneConfig
from kgrec.flows.pipeline import (
    current_cancel,
    ingest_task,
    library_logs_to_prefect,
    pipeline_steps,
    run_flow,
)
from kgrec.models.families import PipelineInputs
from kgrec.models.spec import get_spec
from kgrec.models.tracking import registry
from kgrec.models.tracking.tuning import TuneResult, TuneSettings, tune
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE


@task(name="tune", cache_policy=NO_CACHE, task_run_name="tune-{model}")
def tune_task(model: str, inputs: Any, settings: TuneSettings, cancel: Any) -> TuneResult:
    return tune(get_spec(model), inputs, settings, cancel=cancel)


@flow(name="kgrec-tune")
def tune_flow(config: TuneConfig) -> dict[str, Any]:
    """Studies, then the pipeline with their recommendations; returns the figures the CLI prints."""
    with library_logs_to_prefect():
        return _tune(config, current_cancel())


def _tune(config: TuneConfig, cancel: threading.Event | None) -> dict[str, Any]:
    logger = get_run_logger()
    cancel = cancel or threading.Event()
    registry.configure_tracking(config.tracking)
    report: IngestReport = ingest_task(config.dataset, config.tracking.snapshot_dir, config.progress)
    inputs = PipelineInputs(report.snapshot_dir, config.split, config.seed)
    settings = config.tune.model_copy(update={"seed": config.seed, "epochs": config.epochs})
    studies = []
    for model in config.models:  # one study at a time: its trials already use the machine
        spec = get_spec(model)
        logger.info("tuning %s on %s: %s", model, inputs.snapshot.name, settings.model_dump())
        studies.append(tune_task(model, inputs.for_family(spec.family), settings, cancel).summary())
    result = pipeline_steps(config.pipeline(), cancel, report)  # the same snapshot, not ingested again
    return {**result, "studies": studies}


def run_tune(config: TuneConfig, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run the tune flow (``config.task_runner`` for the final training, as the pipeline)."""
    return run_flow(tune_flow, config, cancel)
