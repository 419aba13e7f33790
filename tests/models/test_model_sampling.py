"""Negative sampling: never a training positive, uniform over the rest, seeded."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.models.training.sampling import NegativeSampler


def test_negatives_never_hit_training_positives():
    rng = np.random.default_rng(1)
    dense = rng.random((50, 30)) < 0.6  # dense positives force many rejection rounds
    dense[:, 0] = False  # every user keeps at least one negative
    train = sp.csr_matrix(dense.astype(np.float32))
    sampler = NegativeSampler(train)
    users = torch.arange(50).repeat_interleave(200)
    negs = sampler.sample(users, torch.Generator().manual_seed(0))
    assert negs.min() >= 0 and negs.max() < 30
    assert not dense[users.numpy(), negs.numpy()].any()
    assert not sampler.is_positive(users, negs).any()


def test_negatives_roughly_uniform_and_seeded():
    train = sp.csr_matrix((np.ones(10, np.float32), ([0] * 10, list(range(10)))), shape=(1, 20))
    sampler = NegativeSampler(train)
    users = torch.zeros(20_000, dtype=torch.long)
    negs = sampler.sample(users, torch.Generator().manual_seed(0))
    counts = torch.bincount(negs, minlength=20).double()
    assert counts[:10].sum() == 0
    expected = 2000.0
    chi2 = ((counts[10:] - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0  # 9 degrees of freedom; p ~ 4e-4
    again = sampler.sample(users, torch.Generator().manual_seed(0))
    assert torch.equal(negs, again)
