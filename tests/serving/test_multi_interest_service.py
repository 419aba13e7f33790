"""Multi-interest serving: bundle round trip, MultiInterestService (same answers as the offline
``recommend`` path, merge rules, exclusions), the HTTP layer and the pyfunc on a multi-interest bundle."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from kgrec.features.sequences import SequenceSplit
from kgrec.models.sequential.comirec_sa import ComiRecSA
from kgrec.models.sequential.config import SequentialModelConfig
from kgrec.models.sequential.multi_interest import recommend
from kgrec.models.sequential_evaluation import category_matrix
from kgrec.models.training.sequential import fit_sequential
from kgrec.models.training.trainer import torch_threads
from kgrec.serving.bundle import bundle_kind
from kgrec.serving.candidates import InvalidRequestError
from kgrec.serving.index import IndexConfig, build_and_measure, build_index
from kgrec.serving.multi_interest import MultiInterestBundle, MultiInterestService
from kgrec.serving.service import bundle_loader, create_app

N_ITEMS, GROUP, K = 40, 10, 3


def train_config(**overrides) -> SequentialModelConfig:
    """A sequential training config with the loop defaults these tests were written for."""
    return SequentialModelConfig(**{"learning_rate": 3e-3, "num_negatives": 256, **overrides})


def _split(seed: int = 0) -> SequenceSplit:
    """Four item groups of ten; each user alternates between two groups (two planted interests)."""
    rng = np.random.default_rng(seed)

    def seq(n: int) -> np.ndarray:
        mine = rng.choice(4, 2, replace=False)
        return np.array([GROUP * mine[int(rng.integers(2))] + int(rng.integers(GROUP)) for _ in range(n)])

    train = [seq(16) for _ in range(120)]
    held = [seq(16) for _ in range(20)]
    return SequenceSplit(
        num_users=140, num_items=N_ITEMS, train_users=np.arange(120), train_sequences=train,
        valid_users=np.arange(120, 140), valid_inputs=[s[:12] for s in held],
        valid_targets=[s[12:] for s in held], test_users=np.arange(0), test_inputs=[], test_targets=[],
        seed=seed,
    )


@pytest.fixture(scope="module")
def mi_bundle() -> MultiInterestBundle:
    split = _split()
    model = ComiRecSA(N_ITEMS, embedding_dim=8, num_interests=K, max_length=6)
    config = train_config(epochs=3, patience=3, num_negatives=20, batch_size=128,
                                   learning_rate=1e-2, ks=(5,), selection_metric="recall@5", seed=1)
    with torch_threads(1):
        fit_sequential(model, split, config)
    rng = np.random.default_rng(1)
    iperm = rng.permutation(N_ITEMS)  # id maps in shuffled row order
    items = pl.DataFrame({
        "item_id": [f"m{i}" for i in iperm], "item_idx": iperm.astype(np.int32),
        "name": [f"movie {i}" for i in iperm],
        "categories": [[f"g{i // GROUP}"] for i in iperm],
    })
    histories = list(split.train_sequences) + [np.concatenate([a, b]) for a, b in
                                               zip(split.valid_inputs, split.valid_targets)]
    users = pl.DataFrame({"user_id": [f"u{u}" for u in range(140)], "user_idx": np.arange(140, dtype=np.int32)})
    meta = {"model": "comirec_sa", "dataset": "synthetic", "snapshot_hash": "feed"}
    return MultiInterestBundle.from_model(model, items, users, histories, meta)


@pytest.fixture(scope="module")
def mi_service(mi_bundle) -> MultiInterestService:
    return MultiInterestService(mi_bundle)


def _idx(ids: list[str]) -> list[int]:
    return [int(i[1:]) for i in ids]


def test_bundle_round_trip(tmp_path, mi_bundle, mi_service):
    out = mi_bundle.write(tmp_path / "b")
    assert bundle_kind(out) == "multi_interest"
    loaded = MultiInterestBundle.load(out)
    assert loaded.meta["kind"] == "multi_interest" and loaded.meta["num_interests"] == K
    assert loaded.meta["merge_rule"] == "max" and loaded.meta["max_length"] == 6
    assert loaded.items["categories"].to_list()[0] == mi_bundle.items["categories"].to_list()[0]
    assert all(np.array_equal(a, b) for a, b in zip(loaded.histories, mi_bundle.histories))
    again = MultiInterestService(loaded)
    for user in ("u3", "u130"):
        assert again.for_user(user, 7).item_ids == mi_service.for_user(user, 7).item_ids


def test_mixture_readout_model_round_trips_and_serves_its_own_rule(tmp_path, mi_bundle):
    model = ComiRecSA(N_ITEMS, embedding_dim=8, num_interests=K, max_length=6, readout="mixture",
                      merge_rule="mixture", normalize_interests=True)
    config = train_config(epochs=2, patience=2, num_negatives=0, batch_size=128,
                                   learning_rate=1e-2, ks=(5,), selection_metric="recall@5", seed=1)
    fit_sequential(model, _split(), config)
    meta = {"model": "comirec_sa", "dataset": "synthetic", "snapshot_hash": "feed"}
    bundle = MultiInterestBundle.from_model(model, mi_bundle.items, mi_bundle.users, mi_bundle.histories, meta)
    loaded = MultiInterestBundle.load(bundle.write(tmp_path / "b"))
    assert loaded.meta["merge_rule"] == "mixture"
    assert loaded.model.readout_kind == "mixture" and loaded.model.normalize_interests
    service = MultiInterestService(loaded)
    history = [3, 14, 15, 27, 3, 8]
    got = service.for_history([f"m{i}" for i in history], 9)
    assert got.merge == "mixture"
    items, scores, interest = recommend(model, [history], 9).row(0)
    assert _idx(got.item_ids) == items.tolist() and got.interest.tolist() == interest.tolist()
    assert np.allclose(got.scores, scores, atol=1e-4)


def _categories(bundle: MultiInterestBundle) -> np.ndarray:
    return category_matrix(bundle.items.sort("item_idx")["categories"].to_list())[0]


@pytest.mark.parametrize("rule", ["max", "weighted", "mixture", "controllable"])
def test_service_equals_offline_recommend(mi_service, mi_bundle, rule):
    """The served answer is the offline evaluation path's answer (same model, merge and exclusion)."""
    model = mi_bundle.model
    cats = _categories(mi_bundle)
    rng = np.random.default_rng(2)
    for _ in range(10):
        history = rng.choice(N_ITEMS, int(rng.integers(1, 15)), replace=True).tolist()
        got = mi_service.for_history([f"m{i}" for i in history], 9, merge=rule)
        expected = recommend(model, [history], 9, rule=rule, categories=cats)
        items, scores, interest = expected.row(0)
        assert _idx(got.item_ids) == items.tolist()
        assert got.interest.tolist() == interest.tolist()
        assert np.allclose(got.scores, scores, atol=1e-5)
    u = mi_bundle.users.filter(pl.col("user_id") == "u7")["user_idx"][0]
    expected = recommend(model, [mi_bundle.histories[u].tolist()], 9, rule=rule, categories=cats).row(0)[0]
    assert _idx(mi_service.for_user("u7", 9, merge=rule).item_ids) == expected.tolist()


def test_controllable_merge_spreads_categories_with_the_models_or_the_requests_lambda(mi_bundle):
    service = MultiInterestService(mi_bundle)
    cats = _categories(mi_bundle)
    mi_bundle.model.diversity_weight = 2.0
    try:
        history = ["m1", "m2", "m3", "m4", "m5", "m6"]  # one group: the max list stays near it
        plain = service.for_history(history, 12, merge="max")
        own = service.for_history(history, 12, merge="controllable")
        assert own.diversity == 2.0 and own.merge == "controllable"
        expected = recommend(mi_bundle.model, [[1, 2, 3, 4, 5, 6]], 12, rule="controllable", categories=cats)
        assert _idx(own.item_ids) == expected.row(0)[0].tolist()
        # lambda 0 is the max list; a larger lambda spreads the list over more genres
        assert service.for_history(history, 12, merge="controllable", diversity=0).item_ids == plain.item_ids
        def genres(result):
            return len({i // GROUP for i in _idx(result.item_ids)[:4]})
        assert genres(service.for_history(history, 12, merge="controllable", diversity=50.0)) > genres(plain)
    finally:
        mi_bundle.model.diversity_weight = 0.0


def test_controllable_merge_needs_categories(mi_bundle):
    bare = MultiInterestBundle.from_model(
        mi_bundle.model, mi_bundle.items.drop("categories"), mi_bundle.users, mi_bundle.histories, mi_bundle.meta
    )
    service = MultiInterestService(bare)
    assert "controllable" not in service.info()["merge_rules"]
    with pytest.raises(InvalidRequestError, match="categories"):
        service.for_history(["m1"], 5, merge="controllable")
    with pytest.raises(InvalidRequestError, match="controllable merge only"):
        service.for_history(["m1"], 5, merge="max", diversity=1.0)


@pytest.mark.parametrize("index_kind", ["flat", "hnsw"])
@pytest.mark.parametrize("rule", ["max", "weighted", "mixture", "controllable"])
def test_never_duplicates_or_history_items(mi_bundle, index_kind, rule):
    index = build_index(mi_bundle.item_embeddings, IndexConfig(kind=index_kind, hnsw_m=4, hnsw_ef_search=8))
    service = MultiInterestService(mi_bundle, index)
    rng = np.random.default_rng(3)
    for _ in range(25):
        history = [f"m{i}" for i in rng.choice(N_ITEMS, int(rng.integers(1, 30)), replace=True)]
        k = int(rng.integers(1, N_ITEMS))
        result = service.for_history(history + ["ghost"], k, merge=rule)
        ids = result.item_ids
        assert len(ids) == len(set(ids)) == min(k, N_ITEMS - len(set(history)))
        assert not set(ids) & set(history)
        assert result.unknown_item_ids == ["ghost"]
        assert ((result.interest >= 0) & (result.interest < K)).all()
        assert len(result.interest_weights) == K and result.merge == rule
    for user in ("u0", "u55", "u139"):
        result = service.for_user(user, 20, merge=rule)
        seen = {f"m{i}" for i in service.seen_items(user).tolist()}
        assert len(set(result.item_ids)) == len(result.item_ids) == min(20, N_ITEMS - len(seen))
        assert not seen & set(result.item_ids)


def test_only_the_last_max_length_items_feed_the_model(mi_service):
    old, recent = [f"m{i}" for i in range(0, 10)], [f"m{i}" for i in range(20, 26)]  # L = 6
    a = mi_service.for_history(old + recent, 5)
    b = mi_service.for_history(list(reversed(old)) + recent, 5)
    assert a.item_ids == b.item_ids  # the same window and the same excluded set
    assert mi_service.for_history(recent + old, 5).item_ids != a.item_ids  # order matters


@pytest.fixture(scope="module")
def mi_client(mi_service):
    info = {"name": "kgrec-seq", "version": "2", "alias": "champion", "model": "comirec_sa"}
    with TestClient(create_app(lambda: (mi_service, info))) as c:
        yield c


def test_http_history_and_user(mi_client, mi_service):
    model = mi_client.get("/v1/model").json()
    assert model["kind"] == "multi_interest" and model["num_interests"] == K
    assert model["merge_rule"] == "max" and model["n_items"] == N_ITEMS and model["index_kind"] == "flat"
    history = ["m1", "m12", "m3", 14, "ghost"]
    r = mi_client.post("/v1/candidates", json={"item_ids": history, "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["merge"] == "max" and len(body["interest_weights"]) == K
    assert body["unknown_item_ids"] == ["14", "ghost"]
    cands = body["candidates"]
    assert len(cands) == 10 and set(cands[0]) == {"item_id", "score", "name", "interest"}
    assert not {"m1", "m12", "m3"} & {c["item_id"] for c in cands}
    assert [c["item_id"] for c in cands] == mi_service.for_history(history, 10).item_ids
    r = mi_client.post("/v1/candidates", json={"item_ids": history, "k": 10, "merge": "weighted"})
    assert r.status_code == 200 and r.json()["merge"] == "weighted"
    r = mi_client.get("/v1/users/u4/candidates", params={"k": 8, "merge": "weighted"})
    assert r.status_code == 200, r.text
    assert [c["item_id"] for c in r.json()["candidates"]] == mi_service.for_user("u4", 8, "weighted").item_ids
    r = mi_client.get("/v1/users/u4/candidates", params={"k": 8, "merge": "controllable", "diversity": 3})
    assert r.status_code == 200, r.text
    assert r.json()["merge"] == "controllable" and r.json()["diversity"] == 3.0
    assert [c["item_id"] for c in r.json()["candidates"]] == mi_service.for_user(
        "u4", 8, "controllable", diversity=3.0
    ).item_ids


@pytest.mark.parametrize(
    "request_args, status, message",
    [
        (("post", "/v1/candidates", {"json": {"item_ids": ["m1"], "merge": "mmr"}}), 422, "merge"),
        (("post", "/v1/candidates", {"json": {"item_ids": ["m1"], "k": 5, "diversity": 1.0}}), 422, "controllable merge only"),
        (("post", "/v1/candidates", {"json": {"item_ids": ["m1"], "merge": "controllable", "diversity": -1}}),
         422, "diversity"),
        (("get", "/v1/users/u4/candidates", {"params": {"merge": "controllable", "diversity": "lots"}}),
         422, "diversity"),
        (("get", "/v1/users/u4/candidates", {"params": {"k": 5, "merge": "mmr"}}), 422, "merge"),
        (("post", "/v1/candidates", {"json": {"item_ids": ["zz", "yy"], "k": 5}}), 422, "none of the item ids"),
        (("post", "/v1/candidates", {"json": {"item_ids": ["m1"], "k": 41}}), 422, "catalogue size 40"),
        (("post", "/v1/candidates", {"json": {"item_ids": []}}), 422, "item_ids"),
        (("get", "/v1/users/nobody/candidates", {"params": {"k": 5}}), 404, "unknown user"),
        (("get", "/v1/users/u4/candidates/m1/explain", {}), 404, "KGAT"),
    ],
)
def test_http_errors_are_4xx_with_a_message(mi_client, request_args, status, message):
    method, url, kwargs = request_args
    r = getattr(mi_client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.text


def test_bundle_loader_and_pyfunc_on_a_multi_interest_bundle(tmp_path, mi_bundle, mi_service):
    from kgrec.serving.index import save_index
    from kgrec.serving.pyfunc import TopKRecommender

    out = mi_bundle.write(tmp_path / "bundle")
    index, info = build_and_measure(mi_bundle.item_embeddings, IndexConfig(kind="flat"),
                                    queries=mi_bundle.sample_queries())
    save_index(index, out / "index", info)
    with TestClient(create_app(bundle_loader(out, {"name": "m", "version": "1"}))) as c:
        ready = c.get("/readyz").json()["model"]
        assert ready["kind"] == "multi_interest" and ready["model"] == "comirec_sa"
        assert c.post("/v1/candidates", json={"item_ids": ["m2"], "k": 5}).status_code == 200

    model = TopKRecommender()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(out)}))
    import pandas as pd

    pred = model.predict(None, pd.DataFrame({"user_id": ["u1", "ghost"]}), params={"k": 6})
    assert pred["known"].tolist() == [True, False]
    assert list(pred.loc[0, "item_ids"]) == mi_service.for_user("u1", 6).item_ids
    assert list(pred.loc[1, "item_ids"]) == []
