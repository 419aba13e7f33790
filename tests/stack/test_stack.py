"""The local production stack, for real: Postgres, moto S3, the MLflow server (artefacts proxied to
the bucket), the Prefect server and a process worker. `kgrec pipeline` registers into it, `kgrec
serve` serves its champion, the infra/prefect.yaml deployment runs on its worker, and `down`/`up`
keeps the champion. Tests run in file order and share one stack (conftest.py)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import psycopg
import pytest
from kgrec.serving.process import running_service
from mlflow import MlflowClient

from kgrec.stack import StackSettings, down, up
from kgrec.stack.processes import port_free

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]

MODEL = "kgrec-music"
REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
DEPLOYMENT = "kgrec-pipeline/kgrec-pool-nightly"
SERVICES = ["postgres", "s3", "mlflow", "prefect-server", "prefect-worker"]


def mlflow_db(stack):
    secrets = stack.secrets()
    return psycopg.connect(host="127.0.0.1", port=stack.port("postgres"), user=secrets["db_user"],
                           password=secrets["db_password"], dbname="mlflow", connect_timeout=5)


def registered_versions(stack) -> list[tuple[int, str, str]]:
    with mlflow_db(stack) as conn:
        return conn.execute(
            "SELECT version, source, storage_location FROM model_versions WHERE name = %s ORDER BY version",
            (MODEL,)).fetchall()


def flow_runs(stack, **filters) -> list[dict]:
    response = httpx.post(f"{stack.prefect_api_url}/flow_runs/filter", json=filters, timeout=10)
    response.raise_for_status()
    return response.json()


def served_version(stack) -> tuple[str, list[str]]:
    """Start `kgrec serve` on a free port against the stack; the champion version it loaded and
    the candidates of one user."""
    with running_service(MODEL, stack.env, extra_args=["--tracking-uri", stack.tracking_uri]) as url, \
            httpx.Client(base_url=url, timeout=10) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        response = client.get("/v1/users/2/candidates", params={"k": 10})
        assert response.status_code == 200, response.text
        return str(ready.json()["model"]["version"]), [c["item_id"] for c in response.json()["candidates"]]


def test_up_is_idempotent_and_status_reports_every_service(stack):
    info = stack.info
    assert info["running"] and set(info["services"]) == set(SERVICES)
    assert info["tracking_uri"].startswith("http://127.0.0.1:")
    assert info["prefect_api_url"].startswith("http://127.0.0.1:") and info["prefect_api_url"].endswith("/api")
    assert info["s3_endpoint"].startswith("http://127.0.0.1:") and info["stack_dir"] == str(stack.dir)

    again, proc = stack.cli(["stack", "up", "--dir", str(stack.dir)])
    assert set(again["actions"].values()) == {"already running"}, again["actions"]
    assert {n: s["pid"] for n, s in again["services"].items()} == {n: s["pid"] for n, s in info["services"].items()}

    status, proc = stack.cli(["stack", "status", "--dir", str(stack.dir)])
    assert proc.returncode == 0 and status["running"]
    for name in SERVICES:
        service = status["services"][name]
        assert service["alive"] and service["pid"] == info["services"][name]["pid"]
        assert Path(service["log"]).is_file() and Path(service["pid_file"]).read_text().strip() == str(service["pid"])
    assert status["tracking_uri"] == info["tracking_uri"]

    env_file = (stack.dir / "stack.env").read_text()
    assert f"KGREC_TRACKING_URI={info['tracking_uri']}\n" in env_file
    assert f"PREFECT_API_URL={info['prefect_api_url']}\n" in env_file
    assert stat.S_IMODE((stack.dir / "secrets.json").stat().st_mode) == 0o600
    assert json.loads((stack.dir / "stack.json").read_text())["ports"]["postgres"] == stack.port("postgres")
    with mlflow_db(stack) as conn:  # the application role owns its databases, and no more
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
    with psycopg.connect(host="127.0.0.1", port=stack.port("postgres"), user="postgres",
                         password=stack.secrets()["superuser_password"], dbname="postgres") as conn:
        # loopback only, SCRAM passwords, no Unix socket
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"
        assert conn.execute("SHOW unix_socket_directories").fetchone()[0] == ""
        owners = conn.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                              "WHERE datname IN ('mlflow', 'prefect') ORDER BY 1").fetchall()
        assert owners == [("mlflow", "kgrec"), ("prefect", "kgrec")]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=stack.port("postgres"), user="kgrec", password="wrong",
                        dbname="mlflow", connect_timeout=5)


@pytest.fixture(scope="module")
def pipeline_run(stack):
    result, _ = stack.cli(["pipeline", "--dataset", "music", "--models", "bprmf", "--epochs", "2",
                           "--tracking-uri", stack.tracking_uri])
    return result


def test_pipeline_registers_in_postgres_with_artefacts_served_by_mlflow(stack, pipeline_run):
    result = pipeline_run
    assert result["tracking_uri"] == stack.tracking_uri and result["champion_version"] == "1"
    [model] = result["models"]
    assert model["registered"]["alias"] == "champion"

    # the version is in the stack's Postgres, not in a SQLite file
    versions = registered_versions(stack)
    assert [v[0] for v in versions] == [1]
    with mlflow_db(stack) as conn:
        aliases = conn.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,))
        assert aliases.fetchall() == [("champion", 1)]

    # artefacts go through the server (mlflow-artifacts:) to the bucket, never to a local folder
    client = MlflowClient(stack.tracking_uri)
    version = client.get_model_version(MODEL, "1")
    run = client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    assert not version.source.startswith("file:") and versions[0][2].startswith("mlflow-artifacts:/")
    assert client.get_model_version_download_uri(MODEL, "1").startswith("mlflow-artifacts:/")
    assert {a.path for a in client.list_artifacts(version.run_id)} >= {"index"}
    s3 = boto3.client("s3", endpoint_url=stack.info["s3_endpoint"], region_name="us-east-1",
                      aws_access_key_id="any", aws_secret_access_key="any")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(key.startswith(f"{run.info.experiment_id}/{version.run_id}/artifacts/") for key in keys)

    # the flow run was orchestrated by the stack's Prefect server
    runs = flow_runs(stack, flows={"name": {"any_": ["kgrec-pipeline"]}})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]


def test_service_serves_the_champion_and_again_after_a_restart(stack, pipeline_run):
    first, candidates = served_version(stack)
    assert first == pipeline_run["champion_version"] and len(candidates) == 10
    second, again = served_version(stack)
    assert (second, again) == (first, candidates)


@pytest.fixture(scope="module")
def deployed(stack):
    env = stack.env | {"KGREC_REPO": str(REPO), "PREFECT_CLI_PROMPT": "false"}
    proc = subprocess.run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    response = httpx.get(f"{stack.prefect_api_url}/deployments/name/{DEPLOYMENT}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_deployment_runs_on_the_stack_worker_and_registers_a_version(stack, pipeline_run, deployed):
    assert deployed["work_pool_name"] == "kgrec-pool" and deployed["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    before = len(registered_versions(stack))
    params = {"config": {"dataset": "music", "models": ["bprmf"], "epochs": 2}}
    proc = subprocess.run(
        [PREFECT, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params),
         "--watch", "--watch-timeout", "420"],
        env=stack.env, capture_output=True, text=True, timeout=480,
    )
    worker_log = (stack.dir / "logs" / "prefect-worker.log").read_text()[-3000:]
    runs = [r for r in flow_runs(stack, deployments={"id": {"any_": [deployed["id"]]}}) if not r["auto_scheduled"]]
    assert len(runs) == 1, proc.stdout[-2000:]
    assert runs[0]["state_type"] == "COMPLETED", proc.stdout[-2000:] + worker_log
    assert proc.returncode == 0, proc.stdout[-2000:]
    # the flow run tracked to the stack's MLflow (the worker's KGREC_TRACKING_URI) ...
    versions = registered_versions(stack)
    assert len(versions) == before + 1 and versions[-1][2].startswith("mlflow-artifacts:/")
    # ... and kept its working files in the stack folder (the worker's KGREC_HOME)
    assert any((stack.dir / "work" / "snapshots").iterdir())


# Fails with SQLAlchemy 2.1 (Prefect 3.8.8's scheduler: FlowRun.state is a hybrid without bulk_dml),
# hence the pin in pyproject.toml.
def test_the_nightly_schedule_creates_runs(stack, deployed):
    # the scheduler looks at recently changed deployments every 5 s; deployed a test ago
    deadline = time.monotonic() + 10
    while True:
        scheduled = [r for r in flow_runs(stack, deployments={"id": {"any_": [deployed["id"]]}})
                     if r["auto_scheduled"]]
        if scheduled or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert scheduled and all(r["state_type"] == "SCHEDULED" for r in scheduled)


def test_down_leaves_nothing_behind_and_up_keeps_ports_and_champion(stack, pipeline_run):
    settings = StackSettings(dir=stack.dir)
    before = stack.cli(["stack", "status", "--dir", str(stack.dir)])[0]
    pids = stack.pids(before)
    ports = {name: s["port"] for name, s in before["services"].items() if s["port"]}
    champion = MlflowClient(stack.tracking_uri).get_model_version_by_alias(MODEL, "champion").version

    stopped = down(settings)
    assert not stack.running(pids), f"left behind: {sorted(stack.running(pids))}"
    assert not stopped["running"] and not any(s["alive"] for s in stopped["services"].values())
    assert not any((stack.dir / "run").iterdir()), "pid files left"
    assert all(port_free("127.0.0.1", port) for port in ports.values())
    assert any((stack.dir / "s3" / "mlflow").rglob("*.faiss")), "the bucket was not saved"

    again = up(settings)
    assert {name: s["port"] for name, s in again["services"].items() if s["port"]} == ports
    assert set(again["actions"].values()) - {"already running"}, "everything should have started"
    version, candidates = served_version(stack)
    assert version == str(champion) and len(candidates) == 10
    # the session fixture's teardown stops this stack with `kgrec stack down` and checks its pids
