"""What a KGAT bundle carries to embed an item posted after training (``POST /v1/items``).

The bundle's ``item_embeddings.npy`` are final vectors only. Embedding a NEW item from its KG facts
(:class:`kgrec.models.cold_start.InductiveKGAT`) needs the trained layers and every item's and
entity's cached layer inputs, so a KGAT bundle also stores, in ``inductive/`` (listed in the bundle's
manifest like every other file)::

    inductive/kgat.pt        torch.save of plain tensors (loaded weights_only): InductiveKGAT.state_dict()
                             -- the layer inputs of the item and entity nodes, relation embeddings
                             and projections, the layers' weights, the prior mean ego and the
                             ``regress`` map
    inductive/kgat.json      the sizes and settings (dims, aggregator, use_attention, ...), the ego
                             estimate chosen at export (``ego``, ``ego_selection``: "validation" when
                             :func:`~kgrec.models.cold_start.choose_ego` picked it on validation
                             Recall@20, "default" otherwise, with the figures) and the KG relation
                             names (``relations``, in ``relation_idx`` order)
    inductive/nodes.parquet  entity_id: str, node: int32 -- the KG node (snapshot KG node space) of
                             every non-item entity and of every item's linked entity

A posted fact is ``{relation, entity}`` with raw names: ``relation`` a KG relation name of the
snapshot (the item is the triple's head) or ``rev_<name>`` (the item is its tail: KGAT's CKG holds the
inverse of every KG relation, trained by TransR and the attention like the forward one); ``entity``
an entity id of the snapshot's KG or an item's linked entity id (not an item id: on some datasets
item and entity ids share one namespace of numbers). :meth:`ItemEmbedder.resolve` turns them into
CKG ``(relation id, node)`` facts or raises a 422 (:class:`UnknownRelationError`,
:class:`UnknownEntityError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from kgrec.features.graph import REV_PREFIX
from kgrec.models.cold_start import InductiveKGAT
from kgrec.models.persistence import load_tensors
from kgrec.serving.errors import CandidateError, quote_input

INDUCTIVE_DIRNAME = "inductive"
TENSORS_FILE = "kgat.pt"
CONFIG_FILE = "kgat.json"
NODES_FILE = "nodes.parquet"
METHOD = "inductive_kgat"
#: Relation names a 422 lists.
SHOWN_RELATIONS = 8

Fact = tuple[str, str]  # (relation name, entity id)


class FactError(CandidateError):
    """A posted fact the served model cannot use (422; ``loc`` names the fact's field)."""

    status_code = 422

    def __init__(self, message: str, loc: Sequence[str | int]):
        super().__init__(message)
        self.loc = list(loc)


class UnknownRelationError(FactError):
    pass


class UnknownEntityError(FactError):
    pass


class ItemEmbedder:
    """The inductive KGAT embedding of posted items and the raw-name maps of its facts."""

    def __init__(
        self,
        inductive: InductiveKGAT,
        relation_names: Sequence[str],
        entity_ids: Sequence[str],
        entity_nodes: np.ndarray,
        ego: str,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if inductive.num_relations != 2 + 2 * len(relation_names):
            raise ValueError(f"{len(relation_names)} KG relation names for a CKG of {inductive.num_relations} "
                             "relations (expected 2 + 2 per KG relation)")
        self.inductive = inductive
        self.relation_names = [str(r) for r in relation_names]
        self.entity_ids = [str(e) for e in entity_ids]
        self.entity_nodes = np.asarray(entity_nodes, dtype=np.int64)
        if len(self.entity_ids) != len(self.entity_nodes):
            raise ValueError("entity ids and nodes differ in length")
        kg_nodes = inductive.num_nodes - inductive.num_users
        if len(self.entity_nodes) and (self.entity_nodes.min() < 0 or self.entity_nodes.max() >= kg_nodes):
            raise ValueError(f"entity nodes outside the KG node space [0, {kg_nodes})")
        self.ego = str(ego)
        self.info = dict(info or {})
        # CKG ids: KG relation r is 2 + 2r (the item is the head), rev_r is 3 + 2r (the item is the tail);
        # a KG relation literally named "rev_x" keeps its own id over the inverse of "x"
        ids: dict[str, int] = {}
        for r, name in enumerate(self.relation_names):
            ids[name] = 2 + 2 * r
        for r, name in enumerate(self.relation_names):
            ids.setdefault(REV_PREFIX + name, 3 + 2 * r)
        self._relation_ids = ids
        self._node_of = dict(zip(self.entity_ids, self.entity_nodes.tolist()))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls, inductive: InductiveKGAT, snapshot: Any, ego: str, info: Mapping[str, Any] | None = None
    ) -> ItemEmbedder:
        """The embedder of a KGAT trained on ``snapshot`` (a :class:`~kgrec.features.snapshot.Snapshot`:
        its relation names and its entities' and linked items' ids give the maps)."""
        linked = snapshot.items.filter(pl.col("entity_id").is_not_null())
        entities = snapshot.entities
        ids = linked["entity_id"].to_list() + entities["entity_id"].to_list()
        nodes = np.concatenate([
            linked["item_idx"].to_numpy().astype(np.int64),
            snapshot.n_items + entities["entity_idx"].to_numpy().astype(np.int64),
        ])
        return cls(inductive, snapshot.relation_names(), ids, nodes, ego, info)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, config = self.inductive.state_dict()
        doc = {**config, "ego": self.ego, "relations": self.relation_names, **self.info}
        text = json.dumps(doc, indent=2, sort_keys=True)
        torch.save(tensors, directory / TENSORS_FILE)
        (directory / CONFIG_FILE).write_text(text, encoding="utf-8")
        pl.DataFrame({"entity_id": pl.Series(self.entity_ids, dtype=pl.String),
                      "node": self.entity_nodes.astype(np.int32)}).write_parquet(directory / NODES_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ItemEmbedder:
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        tensors = load_tensors(directory / TENSORS_FILE)
        nodes = pl.read_parquet(directory / NODES_FILE)
        inductive = InductiveKGAT.from_state_dict(tensors, config)
        skip = {"relations", "ego", "class", "num_users", "num_items", "num_nodes", "num_relations", "dims",
                "aggregator", "negative_slope", "use_attention", "ridge"}
        info = {k: v for k, v in config.items() if k not in skip}
        return cls(inductive, config["relations"], nodes["entity_id"].to_list(), nodes["node"].to_numpy(),
                   config["ego"], info)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.inductive.dim

    @property
    def num_users(self) -> int:
        return self.inductive.num_users

    @property
    def num_items(self) -> int:
        return self.inductive.num_items

    def describe(self) -> dict[str, Any]:
        """How a posted item is embedded (the 201 answer and ``/v1/model``)."""
        out = {"method": METHOD, "ego": self.ego, "use_attention": self.inductive.use_attention}
        if "ego_selection" in self.info:
            out["ego_selection"] = self.info["ego_selection"]
        return out

    # ------------------------------------------------------------------ facts
    def resolve(self, facts: Sequence[Fact]) -> list[tuple[int, int]]:
        """CKG ``(relation, node)`` facts of raw ``(relation name, entity id)`` pairs, duplicates
        dropped (order kept); a 422 naming the first fact that is not usable."""
        out: list[tuple[int, int]] = []
        seen: set[tuple[int, int]] = set()
        offset = self.inductive.num_users
        for position, (relation, entity) in enumerate(facts):
            rel = self._relation_ids.get(relation)
            if rel is None:
                raise UnknownRelationError(self._unknown_relation(relation), ["body", "facts", position, "relation"])
            node = self._node_of.get(entity)
            if node is None:
                raise UnknownEntityError(
                    f"unknown entity {quote_input(entity, 80)}: not an entity of the served model's knowledge "
                    "graph (nor an item's linked entity)", ["body", "facts", position, "entity"])
            fact = (rel, offset + node)
            if fact not in seen:
                seen.add(fact)
                out.append(fact)
        return out

    def _unknown_relation(self, relation: str) -> str:
        shown = ", ".join(self.relation_names[:SHOWN_RELATIONS])
        more = len(self.relation_names) - SHOWN_RELATIONS
        more_text = f", ... (+{more} more)" if more > 0 else ""
        return (f"unknown relation {quote_input(relation, 80)}; known: {shown}{more_text} "
                f"(and {REV_PREFIX}<name> when the item is the triple's tail)")

    def embed(self, resolved: Sequence[Sequence[tuple[int, int]]]) -> np.ndarray:
        """Final retrieval vectors ``float32 [B, dim]`` of items from their resolved facts."""
        with torch.no_grad():
            vectors = self.inductive.embed(list(resolved), self.ego)  # type: ignore[arg-type]
        return vectors.detach().cpu().numpy().astype(np.float32)
