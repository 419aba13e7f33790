"""Two-stage request latency: GET /v1/users/{id}/ranked (retrieve N = 200, KCAN re-rank, k = 20).

1. Unless ``--workdir`` already holds them, registers a retrieval champion and a ranking champion:
   ``kgrec pipeline --dataset DATASET --models lightgcn --ranker kcan --registered-model NAME
   [--epochs N] [--time-cap S]`` in a fresh working directory (NAME and NAME-ranker; DATASET a
   bundled spec name or a spec YAML path).
2. ``kgrec serve`` as a child process (serving/process.py) on loopback, one keep-alive client.
   Users: every known user of the snapshot, shuffled (seed 0), cycled to ``--requests``.
3. After 200 warm-up requests per endpoint: ``--requests`` sequential two-stage requests, then the
   same number of retrieval-only requests (``/candidates?k=N``: the first stage alone, the
   baseline), client-side p50/p90/p99; then the server's own per-stage figures (``/v1/latency``).

    .venv/bin/python benchmarks/two_stage_latency.py [--dataset music] [--requests 2000]
        [--n 200] [--k 20] [--workdir DIR --model-name NAME] [--epochs N] [--time-cap SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def register_champions(workdir: Path, dataset: str, name: str, epochs: int | None, time_cap: float | None) -> dict:
    from kgrec.serving.process import run_pipeline_cli, workdir_env

    args = ["--dataset", dataset, "--models", "lightgcn", "--ranker", "kcan", "--registered-model", name]
    result, seconds = run_pipeline_cli(args, workdir_env(workdir), epochs=epochs, time_cap=time_cap)
    result["pipeline_seconds"] = seconds
    return result


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"requests": int(ms.size), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def timed(client: httpx.Client, paths: list[str], params: dict, expect: int) -> list[float]:
    for path in paths[:200]:  # warm-up
        client.get(path, params=params)
    out = []
    for path in paths:
        started = time.perf_counter()
        response = client.get(path, params=params)
        out.append(time.perf_counter() - started)
        if response.status_code != 200 or len(response.json()["candidates"]) != expect:
            raise SystemExit(f"bad answer from {path}: {response.text[:300]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="music", help="bundled spec name or spec YAML path")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--n", type=int, default=200, help="candidates retrieved and re-ranked")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--workdir", type=Path,
                        help="KGREC_HOME holding NAME and NAME-ranker (trained there when it has no store)")
    parser.add_argument("--model-name", help="default: kgrec-<dataset>-two-stage")
    parser.add_argument("--epochs", type=int, help="epoch cap of the pipeline run")
    parser.add_argument("--time-cap", type=float, metavar="SECONDS", help="training seconds per model: the best "
                        "validation epoch before it is registered, and the result says 'capped'")
    args = parser.parse_args()
    from kgrec.features.spec import load_spec

    dataset_name = load_spec(args.dataset).name
    name = args.model_name or f"kgrec-{dataset_name}-two-stage"

    from quality import machine  # noqa: E402  (sibling script)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "work").resolve()
        figures: dict = {"machine": machine(), "cpus": os.cpu_count(), "n": args.n, "k": args.k}
        if not (workdir / "mlflow.db").exists():
            run = register_champions(workdir, args.dataset, name, args.epochs, args.time_cap)
            figures["pipeline_seconds"] = round(run["pipeline_seconds"], 1)
            figures["ranker"] = {k: run["ranker"][k] for k in ("retriever", "alpha", "best_epoch", "test")}
            figures["capped"] = [m["model"] for m in (*run["models"], run["ranker"])
                                 if m.get("stop_reason") == "time_budget"]
            print(f"registered {name} and {name}-ranker in {run['pipeline_seconds']:.0f} s"
                  f"{' (capped: ' + ', '.join(figures['capped']) + ')' if figures['capped'] else ''}: "
                  f"{figures['ranker']}", flush=True)
        snapshots = sorted((workdir / "snapshots").glob(f"{dataset_name}-*"))
        users = pl.read_parquet(snapshots[-1] / "users.parquet")["user_id"].to_list()
        order = np.random.default_rng(0).permutation(len(users))
        user_ids = [users[order[i % len(users)]] for i in range(args.requests)]

        from kgrec.serving.process import running_service, workdir_env

        env = workdir_env(workdir)
        figures["load_before"] = os.getloadavg()
        with running_service(name, env) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:
            ready = client.get("/readyz").json()["model"]
            figures["served"] = {"retriever": f"{ready['name']} v{ready['version']} ({ready['model']})",
                                 "ranker": f"{ready['ranker']['name']} v{ready['ranker']['version']}"}
            ranked = [f"/v1/users/{u}/ranked" for u in user_ids]
            figures["two_stage_http"] = percentiles(timed(client, ranked, {"k": args.k, "n": args.n}, args.k))
            figures["server_stages"] = client.get("/v1/latency").json()["two_stage"]
            retrieval = [f"/v1/users/{u}/candidates" for u in user_ids]
            figures["retrieval_only_http"] = percentiles(timed(client, retrieval, {"k": args.n}, args.n))
        figures["load_after"] = os.getloadavg()

    two, base, stages = figures["two_stage_http"], figures["retrieval_only_http"], figures["server_stages"]
    print(f"\nmachine: {figures['machine']}; load average before {figures['load_before']}, after "
          f"{figures['load_after']}")
    print(f"served: {figures['served']}")
    print("| request | requests | p50 ms | p90 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| GET /ranked, N={args.n}, k={args.k} (HTTP, client side) | {two['requests']} | "
          f"{two['p50_ms']:.2f} | {two['p90_ms']:.2f} | {two['p99_ms']:.2f} |")
    for stage in ("retrieval", "ranking", "total"):
        s = stages[stage]
        print(f"| server stage: {stage} | {s['n']} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} |")
    print(f"| baseline: GET /candidates?k={args.n} (retrieval only, HTTP) | {base['requests']} | "
          f"{base['p50_ms']:.2f} | {base['p90_ms']:.2f} | {base['p99_ms']:.2f} |")
    print(f"two-stage / retrieval-only p50: x{two['p50_ms'] / base['p50_ms']:.1f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
