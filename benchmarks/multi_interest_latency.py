"""Serving latency of multi-interest requests: POST /v1/candidates with real user histories.

1. Unless ``--workdir`` already holds one, registers a ``--model`` champion (default
   ``comirec_sa_max``: ComiRec-SA trained on the max merge's score, K = 4, d = 64, L = 20):
   ``kgrec pipeline --dataset DATASET --models MODEL --registered-model NAME [--epochs N]
   [--time-cap S]`` in a fresh working directory (``--dataset``: a bundled sequential spec name,
   default ``ml-100k-seq``, or any spec YAML with timestamps).
2. The request bodies are the TEST users' input sequences of the sequential split (seed 2020) --
   ordered raw item ids, oldest first, the last 500 (the API's limit) -- cycled to ``--requests``.
3. In-process baseline: ``MultiInterestService.for_history(ids, k)`` on the same loaded champion.
4. Live service: ``kgrec serve`` as a child process (serving/process.py) on loopback; after 200
   warm-up requests, ``--requests`` sequential POSTs over one keep-alive connection, per merge rule
   (``controllable`` with the model's lambda, 0.5, on a pool of 4k). Target from the issue: p99 <= 10 ms.

    .venv/bin/python benchmarks/multi_interest_latency.py [--requests 2000] [--k 50]
        [--dataset ml-100k-seq|SPEC] [--model comirec_sa_max] [--merges max,weighted,controllable]
        [--workdir DIR --model-name NAME] [--epochs N] [--time-cap SECONDS]
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

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def register_champion(workdir: Path, dataset: str, name: str, model: str, epochs: int | None,
                      time_cap: float | None) -> dict:
    from kgrec.serving.process import run_pipeline_cli, workdir_env

    args = ["--dataset", dataset, "--models", model, "--registered-model", name]
    result, seconds = run_pipeline_cli(args, workdir_env(workdir), epochs=epochs, time_cap=time_cap)
    result["pipeline_seconds"] = seconds
    return result


def test_histories(workdir: Path, dataset: str, max_items: int = 500) -> list[list[str]]:
    """The test users' ordered input sequences (raw item ids) of the sequential split, seed 2020."""
    from kgrec.features.ingest import ingest
    from kgrec.features.sequences import sequential_split
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import load_spec

    snapshot = load_snapshot(ingest(load_spec(dataset), workdir / "snapshots").snapshot_dir)
    split = sequential_split(snapshot, seed=2020)
    raw = snapshot.items.sort("item_idx")["item_id"].to_list()
    return [[raw[i] for i in seq[-max_items:].tolist()] for seq in split.test_inputs if len(seq)]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k-seq", help="bundled sequential spec name or spec YAML path")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--workdir", type=Path,
                        help="KGREC_HOME holding --model-name (trained there when it has no store)")
    parser.add_argument("--model-name", help="default: kgrec-<dataset>-latency")
    parser.add_argument("--model", default="comirec_sa_max", help="sequential model to register as champion")
    parser.add_argument("--epochs", type=int, help="training epochs of the champion")
    parser.add_argument("--time-cap", type=float, metavar="SECONDS", help="training seconds of the champion: "
                        "the best validation epoch before it is registered, and the result says 'capped'")
    parser.add_argument("--merges", default="max,weighted,controllable")
    args = parser.parse_args()
    from kgrec.features.spec import load_spec

    args.model_name = args.model_name or f"kgrec-{load_spec(args.dataset).name}-latency"

    from quality import machine  # noqa: E402  (sibling script)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "work").resolve()
        figures: dict = {"machine": machine(), "cpus": os.cpu_count(), "k": args.k}
        if not (workdir / "mlflow.db").exists():
            run = register_champion(workdir, args.dataset, args.model_name, args.model, args.epochs, args.time_cap)
            figures["pipeline_seconds"] = round(run["pipeline_seconds"], 1)
            figures["trained"] = {m["model"]: m["test"] for m in run["models"]}
            figures["capped"] = any(m.get("stop_reason") == "time_budget" for m in run["models"])
            print(f"registered {args.model_name}: {args.model}, test {figures['trained'][args.model]} "
                  f"({run['pipeline_seconds']:.0f} s{', capped' if figures['capped'] else ''})", flush=True)

        from kgrec.models.tracking.settings import TrackingSettings
        from kgrec.serving.champion import load_registered
        from kgrec.serving.process import running_service, workdir_env

        service, info = load_registered(TrackingSettings(workdir=workdir), args.model_name)
        if getattr(service, "kind", None) != "multi_interest":
            raise SystemExit(f"{args.model_name} champion is not a multi-interest model: {info}")
        figures["model"] = {"model": info["model"], "K": service.num_interests,
                            "max_length": service.max_length, "index": info.get("index", {}).get("kind")}
        histories = test_histories(workdir, args.dataset)
        lengths = np.array([len(h) for h in histories])
        figures["histories"] = {"users": len(histories), "median_len": float(np.median(lengths)),
                                "max_len": int(lengths.max())}
        bodies = [histories[i % len(histories)] for i in range(args.requests)]
        merges = args.merges.split(",")

        for merge in merges:  # in-process baseline: the service call the HTTP handler makes
            for ids in bodies[:100]:
                service.for_history(ids, args.k, merge=merge)
            timings = []
            for ids in bodies:
                started = time.perf_counter()
                result = service.for_history(ids, args.k, merge=merge)
                timings.append(time.perf_counter() - started)
                assert len(result.item_ids) == args.k
            figures[f"in_process_{merge}"] = percentiles(timings)

        env = workdir_env(workdir)
        figures["load_before"] = os.getloadavg()
        with running_service(args.model_name, env) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:
            model = client.get("/v1/model").json()
            assert model["kind"] == "multi_interest" and model["num_interests"] == service.num_interests
            for merge in merges:
                for ids in bodies[:200]:  # warm-up
                    client.post("/v1/candidates", json={"item_ids": ids, "k": args.k, "merge": merge})
                latencies, server_ms = [], []
                for ids in bodies:
                    started = time.perf_counter()
                    response = client.post("/v1/candidates", json={"item_ids": ids, "k": args.k, "merge": merge})
                    latencies.append(time.perf_counter() - started)
                    body = response.json()
                    if response.status_code != 200 or len(body["candidates"]) != args.k:
                        raise SystemExit(f"bad answer: {response.text[:300]}")
                    server_ms.append(body["took_ms"])
                figures[f"http_{merge}"] = percentiles(latencies) | {
                    "requests": len(latencies), "server_took_p50_ms": float(np.percentile(server_ms, 50))}
        figures["load_after"] = os.getloadavg()

    for merge in merges:
        http, local = figures[f"http_{merge}"], figures[f"in_process_{merge}"]
        print(
            f"POST /v1/candidates merge={merge}, K={figures['model']['K']}, k={args.k}, "
            f"{http['requests']} requests (test-user histories, median {figures['histories']['median_len']:.0f} "
            f"items): HTTP p50 {http['p50_ms']:.2f} ms, p99 {http['p99_ms']:.2f} ms (target p99 10 ms); "
            f"in-process p50 {local['p50_ms']:.3f} ms, p99 {local['p99_ms']:.3f} ms", flush=True,
        )
    print(f"machine: {figures['machine']}, load average before/after {figures['load_before']} / "
          f"{figures['load_after']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
