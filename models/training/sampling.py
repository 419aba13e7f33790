"""Vectorised uniform negative sampling that never returns a user's training positive."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

#: Indices into a batch: ``slice(None)`` for all of it, else a LongTensor of positions.
Positions = slice | Tensor


def redraw_rejected(
    values: Tensor,
    rejected: Callable[[Positions, Tensor], Tensor],
    draw: Callable[[Tensor], Tensor],
    max_rounds: int,
) -> Tensor:
    """``values`` with every entry that ``rejected(positions, values[positions])`` flags redrawn by
    ``draw(positions)``, for at most ``max_rounds`` rounds (in place; entries still rejected then
    are kept). Each round re-tests only the entries it redrew -- the others hold a value already
    accepted -- so the draws are those of re-testing the whole batch, at a fraction of the cost
    when a few saturated entries keep colliding for every round."""
    bad = rejected(slice(None), values).nonzero().view(-1)
    for _ in range(max_rounds):
        if bad.numel() == 0:
            break
        redrawn = draw(bad)
        values[bad] = redrawn
        bad = bad[rejected(bad, redrawn)]
    return values


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
        return redraw_rejected(
            items,
            lambda at, candidates: self.is_positive(users[at], candidates),
            lambda at: torch.randint(0, self.num_items, (at.numel(),), generator=generator),
            self.max_rounds,
        )
