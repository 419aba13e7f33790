"""A collaborative KG built by hand for the KG model tests (kgat, kgin, kgcl)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.features.graph import CollaborativeKG, ckg_relation_names


def make_ckg(train: sp.spmatrix, kg, num_entities: int, num_kg_relations: int) -> CollaborativeKG:
    """CKG laid out as ``build_ckg`` does; ``kg`` rows are (head, relation, tail) in KG node space
    (items ``[0, I)``, entities ``[I, I + E)``)."""
    coo = sp.csr_matrix(train).tocoo()
    num_users, num_items = train.shape
    users, items = coo.row.astype(np.int64), coo.col.astype(np.int64) + num_users
    kg = np.asarray(kg, dtype=np.int64).reshape(-1, 3)
    head, rel, tail = kg[:, 0] + num_users, kg[:, 1], kg[:, 2] + num_users
    src = np.concatenate([users, items, head, tail])
    dst = np.concatenate([items, users, tail, head])
    etype = np.concatenate([np.zeros_like(users), np.ones_like(users), 2 + 2 * rel, 3 + 2 * rel])
    return CollaborativeKG(
        edge_index=torch.from_numpy(np.stack([src, dst])),
        edge_type=torch.from_numpy(etype),
        num_users=num_users,
        num_items=num_items,
        num_entities=num_entities,
        relation_names=ckg_relation_names([f"r{r}" for r in range(num_kg_relations)]),
    )
