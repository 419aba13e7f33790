"""Merge of per-interest result lists: no duplicates, no history items, right source interest."""

from __future__ import annotations

import numpy as np
import pytest
from kgrec.models.merge import merge_interest_results, score_union, search_interests
from scipy.special import logsumexp


def _random_lists(rng, b, k_int, n, n_items):
    ids = np.stack([np.stack([rng.choice(n_items, n, replace=False) for _ in range(k_int)]) for _ in range(b)])
    ids[rng.random(ids.shape) < 0.05] = -1  # faiss "no result"
    scores = rng.standard_normal(ids.shape).astype(np.float32)
    scores = -np.sort(-scores, axis=-1)  # best first
    return ids, scores


@pytest.mark.parametrize("rule", ["max", "weighted", "mixture", "controllable"])
def test_never_duplicates_or_history_items(rule: str) -> None:
    rng = np.random.default_rng(0)
    for _trial in range(30):
        b, k_int, n, n_items = 5, int(rng.integers(1, 6)), int(rng.integers(1, 25)), int(rng.integers(10, 60))
        ids, scores = _random_lists(rng, b, k_int, min(n, n_items), n_items)
        history = [rng.choice(n_items, int(rng.integers(0, n_items // 2)), replace=False) for _ in range(b)]
        mask = rng.random((b, k_int)) < 0.8
        weights = rng.random((b, k_int))
        k = int(rng.integers(1, 40))
        log_weights = np.log(weights)
        categories = rng.random((n_items, 4)) < 0.3
        out = merge_interest_results(
            ids, scores, k, exclude=history, interest_mask=mask, weights=weights, rule=rule,
            log_weights=log_weights, temperature=0.5, categories=categories, diversity=float(rng.random() * 2),
        )
        assert out.items.shape == out.scores.shape == out.interest.shape == (b, k)
        for row in range(b):
            items, sc, src = out.row(row)
            assert len(set(items.tolist())) == len(items), "duplicate item"
            assert not set(items.tolist()) & set(history[row].tolist()), "history item returned"
            # every candidate really is in the list of its source interest, with that score,
            # and that interest is active
            for item, s, j in zip(items, sc, src, strict=True):
                assert mask[row, j]
                pos = np.flatnonzero(ids[row, j] == item)
                if rule == "controllable":  # the max merge's score and source, in pick order
                    holders, where = np.nonzero((ids[row] == item) & mask[row][:, None])
                    assert s == pytest.approx(scores[row, holders, where].max())
                    assert j == holders[np.argmax(scores[row, holders, where])]
                    continue
                if rule != "mixture":
                    assert pos.size == 1 and scores[row, j, pos[0]] == pytest.approx(s)
                    continue
                # mixture: log-sum over every active list holding the item; the source is the largest term
                holders, where = np.nonzero((ids[row] == item) & mask[row][:, None])
                terms = scores[row, holders, where] / 0.5 + log_weights[row, holders]
                assert s == pytest.approx(logsumexp(terms), rel=1e-5)
                assert pos.size == 1 and j == holders[np.argmax(terms)]
            # padding only at the end; returned as many as possible
            eligible = {
                int(i) for j in range(k_int) if mask[row, j] for i in ids[row, j] if i >= 0
            } - set(history[row].tolist())
            assert len(items) == min(k, len(eligible))
            assert (out.items[row, len(items):] == -1).all()
            if rule in ("max", "mixture"):
                assert (np.diff(sc) <= 1e-5).all()


def test_max_rule_keeps_best_interest_and_equals_exact_topk() -> None:
    ids = np.array([[[3, 1, 2], [1, 4, 3]]])
    scores = np.array([[[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]]], dtype=np.float32)
    out = merge_interest_results(ids, scores, 4, exclude=[[2]])
    assert out.items[0].tolist() == [3, 1, 4, -1]
    assert out.interest[0].tolist() == [0, 1, 1, -1]  # item 1: 0.8 from interest 1 beats 0.5
    assert out.scores[0, :3] == pytest.approx([0.9, 0.8, 0.7])

    rng = np.random.default_rng(1)
    v = rng.standard_normal((4, 3, 8)).astype(np.float32)
    e = rng.standard_normal((50, 8)).astype(np.float32)
    hist = [rng.choice(50, 7, replace=False) for _ in range(4)]
    s_ids, s_sc = search_interests(v, e, 10, exclude=hist)
    merged = merge_interest_results(s_ids, s_sc, 10, exclude=hist)
    exact = (v @ e.T).max(1)
    for row in range(4):
        exact[row, hist[row]] = -np.inf
        assert merged.items[row].tolist() == np.argsort(-exact[row], kind="stable")[:10].tolist()
        assert merged.interest[row].tolist() == (v[row] @ e[merged.items[row]].T).argmax(0).tolist()


def test_mixture_rule_on_the_scored_union_equals_the_exact_mixture_topk() -> None:
    rng = np.random.default_rng(3)
    b, k_int, d, n_items, tau = 4, 3, 8, 60, 0.2
    v = rng.standard_normal((b, k_int, d)).astype(np.float32)
    e = rng.standard_normal((n_items, d)).astype(np.float32)
    hist = [rng.choice(n_items, 9, replace=False) for _ in range(b)]
    log_w = np.log(rng.dirichlet(np.ones(k_int), size=b))
    s_ids, s_sc = search_interests(v, e, 15, exclude=hist)
    u_ids, u_sc = score_union(s_ids, v, e)
    for row in range(b):
        union = set(s_ids[row][s_ids[row] >= 0].tolist())
        assert all(set(u_ids[row, j][u_ids[row, j] >= 0].tolist()) == union for j in range(k_int))
        kept = u_ids[row, 0] >= 0
        np.testing.assert_allclose(u_sc[row][:, kept], v[row] @ e[u_ids[row, 0][kept]].T, rtol=1e-5, atol=1e-5)
    merged = merge_interest_results(u_ids, u_sc, 10, exclude=hist, rule="mixture", log_weights=log_w, temperature=tau)
    exact = logsumexp((v @ e.T) / tau + log_w[:, :, None], axis=1)  # [B, I]: the mixture over the catalogue
    for row in range(b):
        exact[row, hist[row]] = -np.inf
        top = np.argsort(-exact[row], kind="stable")[:10]
        assert merged.items[row].tolist() == top.tolist()
        np.testing.assert_allclose(merged.scores[row], exact[row, top], rtol=1e-5)
        terms = (v[row] @ e[top].T) / tau + log_w[row][:, None]
        assert merged.interest[row].tolist() == terms.argmax(0).tolist()


def test_weighted_rule_follows_weights() -> None:
    ids = np.array([[np.arange(0, 20), np.arange(100, 120)]])
    scores = np.tile(-np.arange(20, dtype=np.float32), (1, 2, 1))
    out = merge_interest_results(ids, scores, 12, weights=np.array([[3.0, 1.0]]), rule="weighted")
    assert (out.interest[0] == 0).sum() == 9 and (out.interest[0] == 1).sum() == 3
    assert out.items[0, :2].tolist() == [0, 1] or out.items[0, 0] == 0
    # an exhausted interest hands its slots to the others
    out = merge_interest_results(ids[:, :, :2], scores[:, :, :2], 4, weights=np.array([[1.0, 1.0]]), rule="weighted")
    assert sorted(out.items[0].tolist()) == [0, 1, 100, 101]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        merge_interest_results(np.zeros((1, 2)), np.zeros((1, 2)), 3)
    with pytest.raises(ValueError):
        merge_interest_results(np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), 3, rule="mmr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        merge_interest_results(np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), 1, rule="mixture", temperature=0.0)
    with pytest.raises(ValueError, match="log_weights"):
        merge_interest_results(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), 1, rule="mixture", log_weights=np.zeros((1, 3)))


def _controllable_reference(ids, scores, k, exclude, categories, lam):
    """ComiRec's greedy aggregation written out plainly, one user: pool = the 4k distinct valid
    candidates with the best max score; each step adds the best standardised score plus lam times
    the share of already-chosen items whose category sets are disjoint from the candidate's."""
    best: dict[int, float] = {}
    for j in range(ids.shape[0]):
        for item, score in zip(ids[j].tolist(), scores[j].tolist(), strict=True):
            if item >= 0 and item not in exclude:
                best[item] = max(best.get(item, -np.inf), score)
    pool = sorted(best, key=lambda i: (-best[i], i))[: 4 * k]
    f = np.array([best[i] for i in pool], dtype=np.float64)
    z = (f - f.mean()) / f.std() if f.std() > 0 else np.zeros_like(f)
    chosen: list[int] = []
    for _ in range(min(k, len(pool))):
        def gain(p: int) -> float:
            if not chosen:
                return z[p]
            disjoint = sum(not (categories[pool[p]] & categories[pool[c]]).any() for c in chosen)
            return z[p] + lam * disjoint / len(chosen)
        chosen.append(max((p for p in range(len(pool)) if p not in chosen), key=lambda p: (gain(p), -p)))
    return [pool[c] for c in chosen]


def test_controllable_is_the_greedy_aggregation_and_lambda_zero_is_max() -> None:
    rng = np.random.default_rng(5)
    for _trial in range(30):
        b, k_int, n, n_items = 3, int(rng.integers(1, 5)), 12, 40
        ids, scores = _random_lists(rng, b, k_int, n, n_items)
        history = [rng.choice(n_items, 5, replace=False) for _ in range(b)]
        categories = rng.random((n_items, 5)) < 0.3
        k = int(rng.integers(1, 25)) if _trial % 2 else int(rng.integers(1, 5))  # pool 4k < candidates
        plain = merge_interest_results(ids, scores, k, exclude=history, rule="max")
        zero = merge_interest_results(ids, scores, k, exclude=history, rule="controllable", categories=categories)
        assert np.array_equal(zero.items, plain.items) and np.array_equal(zero.interest, plain.interest)
        lam = float(rng.choice([0.3, 1.0, 5.0]))
        out = merge_interest_results(
            ids, scores, k, exclude=history, rule="controllable", categories=categories, diversity=lam
        )
        for row in range(b):
            expected = _controllable_reference(ids[row], scores[row], k, set(history[row].tolist()), categories, lam)
            assert out.row(row)[0].tolist() == expected


def test_controllable_trades_score_for_category_spread() -> None:
    # six candidates, best first; 0-2 are genre A, 3-5 genre B
    ids = np.array([[[0, 1, 2, 3, 4, 5]]])
    scores = np.array([[[1.0, 0.9, 0.8, 0.7, 0.6, 0.5]]], dtype=np.float32)
    categories = np.array([[1, 0]] * 3 + [[0, 1]] * 3, dtype=bool)
    plain = merge_interest_results(ids, scores, 3, rule="controllable", categories=categories, diversity=0.0)
    assert plain.items[0].tolist() == [0, 1, 2]
    spread = merge_interest_results(ids, scores, 3, rule="controllable", categories=categories, diversity=10.0)
    # 0 first (best); then the best B item; then the best of the rest (each disjoint from one of two)
    assert spread.items[0].tolist() == [0, 3, 1]
    assert spread.scores[0] == pytest.approx([1.0, 0.7, 0.9])
    with pytest.raises(ValueError, match="categories"):
        merge_interest_results(ids, scores, 3, rule="controllable")
    with pytest.raises(ValueError, match="diversity"):
        merge_interest_results(ids, scores, 3, rule="controllable", categories=categories, diversity=-1.0)
