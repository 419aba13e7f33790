"""KG ablations as gates (issue 17): every KG model against itself without its KG and with it shuffled.

For each dataset x model x model seed, three variants of the dataset's snapshot
(``kgrec.features.ablation``), run one after the other in this process, so that load drifts on a
shared machine hit them alike:

* ``kg`` -- the snapshot as ingested;
* ``no_kg`` -- no triples, relations or non-item entities (the interaction graph alone);
* ``shuffled_kg`` -- every relation's tails permuted at random (seeded with the model seed, so
  every seed also draws its own shuffle): same degrees, no item-entity association.

Every run follows ``benchmarks/quality.py``: the protocol's split (per-user random 80/10/10,
seed 2020, the same interactions for every variant), the model's recommended configuration
(``TrainConfig.for_model``, ``--epochs`` caps it), early stopping and selection on validation
Recall@20, test Recall@20 / NDCG@20 (train and validation masked, standard NDCG) from the best
validation epoch. ``--seeds`` are model seeds (initialisation, shuffling, negatives).

Tables: per (dataset, model, variant) the mean +- sample sd over the seeds; then, per
(dataset, model), the paired per-seed differences ``kg - no_kg`` and ``kg - shuffled_kg``
(mean +- sample sd) with a verdict per metric. The rule (README "Benchmark protocol": call no
difference below the spread a gain): with ``d`` the paired differences and ``spread`` the largest
of sd(d), sd(kg) and sd(ablation) over the seeds,

* ``KG gain``      if mean(d) >  spread,
* ``KG hurts``     if mean(d) < -spread,
* ``within noise`` otherwise (and ``n/a`` with fewer than 2 paired seeds: no spread to judge by).

``wins`` counts the seeds where the KG variant is strictly better.

    .venv/bin/python benchmarks/kg_ablation.py [--datasets music,ml-100k] [--models kgat,kgin]
        [--variants kg,no_kg,shuffled_kg] [--seeds 2020,2021,2022] [--epochs N]
        [--out results.jsonl] [--table-only] [--threads 1]

``--out`` gets one JSON line per run, appended as soon as the run ends; runs already in the file
(same dataset, model, variant, seed and epoch cap) are skipped, so an interrupted benchmark
resumes where it stopped. The tables show the file's rows of the requested
datasets/models/variants/seeds and epoch cap. ``--table-only`` prints them without training.
A model that ignores the KG (bprmf, lightgcn) is accepted: its three variants must agree exactly,
a check of the harness itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from kgrec.features.ablation import VARIANTS, kg_variant
from kgrec.features.dataset import InteractionData
from kgrec.features.snapshot import Snapshot
from kgrec.features.split import Split, random_split
from kgrec.models.config import TrainConfig
from kgrec.models.spec import model_names
from quality import machine, protocol_snapshot, train_and_test  # noqa: E402  (sibling script)

ABLATIONS = ("no_kg", "shuffled_kg")
#: Metrics of the tables: (row key, column title).
METRICS = (("valid_recall@20", "valid R@20"), ("recall@20", "R@20"), ("ndcg@20", "N@20"))
#: Metrics judged by the verdict (test figures; validation only selected the epoch).
JUDGED = (("recall@20", "R@20"), ("ndcg@20", "N@20"))


def load_base(dataset: str, workdir: Path) -> tuple[Snapshot, Split]:
    """The dataset's snapshot (``sparse``: the generated one) and the protocol's split."""
    snapshot = protocol_snapshot(dataset, workdir)
    return snapshot, random_split(snapshot.interactions, seed=2020)


def run_key(row: dict) -> tuple:
    return (row["dataset"], row["model"], row["variant"], int(row["seed"]), row["epochs_cap"], row.get("time_cap"))


def run_one(
    base: Snapshot, split: Split, dataset: str, name: str, variant: str, seed: int, epochs: int | None,
    time_cap: float | None = None,
) -> dict:
    """Train ``name`` on ``variant`` of ``base`` (shuffle seeded with ``seed``), as
    ``quality.run_one`` trains on the snapshot itself."""
    snapshot = kg_variant(base, variant, seed)
    data = InteractionData.from_snapshot(snapshot, split)
    config = TrainConfig.for_model(name, epochs=epochs, seed=seed, time_budget_s=time_cap)
    return {
        "dataset": dataset,
        "model": name,
        "variant": variant,
        "seed": seed,
        "epochs_cap": epochs,
        "time_cap": time_cap,
        "snapshot": snapshot.name,
        "snapshot_hash": snapshot.hash,
        "base_hash": base.hash,
        "n_triples": snapshot.kg.height,
        "n_relations": snapshot.n_relations,
        "n_entities": snapshot.n_entities,
        "ablation": snapshot.manifest.get("ablation"),
        **train_and_test(data, config),
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }


def read_rows(path: Path) -> list[dict]:
    """The runs in ``path``; a line cut short (a benchmark killed while writing) is skipped with a
    warning, so that its run is redone."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}: skipping an incomplete line ({line[:60]}...)", file=sys.stderr)
    return rows


def append_row(path: Path, row: dict) -> None:
    """One JSON line at the end of ``path``, on a line of its own even after a cut-short one."""
    with path.open("ab") as f:
        if f.tell() > 0:
            with path.open("rb") as r:
                r.seek(-1, 2)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode("utf-8"))


def select(rows: list[dict], wanted: set[tuple]) -> list[dict]:
    """The rows whose :func:`run_key` is in ``wanted``, the first of each key, in file order."""
    seen: set[tuple] = set()
    out = []
    for r in rows:
        if (key := run_key(r)) in wanted and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def run(
    datasets: list[str], models: list[str], variants: list[str], seeds: list[int], epochs: int | None,
    out: Path, workdir: Path, time_cap: float | None = None,
) -> None:
    """Every missing run of the grid, appended to ``out``; the variants innermost (interleaved)."""
    done = {run_key(r) for r in read_rows(out)}
    for dataset in datasets:
        todo = [(m, s, v) for m in models for s in seeds for v in variants
                if (dataset, m, v, s, epochs, time_cap) not in done]
        if not todo:
            continue
        base, split = load_base(dataset, workdir)
        for k, (name, seed, variant) in enumerate(todo, 1):
            print(f"[{k}/{len(todo)}] {dataset} {name} {variant} seed {seed} ...", file=sys.stderr, flush=True)
            row = run_one(base, split, dataset, name, variant, seed, epochs, time_cap)
            append_row(out, row)
            print(_row(row), file=sys.stderr, flush=True)


HEADER = (
    f"{'dataset':<8} {'model':<9} {'variant':<12} {'seed':>5} {'triples':>8} {'valid R@20':>10} "
    f"{'R@20':>7} {'N@20':>7} {'best ep':>7} {'epochs':>6} {'s/epoch':>8} {'fit s':>7}"
)


def _row(r: dict) -> str:
    return (
        f"{r['dataset']:<8} {r['model']:<9} {r['variant']:<12} {r['seed']:>5} {r['n_triples']:>8} "
        f"{r['valid_recall@20']:>10.4f} {r['recall@20']:>7.4f} {r['ndcg@20']:>7.4f} {r['best_epoch']:>7} "
        f"{r['epochs_run']:>6} {r['seconds_per_epoch']:>8.3f} {r['fit_seconds']:>7.1f}"
        + ("  capped" if r.get("capped") else "")
    )


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _ms(values: list[float], sign: str = "+") -> str:
    """``mean+-sd`` (``sign="+"``: the mean with its sign, for differences; ``""``: without)."""
    return f"{statistics.mean(values):{sign}.4f}+-{_sd(values):.4f}" if values else "-"


def summary(rows: list[dict]) -> str:
    """Mean +- sample sd over the seeds of each (dataset, model, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["variant"]), []).append(r)
    lines = [f"{'dataset':<8} {'model':<9} {'variant':<12} {'seeds':>5} "
             + " ".join(f"{title + ' mean+-sd':>18}" for _, title in METRICS) + f" {'best ep':>7} {'fit s':>7}"]
    for (dataset, model, variant), group in groups.items():
        stats = " ".join(f"{_ms([g[key] for g in group], ''):>18}" for key, _ in METRICS)
        lines.append(
            f"{dataset:<8} {model:<9} {variant:<12} {len(group):>5} {stats} "
            f"{statistics.mean(g['best_epoch'] for g in group):>7.1f} "
            f"{statistics.mean(g['fit_seconds'] for g in group):>7.1f}"
        )
    return "\n".join(lines)


def verdict(diffs: list[float], kg: list[float], ablation: list[float]) -> str:
    """The module docstring's rule on paired differences ``kg - ablation``."""
    if len(diffs) < 2:
        return "n/a"
    spread = max(_sd(diffs), _sd(kg), _sd(ablation))
    mean = statistics.mean(diffs)
    if mean > spread:
        return "KG gain"
    if mean < -spread:
        return "KG hurts"
    return "within noise"


def paired(rows: list[dict]) -> list[dict]:
    """Per (dataset, model, ablation): the per-seed differences kg - ablation and their verdicts."""
    by_run = {(r["dataset"], r["model"], r["variant"], r["seed"]): r for r in rows}
    pairs = dict.fromkeys((r["dataset"], r["model"]) for r in rows)  # in the order of the runs
    out = []
    for dataset, model in pairs:
        for ablation in ABLATIONS:
            seeds = sorted(s for d, m, v, s in by_run if (d, m, v) == (dataset, model, "kg")
                           and (dataset, model, ablation, s) in by_run)
            if not seeds:
                continue
            kg = [by_run[dataset, model, "kg", s] for s in seeds]
            ab = [by_run[dataset, model, ablation, s] for s in seeds]
            entry = {"dataset": dataset, "model": model, "comparison": f"kg - {ablation}", "seeds": seeds}
            for key, _ in METRICS:
                a, b = [r[key] for r in kg], [r[key] for r in ab]
                d = [x - y for x, y in zip(a, b, strict=True)]
                entry[key] = {
                    "diffs": d,
                    "mean": statistics.mean(d),
                    "sd": _sd(d),
                    "spread": max(_sd(d), _sd(a), _sd(b)) if len(d) > 1 else float("nan"),
                    "wins": sum(x > 0 for x in d),
                    "verdict": verdict(d, a, b),
                }
            out.append(entry)
    return out


def paired_table(entries: list[dict]) -> str:
    lines = [f"{'dataset':<8} {'model':<9} {'comparison':<18} {'seeds':>5} {'valid R@20 diff':>16} "
             + " ".join(f"{title + ' diff':>16} {'spread':>7} {'wins':>5} {'verdict':<13}" for _, title in JUDGED)]
    for e in entries:
        n = len(e["seeds"])
        cells = " ".join(
            f"{_ms(e[key]['diffs']):>16} {e[key]['spread']:>7.4f} {e[key]['wins']:>2}/{n:<2} {e[key]['verdict']:<13}"
            for key, _ in JUDGED
        )
        lines.append(f"{e['dataset']:<8} {e['model']:<9} {e['comparison']:<18} {n:>5} "
                     f"{_ms(e['valid_recall@20']['diffs']):>16} {cells}")
    return "\n".join(lines)


def _nan_to_none(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="music,ml-100k")
    parser.add_argument("--models", default="kgat,kgin", help="retrievers, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="2020,2021,2022", help="model seeds (and shuffle seeds)")
    parser.add_argument("--epochs", type=int, help="cap on epochs (default: each model's own)")
    parser.add_argument("--time-cap", type=float, metavar="SECONDS",
                        help="training seconds per run at most (the best validation epoch is tested; rows say 'capped')")
    parser.add_argument("--out", type=Path, help="JSONL of the runs, appended and resumed (default: a temp file)")
    parser.add_argument("--workdir", type=Path, help="snapshot directory (default: a temp dir)")
    parser.add_argument("--table-only", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    datasets, models, variants = _list(args.datasets), _list(args.models), _list(args.variants)
    seeds = [int(s) for s in _list(args.seeds)]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    retrievers = set(model_names("retriever"))
    if bad := [m for m in models if m not in retrievers]:
        parser.error(f"not retrievers: {bad}; choose from {', '.join(sorted(retrievers))}")
    if args.table_only and args.out is None:
        parser.error("--table-only needs --out")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "kg_ablation.jsonl"
        if not args.table_only:
            run(datasets, models, variants, seeds, args.epochs, out, args.workdir or Path(tmp) / "snapshots",
                args.time_cap)
        wanted = {(d, m, v, s, args.epochs, args.time_cap)
                  for d in datasets for m in models for v in variants for s in seeds}
        rows = select(read_rows(out), wanted)
    if not rows:
        raise SystemExit(f"no runs of the requested grid in {out}")
    cap = "each model's own" if args.epochs is None else str(args.epochs)
    print(f"machine: {machine()} (torch threads={torch.get_num_threads()}; epoch cap: {cap}; "
          f"runs' threads: {sorted({r['threads'] for r in rows})})")
    print(HEADER)
    for r in rows:
        print(_row(r))
    print()
    print(summary(rows))
    entries = paired(rows)
    if entries:
        print()
        print("paired per-seed differences kg - ablation (mean +- sd); verdict: |mean| > spread = max(sd of the")
        print("differences, sd of each variant over the seeds), else within noise")
        print(paired_table(entries))
    # last line: the machine-readable summary (strict JSON: an undefined sd is null)
    print(json.dumps(_nan_to_none({"runs": rows, "paired": entries}), allow_nan=False))


if __name__ == "__main__":
    main()
