"""Exact against sampled softmax for the sequential models on a generated 50k-item catalogue.

The catalogue size decides the loss (``SequentialModelConfig.softmax``): the exact softmax up to
``exact_softmax_max_items`` (5,000) items, above it a sampled softmax with 1,024 negatives per
batch drawn from the item popularity and log-Q corrected. This script measures that choice: for
each seed the same generated sequences (``--items`` items in groups of 100; each user moves between
2-3 groups, with a Zipf popularity inside each group) train each model with

* ``exact``: every item scored (``num_negatives = 0``);
* ``uniform``: 1,024 uniform negatives (no correction needed: a constant shift);
* ``popularity``: 1,024 popularity negatives, log-Q corrected (the default above 5,000 items);

interleaved per seed, each capped at ``--epochs`` epochs and ``--time-cap`` training seconds (a
capped run is tested at its best validation epoch and says so). Reports test Recall@50 / NDCG@50
(the sequential protocol: first 80 % of a held-out user's sequence in, the rest as targets,
users 8:1:1) and the median training seconds per epoch; threads pinned (``--threads``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampled_softmax.py [--items 50000] [--users 3000]
        [--seeds 2020,2021,2022] [--models youtube_dnn,comirec_sa_max] [--epochs 4] [--time-cap 600]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from kgrec.features.sequences import SequenceSplit
from kgrec.models.sequential.config import SequentialModelConfig
from kgrec.models.sequential_evaluation import evaluate_sequential
from kgrec.models.spec import build_model
from kgrec.models.training.sequential import fit_sequential
from tqdm import tqdm

ARMS = {
    "exact": {"num_negatives": 0},
    "uniform": {"num_negatives": 1024, "negative_sampler": "uniform"},
    "popularity": {"num_negatives": None},  # the default above exact_softmax_max_items
}


def generated_split(items: int, users: int, length: int, seed: int) -> SequenceSplit:
    """Users moving between 2-3 of ``items // 100`` item groups; Zipf(1.1) popularity in a group."""
    rng = np.random.default_rng(seed)
    group_size = 100
    n_groups = items // group_size
    within = 1.0 / np.arange(1, group_size + 1) ** 1.1
    within /= within.sum()
    sequences = []
    for _ in range(users):
        mine = rng.choice(n_groups, size=int(rng.integers(2, 4)), replace=False)
        which = mine[rng.integers(len(mine), size=length)]
        sequences.append((which * group_size + rng.choice(group_size, size=length, p=within)).astype(np.int64))
    order = rng.permutation(users)
    n_train, n_valid = int(0.8 * users), int(0.1 * users)
    train, valid, test = order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:]
    cut = int(round(0.8 * length))
    return SequenceSplit(
        num_users=users, num_items=items,
        train_users=np.sort(train), train_sequences=[sequences[u] for u in np.sort(train)],
        valid_users=np.sort(valid), valid_inputs=[sequences[u][:cut] for u in np.sort(valid)],
        valid_targets=[sequences[u][cut:] for u in np.sort(valid)],
        test_users=np.sort(test), test_inputs=[sequences[u][:cut] for u in np.sort(test)],
        test_targets=[sequences[u][cut:] for u in np.sort(test)], seed=seed,
    )


def run_one(model_name: str, arm: str, split: SequenceSplit, seed: int, epochs: int, time_cap: float) -> dict:
    config = SequentialModelConfig.for_model(
        model_name, seed=seed, epochs=epochs, patience=epochs, time_budget_s=time_cap, torch_threads=None,
        **{k: v for k, v in ARMS[arm].items() if v is not None},
    )
    torch.manual_seed(seed)
    model = build_model(config, split.num_items)
    started = time.perf_counter()
    fit = fit_sequential(model, split, config)
    test = evaluate_sequential(model, split.test_inputs, split.test_targets, ks=(20, 50))
    return {
        "model": model_name, "arm": arm, "seed": seed, "softmax": fit.settings.get("softmax"),
        "negatives": fit.settings.get("softmax_negatives"), "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.history), "capped": fit.capped,
        "s_per_epoch": round(fit.seconds_per_epoch, 2), "fit_s": round(time.perf_counter() - started, 1),
        "valid_recall@50": fit.best_valid.get("recall@50"),
        "recall@50": float(test["recall@50"]), "ndcg@50": float(test["ndcg@50"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--length", type=int, default=30, help="events per user")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--models", default="youtube_dnn,comirec_sa_max")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--time-cap", type=float, default=600.0, help="training seconds per run at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSONL of the runs (appended)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [(seed, m, a) for seed in seeds for m in args.models.split(",") for a in args.arms.split(",")]
    print(f"machine: {torch.get_num_threads()} torch thread(s); {args.items} items, {args.users} users x "
          f"{args.length} events", file=sys.stderr)
    rows, splits = [], {}
    for seed, model_name, arm in tqdm(runs, disable=not sys.stderr.isatty(), desc="runs"):
        split = splits.setdefault(seed, generated_split(args.items, args.users, args.length, seed))
        row = run_one(model_name, arm, split, seed, args.epochs, args.time_cap)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:
            with args.out.open("a") as out:
                out.write(json.dumps(row) + "\n")
    print(f"\n{'model':<16}{'arm':<12}{'seeds':>6}{'R@50 mean+-sd':>18}{'N@50 mean+-sd':>18}{'s/epoch':>9}  capped")
    for model_name in args.models.split(","):
        for arm in args.arms.split(","):
            group = [r for r in rows if r["model"] == model_name and r["arm"] == arm]
            if not group:
                continue

            def stat(key: str, group: list[dict] = group) -> str:
                values = [r[key] for r in group]
                sd = statistics.stdev(values) if len(values) > 1 else float("nan")
                return f"{statistics.mean(values):.4f}+-{sd:.4f}"

            capped = sum(r["capped"] for r in group)
            print(f"{model_name:<16}{arm:<12}{len(group):>6}{stat('recall@50'):>18}{stat('ndcg@50'):>18}"
                  f"{statistics.median(r['s_per_epoch'] for r in group):>9.2f}  {capped}/{len(group)}")


if __name__ == "__main__":
    main()
