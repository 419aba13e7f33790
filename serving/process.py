"""Child processes of the ``kgrec`` CLI for benchmarks and load runs: ``kgrec pipeline`` in its own
working directory, and ``kgrec serve`` started and waited on until it is ready (tests too)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx


def workdir_env(kgrec_home: Path, prefect_home: Path | None = None) -> dict[str, str]:
    """The environment of a CLI child process that keeps everything in ``kgrec_home`` (embedded
    MLflow store; Prefect home ``kgrec_home/prefect`` unless given), whatever tracking server the
    parent process points at."""
    env = os.environ | {
        "KGREC_HOME": str(kgrec_home),
        "PREFECT_HOME": str(prefect_home or Path(kgrec_home) / "prefect"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("KGREC_TRACKING_URI", None)
    return env


def run_pipeline_cli(
    args: Sequence[str], env: Mapping[str, str], *, epochs: int | None = None, time_cap: float | None = None
) -> tuple[dict, float]:
    """``kgrec pipeline ARGS [--epochs N] [--time-cap S] --json``: its JSON result and wall seconds
    (SystemExit with the end of its stderr when it fails). On a terminal its progress and log go
    straight to this one's stderr."""
    kgrec = str(Path(sys.executable).with_name("kgrec"))
    caps = [*(["--epochs", str(epochs)] if epochs else []), *(["--time-cap", str(time_cap)] if time_cap else [])]
    on_terminal = sys.stderr.isatty()
    started = time.perf_counter()
    proc = subprocess.run(
        [kgrec, "pipeline", *args, *caps, "--json"], env=dict(env), text=True,
        stdout=subprocess.PIPE, stderr=None if on_terminal else subprocess.PIPE,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit("kgrec pipeline failed" + ("" if on_terminal else f":\n{proc.stderr[-3000:]}"))
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(
    model_name: str,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 120.0,
) -> Iterator[str]:
    """Start the service for ``model_name`` on a free loopback port; yields its base URL."""
    with service_process(model_name, env, host, extra_args, ready_timeout) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def service_process(
    model_name: str,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 120.0,
    log_path: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """:func:`running_service` that also yields the process (for psutil) and keeps its output in
    ``log_path`` (a temporary file when None)."""
    port = free_port(host)
    kgrec = str(Path(sys.executable).with_name("kgrec"))
    with (log_path.open("w+") if log_path is not None else tempfile.TemporaryFile(mode="w+")) as log:
        server = subprocess.Popen(
            [kgrec, "serve", "--host", host, "--port", str(port), "--model-name", model_name,
             *extra_args],
            env=dict(env or os.environ), stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        base_url = f"http://{host}:{port}"
        try:
            _wait_until_ready(base_url, server, log, ready_timeout)
            yield base_url, server
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_until_ready(base_url: str, server: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=5) as client:
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                state = "exited" if server.poll() is not None else "is not ready"
                raise RuntimeError(f"kgrec serve {state} after start:\n{log.read()[-4000:]}")
            time.sleep(0.3)
