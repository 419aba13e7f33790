"""Two-stage serving: retrieval top-N re-ranked by KCAN, in the library and over HTTP."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
from fastapi.testclient import TestClient
from kgrec.features.dataset import InteractionData
from kgrec.models.rankers.kcan import KCANConfig, build_kcan
from kgrec.serving.bundle import BundleError, RetrievalBundle, bundle_kind
from kgrec.serving.candidates import CandidateService, InvalidRequestError, UnknownUserError
from kgrec.serving.ranking import RankerBundle, TwoStageService, UnknownRankerUserError
from kgrec.serving.service import create_app

N_USERS, N_ITEMS = 60, 120


@pytest.fixture(scope="module")
def data() -> InteractionData:
    rng = np.random.default_rng(1)
    rows, cols = [], []
    for u in range(N_USERS):
        items = (u % 4) * 30 + rng.choice(30, 8, replace=False)
        rows += [u] * 8
        cols += items.tolist()
    train = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))
    empty = sp.csr_matrix((N_USERS, N_ITEMS), dtype=np.float32)
    return InteractionData(N_USERS, N_ITEMS, train, empty, empty, snapshot=None, split=None)


@pytest.fixture(scope="module")
def ranker(data) -> RankerBundle:
    torch.manual_seed(0)
    config = KCANConfig(embedding_dim=16, layer_sizes=(16,), relation_dim=16, neighbours_per_node=3,
                        local_dim=8, tower_dim=16)
    model = build_kcan(config, data).eval()
    # the ranker's raw ids map to its indices in reverse, the retriever's in order: the service
    # must join the two stages on raw ids, never on indices
    users = pl.DataFrame({"user_id": [f"u{N_USERS - 1 - i}" for i in range(N_USERS)],
                          "user_idx": np.arange(N_USERS)})
    items = pl.DataFrame({"item_id": [f"i{N_ITEMS - 1 - i}" for i in range(N_ITEMS)],
                          "item_idx": np.arange(N_ITEMS)})
    return RankerBundle(model, users, items, {"model": "kcan", "alpha": 0.5, "num_candidates": 50})


@pytest.fixture(scope="module")
def retrieval(data) -> CandidateService:
    rng = np.random.default_rng(2)
    bundle = RetrievalBundle(
        user_embeddings=rng.standard_normal((N_USERS, 8)).astype(np.float32),
        item_embeddings=rng.standard_normal((N_ITEMS, 8)).astype(np.float32),
        seen=data.train,
        users=pl.DataFrame({"user_id": [f"u{i}" for i in range(N_USERS)], "user_idx": np.arange(N_USERS)}),
        items=pl.DataFrame({"item_id": [f"i{i}" for i in range(N_ITEMS)], "item_idx": np.arange(N_ITEMS),
                            "name": [f"item {i}" for i in range(N_ITEMS)]}),
        meta={"model": "bprmf"},
    )
    return CandidateService(bundle)


@pytest.fixture(scope="module")
def two_stage(retrieval, ranker) -> TwoStageService:
    return TwoStageService(retrieval, ranker)


def _kcan_score(ranker: RankerBundle, user_id: str, item_id: str) -> float:
    u = ranker.users.filter(pl.col("user_id") == user_id)["user_idx"][0]
    i = ranker.items.filter(pl.col("item_id") == item_id)["item_idx"][0]
    with torch.no_grad():
        return float(ranker.model.score_pairs(torch.tensor([u]), torch.tensor([i]))[0])


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def test_two_stage_reranks_the_retrieval_top_n_by_the_fused_score(two_stage, retrieval, ranker):
    retrieved = retrieval.for_user("u7", 50)
    result = two_stage.for_user("u7", k=10, n=50)
    assert len(result.item_ids) == 10 and result.num_candidates == 50
    assert set(result.item_ids) <= set(retrieved.item_ids)
    # both scores belong to the item: retrieval rank/score from stage one, KCAN score by raw id
    for item_id, rank, r_score, k_score in zip(
        result.item_ids, result.retrieval_ranks, result.retrieval_scores, result.ranking_scores
    ):
        assert retrieved.item_ids[rank - 1] == item_id
        assert r_score == pytest.approx(retrieved.scores[rank - 1])
        assert k_score == pytest.approx(_kcan_score(ranker, "u7", item_id), rel=1e-4, abs=1e-5)
    # the answer is the top 10 of the fused score over all 50 candidates
    all_kcan = np.array([_kcan_score(ranker, "u7", i) for i in retrieved.item_ids])
    fused = 0.5 * _z(np.asarray(retrieved.scores, np.float64)) + 0.5 * _z(all_kcan)
    expected = [retrieved.item_ids[j] for j in np.argsort(-fused, kind="stable")[:10]]
    assert result.item_ids == expected
    assert np.all(np.diff(result.scores) <= 1e-6)
    assert set(result.timings_ms) == {"retrieval", "ranking", "total"}


def test_alpha_zero_keeps_the_retrieval_order_and_one_follows_kcan(retrieval, ranker):
    retrieved = retrieval.for_user("u3", 40)
    for alpha in (0.0, 1.0):
        bundle = RankerBundle(ranker.model, ranker.users, ranker.items, {**ranker.meta, "alpha": alpha})
        result = TwoStageService(retrieval, bundle).for_user("u3", k=40, n=40)
        if alpha == 0.0:
            assert result.item_ids == retrieved.item_ids
        else:
            assert np.all(np.diff(result.ranking_scores) <= 1e-6)
            assert result.item_ids != retrieved.item_ids  # an untrained KCAN disagrees


def test_items_unknown_to_the_ranker_go_last_without_a_ranking_score(retrieval, ranker):
    known_items = ranker.items.filter(pl.col("item_id") != "i5")
    partial = RankerBundle(
        ranker.model, ranker.users, known_items.vstack(pl.DataFrame(
            {"item_id": ["not-in-catalogue"], "item_idx": [int(ranker.items.filter(pl.col("item_id") == "i5")["item_idx"][0])]},
            schema=known_items.schema)), ranker.meta,
    )
    service = TwoStageService(retrieval, partial)
    retrieved = retrieval.for_user("u1", N_ITEMS)
    result = service.for_user("u1", k=len(retrieved), n=N_ITEMS)
    assert result.item_ids[-1] == "i5" and np.isnan(result.ranking_scores[-1])
    assert not np.isnan(result.ranking_scores[:-1]).any()


def test_bad_requests_raise_request_errors(two_stage, data):
    with pytest.raises(UnknownUserError):
        two_stage.for_user("nobody", 10, 50)
    for k, n in ((0, 50), (60, 50), (10, 0), (10, 5000)):
        with pytest.raises(InvalidRequestError):
            two_stage.for_user("u1", k, n)


def test_ranker_bundle_roundtrip_keeps_scores_and_kind(tmp_path, ranker):
    target = ranker.write(tmp_path / "ranker")
    assert bundle_kind(target) == "ranker"
    loaded = RankerBundle.load(target)
    assert loaded.alpha == 0.5 and loaded.num_candidates == 50
    users, items = torch.arange(10), torch.arange(10, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.score_pairs(users, items), ranker.model.score_pairs(users, items))
    (target / "kcan.pt").unlink()
    with pytest.raises(BundleError, match="missing kcan.pt"):
        RankerBundle.load(target)


# ---------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def client(retrieval, ranker):
    info = {"name": "kgrec-test", "version": "1"}
    ranker_info = {"name": "kgrec-test-ranker", "version": "4"}
    app = create_app(lambda: (retrieval, info), lambda: (ranker, ranker_info))
    with TestClient(app) as c:
        yield c


def test_ranked_endpoint_returns_both_scores_and_stage_timings(client):
    response = client.get("/v1/users/u7/ranked", params={"k": 5, "n": 50})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n"] == 50 and len(body["candidates"]) == 5
    assert body["ranker"] == {"name": "kgrec-test-ranker", "version": "4"}
    first = body["candidates"][0]
    assert {"item_id", "name", "score", "retrieval_score", "ranking_score", "retrieval_rank"} <= set(first)
    assert body["timings_ms"]["total"] >= body["timings_ms"]["ranking"]
    assert client.get("/readyz").json()["model"]["ranker"]["alpha"] == 0.5
    latency = client.get("/v1/latency").json()["two_stage"]
    assert latency["requests"] >= 1 and latency["ranking"]["n"] >= 1 and latency["total"]["p99_ms"] > 0


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("/v1/users/nobody/ranked", {}, 404, "unknown user"),
        ("/v1/users/u1/ranked", {"k": 0}, 422, "k"),
        ("/v1/users/u1/ranked", {"k": 60, "n": 50}, 422, "k must be between 1 and n=50"),
        ("/v1/users/u1/ranked", {"n": 0}, 422, "n"),
        ("/v1/users/u1/ranked", {"n": 5000}, 422, "n"),
        ("/v1/users/u1/ranked", {"k": "ten"}, 422, "k"),
    ],
)
def test_ranked_endpoint_answers_bad_input_with_4xx_and_a_message(client, path, params, status, message):
    response = client.get(path, params=params)
    assert response.status_code == status, response.text
    assert message in response.text


def test_user_unknown_to_the_ranker_is_404(retrieval, ranker):
    users = ranker.users.with_columns(
        pl.when(pl.col("user_id") == "u2").then(pl.lit("someone-else")).otherwise(pl.col("user_id")).alias("user_id")
    )
    partial = RankerBundle(ranker.model, users, ranker.items, ranker.meta)
    with TestClient(create_app(lambda: (retrieval, {}), lambda: (partial, {}))) as c:
        response = c.get("/v1/users/u2/ranked")
        assert response.status_code == 404
        assert "unknown to the ranking model" in response.json()["detail"]
    with pytest.raises(UnknownRankerUserError):
        TwoStageService(retrieval, partial).for_user("u2", 5, 20)


def test_without_a_ranker_two_stage_is_503_and_retrieval_still_serves(retrieval):
    with TestClient(create_app(lambda: (retrieval, {}), lambda: None)) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/users/u1/candidates", params={"k": 3}).status_code == 200
        response = c.get("/v1/users/u1/ranked")
        assert response.status_code == 503 and "no ranking model" in response.json()["detail"]
        assert c.get("/v1/latency").status_code == 503


def test_a_ranker_that_fails_to_load_makes_the_service_unready(retrieval):
    def broken():
        raise BundleError("ranker bundle /x is missing kcan.pt")

    with TestClient(create_app(lambda: (retrieval, {}), broken)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "missing kcan.pt" in ready.json()["detail"]
        assert c.get("/v1/users/u1/ranked").status_code == 503
        assert c.get("/healthz").status_code == 200


def test_ranker_pyfunc_scores_pairs_by_raw_id(tmp_path, ranker, log_and_load_pyfunc):
    import pandas as pd

    bundle_dir = ranker.write(tmp_path / "ranker")
    model = log_and_load_pyfunc(tmp_path, bundle_dir)
    frame = pd.DataFrame({"user_id": ["u7", "u7", "ghost", "u3"], "item_id": ["i4", "i90", "i4", "nope"]})
    out = model.predict(frame)
    assert out["known"].tolist() == [True, True, False, False]
    assert out["score"][2:].isna().all()
    for row in (0, 1):
        expected = _kcan_score(ranker, frame.user_id[row], frame.item_id[row])
        assert out["score"][row] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_the_default_k_never_contradicts_an_explicit_n(client):
    """Found by the schema fuzz run: `?n=1` alone was a 422 (k defaulted to 20 > n)."""
    response = client.get("/v1/users/u1/ranked", params={"n": 3})
    assert response.status_code == 200, response.text
    assert response.json()["k"] == 3 and len(response.json()["candidates"]) == 3
    assert client.get("/v1/users/u1/ranked").json()["k"] == 20
