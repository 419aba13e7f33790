"""Shared fixtures for the features tests: tiny hand-written datasets and the real `music` data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kgrec.features.ingest import IngestReport, ingest
from kgrec.features.snapshot import Snapshot, load_snapshot
from kgrec.features.spec import DatasetSpec, data_dir, load_spec, parse_spec

# A small log with one problem per line (line numbers in comments; line 1 is the header).
MALFORMED_LOG = (
    "user\titem\trating\tts\r\n"  # 1 header
    "u1\ti1\t5\t100\r\n"  # 2 ok
    " u1 \t i2 \t 4 \t 200 \r\n"  # 3 ok (stray spaces)
    "u2\ti1\t3\r\n"  # 4 wrong_field_count (ragged)
    "\ti2\t4\t300\r\n"  # 5 missing_user
    "u2\ti2\tabc\t300\r\n"  # 6 bad_weight
    "u2\ti3\t4\tyesterday\r\n"  # 7 bad_timestamp
    "u1\ti1\t5\t100\r\n"  # 8 duplicate_event (exact duplicate of line 2)
    "u1\ti1\t3\t150\r\n"  # 9 repeat_interaction (same user,item, later)
    "u2\ti9\t4\t100\r\n"  # 10 item_not_linked
    "u3\ti1\tnan\t5\r\n"  # 11 bad_weight
    "u3\ti2\t4\t881250949.0\r\n"  # 12 ok (integer-valued float timestamp)
    "u3\ti3\t4\t-5\r\n"  # 13 bad_timestamp (negative)
    "u3\ti3\t4\t1.5\r\n"  # 14 bad_timestamp (not an integer)
    "u3\ti3\t2\t10\r\n"  # 15 not_positive (rating < 3)
    "u2\t\t4\t5"  # 16 missing_item, no final newline
)
MALFORMED_EXPECTED = {
    4: "wrong_field_count",
    5: "missing_user",
    6: "bad_weight",
    7: "bad_timestamp",
    8: "duplicate_event",
    11: "bad_weight",
    13: "bad_timestamp",
    14: "bad_timestamp",
    16: "missing_item",
}
MALFORMED_EXCLUDED = {9: "repeat_interaction", 10: "item_not_linked", 15: "not_positive"}

LINKS = "i1\te1\r\ni2\te2\r\ni3\te3\r\ni1\te4\r\ni4\te1\r\n"  # lines 4, 5: duplicate_link
KG = (
    "e1\tr1\te10\r\n"  # 1
    "e2\tr2\te10\r\n"  # 2
    "e3\tr1\te11\r\n"  # 3
    "x1\tr9\tx2\r\n"  # 4 disconnected: no path to any item
    "e1\tr1\te10\r\n"  # 5 duplicate_triple
    "e5\tr1\r\n"  # 6 wrong_field_count
    "\tr1\te2\r\n"  # 7 missing_field
    "x2\tr9\tx3\r\n"  # 8 disconnected (two hops from x1, still no item)
)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))  # bytes: keep the CRLF endings exactly
    return path


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., DatasetSpec]:
    """Factory: write the tiny dataset files under tmp_path and return a validated spec."""

    def factory(
        log_text: str = MALFORMED_LOG, links_text: str = LINKS, kg_text: str = KG, **overrides: Any
    ) -> DatasetSpec:
        raw: dict[str, Any] = {
            "name": "tiny",
            "interactions": {
                "path": str(write(tmp_path / "log.tsv", log_text)),
                "format": "tsv",
                "user": "user",
                "item": "item",
                "weight": "rating",
                "timestamp": "ts",
            },
            "positive": {"min_weight": 3},
            "item_links": {
                "path": str(write(tmp_path / "links.tsv", links_text)),
                "has_header": False,
                "item": 0,
                "entity": 1,
            },
            "kg": {
                "path": str(write(tmp_path / "kg.tsv", kg_text)),
                "has_header": False,
                "head": 0,
                "relation": 1,
                "tail": 2,
            },
            "restrict_to_linked_items": True,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return parse_spec(raw)

    return factory


def _require_data(name: str) -> Path:
    try:
        root = data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"shared data not available: {exc}")
    if not (root / name).is_dir():
        pytest.skip(f"shared data set {name!r} missing under {root}")
    return root


@pytest.fixture(scope="session")
def music_ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[IngestReport, Snapshot]:
    _require_data("music")
    report = ingest(load_spec("music"), tmp_path_factory.mktemp("snapshots"))
    return report, load_snapshot(report.snapshot_dir)


@pytest.fixture(scope="session")
def ml100k_ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[IngestReport, Snapshot]:
    _require_data("ml-100k")
    report = ingest(load_spec("ml-100k"), tmp_path_factory.mktemp("snapshots"))
    return report, load_snapshot(report.snapshot_dir)


@pytest.fixture
def tiny() -> dict[str, Any]:
    """The hand-written malformed log and the reasons expected per line."""
    return {"log": MALFORMED_LOG, "quarantined": MALFORMED_EXPECTED, "excluded": MALFORMED_EXCLUDED}
