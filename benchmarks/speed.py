"""Speed of the pipeline, the evaluator and the service, each against a target and a baseline.

1. Wall time of `kgrec pipeline --dataset music` in a fresh working directory and a fresh Prefect
   home (so the first Prefect start is included). Target: <= 180 s on 2 cores.
2. Full-ranking evaluation of every ml-100k user at K = 100 (batched tensors) against a per-user
   NumPy loop doing the same work. Target: <= 2 s.
3. Service latency, GET /v1/users/{id}/candidates?k=100 on loopback, >= 1,000 sequential requests
   over one keep-alive connection, against the same call made in-process. Target: p99 <= 10 ms.
4. Evaluation at scale: `evaluate` on the power-law synthetic data (scale 1.0: 100k users × 50k
   items, 2M interactions, random split), K = 100, test split with train + valid excluded, against
   a plain batched matmul + mask + topk loop. Target: time ratio <= 1.0 at no more peak memory.
   Timed A, B, A, B, ... in one process with pinned threads (noisy shared machines: only the ratio
   is meaningful); peak memory is the RSS high-water delta of a fresh subprocess for each.

    .venv/bin/python benchmarks/speed.py [--requests 2000] [--skip-pipeline --workdir DIR]
    .venv/bin/python benchmarks/speed.py --only evaluation-scale [--eval-scale 1.0 --eval-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


# ---------------------------------------------------------------------------- evaluation at scale
CASES = ("pipeline", "evaluation", "service", "evaluation-scale")


def baseline_full_ranking(user_emb, item_emb, truth, exclude, k: int, batch_size: int) -> dict:
    """The few-line reference: per batch, scores = U[b] @ I.T, excluded items -inf, topk, hits."""
    import torch

    excl = sum(exclude[1:], exclude[0]).tocsr()
    n_truth = np.diff(truth.indptr)
    users = np.flatnonzero(n_truth > 0)
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    recall = ndcg = 0.0
    for start in range(0, len(users), batch_size):
        b = users[start : start + batch_size]
        scores = user_emb[b] @ item_emb.T
        ex = excl[b].tocoo()
        scores[ex.row, ex.col] = float("-inf")
        top_scores, top = scores.topk(k, dim=1)
        t = truth[b].tocoo()
        keys = torch.from_numpy(t.row.astype(np.int64) * truth.shape[1] + t.col)
        query = torch.arange(len(b)).unsqueeze(1) * truth.shape[1] + top
        hits = torch.isin(query, keys) & top_scores.isfinite()
        n = torch.from_numpy(n_truth[b]).double()
        recall += (hits.sum(1) / n).sum().item()
        ndcg += ((hits * disc).sum(1) / disc.cumsum(0)[n.long().clamp(max=k) - 1]).sum().item()
    return {f"recall@{k}": recall / len(users), f"ndcg@{k}": ndcg / len(users),
            "num_users_evaluated": len(users)}


def _scale_data(scale: float, path: Path) -> None:
    """Power-law synthetic interactions at ``scale``, random split, 64-d random embeddings."""
    import scipy.sparse as sp
    import torch
    from kgrec.features.dataset import InteractionData
    from kgrec.features.split import random_split
    from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot

    base = PowerLawConfig()
    config = PowerLawConfig(
        num_users=int(base.num_users * scale), num_items=int(base.num_items * scale),
        num_interactions=int(base.num_interactions * scale),
        num_entities=int(base.num_entities * scale), num_triples=int(base.num_triples * scale),
    )
    snapshot = powerlaw_snapshot(config)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=2020))
    gen = torch.Generator().manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    for part in ("train", "valid", "test"):
        sp.save_npz(path / f"{part}.npz", sp.csr_matrix(getattr(data, part)))
    np.save(path / "user_emb.npy", torch.randn(data.num_users, 64, generator=gen).numpy())
    np.save(path / "item_emb.npy", torch.randn(data.num_items, 64, generator=gen).numpy())


def _load_scale_data(path: Path, num_users: int | None = None):
    import scipy.sparse as sp
    import torch

    parts = [sp.load_npz(path / f"{p}.npz").tocsr()[:num_users] for p in ("train", "valid", "test")]
    user_emb = torch.from_numpy(np.load(path / "user_emb.npy"))[:num_users]
    item_emb = torch.from_numpy(np.load(path / "item_emb.npy"))
    return user_emb, item_emb, parts[2], parts[:2]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _scale_worker(mode: str, path: Path, threads: int, k: int, batch_size: int, repeats: int,
                  mem_users: int) -> dict:
    """Run in a subprocess (env pins OMP/MKL threads): ``time`` or ``mem-evaluator``/``mem-baseline``."""
    import torch
    from kgrec.models.evaluation import _BLOCK_BYTES, _MIN_BLOCK_ROWS, evaluate

    torch.set_num_threads(threads)
    if mode.startswith("mem-"):
        user_emb, item_emb, truth, exclude = _load_scale_data(path, mem_users)
        try:  # reset the high-water mark (Linux >= 4.0) so data loading does not count
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        before = _status_kib("VmRSS")
        if mode == "mem-evaluator":
            evaluate((user_emb, item_emb), truth, exclude, ks=(k,), batch_size=batch_size)
        else:
            baseline_full_ranking(user_emb, item_emb, truth, exclude, k, batch_size)
        peak = _status_kib("VmHWM")
        return {"peak_delta_mib": (peak - before) / 1024, "hwm_reset": reset, "users": len(user_emb)}

    user_emb, item_emb, truth, exclude = _load_scale_data(path)
    runs: dict[str, list[tuple[float, float]]] = {"evaluator": [], "baseline": []}
    results = {}
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        for name in runs:
            wall, cpu = time.perf_counter(), time.process_time()
            if name == "evaluator":
                results[name] = evaluate((user_emb, item_emb), truth, exclude, ks=(k,),
                                         batch_size=batch_size)
            else:
                results[name] = baseline_full_ranking(user_emb, item_emb, truth, exclude, k, batch_size)
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    for key in (f"recall@{k}", f"ndcg@{k}", "num_users_evaluated"):
        a, b = results["evaluator"][key], results["baseline"][key]
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), f"evaluator and baseline disagree on {key}: {a} vs {b}"
    wall = {name: [w for w, _ in r] for name, r in runs.items()}
    cpu = {name: [c for _, c in r] for name, r in runs.items()}
    block_rows = min(max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (4 * item_emb.shape[0])), batch_size)
    return {
        "users": truth.shape[0], "items": truth.shape[1], "train_nnz": int(exclude[0].nnz),
        "test_nnz": int(truth.nnz), "users_evaluated": int(results["evaluator"]["num_users_evaluated"]),
        "metrics": {key: results["evaluator"][key] for key in (f"recall@{k}", f"ndcg@{k}")},
        "evaluator_wall_s": wall["evaluator"], "baseline_wall_s": wall["baseline"],
        "evaluator_cpu_s": cpu["evaluator"], "baseline_cpu_s": cpu["baseline"],
        # per-pair ratios, then their median: each pair ran back to back under the same load
        "wall_ratio": float(np.median(np.divide(wall["evaluator"], wall["baseline"]))),
        "cpu_ratio": float(np.median(np.divide(cpu["evaluator"], cpu["baseline"]))),
        "evaluator_block_mib": block_rows * truth.shape[1] * 4 / 2**20,
        "baseline_block_mib": batch_size * truth.shape[1] * 4 / 2**20,
        "threads": torch.get_num_threads(), "machine": machine(),
    }


def bench_evaluation_scale(scale: float = 1.0, threads: int = 1, repeats: int = 3, k: int = 100,
                           batch_size: int = 4096) -> dict:
    """Case 4: timing in one pinned subprocess, then one memory subprocess per implementation."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data"
        common = ["--eval-data", str(path), "--eval-threads", str(threads), "--eval-k", str(k),
                  "--eval-batch-size", str(batch_size), "--eval-repeats", str(repeats)]

        def worker(mode: str, *extra: str) -> dict:
            cmd = [sys.executable, __file__, "--eval-scale-worker", mode, *common, *extra]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        started = time.perf_counter()
        worker("data", "--eval-scale", str(scale))
        data_seconds = time.perf_counter() - started
        figures = worker("time")
        # memory on 3 batches of users: the peak is per batch, more users only take longer
        mem_users = str(3 * batch_size)
        figures["evaluator_peak_mib"] = worker("mem-evaluator", "--eval-mem-users", mem_users)["peak_delta_mib"]
        figures["baseline_peak_mib"] = worker("mem-baseline", "--eval-mem-users", mem_users)["peak_delta_mib"]
    figures |= {"scale": scale, "k": k, "batch_size": batch_size, "data_seconds": data_seconds,
                "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    return figures


def print_evaluation_scale(ev: dict) -> None:
    med = {key: float(np.median(ev[key])) for key in
           ("evaluator_wall_s", "baseline_wall_s", "evaluator_cpu_s", "baseline_cpu_s")}
    print(
        f"evaluation at scale {ev['scale']}: {ev['users']} users x {ev['items']} items "
        f"({ev['users_evaluated']} evaluated, train nnz {ev['train_nnz']}, test nnz {ev['test_nnz']}), "
        f"K={ev['k']}, batch {ev['batch_size']}, {ev['threads']} thread(s), "
        f"{len(ev['evaluator_wall_s'])} interleaved pairs\n"
        f"  evaluator  wall {med['evaluator_wall_s']:.2f} s  cpu {med['evaluator_cpu_s']:.2f} s  "
        f"peak +{ev['evaluator_peak_mib']:.0f} MiB (score block {ev['evaluator_block_mib']:.0f} MiB)\n"
        f"  baseline   wall {med['baseline_wall_s']:.2f} s  cpu {med['baseline_cpu_s']:.2f} s  "
        f"peak +{ev['baseline_peak_mib']:.0f} MiB (score block {ev['baseline_block_mib']:.0f} MiB)\n"
        f"  ratio evaluator/baseline: wall {ev['wall_ratio']:.3f}, cpu {ev['cpu_ratio']:.3f} "
        f"(target <= 1.0); metrics equal: {ev['metrics']}\n"
        f"  load average before {ev['loadavg_before'][0]:.2f}, after {ev['loadavg_after'][0]:.2f}; "
        f"machine: {ev['machine']}", flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, help="reuse a working directory (with --skip-pipeline)")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--only", choices=CASES, action="append", help="run only these cases (repeatable)")
    parser.add_argument("--eval-scale", type=float, default=1.0, help="case 4: synthetic data scale")
    parser.add_argument("--eval-threads", type=int, default=1, help="case 4: torch/OMP/MKL threads")
    parser.add_argument("--eval-repeats", type=int, default=3, help="case 4: interleaved pairs")
    parser.add_argument("--eval-k", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--eval-batch-size", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--eval-mem-users", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--eval-data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval-scale-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_scale_worker:  # subprocess of case 4
        if args.eval_scale_worker == "data":
            _scale_data(args.eval_scale, args.eval_data)
            print(json.dumps({}))
        else:
            print(json.dumps(_scale_worker(
                args.eval_scale_worker, args.eval_data, args.eval_threads, args.eval_k,
                args.eval_batch_size, args.eval_repeats, args.eval_mem_users,
            )))
        return
    cases = set(args.only or CASES)
    if args.skip_pipeline:
        cases.discard("pipeline")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "work").resolve()
        figures: dict = {"machine": machine()}
        model_name = "kgrec-music"
        if "pipeline" in cases:
            pipe = bench_pipeline(workdir)
            model_name = pipe["result"]["registered_model"]
            figures["pipeline_seconds"] = pipe["pipeline_seconds"]
            print(
                f"pipeline (music, fresh Prefect home): {pipe['pipeline_seconds']:.1f} s "
                f"(target 180 s, ratio {pipe['pipeline_seconds'] / 180:.2f})", flush=True,
            )
        if "evaluation" in cases:
            ev = bench_evaluation(workdir)
            figures |= ev
            print(
                f"evaluation ml-100k, {ev['eval_users']} users, K=100: {ev['eval_seconds_median']:.3f} s "
                f"(target 2 s); per-user loop {ev['eval_loop_baseline_seconds']:.3f} s, "
                f"speed-up x{ev['eval_speedup']:.1f}", flush=True,
            )
        if "evaluation-scale" in cases:
            scale = bench_evaluation_scale(args.eval_scale, args.eval_threads, args.eval_repeats)
            figures["evaluation_scale"] = scale
            print_evaluation_scale(scale)
        if "service" in cases:
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
