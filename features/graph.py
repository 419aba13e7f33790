"""Graphs built from a snapshot's KG and the TRAIN interactions only (no leakage from valid/test).

Index spaces (ARCHITECTURE.md): CKG nodes are users ``[0, U)``, items ``[U, U+I)``, entities
``[U+I, U+I+E)``; relation ids ``0 = interact``, ``1 = rev_interact``, then for KG relation ``r``:
``2 + 2r = r`` and ``3 + 2r = rev_r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

if TYPE_CHECKING:
    from kgrec.features.snapshot import Snapshot
    from torch_geometric.data import HeteroData

INTERACT = "interact"
REV_PREFIX = "rev_"


@dataclass(frozen=True)
class CollaborativeKG:
    """User-item interactions and the KG as one typed, directed graph (both directions)."""

    edge_index: torch.Tensor  # LongTensor [2, E]
    edge_type: torch.Tensor  # LongTensor [E]
    num_users: int
    num_items: int
    num_entities: int
    relation_names: list[str]

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items + self.num_entities

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)


def _pairs(frame: pl.DataFrame, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    return frame[a].to_numpy().astype(np.int64), frame[b].to_numpy().astype(np.int64)


def ckg_relation_names(kg_relations: list[str]) -> list[str]:
    """``["interact", "rev_interact", r0, "rev_r0", r1, ...]`` aligned with CKG edge type ids."""
    names = [INTERACT, REV_PREFIX + INTERACT]
    for rel in kg_relations:
        names += [rel, REV_PREFIX + rel]
    return names


def build_ckg(snapshot: Snapshot, train: pl.DataFrame) -> CollaborativeKG:
    """The collaborative KG of ``snapshot`` with ``train`` as its only user-item edges."""
    n_users, n_items = snapshot.n_users, snapshot.n_items
    users, items = _pairs(train, "user_idx", "item_idx")
    head, tail = _pairs(snapshot.kg, "head", "tail")
    relation = snapshot.kg["relation"].to_numpy().astype(np.int64)
    items_ckg = items + n_users
    head_ckg, tail_ckg = head + n_users, tail + n_users  # KG node space starts at the items
    src = np.concatenate([users, items_ckg, head_ckg, tail_ckg])
    dst = np.concatenate([items_ckg, users, tail_ckg, head_ckg])
    etype = np.concatenate(
        [
            np.zeros(len(users), np.int64),
            np.ones(len(users), np.int64),
            2 + 2 * relation,
            3 + 2 * relation,
        ]
    )
    return CollaborativeKG(
        edge_index=torch.from_numpy(np.stack([src, dst])),
        edge_type=torch.from_numpy(etype),
        num_users=n_users,
        num_items=n_items,
        num_entities=snapshot.n_entities,
        relation_names=ckg_relation_names(snapshot.relation_names()),
    )


def build_hetero_graph(snapshot: Snapshot, train: pl.DataFrame) -> HeteroData:
    """PyG ``HeteroData``: node types user/item/entity (local indices), TRAIN interactions both
    ways, and per KG relation ``(src_type, rel, dst_type)`` plus ``(dst_type, "rev_" + rel, src_type)``
    where a type is ``item`` (KG node < n_items) or ``entity``."""
    from torch_geometric.data import HeteroData

    n_items = snapshot.n_items
    data = HeteroData()
    data["user"].num_nodes = snapshot.n_users
    data["item"].num_nodes = n_items
    data["entity"].num_nodes = snapshot.n_entities

    users, items = _pairs(train, "user_idx", "item_idx")
    data["user", "interacts", "item"].edge_index = torch.from_numpy(np.stack([users, items]))
    data["item", "rev_interacts", "user"].edge_index = torch.from_numpy(np.stack([items, users]))

    head, tail = _pairs(snapshot.kg, "head", "tail")
    relation = snapshot.kg["relation"].to_numpy().astype(np.int64)
    head_is_entity = (head >= n_items).astype(np.int64)
    tail_is_entity = (tail >= n_items).astype(np.int64)
    head_local = head - n_items * head_is_entity
    tail_local = tail - n_items * tail_is_entity
    # One group per (relation, head type, tail type); loop over groups, not edges.
    key = relation * 4 + head_is_entity * 2 + tail_is_entity
    order = np.argsort(key, kind="stable")
    groups, starts = np.unique(key[order], return_index=True)
    bounds = np.r_[starts, len(order)]
    node_type = ("item", "entity")
    names = snapshot.relation_names()
    for g, k in enumerate(groups):
        rows = order[bounds[g] : bounds[g + 1]]
        rel = names[int(k) // 4]
        src_t, dst_t = node_type[(int(k) >> 1) & 1], node_type[int(k) & 1]
        forward = np.stack([head_local[rows], tail_local[rows]])
        data[src_t, rel, dst_t].edge_index = torch.from_numpy(forward)
        data[dst_t, REV_PREFIX + rel, src_t].edge_index = torch.from_numpy(forward[::-1].copy())
    return data
