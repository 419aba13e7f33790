"""Full-ranking metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from kgrec.models.evaluation import evaluate, evaluate_split

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
