"""One local stack for the whole module: `kgrec stack up --json` in a temporary folder, `kgrec stack
down` at the end, and a check that no process of it is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from kgrec.stack import StackSettings, status
from kgrec.stack.processes import process_tree

KGREC = str(Path(sys.executable).with_name("kgrec"))
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    info: dict  # the JSON of `kgrec stack up --json`
    dir: Path
    env: dict[str, str]  # a client's environment: the stack's URIs, everything else in a temp folder

    @property
    def tracking_uri(self) -> str:
        return self.info["tracking_uri"]

    @property
    def prefect_api_url(self) -> str:
        return self.info["prefect_api_url"]

    def secrets(self) -> dict:
        return json.loads((self.dir / "secrets.json").read_text())

    def port(self, service: str) -> int:
        return self.info["services"][service]["port"]

    def cli(self, args: list[str]) -> tuple[dict, subprocess.CompletedProcess]:
        """``kgrec ARGS --json`` in the client environment: its JSON and the process."""
        return kgrec_json(args, self.env)

    pids = staticmethod(lambda info: stack_pids(info))
    running = staticmethod(lambda pids: running(pids))


def kgrec_json(args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([KGREC, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode in (0, 3), f"kgrec {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def stack_pids(info: dict) -> set[int]:
    """Every process of the stack now: each service, its descendants and its session."""
    pids: set[int] = set()
    for service in info["services"].values():
        if service.get("pid"):
            pids |= {p.pid for p in process_tree(service["pid"])}
    return pids


def running(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.fixture(scope="session")
def stack(shared_data) -> Iterator[Stack]:
    # Not under pytest's tmp_path: its folders are 0700 and Postgres runs as the `postgres` user
    # when the tests run as root, so it must be able to traverse to its data directory.
    root = Path(tempfile.mkdtemp(prefix="kgrec-stack-test-"))
    root.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI", "PREFECT_API_URL", "KGREC_S3_ENDPOINT")}
    env |= {"KGREC_HOME": str(root / "kgrec"), "PREFECT_HOME": str(root / "prefect-client"),
            "KGREC_DATA_DIR": str(shared_data), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    stack_dir = root / "stack"
    try:
        info, _ = kgrec_json(["stack", "up", "--dir", str(stack_dir)], env)
        client_env = env | {"KGREC_TRACKING_URI": info["tracking_uri"], "PREFECT_API_URL": info["prefect_api_url"]}
        yield Stack(info, stack_dir, client_env)
    finally:
        # whatever the tests did (down/up in between), stop what runs now and check nothing is left
        pids = stack_pids(status(StackSettings(dir=stack_dir), say=lambda _: None))
        down = subprocess.run([KGREC, "stack", "down", "--dir", str(stack_dir), "--json"], env=env,
                              capture_output=True, text=True, timeout=300)
        left = running(pids)
        shutil.rmtree(root, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-3000:]
        assert not left, f"processes of the stack left after `kgrec stack down`: {sorted(left)}"
