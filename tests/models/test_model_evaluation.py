"""The metric core and the three evaluation protocols: hand-computed values, torchmetrics, agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from kgrec.models.evaluation import (
    METRICS,
    diversity_at_k,
    evaluate,
    evaluate_split,
    ranked_list_metrics,
    ranked_list_metrics_per_user,
)

L3 = 1.0 / math.log2(3)  # discount of rank 2
L5 = 1.0 / math.log2(5)  # discount of rank 4

# 5 users x 6 items. Rows are the scores of items 0..5.
SCORES = torch.tensor(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # u0: train item 0 masked -> ranking 1,2,3,4,5
        [0.1, 0.9, 0.2, 0.8, 0.3, 0.7],  # u1: ranking 1,3,5,4,2,0; 4 test items > K=2
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # u2: no test item -> skipped
        [0.9, 0.8, 0.1, 0.2, 0.7, 0.3],  # u3: items 0,1 masked -> ranking 4,5,3,2
        [0.0, 0.5, 0.4, 0.3, 0.2, 0.1],  # u4: its test item 0 is ranked last -> no hit
    ]
)
TRUTH = {0: [2, 5], 1: [0, 1, 2, 3], 3: [4], 4: [0]}
EXCLUDE = {0: [0], 3: [0, 1]}


def _csr(rows: dict[int, list[int]]) -> sp.csr_matrix:
    r = [u for u, items in rows.items() for _ in items]
    c = [i for items in rows.values() for i in items]
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(5, 6))


def _score_fn(users: torch.Tensor) -> torch.Tensor:
    return SCORES[users]


def test_metrics_match_hand_computed_values():
    got = evaluate(_score_fn, _csr(TRUTH), _csr(EXCLUDE), ks=(2, 4))
    # Per user at K=2 (top-2 after masking):
    #   u0 [1, 2]: 1 hit at rank 2 of 2 test items; recall 1/2, prec 1/2, ndcg L3 / (1 + L3)
    #   u1 [1, 3]: 2 hits of 4 test items; recall 2/4, prec 2/2, ndcg 1 (ideal over min(4,2)=2)
    #   u3 [4, 5]: hit at rank 1 of 1; recall 1, prec 1/2, ndcg 1
    #   u4 [1, 2]: no hit; all 0.  u2 has no test item and is skipped -> 4 users.
    ndcg_u0 = L3 / (1 + L3)
    expected_k2 = {
        "recall@2": (0.5 + 0.5 + 1.0 + 0.0) / 4,
        "precision@2": (0.5 + 1.0 + 0.5 + 0.0) / 4,
        "hit@2": 3 / 4,
        "ndcg@2": (ndcg_u0 + 1.0 + 1.0 + 0.0) / 4,
    }
    # K=4:
    #   u0 [1,2,3,4]: still 1 hit (item 5 is 5th); recall 1/2, prec 1/4, ndcg L3 / (1 + L3)
    #   u1 [1,3,5,4]: hits at ranks 1, 2; recall 2/4, prec 2/4,
    #                 ndcg (1 + L3) / (1 + L3 + 1/2 + L5)  (ideal over min(4,4)=4 positions)
    #   u3 [4,5,3,2]: recall 1, prec 1/4, ndcg 1 (masked items 0,1 never enter the list)
    #   u4 [1,2,3,4]: 0
    expected_k4 = {
        "recall@4": (0.5 + 0.5 + 1.0 + 0.0) / 4,
        "precision@4": (0.25 + 0.5 + 0.25 + 0.0) / 4,
        "hit@4": 3 / 4,
        "ndcg@4": (ndcg_u0 + (1 + L3) / (1 + L3 + 0.5 + L5) + 1.0 + 0.0) / 4,
    }
    for name, value in {**expected_k2, **expected_k4}.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name
    assert got["num_users_evaluated"] == 4


def test_masking_matters():
    # Without masking u3's top-2 is its training items 0, 1 and its test item is missed.
    got = evaluate(_score_fn, _csr(TRUTH), None, ks=(2,))
    assert got["recall@2"] == pytest.approx((0.0 + 0.5 + 0.0 + 0.0) / 4)  # u0 top-2 = [0, 1]


def test_embedding_tuple_and_batching_agree():
    g = torch.Generator().manual_seed(0)
    user_emb, item_emb = torch.randn(5, 3, generator=g), torch.randn(6, 3, generator=g)
    truth, exclude = _csr(TRUTH), _csr(EXCLUDE)
    by_tuple = evaluate((user_emb, item_emb), truth, exclude, ks=(1, 3, 10))
    by_fn = evaluate(lambda u: user_emb[u] @ item_emb.t(), truth, [exclude], ks=(1, 3, 10), batch_size=2)
    assert by_tuple == pytest.approx(by_fn)
    # K above the number of items: everything not masked is retrieved.
    assert by_tuple["recall@10"] == pytest.approx(1.0)


def test_evaluate_split_masks_per_protocol(tiny_data):
    # A score function that ranks train items, then valid items, highest: masking must remove them.
    train = torch.from_numpy(tiny_data.train.toarray())
    valid = torch.from_numpy(tiny_data.valid.toarray())
    test = torch.from_numpy(tiny_data.test.toarray())
    scores = 3 * train + 2 * valid + test

    class Fixed(torch.nn.Module):
        def __call__(self, users):
            return scores[users]

    fn = Fixed()
    assert evaluate_split(fn, tiny_data, "test", ks=(1,))["recall@1"] == pytest.approx(1.0)
    assert evaluate_split(fn, tiny_data, "valid", ks=(1,))["recall@1"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        evaluate_split(fn, tiny_data, "train")


# ---------------------------------------------------------------------------- the metric core
def _core_inputs():
    # u0: hits at ranks 1 and 3 of a 5-item list, |T| = 3 (one truth item is not in the list)
    # u1: hits at ranks 2 and 5, |T| = 2
    hits = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    return hits, torch.tensor([3, 2])


def test_core_matches_hand_computed_values():
    hits, n_truth = _core_inputs()
    d2, d3, d4, d5, d6 = (1 / math.log2(r) for r in (2, 3, 4, 5, 6))  # discount of rank r - 1
    assert d2 == 1.0 and d4 == 0.5
    expected = {
        # K=1: u0 [hit]; u1 [miss]. IDCG over min(|T|, 1) = 1 position.
        "recall@1": (1 / 3 + 0) / 2, "precision@1": (1 + 0) / 2, "hit@1": 1 / 2, "ndcg@1": (1 + 0) / 2,
        # K=2: u0 1 hit at rank 1; u1 1 hit at rank 2; IDCG over 2 positions for both.
        "recall@2": (1 / 3 + 1 / 2) / 2,
        "precision@2": (1 / 2 + 1 / 2) / 2,
        "hit@2": 1.0,
        "ndcg@2": (d2 / (d2 + d3) + d3 / (d2 + d3)) / 2,
        # K=3: u0 hits at ranks 1, 3 (IDCG over min(3, 3) = 3); u1 one hit at rank 2 (IDCG over 2).
        "recall@3": (2 / 3 + 1 / 2) / 2,
        "precision@3": (2 / 3 + 1 / 3) / 2,
        "hit@3": 1.0,
        "ndcg@3": ((d2 + d4) / (d2 + d3 + d4) + d3 / (d2 + d3)) / 2,
        # K=5: u1's second hit at rank 5 enters.
        "recall@5": (2 / 3 + 2 / 2) / 2,
        "precision@5": (2 / 5 + 2 / 5) / 2,
        "hit@5": 1.0,
        "ndcg@5": ((d2 + d4) / (d2 + d3 + d4) + (d3 + d6) / (d2 + d3)) / 2,
        # K=8 > L=5: the whole list; precision still divides by K = 8.
        "recall@8": (2 / 3 + 2 / 2) / 2,
        "precision@8": (2 / 8 + 2 / 8) / 2,
        "hit@8": 1.0,
        "ndcg@8": ((d2 + d4) / (d2 + d3 + d4) + (d3 + d6) / (d2 + d3)) / 2,
    }
    got = ranked_list_metrics(hits, n_truth, (1, 2, 3, 5, 8))
    assert list(got) == [f"{m}@{k}" for k in (1, 2, 3, 5, 8) for m in METRICS]
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    # the ideal DCG runs over min(|T_u|, K) positions even beyond a shorter list: 2 hits of 4 truth
    # items in a 2-item list, K = 4 -> IDCG over 4 positions
    short = ranked_list_metrics(torch.tensor([[True, True]]), torch.tensor([4]), (4,))
    assert short["ndcg@4"] == pytest.approx((d2 + d3) / (d2 + d3 + d4 + d5), rel=1e-12)
    assert short["recall@4"] == 2 / 4 and short["precision@4"] == 2 / 4
    assert d5 == pytest.approx(1 / math.log2(5))


def test_core_users_without_truth_and_options():
    hits, n_truth = _core_inputs()
    hits3 = torch.cat([hits, torch.zeros(1, 5, dtype=torch.bool)])
    n3 = torch.tensor([3, 2, 0])
    two = ranked_list_metrics(hits, n_truth, (3,))
    skip = ranked_list_metrics(hits3, n3, (3,), empty_users="skip")
    zero = ranked_list_metrics(hits3, n3, (3,), empty_users="zero")
    assert skip == two
    for name in two:
        assert zero[name] == pytest.approx(two[name] * 2 / 3, rel=1e-12)
        assert math.isfinite(zero[name])
    sums = ranked_list_metrics(hits, n_truth, (3,), reduction="sum")
    assert sums == pytest.approx({name: 2 * value for name, value in two.items()})
    per_user = ranked_list_metrics_per_user(hits3, n3, (3,), ("ndcg", "recall"))
    assert list(per_user) == ["ndcg@3", "recall@3"]
    assert per_user["recall@3"].tolist() == [2 / 3, 1 / 2, 0.0]
    # key order follows ks and metrics as given (re-ranking and sequential keep their order)
    assert list(ranked_list_metrics(hits, n_truth, (5, 2), ("recall", "hit"))) == [
        "recall@5", "hit@5", "recall@2", "hit@2"]
    assert math.isnan(ranked_list_metrics(hits[:0], n_truth[:0], (3,))["recall@3"])  # no users
    with pytest.raises(ValueError, match="unknown metrics"):
        ranked_list_metrics(hits, n_truth, (3,), ("map",))
    with pytest.raises(ValueError, match="positive"):
        ranked_list_metrics(hits, n_truth, (0,))
    with pytest.raises(ValueError, match="entries"):
        ranked_list_metrics(hits, torch.tensor([1]), (3,))


def test_diversity_at_k_cuts_the_list():
    cats = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)  # A, AB, B, none
    ranked = np.array([[0, 2, 1, 3], [1, 3, -1, -1]])
    # row 0, k=2: pair (0, 2) disjoint -> 1; k=3: (0,2) disjoint, (0,1), (2,1) share -> 1/3;
    # row 1, k=2: item 3 has no genre -> disjoint -> 1; padding ignored
    assert diversity_at_k(ranked, cats, 2).tolist() == [1.0, 1.0]
    got = diversity_at_k(ranked, cats, 3)
    assert got[0] == pytest.approx(1 / 3) and got[1] == 1.0
    assert np.isnan(diversity_at_k(ranked, cats, 1)).all()  # fewer than two items


def test_core_agrees_with_torchmetrics_per_user():
    from torchmetrics.functional.retrieval import (
        retrieval_hit_rate,
        retrieval_normalized_dcg,
        retrieval_precision,
        retrieval_recall,
    )

    g = torch.Generator().manual_seed(7)
    num_users, num_items, ks = 50, 30, (1, 3, 5, 10, 20, 30)
    # Scores in [0.5, 1.5): torchmetrics' recall and precision only count documents with a score
    # > 0, and its NDCG averages the gain over tied scores; all-distinct positive scores make both
    # rules no-ops, so the two implementations rank identically.
    scores = 0.5 + torch.rand(num_users, num_items, generator=g)
    assert all(row.unique().numel() == num_items for row in scores)
    sizes = torch.randint(0, 13, (num_users,), generator=g)
    sizes[:3] = torch.tensor([0, 1, num_items])  # a user without truth, one item, every item
    truth = torch.zeros(num_users, num_items, dtype=torch.bool)
    for u in range(num_users):
        truth[u, torch.randperm(num_items, generator=g)[: sizes[u]]] = True
    # The core sees the full ranking of ALL items, and torchmetrics sees each user's full score and
    # relevance vectors: then torchmetrics' recall denominator (all relevant documents) is |T_u|
    # and its ideal DCG (top-K of the sorted relevance vector) runs over min(|T_u|, K) positions,
    # i.e. exactly our definitions. (Given only a top-L list, both would see only the hits in it.)
    order = torch.argsort(scores, dim=1, descending=True)
    hits = truth.gather(1, order)
    ours = ranked_list_metrics_per_user(hits, truth.sum(1), ks)
    reference = {
        "recall": retrieval_recall, "precision": retrieval_precision,
        "hit": retrieval_hit_rate, "ndcg": retrieval_normalized_dcg,
    }
    for k in ks:
        for name, fn in reference.items():
            theirs = torch.stack([fn(scores[u], truth[u], top_k=k) for u in range(num_users)])
            mine = ours[f"{name}@{k}"]
            if name == "ndcg":
                # torchmetrics computes DCG in float32: agreement to float32 rounding (an
                # off-by-one rank in the discount moves these values by > 1e-2)
                torch.testing.assert_close(mine.float(), theirs, rtol=1e-6, atol=1e-6)
            else:
                # a ratio of small integers rounds to the same float32 from float64 as directly
                # in float32, so these agree exactly (users without truth: 0 in both)
                assert torch.equal(mine.float(), theirs), f"{name}@{k}"
            # averaged with users without truth counted as 0, as torchmetrics' functional API does
            mean = ranked_list_metrics(hits, truth.sum(1), (k,), (name,), empty_users="zero")[f"{name}@{k}"]
            assert mean == pytest.approx(theirs.double().mean().item(), rel=1e-6, abs=1e-7)


def _brute_force(lists: list[list[int]], truth_sets: list[set[int]], k: int) -> dict[str, float]:
    """Per-user Python loop over the definitions, averaged over users with truth."""
    out = {"recall": 0.0, "precision": 0.0, "hit": 0.0, "ndcg": 0.0}
    users = [u for u, t in enumerate(truth_sets) if t]
    for u in users:
        top, t = lists[u][:k], truth_sets[u]
        n_hit = sum(i in t for i in top)
        dcg = sum(1 / math.log2(r + 1) for r, i in enumerate(top, start=1) if i in t)
        idcg = sum(1 / math.log2(r + 1) for r in range(1, min(len(t), k) + 1))
        out["recall"] += n_hit / len(t)
        out["precision"] += n_hit / k
        out["hit"] += float(n_hit > 0)
        out["ndcg"] += dcg / idcg
    return {f"{m}@{k}": v / len(users) for m, v in out.items()}


def test_three_protocols_agree_on_the_same_lists():
    from kgrec.models.reranking import list_metrics
    from kgrec.models.sequential_evaluation import Popularity, evaluate_sequential, ranking_metrics

    rng = np.random.default_rng(3)
    num_users, num_items, width, ks = 40, 25, 12, (1, 3, 5, 10)
    scores = torch.from_numpy(rng.permutation(num_users * num_items).reshape(num_users, num_items) + 1.0).float()
    relevant = rng.random((num_users, num_items)) < 0.2
    relevant[[0, 1]] = False  # users without truth: skipped by evaluate
    truth = sp.csr_matrix(relevant.astype(np.float32))
    exclude = sp.lil_matrix((num_users, num_items), dtype=np.float32)
    for u in range(num_users):  # 1-5 masked items per user, never a truth item
        free = np.setdiff1d(np.arange(num_items), truth[u].indices)
        exclude[u, rng.choice(free, rng.integers(1, 6), replace=False)] = 1
    exclude = exclude.tocsr()

    # protocol 1: full ranking from the score matrix
    full = evaluate(lambda u: scores[u], truth, exclude, ks=ks)
    # the same ranked lists, built once: masked scores, top `width` (>= max K) items per user
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    masked = scores.masked_fill(torch.from_numpy(exclude.toarray() > 0), float("-inf"))
    ranked = torch.topk(masked[users], width, dim=1).indices
    # protocol 3: re-ranking's list metrics
    rerank = list_metrics(ranked, torch.from_numpy(users), truth, ks)
    # the core itself
    dense = torch.from_numpy(truth.toarray() > 0)[users]
    n_truth = torch.from_numpy(np.diff(truth.indptr)[users])
    core = ranked_list_metrics(dense.gather(1, ranked), n_truth, ks)

    assert full["num_users_evaluated"] == len(users) == num_users - 2
    assert [name for name in full if name != "num_users_evaluated"] == list(core)
    for name, value in core.items():
        assert full[name] == value, name  # bit for bit
    assert list(rerank) == [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    for name, value in rerank.items():
        assert value == core[name], name
    # ... and an independent loop over the definitions pins the shared numbers
    lists = [ranked[j].tolist() for j in range(len(users))]
    truth_sets = [set(truth[u].indices.tolist()) for u in users]
    for k in ks:
        for name, value in _brute_force(lists, truth_sets, k).items():
            assert core[name] == pytest.approx(value, rel=1e-12), name

    # protocol 2: the sequential path on the same per-user lists
    per_user = ranking_metrics(ranked.numpy(), [truth[u].indices for u in users], ks)
    for name, values in per_user.items():
        assert np.array_equal(values, ranked_list_metrics_per_user(dense.gather(1, ranked), n_truth, ks)[name].numpy())
    # ... and through recommend(): a popularity model ranks every user by the same item scores, with
    # the user's inputs masked -- the same lists as evaluate() with those inputs as `exclude`
    counts = rng.permutation(num_items).astype(np.float32) + 1.0
    pop = Popularity(num_items, counts)
    seq = evaluate_sequential(
        pop, [exclude[u].indices for u in range(num_users)], [truth[u].indices for u in range(num_users)],
        ks=ks, diversity_k=max(ks),
    )
    same = evaluate(lambda u: torch.from_numpy(counts).expand(len(u), -1), truth, exclude, ks=ks)
    assert seq["num_users"] == same["num_users_evaluated"]
    for k in ks:
        for m in ("recall", "hit", "ndcg"):
            assert seq[f"{m}@{k}"] == pytest.approx(same[f"{m}@{k}"], rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------- against a plain reference
def _reference_full_ranking(scores: torch.Tensor, truth: sp.csr_matrix, exclude: list[sp.csr_matrix],
                            ks: tuple[int, ...]) -> dict[str, float]:
    """The few-line baseline: mask all excluded items, ONE torch.topk over every user's full row
    (so ties resolve exactly as torch.topk orders them), hits from a dense truth mask."""
    masked = scores.clone()
    for m in exclude:
        masked[torch.from_numpy(m.toarray() != 0)] = float("-inf")
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    k_max = min(max(ks), scores.shape[1])
    top_scores, top = torch.topk(masked[users], k_max, dim=1)
    dense = torch.zeros(truth.shape, dtype=torch.bool)
    coo = truth.tocoo()
    dense[torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))] = True
    hits = dense[users].gather(1, top) & torch.isfinite(top_scores)
    return ranked_list_metrics(hits, np.diff(truth.indptr)[users], sorted(set(ks)))


@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_matches_plain_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    num_users, num_items = 60, 40
    # integer scores in a small range: many ties, also across the K boundary
    scores = torch.from_numpy(rng.integers(0, 5, (num_users, num_items)).astype(np.float32))
    train = rng.random((num_users, num_items)) < 0.2
    train[5, :-2] = True  # train covers all but two items: fewer than K remain
    valid = (rng.random((num_users, num_items)) < 0.1) & ~train
    test = (rng.random((num_users, num_items)) < 0.1) & ~train & ~valid
    test[[0, 1, 7]] = False  # users without held-out items are skipped
    test[5, -1] = True
    mats = [sp.csr_matrix(x.astype(np.float32)) for x in (train, valid, test)]
    ks = (1, 5, 10, 100)  # 100 > num_items
    expected = _reference_full_ranking(scores, mats[2], mats[:2], ks)
    for batch_size in (1, 7, 4096):  # blocks and batches do not change the numbers
        fn = evaluate(lambda u: scores[u], mats[2], mats[:2], ks=ks, batch_size=batch_size)
        for name, value in expected.items():
            assert fn[name] == pytest.approx(value, rel=1e-12, abs=1e-15), (batch_size, name)
        assert fn["num_users_evaluated"] == int(test.any(1).sum())
    # the score function's tensor is never written to (the masking happens on a private copy)
    before = scores.clone()
    evaluate(lambda u: scores if len(u) == num_users else scores[u], mats[2], mats[:2], ks=ks)
    assert torch.equal(scores, before)


def test_evaluate_embeddings_match_plain_reference_with_ties():
    rng = np.random.default_rng(5)
    num_users, num_items = 300, 120
    # integer embeddings: exact integer scores with plenty of ties, identical in any GEMM order
    user_emb = torch.from_numpy(rng.integers(-2, 3, (num_users, 4)).astype(np.float32))
    item_emb = torch.from_numpy(rng.integers(-2, 3, (num_items, 4)).astype(np.float32))
    train = sp.random(num_users, num_items, density=0.15, random_state=1, format="csr")
    test = sp.random(num_users, num_items, density=0.05, random_state=2, format="csr")
    test = sp.csr_matrix(test.toarray() * (train.toarray() == 0))
    ks = (3, 20, 50)
    expected = _reference_full_ranking(user_emb @ item_emb.t(), test, [train], ks)
    for batch_size in (16, 4096):
        got = evaluate((user_emb, item_emb), test, [train], ks=ks, batch_size=batch_size)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    # several exclusion matrices mask their union
    half = sp.csr_matrix(train.toarray() * (rng.random(train.shape) < 0.5))
    split = evaluate((user_emb, item_emb), test, [half, train - half], ks=ks)
    assert split == pytest.approx(evaluate((user_emb, item_emb), test, train, ks=ks), rel=1e-12)
