"""Synthetic knowledge-graph recommendation data with power-law degrees, for scale benchmarks.

Real interaction logs and knowledge graphs are heavy-tailed: a few users are very active, a few
items and entities are very popular, and a few relations carry most triples. The generator draws
every degree from a Zipf-like law (probability of the r-th ranked node proportional to
``r ** -exponent``, ranks shuffled so that ids carry no order), so that the sparse operations,
sampling and memory of a model behave as they would on real data of that size.

The result is an in-memory :class:`~kgrec.features.snapshot.Snapshot` with the same tables as an
ingested one, so every downstream step (splits, graphs, models) runs on it unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from kgrec.features.snapshot import Snapshot


@dataclass(frozen=True)
class PowerLawConfig:
    num_users: int = 100_000
    num_items: int = 50_000
    num_interactions: int = 2_000_000
    num_entities: int = 100_000
    num_triples: int = 1_000_000
    num_relations: int = 30
    user_exponent: float = 0.7  # activity
    item_exponent: float = 1.0  # popularity
    entity_exponent: float = 1.0
    relation_exponent: float = 1.2
    item_head_share: float = 0.6  # share of triples whose head is an item
    min_user_degree: int = 2
    seed: int = 0


def zipf_probabilities(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities ``∝ rank ** -exponent`` assigned to the ``n`` ids in random order."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return rng.permutation(weights / weights.sum())


def _draw_keys(
    rng: np.random.Generator, left: np.ndarray, right_p: np.ndarray, n_right: int
) -> np.ndarray:
    """Distinct keys ``left * n_right + right``, with ``right`` drawn by ``right_p``."""
    return np.unique(left * n_right + rng.choice(n_right, size=len(left), p=right_p))


def powerlaw_snapshot(config: PowerLawConfig = PowerLawConfig()) -> Snapshot:
    """Generate a snapshot with about ``num_interactions`` distinct interactions and triples.

    Duplicated draws are removed, so the counts come out slightly below the targets on very
    skewed settings; the manifest records the exact figures.
    """
    rng = np.random.default_rng(config.seed)
    n_u, n_i, n_e = config.num_users, config.num_items, config.num_entities

    # User activity: a floor for everybody plus a heavy-tailed share of the rest.
    activity = zipf_probabilities(n_u, config.user_exponent, rng)
    spare = config.num_interactions - config.min_user_degree * n_u
    if spare < 0:
        raise ValueError("num_interactions must be at least min_user_degree * num_users")
    item_p = zipf_probabilities(n_i, config.item_exponent, rng)
    degrees = config.min_user_degree + rng.multinomial(spare, activity)
    keys = _draw_keys(rng, np.repeat(np.arange(n_u, dtype=np.int64), degrees), item_p, n_i)
    # Heavy users re-draw popular items; top up with further draws until the target is met.
    while len(keys) < config.num_interactions:
        deficit = config.num_interactions - len(keys)
        extra = rng.choice(n_u, size=int(deficit * 1.2) + 16, p=activity)
        keys = np.union1d(keys, _draw_keys(rng, extra, item_p, n_i))
    if len(keys) > config.num_interactions:
        keys = np.sort(rng.choice(keys, size=config.num_interactions, replace=False))
    interactions = pl.DataFrame(
        {"user_idx": (keys // n_i).astype(np.int32), "item_idx": (keys % n_i).astype(np.int32)}
    )

    # Knowledge graph in KG node space: items [0, n_i), entities [n_i, n_i + n_e).
    n_draw = int(config.num_triples * 1.1)
    from_items = rng.random(n_draw) < config.item_head_share
    heads = np.where(
        from_items, rng.integers(0, n_i, n_draw), n_i + rng.integers(0, n_e, n_draw)
    )
    relations = rng.choice(
        config.num_relations, size=n_draw,
        p=zipf_probabilities(config.num_relations, config.relation_exponent, rng),
    )
    tails = n_i + rng.choice(n_e, size=n_draw, p=zipf_probabilities(n_e, config.entity_exponent, rng))
    n_nodes = n_i + n_e
    triple_keys = np.unique((heads * config.num_relations + relations) * n_nodes + tails)
    triple_keys = triple_keys[heads_differ(triple_keys, n_nodes, config.num_relations)]
    if len(triple_keys) > config.num_triples:
        triple_keys = np.sort(rng.choice(triple_keys, size=config.num_triples, replace=False))
    kg = pl.DataFrame(
        {
            "head": (triple_keys // n_nodes // config.num_relations).astype(np.int32),
            "relation": (triple_keys // n_nodes % config.num_relations).astype(np.int32),
            "tail": (triple_keys % n_nodes).astype(np.int32),
        }
    )

    relation_names = [f"relation_{r:02d}" for r in range(config.num_relations)]
    return synthetic_snapshot(
        "synthetic-powerlaw", config, interactions, kg, n_u, n_i, n_e, relation_names, hash_prefix="synthetic"
    )


def heads_differ(keys: np.ndarray, n_nodes: int, n_relations: int) -> np.ndarray:
    """Mask of triples that are not self-loops."""
    return keys // n_nodes // n_relations != keys % n_nodes


def synthetic_snapshot(
    name: str, config: Any, interactions: pl.DataFrame, kg: pl.DataFrame, n_u: int, n_i: int, n_e: int,
    relation_names: list[str], hash_prefix: str | None = None,
) -> Snapshot:
    """An in-memory snapshot of generated tables (ids ``u<k>``, ``i<k>``, ``e<k>``); the
    generator's parameters and seed identify the content exactly, so they make its hash."""
    tables = {
        "interactions": interactions,
        "kg": kg,
        "users": pl.DataFrame(
            {"user_id": [f"u{i}" for i in range(n_u)], "user_idx": np.arange(n_u, dtype=np.int32)}
        ),
        "items": pl.DataFrame(
            {
                "item_id": [f"i{i}" for i in range(n_i)],
                "item_idx": np.arange(n_i, dtype=np.int32),
                "entity_id": [f"i{i}" for i in range(n_i)],
                "name": pl.Series([None] * n_i, dtype=pl.String),
            }
        ),
        "entities": pl.DataFrame(
            {"entity_id": [f"e{i}" for i in range(n_e)], "entity_idx": np.arange(n_e, dtype=np.int32)}
        ),
        "relations": pl.DataFrame(
            {"relation": relation_names, "relation_idx": np.arange(len(relation_names), dtype=np.int32)}
        ),
    }
    manifest = {
        "name": name,
        # Hashing millions of rows would add seconds; the parameters identify the content.
        "hash": f"{hash_prefix or name}-" + "-".join(f"{v}" for v in asdict(config).values()),
        "spec": asdict(config),
        "counts": {"interactions": interactions.height, "triples": kg.height},
    }
    return Snapshot(path=Path("<synthetic>"), manifest=manifest, **tables)


@dataclass(frozen=True)
class SparseConfig:
    """A sparse log with structure to learn, shaped like the held-out real dataset the defaults
    must transfer to: about 4 interactions per user, 60 % of users with a single one.

    Users prefer 1-3 of ``num_genres`` genres; an interaction is, with probability
    ``exploration``, an item drawn by global popularity, otherwise an item of one of the user's
    genres drawn by popularity within it. User degrees follow a truncated Zipf law
    (P(d) ∝ d^-``degree_exponent``, 1 ≤ d ≤ ``max_degree``; at 2.0 / 1,000: 61 % of users with one
    interaction, 3.4 distinct items per user on average, a heavy user's repeated draws removed).
    The KG says what the log is made of, plus noise: ``genre`` (an item's genre; a second, random
    one for ``second_genre_share`` of items), ``creator`` (groups of ``items_per_creator`` items of a
    genre), ``creator_genre`` (creator → genre, an entity-entity relation) and ``era`` (one of 20
    entities at random: no signal).
    """

    num_users: int = 20_000
    num_items: int = 5_000
    num_genres: int = 50
    items_per_creator: int = 5
    degree_exponent: float = 2.0
    max_degree: int = 1000
    item_exponent: float = 0.9
    exploration: float = 0.3
    second_genre_share: float = 0.3
    seed: int = 0


def sparse_snapshot(config: SparseConfig = SparseConfig()) -> Snapshot:
    """Generate the sparse dataset of :class:`SparseConfig` (distinct user-item pairs)."""
    rng = np.random.default_rng(config.seed)
    n_u, n_i, n_g = config.num_users, config.num_items, config.num_genres
    genre_of = rng.integers(0, n_g, n_i)
    popularity = zipf_probabilities(n_i, config.item_exponent, rng)
    degrees = np.arange(1, config.max_degree + 1, dtype=np.float64) ** -config.degree_exponent
    user_degree = rng.choice(np.arange(1, config.max_degree + 1), size=n_u, p=degrees / degrees.sum())
    users = np.repeat(np.arange(n_u, dtype=np.int64), user_degree)
    # each user's 1-3 genres; each draw picks one of them
    n_prefs = rng.integers(1, 4, n_u)
    prefs = rng.integers(0, n_g, (n_u, 3))
    chosen_genre = prefs[users, (rng.random(len(users)) * n_prefs[users]).astype(np.int64)]
    # items by popularity within a genre: the genre's items sorted, a draw by cumulative weight
    order = np.lexsort((np.arange(n_i), genre_of))
    starts = np.searchsorted(genre_of[order], np.arange(n_g + 1))
    cumulative = np.cumsum(popularity[order])
    low = np.where(starts[chosen_genre] > 0, cumulative[np.maximum(starts[chosen_genre] - 1, 0)], 0.0)
    high = cumulative[np.maximum(starts[chosen_genre + 1] - 1, 0)]
    in_genre = order[np.minimum(
        np.searchsorted(cumulative, low + rng.random(len(users)) * (high - low)), starts[chosen_genre + 1] - 1
    )]
    explore = rng.random(len(users)) < config.exploration
    items = np.where(explore, rng.choice(n_i, size=len(users), p=popularity), in_genre)
    keys = np.unique(users * n_i + items)
    interactions = pl.DataFrame(
        {"user_idx": (keys // n_i).astype(np.int32), "item_idx": (keys % n_i).astype(np.int32)}
    )

    # KG node space: items [0, n_i), then genres, creators, eras
    genre_base = n_i
    creators = np.empty(n_i, dtype=np.int64)
    creators[order] = np.arange(n_i) // config.items_per_creator  # consecutive items of a genre
    n_creators = int(creators.max()) + 1
    creator_base, era_base = genre_base + n_g, genre_base + n_g + n_creators
    n_eras = 20
    second = rng.random(n_i) < config.second_genre_share
    item_ids = np.arange(n_i)
    creator_genre = np.zeros(n_creators, dtype=np.int64)
    creator_genre[creators] = genre_of
    heads = np.concatenate([item_ids, item_ids[second], item_ids, item_ids, creator_base + np.arange(n_creators)])
    relations = np.concatenate([
        np.zeros(n_i), np.zeros(int(second.sum())), np.ones(n_i), np.full(n_i, 3), np.full(n_creators, 2)
    ]).astype(np.int64)
    tails = np.concatenate([
        genre_base + genre_of, genre_base + rng.integers(0, n_g, int(second.sum())),
        creator_base + creators, era_base + rng.integers(0, n_eras, n_i), genre_base + creator_genre,
    ])
    kg = pl.DataFrame(
        {"head": heads.astype(np.int32), "relation": relations.astype(np.int32), "tail": tails.astype(np.int32)}
    ).unique(maintain_order=True)
    n_e = n_g + n_creators + n_eras
    return synthetic_snapshot(
        "synthetic-sparse", config, interactions, kg, n_u, n_i, n_e, ["genre", "creator", "creator_genre", "era"]
    )
