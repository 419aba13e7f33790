"""Two-stage ranking: LightGCN retrieval (top-N, N = 200) re-ranked by KCAN.

Protocol (``/work/shared/data/README.md``): random 80/10/10 split per user, seed 2020; retrieval
is a full ranking with training items masked (test: training and validation items masked); KCAN
re-ranks the retriever's top-200 and the final list is cut at 20. Prints, per dataset: Recall@20 /
NDCG@20 of retrieval alone, of KCAN alone on the candidates and of the fused list (fusion weight
chosen on validation), the candidate recall@200 (upper bound of any re-ranker), KCAN training
time and the latency of one 200-candidate KCAN forward (median / p99 over 1,000 calls, one
thread, global representations cached as at serving time).

    .venv/bin/python benchmarks/rerank.py [--datasets music ml-100k] [--epochs 12] [--threads 1]
        [--global-init kgat]   # start KCAN's global layer from a converged KGAT
        [--workdir DIR] [--time-cap SECONDS]   # snapshots there; each fit (LightGCN, KGAT, KCAN)
                                               # stops after S s at its best validation epoch
        [--save-dir DIR]   # writes DIR/<dataset>/ (KCAN.save artefact)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.ingest import ingest
from kgrec.features.snapshot import load_snapshot
from kgrec.features.spec import load_spec
from kgrec.features.split import random_split
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate_split
from kgrec.models.rankers.kcan import KCANConfig
from kgrec.models.reranking import evaluate_reranking, kcan_scores, retrieval_candidates, train_kcan
from kgrec.models.spec import build_model
from kgrec.models.training.pairwise import fit
from kgrec.models.training.trainer import EpochLog


def load(name: str, workdir: Path) -> InteractionData:
    snap = load_snapshot(ingest(load_spec(name), workdir).snapshot_dir)
    return InteractionData.from_snapshot(snap, random_split(snap.interactions, seed=2020))


def latency(kcan, data: InteractionData, retriever, calls: int = 1000) -> tuple[float, float]:
    users, cands, _ = retrieval_candidates(retriever, data, "test", 200)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, users.numel(), calls)
    kcan_scores(kcan, users[:1], cands[:1])  # warm the cache
    times = []
    with torch.no_grad():
        for r in rows:
            u = users[r : r + 1].expand(200)
            t0 = time.perf_counter()
            kcan.score_pairs(u, cands[r])
            times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99))


def history_entry(log: EpochLog) -> dict:
    """One KCAN epoch in this benchmark's JSON form (the keys of the former per-epoch dicts; the
    trainer logs training time only, so there is no ``seconds`` with validation included)."""
    valid = log.valid or {}
    return {
        "epoch": log.epoch, "loss": log.loss, "train_seconds": log.seconds,
        "valid_ndcg@20_kcan": valid.get("ndcg@20_kcan"), "valid_ndcg@20_fused": valid.get("ndcg@20"),
        "alpha": valid.get("alpha"), **log.extra,
    }


def run(name: str, args) -> list[dict]:
    """One dataset: the retriever (and KGAT) trained once, KCAN once per ``--seeds`` seed."""
    data = load(name, args.workdir)
    t0 = time.perf_counter()
    config = TrainConfig.for_model("lightgcn", device="cpu", time_budget_s=args.time_cap)
    retriever = build_model(config, data)
    capped = fit(retriever, data, config).capped
    retr_seconds = time.perf_counter() - t0
    print(f"{name}: LightGCN trained in {retr_seconds:.0f} s{' (capped)' if capped else ''}", flush=True)
    full = evaluate_split(retriever, data, "test", ks=(20,))
    global_init, kgat_seconds = None, 0.0
    if args.global_init == "kgat":  # KCAN's global layer starts from a converged KGAT
        t0 = time.perf_counter()
        kgat_config = TrainConfig.for_model("kgat", device="cpu", time_budget_s=args.time_cap)
        global_init = build_model(kgat_config, data)
        kgat_capped = fit(global_init, data, kgat_config).capped
        capped = capped or kgat_capped
        kgat_seconds = time.perf_counter() - t0
        print(f"{name}: KGAT trained in {kgat_seconds:.0f} s{' (capped)' if kgat_capped else ''}", flush=True)
    return [
        train_one(name, data, retriever, full, global_init, seed, args, retr_seconds, kgat_seconds, capped)
        for seed in args.seeds
    ]


def train_one(name, data, retriever, full, global_init, seed, args, retr_seconds, kgat_seconds, capped) -> dict:
    kcfg = KCANConfig(epochs=args.epochs, max_valid_users=args.max_valid_users, seed=seed, time_budget_s=args.time_cap)
    kcan, res = train_kcan(data, retriever, kcfg, global_init=global_init, on_epoch=lambda log: print(
        f"  {name} KCAN seed {seed} epoch {log.epoch}: loss {log.loss:.4f}, {log.seconds:.0f} s", file=sys.stderr, flush=True))
    out = evaluate_reranking(retriever, kcan, data, "test", N=200, ks=(20,))
    med, p99 = latency(kcan, data, retriever)
    if args.save_dir:
        kcan.save(Path(args.save_dir) / name, extra={"alpha": res.best_valid["alpha"], "num_candidates": 200})
    return {
        "dataset": name,
        "retriever": "LightGCN",
        "kcan_seed": seed,
        "retrieval_full_ranking": {"recall@20": full["recall@20"], "ndcg@20": full["ndcg@20"]},
        **out,
        "kcan_best_epoch": res.best_epoch,
        "kcan_epochs_run": len(res.history),
        "kcan_valid_ndcg@20_fused": res.best_valid["ndcg@20"],
        "kcan_valid_ndcg@20_alone": res.best_valid["ndcg@20_kcan"],
        "kcan_train_seconds": res.total_seconds,
        "retriever_train_seconds": retr_seconds,
        "global_init": args.global_init,
        # some fit stopped at the time cap: its best validation epoch so far, not a converged one
        "capped": capped or res.capped,
        "kgat_train_seconds": kgat_seconds,
        "latency_ms_median": med,
        "latency_ms_p99": p99,
        "history": [history_entry(log) for log in res.history],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["music", "ml-100k"], help="bundled names or spec paths")
    parser.add_argument("--workdir", type=Path, help="snapshot directory (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-valid-users", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--global-init", choices=["none", "kgat"], default="none",
                        help="kgat: train KGAT first and start KCAN's global layer from it")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[2020],
                        help="KCAN seeds, comma-separated (the retriever and KGAT keep seed 2020)")
    parser.add_argument("--time-cap", type=float, metavar="SECONDS", help="training seconds per fit: each stops "
                        "after the epoch that passes it, its best validation epoch is used, the row says 'capped'")
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kgrec-rerank-"))
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.datasets:
        for r in run(name, args):
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "history"}, default=float), flush=True)
    print()
    print("| dataset | KCAN seed | retriever | R@20 retrieval | N@20 retrieval | R@20 KCAN alone | N@20 KCAN alone "
          "| R@20 retrieval→KCAN (fused, α) | N@20 retrieval→KCAN | ΔN@20 | cand. recall@200 "
          "| KCAN train s | 200-cand. forward median / p99 ms |")
    print("|" + " --- |" * 13)
    for r in rows:
        rr, kk, ff = r["retrieval"], r["kcan"], r["fused"]
        delta = ff["ndcg@20"] - rr["ndcg@20"]
        print(
            f"| {r['dataset']} | {r['kcan_seed']} | {r['retriever']} | {rr['recall@20']:.4f} | {rr['ndcg@20']:.4f} "
            f"| {kk['recall@20']:.4f} | {kk['ndcg@20']:.4f} | {ff['recall@20']:.4f} (α={r['alpha']:.1f}) "
            f"| {ff['ndcg@20']:.4f} | {delta:+.4f} ({100 * delta / rr['ndcg@20']:+.1f}%) "
            f"| {r['candidate_recall@200']:.4f} | {r['kcan_train_seconds']:.0f} "
            f"| {r['latency_ms_median']:.2f} / {r['latency_ms_p99']:.2f} |" + (" capped" if r["capped"] else "")
        )
    print()
    for name in args.datasets:  # the spread over KCAN seeds
        mine = [r for r in rows if r["dataset"] == name]
        final = np.array([r["fused"]["ndcg@20"] for r in mine])
        delta = final - np.array([r["retrieval"]["ndcg@20"] for r in mine])
        spread = f" ± {final.std(ddof=1):.4f}" if len(mine) > 1 else ""
        print(f"{name}: N@20 final {final.mean():.4f}{spread}, ΔN@20 {delta.mean():+.4f} over {len(mine)} seed(s), "
              f"{int((delta > 0).sum())}/{len(mine)} above retrieval alone")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
