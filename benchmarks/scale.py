"""Seconds per training epoch and peak memory on a generated power-law dataset.

Default size (issue 3): about 100k users, 50k items, 2M interactions, 100k entities, 1M triples,
30 relations. Each model runs in its own process so that its peak memory is its own.

    .venv/bin/python benchmarks/scale.py [--models kgat,lightgcn] [--epochs 2] [--scale 1.0]

The validation set is cut to 1,000 users: this benchmark times training, not full-ranking
evaluation of 100k users.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np


def run_one(model_name: str, epochs: int, scale: float) -> dict:
    import scipy.sparse as sp
    import torch
    from kgrec.features.dataset import InteractionData
    from kgrec.features.split import random_split
    from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot
    from kgrec.models.config import TrainConfig
    from kgrec.models.spec import build_model
    from kgrec.models.training.pairwise import fit

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
    keep[np.random.default_rng(0).choice(data.num_users, 1000, replace=False)] = 1
    data.valid = (sp.diags(keep) @ data.valid).tocsr()
    data.valid.eliminate_zeros()
    _ = data.ckg
    prepare_seconds = time.perf_counter() - started

    train_config = TrainConfig.for_model(model_name, epochs=epochs, seed=2020)
    model = build_model(train_config, data)
    result = fit(model, data, train_config)
    return {
        "model": model_name,
        "users": data.num_users,
        "items": data.num_items,
        "interactions": snapshot.interactions.height,
        "entities": snapshot.n_entities,
        "triples": snapshot.kg.height,
        "relations": snapshot.n_relations,
        "ckg_edges": int(data.ckg.edge_index.shape[1]),
        "epoch_seconds": [round(e.seconds, 3) for e in result.history],
        "median_epoch_seconds": result.seconds_per_epoch,
        "prepare_seconds": prepare_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "device": str(train_config.resolved_device()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="kgat,lightgcn")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every size")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.epochs, args.scale)))
        return
    rows = []
    for name in args.models.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--epochs", str(args.epochs),
             "--scale", str(args.scale)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['model']:<9} {r['users']:,} users, {r['items']:,} items, "
            f"{r['interactions']:,} interactions, {r['entities']:,} entities, "
            f"{r['triples']:,} triples, {r['relations']} relations ({r['ckg_edges']:,} CKG edges): "
            f"{r['median_epoch_seconds']:.2f} s/epoch (epochs {r['epoch_seconds']}), "
            f"peak RSS {r['peak_rss_mb']:,.0f} MB, {r['threads']} threads on {r['device']}",
            flush=True,
        )
    by_name = {r["model"]: r for r in rows}
    if "lightgcn" in by_name:  # the baseline: LightGCN propagates over the interaction graph only
        base = by_name["lightgcn"]
        for r in rows:
            if r is not base:
                print(
                    f"{r['model']} / lightgcn: x{r['median_epoch_seconds'] / base['median_epoch_seconds']:.1f} "
                    f"epoch time, x{r['peak_rss_mb'] / base['peak_rss_mb']:.1f} peak memory"
                )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
