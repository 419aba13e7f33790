"""``features/ablation.py``: the KG variants keep the interactions, remove or shuffle the KG as
documented, are deterministic and carry an identity of their own; every KG model trains on each."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from kgrec.features.ablation import VARIANTS, kg_variant, shuffled_kg, without_kg
from kgrec.features.dataset import InteractionData
from kgrec.features.snapshot import HASHED_TABLES, Snapshot, content_hash
from kgrec.features.split import random_split
from kgrec.models.config import TrainConfig
from kgrec.models.spec import build_model
from kgrec.models.training.pairwise import fit

KG_MODELS = ("kgat", "kgin", "rgcn", "hgt")


def tables(snapshot: Snapshot) -> dict[str, pl.DataFrame]:
    return {name: getattr(snapshot, name) for name in HASHED_TABLES}


def tiny_snapshot() -> Snapshot:
    """3 users, 4 items, 4 entities (KG nodes 4..7), 2 relations; relation 0 has six triples
    with distinct (head, tail) pairs, relation 1 two."""
    kg = pl.DataFrame(
        {"head": [0, 1, 2, 3, 0, 1, 0, 2], "relation": [0, 0, 0, 0, 0, 0, 1, 1], "tail": [4, 5, 6, 7, 5, 6, 4, 7]},
        schema={"head": pl.Int32, "relation": pl.Int32, "tail": pl.Int32},
    )
    frames = {
        "interactions": pl.DataFrame({"user_idx": [0, 0, 1, 2, 2], "item_idx": [0, 1, 2, 3, 0]},
                                     schema={"user_idx": pl.Int32, "item_idx": pl.Int32}),
        "kg": kg,
        "users": pl.DataFrame({"user_id": ["u0", "u1", "u2"], "user_idx": [0, 1, 2]},
                              schema={"user_id": pl.String, "user_idx": pl.Int32}),
        "items": pl.DataFrame({"item_id": ["i0", "i1", "i2", "i3"], "item_idx": [0, 1, 2, 3],
                               "entity_id": ["e0", "e1", "e2", "e3"], "name": [None, None, None, None]},
                              schema={"item_id": pl.String, "item_idx": pl.Int32, "entity_id": pl.String,
                                      "name": pl.String}),
        "entities": pl.DataFrame({"entity_id": ["x0", "x1", "x2", "x3"], "entity_idx": [0, 1, 2, 3]},
                                 schema={"entity_id": pl.String, "entity_idx": pl.Int32}),
        "relations": pl.DataFrame({"relation": ["r0", "r1"], "relation_idx": [0, 1]},
                                  schema={"relation": pl.String, "relation_idx": pl.Int32}),
    }
    manifest = {"name": "tiny", "hash": content_hash(frames), "counts": {"n_triples": 8}}
    return Snapshot(path=Path("/nonexistent/tiny"), manifest=manifest, **frames)


@pytest.fixture(scope="module")
def music(music_ingested) -> Snapshot:
    return music_ingested[1]


def degrees(kg: pl.DataFrame, node: str) -> pl.DataFrame:
    """Triples per (relation, node): out-degrees for ``head``, tail frequencies for ``tail``."""
    return kg.group_by("relation", node).len().sort("relation", node)


def triples(kg: pl.DataFrame) -> set[tuple[int, int, int]]:
    return set(kg.select("head", "relation", "tail").iter_rows())


def assert_same_interactions_and_ids(variant: Snapshot, base: Snapshot) -> None:
    for name in ("interactions", "users", "items"):
        assert getattr(variant, name).equals(getattr(base, name)), name
    assert (variant.n_users, variant.n_items) == (base.n_users, base.n_items)


@pytest.mark.parametrize("source", ["tiny", "music"])
def test_shuffle_keeps_every_degree_per_relation_and_breaks_the_pairing(source, request):
    base = tiny_snapshot() if source == "tiny" else request.getfixturevalue("music")
    shuffled = shuffled_kg(base, seed=7)
    assert shuffled.kg.schema == base.kg.schema and shuffled.kg.height == base.kg.height
    # heads and relations in place: every head's out-degree per relation; tails permuted within
    # each relation: every tail's frequency per relation (so no tail crosses relations)
    assert degrees(shuffled.kg, "head").equals(degrees(base.kg, "head"))
    assert degrees(shuffled.kg, "tail").equals(degrees(base.kg, "tail"))
    assert shuffled.entities.equals(base.entities) and shuffled.relations.equals(base.relations)
    kept = len(triples(shuffled.kg) & triples(base.kg)) / base.kg.height
    info = shuffled.manifest["ablation"]
    if source == "music":
        assert kept < 0.2  # 10% at seed 7: a few tails dominate their relation
        assert info["tails_moved"] > 0.9 * base.kg.height
    else:
        assert kept < 1.0
    assert info["duplicate_triples"] == base.kg.height - shuffled.kg.unique().height
    canonical = base.kg.sort("relation", "head", "tail")  # the shuffle keeps this row order
    assert canonical.select("head", "relation").equals(shuffled.kg.select("head", "relation"))
    assert info["tails_moved"] == int((canonical["tail"] != shuffled.kg["tail"]).sum())
    assert info["self_loops"] == int((shuffled.kg["head"] == shuffled.kg["tail"]).sum())
    assert_same_interactions_and_ids(shuffled, base)


def test_shuffle_is_deterministic_per_seed_differs_across_seeds_and_ignores_row_order(music):
    a, b, c = shuffled_kg(music, 2020), shuffled_kg(music, 2020), shuffled_kg(music, 2021)
    assert a.kg.equals(b.kg) and a.hash == b.hash and a.name == b.name == "music-shuffled_kg-s2020"
    assert not a.kg.equals(c.kg) and a.hash != c.hash and c.name == "music-shuffled_kg-s2021"
    reordered = replace(music, kg=music.kg.reverse())
    assert shuffled_kg(reordered, 2020).kg.equals(a.kg)


def test_shuffle_is_uniform_over_the_permutations_of_a_relation():
    """Relation 1 of the tiny KG: heads (0, 2), tails (4, 7): each pairing half the time."""
    base = tiny_snapshot()
    swapped = 0
    for seed in range(400):
        rel1 = shuffled_kg(base, seed).kg.filter(pl.col("relation") == 1).sort("head")
        swapped += rel1["tail"].to_list() == [7, 4]
    assert 150 < swapped < 250


@pytest.mark.parametrize("variant", ["no_kg", "shuffled_kg"])
def test_variants_have_their_own_identity_and_leave_the_base_alone(music, variant):
    before = (music.name, music.hash, music.kg.height, dict(music.manifest))
    out = kg_variant(music, variant, seed=3)
    assert (music.name, music.hash, music.kg.height, dict(music.manifest)) == before
    assert out.hash == content_hash(tables(out))  # what load_snapshot would verify
    assert out.hash != music.hash and out.hash[:36] != music.hash[:36]  # MLflow keeps 36 digits
    suffix = "no_kg" if variant == "no_kg" else "shuffled_kg-s3"
    assert out.name == f"music-{suffix}"
    info = out.manifest["ablation"]
    assert info["variant"] == variant and info["base_name"] == "music" and info["base_hash"] == music.hash
    assert info["seed"] == (None if variant == "no_kg" else 3)
    counts = out.manifest["counts"]
    assert (counts["n_triples"], counts["n_relations"], counts["n_entities"]) == (
        out.kg.height, out.n_relations, out.n_entities
    )
    assert out.path == music.path


def test_without_kg_removes_triples_relations_and_entities_only(music):
    empty = without_kg(music)
    assert empty.kg.height == 0 and empty.n_relations == 0 and empty.n_entities == 0
    assert empty.kg.schema == music.kg.schema and empty.relations.schema == music.relations.schema
    assert_same_interactions_and_ids(empty, music)
    assert empty.relation_names() == []
    split, base_split = random_split(empty.interactions, seed=2020), random_split(music.interactions, seed=2020)
    data, base = InteractionData.from_snapshot(empty, split), InteractionData.from_snapshot(music, base_split)
    for part in ("train", "valid", "test"):
        assert (getattr(data, part) != getattr(base, part)).nnz == 0
    ckg = data.ckg  # the interaction graph alone
    assert ckg.num_relations == 2 and ckg.num_entities == 0
    assert ckg.edge_index.size(1) == 2 * data.train.nnz


def test_kg_variant_dispatches_and_rejects_unknown_names(music):
    assert kg_variant(music, "kg", 5) is music
    assert kg_variant(music, "no_kg", 5).hash == without_kg(music).hash
    assert kg_variant(music, "shuffled_kg", 5).kg.equals(shuffled_kg(music, 5).kg)
    with pytest.raises(ValueError, match="unknown KG variant 'shuffle'.*kg, no_kg, shuffled_kg"):
        kg_variant(music, "shuffle", 5)
    assert VARIANTS == ("kg", "no_kg", "shuffled_kg")


@pytest.mark.parametrize("model_name", KG_MODELS)
def test_every_kg_model_builds_and_trains_on_every_variant(music, model_name):
    """One epoch of two batches per variant (~1-5 s per model on one thread)."""
    split = random_split(music.interactions, seed=2020)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for variant in VARIANTS:
            data = InteractionData.from_snapshot(kg_variant(music, variant, 2020), split)
            config = TrainConfig.for_model(model_name, epochs=1, max_batches_per_epoch=2, seed=1)
            model = build_model(config, data)
            result = fit(model, data, config)
            assert math.isfinite(result.history[0].loss), (variant, result.history)
            recall = result.best_valid["recall@20"]
            assert 0.0 < recall <= 1.0, (variant, recall)
            with torch.no_grad():
                users, items = model.embeddings()
            assert users.shape[0] == music.n_users and items.shape[0] == music.n_items
            assert bool(torch.isfinite(users).all() and torch.isfinite(items).all()), variant
    finally:
        torch.set_num_threads(previous)


def test_shuffle_changes_what_a_kg_model_propagates(music):
    """The shuffled CKG: the same interaction edges, the same number of edges of every relation
    and the same tail multiset, but other KG edges."""
    split = random_split(music.interactions, seed=2020)
    base = InteractionData.from_snapshot(music, split).ckg
    shuffled = InteractionData.from_snapshot(shuffled_kg(music, 1), split).ckg

    def edges(ckg, kg: bool) -> np.ndarray:
        keep = (ckg.edge_type >= 2) if kg else (ckg.edge_type < 2)
        rows = torch.stack([ckg.edge_type[keep], *ckg.edge_index[:, keep]]).T.numpy()
        return rows[np.lexsort(rows.T[::-1])]

    assert np.array_equal(edges(base, kg=False), edges(shuffled, kg=False))
    base_kg, shuffled_edges = edges(base, kg=True), edges(shuffled, kg=True)
    assert np.array_equal(np.bincount(base_kg[:, 0]), np.bincount(shuffled_edges[:, 0]))
    assert not np.array_equal(base_kg, shuffled_edges)
    assert np.array_equal(np.sort(base_kg[:, 2]), np.sort(shuffled_edges[:, 2]))
