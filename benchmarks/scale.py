"""Seconds per training epoch and peak memory on generated power-law data, across sizes.

Scale 1.0 (issue 3): about 100k users, 50k items, 2M interactions, 100k entities, 1M triples,
30 relations; ``--scales`` multiplies every size. Each (model, scale, mode) runs in its own process
so that its peak memory is its own. Two modes, interleaved at every scale so that their ratio is
measured in one run:

* ``grown`` -- the models' defaults: the batch grows with the data so that an epoch keeps
  ``max_batches_per_epoch`` whole-graph propagations (``TrainConfig.for_data``);
* ``fixed`` -- the baseline: the configured batch whatever the size (``max_batches_per_epoch``
  None), one propagation per 2,048 / 4,096 pairs, so cost grows with the square of the data. It
  runs up to ``--fixed-up-to`` only (at scale 1.0 a fixed-batch KGAT epoch takes minutes).

The growth exponent is the least-squares slope of log(epoch seconds) on log(interactions). The
validation set is cut to 1,000 users: this benchmark times training, not full-ranking evaluation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--models lightgcn,kgat,kgin]
        [--scales 0.05,0.1,0.2,0.5,1.0] [--fixed-up-to 0.2] [--epochs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np


def run_one(model_name: str, epochs: int, scale: float, mode: str, threads: int) -> dict:
    import scipy.sparse as sp
    import torch
    from kgrec.features.dataset import InteractionData
    from kgrec.features.split import random_split
    from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot
    from kgrec.models.config import TrainConfig
    from kgrec.models.spec import build_model
    from kgrec.models.training.pairwise import fit

    torch.set_num_threads(threads)
    base = PowerLawConfig()
    config = replace(
        base,
        num_users=int(base.num_users * scale),
        num_items=int(base.num_items * scale),
        num_interactions=int(base.num_interactions * scale),
        num_entities=int(base.num_entities * scale),
        num_triples=int(base.num_triples * scale),
    )
    started = time.perf_counter()
    snapshot = powerlaw_snapshot(config)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=2020))
    keep = np.zeros(data.num_users, dtype=np.float32)
    keep[np.random.default_rng(0).choice(data.num_users, min(1000, data.num_users), replace=False)] = 1
    data.valid = (sp.diags(keep) @ data.valid).tocsr()
    data.valid.eliminate_zeros()
    _ = data.ckg
    prepare_seconds = time.perf_counter() - started
    prepared_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    overrides = {"max_batches_per_epoch": None} if mode == "fixed" else {}
    train_config = TrainConfig(
        **{**TrainConfig.for_model(model_name, epochs=epochs, seed=2020).model_dump(), **overrides}
    )
    model = build_model(train_config, data)
    result = fit(model, data, train_config)
    return {
        "model": model_name,
        "mode": mode,
        "scale": scale,
        "users": data.num_users,
        "items": data.num_items,
        "interactions": snapshot.interactions.height,
        "train_pairs": int(data.train.nnz),
        "triples": snapshot.kg.height,
        "ckg_edges": int(data.ckg.edge_index.shape[1]),
        **result.settings,
        "epoch_seconds": [round(e.seconds, 3) for e in result.history],
        # KGAT's epoch hook: the TransR pass and the attention update, inside the epoch time.
        **{
            key: round(statistics.median(e.extra[key] for e in result.history), 3)
            for key in ("kg_seconds", "attention_seconds")
            if all(key in e.extra for e in result.history)
        },
        "median_epoch_seconds": result.seconds_per_epoch,
        "prepare_seconds": round(prepare_seconds, 2),
        "prepared_rss_mb": round(prepared_rss),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
        "device": str(train_config.resolved_device()),
    }


def growth_exponent(rows: list[dict]) -> float | None:
    """Slope of log(seconds) on log(interactions) (None with fewer than two sizes)."""
    if len(rows) < 2:
        return None
    x = np.log([r["interactions"] for r in rows])
    y = np.log([r["median_epoch_seconds"] for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lightgcn,kgat,kgin")
    parser.add_argument("--scales", default="0.05,0.1,0.2,0.5,1.0", help="multiply every size")
    parser.add_argument("--fixed-up-to", type=float, default=0.2,
                        help="largest scale of the fixed-batch baseline (0: none)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "SCALE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, scale, mode = args.one
        print(json.dumps(run_one(name, args.epochs, float(scale), mode, args.threads)))
        return
    print(f"machine: {platform.machine()}, {platform.python_version()}, threads {args.threads}", flush=True)
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        for name in args.models.split(","):
            modes = ("grown", "fixed") if scale <= args.fixed_up_to else ("grown",)
            for mode in modes:
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", name, str(scale), mode,
                     "--epochs", str(args.epochs), "--threads", str(args.threads)],
                    capture_output=True, text=True,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{name} {scale} {mode} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(
                    f"{r['model']:<9} {r['mode']:<5} scale {scale:<5} {r['interactions']:>9,} inter. "
                    f"{r['ckg_edges']:>10,} CKG edges  batch {r['effective_batch_size']:>6,} x "
                    f"{r['batches_per_epoch']:>4}  lr {r['effective_learning_rate']:.4f}  "
                    f"{r['median_epoch_seconds']:8.2f} s/epoch  peak {r['peak_rss_mb']:>6,} MB "
                    f"(data {r['prepared_rss_mb']:,} MB)",
                    flush=True,
                )
    print("\nmodel     mode   growth exponent (epoch s ~ interactions^k)   fixed/grown at equal scale")
    for name in args.models.split(","):
        for mode in ("grown", "fixed"):
            mine = [r for r in rows if r["model"] == name and r["mode"] == mode]
            k = growth_exponent(mine)
            ratios = ""
            if mode == "fixed":
                grown = {r["scale"]: r for r in rows if r["model"] == name and r["mode"] == "grown"}
                ratios = ", ".join(
                    f"{r['scale']}: x{r['median_epoch_seconds'] / grown[r['scale']]['median_epoch_seconds']:.2f}"
                    for r in mine
                )
            if mine:
                print(f"{name:<9} {mode:<6} {'-' if k is None else f'{k:.2f}':<45} {ratios}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
