"""Cold start, served: held-out ml-100k movies posted to a live ``kgrec serve`` with their Freebase
facts (``POST /v1/items``), then retrieved for the users who rated them.

1. Ingest ``--dataset`` (ml-100k) and draw the protocol's cold-start split
   (:func:`kgrec.features.cold_start.cold_start_split`: 20 % of the KG-linked items with an
   interaction, seed 2020). The catalogue the model knows is the snapshot WITHOUT the cold movies
   (:func:`~kgrec.features.cold_start.without_items`: no row, no rating, no triple); its ratings are
   split per user 80/10/10 (seed 2020).
2. Train KGAT on it (``--epochs``; default: KGAT's own schedule with early stopping) as a tracked
   run in ``--workdir``'s embedded MLflow store, export the bundle (with its inductive payload: the
   ego estimate chosen on validation), register it, publish its index, promote it to ``champion``.
3. Start ``kgrec serve`` on it (a child process, ``--workers``, token in ``$KGREC_SERVE_TOKEN``).
4. POST each of ``--items`` cold movies (0: all of them; else a seeded sample) with its facts from
   the full snapshot's KG: ``(relation, entity)`` where the movie is the head, ``(rev_relation,
   entity)`` where it is the tail; facts towards other cold movies are left out (they are not in the
   model's graph). Then, for every user with a cold rating of a posted movie, ``GET
   /v1/users/{id}/candidates?k=K`` (K = ``--k``, 20): the served top-K among all unseen items (warm
   and posted).
5. Figures over the (user, posted movie) pairs of the cold test set: the hit rate (a pair is a hit
   when the movie is in the user's served top-K; = micro Recall@K of the cold ratings) and the mean
   per-user Recall@K. Baselines on the same candidates (warm items the user has not rated + the
   posted movies) and the same pairs, computed offline:

   * ``popularity`` -- training rating counts. A posted movie has none, so it ranks among the
     zero-count items at best: popularity can never retrieve a new item (its figure is ~0 by
     construction, shown for the record);
   * ``random insertion`` -- a posted movie put at a uniformly random rank among the user's
     candidates: expected hit rate = mean of K / |candidates(u)|;
   * ``kg-knn`` -- content item-kNN over the KG (IDF-weighted neighbour sets, sum over the user's
     training items; :func:`kgrec.models.cold_start.kg_item_knn_scores`), the one baseline that CAN
     score a new item, from its facts;
   * ``served (offline check)`` -- the bundle's user vectors against its item vectors plus the
     posted movies' vectors (the bundle's embedder): what the service should answer; equal to the
     served figure up to ties.

   Each offline row also has its "posted only" figures: the posted movies ranked among themselves
   (no warm item competes; random insertion is then K / number posted), which separates whether a
   vector orders the new movies well from whether it lifts them above the warm catalogue.
6. The same GETs with ``fresh=F`` (``--fresh``, 2): up to F of the K slots go to the best-scored
   posted movies the ranking left out (:mod:`kgrec.serving.candidates`, "Fresh slots"); a pair is then
   a hit when the movie is in the top K of all items or in the top F of the posted ones. Every offline
   row gets that figure too, and ``random scores`` (uniform random scores, mean of 5 draws) is the
   chance level of all three figures.

Prints one example POST and GET answer, the figures, and one JSON object (last line).

    .venv/bin/python benchmarks/cold_start_serving.py [--epochs N] [--items 0] [--k 20] [--fresh 2]
        [--workers 1] [--workdir DIR] [--threads 1] [--json]
    .venv/bin/python benchmarks/cold_start_serving.py --epochs 2 --items 8     # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

MODEL_NAME = "kgrec-cold-start-serving"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


# ---------------------------------------------------------------------------- data
def prepare(dataset: str, workdir: Path, seed: int):
    """The full snapshot, the cold-start split and the catalogue without the cold movies (saved)."""
    from kgrec.features.cold_start import cold_start_split, kg_linked_items, without_items
    from kgrec.features.ingest import ingest
    from kgrec.features.overlay import save_snapshot
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import load_spec

    full = load_snapshot(ingest(load_spec(dataset), workdir / "snapshots").snapshot_dir)
    split = cold_start_split(full.interactions, kg_linked_items(full), fraction=0.2, seed=seed)
    warm = load_snapshot(save_snapshot(without_items(full, split.cold_items), workdir / "snapshots"))
    return full, split, warm


def facts_of(full, item: int, cold: set[int]) -> list[dict[str, str]]:
    """The movie's KG facts by raw name (module docstring, step 4)."""
    names = full.relation_names()
    items = full.items.sort("item_idx")["entity_id"].to_list()
    entities = full.entities.sort("entity_idx")["entity_id"].to_list()

    def entity(node: int) -> str:
        return items[node] if node < full.n_items else entities[node - full.n_items]

    kg = full.kg.filter((pl.col("head") == item) | (pl.col("tail") == item))
    out = []
    for h, r, t in kg.iter_rows():
        if h == item and t not in cold:
            out.append({"relation": names[r], "entity": entity(t)})
        elif t == item and h not in cold:
            out.append({"relation": "rev_" + names[r], "entity": entity(h)})
    return out


# ---------------------------------------------------------------------------- train + register
def train_and_register(warm, workdir: Path, epochs: int | None, seed: int, time_cap: float | None = None) -> dict:
    from kgrec.features.dataset import InteractionData
    from kgrec.features.split import random_split
    from kgrec.models.config import TrainConfig
    from kgrec.models.spec import get_spec
    from kgrec.models.tracking import registry
    from kgrec.models.tracking.experiment import evaluate_and_log, train_and_log
    from kgrec.models.tracking.settings import TrackingSettings
    from kgrec.serving.export import publish_index_for, register_trained

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("KGREC_TRACKING_URI", None)
    registry.configure_tracking(TrackingSettings(workdir=workdir, tracking_uri=None))
    data = InteractionData.from_snapshot(warm, random_split(warm.interactions, seed=seed))
    config = TrainConfig.for_model("kgat", epochs=epochs, seed=seed, time_budget_s=time_cap)
    started = time.perf_counter()
    trained = train_and_log(get_spec("kgat"), config, data)
    fit_s = time.perf_counter() - started
    evaluate_and_log(trained)
    started = time.perf_counter()
    version, bundle_dir = register_trained(trained, workdir / "bundles", MODEL_NAME)
    with registry.pending_version(MODEL_NAME, version):
        publish_index_for(trained, version, bundle_dir)
        registry.promote(MODEL_NAME, version)
    meta = json.loads((bundle_dir / "meta.json").read_text())
    return {"trained": trained, "data": data, "bundle_dir": bundle_dir, "version": str(version.version),
            "fit_seconds": round(fit_s, 1), "register_seconds": round(time.perf_counter() - started, 1),
            "epochs_run": len(trained.fit.history), "best_epoch": trained.fit.best_epoch,
            "capped": trained.fit.capped,
            "warm_test_recall@20": trained.test_metrics.get("recall@20"), "item_embedding": meta.get("item_embedding")}


# ---------------------------------------------------------------------------- serve, post, retrieve
def serve_and_measure(workdir: Path, full, warm, split, posted: list[int], k: int, fresh: int, workers: int,
                      threads: int) -> dict:
    from kgrec.serving.process import service_process, workdir_env

    cold = set(split.cold_items.tolist())
    items = full.items.sort("item_idx")
    item_ids, names = items["item_id"].to_list(), items["name"].to_list()
    user_ids = full.users.sort("user_idx")["user_id"].to_list()
    token = secrets.token_hex(16)
    env = workdir_env(workdir) | {"KGREC_SERVE_TOKEN": token, "OMP_NUM_THREADS": str(threads),
                                  "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    args = ["--no-ranker", "--poll-interval", "0", "--workers", str(workers), "--threads", str(threads),
            "--no-access-log"]
    auth = {"Authorization": f"Bearer {token}"}
    truth = split.cold_test.filter(pl.col("item_idx").is_in(posted))
    users = sorted(set(truth["user_idx"].to_list()))
    out: dict = {"posted": len(posted), "pairs": truth.height, "users": len(users)}
    log_path = workdir / "serve.log"
    with service_process(MODEL_NAME, env, extra_args=args, ready_timeout=300, log_path=log_path) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            post_ms, answers = [], []
            for item in posted:
                body = {"item_id": item_ids[item], "name": names[item], "facts": facts_of(full, item, cold)}
                t0 = time.perf_counter()
                r = client.post("/v1/items", json=body, headers=auth)
                post_ms.append((time.perf_counter() - t0) * 1e3)
                if r.status_code != 201:
                    raise SystemExit(f"POST /v1/items {item_ids[item]} -> {r.status_code}: {r.text[:500]}")
                answers.append(r.json())
            out["example_post"] = {"request": {**body, "facts": body["facts"][:3] + [f"... {len(body['facts'])} facts"]},
                                   "answer": answers[-1]}
            out["post_ms_p50"] = round(float(np.median(post_ms)), 2)
            out["post_ms_max"] = round(float(np.max(post_ms)), 2)
        if workers > 1:  # every worker applies the others' posts at its next overlay poll (1 s)
            time.sleep(2.5)
        counts = []
        for _ in range(4 * workers):  # fresh connections spread over the workers
            with httpx.Client(base_url=url, timeout=30) as connection:
                counts.append(connection.get("/v1/model").json()["posted_items"]["count"])
        out["posted_count_seen_by_workers"] = sorted(set(counts))
        served: dict[int, list[str]] = {}
        served_fresh: dict[int, list[str]] = {}
        mine = {item_ids[i] for i in posted}
        example = None
        t0 = time.perf_counter()
        with httpx.Client(base_url=url, timeout=30) as client:
            for u in users:
                r = client.get(f"/v1/users/{user_ids[u]}/candidates", params={"k": k})
                r.raise_for_status()
                served[u] = [c["item_id"] for c in r.json()["candidates"]]
                if example is None and mine & set(served[u]):  # shown: a user who gets a posted movie
                    example = r.json()
                last = r.json()
            out["get_seconds"] = round(time.perf_counter() - t0, 2)
            example_fresh = None
            for u in users:
                r = client.get(f"/v1/users/{user_ids[u]}/candidates", params={"k": k, "fresh": fresh})
                r.raise_for_status()
                served_fresh[u] = [c["item_id"] for c in r.json()["candidates"]]
                if example_fresh is None and u in served and set(served_fresh[u]) - set(served[u]):
                    example_fresh = r.json()
        example = example or last
        out["example_get"] = {"user_id": example["user_id"], "k": example["k"], "model": example["model"],
                              "candidates": [c for c in example["candidates"]][:5],
                              "posted_in_top_k": [(p, c["item_id"], c["name"]) for p, c in enumerate(example["candidates"])
                                                  if c["item_id"] in mine]}
        if example_fresh is not None:
            out["example_get_fresh"] = {"user_id": example_fresh["user_id"], "k": k, "fresh": fresh,
                                        "candidates": example_fresh["candidates"][-fresh - 1:]}
    index_of = {iid: i for i, iid in enumerate(item_ids)}
    out["served"] = hit_figures(truth, {u: [index_of[i] for i in ids] for u, ids in served.items()})
    out["served_fresh"] = hit_figures(truth, {u: [index_of[i] for i in ids] for u, ids in served_fresh.items()})
    return out


def hit_figures(truth: pl.DataFrame, top: dict[int, list[int]]) -> dict:
    """Hit rate over (user, item) pairs and mean per-user recall of ``top`` (original item_idx lists)."""
    hits, per_user = 0, {}
    for u, i in truth.select("user_idx", "item_idx").iter_rows():
        hit = i in set(top.get(u, ()))
        hits += hit
        got, n = per_user.get(u, (0, 0))
        per_user[u] = (got + hit, n + 1)
    return {"hit_rate": round(hits / max(truth.height, 1), 4), "hits": hits,
            "user_recall": round(float(np.mean([g / n for g, n in per_user.values()])) if per_user else 0.0, 4)}


# ---------------------------------------------------------------------------- offline baselines
def baselines(full, warm, split, registered: dict, posted: list[int], k: int, fresh: int, seed: int) -> dict:
    """The module docstring's baselines, in the full snapshot's item index space."""
    from kgrec.models.cold_start import kg_item_knn_scores, popularity_scores
    from kgrec.serving.bundle import RetrievalBundle

    n_users, n_items = full.n_users, full.n_items
    index_of = {iid: i for i, iid in enumerate(full.items.sort("item_idx")["item_id"].to_list())}
    to_full = np.array([index_of[i] for i in warm.items.sort("item_idx")["item_id"].to_list()], dtype=np.int64)
    data = registered["data"]

    def in_full(matrix: sp.csr_matrix) -> sp.csr_matrix:
        coo = matrix.tocoo()
        return sp.csr_matrix((coo.data, (coo.row, to_full[coo.col])), shape=(n_users, n_items))

    train = in_full(data.train)
    seen = in_full((data.train + data.valid + data.test).tocsr())  # what the service excludes
    mask = np.zeros((n_users, n_items), dtype=bool)  # True: not a candidate
    cold = split.cold_items
    mask[:, np.setdiff1d(cold, posted)] = True
    mask[seen.nonzero()] = True
    truth = split.cold_test.filter(pl.col("item_idx").is_in(posted))
    users = np.array(sorted(set(truth["user_idx"].to_list())), dtype=np.int64)

    only_posted = mask.copy()
    only_posted[:, to_full] = True  # the posted-only ranking: no warm item is a candidate

    def both(scores: np.ndarray) -> dict:
        """The figures of the all-items ranking, of the posted-movies-only one (``posted_only``) and
        of the all-items top K with ``fresh`` slots (the top K plus the posted top ``fresh``)."""
        tops = {}
        for key, excluded, depth in (("all", mask, k), ("posted_only", only_posted, k), ("fresh", only_posted, fresh)):
            ranked = np.where(excluded[users], -np.inf, scores)
            best = np.argsort(-ranked, axis=1, kind="stable")[:, :depth]
            tops[key] = {int(u): row.tolist() for u, row in zip(users, best)}
        with_fresh = {u: tops["all"][u] + tops["fresh"][u] for u in tops["all"]}
        return {**hit_figures(truth, tops["all"]), "posted_only": hit_figures(truth, tops["posted_only"]),
                "fresh": hit_figures(truth, with_fresh)}

    u_t = torch.from_numpy(users)
    out = {"popularity": both(popularity_scores(train, seed=seed)(u_t).numpy())}
    pairs = truth["user_idx"].to_list()
    random_rows = {}
    for key, excluded in (("all", mask), ("posted_only", only_posted)):
        rate = {int(u): min(1.0, k / c) for u, c in zip(users, (~excluded[users]).sum(1))}
        random_rows[key] = {"hit_rate": round(float(np.mean([rate[u] for u in pairs])), 4),
                            "user_recall": round(float(np.mean(list(rate.values()))), 4), "expected": True}
    out["random insertion"] = {**random_rows["all"], "posted_only": random_rows["posted_only"]}
    rng = np.random.default_rng(seed)
    draws = [both(rng.random((len(users), n_items))) for _ in range(5)]

    def mean_of(rows: list[dict]) -> dict:
        return {key: (mean_of([r[key] for r in rows]) if isinstance(rows[0][key], dict)
                      else round(float(np.mean([r[key] for r in rows])), 4)) for key in rows[0]}

    out["random scores"] = mean_of(draws)
    knn = kg_item_knn_scores(full.kg, train, full.n_items + full.n_entities, "sum", seed=seed)
    out["kg-knn"] = both(knn(u_t).numpy())
    bundle = RetrievalBundle.load(registered["bundle_dir"])
    items = np.zeros((n_items, bundle.dim), dtype=np.float32)
    items[to_full] = bundle.item_embeddings
    cold_set = set(cold.tolist())
    resolved = [bundle.inductive.resolve([(f["relation"], f["entity"]) for f in facts_of(full, int(i), cold_set)])
                for i in posted]
    items[np.asarray(posted)] = bundle.inductive.embed(resolved)
    out["served (offline check)"] = both(bundle.user_embeddings[users] @ items.T)
    return out


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--epochs", type=int, help="KGAT's maximum epochs (default: its own, early-stopped)")
    parser.add_argument("--time-cap", type=float, metavar="SECONDS",
                        help="KGAT's training seconds at most (the best validation epoch is served; the "
                        "output says 'capped')")
    parser.add_argument("--items", type=int, default=0, help="cold movies posted (0: all)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--fresh", type=int, default=2, help="GET ...?fresh=F: slots reserved for posted movies")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--workers", type=int, default=1, help="kgrec serve --workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and per service worker")
    parser.add_argument("--workdir", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = machine()
    with tempfile.TemporaryDirectory(prefix="kgrec-cold-serve-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        full, split, warm = prepare(args.dataset, workdir, args.seed)
        cold = split.cold_items
        rng = np.random.default_rng(args.seed)
        posted = cold if not args.items or args.items >= len(cold) else np.sort(rng.choice(cold, args.items, replace=False))
        posted = [int(i) for i in posted]
        registered = train_and_register(warm, workdir, args.epochs, args.seed, args.time_cap)
        t1 = time.perf_counter()
        served = serve_and_measure(workdir, full, warm, split, posted, args.k, args.fresh, args.workers, args.threads)
        t2 = time.perf_counter()
        offline = baselines(full, warm, split, registered, posted, args.k, args.fresh, args.seed)
        figures = {
            "dataset": args.dataset, "machine": where, "cold_items": int(len(cold)),
            "catalogue_items": warm.n_items, "k": args.k,
            **{key: registered[key] for key in ("version", "epochs_run", "best_epoch", "capped", "fit_seconds",
                                                "register_seconds", "warm_test_recall@20", "item_embedding")},
            **{key: value for key, value in served.items() if key not in ("served", "served_fresh")},
            "results": {"served": {**served["served"], "fresh": served["served_fresh"]}, **offline},
            "seconds": {"prepare_train_register": round(t1 - t0, 1), "serve_post_get": round(t2 - t1, 1),
                        "total": round(time.perf_counter() - t0, 1)},
        }
    print(f"machine: {figures['machine']}")
    print(f"{args.dataset}: {figures['cold_items']} cold movies held out, catalogue of {figures['catalogue_items']}; "
          f"KGAT v{figures['version']} {figures['epochs_run']} epochs (best {figures['best_epoch']}"
          f"{', capped by --time-cap' if figures['capped'] else ''}), warm test "
          f"Recall@20 {figures['warm_test_recall@20']:.4f}; posted items embedded with {figures['item_embedding']}")
    print("example POST /v1/items:", json.dumps(served["example_post"]["request"], ensure_ascii=False))
    print("  ->", json.dumps(served["example_post"]["answer"], ensure_ascii=False))
    print("example GET /v1/users/{id}/candidates (top 5 shown):", json.dumps(served["example_get"], ensure_ascii=False))
    print(f"{served['posted']} movies posted (POST p50 {served['post_ms_p50']} ms, max {served['post_ms_max']} ms); "
          f"{served['pairs']} cold ratings of {served['users']} users; GET k={args.k} for each user in "
          f"{served['get_seconds']} s; posted counts seen by the workers: {served['posted_count_seen_by_workers']}")
    if "example_get_fresh" in served:
        print(f"example GET ...?k={args.k}&fresh={args.fresh} (last {args.fresh + 1} shown):",
              json.dumps(served["example_get_fresh"], ensure_ascii=False))
    print("\nall items = the served ranking (warm unseen items + posted movies); posted only = the posted movies "
          f"ranked among themselves (offline diagnostic); fresh={args.fresh}: the all-items top {args.k} with "
          f"{args.fresh} slots reserved for posted movies")
    print(f"| ranking | hit rate@{args.k} (pairs) | mean user recall@{args.k} | posted only: hit rate | "
          f"posted only: user recall | fresh={args.fresh}: hit rate | fresh={args.fresh}: user recall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in figures["results"].items():
        note = " (expected)" if row.get("expected") else ""
        cells = [f"{row['hit_rate']:.4f}{note}", f"{row['user_recall']:.4f}"]
        for key in ("posted_only", "fresh"):
            part = row.get(key)
            cells += [f"{part['hit_rate']:.4f}{note}", f"{part['user_recall']:.4f}"] if part else ["-", "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nseconds: {figures['seconds']}")
    if args.json:
        print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
