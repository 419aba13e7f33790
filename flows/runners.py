"""Where the flow's training tasks run (``PipelineConfig.task_runner``), and what they need there.

* ``thread`` (default): Prefect's ``ThreadPoolTaskRunner`` of ``parallel_training`` threads in the
  flow's own process, exactly as before the option existed.
* ``dask``: ``prefect_dask.DaskTaskRunner`` (the ``dask`` extra): a temporary
  ``distributed.LocalCluster`` of single-threaded worker processes on 127.0.0.1, sized from the
  CPU quota (:func:`local_dask_workers`), or the scheduler at ``runner_address``.
* ``ray``: ``prefect_ray.RayTaskRunner`` (the ``ray`` extra): a local Ray instance, or the cluster
  at ``runner_address``.

The cluster libraries are imported only when chosen. Only the training tasks go to the cluster
(``train_task.submit``); ingest, evaluation, registration, index publishing and promotion run in
the flow's process.

A worker process has neither the flow's MLflow settings, nor its cancellation event, nor (without
``PREFECT_API_URL``) the URL of the temporary Prefect server the flow started. :func:`on_task_runner`
gives each training task what it needs on the runner the flow run really uses: on the thread pool,
the flow's own ``threading.Event`` and nothing else; on a cluster, a :class:`WorkerSetup` (the
tracking URI resolved in the flow's process, so a worker's own environment cannot redirect its
runs) and a flag it can read (a Dask ``Event`` relayed from the flow's event; on Ray, the task's
object ref is cancelled, which raises ``KeyboardInterrupt`` in it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kgrec.flows.config import PipelineConfig
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.serving.settings import cpu_quota
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

log = logging.getLogger("kgrec.flows")

#: The thread-pool sizes of a Dask worker process (set to 1 by Dask unless given).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: What to install for each cluster runner (the error a missing package raises names it).
EXTRAS = {"dask": "pip install 'kgrec[dask]'", "ray": "pip install 'kgrec[ray]'"}


class MissingRunnerPackage(ImportError):
    """The chosen task runner's package is not installed."""


def build_task_runner(config: PipelineConfig) -> TaskRunner:
    """The Prefect task runner ``config`` asks for (see the module docstring)."""
    if config.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=config.parallel_training)
    if config.task_runner == "dask":
        DaskTaskRunner = _import("prefect_dask", "DaskTaskRunner", "dask")
        if config.runner_address:
            return DaskTaskRunner(address=config.runner_address)
        workers = local_dask_workers(config)
        # Processes with one task thread each: torch's global RNG and MLflow's active run are per
        # process. Everything on loopback, nothing on a routable address (infra/README.md); the
        # scheduler's HTTP server (the dashboard, with bokeh) on a free port, not a fixed 8787.
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers, "threads_per_worker": 1, "processes": True,
                "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
                "env": dict.fromkeys(THREAD_ENV, str(worker_threads(workers))),
            },
        )
    RayTaskRunner = _import("prefect_ray", "RayTaskRunner", "ray")
    return RayTaskRunner(address=config.runner_address)


def local_dask_workers(config: PipelineConfig) -> int:
    """Worker processes of the temporary LocalCluster: ``parallel_training`` when it was given,
    else one per model to train, at most one per CPU of this process's quota (2 on 2 cores)."""
    if "parallel_training" in config.model_fields_set:
        return config.parallel_training
    return max(1, min(len(config.models), cpu_quota()))


def worker_threads(workers: int) -> int:
    """torch's threads in each LocalCluster worker: ``$OMP_NUM_THREADS`` when the flow's process
    has it, else the CPU quota shared out. Dask would start them with OMP_NUM_THREADS,
    MKL_NUM_THREADS and OPENBLAS_NUM_THREADS at 1 (torch takes the smallest), so all three are set."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, cpu_quota() // workers)


def _import(module: str, name: str, runner: str) -> Any:
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError as exc:
        raise MissingRunnerPackage(
            f"task_runner {runner!r} needs the {module.replace('_', '-')} package, which is not "
            f"installed ({exc}): install kgrec's {runner} extra, {EXTRAS[runner]} "
            "(with -c constraints.txt for the tested versions)"
        ) from exc


def runner_kind(runner: TaskRunner | None) -> str:
    """``dask``, ``ray`` or ``thread`` (any other runner: the tasks share the flow's process)."""
    module = type(runner).__module__ if runner is not None else ""
    return "dask" if module.startswith("prefect_dask") else "ray" if module.startswith("prefect_ray") else "thread"


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What a training task on a cluster worker does first: point MLflow at the flow's store."""

    tracking: TrackingSettings
    task_runner: str

    @property
    def params(self) -> dict[str, str]:
        """Logged with the training run."""
        return {"task_runner": self.task_runner}

    def configure(self) -> None:
        uri = self.tracking.resolved_tracking_uri
        # A worker on another machine would otherwise create an empty SQLite store of its own.
        if self.tracking.is_embedded and not Path(uri.removeprefix("sqlite:///")).exists():
            raise RuntimeError(
                f"the flow's tracking store {uri} is not on this worker's file system: run the flow "
                "against a tracking server (KGREC_TRACKING_URI=http://...) to train on a remote cluster"
            )
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.tracking.experiment)


@dataclasses.dataclass
class TaskSide:
    """What :func:`on_task_runner` hands each training task."""

    cancel: Any  # anything with is_set(): the flow's threading.Event on the thread pool
    worker: WorkerSetup | None  # None on the thread pool


@contextlib.contextmanager
def on_task_runner(
    config: PipelineConfig, tracking: TrackingSettings, cancel: threading.Event,
    futures: Sequence[Any],
) -> Iterator[TaskSide]:
    """The cancellation flag and worker setup to hand the training tasks submitted in the body,
    for the task runner this flow run uses. On a cluster, while the body runs, setting ``cancel``
    reaches the tasks (``futures``: those submitted so far, read when it is set), and a temporary
    Prefect server of the flow is named to them (it would otherwise start one per worker)."""
    context = FlowRunContext.get()
    kind = runner_kind(context.task_runner if context is not None else None)
    if kind != config.task_runner:
        # e.g. infra/prefect.yaml's deployment: its runner is the flow's default, not the config's
        log.warning("task_runner %r was asked for, but this flow run's task runner is %r",
                    config.task_runner, kind)
    if kind == "thread":
        yield TaskSide(cancel, None)  # the tasks share the flow's process: nothing to relay
        return
    worker = WorkerSetup(
        tracking.model_copy(update={"tracking_uri": tracking.resolved_tracking_uri}), kind
    )
    flag: Any
    signal: Callable[[], Any]
    if kind == "dask":
        import distributed

        event = distributed.Event(f"kgrec-cancel-{uuid.uuid4().hex}", client=context.task_runner.client)
        flag, signal = WorkerCancel(event.name), event.set
    else:
        import ray

        flag = None  # Ray interrupts a cancelled task itself

        def signal() -> None:
            for future in list(futures):
                ray.cancel(future.wrapped_future)

    done = threading.Event()

    def relay() -> None:
        while not cancel.wait(0.2):
            if done.is_set():
                return
        signal()

    relaying = threading.Thread(target=relay, name="kgrec-cancel-relay", daemon=True)
    with _prefect_api_for_workers(context):
        relaying.start()
        try:
            yield TaskSide(flag, worker)
        finally:
            done.set()
            relaying.join()


@contextlib.contextmanager
def _prefect_api_for_workers(context: FlowRunContext) -> Iterator[None]:
    """Without ``PREFECT_API_URL`` the flow talks to a temporary server it started on 127.0.0.1,
    and a worker would start one of its own on the same database: name the flow's to the tasks
    submitted in the body (the runner sends the settings context with each task)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    url = str(context.client.api_url).rstrip("/")
    log.info("cluster workers report their task runs to this flow's temporary Prefect server %s "
             "(reachable from this machine only: set PREFECT_API_URL for workers elsewhere)", url)
    with temporary_settings({PREFECT_API_URL: url}):
        yield


class WorkerCancel:
    """The flow's cancellation as a task on a Dask worker reads it (``is_set``, like a
    ``threading.Event``): a cluster-wide ``distributed.Event``, asked at most every ``interval``
    seconds, since each ask is a scheduler round trip and the trainer asks before every step."""

    def __init__(self, name: str, interval: float = 0.5) -> None:
        self.name, self.interval = name, interval
        self._seen, self._asked = False, float("-inf")

    def is_set(self) -> bool:
        if not self._seen and time.monotonic() - self._asked >= self.interval:
            import distributed

            self._asked = time.monotonic()
            self._seen = distributed.Event(self.name).is_set()
        return self._seen
