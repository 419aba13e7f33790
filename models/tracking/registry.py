"""MLflow tracking, model registration and the champion/challenger promotion gate.

A registered model (one per dataset, e.g. ``kgrec-music``) holds one version per training run. A new
version takes the alias ``champion`` only if it beats the current champion on the selection metric;
otherwise it is tagged ``challenger``. Registration is transactional: a version whose index could not
be published is deleted again (see :func:`pending_version`).

Every version carries its lifecycle in tags: ``kgrec.state`` is ``pending`` from registration until
its index is published and the gate has run, then ``ready``; ``kgrec.owner`` names the process that
registered it (host, pid, process start). A version left ``pending`` by a process that no longer
exists (SIGKILL, power loss) is an orphan: the next run deletes it and ends its run KILLED
(:func:`reap_orphans`). Schema creation and alias moves take a lock on the store (:func:`store_lock`),
so pipelines started at once on one machine are safe.

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
import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from kgrec.models.evaluation import metric_key
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.models.training.trainer import TrainingCancelled
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

logger = logging.getLogger("kgrec.models")

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"  # the champion a better version displaced
SELECTION_METRIC = "best_valid_recall_at_20"  # embedding retrievers (and untagged versions)
SELECTION_METRIC_TAG = "kgrec.selection_metric"
BUNDLE_KIND_TAG = "kgrec.bundle_kind"
MODEL_ARTIFACT = "model"
INDEX_ARTIFACT = "index"
INDEX_TAG = "kgrec.index_artifact"
RANKER_KIND = "ranker"  # bundles of the ranking stage (serving/ranking.py): no index, pair scorer
STATE_TAG = "kgrec.state"
PENDING, READY = "pending", "ready"
OWNER_TAG = "kgrec.owner"
ALIAS_AT_REGISTRATION_TAG = "kgrec.alias_at_registration"
#: The experiment opens on training runs, not on MLflow's GenAI overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: Pending versions of a process on another host count as orphans only after this long.
FOREIGN_ORPHAN_SECONDS = 24 * 3600
LOCK_TIMEOUT_SECONDS = 900


def prefixed_metrics(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {
        metric_key(prefix, k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(v)
    }


def store_lock(tracking_uri: str | None = None) -> FileLock:
    """A lock on one tracking store, shared by every process on this machine.

    Held while MLflow creates its schema (two pipelines into a fresh SQLite store otherwise race on
    the migrations) and while an alias moves (read the champion, compare, move). For a SQLite store
    the lock file sits next to the database; for a tracking server it lives under
    ``$KGREC_LOCK_DIR`` (default ``~/.cache/kgrec/locks``), keyed by the server's URI. Pipelines on
    different machines against one server are not serialised by it (see ARCHITECTURE.md).
    """
    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///") + ".lock")
    else:
        root = Path(os.environ.get("KGREC_LOCK_DIR") or Path.home() / ".cache" / "kgrec" / "locks")
        path = root / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=LOCK_TIMEOUT_SECONDS)


def configure_tracking(settings: TrackingSettings) -> MlflowClient:
    """Point MLflow at the configured store and make sure the experiment exists (tagged as a
    model-training experiment), creating the schema under :func:`store_lock`."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    uri = settings.resolved_tracking_uri
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = MlflowClient(uri)  # opens (and for a new SQLite file, migrates) the store
        client.search_registered_models(max_results=1)  # the registry's store, on the same file
        experiment = client.get_experiment_by_name(settings.experiment)
        if experiment is None:
            try:
                client.create_experiment(
                    settings.experiment,
                    artifact_location=settings.artifact_location,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            except MlflowException:  # created meanwhile by a pipeline on another machine
                if client.get_experiment_by_name(settings.experiment) is None:
                    raise
        elif EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(settings.experiment)
    return client


def is_cancellation(error: BaseException) -> bool:
    """A signal or a cancelled fit (KILLED), as opposed to a failure (FAILED)."""
    return isinstance(error, TrainingCancelled) or not isinstance(error, Exception)


#: Why a run that was stopped on purpose (a pruned trial) stopped; it ends FINISHED.
STOPPED_TAG = "kgrec.stopped"


def end_status(error: BaseException) -> str:
    return "KILLED" if is_cancellation(error) else "FAILED"


@contextlib.contextmanager
def tracked_run(
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    *,
    nested: bool = False,
    stopped_on_purpose: tuple[type[BaseException], ...] = (),
) -> Iterator[str]:
    """An MLflow run that ends FAILED (KILLED when cancelled), with the error as a tag, when the
    body raises. The run is tagged with its owner process, so a run a killed process left RUNNING is
    recognised and ended by the next pipeline (:func:`reap_orphans`).

    ``nested``: a child of the active run (a tuning trial under its study). ``stopped_on_purpose``:
    exceptions that end the run FINISHED with the reason as the ``kgrec.stopped`` tag before they
    propagate (a pruned trial: a normal outcome of a study, not an error)."""
    with mlflow.start_run(
        run_name=run_name, nested=nested, tags={**dict(tags), OWNER_TAG: process_owner()}
    ) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        try:
            yield run.info.run_id
        except stopped_on_purpose as exc:
            with _logged_failure(f"ending run {run.info.run_id}"):
                mlflow.set_tag(STOPPED_TAG, str(exc)[:5000] or type(exc).__name__)
                mlflow.end_run(status="FINISHED")
            raise
        except BaseException as exc:
            with _logged_failure(f"ending run {run.info.run_id}"):
                mlflow.set_tag("kgrec.error", f"{type(exc).__name__}: {exc}"[:5000])
                mlflow.end_run(status=end_status(exc))
            raise


def _param_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return value


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), which
    tells a live process from a later one that reused its pid; None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _machine() -> str:
    """This host and pid namespace: two containers may share a hostname but not their pids."""
    try:
        namespace = "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}@{namespace}"


def process_owner(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{_machine()}:{pid}:{_process_start(pid) or '?'}"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process named by an owner tag still runs: True/False on this host, None when
    it ran elsewhere (or the tag is missing or malformed)."""
    try:
        host, pid, start = (owner or "").rsplit(":", 2)
        pid_number = int(pid)
    except ValueError:
        return None
    if host != _machine() or start == "?":
        return None
    return _process_start(pid_number) == start


def _abandoned(owner: str | None, created_ms: int, before_ms: int) -> bool:
    if created_ms >= before_ms:
        return False  # newer than this run: a concurrent pipeline's work in progress
    alive = owner_alive(owner)
    if alive is None:
        return owner is None or time.time() * 1000 - created_ms > FOREIGN_ORPHAN_SECONDS * 1000
    return not alive


@dataclass
class Reaped:
    """What :func:`reap_orphans` cleaned up: ``(name, version)`` pairs deleted and runs ended."""

    versions: list[tuple[str, str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


def reap_orphans(names: Iterable[str], before_ms: int, experiment: str | None = None) -> Reaped:
    """Delete versions an interrupted run left half-registered and end runs a killed process left
    RUNNING (both KILLED, with the reason as a tag).

    An orphan version is tagged ``pending``, was created before ``before_ms``, holds no alias and
    belongs to a process that is gone (on another host: older than :data:`FOREIGN_ORPHAN_SECONDS`).
    Versions kgrec did not tag (registered by hand), pending work of live processes and anything
    newer than ``before_ms`` are left alone. Runs under :func:`store_lock`, so two pipelines started
    together do not both try to delete one orphan.
    """
    client = MlflowClient()
    reaped = Reaped()
    with store_lock():
        for name in names:
            for found in client.search_model_versions(f"name='{name}' and tag.`{STATE_TAG}` = '{PENDING}'"):
                tags = found.tags or {}
                if tags.get(STATE_TAG) != PENDING:
                    continue
                if not _abandoned(tags.get(OWNER_TAG), found.creation_timestamp, before_ms):
                    continue
                try:
                    version = client.get_model_version(name, found.version)  # searches omit aliases
                    if version.aliases:
                        continue
                    delete_version(client, name, version)
                except MlflowException as exc:  # gone meanwhile (deleted by hand): nothing to do
                    logger.info("orphan %s v%s: %s", name, found.version, exc)
                    continue
                logger.warning("removed orphan %s v%s (run %s, never published)", name, found.version, found.run_id)
                reaped.versions.append((name, str(found.version)))
                _end_orphan_run(client, found.run_id, f"orphan: {name} v{found.version} was never published")
                reaped.runs.append(found.run_id)
    if experiment is not None and (exp := client.get_experiment_by_name(experiment)) is not None:
        for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            owner = run.data.tags.get(OWNER_TAG)
            if owner is not None and _abandoned(owner, run.info.start_time, before_ms):
                _end_orphan_run(client, run.info.run_id, "orphan: its process ended without ending the run")
                reaped.runs.append(run.info.run_id)
    return reaped


def _end_orphan_run(client: MlflowClient, run_id: str | None, reason: str) -> None:
    if not run_id:
        return
    with contextlib.suppress(MlflowException):
        client.set_tag(run_id, "kgrec.error", reason)
        client.set_terminated(run_id, status="KILLED")


@dataclass(frozen=True)
class Promotion:
    version: str
    alias: str
    metric: float
    previous_champion: str | None
    previous_metric: float | None
    selection_metric: str = SELECTION_METRIC
    description: str = ""

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
        name=name, source=model_info.model_uri, run_id=run_id,
        tags={**dict(tags), STATE_TAG: PENDING, OWNER_TAG: process_owner()},
        model_id=model_info.model_id,
    )
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return version


@contextlib.contextmanager
def pending_version(name: str, version: ModelVersion) -> Iterator[ModelVersion]:
    """Delete the version again if anything inside the block fails or is cancelled (no
    half-published versions); a version still ``pending`` afterwards is reaped by the next run."""
    try:
        yield version
    except BaseException:
        client = MlflowClient()
        with _logged_failure(f"rolling back {name} version {version.version}"):
            if client.get_model_version(name, version.version).aliases:
                logger.warning("%s v%s already holds an alias: keeping it", name, version.version)
            else:
                logger.error("rolling back %s version %s", name, version.version)
                delete_version(client, name, version)
        raise


@contextlib.contextmanager
def _logged_failure(what: str) -> Iterator[None]:
    """Cleanup after a failure must not replace that failure (the store may be what failed): its
    own errors are logged, and whatever a SIGKILL-proof next run can clean up is left to
    :func:`reap_orphans`."""
    try:
        yield
    except Exception as exc:
        logger.error("%s failed: %s: %s", what, type(exc).__name__, exc)


def delete_version(client: MlflowClient, name: str, version: ModelVersion) -> None:
    """Delete a version and the logged model behind it (no model left without its version)."""
    client.delete_model_version(name, version.version)
    if model_id := logged_model_id(version):
        with contextlib.suppress(MlflowException):
            client.delete_logged_model(model_id)


def logged_model_id(version: ModelVersion) -> str | None:
    """The logged model a version was created from (not every store returns ``model_id``; the
    source ``models:/<id>`` names it too)."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/").split("/")[0] or None if source.startswith("models:/") else None


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
    """Mark ``version`` ready and give it the alias ``champion`` if it beats the current one, else
    ``challenger``; a displaced champion becomes ``previous``. The decision is written into the
    version's description.

    Ties keep the incumbent: a new version must be strictly better to take over. Both are compared on
    the candidate's selection metric (module docstring); a champion selected on another metric is
    not comparable and stays. Read-compare-move runs under :func:`store_lock`, so two pipelines
    finishing at once cannot both see the old champion and leave the worse one in place.
    """
    client = MlflowClient()
    with store_lock():
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
        dataset = client.get_run(version.run_id).data.tags.get("kgrec.dataset")
        description = version_description(
            version, metric_name, candidate, incumbent, incumbent_metric, alias, dataset
        )
        client.update_model_version(name, version.version, description=description)
        client.set_model_version_tag(name, version.version, ALIAS_AT_REGISTRATION_TAG, alias)
        client.set_model_version_tag(name, version.version, STATE_TAG, READY)
        # The alias move is the commit point, and the last step: once a version holds an alias,
        # nothing rolls it back (pending_version).
        if wins and incumbent is not None:
            client.set_registered_model_alias(name, PREVIOUS, incumbent.version)
        client.set_registered_model_alias(name, alias, version.version)
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
        description=description,
    )


def version_description(
    version: ModelVersion,
    metric_name: str,
    value: float,
    incumbent: ModelVersion | None,
    incumbent_value: float | None,
    alias: str,
    dataset: str | None = None,
) -> str:
    """What the MLflow UI shows on a version's page: the model, its data, its selection figure and
    what it was compared with."""
    tags = version.tags or {}
    snapshot = tags.get("kgrec.snapshot_hash", "")
    data = f" on {dataset}" if dataset else ""
    head = (
        f"{tags.get('kgrec.model', 'model')}{data} (snapshot {snapshot[:12] or 'unknown'}), "
        f"run {version.run_id}: {metric_name} = {value:.4f}."
    )
    if incumbent is None:
        verdict = "First version with a selection figure: champion."
    elif selection_metric_name(incumbent) != metric_name:
        verdict = (
            f"Not comparable with champion v{incumbent.version} (selected on "
            f"{selection_metric_name(incumbent)}): {alias}."
        )
    elif alias == CHAMPION:
        verdict = f"Beat champion v{incumbent.version} ({incumbent_value:.4f}), now {PREVIOUS}: champion."
    else:
        verdict = f"Did not beat champion v{incumbent.version} ({incumbent_value:.4f}): {alias}."
    return f"{head} {verdict}"


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


def mark_ended(run_id: str, error: BaseException) -> None:
    """Record that a run's later steps (evaluation, registration, publishing) failed (FAILED) or
    were cancelled (KILLED)."""
    client = MlflowClient()
    with _logged_failure(f"ending run {run_id}"):
        client.set_tag(run_id, "kgrec.error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, status=end_status(error))


@dataclass(frozen=True)
class RegistryState:
    """What a (possibly interrupted) pipeline left: versions created and runs started since a time."""

    versions: list[dict[str, Any]]
    runs: list[dict[str, str]]

    def kept(self) -> str:
        ready = [f"{v['name']} v{v['version']}" + (f" ({','.join(v['aliases'])})" if v["aliases"] else "")
                 for v in self.versions]
        statuses: dict[str, int] = {}
        for run in self.runs:
            statuses[run["status"]] = statuses.get(run["status"], 0) + 1
        runs = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"
        return f"kept {', '.join(ready) or 'no new version'}; runs: {runs}"


def state_since(names: Iterable[str], since_ms: int, experiment: str) -> RegistryState:
    """Versions of ``names`` created and runs of ``experiment`` started at or after ``since_ms``."""
    client = MlflowClient()
    versions = [
        # searches do not return aliases: read each version
        {"name": name, "version": str(v.version), "aliases": list(v.aliases or []),
         "state": (v.tags or {}).get(STATE_TAG)}
        for name in names
        for found in client.search_model_versions(f"name='{name}'")
        if found.creation_timestamp >= since_ms
        for v in [client.get_model_version(name, found.version)]
    ]
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else [
        {"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status}
        for r in client.search_runs([exp.experiment_id], f"attributes.start_time >= {since_ms}")
    ]
    return RegistryState(sorted(versions, key=lambda v: (v["name"], int(v["version"]))), runs)
