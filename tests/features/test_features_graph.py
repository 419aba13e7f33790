from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.graph import build_ckg, build_hetero_graph
from kgrec.features.ingest import ingest
from kgrec.features.snapshot import load_snapshot
from kgrec.features.split import random_split


def test_tiny_ckg_ids(make_spec, tmp_path: Path) -> None:
    snap = load_snapshot(ingest(make_spec(), tmp_path / "out").snapshot_dir)
    train = snap.interactions  # u1-i1, u1-i2, u3-i2 as (0,0), (0,1), (1,1)
    ckg = build_ckg(snap, train)
    U, I = snap.n_users, snap.n_items
    assert ckg.num_nodes == U + I + snap.n_entities == 2 + 3 + 2
    assert ckg.relation_names == ["interact", "rev_interact", "r1", "rev_r1", "r2", "rev_r2"]
    edges = {(int(s), int(d), int(t)) for (s, d), t in zip(ckg.edge_index.T.tolist(), ckg.edge_type.tolist(), strict=True)}
    # user 0 -> item 0 (CKG id U + 0); KG e1 -r1-> e10: item 0 -> entity 0 (CKG id U + I + 0)
    assert (0, U + 0, 0) in edges and (U + 0, 0, 1) in edges
    assert (U + 0, U + I + 0, 2) in edges and (U + I + 0, U + 0, 3) in edges
    assert (U + 1, U + I + 0, 4) in edges  # e2 -r2-> e10
    assert ckg.edge_index.dtype == torch.long and ckg.edge_type.dtype == torch.long


def test_real_music_ckg_and_hetero(music_ingested) -> None:
    _, snap = music_ingested
    split = random_split(snap.interactions)
    train = split.train
    U, I, E, R = snap.n_users, snap.n_items, snap.n_entities, snap.n_relations
    n_triples = snap.kg.height

    ckg = build_ckg(snap, train)
    assert ckg.num_nodes == U + I + E
    assert ckg.num_relations == len(ckg.relation_names) == 2 + 2 * R
    assert ckg.relation_names[2::2] == snap.relation_names()
    assert ckg.edge_index.shape == (2, 2 * train.height + 2 * n_triples)
    types = ckg.edge_type.numpy()
    assert (types == 0).sum() == (types == 1).sum() == train.height  # only TRAIN interactions
    assert (types >= 2).sum() == 2 * n_triples
    src, dst = ckg.edge_index.numpy()
    assert src[types == 0].max() < U and dst[types == 0].min() >= U and dst[types == 0].max() < U + I
    assert src[types >= 2].min() >= U and ckg.edge_index.max() < ckg.num_nodes
    # relation counts per type match the snapshot's KG
    expected = np.bincount(snap.kg["relation"].to_numpy(), minlength=R)
    assert np.array_equal(np.bincount((types[types >= 2] - 2) // 2, minlength=R), 2 * expected)
    # no validation/test pair leaks into the graph
    user_item = set(zip(src[types == 0].tolist(), (dst[types == 0] - U).tolist(), strict=True))
    assert user_item == set(train.select("user_idx", "item_idx").iter_rows())

    hetero = build_hetero_graph(snap, train)
    hetero.validate()
    assert (hetero["user"].num_nodes, hetero["item"].num_nodes, hetero["entity"].num_nodes) == (U, I, E)
    assert hetero["user", "interacts", "item"].edge_index.shape == (2, train.height)
    assert hetero["item", "rev_interacts", "user"].edge_index.shape == (2, train.height)
    kg_types = [et for et in hetero.edge_types if et[1] not in ("interacts", "rev_interacts")]
    assert sum(hetero[et].edge_index.shape[1] for et in kg_types) == 2 * n_triples
    forward = [et for et in kg_types if not et[1].startswith("rev_")]
    assert {et[1] for et in forward} == set(snap.relation_names())
    for src_t, rel, dst_t in forward:
        fwd, rev = hetero[src_t, rel, dst_t].edge_index, hetero[dst_t, "rev_" + rel, src_t].edge_index
        assert torch.equal(fwd.flip(0), rev)
        assert fwd[0].max() < hetero[src_t].num_nodes and fwd[1].max() < hetero[dst_t].num_nodes
    # local ids map back to KG node space
    kg_nodes = set(snap.kg.select("head", "relation", "tail").iter_rows())
    names = snap.relation_names()
    offset = {"item": 0, "entity": I}
    some = forward[0]
    h, t = hetero[some].edge_index
    r = names.index(some[1])
    assert {(int(a) + offset[some[0]], r, int(b) + offset[some[2]]) for a, b in zip(h, t, strict=True)} <= kg_nodes


def test_interaction_data_uses_graph(music_ingested) -> None:
    _, snap = music_ingested
    split = random_split(snap.interactions)
    data = InteractionData.from_snapshot(snap, split)
    assert data.train.shape == (snap.n_users, snap.n_items)
    assert data.train.nnz == split.train.height
    assert data.ckg.num_nodes == snap.n_users + snap.n_items + snap.n_entities
    assert data.hetero["user", "interacts", "item"].edge_index.shape[1] == split.train.height


def test_empty_train_frame(make_spec, tmp_path: Path) -> None:
    snap = load_snapshot(ingest(make_spec(), tmp_path / "out").snapshot_dir)
    empty = snap.interactions.clear()
    ckg = build_ckg(snap, empty)
    assert ckg.edge_index.shape == (2, 2 * snap.kg.height)
    hetero = build_hetero_graph(snap, pl.DataFrame(schema=empty.schema))
    assert hetero["user", "interacts", "item"].edge_index.shape == (2, 0)
