"""KG cold start on the benchmark protocol of ../shared/data/README.md ("Cold-start split").

20 % of the KG-linked items with an interaction (seed 2020) are cold: all their interactions form
the cold test set, the rest is split per user 80/10/10 (seed 2020), every KG triple is kept. For
the users with a cold test item, with training and validation items masked, prints Recall@20 /
NDCG@20 over the cold test interactions ranking all items ("all") and ranking the cold items only
("cold"), mean +- sample sd over the model seeds, beside the warm test Recall@20 of the retrieval
protocol (the warm split's own test part) where a model has one.

Rows:

* ``popularity``, ``random``, ``kg-knn`` (item-kNN over IDF-weighted KG neighbour sets, sum over
  the user's training items), ``kg-knn-max`` (the same, max) -- ties broken by the seed's order;
* ``lightgcn`` -- CF only: a cold item has no edge, its vector was only ever a BPR negative
  ("CF cannot do this");
* ``kgat`` -- transductive: trained on the warm split's CKG, which holds each cold item as a node
  with its KG edges and no interaction; its own vectors;
* ``kgat-reembed`` -- the same trained model, each cold item re-embedded from its KG facts through
  the layers with an estimated ego (isolates what the learned ego of a KG-only node is worth);
* ``kgat-inductive`` -- trained on a graph WITHOUT the cold items' triples (the items do not exist
  at training time); each cold item's vector from its facts alone
  (:class:`kgrec.models.cold_start.InductiveKGAT`), the item "posted" after training.

The ego estimate of the two re-embedded rows is picked on validation data only (``--ego auto``:
:func:`kgrec.models.cold_start.choose_ego`, warm items re-embedded from their facts, validation
Recall@20); the cold figures of every estimate are printed as an ablation (test data: not for
selection).

    .venv/bin/python benchmarks/cold_start.py [--datasets music,ml-100k] [--seeds 2020,2021,2022]
        [--models baselines,lightgcn,kgat,kgat-inductive] [--epochs N] [--threads 1] [--ego auto]

Each (dataset, model group, seed) runs in its own process (peak memory is that group's), torch on
``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from quality import machine, peak_rss_mb

GROUPS = ("baselines", "lightgcn", "kgat", "kgat-inductive")
ROW_ORDER = ("popularity", "random", "kg-knn", "kg-knn-max", "lightgcn", "kgat", "kgat-reembed",
             "kgat-inductive")


def _setup(dataset: str, workdir: Path):
    from kgrec.features.cold_start import cold_start_split, kg_linked_items
    from kgrec.features.dataset import InteractionData
    from kgrec.features.ingest import ingest
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import load_spec

    snapshot = load_snapshot(ingest(load_spec(dataset), workdir).snapshot_dir)
    split = cold_start_split(snapshot.interactions, kg_linked_items(snapshot), fraction=0.2, seed=2020)
    return snapshot, split, InteractionData.from_snapshot(snapshot, split.retrieval)


def _figures(result: dict) -> dict:
    return {
        "all_recall@20": result["all"]["recall@20"], "all_ndcg@20": result["all"]["ndcg@20"],
        "cold_recall@20": result["cold"]["recall@20"], "cold_ndcg@20": result["cold"]["ndcg@20"],
        "users": result["num_users"], "cold_items": result["num_cold_items"],
    }


def _reembedded(model, data, snapshot, split, ego: str, skip_cold: bool) -> dict:
    """Cold items' vectors from their KG facts through ``model``'s layers; figures per estimate."""
    from kgrec.features.cold_start import item_triples
    from kgrec.models.cold_start import EGO_ESTIMATES, InductiveKGAT, choose_ego, evaluate_cold, facts_by_item

    inductive = InductiveKGAT(model)
    facts = facts_by_item(item_triples(snapshot, split.cold_items), split.cold_items, data.num_users,
                          skip_nodes=split.cold_items if skip_cold else None)
    started = time.perf_counter()
    if ego == "auto":
        chosen, valid = choose_ego(inductive, data)
    else:
        chosen, valid = ego, {}
    select_s = time.perf_counter() - started
    ablation = {}
    for name in EGO_ESTIMATES:
        matrix = inductive.item_matrix(split.cold_items, facts, name)
        ablation[name] = _figures(evaluate_cold((inductive.user_vectors, matrix), data, split))
    return {**ablation[chosen], "ego": chosen, "ego_valid_recall@20": valid, "ego_ablation": ablation,
            "facts_per_cold_item": sum(map(len, facts)) / max(len(facts), 1), "select_seconds": select_s}


def run_group(
    dataset: str, group: str, seed: int, epochs: int | None, workdir: Path, ego: str, time_cap: float | None = None
) -> list[dict]:
    from kgrec.features.cold_start import without_item_triples
    from kgrec.features.dataset import InteractionData
    from kgrec.models.cold_start import evaluate_cold, kg_item_knn_scores, popularity_scores, random_scores
    from kgrec.models.config import TrainConfig
    from kgrec.models.evaluation import evaluate_split
    from kgrec.models.spec import build_model
    from kgrec.models.training.pairwise import fit

    snapshot, split, data = _setup(dataset, workdir)
    base = {"dataset": dataset, "seed": seed}
    rows = []
    if group == "baselines":
        kg_nodes = snapshot.n_items + snapshot.n_entities
        sources = {
            "popularity": lambda: popularity_scores(data.train, seed=seed),
            "random": lambda: random_scores(data.num_users, data.num_items, seed=seed),
            "kg-knn": lambda: kg_item_knn_scores(snapshot.kg, data.train, kg_nodes, "sum", seed=seed),
            "kg-knn-max": lambda: kg_item_knn_scores(snapshot.kg, data.train, kg_nodes, "max", seed=seed),
        }
        for name, make in sources.items():
            started = time.perf_counter()
            result = evaluate_cold(make(), data, split)
            seconds = time.perf_counter() - started
            rows.append({**base, "model": name, **_figures(result), "fit_seconds": seconds})
        return rows

    name = "kgat" if group.startswith("kgat") else group
    if group == "kgat-inductive":  # the cold items do not exist at training time: no triple of theirs
        reduced = without_item_triples(snapshot, split.cold_items)
        data = InteractionData.from_snapshot(reduced, split.retrieval)
    config = TrainConfig.for_model(name, epochs=epochs, seed=seed, time_budget_s=time_cap)
    started = time.perf_counter()
    model = build_model(config, data)
    result = fit(model, data, config)
    fit_s = time.perf_counter() - started
    model.eval()
    common = {**base, "fit_seconds": fit_s, "best_epoch": result.best_epoch,
              "epochs_run": len(result.history), "capped": result.capped,
              "warm_recall@20": evaluate_split(model, data, "test", ks=(20,))["recall@20"]}
    if group == "kgat-inductive":
        figures = _reembedded(model, data, snapshot, split, ego, skip_cold=True)
        rows.append({**common, "model": group, **figures})
    else:
        rows.append({**common, "model": name, **_figures(evaluate_cold(model, data, split))})
        if group == "kgat":
            rows.append({**common, "model": "kgat-reembed",
                         **_reembedded(model, data, snapshot, split, ego, skip_cold=False)})
    for row in rows:
        row["peak_rss_mb"] = peak_rss_mb()
    return rows


def run(datasets, groups, seeds, epochs, workdir, threads, ego, time_cap=None) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for dataset in datasets:
        for seed in seeds:
            for group in groups:
                command = [sys.executable, __file__, "--one", f"{dataset}:{group}:{seed}",
                           "--workdir", str(workdir), "--threads", str(threads), "--ego", ego]
                if epochs:
                    command += ["--epochs", str(epochs)]
                if time_cap:
                    command += ["--time-cap", str(time_cap)]
                print(f"{dataset} seed {seed} {group} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(command, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"{dataset}/{group}/{seed} failed:\n{proc.stderr[-3000:]}")
                new = json.loads(proc.stdout.strip().splitlines()[-1])
                rows += new
                for r in new:
                    print(_row(r), file=sys.stderr, flush=True)
    return rows


HEADER = (f"{'dataset':<8} {'model':<15} {'seed':>5} {'all R@20':>8} {'all N@20':>8} {'cold R@20':>9} "
          f"{'cold N@20':>9} {'warm R@20':>9} {'ego':>7} {'best ep':>7} {'fit s':>7}")


def _row(r: dict) -> str:
    warm = f"{r['warm_recall@20']:.4f}" if "warm_recall@20" in r else "-"
    return (f"{r['dataset']:<8} {r['model']:<15} {r['seed']:>5} "
            f"{r['all_recall@20']:>8.4f} {r['all_ndcg@20']:>8.4f} "
            f"{r['cold_recall@20']:>9.4f} {r['cold_ndcg@20']:>9.4f} {warm:>9} {r.get('ego', '-'):>7} "
            f"{r.get('best_epoch', '-'):>7} {r['fit_seconds']:>7.1f}")


def _stat(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f}+-{sd:.4f}"


def summary(rows: list[dict]) -> str:
    """Mean +- sample sd over the seeds of each (dataset, model), then the ego ablation."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["dataset"], ROW_ORDER.index(r["model"]))):
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    keys = ("all_recall@20", "all_ndcg@20", "cold_recall@20", "cold_ndcg@20")
    lines = [f"{'dataset':<8} {'model':<15} {'seeds':>5} " + " ".join(f"{k:>16}" for k in keys)
             + f" {'warm R@20':>16} {'users':>6} {'cold items':>10}"]
    for (dataset, model), group in groups.items():
        warm = _stat([g["warm_recall@20"] for g in group]) if "warm_recall@20" in group[0] else "-"
        lines.append(f"{dataset:<8} {model:<15} {len(group):>5} "
                     + " ".join(f"{_stat([g[k] for g in group]):>16}" for k in keys)
                     + f" {warm:>16} {group[0]['users']:>6} {group[0]['cold_items']:>10}")
    ablation = [(k, g) for k, g in groups.items() if "ego_ablation" in g[0]]
    if ablation:
        lines.append("\nego estimate ablation (cold test figures: an ablation, not a selection; "
                     "selection on validation = 'valid R@20')")
        lines.append(f"{'dataset':<8} {'model':<15} {'ego':>8} {'valid R@20':>16} {'all R@20':>16} "
                     f"{'cold R@20':>16} {'cold N@20':>16} {'chosen':>6}")
        for (dataset, model), group in ablation:
            for ego in group[0]["ego_ablation"]:
                valid = [g["ego_valid_recall@20"].get(ego) for g in group]
                valid_s = _stat(valid) if None not in valid else "-"
                chosen = sum(g["ego"] == ego for g in group)
                lines.append(
                    f"{dataset:<8} {model:<15} {ego:>8} {valid_s:>16} "
                    + " ".join(f"{_stat([g['ego_ablation'][ego][k] for g in group]):>16}"
                               for k in ("all_recall@20", "cold_recall@20", "cold_ndcg@20"))
                    + f" {chosen:>6}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="music,ml-100k")
    parser.add_argument("--models", default=",".join(GROUPS), help=f"groups of rows: {', '.join(GROUPS)}")
    parser.add_argument("--seeds", default="2020,2021,2022", help="model seeds (the split stays seed 2020)")
    parser.add_argument("--epochs", type=int, help="cap on epochs (default: each model's own)")
    parser.add_argument("--time-cap", type=float, metavar="SECONDS",
                        help="training seconds per model at most (the best validation epoch is tested)")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per process")
    parser.add_argument("--ego", default="auto", help="ego estimate of the re-embedded rows: auto (chosen on "
                        "validation), transr, mean, regress or zero")
    parser.add_argument("--workdir", type=Path, help="snapshot directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        dataset, group, seed = args.one.split(":")
        print(json.dumps(run_group(dataset, group, int(seed), args.epochs, args.workdir, args.ego, args.time_cap)))
        return
    groups = args.models.split(",")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown model groups {sorted(unknown)}; choose from {GROUPS}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.datasets.split(","), groups, [int(s) for s in args.seeds.split(",")], args.epochs,
                   args.workdir or Path(tmp), args.threads, args.ego, args.time_cap)
    print(f"machine: {machine()}")
    print(HEADER)
    for r in rows:
        print(_row(r))
    print(summary(rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
