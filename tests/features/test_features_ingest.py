from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from kgrec.features.ingest import ingest
from kgrec.features.snapshot import SnapshotError, load_snapshot


def _accounted(report) -> None:
    """Nothing is lost: every data row is accepted, quarantined or excluded."""
    for kind, n in report.rows_read.items():
        excluded = sum(report.excluded.values()) if kind == "interactions" else 0
        assert n == report.rows_accepted[kind] + sum(report.quarantined[kind].values()) + excluded, kind


def test_malformed_log_is_quarantined_row_by_row(make_spec, tiny, tmp_path: Path) -> None:
    report = ingest(make_spec(), tmp_path / "out")
    snap = load_snapshot(report.snapshot_dir)
    quarantine = snap.quarantine()
    log_q = quarantine.filter(pl.col("source") == "interactions")
    assert dict(zip(log_q["line"], log_q["reason"], strict=True)) == tiny["quarantined"]
    excluded = snap.excluded()
    assert dict(zip(excluded["line"], excluded["reason"], strict=True)) == tiny["excluded"]
    assert set(excluded["source"]) == {"interactions"}

    # raw is the source line without its CRLF ending
    lines = tiny["log"].split("\r\n")
    raw_by_line = dict(zip(log_q["line"], log_q["raw"], strict=True))
    assert raw_by_line[4] == lines[3] == "u2\ti1\t3"
    assert raw_by_line[16] == "u2\t\t4\t5"

    assert report.rows_read["interactions"] == 15  # the header is not a data row
    assert report.rows_accepted["interactions"] == 3
    _accounted(report)
    assert report.quarantined["interactions"]["bad_timestamp"] == 3

    # accepted content: stray spaces stripped, the float timestamp kept as an integer
    users = dict(zip(snap.users["user_idx"], snap.users["user_id"], strict=True))
    items = dict(zip(snap.items["item_idx"], snap.items["item_id"], strict=True))
    rows = {
        (users[u], items[i], t, w)
        for u, i, t, w in snap.interactions.select("user_idx", "item_idx", "timestamp", "weight").iter_rows()
    }
    assert rows == {("u1", "i1", 100, 5.0), ("u1", "i2", 200, 4.0), ("u3", "i2", 881250949, 4.0)}
    assert snap.interactions.schema == pl.Schema(
        {"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64, "weight": pl.Float64}
    )


def test_links_and_kg_quarantine(make_spec, tmp_path: Path) -> None:
    report = ingest(make_spec(), tmp_path / "out")
    snap = load_snapshot(report.snapshot_dir)
    q = snap.quarantine()
    by_source = {
        source: dict(zip(part["line"], part["reason"], strict=True))
        for (source,), part in q.group_by("source")
    }
    assert by_source["item_links"] == {4: "duplicate_link", 5: "duplicate_link"}
    assert by_source["kg"] == {
        4: "disconnected",
        5: "duplicate_triple",
        6: "wrong_field_count",
        7: "missing_field",
        8: "disconnected",
    }
    _accounted(report)
    # index spaces: items first (sorted ids), then non-item entities
    assert snap.items["item_id"].to_list() == ["i1", "i2", "i3"]
    assert snap.items["entity_id"].to_list() == ["e1", "e2", "e3"]
    assert snap.entities["entity_id"].to_list() == ["e10", "e11"]
    assert snap.relation_names() == ["r1", "r2"]
    assert (snap.n_users, snap.n_items, snap.n_entities, snap.n_relations) == (2, 3, 2, 2)
    triples = set(snap.kg.iter_rows())
    assert triples == {(0, 0, 3), (1, 1, 3), (2, 0, 4)}  # e10 -> 3 + 0, e11 -> 3 + 1
    assert snap.kg.schema == pl.Schema({"head": pl.Int32, "relation": pl.Int32, "tail": pl.Int32})


def test_hash_is_deterministic_and_content_addressed(make_spec, tiny, tmp_path: Path) -> None:
    first = ingest(make_spec(), tmp_path / "out")
    again = ingest(make_spec(), tmp_path / "out")
    assert again.hash == first.hash and again.snapshot_dir == first.snapshot_dir
    assert again.reused and not first.reused
    assert first.snapshot_dir.name == f"tiny-{first.hash[:12]}"
    # a fresh output directory gives the same hash
    assert ingest(make_spec(), tmp_path / "other").hash == first.hash

    one_row_changed = tiny["log"].replace("u1\ti1\t5\t100\r\n", "u1\ti1\t4\t100\r\n", 1)
    changed = ingest(make_spec(log_text=one_row_changed), tmp_path / "out")
    assert changed.hash != first.hash
    assert changed.snapshot_dir != first.snapshot_dir and first.snapshot_dir.is_dir()
    # a change to rejected rows only keeps the content hash but refreshes the audit tables
    extra_bad = ingest(make_spec(log_text=tiny["log"] + "\r\nu9\ti1\tbad\t1\r\n"), tmp_path / "out")
    assert extra_bad.hash == first.hash and not extra_bad.reused
    assert load_snapshot(first.snapshot_dir).quarantine().height == extra_bad.n_quarantined
    # no temp directories left behind
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_manifest_and_report(make_spec, tmp_path: Path) -> None:
    report = ingest(make_spec(), tmp_path / "out")
    manifest = json.loads((report.snapshot_dir / "manifest.json").read_text())
    assert set(manifest) >= {"name", "hash", "spec", "counts", "created_at", "kgrec_version"}
    assert manifest["hash"] == report.hash and manifest["spec"]["name"] == "tiny"
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["n_triples"] == 3 and as_dict["excluded"] == {
        "item_not_linked": 1,
        "not_positive": 1,
        "repeat_interaction": 1,
    }


def test_load_snapshot_errors(make_spec, tmp_path: Path) -> None:
    report = ingest(make_spec(), tmp_path / "out")
    with pytest.raises(SnapshotError, match="does not exist"):
        load_snapshot(tmp_path / "nope")
    pl.DataFrame({"user_id": ["zz"], "user_idx": [0]}, schema={"user_id": pl.String, "user_idx": pl.Int32}).write_parquet(
        report.snapshot_dir / "users.parquet"
    )
    with pytest.raises(SnapshotError, match="corrupt"):
        load_snapshot(report.snapshot_dir)
    (report.snapshot_dir / "kg.parquet").unlink()
    with pytest.raises(SnapshotError, match="missing kg.parquet"):
        load_snapshot(report.snapshot_dir)


def test_corrupt_snapshot_is_replaced(make_spec, tmp_path: Path) -> None:
    report = ingest(make_spec(), tmp_path / "out")
    (report.snapshot_dir / "manifest.json").unlink()
    again = ingest(make_spec(), tmp_path / "out")
    assert not again.reused and load_snapshot(again.snapshot_dir).hash == report.hash


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parquet_and_jsonl_inputs(make_spec, tmp_path: Path, fmt: str) -> None:
    frame = pl.DataFrame(
        {
            "uid": [1, 1, None, 2, 2, 2],
            "iid": ["i1", "i2", "i1", " i3 ", "i1", "i1"],
            "stars": [5.0, 4.0, 4.0, float("inf"), 4.0, 4.0],
            "when": [10.0, 20.0, 30.0, 40.0, 1.5, 60.0],
        }
    )
    path = tmp_path / f"log.{fmt}"
    frame.write_parquet(path) if fmt == "parquet" else frame.write_ndjson(path)
    spec = make_spec(
        interactions={
            "path": str(path),
            "format": fmt,
            "user": "uid",
            "item": "iid",
            "weight": "stars",
            "timestamp": "when",
        }
    )
    report = ingest(spec, tmp_path / "out")
    snap = load_snapshot(report.snapshot_dir)
    q = snap.quarantine().filter(pl.col("source") == "interactions")
    assert dict(zip(q["line"], q["reason"], strict=True)) == {3: "missing_user", 4: "bad_weight", 5: "bad_timestamp"}
    assert report.rows_read["interactions"] == 6 and report.rows_accepted["interactions"] == 3
    assert snap.users["user_id"].to_list() == ["1", "2"]
    assert '"iid":"i1"' in q["raw"][0]
    _accounted(report)


def test_missing_column_and_missing_file(make_spec, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no column 'nope'"):
        ingest(make_spec(interactions={"user": "nope"}), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(make_spec(kg={"path": str(tmp_path / "absent.tsv")}), tmp_path / "out")


def test_without_restriction_all_items_kept(make_spec, tmp_path: Path) -> None:
    report = ingest(make_spec(restrict_to_linked_items=False, positive="any"), tmp_path / "out")
    snap = load_snapshot(report.snapshot_dir)
    assert snap.items["item_id"].to_list() == ["i1", "i2", "i3", "i9"]
    assert snap.items.filter(pl.col("item_id") == "i9")["entity_id"].to_list() == [None]
    assert "item_not_linked" not in report.excluded and "not_positive" not in report.excluded
    _accounted(report)


def test_spec_without_a_kg_ingests_and_says_so(make_spec, tmp_path: Path) -> None:
    spec = make_spec(positive="any", restrict_to_linked_items=None)
    no_kg = spec.model_copy(update={"item_links": None, "kg": None})
    report = ingest(no_kg, tmp_path / "out")
    snap = load_snapshot(report.snapshot_dir)
    assert not report.has_kg and not snap.has_kg and snap.manifest["has_kg"] is False
    # no placeholder files: only the log is read, every item is kept, none is linked
    assert set(report.rows_read) == {"interactions"} and set(report.accounting) == {"interactions"}
    assert snap.items["item_id"].to_list() == ["i1", "i2", "i3", "i9"]
    assert snap.items["entity_id"].null_count() == 4
    assert (report.n_triples, report.n_entities, report.n_relations, report.n_linked_items) == (0, 0, 0, 0)
    assert "item_not_linked" not in report.excluded
    _accounted(report)
    with_kg = ingest(spec, tmp_path / "out2")
    assert with_kg.has_kg and load_snapshot(with_kg.snapshot_dir).has_kg


def test_header_only_link_and_kg_files(make_spec, tmp_path: Path) -> None:
    # Declared but empty: an error by default, "no KG" when the spec allows an empty file.
    header_only = {"has_header": True, "item": "item", "entity": "entity"}
    kg_header = {"has_header": True, "head": "h", "relation": "r", "tail": "t"}
    with pytest.raises(ValueError, match=r"item_links file .* has no data rows \(empty or header only\)"):
        ingest(make_spec(links_text="item\tentity\n", item_links=header_only), tmp_path / "a")
    spec = make_spec(
        links_text="item\tentity\n",
        kg_text="h\tr\tt\n",
        item_links={**header_only, "allow_empty": True},
        kg={**kg_header, "allow_empty": True},
        restrict_to_linked_items=False,
        positive="any",
    )
    report = ingest(spec, tmp_path / "b")
    assert not report.has_kg and report.rows_read["kg"] == 0 and report.n_items == 4
    _accounted(report)


def test_entity_counts_with_and_without_items(make_spec, tmp_path: Path) -> None:
    report = ingest(make_spec(), tmp_path / "out")
    snap = load_snapshot(report.snapshot_dir)
    linked = int(snap.items["entity_id"].is_not_null().sum())
    assert report.n_linked_items == linked == report.n_items
    assert report.n_entities_with_items == report.n_entities + linked
    assert report.n_entities == snap.n_entities and report.has_kg


def test_item_names(make_spec, tmp_path: Path) -> None:
    names = tmp_path / "names.tsv"
    names.write_text("item\ttitle\ni2\tSecond\ni1\t First \ni1\tAgain\ni9\tUnlinked\n\n")
    spec = make_spec(item_names={"path": str(names), "item": "item", "name": "title"})
    report = ingest(spec, tmp_path / "out")
    snap = load_snapshot(report.snapshot_dir)
    assert snap.item_names() == ["First", "Second", None]
    q = snap.quarantine().filter(pl.col("source") == "item_names")
    assert dict(zip(q["line"], q["reason"], strict=True)) == {4: "duplicate_name", 6: "empty_line"}
    _accounted(report)


def test_real_music_counts(music_ingested) -> None:
    report, snap = music_ingested
    assert (report.n_interactions, report.n_users, report.n_items, report.n_relations) == (21173, 1872, 3846, 60)
    assert report.n_items + report.n_entities == 9366  # KG entities per the data README
    assert report.rows_read == {"interactions": 92834, "item_links": 3846, "kg": 15518}
    _accounted(report)
    assert "timestamp" not in snap.interactions.columns


def test_real_ml100k_counts(ml100k_ingested) -> None:
    report, snap = ml100k_ingested
    assert (report.n_interactions, report.n_users, report.n_items) == (97554, 943, 1598)
    assert report.n_items + report.n_entities == 34628 and report.n_relations == 24
    _accounted(report)
    assert snap.item_names()[snap.items.filter(pl.col("item_id") == "1")["item_idx"][0]] == "Toy Story"
