"""Typed settings of the local stack, the files under its folder, and its persisted state.

The folder holds everything: ``stack.json`` (the chosen ports, so ``up`` after ``down`` reuses
them), ``secrets.json`` (mode 0600), ``stack.env``, ``run/<service>.pid``, ``logs/<service>.log``,
the Postgres data directory, the S3 snapshot (``s3/``), ``PREFECT_HOME`` and the working directory
of the worker's flow runs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kgrec.models.tracking.settings import default_workdir

#: The services, in start order (``down`` stops them in reverse).
SERVICES = ("postgres", "s3", "mlflow", "prefect-server", "prefect-worker")

#: Defaults off the usual ports (5432, 9000, 5000, 4200), so a system Postgres, a MinIO, a plain
#: `mlflow server` or `prefect server start` on the same machine never clash with the stack.
DEFAULT_PORTS = {"postgres": 5433, "s3": 9010, "mlflow": 5010, "prefect-server": 4210}

DB_USER = "kgrec"
DATABASES = ("mlflow", "prefect")


def default_stack_dir() -> Path:
    return default_workdir() / "stack"


class StackSettings(BaseModel):
    """What ``kgrec stack up`` starts and where (CLI options override)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Path = Field(default_factory=default_stack_dir)
    #: Every service listens on loopback only.
    host: Literal["127.0.0.1"] = "127.0.0.1"
    #: Requested ports; a missing one comes from stack.json, else DEFAULT_PORTS (then the next free).
    ports: dict[str, int] = Field(default_factory=dict)
    #: An external S3 (MinIO, AWS) instead of moto; credentials from the standard AWS variables.
    s3_endpoint: str | None = Field(default_factory=lambda: os.environ.get("KGREC_S3_ENDPOINT") or None)
    bucket: str = "mlflow"
    pool: str = "kgrec-pool"
    worker_name: str = "kgrec-stack-worker"
    #: First starts run database migrations (MLflow, Prefect): slow on a busy 2-core machine.
    start_timeout_s: float = Field(default=240.0, gt=0)
    stop_timeout_s: float = Field(default=20.0, gt=0)

    def layout(self) -> Layout:
        return Layout(self.dir.expanduser().resolve())


class Layout:
    """Paths under the stack folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / "stack.json"
        self.secrets_file = root / "secrets.json"
        self.env_file = root / "stack.env"
        self.run_dir = root / "run"
        self.log_dir = root / "logs"
        self.pg_root = root / "postgres"
        self.pg_data = self.pg_root / "data"
        self.s3_snapshot = root / "s3"
        self.prefect_home = root / "prefect"
        #: KGREC_HOME of the worker's flow runs (snapshots, bundle cache; models live in MLflow).
        self.worker_home = root / "work"

    def pid_file(self, service: str) -> Path:
        return self.run_dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.log_dir / f"{service}.log"

    def create(self) -> None:
        # 0755: when root runs the stack, the `postgres` user must be able to traverse to its data.
        for path in (self.root, self.run_dir, self.log_dir, self.pg_root, self.prefect_home, self.worker_home):
            path.mkdir(parents=True, exist_ok=True)
        for path in (self.root, self.log_dir, self.pg_root):
            path.chmod(0o755)


class StackState(BaseModel):
    """``stack.json``: what must survive ``down`` (ports) and what ``status`` reports."""

    model_config = ConfigDict(extra="ignore")

    ports: dict[str, int] = Field(default_factory=dict)
    s3_endpoint: str | None = None
    bucket: str = "mlflow"
    pool: str = "kgrec-pool"
    worker_name: str = "kgrec-stack-worker"

    @classmethod
    def load(cls, layout: Layout) -> StackState:
        if layout.state_file.exists():
            return cls.model_validate_json(layout.state_file.read_text())
        return cls()

    def save(self, layout: Layout) -> None:
        tmp = layout.state_file.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(layout.state_file)


class Secrets(BaseModel):
    """Generated once per stack folder; the file is created with mode 0600."""

    db_user: str = DB_USER
    db_password: str
    superuser_password: str

    @classmethod
    def ensure(cls, layout: Layout) -> Secrets:
        if layout.secrets_file.exists():
            return cls.model_validate_json(layout.secrets_file.read_text())
        value = cls(db_password=secrets.token_urlsafe(24), superuser_password=secrets.token_urlsafe(24))
        # O_EXCL + mode at creation: the password is never readable by others, not even briefly.
        fd = os.open(layout.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value.model_dump_json(indent=2) + "\n")
        return value


def write_env_file(layout: Layout, values: dict[str, Any]) -> None:
    """``set -a; . <stack>/stack.env`` points a shell at the stack."""
    lines = [f"# kgrec stack at {layout.root} (written by `kgrec stack up`)"]
    lines += [f"{key}={value}" for key, value in values.items()]
    layout.env_file.write_text("\n".join(lines) + "\n")
