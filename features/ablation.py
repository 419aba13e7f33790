"""KG ablations of a snapshot: the same interactions with the knowledge graph removed or shuffled.

A KG model's gain over its own ablations is the only evidence that it uses the KG (issue 17):

* ``"kg"`` -- the snapshot itself;
* ``"no_kg"`` (:func:`without_kg`) -- no triples, no relations, no non-item entities: the dataset
  as if it had no KG. Every KG model then trains on the interaction graph alone (checked for kgat,
  kgin, rgcn and hgt in ``tests/features/test_ablation.py``);
* ``"shuffled_kg"`` (:func:`shuffled_kg`) -- within each relation the tails permuted uniformly at
  random: the same entities, relations, number of triples, out-degree of every head per relation
  and frequency of every tail per relation, but the item-entity association destroyed. It
  controls for what the KG adds besides its content (parameters, graph density, degrees).

The variants are pure functions on an in-memory :class:`~kgrec.features.snapshot.Snapshot`:
nothing is written to disk. Interactions, users, items (ids, ``item_idx``, names, entity links)
are the base snapshot's, so ``InteractionData.from_snapshot(variant, split)`` with the base
snapshot's split sees exactly the same interactions.

Identity: a variant is a different dataset for lineage. Its ``hash`` is the content hash of its
own tables (:func:`~kgrec.features.snapshot.content_hash`, the hash ``load_snapshot`` would verify
had it been written), so it differs from the base's in its first hex digits too (MLflow keeps only
a 36-digit prefix as the dataset digest; a suffix on the base hash would collide there). Its
``name`` is ``<base name>-no_kg`` or ``<base name>-shuffled_kg-s<seed>`` (so the pipeline would
register ``kgrec-music-no_kg``, never the base dataset's model), and ``manifest["ablation"]``
records the variant, seed, base name and base hash. ``path`` stays the base snapshot's directory:
the audit tables (quarantine, excluded) are the base's, and loading that path gives the base back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl
from kgrec.features.snapshot import HASHED_TABLES, Snapshot, content_hash

#: The ablation variants, in the order benchmarks run them.
VARIANTS: tuple[str, ...] = ("kg", "no_kg", "shuffled_kg")


def _variant(snapshot: Snapshot, suffix: str, info: dict[str, Any], **tables: pl.DataFrame) -> Snapshot:
    """``snapshot`` with ``tables`` replaced, renamed ``<name>-<suffix>``, hashed on its content."""
    merged = {name: tables.get(name, getattr(snapshot, name)) for name in HASHED_TABLES}
    manifest = dict(snapshot.manifest)
    manifest["name"] = f"{snapshot.name}-{suffix}"
    manifest["hash"] = content_hash(merged)
    manifest["counts"] = {
        **(snapshot.manifest.get("counts") or {}),
        "n_entities": merged["entities"].height,
        "n_relations": merged["relations"].height,
        "n_triples": merged["kg"].height,
    }
    manifest["ablation"] = {"base_name": snapshot.name, "base_hash": snapshot.hash, **info}
    return replace(snapshot, manifest=manifest, **tables)


def without_kg(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` with every KG triple, every relation and every non-item entity removed.

    Items stay (``n_items`` and ``items`` unchanged, entity links included as item metadata); the
    KG node space is then the items alone. The relation vocabulary goes too, because every KG
    model builds and trains with zero relations: kgat/rgcn/hgt on the interact/rev_interact graph
    (the same graph ``kgat.interaction_ckg`` builds for data without a snapshot), kgin with no
    intents (its user aggregation reduces to the mean of the items, as its docstring says), and
    kgat's TransR step with no triple to sample does nothing. Empty tables keep their schemas.
    """
    return _variant(
        snapshot,
        "no_kg",
        {"variant": "no_kg", "seed": None},
        kg=snapshot.kg.clear(),
        entities=snapshot.entities.clear(),
        relations=snapshot.relations.clear(),
    )


def shuffled_kg(snapshot: Snapshot, seed: int) -> Snapshot:
    """``snapshot`` with the tails of every relation permuted uniformly at random.

    The triples are first put in canonical order (relation, head, tail), so the result depends on
    the KG's content and ``seed`` only, not on the stored row order; then one draw of
    ``numpy.random.default_rng(seed)`` per triple, sorted within each relation, gives the
    permutation of that relation's tails (uniform: i.i.d. keys). Heads and relations stay in place,
    so per relation the multiset of heads (every head's out-degree) and the multiset of tails (every
    tail's in-degree) are unchanged; entities and relations are unchanged.

    A permutation does not avoid collisions: a head may receive the same tail twice (a duplicate
    triple) or itself (a self-loop). They are kept, since dropping them would change the degrees
    they are meant to preserve; their numbers are in ``manifest["ablation"]`` (seed 2020: 28
    duplicates and no self-loop among 15,518 triples on ``music``; 2,233 duplicates and 2 self-loops
    among 91,631 on ``ml-100k``, whose relations have few distinct tails). The models accept
    duplicate edges (they count twice in a neighbourhood, as any repeated tail would).
    """
    kg = snapshot.kg.sort(["relation", "head", "tail"])
    relation = kg["relation"].to_numpy()
    tail = kg["tail"].to_numpy()
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(kg.height), relation))  # relation stays sorted; random within it
    new_tail = tail[order]
    shuffled = kg.with_columns(pl.Series("tail", new_tail, dtype=kg.schema["tail"]))
    head = kg["head"].to_numpy()
    info = {
        "variant": "shuffled_kg",
        "seed": int(seed),
        "tails_moved": int((new_tail != tail).sum()),
        "duplicate_triples": int(kg.height - shuffled.unique().height),
        "self_loops": int((head == new_tail).sum()),
    }
    return _variant(snapshot, f"shuffled_kg-s{int(seed)}", info, kg=shuffled)


def kg_variant(snapshot: Snapshot, name: str, seed: int = 2020) -> Snapshot:
    """The ablation ``name`` of ``snapshot``: ``"kg"`` (itself), ``"no_kg"`` or ``"shuffled_kg"``
    (shuffled with ``seed``; the other variants ignore it)."""
    if name == "kg":
        return snapshot
    if name == "no_kg":
        return without_kg(snapshot)
    if name == "shuffled_kg":
        return shuffled_kg(snapshot, seed)
    raise ValueError(f"unknown KG variant {name!r}; expected one of {', '.join(VARIANTS)}")
