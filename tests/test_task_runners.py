"""The flow's task runners (flows/runners.py): thread pool, Dask, Ray."""

from __future__ import annotations

import importlib.util
import os

import pytest
from kgrec.flows.config import PipelineConfig
from kgrec.flows.runners import task_runner
from pydantic import ValidationError

HAS_RAY = importlib.util.find_spec("prefect_ray") is not None


def test_the_default_runner_is_the_thread_pool_of_parallel_training_threads():
    from prefect.task_runners import ThreadPoolTaskRunner

    runner = task_runner(PipelineConfig(parallel_training=3))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3


def test_dask_runner_is_a_local_process_cluster_or_the_given_scheduler():
    from prefect_dask import DaskTaskRunner

    local = task_runner(PipelineConfig(task_runner="dask", parallel_training=2))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert (local.cluster_kwargs["n_workers"], local.cluster_kwargs["processes"]) == (2, True)
    remote = task_runner(PipelineConfig(task_runner="dask", runner_address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs


@pytest.mark.parametrize(
    ("runner", "address"),
    [("thread", "tcp://h:8786"), ("dask", "http://h:8787/status"), ("dask", "ray://h:10001"),
     ("ray", "tcp://h:8786"), ("dask", "auto"), ("slurm", None)],
)
def test_runner_settings_are_validated_at_the_edge(runner, address):
    with pytest.raises(ValidationError):
        PipelineConfig(task_runner=runner, runner_address=address)


def test_cli_options_and_environment_reach_the_config(monkeypatch):
    from kgrec.cli import build_parser

    args = build_parser().parse_args(["pipeline", "--task-runner", "dask", "--runner-address", "tcp://h:8786"])
    assert (args.task_runner, args.runner_address) == ("dask", "tcp://h:8786")
    monkeypatch.setenv("KGREC_TASK_RUNNER", "ray")
    monkeypatch.setenv("KGREC_RUNNER_ADDRESS", "ray://head:10001")
    args = build_parser().parse_args(["pipeline"])
    assert (args.task_runner, args.runner_address) == ("ray", "ray://head:10001")


@pytest.mark.skipif(HAS_RAY, reason="prefect-ray is installed")
def test_ray_without_the_extra_says_which_extra_to_install():
    with pytest.raises(ImportError, match=r"kgrec\[ray\]"):
        task_runner(PipelineConfig(task_runner="ray"))


@pytest.mark.skipif(not HAS_RAY, reason="needs the ray extra")
def test_ray_runner_joins_the_given_cluster():
    from prefect_ray import RayTaskRunner

    runner = task_runner(PipelineConfig(task_runner="ray", runner_address="ray://head:10001"))
    assert isinstance(runner, RayTaskRunner) and runner.address == "ray://head:10001"


def test_a_worker_refuses_an_embedded_store_it_cannot_see(tmp_path):
    from kgrec.flows.runners import configure_worker
    from kgrec.models.tracking.settings import TrackingSettings

    with pytest.raises(RuntimeError, match="tracking server"):
        configure_worker(TrackingSettings(workdir=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/none.db"))


def test_two_models_train_in_two_dask_worker_processes_through_the_flow(tmp_path, monkeypatch, shared_data):
    """The real flow on a 2-worker LocalCluster: each model's MLflow run was owned by a worker
    process (its pid in the run's owner tag), not by this process and not by the same worker;
    both are registered, in the order they were listed."""
    from kgrec.flows.pipeline import run_pipeline
    from kgrec.models.tracking.registry import OWNER_TAG
    from kgrec.models.tracking.settings import TrackingSettings
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    for name in ("MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    tracking = TrackingSettings(workdir=tmp_path / "work")
    config = PipelineConfig(dataset="music", models=["bprmf", "lightgcn"], epochs=1, task_runner="dask",
                            parallel_training=2, tracking=tracking)
    with prefect_test_harness(server_startup_timeout=120):
        result = run_pipeline(config)
    assert [m["model"] for m in result["models"]] == ["bprmf", "lightgcn"]
    assert [m["registered"]["version"] for m in result["models"]] == ["1", "2"]
    client = MlflowClient(tracking.resolved_tracking_uri)
    runs = [client.get_run(m["run_id"]) for m in result["models"]]
    pids = [int(run.data.tags[OWNER_TAG].rsplit(":", 2)[1]) for run in runs]
    assert os.getpid() not in pids and len(set(pids)) == 2, pids
    assert all(run.info.status == "FINISHED" and run.data.params["task_runner"] == "dask" for run in runs)
    assert all(run.data.metrics["test_recall_at_20"] > 0 for run in runs)
