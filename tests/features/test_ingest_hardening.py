"""Regression tests for hardened ingestion: dialects (RFC 4180 csv, IANA tsv), row-by-row
quarantine for every format, native datetimes, empty inputs, reader errors and the accounting
identity (one finding per test, named after it)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import yaml
from kgrec.features import ingest as ingest_module
from kgrec.features.ingest import ingest
from kgrec.features.snapshot import load_snapshot
from kgrec.features.spec import SpecError, parse_spec

LINKS = "i1\te1\ni2\te2\ni3\te3\n"
KG = "e1\tr1\te10\ne2\tr1\te10\ne3\tr2\te11\n"


def _spec(tmp_path: Path, log: str | bytes, fmt: str = "csv", **interactions: Any) -> dict[str, Any]:
    path = tmp_path / f"log.{fmt}"
    path.write_bytes(log if isinstance(log, bytes) else log.encode("utf-8"))
    (tmp_path / "links.tsv").write_text(LINKS)
    (tmp_path / "kg.tsv").write_text(KG)
    return {
        "name": "hard",
        "interactions": {"path": str(path), "format": fmt, "user": "user", "item": "item", "weight": "rating",
                         "timestamp": "ts", **interactions},
        "item_links": {"path": str(tmp_path / "links.tsv"), "has_header": False, "item": 0, "entity": 1},
        "kg": {"path": str(tmp_path / "kg.tsv"), "has_header": False, "head": 0, "relation": 1, "tail": 2},
    }


def _run(tmp_path: Path, raw: dict[str, Any]):
    report = ingest(parse_spec(raw), tmp_path / "out")
    return report, load_snapshot(report.snapshot_dir)


def _interactions(snap) -> set[tuple]:
    users = dict(zip(snap.users["user_idx"], snap.users["user_id"], strict=True))
    items = dict(zip(snap.items["item_idx"], snap.items["item_id"], strict=True))
    return {
        (users[u], items[i], t, w)
        for u, i, t, w in snap.interactions.select("user_idx", "item_idx", "timestamp", "weight").iter_rows()
    }


def _quarantine(snap, source: str = "interactions") -> dict[int, tuple[str, str]]:
    q = snap.quarantine().filter(pl.col("source") == source)
    return {line: (reason, raw) for line, reason, raw in q.select("line", "reason", "raw").iter_rows()}


def _identity_holds(report) -> None:
    assert set(report.accounting) == set(report.rows_read)
    for kind, c in report.accounting.items():
        assert c["read"] == report.rows_read[kind] == c["accepted"] + c["quarantined"] + c["excluded"], kind
        assert c["accepted"] == report.rows_accepted[kind]


CSV_LOG = (
    "\ufeffuser,item,rating,ts\r\n"  # 1 header, with a BOM and CRLF
    '"u1","i2","4","874724711"\r\n'  # 2 every field quoted: accepted
    '"u11,i13",i1,5,100\r\n'  # 3 separator inside quotes: user "u11,i13"
    '"u1",i1,3,150\r\n'  # 4 the same user as unquoted u1
    'u1,i3,"2",160\r\n'  # 5
    '"u5\r\nsecond line",i3,4,300\r\n'  # 6-7 a line break inside quotes: one record
    "u6,i1,x,400\r\n"  # 8 bad_weight: the line number counts both physical lines above
    "user,item,rating,ts\r\n"  # 9 repeated_header
    '"u7"x,i1,4,1\r\n'  # 10 bad_quoting (text after the closing quote)
    '"u""8",i2,4,2\r\n'  # 11 doubled quote: user u"8
    "\r\n"  # 12 empty_line
    "u9,i2,4\r\n"  # 13 wrong_field_count
)


def test_csv_quoting_rfc4180(tmp_path: Path) -> None:
    report, snap = _run(tmp_path, _spec(tmp_path, CSV_LOG))
    assert _interactions(snap) == {
        ("u1", "i2", 874724711, 4.0),  # finding: all-quoted row was bad_weight (quotes kept)
        ("u11,i13", "i1", 100, 5.0),  # finding: was wrong_field_count
        ("u1", "i1", 150, 3.0),  # finding: "u1" was a user distinct from u1
        ("u1", "i3", 160, 2.0),
        ("u5\r\nsecond line", "i3", 300, 4.0),
        ('u"8', "i2", 2, 4.0),
    }
    assert snap.users["user_id"].to_list() == ['u"8', "u1", "u11,i13", "u5\r\nsecond line"]
    assert _quarantine(snap) == {
        8: ("bad_weight", "u6,i1,x,400"),
        9: ("repeated_header", "user,item,rating,ts"),  # finding: was bad_weight
        10: ("bad_quoting", '"u7"x,i1,4,1'),
        12: ("empty_line", ""),
        13: ("wrong_field_count", "u9,i2,4"),
    }
    assert report.rows_read["interactions"] == 11  # the two-line record is one row
    _identity_holds(report)


def test_multiline_record_line_numbers_and_raw_text(tmp_path: Path) -> None:
    log = 'user,item,rating,ts\n"u1\nstill u1\nand u1",i1,abc,5\nu2,i2,4,x\n'
    _, snap = _run(tmp_path, _spec(tmp_path, log))
    assert _quarantine(snap) == {
        2: ("bad_weight", '"u1\nstill u1\nand u1",i1,abc,5'),  # raw: its physical lines joined
        5: ("bad_timestamp", "u2,i2,4,x"),
    }


def test_records_cut_by_a_batch_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny batches cut quoted multi-line records and errors apart: same result as one batch."""
    log = CSV_LOG + CSV_LOG.removeprefix("\ufeff") * 2
    expected_report, expected = _run(tmp_path / "a", _spec(_mkdir(tmp_path / "a"), log))
    monkeypatch.setattr(ingest_module, "BATCH_CHARS", 16)
    report, snap = _run(tmp_path / "b", _spec(_mkdir(tmp_path / "b"), log))
    assert report.hash == expected_report.hash and report.accounting == expected_report.accounting
    q = _quarantine(snap)
    assert q == _quarantine(expected)
    assert q[14] == q[27] == ("repeated_header", "user,item,rating,ts")  # the copies' headers
    assert q[15] == q[28] == ("duplicate_event", '"u1","i2","4","874724711"')
    assert q[13 + 8] == ("bad_weight", "u6,i1,x,400")  # after the copy's two-line record


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_unclosed_quote_at_end_of_file_is_quarantined(tmp_path: Path) -> None:
    log = 'user,item,rating,ts\nu1,i1,4,1\n"u2,i2,4,2\nu3,i3,4,3\n'
    report, snap = _run(tmp_path, _spec(tmp_path, log))
    assert _quarantine(snap) == {3: ("bad_quoting", '"u2,i2,4,2\nu3,i3,4,3')}
    _identity_holds(report)


def test_tsv_quotes_are_ordinary_characters(tmp_path: Path) -> None:
    """IANA TSV has no quoting: the bundled snapshots keep their content (and hashes)."""
    log = 'user\titem\trating\tts\n"u1"\ti1\t4\t1\nu1\ti2\t4\t2\n'
    raw = _spec(tmp_path, log, fmt="tsv")
    names = tmp_path / "names.tsv"
    names.write_text('item\ttitle\ni1\tSay "hi"\ni2\t"Quoted, with comma"\n')
    raw["item_names"] = {"path": str(names), "item": "item", "name": "title"}
    _, snap = _run(tmp_path, raw)
    assert snap.users["user_id"].to_list() == ['"u1"', "u1"]
    assert snap.item_names()[:2] == ['Say "hi"', '"Quoted, with comma"']


def test_tsv_with_declared_quoting_and_multichar_separator(tmp_path: Path) -> None:
    log = 'user\titem\trating\tts\n"u\t1"\ti1\t4\t1\n'
    _, snap = _run(tmp_path, _spec(tmp_path, log, fmt="tsv", quoting="minimal"))
    assert snap.users["user_id"].to_list() == ["u\t1"]
    log = "user::item::rating::ts\nu1::i1::4::1\n"
    _, snap = _run(tmp_path / "sep", _spec(_mkdir(tmp_path / "sep"), log, fmt="tsv", separator="::"))
    assert snap.users["user_id"].to_list() == ["u1"]
    with pytest.raises(SpecError, match="several characters"):
        parse_spec(_spec(tmp_path, log, fmt="csv", separator="::"))


def test_jsonl_bad_lines_are_quarantined_row_by_row(tmp_path: Path) -> None:
    log = (
        '{"user": "u1", "item": "i1", "rating": 4, "ts": 10}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"user": {"id": 1}, "item": "i2", "rating": 4, "ts": 10}\n'
        '{"user": "u2", "item": "i2", "rating": 4.5, "ts": 11.0}\n'
        "\n"
        '{"user": "u3", "item": "i3", "rating": "bad", "ts": 12}\n'
    )
    report, snap = _run(tmp_path, _spec(tmp_path, log, fmt="jsonl"))
    assert _interactions(snap) == {("u1", "i1", 10, 4.0), ("u2", "i2", 11, 4.5)}
    q = _quarantine(snap)
    assert {line: reason for line, (reason, _) in q.items()} == {
        2: "bad_json", 3: "bad_json", 4: "bad_type", 6: "empty_line", 7: "bad_weight",
    }
    assert q[2][1] == "{not json"
    _identity_holds(report)


def test_jsonl_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interactions file .* has no data rows"):
        _run(tmp_path, _spec(tmp_path, "", fmt="jsonl"))


@pytest.mark.parametrize(
    ("values", "type_name"),
    [
        ([[1, 2], [3]], "list"),
        ([{"a": 1}, {"a": 2}], "struct"),
        ([b"\x00\x01", b"\x02"], "binary"),
    ],
)
def test_parquet_nested_column_is_one_clear_error(tmp_path: Path, values: list, type_name: str) -> None:
    table = pa.table({"user": pa.array(values), "item": ["i1", "i2"], "rating": [4.0, 4.0], "ts": [1, 2]})
    raw = _spec(tmp_path, b"", fmt="parquet")
    pq.write_table(table, raw["interactions"]["path"])
    with pytest.raises(ValueError, match=rf"column 'user' has type {type_name}"):
        ingest(parse_spec(raw), tmp_path / "out")


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_native_datetime_timestamps(tmp_path: Path, fmt: str) -> None:
    frames = {
        "aware": pl.Series([dt.datetime(2020, 1, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=2)))] * 2),
        "naive": pl.Series([dt.datetime(2020, 1, 1, 0, 0, 0, 900_000)] * 2),  # naive: taken as UTC
        "date": pl.Series([dt.date(2020, 1, 1)] * 2),
    }
    for kind, ts in frames.items():
        frame = pl.DataFrame({"user": ["u1", "u2"], "item": ["i1", "i2"], "rating": [4.0, 5.0], "ts": ts})
        path = tmp_path / f"{kind}.{fmt}"
        if fmt == "parquet":
            frame.write_parquet(path)
        else:
            feather.write_feather(frame.to_arrow(), path)
        raw = _spec(tmp_path, b"", fmt=fmt)
        raw["interactions"]["path"] = str(path)
        report, snap = _run(tmp_path / kind, raw)
        assert snap.interactions["timestamp"].to_list() == [1577836800, 1577836800], kind
        assert report.quarantined["interactions"] == {}, kind  # was bad_timestamp for every row


def test_arrow_stream_and_quarantine_raw(tmp_path: Path) -> None:
    table = pa.table({"user": ["u1", None], "item": ["i1", "i2"], "rating": [4.0, 4.0], "ts": [1, 2]})
    path = tmp_path / "log.arrows"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    raw = _spec(tmp_path, b"", fmt="arrow")
    raw["interactions"]["path"] = str(path)
    report, snap = _run(tmp_path, raw)
    assert _quarantine(snap) == {2: ("missing_user", '{"user":null,"item":"i2","ts":2,"rating":4.0}')}
    _identity_holds(report)


def test_header_only_input_is_an_error_unless_allowed(tmp_path: Path) -> None:
    raw = _spec(tmp_path, "user,item,rating,ts\n")
    with pytest.raises(ValueError, match="no data rows"):
        ingest(parse_spec(raw), tmp_path / "out")
    raw["interactions"]["allow_empty"] = True
    report, snap = _run(tmp_path, raw)
    assert report.n_interactions == 0 and snap.interactions.height == 0
    _identity_holds(report)
    (tmp_path / "kg.tsv").write_text("")  # a headerless empty file
    with pytest.raises(ValueError, match="kg file .* has no data rows"):
        ingest(parse_spec(raw), tmp_path / "out")


def test_accounting_identity_in_report_and_manifest(tmp_path: Path) -> None:
    report, snap = _run(tmp_path, _spec(tmp_path, CSV_LOG))
    _identity_holds(report)
    assert report.accounting["interactions"] == {"read": 11, "accepted": 6, "quarantined": 5, "excluded": 0}
    assert snap.manifest["counts"]["accounting"] == report.accounting
    assert ingest_module.accounting_line("interactions", report.accounting["interactions"]) == (
        "interactions: read 11 = accepted 6 + quarantined 5 + excluded 0"
    )


# --------------------------------------------------------------------------- command line


def _cli(tmp_path: Path, raw: dict[str, Any], capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    from kgrec.cli import main

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    code = main(["ingest", "--spec", str(spec_path), "--out", str(tmp_path / "out"), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_header_only_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(tmp_path, _spec(tmp_path, "user,item,rating,ts\n"), capsys)
    assert code == 2
    assert "kgrec ingest: error: interactions file" in err and "no data rows" in err
    assert "Traceback" not in err


def test_cli_unreadable_parquet_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _spec(tmp_path, b"this is not parquet", fmt="parquet")
    code, _, err = _cli(tmp_path, raw, capsys)
    assert code == 2 and "kgrec ingest: error: interactions file" in err and "Traceback" not in err


def test_cli_prints_the_accounting_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(tmp_path, _spec(tmp_path, CSV_LOG), capsys)
    assert code == 0
    assert "interactions: read 11 = accepted 6 + quarantined 5 + excluded 0" in out
    code, out, _ = _cli(tmp_path, _spec(tmp_path, CSV_LOG), capsys, "--json")
    assert json.loads(out.strip().splitlines()[-1])["accounting"]["kg"]["read"] == 3


@pytest.mark.parametrize("with_ts", [True, False])
def test_partitioned_build_matches_one_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_ts: bool
) -> None:
    """The de-duplication, the sort into storage order, the content hash and the parquet write
    run per partition / slice: tiny partitions give the same snapshot as one (hash, row order)."""
    rng = __import__("numpy").random.default_rng(7)
    rows = [
        f"u{rng.integers(0, 300)},i{rng.integers(1, 5)},{rng.integers(1, 6)},{rng.integers(1, 50)}"
        for _ in range(5000)
    ]
    log = "user,item,rating,ts\n" + "\n".join(rows) + "\n"
    extra = {} if with_ts else {"timestamp": None}
    expected_report, expected = _run(tmp_path / "a", _spec(_mkdir(tmp_path / "a"), log, **extra))
    assert 0 < expected.interactions.height < 5000
    for name, value in (("PARTITION_ROWS", 97), ("SORT_ROWS", 61), ("SLICE_ROWS", 29), ("BATCH_CHARS", 256)):
        monkeypatch.setattr(ingest_module, name, value)
    report, snap = _run(tmp_path / "b", _spec(_mkdir(tmp_path / "b"), log, **extra))
    assert report.hash == expected_report.hash and report.accounting == expected_report.accounting
    assert snap.interactions.equals(expected.interactions)
    order = ["user_idx", "timestamp", "item_idx"] if with_ts else ["user_idx", "item_idx"]
    assert snap.interactions.equals(snap.interactions.sort(order))
    assert snap.quarantine().equals(expected.quarantine()) and snap.excluded().equals(expected.excluded())


def test_no_accepted_interaction(tmp_path: Path) -> None:
    """Every row rejected: an empty interactions table, hashed like the canonical empty table."""
    report, snap = _run(tmp_path, _spec(tmp_path, "user,item,rating,ts\nu1,i9,4,1\n,i1,4,2\n"))
    assert report.n_interactions == 0 and snap.interactions.height == 0
    assert snap.interactions.columns == ["user_idx", "item_idx", "timestamp", "weight"]
    _identity_holds(report)
