"""Tools around the dataset spec: its JSON Schema and reference document, a draft spec inferred
from raw files (``kgrec spec init``) and a validation plus dry-run ingestion (``kgrec spec check``).

The reference (``docs/dataset-spec.md``) is generated from :class:`~kgrec.features.spec.DatasetSpec`'s
JSON Schema, field descriptions included, so it cannot drift from the code: a test compares the
committed file with :func:`reference_markdown`.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from kgrec.features.ingest import ingest
from kgrec.features.spec import SPECS_DIR, DatasetSpec, FileSpec, SpecError, load_spec

#: Sections of the reference, in order: the top level, then each file kind.
_SECTIONS = (
    ("DatasetSpec", "Top level"),
    ("InteractionsSpec", "`interactions`"),
    ("ItemLinksSpec", "`item_links`"),
    ("KGSpec", "`kg`"),
    ("ItemNamesSpec", "`item_names`"),
    ("MinWeight", "`positive: {min_weight: ...}`"),
)
_FILE_KEYS = tuple(FileSpec.model_fields)

_KG_LESS_EXAMPLE = """\
# A log without a knowledge graph (e.g. for the sequential models): no item_links, no kg.
name: my-shop
interactions:
  path: events.csv          # relative to this spec file's folder
  format: csv
  user: customer_id
  item: sku
  timestamp: ts             # integer epoch seconds
"""


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a dataset spec (for editors: ``kgrec spec schema > spec.schema.json``)."""
    schema = DatasetSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"[{prop['$ref'].rsplit('/', 1)[-1]}](#{prop['$ref'].rsplit('/', 1)[-1].lower()})"
    if "const" in prop:
        return json.dumps(prop["const"])
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    return {"integer": "int", "string": "str", "boolean": "bool", "number": "float", "null": "null"}.get(kind, kind)


def _table(definition: dict[str, Any], keys: list[str]) -> list[str]:
    required = set(definition.get("required", ()))
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key in keys:
        prop = definition["properties"][key]
        default = "*required*" if key in required else f"`{json.dumps(prop.get('default'))}`"
        text = prop.get("description", "")
        if prop.get("examples"):
            text += " Example: " + ", ".join(f"`{json.dumps(e)}`" for e in prop["examples"]) + "."
        escaped = text.replace("|", "\\|")
        rows.append(f"| `{key}` | {_type(prop)} | {default} | {escaped} |")
    return rows


def reference_markdown() -> str:
    """The dataset spec reference (``docs/dataset-spec.md``), generated from the JSON Schema."""
    schema = json_schema()
    definitions = {"DatasetSpec": schema, **schema["$defs"]}
    out = [
        "# Dataset spec reference",
        "",
        "<!-- Generated from the pydantic model (kgrec.features.spec.DatasetSpec) by "
        "`kgrec spec docs > docs/dataset-spec.md`; do not edit by hand. -->",
        "",
        "A dataset spec is a YAML file that tells `kgrec ingest` (and every command taking "
        "`--dataset`) where a dataset's raw files are and which columns mean what. Unknown keys are "
        "errors. `kgrec spec init FILE...` drafts one from your files, `kgrec spec check SPEC` "
        "validates it and dry-runs ingestion on the first rows, and `kgrec spec schema` prints the "
        "JSON Schema for editors.",
        "",
    ]
    for name, title in _SECTIONS:
        definition = definitions[name]
        keys = list(definition["properties"])
        out += [f"## {title}", "", f'<a id="{name.lower()}"></a>', ""]
        if definition.get("description"):
            out += [" ".join(definition["description"].split()), ""]
        if name.endswith("Spec") and name != "DatasetSpec":
            own = [k for k in keys if k not in _FILE_KEYS]
            out += _table(definition, own) + ["", "and the [file keys](#file-keys).", ""]
        else:
            out += _table(definition, keys) + [""]
    interactions = definitions["InteractionsSpec"]
    out += ['## File keys (every file)', "", '<a id="file-keys"></a>', ""]
    out += _table(interactions, [k for k in interactions["properties"] if k in _FILE_KEYS]) + [""]
    out += [
        "## Examples",
        "",
        "The bundled `music` spec (Last.FM + Satori KG, headerless TSV files):",
        "",
        "```yaml",
        (SPECS_DIR / "music.yaml").read_text(encoding="utf-8").rstrip(),
        "```",
        "",
        "A spec without a knowledge graph:",
        "",
        "```yaml",
        _KG_LESS_EXAMPLE.rstrip(),
        "```",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- spec init

_ROLE_PATTERNS: dict[str, str] = {
    "user": r"user|uid|customer|member|visitor|account|client|reader|listener",
    "item": r"item|iid|movie|film|product|sku|song|track|artist|book|article|video|asin|business",
    "timestamp": r"time|^ts$|date|epoch|when|created",
    "weight": r"rating|score|weight|count|plays|stars|value|qty|quantity",
    "head": r"^h$|head|subject|^src|source",
    "relation": r"^r$|relation|predicate|^rel|edge_type|type",
    "tail": r"^t$|tail|object|^dst|target",
    "entity": r"entity|^ent|freebase|wikidata|^kg|node",
    "name": r"name|title|label",
    "categories": r"genre|categor|class|tag",
}
_SEPARATORS = (",", "\t", ";", "|", "::")
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


@dataclass
class FileGuess:
    """What :func:`inspect_file` found in one file."""

    path: Path
    format: str
    separator: str | None
    has_header: bool
    columns: list[str]
    sample: pl.DataFrame
    kind: str = "interactions"
    roles: dict[str, str | int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ref(self, column: str) -> str | int:
        return column if self.has_header else self.columns.index(column)


def _sniff_text(path: Path, sample_bytes: int = 1 << 16) -> tuple[str, bool]:
    """(separator, has_header) of a text file, from its first lines."""
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as handle:
        text = handle.read(sample_bytes)
    lines = [line for line in text.splitlines()[:50] if line.strip()]
    if not lines:
        raise SpecError(f"{path}: the file is empty")
    # The separator that splits every sampled line into the same number (> 1) of fields (the
    # last line may be cut by the sample: left out).
    best, best_fields = None, 1
    for sep in _SEPARATORS:
        counts = {len(line.split(sep)) for line in lines[:-1] or lines}
        if len(counts) == 1 and (n := counts.pop()) > best_fields:
            best, best_fields = sep, n
    if best is None:
        try:
            best = csv.Sniffer().sniff(text[:8192], delimiters=",\t;| ").delimiter
        except csv.Error:
            best = "\t"
    first = lines[0].split(best)
    rest = [line.split(best) for line in lines[1:20]]
    # A header: most of its fields are typed names (RecBole's "user_id:token") or name a role; or
    # it has a non-numeric field where the later rows are numeric; or its fields look like names
    # while the later rows differ from it and hold numbers.
    numeric = [all(_is_number(row[k]) for row in rest if k < len(row)) for k in range(len(first))]
    named = sum(bool(re.fullmatch(r"\w+:(token|float|token_seq|float_seq)", v)) or any(
        re.search(pattern, v.lower()) for pattern in _ROLE_PATTERNS.values()) for v in first)
    has_header = named * 2 > len(first) and not any(row[: len(first)] == first for row in rest)
    has_header = has_header or any(num and not _is_number(value) for num, value in zip(numeric, first, strict=False)) or (
        bool(rest) and all(re.fullmatch(r"[A-Za-z_][\w:. -]*", v.strip('"')) for v in first)
        and not any(row[: len(first)] == first for row in rest)
        and any(_is_number(v) for row in rest for v in row)
    )
    return best, has_header


def _is_number(value: str) -> bool:
    try:
        float(value.strip().strip('"'))
    except ValueError:
        return False
    return True


def inspect_file(path: str | Path, rows: int = 1000) -> FileGuess:
    """Format, dialect, header and a sample of ``path`` (read with polars)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    fmt = _FORMATS.get(path.suffix.lower(), "tsv")
    if fmt in ("parquet", "arrow"):
        frame = (pl.read_parquet(path) if fmt == "parquet" else pl.read_ipc(path)).head(rows)
        return FileGuess(path, fmt, None, True, frame.columns, frame)
    if fmt == "jsonl":
        frame = pl.read_ndjson(path, n_rows=rows, infer_schema_length=rows)
        return FileGuess(path, fmt, None, True, frame.columns, frame)
    sep, has_header = _sniff_text(path)
    fmt = "csv" if sep == "," else "tsv"
    if len(sep) > 1:  # polars reads one-byte separators; split a multi-character one by hand
        with path.open(encoding="utf-8-sig", errors="replace") as handle:
            parts = [line.rstrip("\r\n").split(sep) for _, line in zip(range(rows + 1), handle, strict=False)]
        header = parts[0] if has_header else [f"column_{k + 1}" for k in range(len(parts[0]))]
        body = parts[1:] if has_header else parts
        frame = pl.DataFrame([dict(zip(header, row, strict=False)) for row in body])
    else:
        frame = pl.read_csv(path, separator=sep, has_header=has_header, n_rows=rows, infer_schema_length=rows,
                            quote_char='"' if fmt == "csv" else None, truncate_ragged_lines=True,
                            encoding="utf8-lossy")
    return FileGuess(path, fmt, sep, has_header, frame.columns, frame)


def _match(guess: FileGuess, role: str, taken: set[str]) -> str | None:
    for column in guess.columns:
        if column not in taken and re.search(_ROLE_PATTERNS[role], column.lower().split(":")[0]):
            return column
    return None


def _classify(guess: FileGuess) -> None:
    """Decide the file's kind and its column roles, by header names, then by shape."""
    taken: set[str] = set()

    def pick(*roles: str) -> dict[str, str]:
        found = {}
        for role in roles:
            column = _match(guess, role, taken)
            if column is not None:
                found[role] = column
                taken.add(column)
        return found

    n = len(guess.columns)
    named = guess.has_header
    kg = pick("head", "relation", "tail") if named else {}
    if len(kg) == 3 or (not named and n == 3 and not _numeric_column(guess, 1)):
        guess.kind = "kg"
        cols = [kg.get(r) for r in ("head", "relation", "tail")] if len(kg) == 3 else guess.columns[:3]
        guess.roles = {r: guess.ref(c) for r, c in zip(("head", "relation", "tail"), cols, strict=True)}
        return
    taken.clear()
    if named:
        roles = pick("user", "item", "timestamp", "weight")
        if "user" in roles and "item" in roles:
            guess.kind = "interactions"
            guess.roles = {r: guess.ref(c) for r, c in roles.items()}
            return
        taken.clear()
        links = pick("item", "entity")
        if len(links) == 2 and n <= 3:
            guess.kind = "item_links"
            guess.roles = {r: guess.ref(c) for r, c in links.items()}
            return
        taken.clear()
        names = pick("item", "name", "categories")
        if "item" in names and "name" in names:
            guess.kind = "item_names"
            guess.roles = {r: guess.ref(c) for r, c in names.items()}
            return
    # By shape: two columns are links, three or more an interaction log (user, item, then a
    # number that is a timestamp when it looks like epoch seconds, else a weight).
    if n == 2:
        guess.kind = "item_links"
        guess.roles = {"item": guess.ref(guess.columns[0]), "entity": guess.ref(guess.columns[1])}
        guess.notes.append("columns guessed by position: item, entity")
        return
    guess.kind = "interactions"
    guess.roles = {"user": guess.ref(guess.columns[0]), "item": guess.ref(guess.columns[1])}
    for column in guess.columns[2:4]:
        if _numeric_column(guess, guess.columns.index(column)):
            values = guess.sample[column].cast(pl.Float64, strict=False).drop_nulls()
            role = "timestamp" if len(values) and values.min() > 1e8 and "timestamp" not in guess.roles else "weight"
            if role not in guess.roles:
                guess.roles[role] = guess.ref(column)
    guess.notes.append("columns guessed by position: user, item, then " + ", ".join(list(guess.roles)[2:]))


def _numeric_column(guess: FileGuess, index: int) -> bool:
    if index >= len(guess.columns):
        return False
    column = guess.sample[guess.columns[index]]
    return column.dtype.is_numeric() or bool(column.cast(pl.Float64, strict=False).drop_nulls().len() == column.len())


def _overlap(left: pl.Series, right: pl.Series) -> float:
    left = left.cast(pl.String).drop_nulls().unique()
    return float(left.is_in(right.cast(pl.String).implode()).mean() or 0.0) if left.len() else 0.0


def draft_spec(files: list[str | Path], name: str, spec_dir: Path, rows: int = 1000) -> tuple[str, list[FileGuess]]:
    """A commented YAML spec for ``files`` (paths written relative to ``spec_dir``)."""
    guesses = [inspect_file(f, rows) for f in files]
    for guess in guesses:
        _classify(guess)
    by_kind: dict[str, FileGuess] = {}
    for guess in guesses:
        if guess.kind in by_kind:
            raise SpecError(f"{guess.path} and {by_kind[guess.kind].path} both look like {guess.kind}: pass one of each")
        by_kind[guess.kind] = guess
    if "interactions" not in by_kind:
        raise SpecError("none of the files looks like an interaction log (a user and an item column)")
    inter = by_kind["interactions"]
    lines = [
        f"# Drafted by `kgrec spec init` from {', '.join(str(g.path.name) for g in guesses)}.",
        "# Check every guess (marked 'guessed'), then run `kgrec spec check` on this file.",
        "# Reference: docs/dataset-spec.md",
        f"name: {name}",
    ]
    linked = None
    if "item_links" in by_kind:
        links = inspect_file(by_kind["item_links"].path, rows=10_000_000)  # link files are small: all of it
        links.roles = by_kind["item_links"].roles
        linked = _overlap(inter.sample[inter.columns[_col(inter, "item")]], links.sample[links.columns[_col(links, "item")]])
    elif "kg" in by_kind:
        kg = by_kind["kg"]
        ids = pl.concat([kg.sample[kg.columns[_col(kg, "head")]].cast(pl.String), kg.sample[kg.columns[_col(kg, "tail")]].cast(pl.String)])
        share = _overlap(inter.sample[inter.columns[_col(inter, "item")]], ids)
        lines.append(f"# No link file given; {share:.0%} of the sampled item ids appear as KG entities: write an")
        lines.append("# item_links file (item, entity) to use the KG. Without one the KG is left out below.")
        del by_kind["kg"]
    for kind in ("interactions", "item_links", "kg", "item_names"):
        guess = by_kind.get(kind)
        if guess is None:
            continue
        if kind == "item_links" and linked is not None:
            lines.append(f"# {linked:.0%} of the sampled interaction items have a link in this file.")
        lines += _file_block(kind, guess, spec_dir)
    if linked is not None:
        lines.append("# Keep only items linked to the KG (the benchmark protocol); false keeps every item.")
        lines.append(f"restrict_to_linked_items: {'true' if linked >= 0.5 else 'false'}")
    return "\n".join(lines) + "\n", guesses


def _col(guess: FileGuess, role: str) -> int:
    ref = guess.roles[role]
    return ref if isinstance(ref, int) else guess.columns.index(ref)


def _file_block(kind: str, guess: FileGuess, spec_dir: Path) -> list[str]:
    try:
        path = guess.path.resolve().relative_to(spec_dir.resolve())
    except ValueError:
        path = guess.path.resolve()
    out = [f"{kind}:", f"  path: {json.dumps(str(path))}", f"  format: {guess.format}"]
    if guess.separator is not None and guess.separator != {"csv": ",", "tsv": "\t"}[guess.format]:
        out.append(f"  separator: {json.dumps(guess.separator)}")
        if len(guess.separator) > 1:
            out.append("  quoting: none")
    if guess.format in ("csv", "tsv"):
        out.append(f"  has_header: {'true' if guess.has_header else 'false'}   # guessed")
    for role, ref in guess.roles.items():
        sample = guess.sample[guess.columns[ref if isinstance(ref, int) else guess.columns.index(ref)]].head(3).to_list()
        out.append(f"  {role}: {json.dumps(ref)}   # guessed; e.g. {', '.join(map(str, sample))}")
    out += [f"  # {note}" for note in guess.notes]
    return out


# --------------------------------------------------------------------------- spec check


def _head_copy(spec: FileSpec, source: Path, target: Path, rows: int) -> None:
    """The first ``rows`` data rows of ``source`` (and its header) in the same format."""
    if spec.is_text:
        with source.open("rb") as src, target.open("wb") as dst:
            for k, line in enumerate(src):
                if k >= rows + int(spec.has_header):
                    break
                dst.write(line)
    elif spec.format == "jsonl":
        with source.open("rb") as src, target.open("wb") as dst:
            for k, line in enumerate(src):
                if k >= rows:
                    break
                dst.write(line)
    elif spec.format == "parquet":
        pl.scan_parquet(source).head(rows).collect().write_parquet(target)
    else:
        pl.read_ipc(source).head(rows).write_ipc(target)


def check_spec(spec_path: str | Path, rows: int = 10_000) -> dict[str, Any]:
    """Validate a spec and ingest the first ``rows`` rows of each file into a temporary folder.

    Returns the validated spec, the resolved files and the dry run's accounting. Raises
    :class:`SpecError` for an invalid spec and ``FileNotFoundError`` for a missing file.
    """
    spec = load_spec(spec_path)
    files = {
        kind: fs
        for kind, fs in (("interactions", spec.interactions), ("item_links", spec.item_links), ("kg", spec.kg), ("item_names", spec.item_names))
        if fs is not None
    }
    resolved = {kind: spec.resolve(fs.path) for kind, fs in files.items()}
    missing = [f"{kind}: {path}" for kind, path in resolved.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError("the spec names files that do not exist: " + "; ".join(missing))
    with tempfile.TemporaryDirectory(prefix="kgrec-spec-check-") as tmp:
        root = Path(tmp)
        update = {}
        for kind, fs in files.items():
            target = root / f"{kind}{resolved[kind].suffix}"
            _head_copy(fs, resolved[kind], target, rows)
            update[kind] = fs.model_copy(update={"path": str(target)})
        report = ingest(spec.model_copy(update=update), root / "snapshots")
        result = report.to_dict()
    result.pop("snapshot_dir", None)
    return {"spec": str(spec_path), "files": {k: str(v) for k, v in resolved.items()}, "rows_per_file": rows, "dry_run": result}
