"""Soak: a fixed-rate wrk load run against the live service on loopback, with a reload in the middle.

1. Unless ``--workdir`` already holds a registry (``mlflow.db``), registers ``kgrec-<dataset>`` in a
   fresh working directory: ``kgrec pipeline --dataset DATASET --models bprmf,lightgcn --epochs 3``
   (two versions, one of them ``champion``).
2. ``kgrec serve`` as a child process on a free loopback port, one worker, ``--poll-interval 0`` (only
   the admin reload below moves it), a random bearer token; its JSON access log stays on (the default,
   part of what is measured) and goes to ``OUT/serve.log``.
3. ``wrk`` (Debian's package; ``apt-get install -y wrk``) with ``benchmarks/soak.lua`` for
   ``--duration`` seconds at ``--rate`` requests/s over ``--connections`` keep-alive connections: a
   mix of ``GET /v1/users/{id}/candidates?k=100`` over every known user of the snapshot (shuffled,
   seed 0) and, one request in ``--post-every``, ``POST /v1/candidates`` with 5-20 of that user's
   items. The Lua script paces the requests (``delay()``), counts non-2xx answers and the answers of
   each model version, and prints wrk's latency percentiles (latency is measured by wrk from the
   request's write to the end of its answer; a slot missed because an answer was late is not
   re-sent, so this is not corrected for coordinated omission).
4. At ``--reload-at`` seconds (default: the middle) the ``champion`` alias is moved to the other
   registered version (MlflowClient on the work dir's registry) and ``POST /admin/reload`` is called
   with the token: its answer and wall time are recorded. The alias is moved back at the end (the
   work dir is left as found; ``--keep-alias`` not to).
5. Every ``--sample-every`` seconds: the server's RSS (psutil, the process and its children). CPU:
   the server's CPU seconds during the run (psutil) against wrk's own (its rusage from ``wait4``):
   the client's share of the CPU the run used.

Prints a short table and one JSON object (last line).

    apt-get install -y wrk
    .venv/bin/python benchmarks/soak.py [--duration 600] [--rate 200] [--connections 4] [--threads 1]
        [--reload-at SECONDS] [--workdir DIR] [--model-name NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import psutil
from kgrec.serving.process import run_pipeline_cli, service_process, workdir_env

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
LUA = HERE / "soak.lua"
WRK_MARK = "KGREC-WRK-JSON "


def wrk_result(text: str, returncode: int) -> dict:
    """The JSON line a wrk Lua script's done() printed after ``WRK_MARK`` (the last one), or exit
    with wrk's output when it failed or printed none."""
    lines = [line for line in text.splitlines() if line.startswith(WRK_MARK)]
    if returncode != 0 or not lines:
        raise SystemExit(f"wrk failed ({returncode}):\n{text[-3000:]}")
    return json.loads(lines[-1][len(WRK_MARK):])


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")


def wrk_version(wrk: str) -> str:
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).splitlines()[0].split(" Copyright")[0].strip()


def register(workdir: Path, dataset: str, name: str, epochs: int, ranker: str | None = None) -> dict:
    """``kgrec pipeline --models bprmf,lightgcn`` (two versions of NAME; ``ranker``: NAME-ranker too)."""

    args = ["--dataset", dataset, "--models", "bprmf,lightgcn", "--epochs", str(epochs), "--registered-model", name]
    args += ["--ranker", ranker] if ranker else []
    result, seconds = run_pipeline_cli(args, workdir_env(workdir))
    return {"pipeline_seconds": round(seconds, 1), "champion_version": result.get("champion_version")}


def request_mix(workdir: Path, dataset: str, post_every: int, path: Path) -> dict:
    """Write wrk's request file (soak.lua's format): every known user once, shuffled (seed 0)."""
    snapshot = sorted((workdir / "snapshots").glob(f"{dataset}-*"))[-1]
    users = pl.read_parquet(snapshot / "users.parquet").select("user_id", "user_idx")
    items = pl.read_parquet(snapshot / "items.parquet").select("item_id", "item_idx")
    history = (pl.read_parquet(snapshot / "interactions.parquet").select("user_idx", "item_idx")
               .join(items, on="item_idx").join(users, on="user_idx")
               .group_by("user_id").agg(pl.col("item_id")))
    by_user = dict(zip(history["user_id"].to_list(), history["item_id"].to_list(), strict=True))
    user_ids = users["user_id"].to_list()
    rng = np.random.default_rng(0)
    lines, posts = [], 0
    for i, j in enumerate(rng.permutation(len(user_ids))):
        user = user_ids[j]
        seen = by_user.get(user) or []
        if post_every and i % post_every == post_every - 1 and seen:
            picked = [seen[t] for t in rng.permutation(len(seen))[: int(rng.integers(5, 21))]]
            lines.append(f"POST\t/v1/candidates\t{json.dumps({'item_ids': picked, 'k': 100}, separators=(',', ':'))}")
            posts += 1
        else:
            lines.append(f"GET\t/v1/users/{user}/candidates?k=100\t")
    path.write_text("\n".join(lines) + "\n")
    return {"requests_in_mix": len(lines), "users": len(user_ids), "posts": posts}


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mib(proc: psutil.Process) -> float:
    total = 0
    for p in tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in tree(proc):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


@contextlib.contextmanager
def serving(name: str, env: dict, log_path: Path, extra_args: tuple[str, ...] = ()):
    """``kgrec serve`` on a free loopback port with its output kept in ``log_path``; yields
    ``(base_url, process)`` (the process for psutil)."""
    with service_process(name, env, extra_args=extra_args, ready_timeout=180, log_path=log_path) as running:
        yield running


def other_version(client, name: str, current: str) -> str:
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
    others = [v for v in versions if v != str(current)]
    if not others:
        raise SystemExit(f"{name} has only version {current}: a reload needs a second registered version")
    return others[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=600, help="seconds of load (default 600)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s in all (default 200)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: 2 of them on 2 cores "
                        "take CPU from the server)")
    parser.add_argument("--reload-at", type=float, help="seconds into the run (default: the middle; <0: no reload)")
    parser.add_argument("--post-every", type=int, default=5, help="one POST /v1/candidates in N requests (0: none)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--dataset", default="music")
    parser.add_argument("--epochs", type=int, default=3, help="epoch cap of the pipeline run")
    parser.add_argument("--workdir", type=Path, help="KGREC_HOME holding the registry (trained there when it has none)")
    parser.add_argument("--model-name", help="default: kgrec-<dataset>")
    parser.add_argument("--keep-alias", action="store_true", help="leave the champion alias where the reload put it")
    parser.add_argument("--out", type=Path, help="where serve.log, requests.tsv and soak.json go "
                        "(default: a temporary directory, removed)")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed: apt-get install -y wrk (Debian/Ubuntu package 'wrk')", file=sys.stderr)
        raise SystemExit(2)
    name = args.model_name or f"kgrec-{args.dataset}"
    reload_at = args.duration / 2 if args.reload_at is None else args.reload_at

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "work").resolve()
        out = (args.out or Path(tmp) / "out").resolve()
        out.mkdir(parents=True, exist_ok=True)
        figures: dict = {"machine": machine(), "wrk": wrk_version(wrk), "rate_target": args.rate,
                         "connections": args.connections, "wrk_threads": args.threads,
                         "duration_target_s": args.duration}
        if not (workdir / "mlflow.db").exists():
            figures["pipeline"] = register(workdir, args.dataset, name, args.epochs)
            print(f"registered {name} in {workdir}: {figures['pipeline']}", flush=True)
        requests_file = out / "requests.tsv"
        figures["mix"] = request_mix(workdir, args.dataset, args.post_every, requests_file)

        env = workdir_env(workdir) | {"KGREC_SERVE_TOKEN": secrets.token_urlsafe(24), "OMP_NUM_THREADS": "1"}
        registry = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
        log_path = out / "serve.log"
        original_alias = None
        try:
            with (serving(name, env, log_path, ("--poll-interval", "0")) as (base_url, server),
                  httpx.Client(base_url=base_url, timeout=30) as client):
                served = client.get("/v1/model").json()
                original_alias = str(served["version"])
                target = other_version(registry, name, original_alias)
                for line in requests_file.read_text().splitlines()[:200]:  # warm-up
                    method, path, body = line.split("\t")
                    client.request(method, path, content=body or None,
                                   headers={"Content-Type": "application/json"} if body else None)
                figures |= run_load(args, wrk, base_url, requests_file, server, registry, name, target,
                                    env["KGREC_SERVE_TOKEN"], reload_at, client)
                figures["model_after"] = {k: v for k, v in client.get("/v1/model").json().items()
                                          if k in ("name", "version", "model", "reload")}
            figures["served_before"] = {"version": original_alias, "model": served.get("model")}
        finally:
            if original_alias is not None and not args.keep_alias:
                registry.set_registered_model_alias(name, "champion", original_alias)
        figures["access_log_lines"] = sum(1 for _ in log_path.open())
        figures["access_log_mib"] = round(log_path.stat().st_size / 2**20, 1)
        (out / "soak.json").write_text(json.dumps(figures, indent=2))
        report(figures, out if args.out else None)


def run_load(args, wrk: str, base_url: str, requests_file: Path, server: subprocess.Popen, registry, name: str,
             target: str, token: str, reload_at: float, client: httpx.Client) -> dict:
    server_proc = psutil.Process(server.pid)
    cmd = [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{args.duration}s",
           "--timeout", "10s", "-s", str(LUA), base_url, "--", str(requests_file), str(args.rate),
           str(args.threads), str(args.connections)]
    samples: list[tuple[float, float]] = []
    reload: dict = {}
    server_cpu0 = cpu_seconds(server_proc)
    started_wall = time.time()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)
    reader.start()
    next_sample = 0.0
    while True:
        # Not proc.poll(): that would reap wrk and lose its rusage, which wait4 gives (user + system CPU).
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        elapsed = time.monotonic() - started
        if elapsed >= next_sample:
            samples.append((round(elapsed, 1), round(rss_mib(server_proc), 1)))
            next_sample += args.sample_every
        if not reload and 0 <= reload_at <= elapsed:
            reload = do_reload(registry, name, target, token, client, started_wall)
            print(f"reload at {reload['at_s']:.1f} s: {reload['status']} -> v{reload['to']} in "
                  f"{reload['seconds']:.3f} s", flush=True)
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    server_cpu = cpu_seconds(server_proc) - server_cpu0
    samples.append((round(wall, 1), round(rss_mib(server_proc), 1)))
    reader.join(timeout=5)
    text = "".join(stdout)
    result = wrk_result(text, proc.returncode)
    wrk_cpu = usage.ru_utime + usage.ru_stime
    rss = [r for _, r in samples]
    result["non2xx_total"] = sum(result["non2xx"].values())
    result["socket_errors_total"] = sum(result["errors"].values()) - result["errors"].get("status", 0)
    versions = result.pop("versions")
    first, last = result.pop("version_first_ms"), result.pop("version_last_ms")
    by_version = {v: {"answers": n,
                      "first_s": round(first[v] / 1e3 - started_wall, 2) if v in first else None,
                      "last_s": round(last[v] / 1e3 - started_wall, 2) if v in last else None}
                  for v, n in sorted(versions.items())}
    # The reload's gap: from the old version's last answer to the new one's first (no answer between).
    old, new = str((reload.get("previous") or {}).get("version")), str((reload.get("model") or {}).get("version"))
    if reload.get("status") == "reloaded" and old in by_version and new in by_version:
        reload["gap_s"] = round(by_version[new]["first_s"] - by_version[old]["last_s"], 3)
    return {
        "wrk_result": result,
        "wrk_summary": [line for line in text.splitlines() if not line.startswith(WRK_MARK)][-12:],
        "versions": by_version,
        "reload": reload,
        "rss_mib": {"start": rss[0], "end": rss[-1], "max": max(rss), "samples": len(rss),
                    "every_s": args.sample_every, "series": samples},
        "cpu_s": {"wrk": round(wrk_cpu, 1), "server": round(server_cpu, 1), "wall": round(wall, 1),
                  "client_share": round(wrk_cpu / (wrk_cpu + server_cpu), 3) if wrk_cpu + server_cpu else None},
    }


def do_reload(registry, name: str, target: str, token: str, client: httpx.Client, started_wall: float) -> dict:
    at = time.time() - started_wall
    t0 = time.perf_counter()
    registry.set_registered_model_alias(name, "champion", target)
    alias_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    response = client.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})
    seconds = time.perf_counter() - t1
    answer = response.json()
    return {"at_s": round(at, 2), "to": target, "http_status": response.status_code,
            "status": answer.get("status"), "model": answer.get("model"), "previous": answer.get("previous"),
            "detail": answer.get("detail"), "server_seconds": answer.get("seconds"),
            "seconds": round(seconds, 3), "alias_move_seconds": round(alias_s, 3)}


def report(f: dict, out: Path | None) -> None:
    r = f["wrk_result"]
    lat = r["latency_ms"]
    rl = f.get("reload") or {}
    print(f"\nmachine: {f['machine']}; {f['wrk']}; {f['wrk_threads']} wrk thread(s), {f['connections']} connections, "
          f"target {f['rate_target']:g} req/s, paced: {r['paced']}")
    print("| requests | duration s | rate req/s | p50 ms | p90 ms | p99 ms | max ms | non-2xx | socket errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {r['requests']} | {r['duration_s']:.1f} | {r['rate']:.1f} | {lat['p50']:.2f} | {lat['p90']:.2f} | "
          f"{lat['p99']:.2f} | {lat['max']:.1f} | {r['non2xx_total']} {r['non2xx'] or ''} | "
          f"{r['socket_errors_total']} {r['errors']} |")
    if rl:
        print(f"reload at {rl['at_s']} s: {rl['http_status']} {rl['status']}, "
              f"{(rl.get('previous') or {}).get('version')} -> {(rl.get('model') or {}).get('version')}, "
              f"{rl['seconds']:.3f} s (server: {rl['server_seconds']}); last answer of the old version to the "
              f"first of the new: {rl.get('gap_s')} s")
    for version, v in f["versions"].items():
        print(f"  version {version}: {v['answers']} answers, from {v['first_s']} s to {v['last_s']} s")
    rss, cpu = f["rss_mib"], f["cpu_s"]
    print(f"server RSS MiB: start {rss['start']}, end {rss['end']}, max {rss['max']} ({rss['samples']} samples)")
    print(f"CPU s: wrk {cpu['wrk']}, server {cpu['server']} over {cpu['wall']} s; client share {cpu['client_share']}")
    print(f"access log: {f['access_log_lines']} lines, {f['access_log_mib']} MiB" + (f" ({out})" if out else ""))
    slim = {k: v for k, v in f.items() if k != "wrk_summary"}
    slim["rss_mib"] = {k: v for k, v in rss.items() if k != "series"}
    print(json.dumps(slim))


if __name__ == "__main__":
    main()
