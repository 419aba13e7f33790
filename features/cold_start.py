"""The KG cold-start split of the benchmark protocol (``../shared/data/README.md``, "Cold-start split").

Among the KG-linked items with at least one interaction, ``fraction`` (20 %) are drawn uniformly at
random with ``seed`` (2020): the *cold items*. Every interaction of a cold item goes to the cold test
set; the remaining (warm) interactions are split per user 80/10/10 exactly as the retrieval split
(:func:`~kgrec.features.split.random_split`, same seed). The knowledge graph is not touched: every
triple is kept, those of the cold items too, so a graph built from the warm split
(:func:`~kgrec.features.graph.build_ckg`, which takes the user-item edges from ``train`` only) holds a
cold item as a CKG node with its KG edges and no interaction.

For the inductive setting -- an item the model has never seen, not even as a node with KG edges --
:func:`without_item_triples` gives a snapshot whose KG lacks the triples touching given items, and
:func:`item_triples` the triples it dropped (the facts the item brings when it is posted).
:func:`without_items` goes one step further: a catalogue in which the items do not exist at all (no
row, no interaction, no triple; the other items and the entities renumbered), as a service knows
the catalogue before the items are posted to it (``POST /v1/items``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import scipy.sparse as sp
from kgrec.features.split import Split, random_split

if TYPE_CHECKING:
    from kgrec.features.snapshot import Snapshot

KIND = "cold_start"


@dataclass(frozen=True)
class ColdStartSplit:
    """The warm retrieval split, the cold items and their interactions.

    ``retrieval``: the 80/10/10 per-user split of the warm interactions (no row of a cold item in
    any of its three parts; ``kind == "cold_start"``). ``cold_items``: sorted ``item_idx`` of the
    cold items (int64). ``cold_test``: every interaction of a cold item, with the snapshot's columns.
    ``candidates``: how many items were eligible (KG-linked with at least one interaction).
    """

    retrieval: Split
    cold_items: np.ndarray
    cold_test: pl.DataFrame
    fraction: float
    seed: int
    candidates: int

    @property
    def train(self) -> pl.DataFrame:
        return self.retrieval.train

    @property
    def valid(self) -> pl.DataFrame:
        return self.retrieval.valid

    @property
    def test(self) -> pl.DataFrame:
        return self.retrieval.test

    def cold_mask(self, num_items: int) -> np.ndarray:
        """Boolean ``[num_items]``: is the item cold?"""
        mask = np.zeros(num_items, dtype=bool)
        mask[self.cold_items] = True
        return mask

    def cold_truth(self, num_users: int, num_items: int) -> sp.csr_matrix:
        """Users × items CSR (float32 ones) of the cold test interactions."""
        users = self.cold_test["user_idx"].to_numpy().astype(np.int64)
        items = self.cold_test["item_idx"].to_numpy().astype(np.int64)
        matrix = sp.csr_matrix(
            (np.ones(len(users), np.float32), (users, items)), shape=(num_users, num_items)
        )
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        return matrix

    def sizes(self) -> dict[str, int]:
        return {**self.retrieval.sizes(), "cold_test": self.cold_test.height,
                "cold_items": int(len(self.cold_items)), "candidates": self.candidates}


def kg_linked_items(snapshot: Snapshot) -> np.ndarray:
    """``item_idx`` of the snapshot's items linked to a KG entity (all of them on the benchmark
    datasets, which keep only linked items)."""
    items = snapshot.items.filter(pl.col("entity_id").is_not_null())["item_idx"]
    return np.sort(items.to_numpy().astype(np.int64))


def cold_start_split(
    interactions: pl.DataFrame,
    kg_linked_items: Iterable[int] | np.ndarray,
    fraction: float = 0.2,
    seed: int = 2020,
) -> ColdStartSplit:
    """The protocol's cold-start split of ``interactions`` (``user_idx``, ``item_idx``, ...).

    Eligible items: those in ``kg_linked_items`` with at least one row in ``interactions``, sorted
    by ``item_idx`` (so that the draw does not depend on row order). ``round(fraction * n)`` of them
    are drawn without replacement, uniformly, with ``numpy.random.default_rng(seed)`` (at least one
    when ``fraction > 0`` and an item is eligible). Their rows form ``cold_test``; the other rows go
    through :func:`random_split` with the same ``seed`` (per user, 80/10/10). Interactions of items
    that are not KG-linked stay warm (the benchmark datasets have none).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    linked = np.unique(np.asarray(list(kg_linked_items) if not isinstance(kg_linked_items, np.ndarray)
                                  else kg_linked_items, dtype=np.int64))
    items = interactions["item_idx"].to_numpy().astype(np.int64)
    eligible = np.intersect1d(np.unique(items), linked)  # sorted
    n_cold = int(round(fraction * len(eligible)))
    if fraction > 0 and len(eligible) and n_cold == 0:
        n_cold = 1
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(eligible, size=n_cold, replace=False)) if n_cold else eligible[:0]
    is_cold = np.isin(items, cold)
    warm = interactions.filter(pl.Series(~is_cold))
    cold_test = interactions.filter(pl.Series(is_cold))
    retrieval = dataclasses.replace(random_split(warm, seed=seed), kind=KIND)
    return ColdStartSplit(
        retrieval=retrieval,
        cold_items=cold.astype(np.int64),
        cold_test=cold_test,
        fraction=float(fraction),
        seed=int(seed),
        candidates=int(len(eligible)),
    )


def _touches(kg: pl.DataFrame, items: np.ndarray) -> pl.Series:
    keys = pl.Series(np.asarray(items, dtype=np.int64)).cast(kg["head"].dtype)
    return kg["head"].is_in(keys) | kg["tail"].is_in(keys)


def item_triples(snapshot: Snapshot, items: Iterable[int] | np.ndarray) -> pl.DataFrame:
    """The snapshot's KG triples (KG node space) with one of ``items`` as head or tail."""
    return snapshot.kg.filter(_touches(snapshot.kg, np.asarray(list(items), dtype=np.int64)))


def without_item_triples(snapshot: Snapshot, items: Iterable[int] | np.ndarray) -> Snapshot:
    """A copy of ``snapshot`` whose KG lacks every triple touching one of ``items``: the graph of
    a catalogue in which those items do not exist yet (the node ids are unchanged, so the items
    are isolated CKG nodes). Its ``hash`` is derived from the original's and the items, so that
    lineage never confuses it with the snapshot."""
    items = np.unique(np.asarray(list(items), dtype=np.int64))
    kg = snapshot.kg.filter(~_touches(snapshot.kg, items))
    digest = hashlib.sha256(f"{snapshot.hash}\x00without_item_triples\x00".encode())
    digest.update(items.tobytes())
    manifest = {**snapshot.manifest, "hash": digest.hexdigest(),
                "derived_from": {"hash": snapshot.hash, "without_item_triples": int(len(items))}}
    return dataclasses.replace(snapshot, kg=kg, manifest=manifest)


def without_items(snapshot: Snapshot, items: Iterable[int] | np.ndarray) -> Snapshot:
    """A copy of ``snapshot`` without ``items`` (``item_idx``): their rows, interactions and every
    triple touching them removed; the remaining items renumbered ``0 ..< n_items - len(items)`` in
    their order, and the non-item KG nodes moved down by ``len(items)`` (KG node space: items,
    then entities). Users, entities and relations are unchanged. The hash is derived from the
    original's and the items (as :func:`without_item_triples`'s)."""
    items = np.unique(np.asarray(list(items) if not isinstance(items, np.ndarray) else items, dtype=np.int64))
    n_items = snapshot.n_items
    keep = np.ones(n_items, dtype=bool)
    keep[items] = False
    new_idx = np.full(n_items, -1, dtype=np.int64)
    new_idx[keep] = np.arange(int(keep.sum()))
    m = len(items)

    def node(column: str) -> pl.Expr:
        old = pl.col(column).cast(pl.Int64)
        moved = pl.when(old >= n_items).then(old - m).otherwise(
            old.replace_strict(np.arange(n_items), new_idx, default=-1))
        return moved.cast(pl.Int32).alias(column)

    kg = snapshot.kg.filter(~_touches(snapshot.kg, items)).with_columns(node("head"), node("tail"))
    is_kept = pl.Series(keep)
    kept_items = snapshot.items.sort("item_idx").filter(is_kept).with_columns(
        pl.Series("item_idx", np.arange(int(keep.sum()), dtype=np.int32)))
    item_keys = pl.Series(items).cast(snapshot.interactions["item_idx"].dtype)
    interactions = snapshot.interactions.filter(~pl.col("item_idx").is_in(item_keys.implode())).with_columns(
        pl.col("item_idx").replace_strict(np.arange(n_items), new_idx).cast(pl.Int32))
    digest = hashlib.sha256(f"{snapshot.hash}\x00without_items\x00".encode())
    digest.update(items.tobytes())
    manifest = {**snapshot.manifest, "hash": digest.hexdigest(),
                "derived_from": {"hash": snapshot.hash, "without_items": int(m)}}
    return dataclasses.replace(snapshot, kg=kg, items=kept_items, interactions=interactions, manifest=manifest)
