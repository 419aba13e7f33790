"""The flow's task runners (flows/runners.py): thread pool (default), Dask, Ray."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import sys
import threading
import time
import types

import pytest
from kgrec.flows.config import PipelineConfig
from kgrec.flows.runners import (
    MissingRunnerPackage,
    WorkerCancel,
    WorkerSetup,
    build_task_runner,
    local_dask_workers,
    on_task_runner,
    runner_kind,
)
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.serving.settings import cpu_quota
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

HAS_DASK = importlib.util.find_spec("prefect_dask") is not None
HAS_RAY = importlib.util.find_spec("prefect_ray") is not None
needs_dask = pytest.mark.skipif(not HAS_DASK, reason="needs the dask extra (installed by dev)")


# ------------------------------------------------------------------------------------- builder
def test_the_default_runner_is_the_thread_pool_of_parallel_training_threads():
    from kgrec.flows.pipeline import configured_flow

    assert PipelineConfig().task_runner == "thread" and PipelineConfig().runner_address is None
    runner = build_task_runner(PipelineConfig(parallel_training=3))
    assert type(runner) is ThreadPoolTaskRunner and runner._max_workers == 3
    flow_runner = configured_flow(PipelineConfig(parallel_training=2)).task_runner
    assert type(flow_runner) is ThreadPoolTaskRunner and flow_runner._max_workers == 2


@needs_dask
def test_dask_runner_is_a_local_process_cluster_sized_from_the_cpu_quota(monkeypatch):
    from prefect_dask import DaskTaskRunner

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    config = PipelineConfig(task_runner="dask", models=["bprmf", "lightgcn", "kgat"])
    local = build_task_runner(config)
    assert isinstance(local, DaskTaskRunner) and local.address is None
    kwargs = local.cluster_kwargs
    assert local.cluster_class == "distributed.LocalCluster"
    assert (kwargs["threads_per_worker"], kwargs["processes"], kwargs["host"]) == (1, True, "127.0.0.1")
    assert kwargs["dashboard_address"].startswith("127.0.0.1:")  # loopback only
    assert kwargs["n_workers"] == local_dask_workers(config) == min(3, cpu_quota())
    threads = str(max(1, cpu_quota() // kwargs["n_workers"]))
    assert kwargs["env"] == {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    # one model: one worker; an explicit parallel_training is taken as it is
    assert local_dask_workers(PipelineConfig(task_runner="dask", models=["bprmf"])) == 1
    assert build_task_runner(PipelineConfig(task_runner="dask", parallel_training=2)).cluster_kwargs["n_workers"] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit setting of the flow's process wins
    assert set(build_task_runner(config).cluster_kwargs["env"].values()) == {"3"}


@needs_dask
def test_dask_runner_joins_the_given_scheduler():
    remote = build_task_runner(PipelineConfig(task_runner="dask", runner_address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs and remote.cluster_class is None


@pytest.mark.parametrize(("runner", "module", "extra"), [("dask", "prefect_dask", "kgrec[dask]"),
                                                         ("ray", "prefect_ray", "kgrec[ray]")])
def test_a_missing_runner_package_names_the_extra_to_install(monkeypatch, runner, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like to `import`
    with pytest.raises(MissingRunnerPackage, match=rf"{module.replace('_', '-')}.*pip install '{re.escape(extra)}'"):
        build_task_runner(PipelineConfig(task_runner=runner))
    assert issubclass(MissingRunnerPackage, ImportError)


@pytest.mark.skipif(HAS_RAY, reason="prefect-ray is installed")
def test_ray_without_the_extra_says_which_extra_to_install():
    with pytest.raises(MissingRunnerPackage, match=r"pip install 'kgrec\[ray\]'"):
        build_task_runner(PipelineConfig(task_runner="ray"))


@pytest.mark.skipif(not HAS_RAY, reason="needs the ray extra")
def test_ray_runner_is_local_or_joins_the_given_cluster():
    from prefect_ray import RayTaskRunner

    assert build_task_runner(PipelineConfig(task_runner="ray")).address is None
    runner = build_task_runner(PipelineConfig(task_runner="ray", runner_address="ray://head:10001"))
    assert isinstance(runner, RayTaskRunner) and runner.address == "ray://head:10001"


def test_runner_kind_of_a_flow_run_s_task_runner():
    assert runner_kind(None) == runner_kind(ThreadPoolTaskRunner()) == "thread"
    assert runner_kind(type("DaskTaskRunner", (), {"__module__": "prefect_dask.task_runners"})()) == "dask"
    assert runner_kind(type("RayTaskRunner", (), {"__module__": "prefect_ray.task_runners"})()) == "ray"


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("runner", "address", "message"),
    [("thread", "tcp://h:8786", "set task_runner to 'dask' or 'ray'"),
     ("dask", "http://h:8787/status", "not a dask cluster address"),
     ("dask", "ray://h:10001", "not a dask cluster address"),
     ("ray", "tcp://h:8786", "not a ray cluster address"),
     ("dask", "auto", "not a dask cluster address"),
     ("dask", "tcp://", "not a dask cluster address"),
     ("slurm", None, "'thread', 'dask' or 'ray'")],
)
def test_runner_settings_are_validated_at_the_edge(runner, address, message):
    with pytest.raises(ValidationError, match=message):
        PipelineConfig(task_runner=runner, runner_address=address)


@pytest.mark.parametrize(("runner", "address"), [("dask", "tcp://10.0.0.5:8786"), ("dask", "tls://h:8786"),
                                                 ("dask", "h:8786"), ("ray", "ray://h:10001"), ("ray", "auto")])
def test_cluster_addresses_that_are_accepted(runner, address):
    assert PipelineConfig(task_runner=runner, runner_address=address).runner_address == address


def test_a_blank_address_is_no_address():
    assert PipelineConfig(task_runner="thread", runner_address="  ").runner_address is None


def test_runner_settings_survive_a_deployment_s_json_round_trip():
    from kgrec.flows.pipeline import pipeline_flow

    config = PipelineConfig(task_runner="dask", runner_address="tcp://h:8786")
    validated = pipeline_flow.validate_parameters({"config": config.model_dump(mode="json")})
    assert validated["config"] == config


# ------------------------------------------------------------------------------------------ CLI
def test_cli_options_and_environment_reach_the_config(monkeypatch):
    from kgrec.cli import build_parser

    monkeypatch.delenv("KGREC_TASK_RUNNER", raising=False)
    monkeypatch.delenv("KGREC_RUNNER_ADDRESS", raising=False)
    args = build_parser().parse_args(["pipeline"])
    assert (args.task_runner, args.runner_address) == ("thread", None)
    args = build_parser().parse_args(["pipeline", "--task-runner", "dask", "--runner-address", "tcp://h:8786"])
    assert (args.task_runner, args.runner_address) == ("dask", "tcp://h:8786")
    monkeypatch.setenv("KGREC_TASK_RUNNER", "ray")
    monkeypatch.setenv("KGREC_RUNNER_ADDRESS", "ray://head:10001")
    args = build_parser().parse_args(["pipeline"])
    assert (args.task_runner, args.runner_address) == ("ray", "ray://head:10001")
    args = build_parser().parse_args(["pipeline", "--task-runner", "dask", "--runner-address", "tcp://h:1"])
    assert (args.task_runner, args.runner_address) == ("dask", "tcp://h:1")  # options win


def test_cli_reports_a_bad_runner_like_a_bad_option(monkeypatch, capsys):
    from kgrec.cli import main

    monkeypatch.setenv("KGREC_TASK_RUNNER", "slurm")
    assert main(["pipeline", "--json"]) == 2
    assert "task_runner" in capsys.readouterr().err
    monkeypatch.delenv("KGREC_TASK_RUNNER")
    assert main(["pipeline", "--runner-address", "tcp://h:8786", "--json"]) == 2
    assert "set task_runner to 'dask' or 'ray'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ worker side
def test_the_thread_pool_gets_the_flow_s_own_event_and_no_worker_setup(tmp_path):
    cancel = threading.Event()
    with on_task_runner(PipelineConfig(), TrackingSettings(workdir=tmp_path), cancel, []) as side:
        assert side.cancel is cancel and side.worker is None


def test_a_worker_refuses_an_embedded_store_it_cannot_see(tmp_path):
    setup = WorkerSetup(TrackingSettings(workdir=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/none.db"), "dask")
    with pytest.raises(RuntimeError, match="tracking server"):
        setup.configure()
    assert pickle.loads(pickle.dumps(setup)) == setup and setup.params == {"task_runner": "dask"}


def test_workers_are_told_the_flow_s_temporary_prefect_server(monkeypatch):
    from kgrec.flows import runners
    from prefect.settings import PREFECT_API_URL, temporary_settings

    context = types.SimpleNamespace(client=types.SimpleNamespace(api_url="http://127.0.0.1:8123/api/"))
    with temporary_settings({PREFECT_API_URL: None}):
        with runners._prefect_api_for_workers(context):
            assert PREFECT_API_URL.value() == "http://127.0.0.1:8123/api"
        assert not PREFECT_API_URL.value()
    with temporary_settings({PREFECT_API_URL: "http://prefect:4200/api"}):
        with runners._prefect_api_for_workers(context):  # a configured server is left as it is
            assert PREFECT_API_URL.value() == "http://prefect:4200/api"


@needs_dask
def test_the_flow_s_cancellation_reaches_a_task_on_a_dask_worker(monkeypatch, tmp_path):
    """Setting the flow's threading.Event is relayed to a distributed.Event that a task running
    on a Dask worker sees (WorkerCancel), within a second."""
    import distributed
    from kgrec.flows import runners

    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        fake_runner = type("DaskTaskRunner", (), {"__module__": "prefect_dask.fake", "client": client})()
        context = types.SimpleNamespace(task_runner=fake_runner, client=types.SimpleNamespace(api_url="http://x/api"))
        monkeypatch.setattr(runners.FlowRunContext, "get", staticmethod(lambda: context))
        cancel = threading.Event()
        config = PipelineConfig(task_runner="dask")
        with on_task_runner(config, TrackingSettings(workdir=tmp_path), cancel, []) as side:
            assert isinstance(side.cancel, WorkerCancel) and side.worker.task_runner == "dask"
            flag = pickle.loads(pickle.dumps(side.cancel))  # what a worker gets
            flag.interval = 0.05
            assert client.submit(flag.is_set, pure=False).result(timeout=30) is False

            def wait_for_cancel(flag: WorkerCancel, seconds: float) -> bool:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    if flag.is_set():
                        return True
                    time.sleep(0.05)
                return False

            waiting = client.submit(wait_for_cancel, flag, 20.0, pure=False)
            time.sleep(0.3)
            cancel.set()
            assert waiting.result(timeout=30) is True


# ------------------------------------------------------------------------------- integration
@pytest.fixture()
def restored_environ():
    """Dask's Nanny sets OMP_NUM_THREADS=1, PYTHONHASHSEED, ... in the spawning process's own
    os.environ; give later tests (and their child processes) the environment they had."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


@needs_dask
def test_two_models_train_in_two_dask_worker_processes_through_the_flow(
    tmp_path, monkeypatch, shared_data, restored_environ
):
    """The real flow on a 2-worker LocalCluster: each model's MLflow run was owned by a worker
    process (its pid in the run's owner tag), not by this process and not by the same worker;
    both are registered and promoted in the flow's process, in the order they were listed, and
    the cluster's processes are gone when the flow returns."""
    from kgrec.flows.pipeline import run_pipeline
    from kgrec.models.tracking.registry import OWNER_TAG
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.testing.utilities import prefect_test_harness

    for name in ("MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    tracking = TrackingSettings(workdir=tmp_path / "work")
    config = PipelineConfig(dataset="music", models=["bprmf", "lightgcn"], epochs=1, task_runner="dask",
                            parallel_training=2, tracking=tracking)
    with prefect_test_harness(server_startup_timeout=120):
        result = run_pipeline(config)
        with get_client(sync_client=True) as prefect:
            (flow_run,) = prefect.read_flow_runs()
            logs = [log.message for log in prefect.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))]
    # the workers' library log lines reach the flow run in Prefect (epochs are logged by them only)
    assert any(m.startswith("epoch 1 loss=") for m in logs), logs
    assert [m["model"] for m in result["models"]] == ["bprmf", "lightgcn"]
    assert [m["registered"]["version"] for m in result["models"]] == ["1", "2"]
    assert result["champion_version"] in {"1", "2"}
    client = MlflowClient(tracking.resolved_tracking_uri)
    runs = [client.get_run(m["run_id"]) for m in result["models"]]
    pids = [int(run.data.tags[OWNER_TAG].rsplit(":", 2)[1]) for run in runs]
    assert os.getpid() not in pids and len(set(pids)) == 2, pids
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.params["task_runner"] == "dask"
        assert run.data.metrics["best_epoch"] == 1 and run.data.metrics["test_recall_at_20"] > 0
    versions = {str(v.version): v.run_id for v in client.search_model_versions(f"name='{result['registered_model']}'")}
    assert versions == {"1": runs[0].info.run_id, "2": runs[1].info.run_id}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "the LocalCluster's workers outlived the flow"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
