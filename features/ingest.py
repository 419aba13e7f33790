"""Raw logs + knowledge graph -> validated, content-addressed snapshot (see ``snapshot.py``).

Nothing is lost silently: every data row of every input file ends up in exactly one of
  * the accepted tables (interactions, item links, KG triples, item names),
  * ``quarantine.parquet`` (malformed: wrong field count, missing or unparsable values, duplicates,
    KG triples disconnected from every item), or
  * ``excluded.parquet`` (valid but left out by policy: not a positive, item not linked,
    a repeat of an earlier interaction),
with its source, 1-based line number (row number for parquet/jsonl) and raw text.

Text files are read as raw lines (so CRLF, stray whitespace and ragged rows are handled row by row)
and validated with vectorised polars expressions; there is no Python loop per row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from kgrec.features.snapshot import AUDIT_SCHEMA, MANIFEST, content_hash
from kgrec.features.spec import DatasetSpec, FileSpec, MinWeight
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

LOG = logging.getLogger("kgrec.features")

# Quarantine reasons (malformed rows) and exclusion reasons (valid rows left out by policy).
EMPTY_LINE = "empty_line"
WRONG_FIELD_COUNT = "wrong_field_count"
MISSING_USER = "missing_user"
MISSING_ITEM = "missing_item"
MISSING_FIELD = "missing_field"
BAD_WEIGHT = "bad_weight"
BAD_TIMESTAMP = "bad_timestamp"
DUPLICATE_EVENT = "duplicate_event"
DUPLICATE_LINK = "duplicate_link"
DUPLICATE_TRIPLE = "duplicate_triple"
DUPLICATE_NAME = "duplicate_name"
UNKNOWN_ENTITY = "unknown_entity"
NOT_POSITIVE = "not_positive"
ITEM_NOT_LINKED = "item_not_linked"
REPEAT_INTERACTION = "repeat_interaction"


@dataclass
class IngestReport:
    """What one ingestion read, kept, rejected and wrote."""

    name: str
    hash: str
    snapshot_dir: Path
    reused: bool
    rows_read: dict[str, int]
    rows_accepted: dict[str, int]
    #: source kind -> reason -> rows
    quarantined: dict[str, dict[str, int]]
    #: reason -> rows (interactions only)
    excluded: dict[str, int]
    n_interactions: int
    n_users: int
    n_items: int
    n_entities: int
    n_relations: int
    n_triples: int
    seconds: float = 0.0

    @property
    def n_quarantined(self) -> int:
        return sum(n for reasons in self.quarantined.values() for n in reasons.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["snapshot_dir"] = str(self.snapshot_dir)
        return out


# --------------------------------------------------------------------------- reading


@dataclass
class _RawRows:
    """The data rows of one file: ``line``, ``raw``, ``n_fields`` and one string column per role
    (stripped; empty -> null)."""

    source: str
    frame: pl.DataFrame
    expected_fields: int | None  # None for parquet/jsonl (no field splitting)


def _read_rows(source: str, spec: FileSpec, path: Path) -> _RawRows:
    if not path.is_file():
        raise FileNotFoundError(f"{source} file {path} does not exist")
    roles = spec.columns()
    if spec.is_text:
        return _read_text(source, spec, path, roles)
    frame = pl.read_parquet(path) if spec.format == "parquet" else pl.read_ndjson(path)
    missing = [str(ref) for ref in roles.values() if ref not in frame.columns]
    if missing:
        raise ValueError(f"{source} file {path} has no column(s) {missing}; it has {frame.columns}")
    refs = [str(ref) for ref in roles.values()]
    frame = frame.select(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line"),
        pl.struct(refs).struct.json_encode().alias("raw"),
        pl.lit(None, dtype=pl.Int64).alias("n_fields"),
        *[_clean(pl.col(str(ref)).cast(pl.String)).alias(role) for role, ref in roles.items()],
    )
    return _RawRows(source, frame, None)


def _clean(expr: pl.Expr) -> pl.Expr:
    """Strip whitespace (and a stray CR); an empty field is a missing one."""
    stripped = expr.str.strip_chars()
    return pl.when(stripped == "").then(None).otherwise(stripped)


def _read_text(source: str, spec: FileSpec, path: Path, roles: dict[str, str | int]) -> _RawRows:
    # Undecodable bytes become U+FFFD instead of aborting: the row then fails validation visibly.
    text = path.read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline terminates the last row, it does not start one
    frame = (
        pl.DataFrame({"raw": lines}, schema={"raw": pl.String})
        .with_row_index("line", offset=1)
        .with_columns(pl.col("line").cast(pl.Int64), pl.col("raw").str.strip_chars_end("\r"))
    )
    sep = spec.sep
    positions: dict[str, int]
    if spec.has_header:
        if frame.height == 0:
            raise ValueError(f"{source} file {path} is empty but declared with a header")
        header = [h.strip() for h in frame["raw"][0].split(sep)]
        positions = {role: _header_position(header, str(ref), source, path) for role, ref in roles.items()}
        expected: int | None = len(header)
        frame = frame.slice(1)
    else:
        positions = {role: int(ref) for role, ref in roles.items()}
        expected = spec.n_fields
    frame = frame.with_columns(pl.col("raw").str.split(sep).alias("_fields")).with_columns(
        pl.col("_fields").list.len().cast(pl.Int64).alias("n_fields")
    )
    if expected is None:
        # Headerless: the usual shape of a row is the most common field count.
        counts = frame.filter(pl.col("raw").str.strip_chars() != "")["n_fields"]
        expected = int(counts.mode().min()) if counts.len() else max(positions.values()) + 1
    if max(positions.values()) >= expected:
        raise ValueError(
            f"{source} file {path}: column position {max(positions.values())} but rows have "
            f"{expected} fields"
        )
    frame = frame.select(
        "line",
        "raw",
        "n_fields",
        *[_clean(pl.col("_fields").list.get(pos, null_on_oob=True)).alias(role) for role, pos in positions.items()],
    )
    return _RawRows(source, frame, expected)


def _header_position(header: list[str], name: str, source: str, path: Path) -> int:
    """Position of ``name`` in the header; RecBole's type suffix (``user_id:token``) may be omitted."""
    if name in header:
        return header.index(name)
    bare = [h.split(":", 1)[0] for h in header]
    if bare.count(name) == 1:
        return bare.index(name)
    raise ValueError(f"{source} file {path}: no column {name!r} in header {header}")


# --------------------------------------------------------------------------- validation


def _first_reason(checks: Sequence[tuple[str, pl.Expr]]) -> pl.Expr:
    """The first failing check's reason per row (null when every check passes)."""
    reason: pl.Expr = pl.lit(None, dtype=pl.String)
    for name, failed in reversed(checks):
        reason = pl.when(failed.fill_null(False)).then(pl.lit(name)).otherwise(reason)
    return reason.alias("reason")


def _shape_checks(rows: _RawRows) -> list[tuple[str, pl.Expr]]:
    checks = [(EMPTY_LINE, pl.col("raw").str.strip_chars() == "")]
    if rows.expected_fields is not None:
        checks.append((WRONG_FIELD_COUNT, pl.col("n_fields") != rows.expected_fields))
    return checks


def _not_first(keys: Sequence[str]) -> pl.Expr:
    """True for a valid row whose key already appeared in an earlier *valid* row."""
    valid = pl.col("reason").is_null()
    return valid & ~pl.struct([*keys, valid.alias("_valid")]).is_first_distinct()


def _with_reason(frame: pl.DataFrame, reason: str, failed: pl.Expr) -> pl.DataFrame:
    """Set ``reason`` on rows that are still valid and fail ``failed``."""
    return frame.with_columns(
        pl.when(pl.col("reason").is_null() & failed.fill_null(False))
        .then(pl.lit(reason))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )


def _timestamp_value() -> pl.Expr:
    """Integer timestamp; integer-valued floats ("881250949.0") accepted; anything else null."""
    as_int = pl.col("timestamp").cast(pl.Int64, strict=False)
    as_float = pl.col("timestamp").cast(pl.Float64, strict=False)
    integral = as_float.is_finite() & (as_float == as_float.floor()) & (as_float.abs() < 2.0**62)
    value = pl.when(as_int.is_not_null()).then(as_int).when(integral).then(as_float.cast(pl.Int64))
    return value.otherwise(None)


def _validate_interactions(rows: _RawRows, has_ts: bool, has_weight: bool) -> pl.DataFrame:
    frame = rows.frame.with_columns(
        *([_timestamp_value().alias("ts")] if has_ts else []),
        *([pl.col("weight").cast(pl.Float64, strict=False).alias("w")] if has_weight else []),
    )
    checks = _shape_checks(rows) + [
        (MISSING_USER, pl.col("user").is_null()),
        (MISSING_ITEM, pl.col("item").is_null()),
    ]
    if has_weight:
        checks.append((BAD_WEIGHT, pl.col("w").is_null() | ~pl.col("w").is_finite()))
    if has_ts:
        checks.append((BAD_TIMESTAMP, pl.col("ts").is_null() | (pl.col("ts") < 0)))
    frame = frame.with_columns(_first_reason(checks))
    # An exact duplicate: the same event (every mapped value equal, parsed) seen again.
    keys = ["user", "item"] + (["ts"] if has_ts else []) + (["w"] if has_weight else [])
    return _with_reason(frame, DUPLICATE_EVENT, _not_first(keys))


def _validate_links(rows: _RawRows) -> pl.DataFrame:
    checks = _shape_checks(rows) + [(MISSING_FIELD, pl.col("item").is_null() | pl.col("entity").is_null())]
    frame = rows.frame.with_columns(_first_reason(checks))
    # One item <-> one entity: a second link for either side loses to the first.
    return _with_reason(frame, DUPLICATE_LINK, _not_first(["item"]) | _not_first(["entity"]))


def _validate_kg(rows: _RawRows, linked_entities: pl.Series) -> pl.DataFrame:
    fields = ["head", "relation", "tail"]
    checks = _shape_checks(rows) + [(MISSING_FIELD, pl.any_horizontal(pl.col(fields).is_null()))]
    frame = rows.frame.with_columns(_first_reason(checks))
    frame = _with_reason(frame, DUPLICATE_TRIPLE, _not_first(fields))
    reachable = _reaches_an_item(frame.filter(pl.col("reason").is_null()), linked_entities)
    return frame.with_columns(
        pl.when(pl.col("reason").is_null() & ~pl.col("line").is_in(reachable.implode()))
        .then(pl.lit(UNKNOWN_ENTITY))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )


def _reaches_an_item(triples: pl.DataFrame, linked_entities: pl.Series) -> pl.Series:
    """Lines of the triples whose connected component (undirected, any number of hops) holds an
    entity linked to an item; the others cannot inform any recommendation."""
    vocab = pl.concat([linked_entities, triples["head"], triples["tail"]]).unique(maintain_order=True)
    codes = pl.Series(np.arange(vocab.len(), dtype=np.int64))
    head = triples["head"].replace_strict(vocab, codes).to_numpy()
    tail = triples["tail"].replace_strict(vocab, codes).to_numpy()
    n = vocab.len()
    adjacency = sp.coo_matrix((np.ones(len(head), dtype=np.int8), (head, tail)), shape=(n, n))
    _, labels = connected_components(adjacency, directed=True, connection="weak")
    item_components = np.unique(labels[linked_entities.replace_strict(vocab, codes).to_numpy()])
    return triples["line"].filter(pl.Series(np.isin(labels[head], item_components)))


def _validate_names(rows: _RawRows) -> pl.DataFrame:
    checks = _shape_checks(rows) + [(MISSING_FIELD, pl.col("item").is_null() | pl.col("name").is_null())]
    frame = rows.frame.with_columns(_first_reason(checks))
    return _with_reason(frame, DUPLICATE_NAME, _not_first(["item"]))


def _apply_policy(frame: pl.DataFrame, spec: DatasetSpec, linked_items: pl.Series, has_ts: bool) -> pl.DataFrame:
    """Exclusion reasons for valid interactions (``policy`` column, null = kept)."""
    valid = frame.filter(pl.col("reason").is_null())
    checks: list[tuple[str, pl.Expr]] = []
    if isinstance(spec.positive, MinWeight):
        checks.append((NOT_POSITIVE, pl.col("w") < spec.positive.min_weight))
    if spec.restrict_to_linked_items:
        checks.append((ITEM_NOT_LINKED, ~pl.col("item").is_in(linked_items.implode())))
    valid = valid.with_columns(_first_reason(checks))
    # Of the remaining positives for one (user, item), keep the earliest (then the first row).
    order = ["ts", "line"] if has_ts else ["line"]
    valid = _with_reason(valid.sort(order), REPEAT_INTERACTION, _not_first(["user", "item"]))
    return valid.rename({"reason": "policy"})


# --------------------------------------------------------------------------- indexing


def _index(values: pl.Series, id_name: str, idx_name: str) -> pl.DataFrame:
    """Contiguous int32 indices for the distinct ids, sorted by id string (deterministic)."""
    ids = values.unique().sort()
    return pl.DataFrame(
        {id_name: ids, idx_name: pl.Series(np.arange(ids.len(), dtype=np.int32))},
        schema={id_name: pl.String, idx_name: pl.Int32},
    )


def _audit(frame: pl.DataFrame, source: str, reason_col: str = "reason") -> pl.DataFrame:
    return frame.filter(pl.col(reason_col).is_not_null()).select(
        pl.lit(source).alias("source"), "line", "raw", pl.col(reason_col).alias("reason")
    )


def _reason_counts(frame: pl.DataFrame) -> dict[str, int]:
    if frame.height == 0:
        return {}
    counts = frame.group_by("reason").len().sort("reason")
    return dict(zip(counts["reason"].to_list(), counts["len"].to_list(), strict=True))


# --------------------------------------------------------------------------- entry point


def ingest(
    spec: DatasetSpec, out_dir: str | Path, progress: bool = False, data_root: Path | None = None
) -> IngestReport:
    """Validate the raw files of ``spec`` and write the snapshot ``out_dir/<name>-<hash[:12]>/``.

    ``data_root`` overrides the data directory for relative paths (default: :func:`spec.data_dir`).
    If a snapshot with the same content hash already exists it is reused, not rewritten.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {"interactions": spec.interactions, "item_links": spec.item_links, "kg": spec.kg}
    if spec.item_names is not None:
        sources["item_names"] = spec.item_names
    paths = {kind: spec.resolve(fs.path, data_root) for kind, fs in sources.items()}
    has_ts = spec.interactions.timestamp is not None
    has_weight = spec.interactions.weight is not None

    show = progress and sys.stderr.isatty()
    bar = tqdm(total=len(sources) + 3, desc=f"ingest {spec.name}", disable=not show)
    raw = {}
    for kind, fs in sources.items():
        bar.set_postfix_str(kind)
        raw[kind] = _read_rows(kind, fs, paths[kind])
        bar.update()

    # Links first: they decide which items exist and which KG triples can reach an item.
    links = _validate_links(raw["item_links"])
    good_links = links.filter(pl.col("reason").is_null()).select("item", "entity")
    kg = _validate_kg(raw["kg"], good_links["entity"])
    names = _validate_names(raw["item_names"]) if "item_names" in raw else None
    inter = _validate_interactions(raw["interactions"], has_ts, has_weight)
    policy = _apply_policy(inter, spec, good_links["item"], has_ts)
    bar.update()

    kept = policy.filter(pl.col("policy").is_null())
    good_kg = kg.filter(pl.col("reason").is_null())
    tables = _build_tables(spec, kept, good_links, good_kg, names, has_ts, has_weight)
    bar.update()

    quarantine = pl.concat(
        [_audit(inter, "interactions"), _audit(links, "item_links"), _audit(kg, "kg")]
        + ([_audit(names, "item_names")] if names is not None else []),
        how="vertical",
    ).cast(AUDIT_SCHEMA)
    excluded = _audit(policy, "interactions", "policy").sort("line").cast(AUDIT_SCHEMA)

    rows_read = {kind: r.frame.height for kind, r in raw.items()}
    rows_accepted = {
        "interactions": kept.height,
        "item_links": good_links.height,
        "kg": good_kg.height,
        **({"item_names": int(names["reason"].is_null().sum())} if names is not None else {}),
    }
    quarantined = {
        kind: _reason_counts(quarantine.filter(pl.col("source") == kind)) for kind in raw
    }
    report_counts = dict(
        n_interactions=tables["interactions"].height,
        n_users=tables["users"].height,
        n_items=tables["items"].height,
        n_entities=tables["entities"].height,
        n_relations=tables["relations"].height,
        n_triples=tables["kg"].height,
    )
    digest = content_hash(tables)
    manifest = {
        "name": spec.name,
        "hash": digest,
        "spec": spec.model_dump(mode="json"),
        "sources": {kind: str(p) for kind, p in paths.items()},
        "counts": {
            **report_counts,
            "rows_read": rows_read,
            "rows_accepted": rows_accepted,
            "quarantined": quarantined,
            "excluded": _reason_counts(excluded),
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "kgrec_version": _version(),
    }
    target, reused = _write_snapshot(out_dir, spec.name, digest, tables, quarantine, excluded, manifest)
    bar.update()
    bar.close()

    report = IngestReport(
        name=spec.name,
        hash=digest,
        snapshot_dir=target,
        reused=reused,
        rows_read=rows_read,
        rows_accepted=rows_accepted,
        quarantined=quarantined,
        excluded=_reason_counts(excluded),
        seconds=round(time.perf_counter() - started, 3),
        **report_counts,
    )
    _log(report)
    return report


def _build_tables(
    spec: DatasetSpec,
    kept: pl.DataFrame,
    links: pl.DataFrame,
    triples: pl.DataFrame,
    names: pl.DataFrame | None,
    has_ts: bool,
    has_weight: bool,
) -> dict[str, pl.DataFrame]:
    """Index spaces and the accepted tables in the snapshot layout."""
    users = _index(kept["user"], "user_id", "user_idx")
    item_ids = links["item"] if spec.restrict_to_linked_items else pl.concat([links["item"], kept["item"]])
    items = _index(item_ids, "item_id", "item_idx")
    n_items = items.height

    name_map = (
        names.filter(pl.col("reason").is_null()).select(pl.col("item").alias("item_id"), "name")
        if names is not None
        else pl.DataFrame(schema={"item_id": pl.String, "name": pl.String})
    )
    # Optional item categories: only when the spec declares them (older snapshots keep their layout
    # and content hash).
    with_categories = spec.item_names is not None and spec.item_names.categories is not None
    if with_categories:
        assert names is not None and spec.item_names is not None
        name_map = name_map.join(
            names.filter(pl.col("reason").is_null()).select(
                pl.col("item").alias("item_id"),
                _split_categories(pl.col("categories"), spec.item_names.category_separator),
            ),
            on="item_id",
            how="left",
        )
    items = (
        items.join(links.rename({"item": "item_id", "entity": "entity_id"}), on="item_id", how="left")
        .join(name_map, on="item_id", how="left")
        .select(
            "item_id",
            "item_idx",
            "entity_id",
            "name",
            *(
                [pl.col("categories").fill_null(pl.lit([], dtype=pl.List(pl.String)))]
                if with_categories
                else []
            ),
        )
        .sort("item_idx")
    )

    linked = items.filter(pl.col("entity_id").is_not_null())
    other = pl.concat([triples["head"], triples["tail"]]).unique()
    entities = _index(other.filter(~other.is_in(linked["entity_id"].implode())), "entity_id", "entity_idx")
    relations = _index(triples["relation"], "relation", "relation_idx")

    # KG node space: a linked entity is its item's node; other entities follow the items.
    node_of = pl.concat(
        [
            linked.select(pl.col("entity_id"), pl.col("item_idx").alias("node")),
            entities.select(pl.col("entity_id"), (pl.col("entity_idx") + n_items).alias("node")),
        ]
    )
    kg = triples.select(
        pl.col("head").replace_strict(node_of["entity_id"], node_of["node"], return_dtype=pl.Int32),
        pl.col("relation").replace_strict(relations["relation"], relations["relation_idx"], return_dtype=pl.Int32),
        pl.col("tail").replace_strict(node_of["entity_id"], node_of["node"], return_dtype=pl.Int32),
    ).sort("head", "relation", "tail")

    columns = [
        pl.col("user").replace_strict(users["user_id"], users["user_idx"], return_dtype=pl.Int32).alias("user_idx"),
        pl.col("item").replace_strict(items["item_id"], items["item_idx"], return_dtype=pl.Int32).alias("item_idx"),
    ]
    if has_ts:
        columns.append(pl.col("ts").cast(pl.Int64).alias("timestamp"))
    if has_weight:
        columns.append(pl.col("w").cast(pl.Float64).alias("weight"))
    interactions = kept.select(columns).sort(["user_idx"] + (["timestamp"] if has_ts else []) + ["item_idx"])
    return {
        "interactions": interactions,
        "kg": kg,
        "users": users,
        "items": items,
        "entities": entities,
        "relations": relations,
    }


def _split_categories(column: pl.Expr, separator: str | None) -> pl.Expr:
    """``"a b  c"`` -> ``["a", "b", "c"]`` (whitespace runs by default); null or empty -> ``[]``;
    repeated categories kept once, in first-seen order."""
    text = column.fill_null("")
    parts = (
        text.str.strip_chars().str.replace_all(r"\s+", " ").str.split(" ")
        if separator is None
        else text.str.split(separator)
    )
    parts = parts.list.eval(pl.element().str.strip_chars()).list.eval(
        pl.element().filter(pl.element() != "")
    )
    return parts.list.unique(maintain_order=True).alias("categories")


def _audit_hash(quarantine: pl.DataFrame, excluded: pl.DataFrame) -> str:
    """Hash of the rejected rows: same accepted content can come with different rejects."""
    digest = hashlib.sha256()
    for frame in (quarantine, excluded):
        digest.update(frame.sort(["source", "line"]).write_csv().encode())
    return digest.hexdigest()


def _write_snapshot(
    out_dir: Path,
    name: str,
    digest: str,
    tables: dict[str, pl.DataFrame],
    quarantine: pl.DataFrame,
    excluded: pl.DataFrame,
    manifest: dict[str, Any],
) -> tuple[Path, bool]:
    """Write into a temp dir inside ``out_dir`` then rename, so readers never see half a snapshot.

    An existing directory with the same content hash and the same rejected rows is reused; one
    with the same content but other rejected rows (or a broken one) is replaced. Returns
    (path, reused).
    """
    target = out_dir / f"{name}-{digest[:12]}"
    manifest = {**manifest, "audit_hash": _audit_hash(quarantine, excluded)}
    if _manifest_hashes(target) == (digest, manifest["audit_hash"]):
        LOG.info("snapshot %s already exists with the same content: reused", target)
        return target, True
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        for table, frame in tables.items():
            frame.write_parquet(tmp / f"{table}.parquet")
        quarantine.write_parquet(tmp / "quarantine.parquet")
        excluded.write_parquet(tmp / "excluded.parquet")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        if target.exists():
            # Move the stale directory aside first: rename cannot replace a non-empty directory.
            LOG.warning("replacing snapshot directory %s (broken or other rejected rows)", target)
            aside = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=out_dir))
            os.rename(target, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if _manifest_hashes(target)[0] != digest:  # not a concurrent writer of the same content
                raise
            shutil.rmtree(tmp)
            return target, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, False


def _manifest_hashes(directory: Path) -> tuple[str | None, str | None]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        return manifest.get("hash"), manifest.get("audit_hash")
    except (OSError, ValueError):
        return None, None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kgrec")
    except Exception:  # noqa: BLE001 - metadata is informative only
        return "unknown"


def _log(report: IngestReport) -> None:
    LOG.info(
        "ingested %s -> %s (%s): %d interactions, %d users, %d items, %d entities, %d relations, "
        "%d triples in %.2fs",
        report.name,
        report.snapshot_dir,
        "reused" if report.reused else "written",
        report.n_interactions,
        report.n_users,
        report.n_items,
        report.n_entities,
        report.n_relations,
        report.n_triples,
        report.seconds,
    )
    for kind, n in report.rows_read.items():
        LOG.info(
            "  %s: read %d, accepted %d, quarantined %s",
            kind, n, report.rows_accepted[kind], report.quarantined[kind] or 0,
        )
    if report.excluded:
        LOG.info("  excluded interactions: %s", report.excluded)
