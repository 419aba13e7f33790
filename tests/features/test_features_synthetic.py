"""The power-law generator: exact sizes, no duplicates, heavy tails, determinism."""

from __future__ import annotations

import numpy as np
import polars as pl
from kgrec.features.dataset import InteractionData
from kgrec.features.split import random_split
from kgrec.features.synthetic import PowerLawConfig, SparseConfig, powerlaw_snapshot, sparse_snapshot

SMALL = PowerLawConfig(
    num_users=2_000, num_items=1_000, num_interactions=30_000,
    num_entities=3_000, num_triples=20_000, num_relations=12, seed=7,
)


def test_sizes_ids_and_uniqueness():
    snap = powerlaw_snapshot(SMALL)
    assert (snap.n_users, snap.n_items, snap.n_entities, snap.n_relations) == (2_000, 1_000, 3_000, 12)
    assert snap.interactions.height == 30_000
    assert snap.interactions.unique(["user_idx", "item_idx"]).height == 30_000
    assert snap.interactions["item_idx"].max() < 1_000 and snap.interactions["user_idx"].max() < 2_000
    kg = snap.kg
    assert 0 < kg.height <= 20_000
    assert kg.unique().height == kg.height
    assert (kg["head"] != kg["tail"]).all()
    assert kg["tail"].min() >= 1_000 and kg["tail"].max() < 4_000  # tails are entities
    assert kg["relation"].max() < 12


def test_degrees_are_heavy_tailed():
    snap = powerlaw_snapshot(SMALL)
    item_degree = np.sort(snap.interactions.group_by("item_idx").len()["len"].to_numpy())[::-1]
    top_share = item_degree[: len(item_degree) // 100].sum() / item_degree.sum()
    assert top_share > 0.10  # uniform popularity would give about 0.01
    user_degree = snap.interactions.group_by("user_idx").len()["len"].to_numpy()
    assert user_degree.max() > 10 * np.median(user_degree)


def test_same_seed_same_data_and_it_feeds_the_graph_builders():
    a, b = powerlaw_snapshot(SMALL), powerlaw_snapshot(SMALL)
    assert a.interactions.equals(b.interactions) and a.kg.equals(b.kg)
    other = powerlaw_snapshot(PowerLawConfig(**{**SMALL.__dict__, "seed": 8}))
    assert not other.interactions.equals(a.interactions)
    data = InteractionData.from_snapshot(a, random_split(a.interactions, seed=1))
    assert data.train.nnz + data.valid.nnz + data.test.nnz == 30_000
    assert data.ckg.num_nodes == 2_000 + 1_000 + 3_000
    assert isinstance(a.items, pl.DataFrame)


def test_the_sparse_dataset_is_shaped_like_the_held_out_one_and_has_structure():
    """Most users with one interaction, ~3.4 per user; a user's items share genres beyond chance,
    and the KG's genre relation says which (the structure a model can learn, and a KG can help)."""
    snap = sparse_snapshot(SparseConfig(num_users=4_000, num_items=1_000, num_genres=20))
    degree = snap.interactions.group_by("user_idx").len()["len"].to_numpy()
    assert 0.55 < (degree == 1).mean() < 0.67
    assert 2.5 < degree.mean() < 4.5
    assert snap.interactions.unique(["user_idx", "item_idx"]).height == snap.interactions.height
    genre = snap.relations.filter(pl.col("relation") == "genre")["relation_idx"].item()
    item_genre = (
        snap.kg.filter(pl.col("relation") == genre).unique("head", keep="first", maintain_order=True)
        .select(pl.col("head").alias("item_idx"), pl.col("tail").alias("genre"))
    )
    pairs = snap.interactions.join(item_genre, on="item_idx")
    multi = pairs.filter(pl.len().over("user_idx") >= 2)
    same = multi.group_by("user_idx").agg(pl.col("genre").n_unique() / pl.len())["genre"].mean()
    assert same < 0.9  # fewer distinct genres per user than draws: genres repeat within a user
    shuffled = multi.with_columns(pl.col("genre").shuffle(seed=0))
    chance = shuffled.group_by("user_idx").agg(pl.col("genre").n_unique() / pl.len())["genre"].mean()
    assert same < chance - 0.1
    assert sparse_snapshot(SparseConfig(num_users=4_000, num_items=1_000, num_genres=20)).interactions.equals(
        snap.interactions
    )
    data = InteractionData.from_snapshot(snap, random_split(snap.interactions, seed=2020))
    assert data.test.nnz > 0 and data.ckg.num_nodes == snap.n_users + snap.n_items + snap.n_entities
