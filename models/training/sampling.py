"""Vectorised uniform negative sampling that never returns a user's training positive."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


class NegativeSampler:
    r"""Uniform item sampler with rejection of the user's training positives.

    The positives are kept as the sorted keys ``user * num_items + item``; a candidate is tested with
    one :func:`torch.searchsorted` over the whole batch and rejected entries are redrawn, so the cost
    is a few vectorised passes instead of a Python loop over users or samples. Each round keeps an
    entry with probability ``1 - |I_u| / I``, so a handful of rounds suffice unless a user has seen
    almost every item; after ``max_rounds`` any entry still colliding is left as is (the only case
    is a user whose positives cover nearly the whole catalogue, where no true negative may exist).

    Args:
        positives: users × items CSR matrix of the interactions to reject (the training split).
        max_rounds: how many times rejected entries are redrawn.
    """

    def __init__(self, positives: sp.csr_matrix, max_rounds: int = 50) -> None:
        coo = sp.csr_matrix(positives).tocoo()
        self.num_users, self.num_items = coo.shape
        keys = coo.row.astype(np.int64) * self.num_items + coo.col.astype(np.int64)
        self.keys = torch.from_numpy(np.unique(keys))  # sorted and deduplicated
        self.max_rounds = max_rounds

    def is_positive(self, users: Tensor, items: Tensor) -> Tensor:
        """Boolean mask: is ``(users[k], items[k])`` a known positive?"""
        if self.keys.numel() == 0:
            return torch.zeros_like(users, dtype=torch.bool)
        keys = users.to(torch.int64) * self.num_items + items.to(torch.int64)
        pos = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        return self.keys[pos] == keys

    def sample(self, users: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One uniformly drawn non-positive item per entry of ``users`` (a CPU ``LongTensor``)."""
        users = users.to(torch.int64)
        items = torch.randint(0, self.num_items, users.shape, generator=generator)
        # Each round re-tests only the entries it redrew: the same draws as re-testing them all.
        bad = self.is_positive(users, items).nonzero().view(-1)
        for _ in range(self.max_rounds):
            if bad.numel() == 0:
                break
            users_bad = users[bad]
            redrawn = torch.randint(0, self.num_items, (bad.numel(),), generator=generator)
            items[bad] = redrawn
            bad = bad[self.is_positive(users_bad, redrawn)]
        return items
