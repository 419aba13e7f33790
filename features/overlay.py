"""Items posted to the service, merged into a snapshot before the next training run.

The service stores every item posted with ``POST /v1/items`` as a raw record -- item id, name, KG
facts ``(relation name, entity id)`` -- in an overlay file beside the served bundle
(:mod:`kgrec.serving.overlay`, which reads them back as :class:`OverlayItem`). The pipeline appends
them to the freshly ingested snapshot (:func:`apply_overlay`), so the next version has them in its
catalogue: KG-only nodes (facts, no interaction) that the model trains with like any item nobody
has interacted with yet.

:func:`merge_overlay_items` is the data step, on the snapshot's own layout (``snapshot.py``): an
overlay item not in the catalogue becomes ``item_idx = n_items + j`` (``j`` in overlay order) with
``entity_id`` null (it is its own KG node, like a linked item, but has no entity id of the KG's) and
its name; every non-item KG node moves up by the number of added items (KG node space: items, then
entities); each fact becomes a triple -- ``(item, r, entity)`` for a relation name ``r``, ``(entity,
r, item)`` for ``rev_<r>`` (the CKG's inverse relation, as the service accepts it). Facts whose
relation or entity the snapshot does not have (the KG changed since the item was posted) are dropped
and counted; an item left without a fact, or already in the catalogue (the raw data now has it), is
not added. Interactions, users, entities and relations are unchanged, so every existing index keeps
its value but the entity nodes. The result is a new content-addressed snapshot (its hash covers
the added rows; the manifest's ``overlay`` names the base hash and the counts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from kgrec.features.graph import REV_PREFIX
from kgrec.features.ingest import IngestReport
from kgrec.features.snapshot import (
    AUDIT_SCHEMA,
    AUDIT_TABLES,
    HASHED_TABLES,
    MANIFEST,
    Snapshot,
    content_hash,
    load_snapshot,
)


@dataclass(frozen=True)
class OverlayItem:
    """One posted item: raw id, KG facts ``(relation name or rev_<name>, entity id)``, display name."""

    item_id: str
    facts: tuple[tuple[str, str], ...]
    name: str | None = None


def _relation_ids(snapshot: Snapshot) -> dict[str, tuple[int, bool]]:
    """Relation name -> (relation_idx, item is the head); ``rev_<name>``: the item is the tail."""
    names = snapshot.relation_names()
    out = {name: (r, True) for r, name in enumerate(names)}
    for r, name in enumerate(names):
        out.setdefault(REV_PREFIX + name, (r, False))
    return out


def _entity_nodes(snapshot: Snapshot) -> dict[str, int]:
    """Entity id -> KG node (an item's linked entity is its item node)."""
    linked = snapshot.items.filter(pl.col("entity_id").is_not_null())
    out = dict(zip(linked["entity_id"].to_list(), linked["item_idx"].to_list()))
    n_items = snapshot.n_items
    for entity, idx in zip(snapshot.entities["entity_id"].to_list(), snapshot.entities["entity_idx"].to_list()):
        out.setdefault(entity, n_items + idx)
    return out


def merge_overlay_items(snapshot: Snapshot, items: Sequence[OverlayItem]) -> tuple[Snapshot, dict[str, Any]]:
    """``snapshot`` with the overlay items appended (module docstring) and the counts:
    ``read``, ``added``, ``in_catalogue``, ``duplicates``, ``without_facts``, ``triples`` (added), ``facts_dropped``
    (by reason), ``base_hash``. With nothing to add the snapshot itself comes back."""
    relations, nodes = _relation_ids(snapshot), _entity_nodes(snapshot)
    catalogue = set(snapshot.items["item_id"].to_list())
    n_items = snapshot.n_items
    counts: dict[str, Any] = {"read": len(items), "added": 0, "in_catalogue": 0, "duplicates": 0, "without_facts": 0,
                              "triples": 0, "facts_dropped": {"unknown_relation": 0, "unknown_entity": 0},
                              "base_hash": snapshot.hash}
    added: list[OverlayItem] = []
    triples: list[tuple[int, int, int, int]] = []  # (new item j, relation, old node, item is head)
    taken: set[str] = set()
    for item in items:
        if item.item_id in catalogue:  # the raw data has it now: the catalogue's row wins
            counts["in_catalogue"] += 1
            continue
        if item.item_id in taken:
            counts["duplicates"] += 1
            continue
        facts = []
        for relation, entity in item.facts:
            rel = relations.get(relation)
            node = nodes.get(entity)
            if rel is None or node is None:
                counts["facts_dropped"]["unknown_relation" if rel is None else "unknown_entity"] += 1
                continue
            facts.append((len(added), rel[0], node, int(rel[1])))
        if not facts:
            counts["without_facts"] += 1
            continue
        taken.add(item.item_id)
        added.append(item)
        triples += facts
    m = len(added)
    counts["added"] = m
    if not m:
        return snapshot, counts

    kg = snapshot.kg.with_columns(  # entities move up by the added items
        *(pl.when(pl.col(c) >= n_items).then(pl.col(c) + m).otherwise(pl.col(c)).cast(pl.Int32).alias(c)
          for c in ("head", "tail"))
    )
    j, rel, node, is_head = (np.asarray(col, dtype=np.int64) for col in zip(*triples))
    item_node = n_items + j
    node = np.where(node >= n_items, node + m, node)
    new = pl.DataFrame({
        "head": np.where(is_head == 1, item_node, node).astype(np.int32),
        "relation": rel.astype(np.int32),
        "tail": np.where(is_head == 1, node, item_node).astype(np.int32),
    })
    kg = pl.concat([kg.select("head", "relation", "tail"), new]).unique().sort("head", "relation", "tail")
    counts["triples"] = kg.height - snapshot.kg.height

    rows = {
        "item_id": pl.Series([i.item_id for i in added], dtype=pl.String),
        "item_idx": pl.Series(np.arange(n_items, n_items + m), dtype=pl.Int32),
        "entity_id": pl.Series([None] * m, dtype=pl.String),
        "name": pl.Series([i.name for i in added], dtype=pl.String),
    }
    if snapshot.has_categories:
        rows["categories"] = pl.Series([[] for _ in added], dtype=pl.List(pl.String))
    items_table = pl.concat([snapshot.items, pl.DataFrame(rows).select(snapshot.items.columns)
                            .cast(snapshot.items.schema)])
    tables = {"interactions": snapshot.interactions, "kg": kg, "users": snapshot.users, "items": items_table,
              "entities": snapshot.entities, "relations": snapshot.relations}
    digest = content_hash(tables)
    manifest = {**snapshot.manifest, "hash": digest, "overlay": counts,
                "counts": {**snapshot.manifest.get("counts", {}), "n_items": items_table.height,
                           "n_triples": kg.height}}
    return dataclasses.replace(snapshot, manifest=manifest, kg=kg, items=items_table), counts


def save_snapshot(snapshot: Snapshot, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``snapshot`` (e.g. a derived one, in memory) as ``out_dir/<name>-<hash[:12]>/`` in the
    snapshot layout, atomically (temp dir + rename); an existing directory of that hash is reused.
    Its manifest hash is recomputed from the tables (``load_snapshot`` verifies it); the rejected-row
    tables come from the snapshot's own directory when it has them, else empty."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {name: getattr(snapshot, name) for name in HASHED_TABLES}
    digest = content_hash(tables)
    target = out_dir / f"{snapshot.name}-{digest[:12]}"
    try:
        if json.loads((target / MANIFEST).read_text(encoding="utf-8")).get("hash") == digest:
            return target
    except (OSError, ValueError):
        pass
    tmp = Path(tempfile.mkdtemp(prefix=f".{snapshot.name}-", dir=out_dir))
    try:
        for name, frame in tables.items():
            frame.write_parquet(tmp / f"{name}.parquet")
        for name in AUDIT_TABLES:
            source = Path(snapshot.path) / f"{name}.parquet"
            if source.is_file():
                shutil.copyfile(source, tmp / f"{name}.parquet")
            else:
                pl.DataFrame(schema=AUDIT_SCHEMA).write_parquet(tmp / f"{name}.parquet")
        manifest = {**snapshot.manifest, "hash": digest}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), encoding="utf-8")
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{snapshot.name}-old-", dir=out_dir))
            os.rename(target, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def apply_overlay(report: IngestReport, items: Sequence[OverlayItem], out_dir: str | os.PathLike[str]) -> IngestReport:
    """The ingest report of ``report``'s snapshot with ``items`` merged in (a new snapshot directory
    under ``out_dir``; counts in the report's ``overlay``). Nothing to add: the same snapshot, with
    the counts."""
    snapshot = load_snapshot(report.snapshot_dir)
    merged, counts = merge_overlay_items(snapshot, items)
    if merged is snapshot:
        return dataclasses.replace(report, overlay=counts)
    path = save_snapshot(merged, out_dir)
    return dataclasses.replace(report, hash=merged.hash, snapshot_dir=path, reused=False, n_items=merged.n_items,
                               n_triples=merged.kg.height, overlay=counts)
