"""Retrieval quality on the benchmark protocol of ../shared/data/README.md.

Trains every model on every dataset on the same split (per-user random 80/10/10, seed 2020,
KG-linked items, every interaction a positive), selects the epoch on validation Recall@20 and
prints test Recall@20 / NDCG@20 (full ranking, train+valid masked, standard NDCG), epochs to the
best validation epoch, median seconds per training epoch and peak memory, next to RecBole's figures
measured on the same protocol.

    .venv/bin/python benchmarks/quality.py [--datasets music,ml-100k] [--models bprmf,lightgcn]
        [--seeds 2020,2021,2022] [--max-batches none,4] [--lr-scaling sqrt]

``--seeds`` are model seeds (initialisation, shuffling, negatives); the split stays the protocol's
(seed 2020). ``--max-batches`` lists variants of ``max_batches_per_epoch``: ``default`` (the model's
own, which never binds on these datasets), ``none`` (the fixed batch) or a number that forces the
batch to grow (the trade-off of issue 16 at a size where it can be measured). With several seeds
the summary prints the mean and the sample standard deviation per variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.ingest import ingest
from kgrec.features.snapshot import Snapshot, load_snapshot
from kgrec.features.spec import load_spec
from kgrec.features.split import random_split
from kgrec.features.synthetic import sparse_snapshot
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


#: The generated sparse dataset (kgrec.features.synthetic.sparse_snapshot) by its name here.
SPARSE = "sparse"


def protocol_snapshot(dataset: str, workdir: Path) -> Snapshot:
    """A bundled dataset ingested into ``workdir``, or the generated sparse one (``sparse``)."""
    if dataset == SPARSE:
        return sparse_snapshot()
    return load_snapshot(ingest(load_spec(dataset), workdir).snapshot_dir)


def protocol_data(snapshot: Snapshot) -> InteractionData:
    """The protocol's split of ``snapshot`` (per user 80/10/10, seed 2020)."""
    return InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=2020))


def train_and_test(data: InteractionData, config: TrainConfig) -> dict:
    """Train ``config`` on ``data``, select on validation Recall@20, test the best epoch."""
    grown = config.for_data(int(data.train.nnz))
    started = time.perf_counter()
    model = build_model(config, data)  # KGAT's optional BPR-MF pre-training happens here
    result = fit(model, data, config)
    test = evaluate_split(model, data, part="test")
    return {
        "capped": result.capped,
        "batch_size": grown.batch_size,
        "learning_rate": grown.learning_rate,
        "valid_recall@20": result.best_valid.get("recall@20", float("nan")),
        "recall@20": test["recall@20"],
        "ndcg@20": test["ndcg@20"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds_per_epoch": result.seconds_per_epoch,
        "fit_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "test_users": test["num_users_evaluated"],
        "config": config.to_dict(),
    }


def run_one(
    dataset: str, name: str, epochs: int | None, workdir: Path, seed: int = 2020,
    max_batches: str = "default", lr_scaling: str | None = None, time_cap: float | None = None,
) -> dict:
    data = protocol_data(protocol_snapshot(dataset, workdir))
    # time_budget_s: fitting stops after the epoch that reaches it; the best validation epoch is tested
    overrides: dict = {"epochs": epochs, "seed": seed, "lr_scaling": lr_scaling, "time_budget_s": time_cap}
    if max_batches != "default":
        overrides["max_batches_per_epoch"] = None if max_batches == "none" else int(max_batches)
    config = TrainConfig.for_model(name, **overrides)
    if max_batches == "none":  # for_model treats None as "the default"
        config = config.model_copy(update={"max_batches_per_epoch": None})
    peer = RECBOLE.get((dataset, name), (float("nan"), float("nan")))
    return {
        "dataset": dataset, "model": name, "seed": seed, "variant": max_batches,
        "recbole_recall@20": peer[0], "recbole_ndcg@20": peer[1],
        **train_and_test(data, config),
    }


def run(
    datasets: list[str], models: list[str], epochs: int | None, workdir: Path,
    seeds: list[int] = (2020,), variants: list[str] = ("default",), lr_scaling: str | None = None,
    time_cap: float | None = None,
) -> list[dict]:
    """Each (dataset, model, seed, variant) in its own process, so that peak memory is that
    model's; the variants alternate within every seed, so that load drifts hit them alike."""
    rows = []
    runs = [(d, m, s, v) for d in datasets for m in models for s in seeds for v in variants]
    for k, (dataset, name, seed, variant) in enumerate(runs, 1):
        print(f"[{k}/{len(runs)}] {dataset} {name} seed {seed} {variant} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--one", f"{dataset}|{name}|{seed}|{variant}",
                   "--workdir", str(workdir)]
        if time_cap:
            command += ["--time-cap", str(time_cap)]
        if epochs:
            command += ["--epochs", str(epochs)]
        if lr_scaling:
            command += ["--lr-scaling", lr_scaling]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{dataset}/{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


HEADER = (
    f"{'dataset':<8} {'model':<9} {'seed':>5} {'variant':>8} {'batch':>7} {'lr':>7} {'R@20':>7} {'N@20':>7} {'RecBole R/N@20':>15} "
    f"{'best ep':>7} {'epochs':>6} {'s/epoch':>8} {'fit s':>7} {'peak MB':>8}"
)


def _row(r: dict) -> str:
    return (
        f"{r['dataset']:<8} {r['model']:<9} {r['seed']:>5} {r['variant']:>8} {r['batch_size']:>7} "
        f"{r['learning_rate']:>7.4f} {r['recall@20']:>7.4f} {r['ndcg@20']:>7.4f} "
        f"{r['recbole_recall@20']:>7.3f}/{r['recbole_ndcg@20']:<7.3f} {r['best_epoch']:>7} "
        f"{r['epochs_run']:>6} {r['seconds_per_epoch']:>8.3f} {r['fit_seconds']:>7.1f} "
        f"{r['peak_rss_mb']:>8.0f}" + ("  capped" if r.get("capped") else "")
    )


def summary(rows: list[dict]) -> str:
    """Mean +- sample standard deviation over the seeds of each (dataset, model, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["variant"]), []).append(r)
    lines = [f"{'dataset':<8} {'model':<9} {'variant':>8} {'seeds':>5} {'valid R@20':>16} {'R@20 mean+-sd':>16} "
             f"{'N@20 mean+-sd':>16} {'best ep':>7} {'fit s':>7}"]
    for (dataset, model, variant), group in groups.items():
        def stat(key: str, group: list[dict] = group) -> str:
            values = [g[key] for g in group]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            return f"{statistics.mean(values):.4f}+-{sd:.4f}"

        lines.append(
            f"{dataset:<8} {model:<9} {variant:>8} {len(group):>5} {stat('valid_recall@20'):>16} "
            f"{stat('recall@20'):>16} {stat('ndcg@20'):>16} "
            f"{statistics.mean(g['best_epoch'] for g in group):>7.1f} "
            f"{statistics.mean(g['fit_seconds'] for g in group):>7.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="music,ml-100k",
                        help="bundled names, spec YAML paths or 'sparse' (generated), comma-separated")
    parser.add_argument("--time-cap", type=float, metavar="SECONDS",
                        help="training seconds per run at most: fitting stops, the best validation epoch "
                        "is tested and the row says 'capped'")
    parser.add_argument("--models", default="bprmf,lightgcn,kgat")
    parser.add_argument("--epochs", type=int, help="cap on epochs (default: each model's own)")
    parser.add_argument("--workdir", type=Path, help="snapshot directory (default: a temp dir)")
    parser.add_argument("--seeds", default="2020", help="model seeds, comma-separated")
    parser.add_argument("--max-batches", default="default",
                        help="variants of max_batches_per_epoch: default, none or a number, comma-separated")
    parser.add_argument("--lr-scaling", choices=["sqrt", "none"], help="default: the config's")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dataset, name, seed, variant = args.one.split("|")
        print(json.dumps(run_one(dataset, name, args.epochs, args.workdir, int(seed), variant, args.lr_scaling,
                                 args.time_cap)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(
            args.datasets.split(","), args.models.split(","), args.epochs, args.workdir or Path(tmp),
            [int(s) for s in args.seeds.split(",")], args.max_batches.split(","), args.lr_scaling,
            args.time_cap,
        )
    print(f"machine: {machine()}")
    print(HEADER)
    for r in rows:
        print(_row(r))
    print(summary(rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
