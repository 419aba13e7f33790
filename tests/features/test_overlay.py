"""Posted items merged into the next run's snapshot (features.overlay), and the catalogue without
items (features.cold_start.without_items) that the merge inverts."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from kgrec.features.cold_start import without_items
from kgrec.features.ingest import ingest
from kgrec.features.overlay import OverlayItem, apply_overlay, merge_overlay_items, save_snapshot
from kgrec.features.snapshot import load_snapshot
from kgrec.features.synthetic import SparseConfig, sparse_snapshot


def raw_triples(snapshot) -> set[tuple[str, str, str]]:
    """The KG as raw ids: (head id, relation name, tail id), items by item id, entities by entity id."""
    items = dict(zip(snapshot.items["item_idx"].to_list(), snapshot.items["item_id"].to_list()))
    entities = dict(zip(snapshot.entities["entity_idx"].to_list(), snapshot.entities["entity_id"].to_list()))
    names = snapshot.relation_names()

    def raw(node: int) -> str:
        return f"item:{items[node]}" if node < snapshot.n_items else f"entity:{entities[node - snapshot.n_items]}"

    return {(raw(h), names[r], raw(t)) for h, r, t in snapshot.kg.iter_rows()}


@pytest.fixture(scope="module")
def full():
    return sparse_snapshot(SparseConfig(num_users=120, num_items=40, num_genres=3, items_per_creator=4,
                                        degree_exponent=0.6, max_degree=12, seed=3))


def facts_of(snapshot, item: int) -> tuple[tuple[str, str], ...]:
    """Raw facts of an item: ``(r, entity)`` as head, ``(rev_r, entity)`` as tail."""
    names = snapshot.relation_names()
    entities = dict(zip(snapshot.entities["entity_idx"].to_list(), snapshot.entities["entity_id"].to_list()))
    out = []
    for h, r, t in snapshot.kg.iter_rows():
        if h == item:
            out.append((names[r], entities[t - snapshot.n_items]))
        elif t == item:
            out.append(("rev_" + names[r], entities[h - snapshot.n_items]))
    return tuple(out)


def test_without_items_renumbers_items_and_entities(full):
    held = np.array([0, 7, 39])
    reduced = without_items(full, held)
    assert reduced.n_items == full.n_items - 3 and reduced.n_entities == full.n_entities
    assert reduced.items["item_idx"].to_list() == list(range(reduced.n_items))
    held_ids = set(full.items.filter(pl.col("item_idx").is_in(held.tolist()))["item_id"].to_list())
    assert not held_ids & set(reduced.items["item_id"].to_list())
    assert reduced.interactions.height == full.interactions.filter(~pl.col("item_idx").is_in(held.tolist())).height
    assert reduced.interactions["item_idx"].max() < reduced.n_items
    kept = {t for t in raw_triples(full) if not {t[0], t[2]} & {f"item:{i}" for i in held_ids}}
    assert raw_triples(reduced) == kept  # same facts, new numbering
    assert reduced.kg["tail"].max() < reduced.n_items + reduced.n_entities
    assert reduced.hash != full.hash


def test_merging_the_posted_items_back_restores_the_knowledge_graph(full):
    held = np.array([2, 11, 30])
    reduced = without_items(full, held)
    items = full.items.sort("item_idx")
    posted = [OverlayItem(items["item_id"][int(i)], facts_of(full, int(i)), f"posted {i}") for i in held]
    merged, counts = merge_overlay_items(reduced, posted)
    n_facts = sum(len(p.facts) for p in posted)
    assert counts["added"] == 3 and counts["triples"] == n_facts and counts["base_hash"] == reduced.hash
    assert counts["facts_dropped"] == {"unknown_relation": 0, "unknown_entity": 0}
    assert merged.n_items == full.n_items and merged.kg.height == full.kg.height
    assert raw_triples(merged) == raw_triples(full)  # every triple back, in the merged numbering
    added = merged.items.filter(pl.col("item_idx") >= reduced.n_items)
    assert added["item_id"].to_list() == [p.item_id for p in posted]
    assert added["item_idx"].to_list() == list(range(reduced.n_items, full.n_items))
    assert added["entity_id"].null_count() == 3 and added["name"].to_list() == [p.name for p in posted]
    assert merged.interactions.equals(reduced.interactions)  # KG-only nodes: no interaction
    assert merged.manifest["overlay"] is counts and merged.hash != reduced.hash


def test_unusable_overlay_records_are_counted_not_merged(full):
    items = full.items.sort("item_idx")
    entity = full.entities["entity_id"][0]
    posted = [
        OverlayItem(items["item_id"][0], (("genre", entity),)),  # in the catalogue already
        OverlayItem("new-a", (("genre", entity), ("genre", entity), ("directed_by", entity), ("genre", "nobody"))),
        OverlayItem("new-a", (("genre", entity),)),  # a second record of the same id
        OverlayItem("new-b", (("directed_by", entity),)),  # no usable fact left
    ]
    merged, counts = merge_overlay_items(full, posted)
    assert counts["added"] == 1 and counts["in_catalogue"] == 1 and counts["duplicates"] == 1
    assert counts["without_facts"] == 1
    assert counts["facts_dropped"] == {"unknown_relation": 2, "unknown_entity": 1}
    assert counts["triples"] == 1  # the repeated fact is one triple
    assert merged.n_items == full.n_items + 1
    # every entity node moved up by one: same triples in raw ids, plus the new one
    new = raw_triples(merged) - raw_triples(full)
    assert new == {("item:new-a", "genre", f"entity:{entity}")}
    assert merge_overlay_items(full, posted[:1])[0] is full  # nothing to add: the same snapshot


def test_apply_overlay_writes_a_verified_snapshot_and_reports_the_counts(make_spec, tmp_path):
    report = ingest(make_spec(), tmp_path / "snapshots")
    snapshot = load_snapshot(report.snapshot_dir)
    entity = snapshot.entities["entity_id"][0]
    relation = snapshot.relation_names()[0]
    posted = [OverlayItem("i7", ((relation, entity), ("rev_" + relation, entity)), "seven")]
    merged = apply_overlay(report, posted, tmp_path / "snapshots")
    assert merged.snapshot_dir != report.snapshot_dir and merged.hash != report.hash
    assert merged.n_items == report.n_items + 1 and merged.n_triples == report.n_triples + 2
    assert merged.overlay["added"] == 1 and merged.overlay["base_hash"] == report.hash
    assert json.loads(json.dumps(merged.to_dict()))["overlay"]["triples"] == 2
    loaded = load_snapshot(merged.snapshot_dir)  # its content hash verifies
    assert loaded.hash == merged.hash and loaded.manifest["overlay"]["added"] == 1
    assert loaded.quarantine().height == snapshot.quarantine().height  # the audit tables travel along
    assert save_snapshot(loaded, tmp_path / "snapshots") == merged.snapshot_dir  # reused, same hash
    unchanged = apply_overlay(report, [OverlayItem(snapshot.items["item_id"][0], ((relation, entity),))],
                              tmp_path / "snapshots")
    assert unchanged.snapshot_dir == report.snapshot_dir and unchanged.overlay["in_catalogue"] == 1


def test_the_pipeline_step_merges_the_registered_models_overlays(make_spec, tmp_path):
    """flows.pipeline.overlay_task: the overlays of every version of the registered model, read from
    the serve cache, merged into the ingested snapshot; none posted: the report unchanged."""
    from kgrec.flows.pipeline import overlay_task
    from kgrec.serving.overlay import ItemOverlay

    report = ingest(make_spec(), tmp_path / "snapshots")
    snapshot = load_snapshot(report.snapshot_dir)
    entity, relation = snapshot.entities["entity_id"][0], snapshot.relation_names()[0]
    root = tmp_path / "serve-cache"
    assert overlay_task.fn(report, "kgrec-tiny", root, tmp_path / "snapshots") is report
    for version, item in (("1", "p1"), ("2", "p2"), ("2", "p1")):  # p1 posted again to v2: once
        overlay = ItemOverlay(root, "kgrec-tiny", version)
        with overlay.locked():
            overlay.append({"item_id": item, "facts": [{"relation": relation, "entity": entity}], "name": None})
    merged = overlay_task.fn(report, "kgrec-tiny", root, tmp_path / "snapshots")
    assert merged.overlay["read"] == 2 and merged.overlay["added"] == 2 and merged.n_items == report.n_items + 2
    added = load_snapshot(merged.snapshot_dir).items.filter(pl.col("item_idx") >= report.n_items)
    assert added["item_id"].to_list() == ["p1", "p2"]
    assert overlay_task.fn(report, "kgrec-other", root, tmp_path / "snapshots") is report
