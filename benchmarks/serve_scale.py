"""Serving throughput and tail latency against concurrency: ``kgrec serve`` over a large catalogue, wrk on loopback.

1. Unless ``--workdir`` already holds it (``serve_scale.json`` with the same sizes), builds a synthetic
   retrieval bundle of ``--items`` items and ``--users`` users (``--dim``-d float32 embeddings drawn
   around ``items / 1000`` cluster centres; every user has seen ``--seen`` random items of its own
   cluster, so the seen-item filter has work to do) and registers it through the real registry, in
   that working directory's embedded MLflow store (SQLite + local artefacts): the bundle logged as the
   pyfunc model (no input example: validating it would build a second index), a version created
   (``kgrec.serving``'s ``create_version``), its faiss index published (``publish_index``: the
   default config, HNSW above 50k items, recall@100 measured and efSearch raised to 0.95), then
   marked ready and given the ``champion`` alias.
2. For each ``--workers`` value: ``kgrec serve --workers N --threads 1 --no-ranker --poll-interval 0``
   as a child process on a free loopback port (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
   ``OPENBLAS_NUM_THREADS`` = 1 in its environment; the JSON access log on, as deployed, unless
   ``--no-access-log``), warmed up, then ``wrk`` (Debian's, ``apt-get install -y wrk``; one wrk
   thread) with ``benchmarks/serve_scale.lua`` for ``--duration`` seconds per run:

   * closed loop at each of ``--connections`` (default 1, 4, 16, 64 keep-alive connections);
   * the fixed-rate run: ``--rate`` requests/s (default 500) over ``--rate-connections`` connections,
     paced by the script's ``delay()`` (open loop while a connection is free; ``late_slots`` counts
     the slots that found none).

   The request mix: ``GET /v1/users/{id}/candidates?k=K`` over every user, shuffled (seed 0), and one
   ``POST /v1/candidates`` (5-20 items of one cluster) in ``--post-every`` (0: none, the default).
   Per run: wrk's p50/p90/p99/max, throughput, errors (socket errors and non-2xx answers), the
   server's CPU seconds (psutil: the supervisor and its workers; per process too, which shows how the
   kernel spread the keep-alive connections over the workers; the system-time share) against wrk's
   own (its rusage from ``wait4``): the client's share of the CPU the run used, and the server's CPU
   per answered request (the capacity: cores / that, whatever else the machine runs). Per server:
   ``uptime``'s load average before it starts, the threads of each of its processes, whether uvloop
   and httptools are loaded in them (``/proc/PID/maps``).
3. ``--micro``: before the load runs, the in-process CPU time (``time.thread_time``: the machine may
   be shared) of one request's parts on the same registered version (the loader ``kgrec serve``
   uses): faiss search, seen-item filter (and ``np.isin``'s, the one it replaced), id mapping, and the
   JSON body (orjson, as served, against pydantic validation + dump of the declared type).

Prints a table per worker count and one JSON object (last line).

    apt-get install -y wrk
    .venv/bin/python benchmarks/serve_scale.py [--items 1000000] [--users 20000] [--workers 1,2]
        [--connections 1,4,16,64] [--duration 8] [--rate 500] [--workdir DIR] [--micro]
    .venv/bin/python benchmarks/serve_scale.py --items 50000 --users 5000 --duration 3   # quick
    .venv/bin/python benchmarks/serve_scale.py --workdir DIR --prepare     # only build + register
    .venv/bin/python benchmarks/serve_scale.py --workdir DIR --micro --workers ""  # in-process only

Building the 1M-item HNSW index takes ~6 min on 2 busy cores: keep ``--workdir`` between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

HERE = Path(__file__).resolve().parent
LUA = HERE / "serve_scale.lua"
MARKER = "serve_scale.json"
MODEL_NAME = "kgrec-serve-scale"
PINNED_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def machine() -> str:
    import psutil

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
           f"{psutil.virtual_memory().total / 2**30:.0f} GiB"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------- the registered bundle
def synthetic_bundle(n_items: int, n_users: int, dim: int, seen_per_user: int, seed: int):
    """Users and items around shared cluster centres (so an ANN index has structure to find); each
    user has seen ``seen_per_user`` random items of its own cluster (near its top-k)."""
    import polars as pl
    import scipy.sparse as sp
    from kgrec.serving.bundle import RetrievalBundle

    rng = np.random.default_rng(seed)
    n_clusters = max(8, n_items // 1000)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32) * 1.5
    ic = np.arange(n_items) % n_clusters
    items = centres[ic]
    items += rng.standard_normal((n_items, dim), dtype=np.float32)
    uc = rng.integers(0, n_clusters, n_users)
    users = centres[uc] + rng.standard_normal((n_users, dim), dtype=np.float32)
    per_cluster = n_items // n_clusters
    picks = rng.integers(0, per_cluster, (n_users, seen_per_user))
    cols = (uc[:, None] + n_clusters * picks).ravel()
    rows = np.repeat(np.arange(n_users), seen_per_user)
    seen = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(n_users, n_items))
    seen.sum_duplicates()
    seen.data[:] = 1.0
    users_df = pl.DataFrame({"user_id": [f"u{i}" for i in range(n_users)],
                             "user_idx": np.arange(n_users, dtype=np.int32)})
    items_df = pl.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                             "item_idx": np.arange(n_items, dtype=np.int32),
                             "name": [f"item {i}" for i in range(n_items)]})
    meta = {"model": "bprmf", "dataset": f"synthetic-{n_items}", "snapshot_hash": f"serve-scale-{seed}"}
    return RetrievalBundle(users.astype(np.float32), items.astype(np.float32), seen, users_df, items_df, meta)


def register(workdir: Path, args: argparse.Namespace) -> dict:
    """Build the bundle and register it as ``MODEL_NAME@champion`` with a published index."""
    import mlflow
    from kgrec.models.tracking import registry
    from kgrec.models.tracking.registry import (
        BUNDLE_KIND_TAG,
        CHAMPION,
        READY,
        SELECTION_METRIC,
        SELECTION_METRIC_TAG,
        STATE_TAG,
        create_version,
    )
    from kgrec.models.tracking.settings import TrackingSettings
    from kgrec.serving.publish import publish_index
    from kgrec.serving.pyfunc import log_bundle_model
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    bundle = synthetic_bundle(args.items, args.users, args.dim, args.seen, args.seed)
    bundle_dir = bundle.write(workdir / "bundles" / "serve-scale")
    del bundle
    generated = time.perf_counter() - t0
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    registry.configure_tracking(TrackingSettings(workdir=workdir, tracking_uri=None))
    t1 = time.perf_counter()
    with mlflow.start_run(run_name="serve-scale") as run:
        mlflow.log_params({"items": args.items, "users": args.users, "dim": args.dim, "seen": args.seen})
        info = log_bundle_model(bundle_dir, "bprmf", example=False)
    version = create_version(run.info.run_id, info, MODEL_NAME,
                             {"kgrec.model": "bprmf", BUNDLE_KIND_TAG: "embedding",
                              SELECTION_METRIC_TAG: SELECTION_METRIC})
    logged = time.perf_counter() - t1
    t2 = time.perf_counter()
    index_info = publish_index(version, bundle_dir)
    published = time.perf_counter() - t2
    client = MlflowClient()
    client.set_model_version_tag(MODEL_NAME, version.version, STATE_TAG, READY)
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, version.version)
    shutil.rmtree(workdir / "bundles", ignore_errors=True)  # the registry holds its own copy
    return {"version": str(version.version), "generate_s": round(generated, 1), "log_s": round(logged, 1),
            "index_s": round(published, 1),
            "index": {k: index_info.get(k) for k in ("kind", "ann_recall", "ef_search", "nprobe", "build_seconds")}}


def ensure_registered(workdir: Path, args: argparse.Namespace) -> dict:
    wanted = {"items": args.items, "users": args.users, "dim": args.dim, "seen": args.seen, "seed": args.seed}
    marker = workdir / MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if found.get("sizes") == wanted:
            return found | {"reused": True}
        raise SystemExit(f"{workdir} holds a serve_scale registry of other sizes {found.get('sizes')}: "
                         "use another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    found = {"sizes": wanted, "registered": register(workdir, args)}
    marker.write_text(json.dumps(found))
    return found | {"reused": False}


def request_mix(args: argparse.Namespace, path: Path) -> dict:
    rng = np.random.default_rng(0)
    order = rng.permutation(args.users)
    n_clusters = max(8, args.items // 1000)
    lines, posts = [], 0
    for i, u in enumerate(order.tolist()):
        if args.post_every and i % args.post_every == args.post_every - 1:
            # items of the user's cluster (the bundle's seen items are drawn from it)
            c = int(rng.integers(0, n_clusters))
            picked = [f"i{c + n_clusters * int(j)}" for j in rng.integers(0, args.items // n_clusters,
                                                                           int(rng.integers(5, 21)))]
            body = json.dumps({"item_ids": picked, "k": args.k}, separators=(",", ":"))
            lines.append(f"POST\t/v1/candidates\t{body}")
            posts += 1
        else:
            lines.append(f"GET\t/v1/users/u{u}/candidates?k={args.k}\t")
    path.write_text("\n".join(lines) + "\n")
    return {"requests_in_mix": len(lines), "posts": posts}


# ---------------------------------------------------------------------------- in-process parts
def micro(workdir: Path, n: int = 2000) -> dict:
    """Per-request microseconds of the parts of one ``GET /v1/users/{id}/candidates?k=100``."""
    import faiss
    import orjson
    from kgrec.models.tracking.settings import TrackingSettings
    from kgrec.serving import service as svc
    from kgrec.serving.cache import ServeCache
    from kgrec.serving.champion import RegisteredModel
    from pydantic import TypeAdapter

    faiss.omp_set_num_threads(1)
    tracking = TrackingSettings(workdir=workdir, tracking_uri=None)
    loader = RegisteredModel(tracking, MODEL_NAME, cache=ServeCache(workdir / "serve-cache"))
    retriever, info = loader()
    summary = {"name": info["name"], "version": info["version"]}
    users = retriever._user_ids
    rng = np.random.default_rng(1)
    picks = [users[i] for i in rng.integers(0, len(users), n)]
    k = 100

    def per_call(fn) -> float:  # CPU time of this thread: the machine is shared, wall time is not ours
        for u in picks[:200]:
            fn(u)
        t0 = time.thread_time()
        for u in picks:
            fn(u)
        return round((time.thread_time() - t0) / len(picks) * 1e6, 1)

    def search(u):
        row = retriever._user_index[u]
        seen = retriever._seen_indices[retriever._seen_indptr[row]: retriever._seen_indptr[row + 1]]
        return retriever.index.search(retriever._user_emb[row: row + 1], k + seen.shape[0]), seen

    cached = {u: search(u) for u in picks}

    def filt(u):
        (D, I), seen = cached[u]
        return retriever._filter(I[0], D[0], seen, k)

    def isin(u):
        (D, I), seen = cached[u]
        valid = (I[0] >= 0) & ~np.isin(I[0], seen)
        return I[0][valid][:k], D[0][valid][:k]

    filtered = {u: filt(u) for u in picks}
    results = {u: retriever.for_user(u, k) for u in picks}

    def body(u):
        r = results[u]
        return {"user_id": u, "k": k, "model": summary, **r.response_fields(), "candidates": r.records(),
                "took_ms": 0.123}

    bodies = {u: body(u) for u in picks}
    adapter = TypeAdapter(svc.UserCandidates)
    out = {
        "faiss_search_us": per_call(search),
        "filter_us": per_call(filt),
        "np_isin_filter_us": per_call(isin),
        "id_mapping_us": per_call(lambda u: retriever._result(*filtered[u], user_id=u)),
        "for_user_us": per_call(lambda u: retriever.for_user(u, k)),
        "records_us": per_call(lambda u: results[u].records()),
        "orjson_body_us": per_call(lambda u: svc.candidates_json(bodies[u])),
        "pydantic_validate_dump_us": per_call(lambda u: adapter.dump_json(adapter.validate_python(bodies[u]))),
        "orjson_equals_pydantic": all(
            orjson.loads(svc.candidates_json(bodies[u])) == orjson.loads(adapter.dump_json(
                adapter.validate_python(bodies[u]))) for u in picks[:200]),
        "index_kind": retriever.index_kind,
    }
    retriever.index.reset()
    return out


# ---------------------------------------------------------------------------- load runs
def cpu_times(procs) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each process."""
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user, t.system)
        except Exception:  # noqa: BLE001 - a process gone meanwhile counts nothing
            pass
    return out


def server_tree(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def threads_of(procs) -> dict[str, int]:
    out = {}
    for p in procs:
        try:
            out[f"{p.pid} {' '.join(p.cmdline()[1:3])[-40:]}"] = p.num_threads()
        except Exception:  # noqa: BLE001
            pass
    return out


def native_modules(procs) -> dict[str, bool]:
    """Whether the server's processes run uvloop and httptools (their shared objects are mapped)."""
    found = {"uvloop": False, "httptools": False}
    for p in procs:
        try:
            maps = Path(f"/proc/{p.pid}/maps").read_text()
        except OSError:
            continue
        found["uvloop"] |= "/uvloop/" in maps
        found["httptools"] |= "/httptools/" in maps
    return found


def run_wrk(wrk: str, base_url: str, requests_file: Path, connections: int, duration: float,
            rate: float, server_pid: int) -> dict:
    procs = server_tree(server_pid)
    before = cpu_times(procs)
    cmd = [wrk, "-t", "1", "-c", str(connections), "-d", f"{duration:g}s", "--timeout", "5s",
           "-s", str(LUA), base_url, "--", str(requests_file), "1"]
    env = os.environ | {"SERVE_SCALE_RATE": str(rate)}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 gives wrk's rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    after = cpu_times(procs)
    reader.join(timeout=5)
    from soak import wrk_result  # noqa: E402  (sibling script; its KGREC-WRK-JSON line, as serve_scale.lua prints)

    r = wrk_result("".join(out), proc.returncode)
    wrk_cpu = usage.ru_utime + usage.ru_stime
    user = {pid: after.get(pid, u)[0] - u for pid, (u, _) in before.items()}
    system = {pid: after.get(pid, (0.0, s))[1] - s for pid, (_, s) in before.items()}
    per_pid = {pid: round(user[pid] + system[pid], 2) for pid in before}
    server_cpu = sum(user.values()) + sum(system.values())
    errors = r["errors"]
    return {
        "connections": connections,
        "rate_target": rate or None,
        "requests": r["requests"],
        "throughput": round(r["requests"] / r["duration_s"], 1),
        "latency_ms": {k: round(v, 3) for k, v in r["latency_ms"].items()},
        "non2xx": errors["status"],
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "errors": errors,
        "late_slots": r["late_slots"],
        "cpu_s": {"wrk": round(wrk_cpu, 2), "server": round(server_cpu, 2), "wall": round(wall, 2),
                  "client_share": round(wrk_cpu / (wrk_cpu + server_cpu), 3) if wrk_cpu + server_cpu else None,
                  "server_system_share": round(sum(system.values()) / server_cpu, 3) if server_cpu else None,
                  "per_process": list(per_pid.values())},
        "server_cpu_ms_per_request": round(server_cpu / max(1, r["requests"]) * 1e3, 3),
    }


def serve_and_load(workdir: Path, workers: int, args: argparse.Namespace, wrk: str, requests_file: Path,
                   log_dir: Path) -> dict:
    import httpx
    from kgrec.serving.process import service_process, workdir_env

    env = workdir_env(workdir) | PINNED_THREADS
    env.pop("KGREC_SERVE_TOKEN", None)
    extra = ["--workers", str(workers), "--threads", "1", "--no-ranker", "--poll-interval", "0",
             "--cache-dir", str(workdir / "serve-cache")]
    extra += ["--no-access-log"] if args.no_access_log else []
    load = load_average()
    started = time.perf_counter()
    log_path = log_dir / f"serve-w{workers}.log"
    with service_process(MODEL_NAME, env, extra_args=extra, ready_timeout=900, log_path=log_path) as (url, server):
        ready_s = time.perf_counter() - started
        with httpx.Client(base_url=url, timeout=30) as client:
            if workers > 1:  # every worker has its model: /readyz answered by one of them only
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline:
                    text = client.get("/metrics").text
                    ready = sum(float(line.split()[-1]) for line in text.splitlines()
                                if line.startswith("kgrec_model_ready"))
                    if ready >= workers:
                        break
                    time.sleep(1)
            model = client.get("/v1/model").json()
            probe = client.get(f"/v1/users/u0/candidates?k={args.k}")
            if probe.status_code != 200 or len(probe.json()["candidates"]) != args.k:
                raise SystemExit(f"bad answer: {probe.status_code} {probe.text[:300]}")
        procs = server_tree(server.pid)
        threads = threads_of(procs)
        native = native_modules(procs)
        # warm-up: every worker's first requests (page faults into the index, allocator growth)
        run_wrk(wrk, url, requests_file, max(4, 2 * workers), args.warmup, 0, server.pid)
        runs = []
        for c in args.connections:
            runs.append(run_wrk(wrk, url, requests_file, c, args.duration, 0, server.pid))
            print_run(workers, runs[-1], flush=True)
        if args.rate:
            runs.append(run_wrk(wrk, url, requests_file, args.rate_connections, args.duration, args.rate,
                                server.pid))
            print_run(workers, runs[-1], flush=True)
    return {"workers": workers, "load_average_before": load, "ready_s": round(ready_s, 1),
            "index": model.get("index"), "index_kind": model.get("index_kind"), "n_items": model.get("n_items"),
            "threads_per_process": threads, "uvloop_httptools_loaded": native, "runs": runs}


def print_run(workers: int, r: dict, flush: bool = False) -> None:
    lat = r["latency_ms"]
    kind = f"{r['rate_target']:g}/s over {r['connections']}" if r["rate_target"] else f"closed {r['connections']}"
    print(f"| {workers} | {kind} | {r['throughput']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
          f"{lat['max']:.1f} | {r['non2xx']} / {r['socket_errors']} | {r['server_cpu_ms_per_request']:.2f} | "
          f"{r['cpu_s']['client_share'] * 100:.1f} % | {r['late_slots'] if r['rate_target'] else ''} | "
          f"{' / '.join(f'{c:.1f}' for c in r['cpu_s']['per_process'] if c >= 0.05)} |", flush=flush)


HEADER = ("| workers | load | req/s | p50 ms | p90 ms | p99 ms | max ms | non-2xx / socket err | "
          "server CPU ms/req | wrk CPU share | late slots | server CPU s per process |\n"
          "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seen", type=int, default=50, help="seen items per user (excluded from answers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--connections", default="1,4,16,64", help="closed-loop runs (comma-separated)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per server")
    parser.add_argument("--rate", type=float, default=500.0, help="fixed-rate run, requests/s (0: none)")
    parser.add_argument("--rate-connections", type=int, default=16)
    parser.add_argument("--post-every", type=int, default=0, help="one POST /v1/candidates in N (0: none)")
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--micro", action="store_true", help="in-process cost of a request's parts first")
    parser.add_argument("--workdir", type=Path, help="keeps the registry between runs (default: temporary)")
    parser.add_argument("--prepare", action="store_true", help="only build and register (into --workdir)")
    args = parser.parse_args()
    args.connections = [int(c) for c in args.connections.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]  # "": no server (--micro alone)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed: apt-get install -y wrk (Debian/Ubuntu package 'wrk')", file=sys.stderr)
        raise SystemExit(2)
    version = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    figures: dict = {"machine": machine(), "wrk": (version.stdout or version.stderr).splitlines()[0].split(" Copyright")[0],
                     "pinned_threads": PINNED_THREADS | {"kgrec serve --threads": 1}, "wrk_threads": 1,
                     "k": args.k, "duration_s": args.duration, "access_log": not args.no_access_log}
    with tempfile.TemporaryDirectory(prefix="kgrec-serve-scale-") as tmp:
        workdir = (args.workdir or Path(tmp) / "work").resolve()
        t0 = time.perf_counter()
        figures["registry"] = ensure_registered(workdir, args)
        figures["registry"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"registry: {json.dumps(figures['registry'])}", flush=True)
        if args.prepare:
            return
        requests_file = Path(tmp) / "requests.tsv"
        figures["mix"] = request_mix(args, requests_file)
        if args.micro:
            figures["micro"] = micro(workdir)
            print(f"in-process us per request: {json.dumps(figures['micro'])}", flush=True)
        figures["servers"] = []
        print(HEADER, flush=True)
        for workers in worker_counts:
            figures["servers"].append(serve_and_load(workdir, workers, args, wrk, requests_file, Path(tmp)))
    print(f"\nmachine: {figures['machine']}; {figures['wrk']}, 1 thread; items {args.items:,}, k {args.k}; "
          f"threads pinned: {PINNED_THREADS}, --threads 1; access log {'on' if not args.no_access_log else 'off'}")
    print(HEADER)
    for s in figures["servers"]:
        for r in s["runs"]:
            print_run(s["workers"], r)
        print(f"  workers={s['workers']}: load average before {s['load_average_before']}; ready in {s['ready_s']} s; "
              f"index {s['index']}; threads per process {s['threads_per_process']}; "
              f"loaded: {s['uvloop_httptools_loaded']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
