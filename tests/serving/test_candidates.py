import numpy as np
import pytest
from kgrec.serving.candidates import (
    CandidateService,
    InvalidRequestError,
    UnknownItemsError,
    UnknownUserError,
)
from kgrec.serving.index import IndexConfig, build_index


def _exact_unseen(bundle, u_idx, k):
    scores = bundle.item_embeddings @ bundle.user_embeddings[u_idx]
    scores[bundle.seen[u_idx].indices] = -np.inf
    return np.argsort(-scores)[:k]


def _user_idx(bundle, user_id):
    return int(bundle.users.filter(user_id=user_id)["user_idx"][0])


@pytest.mark.parametrize("k", [1, 10, 100])
def test_known_user_excludes_seen_sorted_exact_k(bundle, service, k):
    for uid in ["u0", "u17", "u299"]:
        res = service.for_user(uid, k)
        u = _user_idx(bundle, uid)
        assert len(res) == k
        assert not set(res.item_idx.tolist()) & set(bundle.seen[u].indices.tolist())
        assert np.all(np.diff(res.scores) <= 1e-6)
        np.testing.assert_array_equal(res.item_idx, _exact_unseen(bundle, u, k))
        # ids/names map through the (shuffled) items table
        c = res.candidates[0]
        row = bundle.items.filter(item_idx=c.item_idx)
        assert c.item_id == row["item_id"][0] and c.name == row["name"][0]
        assert res.user_id == uid


def test_seen_items_dominate_unfiltered_top(bundle, service):
    # sanity check of the fixture: without the filter most of the top-30 would be seen
    u = _user_idx(bundle, "u3")
    top = np.argsort(-(bundle.item_embeddings @ bundle.user_embeddings[u]))[:30]
    assert len(set(top) & set(bundle.seen[u].indices)) >= 10


def test_all_but_few_seen_returns_what_is_left(make_bundle):
    b = make_bundle(n_users=5, n_items=60, dim=8, seen_per_user=25, seed=3)
    s = CandidateService(b)
    res = s.for_user("u0", 60)  # k = catalogue size, only 35 unseen
    assert len(res) == 35
    assert not set(res.item_idx.tolist()) & set(b.seen[_user_idx(b, "u0")].indices.tolist())


def test_fallback_when_ann_filters_too_much(bundle):
    # HNSW with a tiny efSearch returns fewer useful rows; the service still returns exactly k
    index = build_index(bundle.item_embeddings, IndexConfig(kind="hnsw", hnsw_ef_search=1, hnsw_m=4))
    s = CandidateService(bundle, index)
    for uid in ["u1", "u2", "u3"]:
        res = s.for_user(uid, 200)
        assert len(res) == 200
        assert not set(res.item_idx.tolist()) & set(bundle.seen[_user_idx(bundle, uid)].indices.tolist())
        assert np.all(np.diff(res.scores) <= 1e-6)


def test_history(bundle, service):
    hist = ["i3", "i11", "i19", "nope", "i3"]
    res = service.for_history(hist, 50)
    assert len(res) == 50
    assert not {"i3", "i11", "i19"} & set(res.item_ids)
    assert res.unknown_item_ids == ["nope"]
    assert np.all(np.diff(res.scores) <= 1e-6)
    q = bundle.item_embeddings[[3, 11, 19]].mean(0)
    scores = bundle.item_embeddings @ q
    scores[[3, 11, 19]] = -np.inf
    np.testing.assert_array_equal(res.item_idx, np.argsort(-scores)[:50])


def test_history_integer_ids(bundle):
    import polars as pl
    from kgrec.serving.bundle import RetrievalBundle

    items = bundle.items.with_columns(item_id=pl.col("item_idx").cast(pl.Utf8))
    b = RetrievalBundle(bundle.user_embeddings, bundle.item_embeddings, bundle.seen, bundle.users, items, {})
    s = CandidateService(b)
    assert s.for_history([3, 5], 5).item_ids == s.for_history(["3", "5"], 5).item_ids


def test_errors(service):
    with pytest.raises(UnknownUserError, match="unknown user 'x'"):
        service.for_user("x", 10)
    with pytest.raises(UnknownItemsError, match="none of the item ids"):
        service.for_history(["a", "b"], 10)
    with pytest.raises(InvalidRequestError):
        service.for_history([], 10)
    for bad in (0, -1, service.n_items + 1, "10", 2.0, True):
        with pytest.raises(InvalidRequestError):
            service.for_user("u1", bad)


def test_batch_matches_single(service):
    out = service.for_users(["u1", "ghost", "u2"], 20, batch_size=2)
    assert out[1] is None
    for uid, r in zip(["u1", "u2"], [out[0], out[2]]):
        np.testing.assert_array_equal(r.item_idx, service.for_user(uid, 20).item_idx)


def test_index_mismatch_rejected(bundle):
    with pytest.raises(ValueError, match="does not match"):
        CandidateService(bundle, build_index(bundle.item_embeddings[:10]))


# ---------------------------------------------------------------------------- fresh slots
def _with_posted(bundle, scales):
    """A service over ``bundle`` with one posted item per scale: user 0's vector times the scale (so
    the posted items' scores for user 0 are ordered by scale, and low scales rank below every
    catalogue item)."""
    from kgrec.serving.candidates import CandidateService

    service = CandidateService(bundle)
    u0 = bundle.user_embeddings[0] / np.linalg.norm(bundle.user_embeddings[0])
    vectors = np.stack([u0 * s for s in scales]).astype(np.float32)
    service.add_items([f"p{j}" for j in range(len(scales))], [None] * len(scales), vectors)
    return service


def test_fresh_slots_swap_the_last_catalogue_items_for_the_best_posted(bundle):
    user = dict(zip(bundle.users["user_idx"].to_list(), bundle.users["user_id"].to_list()))[0]
    service = _with_posted(bundle, [-3.0, -1.0, -2.0])  # negative: below every catalogue item of user 0
    plain = service.for_user(user, 10)
    assert not any(i.startswith("p") for i in plain.item_ids)
    two = service.for_user(user, 10, fresh=2)
    assert len(two) == 10
    assert two.item_ids[:8] == plain.item_ids[:8]  # the last two catalogue items gave way
    assert two.item_ids[8:] == ["p1", "p2"]  # the two best posted (scales -1, -2), in score order
    assert np.all(np.diff(two.scores) <= 0)
    every = service.for_user(user, 10, fresh=50)  # more slots than posted items: all three, rest catalogue
    assert every.item_ids[:7] == plain.item_ids[:7] and every.item_ids[7:] == ["p1", "p2", "p0"]
    assert service.for_user(user, 2, fresh=5).item_ids == ["p1", "p2"]  # never more than k


def test_fresh_slots_count_posted_items_that_made_the_list_on_merit(bundle):
    user = dict(zip(bundle.users["user_idx"].to_list(), bundle.users["user_id"].to_list()))[0]
    service = _with_posted(bundle, [1e3, -5.0])  # p0 tops the list on score, p1 is last
    plain = service.for_user(user, 10)
    assert plain.item_ids[0] == "p0" and "p1" not in plain.item_ids
    assert service.for_user(user, 10, fresh=1).item_ids == plain.item_ids  # one posted is in already
    two = service.for_user(user, 10, fresh=2)
    assert two.item_ids[:9] == plain.item_ids[:9] and two.item_ids[9] == "p1"
    # a history that holds a posted item excludes it, and the slot goes to the other one
    hist = service.for_history(["p0", plain.item_ids[1]], 5, fresh=1)
    assert "p0" not in hist.item_ids and hist.item_ids[-1] == "p1"
