"""Raw logs + knowledge graph -> validated, content-addressed snapshot (see ``snapshot.py``).

Nothing is lost silently: every data row of every input file ends up in exactly one of
  * the accepted tables (interactions, item links, KG triples, item names),
  * ``quarantine.parquet`` (malformed: see the reasons below), or
  * ``excluded.parquet`` (valid but left out by policy: not a positive, item not linked,
    a repeat of an earlier interaction),
with its source, 1-based line number (the first physical line of a multi-line record; the row
number for parquet/arrow) and raw text. Each run checks, per source file, the accounting identity
``read = accepted + quarantined + excluded`` (``IngestReport.accounting``, also in the manifest
counts) and fails with an internal error if it does not hold.

Reading (streamed, in batches; nothing holds the whole file as text):
  * csv/tsv: the spec's dialect (``FileSpec``: RFC 4180 quoting for csv, none for tsv). Quoted
    or escaped files go through :mod:`csv` (C reader, strict: a malformed quote is the row's
    ``bad_quoting``); unquoted ones are split on the separator, one record per line. A UTF-8 BOM
    is stripped; undecodable bytes become U+FFFD (the row then fails validation visibly). Empty
    lines are quarantined as ``empty_line``, a copy of the header as ``repeated_header``.
  * jsonl: one JSON object per line; invalid JSON or a non-object is ``bad_json``, an object or
    array where a scalar is needed ``bad_type``.
  * parquet / arrow (IPC file or stream, i.e. Feather v2): pyarrow record batches of the mapped
    columns only. A mapped column of a nested or binary type is an error naming it. A timestamp
    or date column becomes epoch seconds (timezone-aware: UTC; naive: taken as UTC; sub-second
    parts dropped).
  * Text timestamps are integer epoch seconds (an integral float such as ``881250949.0`` is
    accepted); weights are floats.
  * A file without any data row (empty, header only, only empty lines) is an error unless its spec
    says ``allow_empty: true``. Reader errors (polars, pyarrow) become a ``ValueError`` naming
    the file.

Per batch only the mapped fields are kept, already encoded (interaction users and items as
integer codes of a running vocabulary, timestamps and weights parsed) next to a one-byte reason
code, so the working set is about the size of the accepted table; the raw text of the rejected
rows is recovered at the end by one more pass over the file. Validation is vectorised (polars,
numpy); the de-duplications run in partitions of users to bound their hash tables.

Peak memory (``benchmarks/ingest_scale.py``): the interaction columns are numpy arrays reserved
ahead from the first batch (no concatenation at the end of the read), whole-column numpy passes
run in slices, and the accepted table is never copied: it is compacted in place, sorted per range
of users into a uint32 permutation (:class:`_Interactions`), and the content hash and the parquet
file gather it slice by slice. The peak is about the accepted columns (24 bytes a row with
timestamp and weight) plus 1-2 bytes per log row (reason and partition codes) or 4 per accepted
row (the permutation), plus buffers bounded by the batch, partition and slice sizes.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
from kgrec.features.snapshot import AUDIT_SCHEMA, HASHED_TABLES, MANIFEST
from kgrec.features.spec import DatasetSpec, FileSpec, MinWeight
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

LOG = logging.getLogger("kgrec.features")

# Quarantine reasons (malformed rows) and exclusion reasons (valid rows left out by policy).
EMPTY_LINE = "empty_line"
BAD_QUOTING = "bad_quoting"
BAD_JSON = "bad_json"
BAD_TYPE = "bad_type"
REPEATED_HEADER = "repeated_header"
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
DISCONNECTED = "disconnected"
NOT_POSITIVE = "not_positive"
ITEM_NOT_LINKED = "item_not_linked"
REPEAT_INTERACTION = "repeat_interaction"

QUARANTINE_REASONS: tuple[str, ...] = (
    EMPTY_LINE, BAD_QUOTING, BAD_JSON, BAD_TYPE, REPEATED_HEADER, WRONG_FIELD_COUNT, MISSING_USER,
    MISSING_ITEM, MISSING_FIELD, BAD_WEIGHT, BAD_TIMESTAMP, DUPLICATE_EVENT, DUPLICATE_LINK,
    DUPLICATE_TRIPLE, DUPLICATE_NAME, DISCONNECTED,
)
EXCLUSION_REASONS: tuple[str, ...] = (NOT_POSITIVE, ITEM_NOT_LINKED, REPEAT_INTERACTION)
#: Reason -> one-byte code (0: no reason, the row is still accepted).
REASONS: tuple[str, ...] = ("",) + QUARANTINE_REASONS + EXCLUSION_REASONS
CODE: dict[str, int] = {name: code for code, name in enumerate(REASONS) if name}
_FIRST_EXCLUSION = CODE[NOT_POSITIVE]
#: Shape reasons decided while reading; a headerless file's wrong_field_count does not override them.
_SHAPE_CODES = (CODE[EMPTY_LINE], CODE[BAD_QUOTING], CODE[BAD_JSON], CODE[REPEATED_HEADER])

#: Text read per batch (characters, about bytes) and columnar rows per batch.
BATCH_CHARS = 4 << 20
BATCH_ROWS = 1 << 20
#: Rows per partition of the de-duplication passes (bounds their hash tables).
PARTITION_ROWS = 1_000_000
#: Rows per partition of the sorts into storage / content-hash order (bounds their workspace).
SORT_ROWS = 2_000_000
#: Rows per slice of the whole-column numpy passes (a lookup ``table[codes]`` over a whole
#: column would first copy the codes as int64) and of the hash / parquet writes.
SLICE_ROWS = 1 << 20
_NULL_CODE = np.uint32(0xFFFFFFFF)


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
    #: KG entities that are not items (KG node ids n_items ..)
    n_entities: int
    n_relations: int
    n_triples: int
    #: source kind -> {"read", "accepted", "quarantined", "excluded"}: read is the sum of the others
    accounting: dict[str, dict[str, int]]
    seconds: float = 0.0
    #: items posted to the service merged in after ingestion (kgrec.features.overlay.apply_overlay):
    #: their counts; None when no overlay was applied
    overlay: dict[str, Any] | None = None
    #: items linked to a KG entity, and every KG entity including those items' own
    n_linked_items: int = 0
    n_entities_with_items: int = 0
    #: a KG was declared and at least one of its triples accepted
    has_kg: bool = False

    @property
    def n_quarantined(self) -> int:
        return sum(n for reasons in self.quarantined.values() for n in reasons.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["snapshot_dir"] = str(self.snapshot_dir)
        return out


def kg_summary(counts: Mapping[str, Any]) -> str:
    """The KG part of an ingestion summary (an :class:`IngestReport`'s fields or its ``to_dict()``),
    entities counted without and with the items."""
    if not counts["has_kg"]:
        return "no knowledge graph"
    return (
        f"{counts['n_entities']} entities besides the items ({counts['n_entities_with_items']} with the "
        f"{counts['n_linked_items']} linked items), {counts['n_relations']} relations, {counts['n_triples']} triples"
    )


def accounting_line(kind: str, counts: dict[str, int]) -> str:
    """``interactions: read 10 = accepted 7 + quarantined 2 + excluded 1``."""
    return (
        f"{kind}: read {counts['read']} = accepted {counts['accepted']} + quarantined "
        f"{counts['quarantined']} + excluded {counts['excluded']}"
    )


# --------------------------------------------------------------------------- line numbers


class _LineMap:
    """Row index (0-based, data rows only) -> first and last physical line (1-based).

    Stored as breakpoints of ``first - row`` (constant while every record is one line) plus the
    last line of the rare multi-line records, so it costs nothing per row."""

    def __init__(self) -> None:
        self.n = 0
        self._rows: list[int] = []
        self._delta: list[int] = []
        self._last: dict[int, int] = {}

    def add_regular(self, n: int, first_line: int) -> None:
        """``n`` one-line records starting at ``first_line``."""
        self._breakpoint(self.n, first_line - self.n)
        self.n += n

    def add(self, firsts: Sequence[int], lasts: Sequence[int]) -> None:
        rows = np.arange(self.n, self.n + len(firsts), dtype=np.int64)
        delta = np.asarray(firsts, dtype=np.int64) - rows
        change = np.flatnonzero(np.diff(delta, prepend=delta[0] - 1)) if len(delta) else []
        for k in change:
            self._breakpoint(int(rows[k]), int(delta[k]))
        multi = np.flatnonzero(np.asarray(lasts, dtype=np.int64) != np.asarray(firsts, dtype=np.int64))
        for k in multi.tolist():
            self._last[int(rows[k])] = int(lasts[k])
        self.n += len(firsts)

    def _breakpoint(self, row: int, delta: int) -> None:
        if not self._delta or self._delta[-1] != delta:
            self._rows.append(row)
            self._delta.append(delta)

    def first(self, rows: np.ndarray) -> np.ndarray:
        if not self._rows:
            return rows.astype(np.int64) + 1
        at = np.searchsorted(np.asarray(self._rows), rows, side="right") - 1
        return rows.astype(np.int64) + np.asarray(self._delta, dtype=np.int64)[at]

    def last(self, rows: np.ndarray, firsts: np.ndarray) -> np.ndarray:
        if not self._last:
            return firsts
        return np.array([self._last.get(r, f) for r, f in zip(rows.tolist(), firsts.tolist(), strict=True)])


# --------------------------------------------------------------------------- reading


@dataclass
class _Rows:
    """The data rows of one file, in file order: ``reason`` codes and the mapped role columns
    (interactions: encoded as numpy arrays; other sources: one polars frame of strings)."""

    source: str
    path: Path
    spec: FileSpec
    n: int
    reason: np.ndarray  # uint8 per row
    lines: _LineMap
    columns: dict[str, np.ndarray] | None = None  # interactions
    frame: pl.DataFrame | None = None  # other sources: role columns (String) + "row"
    vocab: dict[str, _Vocab] | None = None


def _clean(expr: pl.Expr) -> pl.Expr:
    """Strip whitespace (and a stray CR); an empty field is a missing one."""
    stripped = expr.str.strip_chars()
    return pl.when(stripped == "").then(None).otherwise(stripped)


def _timestamp_value(column: str = "timestamp") -> pl.Expr:
    """Integer timestamp; integer-valued floats ("881250949.0") accepted; anything else null."""
    as_int = pl.col(column).cast(pl.Int64, strict=False)
    as_float = pl.col(column).cast(pl.Float64, strict=False)
    integral = as_float.is_finite() & (as_float == as_float.floor()) & (as_float.abs() < 2.0**62)
    value = pl.when(as_int.is_not_null()).then(as_int).when(integral).then(as_float.cast(pl.Int64))
    return value.otherwise(None)


class _Vocab:
    """Running string -> uint32 code dictionary (codes in first-seen order)."""

    def __init__(self) -> None:
        self.table = pl.DataFrame(schema={"id": pl.String, "code": pl.UInt32})

    def encode(self, values: pl.Series) -> np.ndarray:
        frame = values.rename("id").to_frame()
        new = (
            frame.select(pl.col("id").drop_nulls().unique(maintain_order=True))
            .join(self.table, on="id", how="anti")
        )
        if new.height:
            start = self.table.height
            new = new.with_columns(pl.int_range(start, start + new.height, dtype=pl.UInt32).alias("code"))
            self.table = pl.concat([self.table, new], rechunk=True)
        codes = frame.join(self.table, on="id", how="left", maintain_order="left")["code"]
        return codes.fill_null(_NULL_CODE).to_numpy()

    def strings(self, codes: np.ndarray) -> pl.Series:
        return self.table["id"].gather(pl.Series(codes, dtype=pl.UInt32))


class _Column:
    """A numpy column appended to batch by batch. Its capacity is reserved ahead from an estimate
    of the file's rows (pages never written cost no memory), so that the end of the read needs no
    concatenation (which would hold every batch and the whole column at once)."""

    def __init__(self, dtype: type) -> None:
        self.data = np.zeros(0, dtype=dtype)
        self.n = 0

    def reserve(self, rows: int) -> None:
        if rows > len(self.data):
            try:
                grown = np.empty(rows, dtype=self.data.dtype)
            except MemoryError:  # a wild estimate: grow as needed instead
                return
            grown[: self.n] = self.data[: self.n]
            self.data = grown

    def append(self, values: np.ndarray) -> None:
        end = self.n + len(values)
        if end > len(self.data):
            self.reserve(max(end, len(self.data) * 3 // 2, 1 << 16))
        self.data[self.n : end] = values
        self.n = end

    def array(self) -> np.ndarray:
        return self.data[: self.n]


class _InteractionSink:
    """Encodes each batch of interaction rows: codes for user and item, parsed timestamp and
    weight, and the first failing content check."""

    def __init__(self, roles: Sequence[str]) -> None:
        self.roles = list(roles)
        self.vocab = {"user": _Vocab(), "item": _Vocab()}
        self.parts: dict[str, _Column] = {
            "reason": _Column(np.uint8), "user": _Column(np.uint32), "item": _Column(np.uint32)
        }
        if "timestamp" in self.roles:
            self.parts["ts"] = _Column(np.int64)
        if "weight" in self.roles:
            self.parts["w"] = _Column(np.float64)

    def reserve(self, rows: int) -> None:
        for column in self.parts.values():
            column.reserve(rows)

    def add(self, frame: pl.DataFrame, reason: np.ndarray) -> None:
        parsed = frame.select(
            pl.col("user"),
            pl.col("item"),
            *([_timestamp_value().alias("ts")] if "timestamp" in self.roles else []),
            *([pl.col("weight").cast(pl.Float64, strict=False).alias("w")] if "weight" in self.roles else []),
        )
        checks = [(MISSING_USER, pl.col("user").is_null()), (MISSING_ITEM, pl.col("item").is_null())]
        if "w" in parsed.columns:
            checks.append((BAD_WEIGHT, pl.col("w").is_null() | ~pl.col("w").is_finite()))
        if "ts" in parsed.columns:
            checks.append((BAD_TIMESTAMP, pl.col("ts").is_null() | (pl.col("ts") < 0)))
        content = parsed.select(_first_reason(checks))["reason"].to_numpy()
        # Copied into the numpy columns: the batch's polars buffers are freed (and reused) at once.
        self.parts["reason"].append(np.where(reason == 0, content, reason))
        for role in ("user", "item"):
            self.parts[role].append(self.vocab[role].encode(parsed[role]))
        if "ts" in parsed.columns:
            self.parts["ts"].append(parsed["ts"].fill_null(0).to_numpy())
        if "w" in parsed.columns:
            self.parts["w"].append(parsed["w"].fill_null(float("nan")).to_numpy())

    def reason_codes(self) -> np.ndarray:
        return self.parts["reason"].array()

    def set_reason_codes(self, reason: np.ndarray) -> None:
        self.parts["reason"].array()[:] = reason

    def finish(self, rows: _Rows) -> None:
        rows.reason = self.parts.pop("reason").array()
        rows.columns = {name: self.parts.pop(name).array() for name in list(self.parts)}
        rows.vocab = self.vocab


class _FrameSink:
    """Keeps the (small) link, KG and name files as string frames."""

    def __init__(self, roles: Sequence[str]) -> None:
        self.roles = list(roles)
        self.frames: list[pl.DataFrame] = []
        self.reasons: list[np.ndarray] = []

    def add(self, frame: pl.DataFrame, reason: np.ndarray) -> None:
        self.frames.append(frame.select(self.roles))
        self.reasons.append(reason)

    def reserve(self, rows: int) -> None:
        pass

    def reason_codes(self) -> np.ndarray:
        return np.concatenate(self.reasons) if self.reasons else np.zeros(0, np.uint8)

    def set_reason_codes(self, reason: np.ndarray) -> None:
        self.reasons = [reason]

    def finish(self, rows: _Rows) -> None:
        frame = (
            pl.concat(self.frames, rechunk=True)
            if self.frames
            else pl.DataFrame(schema=dict.fromkeys(self.roles, pl.String))
        )
        rows.frame = frame.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
        rows.reason = _concat(self.reasons, np.uint8)


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    parts.clear()
    return out.astype(dtype, copy=False)


def _read_rows(source: str, spec: FileSpec, path: Path) -> _Rows:
    if not path.is_file():
        raise FileNotFoundError(f"{source} file {path} does not exist")
    roles = spec.columns()
    sink = _InteractionSink(list(roles)) if source == "interactions" else _FrameSink(list(roles))
    rows = _Rows(source, path, spec, 0, np.zeros(0, np.uint8), _LineMap())
    try:
        if spec.is_text:
            _read_text(rows, roles, sink)
        elif spec.format == "jsonl":
            _read_jsonl(rows, roles, sink)
        else:
            _read_columnar(rows, roles, sink)
    except (pl.exceptions.PolarsError, pa.ArrowException, csv.Error, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{source} file {path}: cannot read it as {spec.format}: {exc}") from exc
    sink.finish(rows)
    rows.n = len(rows.reason)
    if rows.n != rows.lines.n:
        raise RuntimeError(f"internal error: {source}: {rows.n} rows but {rows.lines.n} line entries")
    if not spec.allow_empty and int((rows.reason != CODE[EMPTY_LINE]).sum()) == 0:
        what = "only empty lines" if rows.n else ("empty or header only" if spec.is_text and spec.has_header else "empty")
        raise ValueError(
            f"{source} file {path} has no data rows ({what}); set allow_empty: true in its spec "
            "to accept an empty file"
        )
    return rows


def _line_chunks(path: Path) -> Iterator[tuple[int, list[str], bool]]:
    """(number of the first line, lines with their endings, is the last chunk). Lines end at
    "\\n" only; a BOM is stripped; undecodable bytes become U+FFFD."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="\n") as f:
        line_no = 1
        lines = f.readlines(BATCH_CHARS)
        while lines:
            following = f.readlines(BATCH_CHARS)
            yield line_no, lines, not following
            line_no += len(lines)
            lines = following


def _reserve(sink: _InteractionSink | _FrameSink, path: Path, chunk: list[str]) -> None:
    """Reserve the sink's columns for the whole file: its rows extrapolated from the first chunk
    (a quarter more; an underestimate only costs growing the columns later)."""
    chars = sum(map(len, chunk))
    if chars and not isinstance(sink, _FrameSink):
        sink.reserve(int(len(chunk) * path.stat().st_size / chars * 1.25) + 1024)


def _csv_dialect(spec: FileSpec) -> dict[str, Any]:
    minimal = spec.effective_quoting == "minimal"
    return {
        "delimiter": spec.sep,
        "quotechar": spec.quote_char if minimal else None,
        "quoting": csv.QUOTE_MINIMAL if minimal else csv.QUOTE_NONE,
        "escapechar": spec.escape_char,
        "doublequote": spec.double_quote if minimal else False,
        "skipinitialspace": minimal,
        "strict": True,
    }


class _Tokenizer:
    """Splits chunks of lines into records: ``(records, firsts, lasts)`` where a record is a
    list of fields or None (a csv error), and firsts/lasts are None when every record is one
    line. A record cut by the end of a chunk is carried over to the next one."""

    def __init__(self, spec: FileSpec) -> None:
        self.spec = spec
        self.dialect = _csv_dialect(spec) if spec.uses_csv_module else None
        self.carry: list[str] = []
        self.carry_from = 0

    def __call__(
        self, first_line: int, lines: list[str], last_chunk: bool
    ) -> tuple[int, list[list[str] | None], list[int] | None, list[int] | None]:
        if self.carry:
            first_line, lines = self.carry_from, self.carry + lines
            self.carry = []
        if self.dialect is None:
            sep = self.spec.sep
            return first_line, [line.rstrip("\r\n").split(sep) for line in lines], None, None
        # The C reader runs over the whole chunk; list.extend keeps what it parsed before an
        # error, and the reader resumes on the line after the failing one.
        reader = csv.reader(lines, **self.dialect)
        records: list[list[str] | None] = []
        errors: list[tuple[int, int]] = []  # (record index, reader.line_num after the error)
        while True:
            try:
                records.extend(reader)
                break
            except csv.Error:
                errors.append((len(records), reader.line_num))
                records.append(None)
        if not errors and len(records) == len(lines):
            return first_line, records, None, None
        # Lines per record: a record spans 1 + the line breaks kept inside its fields; a failed
        # record spans the lines the reader consumed for it.
        sizes = np.fromiter(
            ("".join(r).count("\n") + 1 if r is not None else 0 for r in records), dtype=np.int64, count=len(records)
        )
        for k, line_num in errors:
            sizes[k] = line_num - int(sizes[:k].sum())
        if errors and errors[-1][1] == len(lines) and not last_chunk:
            # The last record may just be cut by the end of the chunk: retry it with the next one.
            k = errors[-1][0]
            done = int(sizes[:k].sum())
            self.carry, self.carry_from = lines[done:], first_line + done
            records, sizes = records[:k], sizes[:k]
        firsts = first_line + np.cumsum(sizes) - sizes
        lasts = firsts + sizes - 1
        return first_line, records, firsts.tolist(), lasts.tolist()


def _read_text(rows: _Rows, roles: dict[str, str | int], sink: _InteractionSink | _FrameSink) -> None:
    with _no_gc():
        _read_text_batches(rows, roles, sink)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Millions of short-lived field lists create no reference cycles, but they trigger the
    cyclic collector over and over (it halves the reading speed)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_text_batches(rows: _Rows, roles: dict[str, str | int], sink: _InteractionSink | _FrameSink) -> None:
    spec, path, source = rows.spec, rows.path, rows.source
    tokenize = _Tokenizer(spec)
    header: list[str] | None = None
    positions: dict[str, int] | None = None if spec.has_header else {r: int(p) for r, p in roles.items()}
    expected = spec.n_fields if not spec.has_header else None
    n_fields: list[np.ndarray] = []  # headerless without n_fields: decided from the whole file
    for chunk_first, chunk, last_chunk in _line_chunks(path):
        if chunk_first == 1:
            _reserve(sink, path, chunk)
        first_line, records, firsts, lasts = tokenize(chunk_first, chunk, last_chunk)
        if not records:
            continue
        if spec.has_header and header is None:
            if records[0] is None:
                raise ValueError(f"{source} file {path}: the header line is not valid {spec.format}")
            header = [h.strip() for h in records[0]]
            positions = {role: _header_position(header, str(ref), source, path) for role, ref in roles.items()}
            expected = len(header)
            start = firsts[1] if firsts is not None and len(firsts) > 1 else (
                lasts[0] + 1 if lasts is not None else first_line + 1
            )
            records = records[1:]
            firsts = firsts[1:] if firsts is not None else None
            lasts = lasts[1:] if lasts is not None else None
            first_line = start
            if not records:
                continue
        assert positions is not None
        if firsts is None:
            rows.lines.add_regular(len(records), first_line)
        else:
            assert lasts is not None
            rows.lines.add(firsts, lasts)
        frame, reason, counts = _fields_frame(records, positions, expected, header)
        if expected is None:
            n_fields.append(counts)
        sink.add(frame, reason)
    if positions is None:  # has_header and the file is empty
        positions = {}
        if not spec.allow_empty:
            return  # the empty-input error follows
    if not spec.has_header and expected is None:
        _decide_field_count(rows, sink, positions, n_fields)
    elif positions and expected is not None and max(positions.values()) >= expected:
        _position_error(source, path, positions, expected)


def _position_error(source: str, path: Path, positions: dict[str, int], expected: int) -> None:
    raise ValueError(
        f"{source} file {path}: column position {max(positions.values())} but rows have {expected} fields"
    )


def _decide_field_count(
    rows: _Rows, sink: _InteractionSink | _FrameSink, positions: dict[str, int], n_fields: list[np.ndarray]
) -> None:
    """Headerless: the usual shape of a row is the most common field count (ties: the smallest)."""
    counts = np.concatenate(n_fields) if n_fields else np.zeros(0, np.int32)
    reason = sink.reason_codes()
    shaped = ~np.isin(reason, _SHAPE_CODES)
    if shaped.any():
        expected = int(np.bincount(counts[shaped]).argmax())
    else:
        expected = max(positions.values()) + 1 if positions else 1
    if positions and max(positions.values()) >= expected:
        _position_error(rows.source, rows.path, positions, expected)
    reason = np.where(shaped & (counts != expected), np.uint8(CODE[WRONG_FIELD_COUNT]), reason).astype(np.uint8)
    sink.set_reason_codes(reason)


def _fields_frame(
    records: list[list[str] | None],
    positions: dict[str, int],
    expected: int | None,
    header: list[str] | None,
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Role columns (cleaned strings), shape reason codes and field counts of one batch."""
    n = len(records)
    errors = [k for k, r in enumerate(records) if r is None] if None in records else []
    for k in errors:
        records[k] = []
    counts = np.fromiter(map(len, records), dtype=np.int32, count=n)  # type: ignore[arg-type]
    width = max(positions.values()) + 1 if positions else 0
    for k in np.flatnonzero(counts < width).tolist():
        records[k] = records[k] + [None] * (width - len(records[k]))  # type: ignore[operator]
    frame = pl.DataFrame(
        [pl.Series(role, [r[p] for r in records], dtype=pl.String) for role, p in positions.items()]  # type: ignore[index]
    ).select(_clean(pl.col(role)).alias(role) for role in positions)
    reason = np.zeros(n, dtype=np.uint8)
    # Candidates for the Python-level checks: every mapped field missing (empty line?) or equal to
    # the header's name (repeated header?).
    blank = frame.select(pl.all_horizontal(pl.all().is_null()).alias("b"))["b"].to_numpy() if positions else np.ones(n, bool)
    for k in np.flatnonzero(blank | (counts == 0)).tolist():
        if not "".join(f for f in records[k] if f).strip():  # type: ignore[union-attr]
            reason[k] = CODE[EMPTY_LINE]
    if header is not None and positions:
        same = frame.select(
            pl.all_horizontal(pl.col(role) == header[p] for role, p in positions.items()).alias("h")
        )["h"].fill_null(False).to_numpy()
        for k in np.flatnonzero(same).tolist():
            if [f.strip() for f in records[k]] == header:  # type: ignore[union-attr]
                reason[k] = CODE[REPEATED_HEADER]
    if expected is not None:
        wrong = (counts != expected) & (reason == 0)
        reason[wrong] = CODE[WRONG_FIELD_COUNT]
    reason[errors] = CODE[BAD_QUOTING]
    return frame, reason, counts


def _header_position(header: list[str], name: str, source: str, path: Path) -> int:
    """Position of ``name`` in the header; RecBole's type suffix (``user_id:token``) may be omitted."""
    if name in header:
        return header.index(name)
    bare = [h.split(":", 1)[0] for h in header]
    if bare.count(name) == 1:
        return bare.index(name)
    raise ValueError(f"{source} file {path}: no column {name!r} in header {header}")


def _json_scalar(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _read_jsonl(rows: _Rows, roles: dict[str, str | int], sink: _InteractionSink | _FrameSink) -> None:
    with _no_gc():
        _read_jsonl_batches(rows, roles, sink)


def _read_jsonl_batches(rows: _Rows, roles: dict[str, str | int], sink: _InteractionSink | _FrameSink) -> None:
    keys = {role: str(ref) for role, ref in roles.items()}
    seen: set[str] = set()
    objects = 0
    for first_line, lines, _ in _line_chunks(rows.path):
        if first_line == 1:
            _reserve(sink, rows.path, lines)
        n = len(lines)
        reason = np.zeros(n, dtype=np.uint8)
        values: dict[str, list[str | None]] = {role: [None] * n for role in keys}
        for k, line in enumerate(lines):
            if not line.strip():
                reason[k] = CODE[EMPTY_LINE]
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                reason[k] = CODE[BAD_JSON]
                continue
            objects += 1
            for role, key in keys.items():
                value = obj.get(key)
                if key in obj:
                    seen.add(key)
                if isinstance(value, dict | list):
                    reason[k] = CODE[BAD_TYPE]
                    break
                values[role][k] = _json_scalar(value)
        frame = pl.DataFrame(
            {role: pl.Series(role, v, dtype=pl.String) for role, v in values.items()}
        ).select(_clean(pl.col(role)).alias(role) for role in keys)
        rows.lines.add_regular(n, first_line)
        sink.add(frame, reason)
    missing = [key for key in keys.values() if key not in seen]
    if missing and objects:
        raise ValueError(f"{rows.source} file {rows.path} has no column(s) {missing}: no object has that key")


_SCALAR_TYPES: tuple[Callable[[pa.DataType], bool], ...] = (
    pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_boolean,
    pa.types.is_null, pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
    pa.types.is_timestamp, pa.types.is_date,
)


def _scalar_type(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return any(check(dtype) for check in _SCALAR_TYPES)


def _arrow_batches(path: Path, fmt: str, columns: list[str], source: str) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` (checked: present and of a scalar type)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        _check_schema(schema, columns, source, path)
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    source_file = pa.memory_map(str(path))
    try:
        reader: Any = pa.ipc.open_file(source_file)
    except pa.ArrowInvalid:  # not the file format: the stream format
        source_file.seek(0)
        stream = pa.ipc.open_stream(source_file)
        _check_schema(stream.schema, columns, source, path)
        for batch in stream:
            yield batch.select(columns)
        return
    _check_schema(reader.schema, columns, source, path)
    for k in range(reader.num_record_batches):
        yield reader.get_batch(k).select(columns)


def _check_schema(schema: pa.Schema, columns: list[str], source: str, path: Path) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{source} file {path} has no column(s) {missing}; it has {schema.names}")
    for name in columns:
        dtype = schema.field(name).type
        if not _scalar_type(dtype):
            raise ValueError(
                f"{source} file {path}: column {name!r} has type {dtype}, which cannot be read as a "
                "scalar value (nested, binary or other non-scalar types are not supported)"
            )


def _read_columnar(rows: _Rows, roles: dict[str, str | int], sink: _InteractionSink | _FrameSink) -> None:
    refs = {role: str(ref) for role, ref in roles.items()}
    for batch in _arrow_batches(rows.path, rows.spec.format, list(dict.fromkeys(refs.values())), rows.source):
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        exprs = []
        for role, ref in refs.items():
            column = pl.col(ref)
            if role == "timestamp" and frame.schema[ref].is_temporal():
                exprs.append(column.dt.epoch("s").cast(pl.String).alias(role))
            else:
                exprs.append(_clean(column.cast(pl.String)).alias(role))
        frame = frame.select(exprs)
        rows.lines.add_regular(frame.height, rows.lines.n + 1)
        sink.add(frame, np.zeros(frame.height, dtype=np.uint8))


# --------------------------------------------------------------------------- raw text of rejected rows


def _raw_text(rows: _Rows, selected: np.ndarray) -> list[str]:
    """Raw text of the ``selected`` rows (sorted row indices), by one more pass over the file:
    the record's physical lines without their line endings, joined with "\\n" (parquet/arrow: the
    mapped values as a JSON object)."""
    if len(selected) == 0:
        return []
    if rows.spec.is_columnar:
        return _columnar_raw(rows, selected)
    firsts = rows.lines.first(selected)
    lasts = rows.lines.last(selected, firsts)
    out: list[str] = []
    with open(rows.path, encoding="utf-8-sig", errors="replace", newline="\n") as f:
        position = 1  # the number of the line f yields next
        for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
            if first > position:
                deque(itertools.islice(f, first - position), maxlen=0)
            lines = list(itertools.islice(f, last - first + 1))
            position = last + 1
            out.append("\n".join(line.removesuffix("\n").rstrip("\r") for line in lines))
    return out


def _columnar_raw(rows: _Rows, selected: np.ndarray) -> list[str]:
    refs = list(dict.fromkeys(str(ref) for ref in rows.spec.columns().values()))
    out: list[str] = []
    offset = 0
    for batch in _arrow_batches(rows.path, rows.spec.format, refs, rows.source):
        lo, hi = np.searchsorted(selected, [offset, offset + batch.num_rows])
        if hi > lo:
            frame = pl.from_arrow(batch.take(pa.array(selected[lo:hi] - offset)))
            assert isinstance(frame, pl.DataFrame)
            out.extend(frame.select(pl.struct(refs).struct.json_encode())[:, 0].to_list())
        offset += batch.num_rows
    return out


# --------------------------------------------------------------------------- validation


def _first_reason(checks: Sequence[tuple[str, pl.Expr]]) -> pl.Expr:
    """The first failing check's reason code per row (0 when every check passes)."""
    reason: pl.Expr = pl.lit(0, dtype=pl.UInt8)
    for name, failed in reversed(checks):
        reason = pl.when(failed.fill_null(False)).then(pl.lit(CODE[name], dtype=pl.UInt8)).otherwise(reason)
    return reason.alias("reason")


def _not_first(keys: Sequence[str]) -> pl.Expr:
    """True for a valid row whose key already appeared in an earlier *valid* row."""
    valid = pl.col("reason") == 0
    return valid & ~pl.struct([*keys, valid.alias("_valid")]).is_first_distinct()


def _with_reason(frame: pl.DataFrame, reason: str, failed: pl.Expr) -> pl.DataFrame:
    """Set ``reason`` on rows that are still valid and fail ``failed``."""
    return frame.with_columns(
        pl.when((pl.col("reason") == 0) & failed.fill_null(False))
        .then(pl.lit(CODE[reason], dtype=pl.UInt8))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )


def _string_frame(rows: _Rows) -> pl.DataFrame:
    assert rows.frame is not None
    return rows.frame.with_columns(pl.Series("reason", rows.reason, dtype=pl.UInt8))


def _validate_links(rows: _Rows) -> pl.DataFrame:
    frame = _with_reason(_string_frame(rows), MISSING_FIELD, pl.col("item").is_null() | pl.col("entity").is_null())
    # One item <-> one entity: a second link for either side loses to the first.
    return _with_reason(frame, DUPLICATE_LINK, _not_first(["item"]) | _not_first(["entity"]))


def _validate_kg(rows: _Rows, linked_entities: pl.Series) -> pl.DataFrame:
    fields = ["head", "relation", "tail"]
    frame = _with_reason(_string_frame(rows), MISSING_FIELD, pl.any_horizontal(pl.col(fields).is_null()))
    frame = _with_reason(frame, DUPLICATE_TRIPLE, _not_first(fields))
    # The KG file is the entity vocabulary, so no triple names an unknown entity; a triple that no
    # path joins to an item is "disconnected".
    reachable = _reaches_an_item(frame.filter(pl.col("reason") == 0), linked_entities)
    return _with_reason(frame, DISCONNECTED, ~pl.col("row").is_in(reachable.implode()))


def _reaches_an_item(triples: pl.DataFrame, linked_entities: pl.Series) -> pl.Series:
    """Rows of the triples whose connected component (undirected, any number of hops) holds an
    entity linked to an item; the others cannot inform any recommendation."""
    if triples.height == 0 or linked_entities.len() == 0:
        return triples["row"].clear()
    vocab = pl.concat([linked_entities, triples["head"], triples["tail"]]).unique(maintain_order=True)
    codes = pl.Series(np.arange(vocab.len(), dtype=np.int64))
    head = triples["head"].replace_strict(vocab, codes).to_numpy()
    tail = triples["tail"].replace_strict(vocab, codes).to_numpy()
    n = vocab.len()
    adjacency = sp.coo_matrix((np.ones(len(head), dtype=np.int8), (head, tail)), shape=(n, n))
    _, labels = connected_components(adjacency, directed=True, connection="weak")
    item_components = np.unique(labels[linked_entities.replace_strict(vocab, codes).to_numpy()])
    return triples["row"].filter(pl.Series(np.isin(labels[head], item_components)))


def _validate_names(rows: _Rows) -> pl.DataFrame:
    frame = _with_reason(_string_frame(rows), MISSING_FIELD, pl.col("item").is_null() | pl.col("name").is_null())
    return _with_reason(frame, DUPLICATE_NAME, _not_first(["item"]))


def _repeats(mask: np.ndarray, columns: dict[str, np.ndarray], keys: Sequence[str], order: Sequence[str]) -> np.ndarray:
    """Rows selected by ``mask`` whose ``keys`` equal those of an earlier selected row (earlier:
    by the ``order`` columns, then by row). Runs per partition of users (keys include the user),
    about PARTITION_ROWS rows each, so that no hash table spans the whole log."""
    parts = max(1, min(255, -(-int(mask.sum()) // PARTITION_ROWS)))
    # Partition of each row (255: not selected), so that a partition's rows are one pass.
    bucket = np.full(len(mask), 255, dtype=np.uint8)
    for start in range(0, len(mask), SLICE_ROWS):
        part = slice(start, start + SLICE_ROWS)
        bucket[part][mask[part]] = columns["user"][part][mask[part]] % parts
    found = [np.zeros(0, np.int64)]
    for p in range(parts):
        rows = _rows_where(lambda b, p=p: b == p, bucket)
        frame = pl.DataFrame({name: columns[name][rows] for name in dict.fromkeys([*keys, *order])})
        frame = frame.with_columns(pl.Series("_row", rows))
        del rows
        if order:
            frame = frame.sort([*order, "_row"])
        found.append(frame.filter(~pl.struct(list(keys)).is_first_distinct())["_row"].to_numpy())
    return np.sort(np.concatenate(found))


def _rows_where(condition: Callable[[np.ndarray], np.ndarray], values: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(condition(values))``, a slice at a time (no whole-column temporaries)."""
    found = [
        np.flatnonzero(condition(values[start : start + SLICE_ROWS])) + start
        for start in range(0, len(values), SLICE_ROWS)
    ]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _sliced(function: Callable[[np.ndarray], np.ndarray], values: np.ndarray, dtype: Any) -> np.ndarray:
    """``function(values)`` as a ``dtype`` array, computed SLICE_ROWS at a time (its temporaries
    stay small)."""
    out = np.empty(len(values), dtype=dtype)
    for start in range(0, len(values), SLICE_ROWS):
        out[start : start + SLICE_ROWS] = function(values[start : start + SLICE_ROWS])
    return out


def _lookup(table: np.ndarray, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``table[min(codes, len(table) - 1)]`` in slices; ``out`` may be ``codes`` itself (viewed
    with the table's dtype of the same width): each slice is read before it is overwritten."""
    last = len(table) - 1
    if out is None:
        return _sliced(lambda part: table[np.minimum(part, last)], codes, table.dtype)
    for start in range(0, len(codes), SLICE_ROWS):
        out[start : start + SLICE_ROWS] = table[np.minimum(codes[start : start + SLICE_ROWS], last)]
    return out


def _compact(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``values[keep]`` computed in place, slice by slice (no second copy of the column): the
    kept values move towards the front; returns the view of the first ones."""
    at = 0
    for start in range(0, len(values), SLICE_ROWS):
        part = values[start : start + SLICE_ROWS][keep[start : start + SLICE_ROWS]]
        values[at : at + len(part)] = part
        at += len(part)
    return values[:at]


def _validate_interactions(rows: _Rows, spec: DatasetSpec, linked_items: pl.Series) -> None:
    """Final reason codes of the interactions, in place: duplicates, then the policy."""
    assert rows.columns is not None and rows.vocab is not None
    columns, reason = rows.columns, rows.reason
    event = ["user", "item"] + [c for c in ("ts", "w") if c in columns]
    reason[_repeats(reason == 0, columns, event, [])] = CODE[DUPLICATE_EVENT]
    if isinstance(spec.positive, MinWeight):
        reason[(reason == 0) & (columns["w"] < spec.positive.min_weight)] = CODE[NOT_POSITIVE]
    if spec.restricts_to_linked_items:
        vocab = rows.vocab["item"].table
        linked = np.zeros(vocab.height + 1, dtype=bool)
        linked[vocab.filter(pl.col("id").is_in(linked_items.implode()))["code"].to_numpy()] = True
        # (the null code, never a kept row, maps to the last entry)
        reason[(reason == 0) & ~_lookup(linked, columns["item"])] = CODE[ITEM_NOT_LINKED]
    # Of the remaining positives for one (user, item), keep the earliest (then the first row).
    order = ["ts"] if "ts" in columns else []
    reason[_repeats(reason == 0, columns, ["user", "item"], order)] = CODE[REPEAT_INTERACTION]


# --------------------------------------------------------------------------- indexing


def _index(values: pl.Series, id_name: str, idx_name: str) -> pl.DataFrame:
    """Contiguous int32 indices for the distinct ids, sorted by id string (deterministic)."""
    ids = values.unique().sort()
    return pl.DataFrame(
        {id_name: ids, idx_name: pl.Series(np.arange(ids.len(), dtype=np.int32))},
        schema={id_name: pl.String, idx_name: pl.Int32},
    )


def _audit(rows: _Rows) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(quarantine, excluded) rows of one source, in line order, with their raw text."""
    rejected = np.flatnonzero(rows.reason != 0)
    codes = rows.reason[rejected]
    lines = rows.lines.first(rejected)
    frame = pl.DataFrame(
        {
            "source": pl.Series([rows.source] * len(rejected), dtype=pl.String),
            "line": pl.Series(lines, dtype=pl.Int64),
            "raw": pl.Series(_raw_text(rows, rejected), dtype=pl.String),
            "reason": pl.Series(np.asarray(REASONS, dtype=object)[codes].tolist(), dtype=pl.String),
            "_code": pl.Series(codes, dtype=pl.UInt8),
        },
        schema={"source": pl.String, "line": pl.Int64, "raw": pl.String, "reason": pl.String, "_code": pl.UInt8},
    )
    excluded = pl.col("_code") >= _FIRST_EXCLUSION
    return frame.filter(~excluded).drop("_code"), frame.filter(excluded).drop("_code")


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
    Raises ``ValueError`` for unreadable or empty inputs and ``FileNotFoundError`` for missing ones.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Only the declared files are read: the KG (links and triples) and the names are optional.
    declared = {"interactions": spec.interactions, "item_links": spec.item_links, "kg": spec.kg, "item_names": spec.item_names}
    sources = {kind: fs for kind, fs in declared.items() if fs is not None}
    paths = {kind: spec.resolve(fs.path, data_root) for kind, fs in sources.items()}
    has_ts = spec.interactions.timestamp is not None
    has_weight = spec.interactions.weight is not None

    show = progress and sys.stderr.isatty()
    bar = tqdm(total=len(sources) + 3, desc=f"ingest {spec.name}", disable=not show)
    raw: dict[str, _Rows] = {}
    # The small files first: a problem in them shows before the long read of the log.
    for kind in [k for k in sources if k != "interactions"] + ["interactions"]:
        bar.set_postfix_str(kind)
        raw[kind] = _read_rows(kind, sources[kind], paths[kind])
        bar.update()
    raw = {kind: raw[kind] for kind in sources}

    # Links first: they decide which items exist and which KG triples can reach an item.
    links = _validate_links(raw["item_links"]) if "item_links" in raw else None
    good_links = (
        links.filter(pl.col("reason") == 0).select("item", "entity")
        if links is not None
        else pl.DataFrame(schema={"item": pl.String, "entity": pl.String})
    )
    kg = _validate_kg(raw["kg"], good_links["entity"]) if "kg" in raw else None
    names = _validate_names(raw["item_names"]) if "item_names" in raw else None
    for kind, frame in (("item_links", links), ("kg", kg), ("item_names", names)):
        if frame is not None:
            raw[kind].reason = frame["reason"].to_numpy().copy()
            raw[kind].frame = None  # the audit reads the raw text from the file
    good_kg = (
        kg.filter(pl.col("reason") == 0)
        if kg is not None
        else pl.DataFrame(schema={"head": pl.String, "relation": pl.String, "tail": pl.String})
    )
    good_names = names.filter(pl.col("reason") == 0) if names is not None else None
    del links, kg, names, frame  # the string frames of the small files: not needed any more
    _validate_interactions(raw["interactions"], spec, good_links["item"])
    bar.update()

    audits = {kind: _audit(rows) for kind, rows in raw.items()}
    quarantine = pl.concat([q for q, _ in audits.values()], how="vertical").cast(AUDIT_SCHEMA)
    excluded = pl.concat([e for _, e in audits.values()], how="vertical").sort("line").cast(AUDIT_SCHEMA)

    rows_read = {kind: r.n for kind, r in raw.items()}
    rows_accepted = {kind: int((r.reason == 0).sum()) for kind, r in raw.items()}
    tables = _build_tables(spec, raw["interactions"], good_links, good_kg, good_names, has_ts, has_weight)
    del raw
    bar.update()

    quarantined = {kind: _reason_counts(q) for kind, (q, _) in audits.items()}
    accounting = {
        kind: {
            "read": rows_read[kind],
            "accepted": rows_accepted[kind],
            "quarantined": audits[kind][0].height,
            "excluded": audits[kind][1].height,
        }
        for kind in sources
    }
    accepted_tables = {"interactions": tables["interactions"].height, "item_links": good_links.height, "kg": tables["kg"].height}
    for kind, counts in accounting.items():
        if (
            counts["read"] != counts["accepted"] + counts["quarantined"] + counts["excluded"]
            or counts["accepted"] != accepted_tables.get(kind, counts["accepted"])
        ):
            raise RuntimeError(f"internal error: rows lost in ingestion: {accounting_line(kind, counts)}")
    n_linked_items = int(tables["items"]["entity_id"].is_not_null().sum())
    report_counts = dict(
        n_interactions=tables["interactions"].height,
        n_users=tables["users"].height,
        n_items=tables["items"].height,
        n_entities=tables["entities"].height,
        n_entities_with_items=tables["entities"].height + n_linked_items,
        n_linked_items=n_linked_items,
        n_relations=tables["relations"].height,
        n_triples=tables["kg"].height,
    )
    has_kg = spec.declares_kg and tables["kg"].height > 0
    digest = _content_hash(tables)
    manifest = {
        "name": spec.name,
        "hash": digest,
        "spec": spec.model_dump(mode="json"),
        # Whether the snapshot has a knowledge graph (a declared KG file with at least one
        # accepted triple): the models that need one refuse a snapshot without (see has_kg).
        "has_kg": has_kg,
        "sources": {kind: str(p) for kind, p in paths.items()},
        "counts": {
            **report_counts,
            "rows_read": rows_read,
            "rows_accepted": rows_accepted,
            "quarantined": quarantined,
            "excluded": _reason_counts(excluded),
            "accounting": accounting,
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
        accounting=accounting,
        seconds=round(time.perf_counter() - started, 3),
        has_kg=has_kg,
        **report_counts,
    )
    _log(report)
    return report


def _content_hash(tables: dict[str, pl.DataFrame | _Interactions]) -> str:
    """:func:`snapshot.content_hash`, computed in slices (the canonical CSV of a large
    interactions table would not fit in memory twice). Same digest, byte for byte."""
    digest = hashlib.sha256()
    for name in HASHED_TABLES:
        table = tables[name]
        if isinstance(table, _Interactions):
            digest.update(f"\x00{name}\x00".encode())
            for k, part in enumerate(table.canonical_slices()):
                digest.update(part.write_csv(null_value="\\N", include_header=k == 0).encode())
            continue
        frame = table.with_columns(
            pl.col(c).list.join("\x1f") for c, t in table.schema.items() if isinstance(t, pl.List)
        )
        if name == "interactions" and frame.height:
            # Kept interactions are unique per (user, item): that order is the full sort.
            order = np.lexsort((frame["item_idx"].to_numpy(), frame["user_idx"].to_numpy()))
        else:
            order = frame.select(pl.arg_sort_by(frame.columns, nulls_last=True, maintain_order=True))[:, 0].to_numpy()
        digest.update(f"\x00{name}\x00".encode())
        step = 1 << 20
        for start in range(0, max(len(order), 1), step):
            part = frame[order[start : start + step]]
            digest.update(part.write_csv(null_value="\\N", include_header=start == 0).encode())
    return digest.hexdigest()


def _build_tables(
    spec: DatasetSpec,
    inter: _Rows,
    links: pl.DataFrame,
    triples: pl.DataFrame,
    names: pl.DataFrame | None,
    has_ts: bool,
    has_weight: bool,
) -> dict[str, pl.DataFrame | _Interactions]:
    """Index spaces and the accepted tables in the snapshot layout (the interaction columns are
    reused in place: the interactions table is an :class:`_Interactions` over them)."""
    assert inter.columns is not None and inter.vocab is not None
    # The accepted rows, in place: from here on the columns hold those rows only.
    columns = inter.columns
    kept = inter.reason == 0
    for name in list(columns):
        columns[name] = _compact(columns.pop(name), kept)
    del kept
    inter.reason = inter.reason[:0].copy()  # counted and audited already

    def kept_codes(role: str) -> np.ndarray:
        present = np.zeros(inter.vocab[role].table.height + 1, dtype=bool)  # type: ignore[index]
        for start in range(0, len(columns[role]), SLICE_ROWS):
            present[np.minimum(columns[role][start : start + SLICE_ROWS], len(present) - 1)] = True
        return np.flatnonzero(present[:-1])

    users = _index(inter.vocab["user"].strings(kept_codes("user")), "user_id", "user_idx")
    kept_items = inter.vocab["item"].strings(kept_codes("item"))
    item_ids = links["item"] if spec.restricts_to_linked_items else pl.concat([links["item"], kept_items])
    items = _index(item_ids, "item_id", "item_idx")
    n_items = items.height

    name_map = (
        names.select(pl.col("item").alias("item_id"), "name")
        if names is not None
        else pl.DataFrame(schema={"item_id": pl.String, "name": pl.String})
    )
    # Optional item categories: only when the spec declares them (older snapshots keep their layout
    # and content hash).
    with_categories = spec.item_names is not None and spec.item_names.categories is not None
    if with_categories:
        assert names is not None and spec.item_names is not None
        name_map = name_map.join(
            names.select(
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

    # Interactions: vocabulary code -> index lookups, in place, one column at a time.
    data: dict[str, np.ndarray] = {}
    for role, table, id_name, idx_name in (
        ("user", users, "user_id", "user_idx"),
        ("item", items, "item_id", "item_idx"),
    ):
        vocab = inter.vocab[role].table
        lookup = np.full(vocab.height + 1, -1, dtype=np.int32)
        known = vocab.join(table, left_on="id", right_on=id_name, how="inner")
        lookup[known["code"].to_numpy()] = known[idx_name].to_numpy()
        codes = columns.pop(role)
        data[idx_name] = _lookup(lookup, codes, out=codes.view(np.int32))
        del codes
    inter.vocab = None  # the index tables hold the ids from here on
    if has_ts:
        data["timestamp"] = columns.pop("ts")
    if has_weight:
        data["weight"] = columns.pop("w")
    if (data["item_idx"] < 0).any() or (data["user_idx"] < 0).any():
        raise RuntimeError("internal error: an accepted interaction has no user or item index")
    interactions = _Interactions(data, users.height)
    return {
        "interactions": interactions,
        "kg": kg,
        "users": users,
        "items": items,
        "entities": entities,
        "relations": relations,
    }


class _Interactions:
    """The accepted interactions table in the snapshot layout (user_idx, item_idx, [timestamp],
    [weight]; storage order: user, then timestamp, then item), without a sorted copy: the columns
    stay in log order next to the permutation into storage order (uint32), and the content hash
    and the parquet file gather them one slice at a time.

    Both the storage order and the content hash's order ((user, item): unique for kept rows)
    start with the user, so both are sorted per range of users (about SORT_ROWS rows each)."""

    DTYPES: dict[str, pl.DataType] = {
        "user_idx": pl.Int32(), "item_idx": pl.Int32(), "timestamp": pl.Int64(), "weight": pl.Float64()
    }

    def __init__(self, columns: dict[str, np.ndarray], n_users: int) -> None:
        self.columns = columns
        self.schema = {name: self.DTYPES[name] for name in columns}
        self.height = len(columns["user_idx"])
        user, item = columns["user_idx"], columns["item_idx"]
        starts = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=n_users))])
        # Ranges of users [lo, hi) and where their rows start in storage order.
        cuts = np.searchsorted(starts, np.arange(SORT_ROWS, self.height, SORT_ROWS))
        edges = np.unique(np.concatenate([[0], cuts, [n_users]]))
        self.ranges = [
            (int(lo), int(hi), int(starts[lo]), int(starts[hi])) for lo, hi in zip(edges[:-1], edges[1:])
        ]
        self.storage = np.empty(self.height, dtype=np.uint32)
        for lo, hi, begin, end in self.ranges:
            rows = _rows_where(lambda u, lo=lo, hi=hi: (u >= lo) & (u < hi), user)
            keys = [item[rows], user[rows]]
            if "timestamp" in columns:
                keys.insert(1, columns["timestamp"][rows])
            self.storage[begin:end] = rows[np.lexsort(keys)]

    def _frame(self, rows: np.ndarray) -> pl.DataFrame:
        return pl.DataFrame(
            [pl.Series(name, values[rows], dtype=self.schema[name]) for name, values in self.columns.items()]
        )

    def storage_slices(self) -> Iterator[pl.DataFrame]:
        for start in range(0, self.height, SLICE_ROWS):
            yield self._frame(self.storage[start : start + SLICE_ROWS])

    def canonical_slices(self) -> Iterator[pl.DataFrame]:
        """Slices in (user_idx, item_idx) order; at least one (possibly empty) slice."""
        if self.height == 0:
            yield self._frame(np.zeros(0, dtype=np.uint32))
        user, item = self.columns["user_idx"], self.columns["item_idx"]
        for _, _, begin, end in self.ranges:
            rows = self.storage[begin:end]
            if "timestamp" in self.columns:  # else storage order is (user, item) already
                rows = rows[np.lexsort((item[rows], user[rows]))]
            for start in range(0, len(rows), SLICE_ROWS):
                yield self._frame(rows[start : start + SLICE_ROWS])

    def write_parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        schema = self._frame(np.zeros(0, dtype=np.uint32)).to_arrow().schema
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for part in self.storage_slices():
                writer.write_table(part.to_arrow())


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
    tables: dict[str, pl.DataFrame | _Interactions],
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
        "ingested %s -> %s (%s): %d interactions, %d users, %d items, %s in %.2fs",
        report.name,
        report.snapshot_dir,
        "reused" if report.reused else "written",
        report.n_interactions,
        report.n_users,
        report.n_items,
        kg_summary(vars(report)),
        report.seconds,
    )
    for kind, counts in report.accounting.items():
        LOG.info("  %s; quarantined %s", accounting_line(kind, counts), report.quarantined[kind] or 0)
    if report.excluded:
        LOG.info("  excluded interactions: %s", report.excluded)
