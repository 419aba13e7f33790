"""Shared fixtures: tiny InteractionData instances built directly (no snapshot, no split)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from kgrec.features.dataset import InteractionData


def make_data(train_pairs, valid_pairs, test_pairs, num_users: int, num_items: int) -> InteractionData:
    def csr(pairs) -> sp.csr_matrix:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        return sp.csr_matrix(
            (np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape=(num_users, num_items)
        )

    return InteractionData(
        num_users=num_users,
        num_items=num_items,
        train=csr(train_pairs),
        valid=csr(valid_pairs),
        test=csr(test_pairs),
        snapshot=None,
        split=None,
    )


@pytest.fixture(scope="session")
def planted_data() -> InteractionData:
    """160 users and 80 items in 4 communities: each user likes 10 of its community's 20 items.

    Split per user 8/1/1, so a model that learns the communities ranks the held-out item far above
    chance (recall@10 of random ranking ~ 10/72 ~ 0.14).
    """
    rng = np.random.default_rng(0)
    num_users, num_items, groups = 160, 80, 4
    per_group = num_items // groups
    train, valid, test = [], [], []
    for u in range(num_users):
        g = u % groups
        items = g * per_group + rng.choice(per_group, size=10, replace=False)
        train += [(u, i) for i in items[:8]]
        valid.append((u, items[8]))
        test.append((u, items[9]))
    return make_data(train, valid, test, num_users, num_items)


@pytest.fixture(scope="session")
def tiny_data() -> InteractionData:
    """4 users × 5 items, small enough for dense reference computations."""
    train = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 3), (3, 0), (3, 4)]
    valid = [(0, 2), (1, 3), (2, 4)]
    test = [(0, 3), (2, 0), (3, 1)]
    return make_data(train, valid, test, 4, 5)
