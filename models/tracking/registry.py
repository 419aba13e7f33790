"""MLflow tracking, model registration and the champion/challenger promotion gate.

A registered model (one per dataset, e.g. ``kgrec-music``) holds one version per training run. A new
version takes the alias ``champion`` only if it beats the current champion on the selection metric;
otherwise it is tagged ``challenger``. Registration is transactional: a version whose index could not
be published is deleted again (see :func:`pending_version`).

The selection metric belongs to the bundle kind and is stored as the version tag
``kgrec.selection_metric`` (read by :func:`promote`): ``best_valid_recall_at_20`` for embedding
retrievers (the default, also for versions without the tag), ``best_valid_recall_at_50`` for
sequential / multi-interest retrievers, ``best_valid_ndcg_at_20`` (of the re-ranked list) for
rankers, which live under their own registered model (``kgrec-<dataset>-ranker``). Versions selected on different metrics (or protocols) are
not comparable: such a candidate never replaces the champion automatically (it becomes
``challenger``; move the alias by hand).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from kgrec.models.evaluation import metric_key
from kgrec.models.tracking.settings import TrackingSettings
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

logger = logging.getLogger("kgrec.models")

CHAMPION = "champion"
CHALLENGER = "challenger"
SELECTION_METRIC = "best_valid_recall_at_20"  # embedding retrievers (and untagged versions)
SELECTION_METRIC_TAG = "kgrec.selection_metric"
BUNDLE_KIND_TAG = "kgrec.bundle_kind"
MODEL_ARTIFACT = "model"
INDEX_ARTIFACT = "index"
INDEX_TAG = "kgrec.index_artifact"
RANKER_KIND = "ranker"  # bundles of the ranking stage (serving/ranking.py): no index, pair scorer


def prefixed_metrics(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {
        metric_key(prefix, k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(v)
    }


def configure_tracking(settings: TrackingSettings) -> MlflowClient:
    """Point MLflow at the configured store and make sure the experiment exists."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    client = MlflowClient(settings.resolved_tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    mlflow.set_experiment(settings.experiment)
    return client


@contextlib.contextmanager
def tracked_run(run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[str]:
    """An MLflow run that ends FAILED, with the error as a tag, when the body raises."""
    with mlflow.start_run(run_name=run_name, tags=dict(tags)) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        try:
            yield run.info.run_id
        except BaseException as exc:
            mlflow.set_tag("kgrec.error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED")
            raise


def _param_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return value


@dataclass(frozen=True)
class Promotion:
    version: str
    alias: str
    metric: float
    previous_champion: str | None
    previous_metric: float | None
    selection_metric: str = SELECTION_METRIC

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def create_version(
    run_id: str,
    model_info: ModelInfo,
    name: str,
    tags: Mapping[str, str],
    description: str = "kgrec candidate-retrieval models",
) -> ModelVersion:
    """Register the model logged in ``run_id`` (``model_info``, from ``mlflow.*.log_model``) as a
    new version of ``name``, linked to the logged model (``model_id``), with ``tags``."""
    client = MlflowClient()
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name, description=description)
    version = client.create_model_version(
        name=name, source=model_info.model_uri, run_id=run_id, tags=dict(tags),
        model_id=model_info.model_id,
    )
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return version


@contextlib.contextmanager
def pending_version(name: str, version: ModelVersion) -> Iterator[ModelVersion]:
    """Delete the version again if anything inside the block fails (no half-published versions)."""
    try:
        yield version
    except BaseException:
        logger.error("rolling back %s version %s", name, version.version)
        MlflowClient().delete_model_version(name, version.version)
        raise


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def selection_metric_name(version: ModelVersion) -> str:
    """The metric a version is selected on (its ``kgrec.selection_metric`` tag, else Recall@20)."""
    return (version.tags or {}).get(SELECTION_METRIC_TAG) or SELECTION_METRIC


def selection_metric(client: MlflowClient, version: ModelVersion, metric: str | None = None) -> float:
    metric = metric or selection_metric_name(version)
    value = client.get_run(version.run_id).data.metrics.get(metric)
    if value is None:
        raise ValueError(f"run {version.run_id} has no metric {metric!r}")
    return float(value)


def promote(name: str, version: ModelVersion) -> Promotion:
    """Give ``version`` the alias ``champion`` if it beats the current one, else ``challenger``.

    Ties keep the incumbent: a new version must be strictly better to take over. Both are compared on
    the candidate's selection metric (module docstring); a champion selected on another metric is
    not comparable and stays.
    """
    client = MlflowClient()
    version = client.get_model_version(name, version.version)  # with its tags
    metric_name = selection_metric_name(version)
    candidate = selection_metric(client, version, metric_name)
    incumbent = current_champion(client, name)
    incumbent_metric = None
    comparable = True
    if incumbent is not None:
        incumbent_name = selection_metric_name(incumbent)
        comparable = incumbent_name == metric_name
        incumbent_metric = selection_metric(client, incumbent, incumbent_name)
        if not comparable:
            logger.warning(
                "%s v%s is selected on %s, champion v%s on %s: not comparable, keeping the champion",
                name, version.version, metric_name, incumbent.version, incumbent_name,
            )
    wins = incumbent is None or (comparable and candidate > incumbent_metric)
    alias = CHAMPION if wins else CHALLENGER
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "kgrec.alias_at_registration", alias)
    logger.info(
        "%s v%s %s=%.4f vs champion %s (%s) -> %s",
        name, version.version, metric_name, candidate,
        incumbent.version if incumbent else None, incumbent_metric, alias,
    )
    return Promotion(
        version=str(version.version),
        alias=alias,
        metric=candidate,
        previous_champion=str(incumbent.version) if incumbent else None,
        previous_metric=incumbent_metric,
        selection_metric=metric_name,
    )


def resolve_alias(name: str, alias: str = CHAMPION) -> ModelVersion:
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise LookupError(
            f"no version of registered model {name!r} has the alias {alias!r}; "
            "run `kgrec pipeline` first"
        ) from exc


def download_version(version: ModelVersion, destination: Path) -> tuple[Path, Path | None]:
    """Fetch a version's bundle and its published index; returns (bundle_dir, index_dir or None)."""
    destination.mkdir(parents=True, exist_ok=True)
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=str(destination / "model")
        )
    )
    bundle_dir = model_dir / "artifacts" / "bundle"
    if not bundle_dir.is_dir():
        candidates = [p for p in (model_dir / "artifacts").iterdir() if p.is_dir()]
        if len(candidates) != 1:
            raise FileNotFoundError(f"no bundle in model artefacts at {model_dir}")
        bundle_dir = candidates[0]
    index_path = version.tags.get(INDEX_TAG)
    index_dir = None
    if index_path:
        index_dir = Path(
            mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=index_path, dst_path=str(destination)
            )
        )
    return bundle_dir, index_dir


def mark_failed(run_id: str, error: BaseException) -> None:
    """Record that a run's later steps (evaluation, registration, publishing) failed."""
    client = MlflowClient()
    client.set_tag(run_id, "kgrec.error", f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run_id, status="FAILED")
