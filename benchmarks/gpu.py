"""Seconds per epoch and peak GPU memory of LightGCN, KGAT and KGIN on an Amazon-book-sized graph.

Issue 16, part 3: one prepared command that fits a single short GPU lease. It generates power-law
data of Amazon-book's size (KGAT's Table 1: 70,679 users, 24,915 items, 847,733 interactions,
88,572 KG entities *including* the items, 39 relations, 2,557,746 triples) -- here 70k users, 25k
items, 850k interactions, 64k non-item entities (89k KG nodes with the items), 40 relations, 2.5M
triples (``features/synthetic.py``) -- keeps 1,000 validation users, and fits each model through
the project's own training path (``TrainConfig.for_model`` -> ``build_model`` ->
``kgrec.models.training.pairwise.fit`` with ``device="cuda"``, batches grown as in production) for
``--warmup`` epochs plus ``--epochs`` timed ones. Per model it prints seconds per timed epoch (the
trainer's figure: training only, validation excluded), steps and effective batch, peak
``torch.cuda.max_memory_allocated`` (reset per model), validation recall@20 and, at the end, one
JSON line with every figure and the torch / CUDA versions and device name.

Each model runs in a process of its own on CUDA (``--isolate auto``): a CUDA error poisons the
process's context, an out-of-memory leaves the caching allocator fragmented, and a process of its
own makes the peak memory its model's alone; the parent prepares the data once and hands it over
as a pickle. A failed model prints its error and the others still run. Time: no run starts after
``--budget-s`` (270 s) and every run gets a share of what is left as its trainer
``time_budget_s`` (it stops after the epoch that crosses it) and a hard timeout.

``--compare-nondeterministic`` (default on CUDA) runs every model a second time, after the main
runs and only while the budget lasts, with ``torch.use_deterministic_algorithms`` kept off: the
trainer turns deterministic algorithms on for every fit, which on CUDA selects the sorting
implementations of ``index_add_`` / ``scatter_add_`` / index backward and fills every fresh
``torch.empty`` -- the pair of figures says what that costs. There is no ``--amp``: the trainer has
no mixed-precision path (an autocast around the fit would not be the project's path).

Here (CPU smoke run, seconds):

    .venv/bin/python benchmarks/gpu.py --device cpu --scale 0.005 --epochs 1 --threads 1

On a lent H200 (its image has torch and torch_geometric but not polars or pydantic, and kgrec is
not installed there: this script finds the package in the checkout). Once, here, fetch the wheels
into the ignored ``.whl/`` (about 55 MB; the working tree that travels must stay under 64 MiB)::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl polars==2.1.0 polars-runtime-32==2.1.0 pydantic==2.14.3 pydantic_core==2.50.4 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0

then one call with ``carry: [".whl"]`` and ``timeout_s`` 420::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --json-out $OUT/gpu.json \
        2>&1 | tee $OUT/gpu.log

Options: ``--device`` (default cuda; falls back to the CPU with a message when CUDA is absent),
``--scale`` (multiplies every size but the number of relations), ``--models``, ``--warmup``,
``--epochs``, ``--budget-s`` / ``--hard-limit-s``, ``--isolate``, ``--parity`` (default on CUDA:
after the main runs, LightGCN and KGAT fitted on the CPU and on the device on tiny data must agree
up to rounding -- their sampling is on the CPU), ``--compare-nondeterministic``, ``--threads``,
``--json-out``, ``--build-only`` (prepare the data and build every model, no training: checks the
full-size build here in about 25 s).

Order on CUDA: LightGCN, KGAT, KGIN (the figures asked for), the parity check, then the three
again without deterministic algorithms; what the budget leaves out is marked skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

# The trainer turns deterministic algorithms on (warn_only); deterministic cuBLAS needs this
# workspace setting before its first call, else cuBLAS calls raise a determinism warning instead.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

ROOT = Path(__file__).resolve().parents[1]
MAIN_MODELS = ("lightgcn", "kgat", "kgin")
# Amazon-book-sized (module docstring); num_entities excludes the items (KG node space: items first).
AMAZON_BOOK = {
    "num_users": 70_000,
    "num_items": 25_000,
    "num_interactions": 850_000,
    "num_entities": 64_000,
    "num_triples": 2_500_000,
}
NUM_RELATIONS = 40
VALID_USERS = 1000
SEED = 2020


def ensure_kgrec() -> str:
    """Make ``kgrec`` importable: installed (the venv), or straight from this checkout, whose
    top-level folders are the ``kgrec.*`` subpackages (``pyproject.toml``'s package-dir)."""
    try:
        import kgrec.models.config  # noqa: F401

        return "installed"
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("kgrec"):
            raise SystemExit(
                f"missing Python package {exc.name!r} (on the GPU image: carry the wheels, see "
                f"this script's docstring)"
            ) from exc
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in [m for m in sys.modules if m == "kgrec" or m.startswith("kgrec.")]:
        del sys.modules[name]
    import kgrec

    if str(ROOT) not in kgrec.__path__:
        kgrec.__path__.append(str(ROOT))  # kgrec.features -> ROOT/features, kgrec.models -> ...
    try:
        import kgrec.models.config  # noqa: F401,F811
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"missing Python package {exc.name!r} (on the GPU image: carry the wheels, see this "
            f"script's docstring)"
        ) from exc
    return "from the checkout"


# ---------------------------------------------------------------------------- environment
def environment(device: str) -> dict[str, Any]:
    import numpy as np
    import scipy
    import torch
    import torch_geometric

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_geometric": torch_geometric.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env |= {
            "device_name": torch.cuda.get_device_name(index),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
            "device_memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def pick_device(requested: str) -> str:
    import torch

    if requested.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"!! --device {requested}: CUDA is not available (torch {torch.__version__}, built "
            f"for CUDA {torch.version.cuda}); FALLING BACK TO THE CPU -- these are not GPU "
            f"figures (use --scale 0.01 for a quick CPU run)",
            flush=True,
        )
        return "cpu"
    return requested


# ---------------------------------------------------------------------------- data
def prepare(scale: float) -> tuple[Any, dict[str, Any]]:
    """Amazon-book-sized power-law data times ``scale``, validation cut to 1,000 users."""
    import numpy as np
    import scipy.sparse as sp
    from kgrec.features.dataset import InteractionData
    from kgrec.features.split import random_split
    from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot

    sizes = {k: max(1, int(v * scale)) for k, v in AMAZON_BOOK.items()}
    sizes["num_users"] = max(sizes["num_users"], 10)
    sizes["num_items"] = max(sizes["num_items"], 10)
    sizes["num_interactions"] = max(sizes["num_interactions"], 2 * sizes["num_users"])
    config = replace(PowerLawConfig(), **sizes, num_relations=NUM_RELATIONS)
    started = time.perf_counter()
    snapshot = powerlaw_snapshot(config)
    generate_s = time.perf_counter() - started
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=SEED))
    keep = np.zeros(data.num_users, dtype=np.float32)
    rng = np.random.default_rng(0)
    keep[rng.choice(data.num_users, min(VALID_USERS, data.num_users), replace=False)] = 1
    data.valid = (sp.diags(keep) @ data.valid).tocsr()
    data.valid.eliminate_zeros()
    ckg = data.ckg  # cached: built once, shared by the models
    stats = {
        "scale": scale,
        "config": asdict(config),
        "users": data.num_users,
        "items": data.num_items,
        "entities": snapshot.n_entities,
        "interactions": snapshot.interactions.height,
        "train_pairs": int(data.train.nnz),
        "valid_users": int((np.diff(data.valid.indptr) > 0).sum()),
        "triples": snapshot.kg.height,
        "relations": NUM_RELATIONS,
        "ckg_nodes": ckg.num_nodes,
        "ckg_edges": int(ckg.edge_index.shape[1]),
        "generate_seconds": round(generate_s, 2),
        "prepare_seconds": round(time.perf_counter() - started, 2),
    }
    return data, stats


# ---------------------------------------------------------------------------- one model
@contextlib.contextmanager
def determinism(deterministic: bool) -> Iterator[None]:
    """``deterministic=False``: the trainer's ``torch.use_deterministic_algorithms(True, ...)`` is
    turned into ``False`` for the block (to measure what determinism costs on the device)."""
    import torch

    if deterministic:
        yield
        return
    real = torch.use_deterministic_algorithms

    def without(mode: bool, *, warn_only: bool = False) -> None:
        real(False) if mode else real(mode, warn_only=warn_only)

    torch.use_deterministic_algorithms = without
    try:
        yield
    finally:
        torch.use_deterministic_algorithms = real


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(
    name: str,
    data: Any,
    device: str,
    warmup: int,
    epochs: int,
    time_budget_s: float | None,
    deterministic: bool = True,
    build_only: bool = False,
    partial: Any = None,
) -> dict[str, Any]:
    """Build and fit ``name`` through the project's path; figures of the timed epochs."""
    import torch
    from kgrec.models.config import TrainConfig
    from kgrec.models.spec import build_model
    from kgrec.models.training.pairwise import fit

    cuda = device.startswith("cuda")
    row: dict[str, Any] = {"model": name, "deterministic": deterministic, "device": device}
    config = TrainConfig.for_model(
        name, epochs=warmup + epochs, seed=SEED, device=device, time_budget_s=time_budget_s
    )
    grown = config.for_data(int(data.train.nnz))
    row |= {
        "effective_batch": grown.batch_size,
        "steps": -(-int(data.train.nnz) // grown.batch_size),
        "effective_learning_rate": round(grown.learning_rate, 6),
    }
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    model = build_model(config, data)
    row["build_seconds"] = round(time.perf_counter() - t0, 2)
    row["parameters"] = sum(p.numel() for p in model.parameters())
    triples = getattr(model, "_kg_triples", None)
    if triples is not None and getattr(model, "kg_step", False):
        row["kg_triples"] = int(triples.size(1))
        row["kg_batch"] = int(model.kg_step_batch_size(int(triples.size(1))))
        row["kg_steps"] = -(-int(triples.size(1)) // row["kg_batch"])
    if build_only:
        return row
    epochs_done: list[dict[str, Any]] = []

    def on_epoch(log: Any) -> None:
        entry = {"epoch": log.epoch, "seconds": round(log.seconds, 4), "loss": round(log.loss, 6)}
        entry |= {k: round(v, 4) for k, v in log.extra.items()}
        if log.valid:
            entry["recall@20"] = round(log.valid.get("recall@20", float("nan")), 5)
        epochs_done.append(entry)
        extra = "".join(f" {k} {v:.3f}" for k, v in log.extra.items())
        print(
            f"  [{name}{'' if deterministic else ' nondet'}] epoch {log.epoch}: "
            f"{log.seconds:.3f} s  loss {log.loss:.5f}  recall@20 {entry.get('recall@20', '-')}{extra}",
            flush=True,
        )
        if partial is not None:
            partial({**row, "epochs": epochs_done, "partial": True})

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    with determinism(deterministic):
        result = fit(model, data, config, on_epoch=on_epoch)
    _sync(device)
    fit_wall = time.perf_counter() - t0
    seconds = [h.seconds for h in result.history]
    timed = seconds[warmup:]
    row |= {
        "epochs_run": len(seconds),
        "stop_reason": result.stop_reason,
        "warmup_seconds": [round(s, 3) for s in seconds[:warmup]],
        "epoch_seconds": [round(s, 3) for s in timed],
        # median of the timed epochs; the warm-up epoch alone when the time budget cut the run
        "seconds_per_epoch": round(statistics.median(timed or seconds), 4),
        "timed_epochs": len(timed),
        "fit_wall_seconds": round(fit_wall, 2),
        "valid_recall@20": round(result.history[-1].valid["recall@20"], 5)
        if result.history[-1].valid
        else None,
        "best_valid_recall@20": round(result.best_valid.get("recall@20", float("nan")), 5),
        "epochs": epochs_done,
        "settings": result.settings,
    }
    if result.history[-1].extra:
        row["last_epoch_extra"] = {k: round(v, 4) for k, v in result.history[-1].extra.items()}
    if cuda:
        row["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["max_memory_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    del model, result
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def parity_check(device: str, epochs: int = 2) -> dict[str, Any]:
    """LightGCN and KGAT fitted on the CPU and on ``device`` from the same seed on tiny data: their
    sampling is on the CPU, so the epoch losses (KGAT's KG loss too) and validation recall must
    agree up to float rounding. KGIN is left out: its node dropout draws on the device's RNG."""
    import torch
    from kgrec.models.config import TrainConfig
    from kgrec.models.spec import build_model
    from kgrec.models.training.pairwise import fit

    data, _ = prepare(0.005)
    row: dict[str, Any] = {"model": "parity", "device": device, "checks": {}}
    worst, worst_recall = 0.0, 0.0
    for name in ("lightgcn", "kgat"):
        figures = {}
        for key, where in (("cpu", "cpu"), ("device", device)):
            config = TrainConfig.for_model(name, epochs=epochs, seed=SEED, device=where)
            torch.manual_seed(SEED)
            result = fit(build_model(config, data), data, config)
            figures[key] = [
                [h.loss, h.extra.get("kg_loss", 0.0), (h.valid or {}).get("recall@20", 0.0)]
                for h in result.history
            ]
        pairs = list(zip(figures["cpu"], figures["device"]))
        # losses: relative difference; recall@20: absolute (one user's tie flips it by 1/users)
        loss_diff = max(abs(a[j] - b[j]) / max(abs(a[j]), 1e-6) for a, b in pairs for j in (0, 1))
        recall_diff = max(abs(a[2] - b[2]) for a, b in pairs)
        worst = max(worst, loss_diff)
        worst_recall = max(worst_recall, recall_diff)
        row["checks"][name] = {**figures, "loss_rel_diff": loss_diff, "recall_abs_diff": recall_diff}
    row["max_rel_diff"] = worst
    row["max_recall_abs_diff"] = worst_recall
    row["ok"] = worst < 1e-3 and worst_recall < 0.02
    return row


def child_main(args: argparse.Namespace) -> None:
    """``--one``: one run in a process of its own; the row goes to ``--result`` (also partial)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result_path = Path(args.result)

    def write(row: dict[str, Any]) -> None:
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(result_path)

    name = args.one
    try:
        if name == "parity":
            row = parity_check(args.device)
        else:
            with open(args.data, "rb") as f:
                data = pickle.load(f)
            row = run_one(
                name, data, args.device, args.warmup, args.epochs, args.time_budget_s,
                deterministic=not args.nondeterministic, partial=write,
            )
    except Exception as exc:  # noqa: BLE001 -- reported, the parent goes on with the others
        traceback.print_exc()
        row = {"model": name, "deterministic": not args.nondeterministic, "error": repr(exc)[:2000]}
    write(row)


# ---------------------------------------------------------------------------- driver
def print_row(r: dict[str, Any]) -> None:
    tag = f"{r['model']}{'' if r.get('deterministic', True) else ' (nondet)'}"
    if "error" in r:
        print(f"== {tag}: FAILED {r['error'][:500]}", flush=True)
        return
    if r["model"] == "parity":
        print(f"== parity CPU vs {r['device']} (LightGCN, KGAT; losses, KG loss, recall@20): "
              f"losses max relative difference {r['max_rel_diff']:.2e}, recall max absolute "
              f"difference {r['max_recall_abs_diff']:.4f} -> {'ok' if r['ok'] else 'MISMATCH'}",
              flush=True)
        return
    if "seconds_per_epoch" not in r:
        print(f"== {tag}: built in {r.get('build_seconds')} s, {r.get('parameters'):,} parameters, "
              f"batch {r.get('effective_batch'):,} x {r.get('steps')} steps"
              + (f", KG {r['kg_triples']:,} triples / {r['kg_batch']:,} = {r['kg_steps']} steps"
                 if "kg_steps" in r else ""), flush=True)
        return
    mem = (f"peak {r['max_memory_allocated_mb']:,.0f} MiB allocated "
           f"({r['max_memory_reserved_mb']:,.0f} reserved)" if "max_memory_allocated_mb" in r
           else f"peak RSS {r['peak_rss_mb']:,} MB")
    kg = f", KG step {r['kg_steps']} x {r['kg_batch']:,}" if "kg_steps" in r else ""
    extra = r.get("last_epoch_extra") or {}
    parts = ", ".join(f"{k} {v:.3f}" for k, v in extra.items() if k.endswith("seconds"))
    print(
        f"== {tag}: {r['seconds_per_epoch']:.3f} s/epoch (timed {r['epoch_seconds']}, warm-up "
        f"{r['warmup_seconds']}){' [' + parts + ']' if parts else ''}  {r['steps']} steps x batch "
        f"{r['effective_batch']:,}{kg}  {mem}  valid recall@20 {r['valid_recall@20']}  "
        f"(build {r['build_seconds']} s, fit wall {r['fit_wall_seconds']} s, stop {r['stop_reason']})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every size")
    parser.add_argument("--models", default=",".join(MAIN_MODELS))
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--budget-s", type=float, default=270.0, help="no run starts after this")
    parser.add_argument("--hard-limit-s", type=float, default=295.0, help="a run is killed at this")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="each run in its own process (auto: on CUDA)")
    parser.add_argument("--compare-nondeterministic", action=argparse.BooleanOptionalAction,
                        default=None, help="second pass without deterministic algorithms "
                        "(default: on CUDA)")
    parser.add_argument("--parity", action=argparse.BooleanOptionalAction, default=None,
                        help="tiny CPU-vs-device agreement check of LightGCN and KGAT after the "
                        "main runs (default: on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json-out", default=None, help="also write the JSON summary here")
    parser.add_argument("--build-only", action="store_true", help="data and models, no training")
    # internal: one run in a child process
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--time-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nondeterministic", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    started = time.perf_counter()
    where = ensure_kgrec()
    if args.one:
        child_main(args)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    env = environment(device) | {"kgrec": where}
    print("gpu benchmark: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cuda)
    compare = cuda if args.compare_nondeterministic is None else args.compare_nondeterministic
    if args.build_only:
        isolate, compare = False, False

    data, stats = prepare(args.scale)
    print(
        f"data: scale {args.scale}: {stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['entities']:,} entities, {stats['interactions']:,} interactions "
        f"({stats['train_pairs']:,} train), {stats['triples']:,} triples, {stats['relations']} "
        f"relations; CKG {stats['ckg_nodes']:,} nodes {stats['ckg_edges']:,} edges; "
        f"{stats['valid_users']:,} validation users; prepared in {stats['prepare_seconds']} s",
        flush=True,
    )
    parity = cuda if args.parity is None else args.parity
    if args.build_only:
        parity = False
    runs = [(m, True) for m in models] + ([("parity", True)] if parity else [])
    runs += [(m, False) for m in models] if compare else []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kgrec-gpu-") as tmp:
        data_path = Path(tmp) / "data.pkl"
        if isolate:
            with open(data_path, "wb") as f:
                pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        for k, (name, deterministic) in enumerate(runs):
            elapsed = time.perf_counter() - started
            if elapsed >= args.budget_s:
                print(f"== {name}{'' if deterministic else ' (nondet)'}: skipped, {elapsed:.0f} s "
                      f"of the {args.budget_s:.0f} s budget gone", flush=True)
                rows.append({"model": name, "deterministic": deterministic,
                             "skipped": "time budget"})
                continue
            # this phase's remaining runs share what is left of the budget
            left = sum(1 for m, d in runs[k:] if d == deterministic and m != "parity") or 1
            share = (args.budget_s - elapsed) / left
            train_budget = max(5.0, 0.6 * share)
            hard = max(10.0, min(args.hard_limit_s - elapsed, 1.5 * share + 30.0))
            if name == "parity":
                hard = max(10.0, min(args.hard_limit_s - elapsed, 90.0))
            print(f"-- {name}{'' if deterministic else ' (nondet)'}: training budget "
                  f"{train_budget:.0f} s, hard limit {hard:.0f} s", flush=True)
            if name == "parity":
                row = run_isolated(args, name, True, device, data_path, Path(tmp), 0.0, hard)
            elif isolate:
                row = run_isolated(args, name, deterministic, device, data_path, Path(tmp),
                                   train_budget, hard)
            else:
                try:
                    row = run_one(name, data, device, args.warmup, args.epochs, train_budget,
                                  deterministic=deterministic, build_only=args.build_only)
                except Exception as exc:  # noqa: BLE001 -- one failure must not lose the others
                    traceback.print_exc()
                    row = {"model": name, "deterministic": deterministic, "error": repr(exc)[:2000]}
            rows.append(row)
            print_row(row)

    summary = {
        "benchmark": "gpu",
        "env": env,
        "data": stats,
        "warmup": args.warmup,
        "epochs": args.epochs,
        "runs": rows,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    line = json.dumps(summary)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    try:
        print_table(rows)
    except Exception:  # noqa: BLE001 -- the JSON line below carries every figure anyway
        traceback.print_exc()
    print(line, flush=True)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nmodel      determ.  s/epoch   steps x batch        peak mem   recall@20", flush=True)
    for r in rows:
        if "seconds_per_epoch" in r:
            mem = r.get("max_memory_allocated_mb", r.get("peak_rss_mb")) or 0
            note = "  (" + r["error"][:80] + ")" if "error" in r else ""
            print(f"{r['model']:<10} {str(r.get('deterministic')):<8} {r['seconds_per_epoch']:>8.3f}  "
                  f"{r.get('steps', 0):>5} x {r.get('effective_batch', 0):<9,}  {mem:>10,.0f}   "
                  f"{r.get('valid_recall@20')}{note}", flush=True)
        elif r["model"] == "parity" and "ok" in r:
            print(f"{'parity':<10} {'-':<8} CPU vs {r['device']}: losses rel. diff "
                  f"{r['max_rel_diff']:.2e}, recall abs. diff {r['max_recall_abs_diff']:.4f} "
                  f"({'ok' if r['ok'] else 'MISMATCH'})", flush=True)
        else:
            print(f"{r['model']:<10} {str(r.get('deterministic')):<8} "
                  f"{r.get('error') or r.get('skipped') or 'built'}", flush=True)


def run_isolated(
    args: argparse.Namespace,
    name: str,
    deterministic: bool,
    device: str,
    data_path: Path,
    tmp: Path,
    train_budget: float,
    hard: float,
) -> dict[str, Any]:
    result = tmp / f"{name}-{'det' if deterministic else 'nondet'}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--one", name, "--data", str(data_path),
        "--result", str(result), "--device", device, "--warmup", str(args.warmup),
        "--epochs", str(args.epochs), "--time-budget-s", f"{train_budget:.1f}",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not deterministic:
        cmd.append("--nondeterministic")
    try:
        proc = subprocess.run(cmd, timeout=hard)
        status = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"killed after the {hard:.0f} s hard limit"
    row = json.loads(result.read_text()) if result.exists() else None
    if row is None:
        return {"model": name, "deterministic": deterministic, "error": status or "no result"}
    if status is not None and "error" not in row:
        row["error"] = status + (" (figures of the epochs it finished)" if row.get("epochs") else "")
    if row.get("partial") and row.get("epochs"):  # killed mid-fit: what its finished epochs say
        seconds = [e["seconds"] for e in row["epochs"]]
        row["seconds_per_epoch"] = statistics.median(seconds[args.warmup:] or seconds)
    return row


if __name__ == "__main__":
    main()
