"""Item-index build time, memory, recall@100 and single-query latency: the ``kind="auto"`` choice of
``kgrec.serving.index`` beside plain faiss settings, in one run.

Data (seeded, like trained item embeddings): ``--n`` x ``--dim`` vectors from a mixture of
``--clusters`` Gaussians (default n/1000) with power-law cluster sizes (weight of the r-th
cluster ~ r^-``--alpha``); centres ~ N(0, I/d), within-cluster noise ~ N(0, sigma^2 I/d) with
sigma ``--sigma``; then each vector is scaled by a log-normal factor (sd ``--norm-sd``, a
popularity-like spread of norms: NOT normalised, inner-product search is MIPS), or unit-normalised
with ``--normalize``. Queries (users) are fresh draws from the same mixture, not items: 256 of them
are given to the auto build for tuning, ``--queries`` others are the evaluation set, whose exact
top-100 (brute force) is the ground truth for every row.

Rows:

* ``auto``: ``build_and_measure(items, IndexConfig(build_threads=T, build_budget_s=B), tuning
  queries)``; build seconds include its ground truth, calibration, every candidate and the tuning.
  Its candidates (measured on the tuning queries) are printed below the table.
* ``Flat``: exact ``IndexFlatIP``.
* ``IVF1024`` / ``IVF4096``: ``index_factory("IVF{nlist},Flat", METRIC_INNER_PRODUCT)`` with faiss'
  defaults (spherical k-means for inner product, 10 iterations) except the k-means sample, bounded
  to 64 points a centroid (faiss' default 256 would k-means all 1M items into 4096 lists: 707 s
  measured before on this kind of machine), at a few nprobe.
* ``HNSW32``: ``IndexHNSWFlat(d, 32)`` efConstruction 40 at a few efSearch -- built on the first
  ``--hnsw-n`` items only (default min(n, 200k); its recall is against the exact top-100 of that
  subset and its latency is for a catalogue of that size, marked in the table), or skipped with
  ``--skip-hnsw``: HNSW32 takes ~100-150 s per million items on 2 cores.

Threads: builds and batched searches run with ``--threads`` OpenMP threads (default: the CPU
quota), latencies with 1 (single query at a time, as the services search); both are printed.
Memory: ``index bytes`` are the index's arrays (``index_memory_bytes``), ``RSS delta`` the
process's resident-set growth across the build (the input vectors excluded).

    .venv/bin/python benchmarks/index.py [--n 1000000] [--dim 64] [--threads 2] [--queries 500]
        [--skip-hnsw] [--hnsw-n 200000] [--budget 60] [--normalize]

Prints a markdown table and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import faiss
import numpy as np
from kgrec.serving.index import (
    IndexConfig,
    build_and_measure,
    exact_top_k,
    faiss_threads,
    index_memory_bytes,
    search_latency_ms,
)
from kgrec.serving.settings import cpu_quota

K = 100
TUNE_QUERIES = 256


def mixture(n: int, d: int, clusters: int, alpha: float, sigma: float, norm_sd: float, normalize: bool,
            seed: int) -> tuple[np.ndarray, callable]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, clusters + 1) ** alpha
    weights /= weights.sum()
    centres = (rng.standard_normal((clusters, d)) / np.sqrt(d)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for s in range(0, m, 200_000):  # bounded temporaries
            e = min(m, s + 200_000)
            v = centres[rng.choice(clusters, e - s, p=weights)]
            v += (sigma / np.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32)
            if normalize:
                v /= np.linalg.norm(v, axis=1, keepdims=True)
            else:
                v *= rng.lognormal(0.0, norm_sd, (e - s, 1)).astype(np.float32)
            out[s:e] = v
        return out

    return draw(n), draw


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def recall_at(truth: np.ndarray, got: np.ndarray) -> float:
    hits = sum(np.intersect1d(t, g[g >= 0]).size for t, g in zip(truth, got))
    return hits / truth.size


def row(name: str, params: str, build_s: float | None, index_bytes: int, rss_delta: int | None, recall: float,
        p50: float, p99: float, note: str = "", **extra) -> dict:
    return {"name": name, "params": params, "build_s": build_s, "index_bytes": index_bytes,
            "rss_delta_bytes": rss_delta, "recall_at_100": round(recall, 4), "p50_ms": round(p50, 4),
            "p99_ms": round(p99, 4), "note": note, **extra}


def evaluate(index, q: np.ndarray, truth: np.ndarray, threads: int, latency_n: int) -> tuple[float, float, float]:
    with faiss_threads(threads):
        _, got = index.search(q, K)
    p50, p99, _ = search_latency_ms(index.search, q, K, latency_n, seconds=5.0)
    return recall_at(truth, got), p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="build/batch threads (default: CPU quota)")
    parser.add_argument("--queries", type=int, default=500, help="evaluation queries")
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--clusters", type=int, default=None, help="mixture components (default n/1000)")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the cluster sizes")
    parser.add_argument("--sigma", type=float, default=0.6, help="within-cluster spread (centres have norm ~1)")
    parser.add_argument("--norm-sd", type=float, default=0.3, help="sd of the log-normal norm scale")
    parser.add_argument("--normalize", action="store_true", help="unit-normalise items and queries")
    parser.add_argument("--budget", type=float, default=60.0, help="auto build_budget_s")
    parser.add_argument("--skip-hnsw", action="store_true")
    parser.add_argument("--hnsw-n", type=int, default=None, help="items the HNSW baseline is built on (default min(n, 200k))")
    parser.add_argument("--skip-baselines", action="store_true", help="auto and Flat only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    threads = args.threads or cpu_quota()
    faiss.omp_set_num_threads(threads)
    load_before = os.getloadavg()
    clusters = args.clusters or max(16, args.n // 1000)
    t = time.perf_counter()
    x, draw = mixture(args.n, args.dim, clusters, args.alpha, args.sigma, args.norm_sd, args.normalize, args.seed)
    tune_q, q = draw(TUNE_QUERIES), draw(args.queries)
    data_s = time.perf_counter() - t
    t = time.perf_counter()
    truth = exact_top_k(x, q, K, threads)
    truth_s = time.perf_counter() - t
    print(f"data: {args.n} x {args.dim}, {clusters} clusters (alpha {args.alpha}, sigma {args.sigma}, "
          f"{'normalised' if args.normalize else f'log-normal norms sd {args.norm_sd}'}) in {data_s:.1f} s; "
          f"{args.queries} evaluation queries, exact top-{K} in {truth_s:.1f} s", flush=True)
    rows: list[dict] = []
    lat_n = args.latency_queries

    # auto
    gc.collect()
    rss0 = rss_bytes()
    t = time.perf_counter()
    index, info = build_and_measure(x, IndexConfig(build_threads=threads, build_budget_s=args.budget),
                                    queries=tune_q, k=K)
    auto_s = time.perf_counter() - t
    rss1 = rss_bytes()
    recall, p50, p99 = evaluate(index, q, truth, threads, lat_n)
    choice = info.get("auto", {}).get("choice", {})
    params = ", ".join(f"{k}={v}" for k, v in (choice.get("params") or {}).items())
    rows.append(row("auto", f"{info['kind']} {params}", round(auto_s, 2), index_memory_bytes(index), rss1 - rss0,
                    recall, p50, p99, f"tuning-sample recall {info['ann_recall']:.4f}"))
    print(f"auto: {info['kind']} {params} in {auto_s:.1f} s (budget {args.budget:g} s)", flush=True)
    del index
    gc.collect()

    def measure(name: str, make, settings: list[tuple[str, callable]], note: str = "", xs=x, qs=q, tr=truth):
        gc.collect()
        r0 = rss_bytes()
        t0 = time.perf_counter()
        with faiss_threads(threads):
            ix = make(xs)
        built = time.perf_counter() - t0
        r1 = rss_bytes()
        for label, apply in settings:
            apply(ix)
            rec, a, b = evaluate(ix, qs, tr, threads, lat_n)
            rows.append(row(name, label, round(built, 2), index_memory_bytes(ix), r1 - r0, rec, a, b, note))
            print(f"{name} {label}: recall {rec:.4f} p50 {a:.3f} ms (built in {built:.1f} s)", flush=True)
        del ix

    def flat(xs):
        ix = faiss.IndexFlatIP(xs.shape[1])
        ix.add(xs)
        return ix

    measure("Flat", flat, [("exact", lambda ix: None)])

    def nprobe(v):
        return lambda ix: setattr(faiss.extract_index_ivf(ix), "nprobe", v)

    if not args.skip_baselines:
        for nlist, probes in ((1024, (16, 32, 64, 128)), (4096, (32, 64, 128, 256))):
            if nlist * 39 > args.n:
                continue

            def ivf(xs, nlist=nlist):
                ix = faiss.index_factory(xs.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
                ivf_ = faiss.extract_index_ivf(ix)
                ivf_.cp.max_points_per_centroid = 64
                ivf_.cp.seed = 1234
                ix.train(xs)
                ix.add(xs)
                return ix

            measure(f"IVF{nlist}", ivf, [(f"nprobe={p}", nprobe(p)) for p in probes],
                    "faiss defaults (spherical k-means), 64 pts/centroid")
        if not args.skip_hnsw:
            hn = min(args.n, args.hnsw_n or 200_000)
            xs = x[:hn]
            tr = truth if hn == args.n else exact_top_k(xs, q, K, threads)
            note = "" if hn == args.n else f"built on the first {hn} items; recall vs their exact top-100"

            def hnsw(xs):
                ix = faiss.IndexHNSWFlat(xs.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
                ix.hnsw.efConstruction = 40
                ix.add(xs)
                return ix

            def ef(v):
                return lambda ix: setattr(ix.hnsw, "efSearch", v)

            measure("HNSW32" + ("" if hn == args.n else f" @{hn // 1000}k"), hnsw,
                    [(f"efC=40 efSearch={v}", ef(v)) for v in (64, 128, 256, 512)], note, xs=xs, tr=tr)

    load_after = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, quota {cpu_quota()}; "
          f"faiss {faiss.__version__}; threads: build/batch {threads}, latency 1; "
          f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("| index | params | build s | index MB | RSS delta MB | recall@100 | p50 ms | p99 ms | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rss = "" if r["rss_delta_bytes"] is None else f"{r['rss_delta_bytes'] / 2**20:.0f}"
        print(f"| {r['name']} | {r['params']} | {r['build_s']} | {r['index_bytes'] / 2**20:.0f} | {rss} | "
              f"{r['recall_at_100']:.4f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['note']} |")
    auto = info.get("auto")
    if auto:
        print(f"\nauto candidates (tuning sample of {auto['tune_queries']}, target {auto['target_recall']}, "
              f"budget {auto['budget_s']} s, elapsed {auto['elapsed_s']} s, calibration {auto['calibration']}):")
        for c in auto["candidates"]:
            p = ", ".join(f"{k}={v}" for k, v in c["params"].items())
            print(f"  {c['kind']:8s} {p:40s} {c.get('status', ''):13s} est {c.get('estimated_build_s')} s "
                  f"built {c.get('build_s')} s recall {c.get('recall')} p50 {c.get('p50_ms')} ms "
                  f"{c.get('reason', '')}")
    print(json.dumps({
        "benchmark": "index", "n": args.n, "dim": args.dim, "clusters": clusters, "normalize": args.normalize,
        "threads": threads, "latency_threads": 1, "load_before": load_before, "load_after": load_after,
        "eval_queries": args.queries, "rows": rows, "auto_info": {k: v for k, v in info.items() if k != "config"},
    }, default=str))


if __name__ == "__main__":
    main()
