"""Model-ready view of one dataset split: sparse interaction matrices plus lazily built graphs."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import scipy.sparse as sp
from kgrec.features.graph import build_ckg, build_hetero_graph

if TYPE_CHECKING:
    from kgrec.features.graph import CollaborativeKG
    from kgrec.features.snapshot import Snapshot
    from kgrec.features.split import Split
    from torch_geometric.data import HeteroData


def interaction_matrix(frame: pl.DataFrame, num_users: int, num_items: int) -> sp.csr_matrix:
    """Binary users × items CSR matrix of the (user_idx, item_idx) pairs in ``frame``."""
    users = frame["user_idx"].to_numpy().astype(np.int64, copy=False)
    items = frame["item_idx"].to_numpy().astype(np.int64, copy=False)
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(num_users, num_items)
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


@dataclass
class InteractionData:
    """What a model trains and is evaluated on.

    ``train``/``valid``/``test`` are users × items CSR matrices (float32 ones). ``snapshot`` and
    ``split`` are optional so that tests can build tiny instances directly; the graphs need the
    snapshot (its knowledge graph).
    """

    num_users: int
    num_items: int
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    snapshot: Snapshot | None = None
    split: Split | None = field(default=None, repr=False)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, split: Split) -> InteractionData:
        shape = (snapshot.n_users, snapshot.n_items)
        return cls(
            num_users=shape[0],
            num_items=shape[1],
            train=interaction_matrix(split.train, *shape),
            valid=interaction_matrix(split.valid, *shape),
            test=interaction_matrix(split.test, *shape),
            snapshot=snapshot,
            split=split,
        )

    @cached_property
    def ckg(self) -> CollaborativeKG:

        if self.snapshot is None or self.split is None:
            raise ValueError("the collaborative knowledge graph needs a snapshot and a split")
        return build_ckg(self.snapshot, self.split.train)

    @cached_property
    def hetero(self) -> HeteroData:

        if self.snapshot is None or self.split is None:
            raise ValueError("the heterogeneous graph needs a snapshot and a split")
        return build_hetero_graph(self.snapshot, self.split.train)
