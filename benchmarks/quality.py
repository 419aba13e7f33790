"""Retrieval quality on the benchmark protocol of ../shared/data/README.md.

Trains every model on every dataset on the same split (per-user random 80/10/10, seed 2020,
KG-linked items, every interaction a positive), selects the epoch on validation Recall@20 and
prints test Recall@20 / NDCG@20 (full ranking, train+valid masked, standard NDCG), epochs to the
best validation epoch, median seconds per training epoch and peak memory, next to RecBole's figures
measured on the same protocol.

    .venv/bin/python benchmarks/quality.py [--datasets music,ml-100k] [--models bprmf,lightgcn]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.ingest import ingest
from kgrec.features.snapshot import load_snapshot
from kgrec.features.spec import load_spec
from kgrec.features.split import random_split
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate_split
from kgrec.models.spec import build_model
from kgrec.models.training.pairwise import fit

# RecBole 1.2.1, default hyper-parameters, same protocol (../shared/data/README.md).
RECBOLE = {
    ("music", "bprmf"): (0.329, 0.158),
    ("music", "lightgcn"): (0.345, 0.165),
    ("music", "kgat"): (0.245, 0.110),
    ("ml-100k", "bprmf"): (0.368, 0.306),
    ("ml-100k", "lightgcn"): (0.388, 0.324),
    ("ml-100k", "kgat"): (0.343, 0.290),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}"


def run_one(dataset: str, name: str, epochs: int | None, workdir: Path) -> dict:
    report = ingest(load_spec(dataset), workdir)
    snapshot = load_snapshot(report.snapshot_dir)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=2020))
    config = TrainConfig.for_model(name, epochs=epochs, seed=2020)
    started = time.perf_counter()
    model = build_model(config, data)  # KGAT's optional BPR-MF pre-training happens here
    result = fit(model, data, config)
    test = evaluate_split(model, data, part="test")
    peer = RECBOLE.get((dataset, name), (float("nan"), float("nan")))
    return {
        "dataset": dataset,
        "model": name,
        "recall@20": test["recall@20"],
        "ndcg@20": test["ndcg@20"],
        "recbole_recall@20": peer[0],
        "recbole_ndcg@20": peer[1],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds_per_epoch": result.seconds_per_epoch,
        "fit_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "test_users": test["num_users_evaluated"],
        "config": config.to_dict(),
    }


def run(datasets: list[str], models: list[str], epochs: int | None, workdir: Path) -> list[dict]:
    """Each (dataset, model) in its own process, so that peak memory is that model's."""
    rows = []
    for dataset in datasets:
        for name in models:
            command = [sys.executable, __file__, "--one", f"{dataset}:{name}", "--workdir", str(workdir)]
            if epochs:
                command += ["--epochs", str(epochs)]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{dataset}/{name} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


HEADER = (
    f"{'dataset':<8} {'model':<9} {'R@20':>7} {'N@20':>7} {'RecBole R/N@20':>15} "
    f"{'best ep':>7} {'epochs':>6} {'s/epoch':>8} {'fit s':>7} {'peak MB':>8}"
)


def _row(r: dict) -> str:
    return (
        f"{r['dataset']:<8} {r['model']:<9} {r['recall@20']:>7.4f} {r['ndcg@20']:>7.4f} "
        f"{r['recbole_recall@20']:>7.3f}/{r['recbole_ndcg@20']:<7.3f} {r['best_epoch']:>7} "
        f"{r['epochs_run']:>6} {r['seconds_per_epoch']:>8.3f} {r['fit_seconds']:>7.1f} "
        f"{r['peak_rss_mb']:>8.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="music,ml-100k")
    parser.add_argument("--models", default="bprmf,lightgcn,kgat")
    parser.add_argument("--epochs", type=int, help="cap on epochs (default: each model's own)")
    parser.add_argument("--workdir", type=Path, help="snapshot directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dataset, name = args.one.split(":")
        print(json.dumps(run_one(dataset, name, args.epochs, args.workdir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(
            args.datasets.split(","), args.models.split(","), args.epochs, args.workdir or Path(tmp)
        )
    print(f"machine: {machine()}")
    print(HEADER)
    for r in rows:
        print(_row(r))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
