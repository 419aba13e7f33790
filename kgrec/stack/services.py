"""The detached services of the stack: the S3 server (moto), the MLflow tracking server, the
Prefect server and its process worker; and the bucket and work pool they need."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from kgrec.stack.processes import StackError, alive, read_pid, start_detached, stop_tree
from kgrec.stack.settings import Layout

#: moto accepts any credentials; fixed ones keep a user's real AWS keys away from it.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kgrec-local", "AWS_SECRET_ACCESS_KEY": "kgrec-local-secret"}
REGION = "us-east-1"

#: Settings of the caller's shell that would point a service elsewhere than the stack.
_FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_KEY",
                "PREFECT_PROFILE", "PREFECT_HOME", "PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_",
                "MLFLOW_BACKEND_STORE_URI", "MLFLOW_S3_ENDPOINT_URL")


def base_env() -> dict[str, str]:
    """The caller's environment without what points elsewhere and without cloud credentials (the
    MLflow server gets the S3 ones it needs explicitly: :func:`s3_credentials`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((*_FOREIGN_ENV, "AWS_"))}
    return env | {"PYTHONUNBUFFERED": "1"}


def executable(name: str) -> str:
    """A console script of this environment (the venv's, even when it is not on PATH)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: install the stack extra, `pip install -e '.[stack]'`")
    return found


def repo_root() -> Path | None:
    """The checkout the Prefect deployment's flow runs import from (``KGREC_REPO`` wins)."""
    if repo := os.environ.get("KGREC_REPO"):
        return Path(repo).resolve()
    root = Path(__file__).resolve().parents[2]
    return root if (root / "flows" / "pipeline.py").exists() else None


@dataclass(frozen=True)
class Detached:
    """A service started by :func:`start_detached`; ``marker`` is part of its command line."""

    name: str
    marker: str
    layout: Layout

    @property
    def log_file(self) -> Path:
        return self.layout.log_file(self.name)

    def pid(self) -> int | None:
        pid = read_pid(self.layout.pid_file(self.name))
        return pid if alive(pid, self.marker) else None

    def start(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
        return start_detached(argv, env, self.layout.pid_file(self.name), self.log_file, cwd)

    def stop(self, timeout: float) -> list[int]:
        pid = self.pid()
        pids = stop_tree(pid, timeout) if pid is not None else []
        self.layout.pid_file(self.name).unlink(missing_ok=True)
        return pids


def services(layout: Layout) -> dict[str, Detached]:
    return {
        "s3": Detached("s3", "moto_server", layout),
        "mlflow": Detached("mlflow", "mlflow server", layout),
        "prefect-server": Detached("prefect-server", "prefect server start", layout),
        "prefect-worker": Detached("prefect-worker", "prefect worker start", layout),
    }


# -- S3 ----------------------------------------------------------------------------------------
def s3_credentials(external: bool) -> dict[str, str]:
    if not external:
        return dict(MOTO_CREDENTIALS)
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def s3_client(endpoint: str, external: bool):
    creds = s3_credentials(external)
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=creds.get("AWS_DEFAULT_REGION", REGION),
        aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=creds.get("AWS_SESSION_TOKEN"),
        config=Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=60),
    )


def start_moto(service: Detached, host: str, port: int) -> int:
    return service.start([executable("moto_server"), "-H", host, "-p", str(port)], base_env())


def ensure_bucket(client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def save_snapshot(client, bucket: str, dest: Path) -> int:
    """Copy the bucket to ``dest/<bucket>/`` (moto keeps objects in memory only); replaces the
    previous snapshot only once the copy is complete. Returns the number of objects."""
    tmp = dest.with_name(dest.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):
                continue
            target = tmp / bucket / key
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
            count += 1
    (tmp / bucket).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return count


def restore_snapshot(client, bucket: str, src: Path) -> int:
    root = src / bucket
    if not root.is_dir():
        return 0
    count = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, path.relative_to(root).as_posix())
            count += 1
    return count


# -- MLflow ------------------------------------------------------------------------------------
def start_mlflow(service: Detached, host: str, port: int, backend_uri: str, bucket: str,
                 s3_endpoint: str, external_s3: bool) -> int:
    env = base_env() | s3_credentials(external_s3) | {
        # in the environment, not argv: the URI carries the database password
        "MLFLOW_BACKEND_STORE_URI": backend_uri,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        # MLflow's job runner (GenAI evaluation, trace rollups; unused here) would add seven huey
        # consumer processes, about 2 GB, to a 2-core machine
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", REGION) if external_s3 else REGION,
    }
    argv = [executable("mlflow"), "server", "--host", host, "--port", str(port),
            # 2 cores: one worker; clients reach the bucket through the server (mlflow-artifacts:)
            "--workers", "1", "--serve-artifacts", "--artifacts-destination", f"s3://{bucket}"]
    return service.start(argv, env)


# -- Prefect -----------------------------------------------------------------------------------
def prefect_env(layout: Layout, api_url: str) -> dict[str, str]:
    return base_env() | {
        "PREFECT_HOME": str(layout.prefect_home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
    }


def start_prefect_server(service: Detached, layout: Layout, host: str, port: int, database_url: str) -> int:
    env = prefect_env(layout, f"http://{host}:{port}/api") | {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
    }
    argv = [executable("prefect"), "server", "start", "--host", host, "--port", str(port), "--analytics-off"]
    return service.start(argv, env, cwd=layout.prefect_home)


def ensure_work_pool(api_url: str, pool: str) -> bool:
    """Create the process work pool (with the process worker's default job template) unless it
    exists; returns whether it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
        except ObjectAlreadyExists:
            return False


def worker_online(api_url: str, pool: str, name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return any(w.name == name and str(w.status).upper().endswith("ONLINE") for w in workers)


def start_worker(service: Detached, layout: Layout, api_url: str, pool: str, name: str,
                 tracking_uri: str) -> int:
    env = prefect_env(layout, api_url) | {
        # inherited by every flow run of the pool: track to the stack, keep caches in the stack
        "KGREC_TRACKING_URI": tracking_uri,
        "KGREC_HOME": str(layout.worker_home),
    }
    if (repo := repo_root()) is not None:
        env["KGREC_REPO"] = str(repo)  # infra/prefect.yaml's pull step: set_working_directory
    argv = [executable("prefect"), "worker", "start", "--pool", pool, "--type", "process",
            "--name", name, "--install-policy", "never"]
    return service.start(argv, env, cwd=layout.worker_home)
