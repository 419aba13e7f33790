"""Where the flow's training tasks run (``PipelineConfig.task_runner``), and what they need there.

* ``thread`` (default): Prefect's ``ThreadPoolTaskRunner`` of ``parallel_training`` threads in the
  flow's own process. The tasks share its MLflow settings and its ``threading.Event``.
* ``dask``: ``prefect_dask.DaskTaskRunner``: a temporary ``distributed.LocalCluster`` of
  ``parallel_training`` single-threaded worker processes on 127.0.0.1, or the scheduler at
  ``runner_address``.
* ``ray``: ``prefect_ray.RayTaskRunner`` (the ``ray`` extra): a local Ray instance, or the cluster
  at ``runner_address``.

A worker process has neither the flow's MLflow settings nor its cancellation event. Each training
task therefore gets the flow's :class:`TrackingSettings` with the tracking URI already resolved (so
a worker's own environment cannot redirect its runs) and a flag it can read: a Dask ``Event``
relayed from the flow's event, or, on Ray, a cancelled object ref (Ray raises
``KeyboardInterrupt`` in the task, and the run ends KILLED). The Prefect API reaches the tasks
through the settings context that both runners serialise with each task.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
from kgrec.flows.config import PipelineConfig
from kgrec.models.tracking.settings import TrackingSettings
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

RAY_EXTRA = "pip install 'kgrec[ray]'"


def task_runner(config: PipelineConfig) -> TaskRunner:
    """The task runner ``config`` asks for (the cluster libraries are imported only when chosen)."""
    if config.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=config.parallel_training)
    if config.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.runner_address:
            return DaskTaskRunner(address=config.runner_address)
        # Processes, one thread each: torch's global RNG and MLflow's active run are per process.
        # Loopback and no dashboard: nothing listens on a routable address (infra/README.md).
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": config.parallel_training, "threads_per_worker": 1, "processes": True,
                "host": "127.0.0.1", "dashboard_address": None,
            },
        )
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ImportError(
            f"task_runner 'ray' needs prefect-ray and ray, which kgrec installs as an extra: {RAY_EXTRA}"
        ) from exc
    return RayTaskRunner(address=config.runner_address)


@contextlib.contextmanager
def shared_prefect_api(config: PipelineConfig) -> Iterator[None]:
    """Without a configured Prefect API, each process starts a temporary server of its own, and a
    worker's would race the flow's on one SQLite file: start the flow's first and hand its URL to
    the workers (in the settings context the task runner serialises with each task)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if config.task_runner == "thread" or PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one the flow's client would start (stopped at exit)
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def for_workers(tracking: TrackingSettings) -> TrackingSettings:
    """``tracking`` as a worker process must see it: the URI the flow resolved, not the worker's."""
    return tracking.model_copy(update={"tracking_uri": tracking.resolved_tracking_uri})


def configure_worker(tracking: TrackingSettings) -> None:
    """Point this worker process's MLflow at the flow's store and experiment (created by the flow)."""
    uri = tracking.resolved_tracking_uri
    # A worker on another machine would otherwise create an empty SQLite store of its own.
    if tracking.is_embedded and not Path(uri.removeprefix("sqlite:///")).exists():
        raise RuntimeError(
            f"the flow's tracking store {uri} is not on this worker's file system: run the flow "
            "against a tracking server (KGREC_TRACKING_URI=http://...) to train on a remote cluster"
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(tracking.experiment)


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


@contextlib.contextmanager
def relayed_cancel(
    config: PipelineConfig, cancel: threading.Event, futures: Sequence[PrefectFuture[Any]]
) -> Iterator[Any]:
    """The cancellation flag to hand the training tasks; while the body runs, setting ``cancel``
    reaches them on any runner (``futures``: the tasks submitted so far, read when it is set)."""
    if config.task_runner == "thread":
        yield cancel  # the tasks share the flow's process: no relay
        return
    signal: Callable[[], Any]
    if config.task_runner == "dask":
        import distributed

        runner = FlowRunContext.get().task_runner
        event = distributed.Event(f"kgrec-cancel-{uuid.uuid4().hex}", client=runner.client)
        flag, signal = WorkerCancel(event.name), event.set
    else:
        import ray

        flag = None  # Ray interrupts a cancelled task itself

        def signal() -> None:
            for future in futures:
                ray.cancel(future.wrapped_future)

    done = threading.Event()

    def relay() -> None:
        while not cancel.wait(0.2):
            if done.is_set():
                return
        signal()

    relaying = threading.Thread(target=relay, name="kgrec-cancel-relay", daemon=True)
    relaying.start()
    try:
        yield flag
    finally:
        done.set()
        relaying.join()
