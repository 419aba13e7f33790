"""The KG cold-start split: cold items drawn per seed, none of their interactions in the warm split,
the KG kept whole."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from kgrec.features.cold_start import (
    cold_start_split,
    item_triples,
    kg_linked_items,
    without_item_triples,
)
from kgrec.features.dataset import InteractionData
from kgrec.features.split import random_split


def _pairs(frame: pl.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user_idx"].to_list(), frame["item_idx"].to_list()))


@pytest.fixture(scope="module")
def log() -> pl.DataFrame:
    rng = np.random.default_rng(7)
    keys = np.unique(rng.integers(0, 60 * 50, size=1500))
    return pl.DataFrame({"user_idx": (keys // 50).astype(np.int32), "item_idx": (keys % 50).astype(np.int32)})


def test_cold_items_leave_the_warm_split_entirely(log) -> None:
    split = cold_start_split(log, kg_linked_items=np.arange(50), fraction=0.2, seed=2020)
    cold = set(split.cold_items.tolist())
    assert len(cold) == 10  # 20 % of the 50 items, all interacted and linked
    for part in (split.train, split.valid, split.test):
        assert not set(part["item_idx"].to_list()) & cold
    assert set(split.cold_test["item_idx"].to_list()) == cold
    # a partition of the log: nothing lost, nothing duplicated
    parts = [split.train, split.valid, split.test, split.cold_test]
    assert sum(p.height for p in parts) == log.height
    assert set().union(*map(_pairs, parts)) == _pairs(log)
    # the warm rows are split exactly as the retrieval split splits them
    warm = log.filter(~pl.col("item_idx").is_in(sorted(cold)))
    reference = random_split(warm, seed=2020)
    for part in ("train", "valid", "test"):
        assert getattr(split, part).equals(getattr(reference, part))
    assert split.retrieval.kind == "cold_start"


def test_fraction_determinism_and_seed(log) -> None:
    a = cold_start_split(log, np.arange(50), seed=2020)
    b = cold_start_split(log.sample(fraction=1.0, shuffle=True, seed=3), np.arange(50), seed=2020)
    assert np.array_equal(a.cold_items, b.cold_items)  # row order does not move the draw
    assert a.train.equals(cold_start_split(log, np.arange(50), seed=2020).train)
    c = cold_start_split(log, np.arange(50), seed=2021)
    assert not np.array_equal(a.cold_items, c.cold_items)
    assert len(cold_start_split(log, np.arange(50), fraction=0.1).cold_items) == 5
    # only KG-linked items with an interaction are eligible
    linked = np.arange(0, 50, 2)
    d = cold_start_split(log, np.r_[linked, 1000], fraction=0.2)
    assert d.candidates == 25 and len(d.cold_items) == 5
    assert set(d.cold_items.tolist()) <= set(linked.tolist())
    with pytest.raises(ValueError):
        cold_start_split(log, np.arange(50), fraction=1.0)


def test_real_music_cold_start_keeps_the_kg(music_ingested) -> None:
    _, snap = music_ingested
    split = cold_start_split(snap.interactions, kg_linked_items(snap))
    assert split.candidates == 3846 and len(split.cold_items) == round(0.2 * 3846)
    assert split.cold_test.height + sum(split.retrieval.sizes().values()) == snap.interactions.height
    data = InteractionData.from_snapshot(snap, split.retrieval)
    for matrix in (data.train, data.valid, data.test):
        assert matrix[:, split.cold_items].nnz == 0
    # the CKG holds every KG triple: cold item nodes keep their KG edges, and have no interaction
    ckg = data.ckg
    assert ckg.edge_index.size(1) == 2 * data.train.nnz + 2 * snap.kg.height
    head, etype = ckg.edge_index[0].numpy(), ckg.edge_type.numpy()
    cold_nodes = snap.n_users + split.cold_items
    assert np.isin(cold_nodes, head[etype >= 2]).all()  # every music item has a KG triple
    assert not np.isin(cold_nodes, head[etype == 1]).any()
    # the inductive graph: the cold items' triples removed, and only those
    reduced = without_item_triples(snap, split.cold_items)
    dropped = item_triples(snap, split.cold_items)
    assert reduced.kg.height + dropped.height == snap.kg.height
    cold = split.cold_items.tolist()
    assert not (reduced.kg["head"].is_in(cold) | reduced.kg["tail"].is_in(cold)).any()
    assert reduced.hash != snap.hash and reduced.n_entities == snap.n_entities
