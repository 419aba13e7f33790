"""``up``, ``down`` and ``status`` of the whole stack.

Start order: Postgres → S3 → MLflow → Prefect server → work pool → worker; ``down`` stops them in
reverse. ``up`` is idempotent: a service that runs is left alone and reported so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import psycopg

import kgrec.stack.services as svc
from kgrec.stack.postgres import Postgres, find_bindir
from kgrec.stack.processes import StackError, http_ok, pick_port, port_free, stop_tree, wait_until
from kgrec.stack.settings import (
    DEFAULT_PORTS,
    SERVICES,
    Layout,
    Secrets,
    StackSettings,
    StackState,
    write_env_file,
)

MOTO_NOTE = ("moto keeps objects in memory: `stack down` saves the bucket to {snapshot} and `up` loads "
             "it back; objects written after the last `up` are lost if moto dies without a `down`")

Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _postgres(layout: Layout, state: StackState) -> Postgres:
    """The cluster, for checking and stopping it (which needs no password)."""
    secrets = (Secrets.model_validate_json(layout.secrets_file.read_text()) if layout.secrets_file.exists()
               else Secrets(db_password="", superuser_password=""))
    return Postgres(layout, state.ports.get("postgres", DEFAULT_PORTS["postgres"]), secrets)


def _resolve_ports(settings: StackSettings, state: StackState, pg: Postgres,
                   running: dict[str, bool]) -> dict[str, int]:
    """A running service keeps its port; otherwise the requested port (which must be free), else
    the one in stack.json, else the default, moving up to the next free one when taken."""
    ports: dict[str, int] = {}
    wanted = [name for name in DEFAULT_PORTS if not (name == "s3" and settings.s3_endpoint)]
    for name in wanted:
        if running.get(name):
            current = pg.running_port() if name == "postgres" else state.ports.get(name)
            if current is not None:
                ports[name] = current
                continue
        if (requested := settings.ports.get(name)) is not None:
            if not port_free(settings.host, requested):
                raise StackError(f"port {requested} for {name} is taken on {settings.host}")
            ports[name] = requested
            continue
        ports[name] = pick_port(settings.host, state.ports.get(name, DEFAULT_PORTS[name]), set(ports.values()))
    return ports


def up(settings: StackSettings, say: Say = _stderr) -> dict[str, Any]:
    bindir = find_bindir()  # first: the one-line "install postgresql" error before anything is made
    layout = settings.layout()
    layout.create()
    state = StackState.load(layout)
    secrets = Secrets.ensure(layout)
    detached = svc.services(layout)
    pg = Postgres(layout, state.ports.get("postgres", DEFAULT_PORTS["postgres"]), secrets)
    running = {"postgres": pg.pid() is not None} | {n: s.pid() is not None for n, s in detached.items()}
    state.ports = _resolve_ports(settings, state, pg, running)
    state.s3_endpoint, state.bucket = settings.s3_endpoint, settings.bucket
    state.pool, state.worker_name = settings.pool, settings.worker_name
    state.save(layout)
    host, ports, timeout = settings.host, state.ports, settings.start_timeout_s
    actions: dict[str, str] = {}

    def report(name: str, action: str) -> None:
        actions[name] = action
        port = ports.get(name)
        say(f"  {name:<15} {action}" + (f" on {host}:{port}" if port else ""))
        if running.get(name) and settings.ports.get(name) not in (None, port):
            say(f"  {'':<15} (not moved to port {settings.ports[name]}: `kgrec stack down` first)")

    say(f"kgrec stack up in {layout.root}")
    # 1. Postgres
    pg.port = ports["postgres"]
    if running["postgres"]:
        report("postgres", "already running")
    else:
        pg.init(bindir)
        pg.start(bindir, timeout)
        report("postgres", "started")
    try:
        pg.ensure_databases()
    except psycopg.OperationalError as exc:
        raise StackError(
            f"cannot log in to the stack's Postgres on port {pg.port} ({str(exc).strip().splitlines()[-1]}): "
            f"{layout.secrets_file} does not match the cluster in {layout.pg_data}? Remove {layout.root} "
            "to start afresh"
        ) from None

    # 2. S3: moto, or an external endpoint
    external = settings.s3_endpoint is not None
    s3_endpoint = settings.s3_endpoint or f"http://{host}:{ports['s3']}"
    if external:
        report("s3", f"external {s3_endpoint}")
        svc.ensure_bucket(svc.s3_client(s3_endpoint, external=True), settings.bucket)
    elif running["s3"]:
        report("s3", "already running")
    else:
        pid = svc.start_moto(detached["s3"], host, ports["s3"])
        client = svc.s3_client(s3_endpoint, external=False)
        wait_until(lambda: "Buckets" in client.list_buckets(), "moto S3 server", timeout, pid,
                   detached["s3"].log_file)
        svc.ensure_bucket(client, settings.bucket)
        restored = svc.restore_snapshot(client, settings.bucket, layout.s3_snapshot)
        report("s3", "started" + (f", {restored} objects restored from {layout.s3_snapshot}" if restored else ""))

    # 3. MLflow tracking server on Postgres, artefacts proxied to the bucket
    tracking_uri = f"http://{host}:{ports['mlflow']}"
    if running["mlflow"]:
        report("mlflow", "already running")
    else:
        pid = svc.start_mlflow(detached["mlflow"], host, ports["mlflow"], pg.url("mlflow", "psycopg"),
                               settings.bucket, s3_endpoint, external)
        wait_until(lambda: http_ok(f"{tracking_uri}/health"), "MLflow server", timeout, pid,
                   detached["mlflow"].log_file)
        report("mlflow", "started")

    # 4. Prefect server on Postgres, then the work pool and its worker
    api_url = f"http://{host}:{ports['prefect-server']}/api"
    if running["prefect-server"]:
        report("prefect-server", "already running")
    else:
        pid = svc.start_prefect_server(detached["prefect-server"], layout, host, ports["prefect-server"],
                                       pg.url("prefect", "asyncpg"))
        wait_until(lambda: http_ok(f"{api_url}/health"), "Prefect server", timeout, pid,
                   detached["prefect-server"].log_file)
        report("prefect-server", "started")
    if svc.ensure_work_pool(api_url, settings.pool):
        say(f"  work pool       {settings.pool} created (process)")
    if running["prefect-worker"]:
        report("prefect-worker", "already running")
    else:
        pid = svc.start_worker(detached["prefect-worker"], layout, api_url, settings.pool,
                               settings.worker_name, tracking_uri)
        wait_until(lambda: svc.worker_online(api_url, settings.pool, settings.worker_name),
                   "Prefect worker", timeout, pid, detached["prefect-worker"].log_file, interval=1.0)
        report("prefect-worker", f"started, polling {settings.pool}")

    write_env_file(layout, {"KGREC_TRACKING_URI": tracking_uri, "MLFLOW_TRACKING_URI": tracking_uri,
                            "PREFECT_API_URL": api_url})
    result = status(settings, say=lambda _: None)
    result["actions"] = actions
    say(f"  tracking {tracking_uri}   prefect {api_url}   artefacts s3://{settings.bucket} at {s3_endpoint}")
    say(f"  point a shell at it: set -a; . {layout.env_file}; set +a")
    return result


def down(settings: StackSettings, say: Say = _stderr) -> dict[str, Any]:
    layout = settings.layout()
    state = StackState.load(layout)
    detached = svc.services(layout)
    stopped: dict[str, list[int]] = {}
    say(f"kgrec stack down in {layout.root}")
    for name in reversed(SERVICES):
        if name == "postgres":
            pg = _postgres(layout, state)
            if (pg_pid := pg.pid()) is None:
                stopped[name] = []
            else:
                try:
                    bindir = find_bindir()
                except StackError:  # binaries removed under a running server: signals still work
                    bindir = None
                stopped[name] = (pg.stop(bindir, settings.stop_timeout_s) if bindir
                                 else stop_tree(pg_pid, settings.stop_timeout_s))
            layout.pid_file(name).unlink(missing_ok=True)
        else:
            service = detached[name]
            if name == "s3" and service.pid() is not None:
                endpoint = f"http://{settings.host}:{state.ports['s3']}"
                try:
                    n = svc.save_snapshot(svc.s3_client(endpoint, external=False), state.bucket, layout.s3_snapshot)
                    say(f"  s3              saved {n} objects to {layout.s3_snapshot}")
                except Exception as exc:  # noqa: BLE001 - stopping must go on; the old snapshot stays
                    say(f"  s3              could not save the bucket ({exc}); keeping the previous snapshot")
            stopped[name] = service.stop(settings.stop_timeout_s)
        say(f"  {name:<15} " + (f"stopped (pids {', '.join(map(str, stopped[name]))})"
                                if stopped[name] else "not running"))
    result = status(settings, say=lambda _: None)
    result["stopped"] = stopped
    return result


def status(settings: StackSettings, say: Say = _stderr) -> dict[str, Any]:
    layout = settings.layout()
    state = StackState.load(layout)
    detached = svc.services(layout)
    ports = state.ports
    host = settings.host
    external = state.s3_endpoint is not None
    entries: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        if name == "postgres":
            pid = _postgres(layout, state).pid()
        else:
            pid = detached[name].pid()
        entry: dict[str, Any] = {"pid": pid, "port": ports.get(name), "alive": pid is not None,
                                 "log": str(layout.log_file(name)), "pid_file": str(layout.pid_file(name))}
        if name == "s3" and external:
            entry |= {"external": True, "alive": True, "port": None}
        entries[name] = entry
    entries["postgres"]["databases"] = ["mlflow", "prefect"]
    entries["mlflow"]["url"] = f"http://{host}:{ports['mlflow']}" if "mlflow" in ports else None
    entries["prefect-server"]["url"] = (f"http://{host}:{ports['prefect-server']}/api"
                                        if "prefect-server" in ports else None)
    entries["prefect-worker"] |= {"pool": state.pool, "name": state.worker_name}
    s3_endpoint = state.s3_endpoint or (f"http://{host}:{ports['s3']}" if "s3" in ports else None)
    result = {
        "stack_dir": str(layout.root),
        "running": all(e["alive"] for e in entries.values()),
        "tracking_uri": entries["mlflow"]["url"],
        "prefect_api_url": entries["prefect-server"]["url"],
        "s3_endpoint": s3_endpoint,
        "artifacts_destination": f"s3://{state.bucket}",
        "s3_persistence": ("external object store" if external
                           else MOTO_NOTE.format(snapshot=layout.s3_snapshot)),
        "env_file": str(layout.env_file),
        "services": entries,
    }
    say(f"kgrec stack in {layout.root}: " + ("running" if result["running"] else "not (fully) running"))
    say(f"  {'service':<15} {'pid':>8} {'port':>6}  state")
    for name, e in entries.items():
        state_word = "external" if e.get("external") else ("alive" if e["alive"] else "dead")
        say(f"  {name:<15} {e['pid'] or '-':>8} {e['port'] or '-':>6}  {state_word}")
    if result["tracking_uri"]:
        say(f"  tracking {result['tracking_uri']}   prefect {result['prefect_api_url']}   s3 {s3_endpoint}")
    if not external:
        say(f"  note: {result['s3_persistence']}")
    return result
