r"""Path explanations over the attention-weighted collaborative knowledge graph (CKG).

KGAT's knowledge-aware attention :math:`\pi(h, r, t)` says how much of the tail :math:`t` flows into
the head :math:`h` through relation :math:`r` (softmax over each head's neighbours). A path from a
user to a recommended item through the CKG, e.g.

    user --interact--> item j --film.film.director--> entity e --rev_film.film.director--> item i

is weighted by the product of the attention of its edges, and the highest-weighted paths explain
the recommendation (Wang et al., KDD 2019, Section 4.4). Paths have two hops (``user → j → i`` over
an item–item relation) or three (``user → j → x → i`` through an entity, or through another user).
Longer paths have more factors below one, so at equal evidence a shorter path ranks first.

Everything here is NumPy over a CSR layout of the edges, so the service can answer explain requests
without torch; :class:`AttentionGraph` is the artefact stored in the serving bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData


@dataclass(frozen=True)
class PathStep:
    relation: str
    node_type: str  # "item" | "entity" | "user"
    node: int  # index within its type
    attention: float


@dataclass(frozen=True)
class ExplanationPath:
    score: float
    steps: tuple[PathStep, ...]  # from the user's first neighbour to the recommended item


@dataclass
class AttentionGraph:
    """CKG edges with their attention, in CKG node space (users, then items, then entities).

    ``relation_names[edge_type]`` names each edge's relation; ``entity_ids`` gives the raw id of
    each non-item entity (for display).
    """

    heads: np.ndarray  # int64 [E]
    tails: np.ndarray  # int64 [E]
    edge_type: np.ndarray  # int64 [E]
    attention: np.ndarray  # float32 [E]
    num_users: int
    num_items: int
    num_entities: int
    relation_names: list[str]
    entity_ids: list[str]

    def __post_init__(self) -> None:
        order = np.lexsort((self.tails, self.heads))  # CSR by head
        self.heads = np.asarray(self.heads, dtype=np.int64)[order]
        self.tails = np.asarray(self.tails, dtype=np.int64)[order]
        self.edge_type = np.asarray(self.edge_type, dtype=np.int64)[order]
        self.attention = np.asarray(self.attention, dtype=np.float32)[order]
        n = self.num_nodes
        self._out_ptr = np.searchsorted(self.heads, np.arange(n + 1))
        self._in_order = np.argsort(self.tails, kind="stable")
        self._in_ptr = np.searchsorted(self.tails[self._in_order], np.arange(n + 1))

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items + self.num_entities

    def out_edges(self, node: int) -> np.ndarray:
        return np.arange(self._out_ptr[node], self._out_ptr[node + 1])

    def in_edges(self, node: int) -> np.ndarray:
        return self._in_order[self._in_ptr[node] : self._in_ptr[node + 1]]

    def _typed(self, node: int) -> tuple[str, int]:
        if node < self.num_users:
            return "user", node
        if node < self.num_users + self.num_items:
            return "item", node - self.num_users
        return "entity", node - self.num_users - self.num_items

    def _step(self, edge: int) -> PathStep:
        node_type, index = self._typed(int(self.tails[edge]))
        return PathStep(
            self.relation_names[int(self.edge_type[edge])], node_type, index,
            float(self.attention[edge]),
        )

    def explain(self, user: int, item: int, max_paths: int = 5) -> list[ExplanationPath]:
        """The ``max_paths`` highest-weighted 2- and 3-hop paths from ``user`` to ``item``."""
        if not 0 <= user < self.num_users or not 0 <= item < self.num_items:
            raise IndexError(f"user {user} or item {item} out of range")
        target = self.num_users + item
        first = self.out_edges(user)  # user -> j
        last = self.in_edges(target)  # x -> item
        if len(first) == 0 or len(last) == 0:
            return []
        paths: list[tuple[float, tuple[int, ...]]] = []

        # Two hops: user -> j -> item, where j -> item is one of the item's in-edges.
        j_nodes = self.tails[first]
        direct = last[np.isin(self.heads[last], j_nodes)]
        if len(direct):
            first_by_j = dict(zip(j_nodes.tolist(), first.tolist()))
            for e2 in direct.tolist():
                e1 = first_by_j[int(self.heads[e2])]
                paths.append((float(self.attention[e1] * self.attention[e2]), (e1, e2)))

        # Three hops: user -> j -> x -> item. Gather every out-edge of every j, keep those whose
        # tail x has an edge into the item, then join on x.
        starts, stops = self._out_ptr[j_nodes], self._out_ptr[j_nodes + 1]
        counts = stops - starts
        middle = np.repeat(stops - counts.cumsum(), counts) + np.arange(counts.sum())
        via_first = np.repeat(first, counts)
        x_into_item = self.heads[last]
        keep = np.isin(self.tails[middle], x_into_item) & (self.tails[middle] != user)
        middle, via_first = middle[keep], via_first[keep]
        if len(middle):
            last_sorted = last[np.argsort(x_into_item, kind="stable")]
            x_sorted = self.heads[last_sorted]
            lo = np.searchsorted(x_sorted, self.tails[middle], side="left")
            hi = np.searchsorted(x_sorted, self.tails[middle], side="right")
            reps = hi - lo
            e1 = np.repeat(via_first, reps)
            e2 = np.repeat(middle, reps)
            e3 = last_sorted[np.repeat(hi - reps.cumsum(), reps) + np.arange(reps.sum())]
            scores = self.attention[e1] * self.attention[e2] * self.attention[e3]
            top = np.argsort(-scores, kind="stable")[: max_paths]
            paths.extend(
                (float(scores[t]), (int(e1[t]), int(e2[t]), int(e3[t]))) for t in top.tolist()
            )

        paths.sort(key=lambda p: -p[0])
        return [
            ExplanationPath(score, tuple(self._step(e) for e in edges))
            for score, edges in paths[:max_paths]
        ]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            target / "attention_graph.npz",
            heads=self.heads.astype(np.int32), tails=self.tails.astype(np.int32),
            edge_type=self.edge_type.astype(np.int16), attention=self.attention,
        )
        (target / "attention_graph.json").write_text(
            json.dumps(
                {
                    "num_users": self.num_users,
                    "num_items": self.num_items,
                    "num_entities": self.num_entities,
                    "relation_names": self.relation_names,
                }
            )
        )
        pl.DataFrame({"entity_id": self.entity_ids}).write_parquet(target / "entities.parquet")

    @classmethod
    def load(cls, directory: str | Path) -> AttentionGraph:
        source = Path(directory)
        arrays = np.load(source / "attention_graph.npz")
        info = json.loads((source / "attention_graph.json").read_text())
        entity_ids = pl.read_parquet(source / "entities.parquet")["entity_id"].to_list()
        return cls(
            heads=arrays["heads"], tails=arrays["tails"], edge_type=arrays["edge_type"],
            attention=arrays["attention"], entity_ids=entity_ids, **info,
        )


def attention_graph_of(model: object, data: InteractionData) -> AttentionGraph | None:
    """The attention graph of a model that exposes CKG attention (KGAT), else None.

    Such a model has ``attention() -> Tensor[E]`` aligned with its ``edge_index`` / ``edge_type``
    (the CKG of ``data``).
    """
    if not callable(getattr(model, "attention", None)) or data.snapshot is None:
        return None
    import torch

    with torch.no_grad():
        attention = model.attention().detach().cpu().numpy()
    edge_index = model.edge_index.detach().cpu().numpy()
    ckg = data.ckg
    return AttentionGraph(
        heads=edge_index[0],
        tails=edge_index[1],
        edge_type=model.edge_type.detach().cpu().numpy(),
        attention=attention,
        num_users=ckg.num_users,
        num_items=ckg.num_items,
        num_entities=ckg.num_entities,
        relation_names=list(ckg.relation_names),
        entity_ids=data.snapshot.entities.sort("entity_idx")["entity_id"].to_list(),
    )
