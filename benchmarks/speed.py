"""Speed of the pipeline, the evaluator and the service, each against a target and a baseline.

1. Wall time of `kgrec pipeline --dataset music` in a fresh working directory and a fresh Prefect
   home (so the first Prefect start is included). Target: <= 180 s on 2 cores.
2. Full-ranking evaluation of every ml-100k user at K = 100 (batched tensors) against a per-user
   NumPy loop doing the same work. Target: <= 2 s.
3. Service latency, GET /v1/users/{id}/candidates?k=100 on loopback, >= 1,000 sequential requests
   over one keep-alive connection, against the same call made in-process. Target: p99 <= 10 ms.

    .venv/bin/python benchmarks/speed.py [--requests 2000] [--skip-pipeline --workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from kgrec.serving.process import run_pipeline_cli, running_service, workdir_env
from quality import machine  # noqa: E402  (sibling script)


def bench_pipeline(workdir: Path) -> dict:
    result, seconds = run_pipeline_cli(["--dataset", "music"], workdir_env(workdir))
    return {"pipeline_seconds": seconds, "target_seconds": 180.0, "result": result}


def bench_evaluation(workdir: Path, repeats: int = 5) -> dict:
    import torch
    from kgrec.features.dataset import InteractionData
    from kgrec.features.ingest import ingest
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import load_spec
    from kgrec.features.split import random_split
    from kgrec.models.evaluation import evaluate

    snapshot = load_snapshot(ingest(load_spec("ml-100k"), workdir / "snapshots").snapshot_dir)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=2020))
    gen = torch.Generator().manual_seed(0)
    user_emb = torch.randn(data.num_users, 64, generator=gen)
    item_emb = torch.randn(data.num_items, 64, generator=gen)
    exclude = [data.train, data.valid]
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fast = evaluate((user_emb, item_emb), data.test, exclude, ks=(100,))
        timings.append(time.perf_counter() - started)

    # Baseline: the textbook per-user loop (score, mask, argsort, count hits).
    started = time.perf_counter()
    u, v = user_emb.numpy(), item_emb.numpy()
    masked = (data.train + data.valid).tocsr()
    recalls = []
    for user in range(data.num_users):
        truth = data.test[user].indices
        if len(truth) == 0:
            continue
        scores = u[user] @ v.T
        scores[masked[user].indices] = -np.inf
        top = np.argsort(-scores)[:100]
        recalls.append(len(np.intersect1d(top, truth)) / len(truth))
    baseline = time.perf_counter() - started
    assert abs(np.mean(recalls) - fast["recall@100"]) < 1e-6, "batched and loop evaluation disagree"
    return {
        "eval_users": int(fast["num_users_evaluated"]),
        "eval_seconds_median": float(np.median(timings)),
        "eval_loop_baseline_seconds": baseline,
        "eval_speedup": baseline / float(np.median(timings)),
        "target_seconds": 2.0,
    }


def bench_service(workdir: Path, model_name: str, requests: int, k: int = 100) -> dict:
    from kgrec.models.tracking.settings import TrackingSettings
    from kgrec.serving.champion import load_registered

    service, _ = load_registered(TrackingSettings(workdir=workdir), model_name)
    user_ids = list(service.bundle.users["user_id"])
    rng = np.random.default_rng(0)
    picks = [user_ids[i] for i in rng.integers(0, len(user_ids), size=requests)]

    in_process = []
    for user_id in picks:
        started = time.perf_counter()
        service.for_user(user_id, k)
        in_process.append(time.perf_counter() - started)

    env = workdir_env(workdir)
    with running_service(model_name, env) as base_url, httpx.Client(
        base_url=base_url, timeout=10
    ) as client:
        for user_id in picks[:200]:  # warm-up
            client.get(f"/v1/users/{user_id}/candidates", params={"k": k})
        latencies = []
        for user_id in picks:
            started = time.perf_counter()
            response = client.get(f"/v1/users/{user_id}/candidates", params={"k": k})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200 or len(response.json()["candidates"]) != k:
                raise SystemExit(f"bad answer for {user_id}: {response.text[:300]}")
    ms = np.array(latencies) * 1000
    base = np.array(in_process) * 1000
    return {
        "requests": requests,
        "k": k,
        "http_p50_ms": float(np.percentile(ms, 50)),
        "http_p99_ms": float(np.percentile(ms, 99)),
        "in_process_p50_ms": float(np.percentile(base, 50)),
        "in_process_p99_ms": float(np.percentile(base, 99)),
        "target_p99_ms": 10.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, help="reuse a working directory (with --skip-pipeline)")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "work").resolve()
        figures: dict = {"machine": machine()}
        model_name = "kgrec-music"
        if not args.skip_pipeline:
            pipe = bench_pipeline(workdir)
            model_name = pipe["result"]["registered_model"]
            figures["pipeline_seconds"] = pipe["pipeline_seconds"]
            print(
                f"pipeline (music, fresh Prefect home): {pipe['pipeline_seconds']:.1f} s "
                f"(target 180 s, ratio {pipe['pipeline_seconds'] / 180:.2f})", flush=True,
            )
        ev = bench_evaluation(workdir)
        figures |= ev
        print(
            f"evaluation ml-100k, {ev['eval_users']} users, K=100: {ev['eval_seconds_median']:.3f} s "
            f"(target 2 s); per-user loop {ev['eval_loop_baseline_seconds']:.3f} s, "
            f"speed-up x{ev['eval_speedup']:.1f}", flush=True,
        )
        sv = bench_service(workdir, model_name, args.requests)
        figures |= sv
        print(
            f"service k=100 over {sv['requests']} requests: p50 {sv['http_p50_ms']:.2f} ms, "
            f"p99 {sv['http_p99_ms']:.2f} ms (target p99 10 ms, ratio "
            f"{sv['http_p99_ms'] / 10:.2f}); in-process p50 {sv['in_process_p50_ms']:.3f} ms, "
            f"p99 {sv['in_process_p99_ms']:.3f} ms", flush=True,
        )
        print(f"machine: {figures['machine']}")
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
