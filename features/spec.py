"""Declarative description of one dataset's raw files (``DatasetSpec``) and how to load it.

A spec is YAML validated by pydantic (``extra="forbid"``, so a misspelt key is an error, not a
silently ignored setting). Bundled specs live in ``features/specs/<name>.yaml``.

Columns are referenced by header name, or by 0-based position when the file has no header.
Relative data paths resolve against the folder of the spec file that names them; the bundled specs
(``features/specs/``) and specs built in code resolve them against the data directory (see
:func:`data_dir`).

The knowledge graph is optional: a spec without ``item_links`` and ``kg`` describes an interaction
log alone (e.g. for the sequential models); its snapshot records ``has_kg: false`` and the models
that need a KG refuse it.

Formats: ``csv`` and ``tsv`` (text, with a dialect, below), ``jsonl`` (one JSON object per line),
``parquet`` and ``arrow`` (Arrow IPC file or stream, i.e. Feather v2).

Text dialect (``FileSpec``): ``csv`` defaults to RFC 4180 (``quoting: minimal``: a field may be
enclosed in ``quote_char`` (``"``), a quote inside it doubled, and then it may hold the separator
and line breaks); ``tsv`` defaults to ``quoting: none`` (IANA text/tab-separated-values has no
quoting: a quote is an ordinary character and a record is one line). ``escape_char`` (default
none) escapes the next character in either mode; ``double_quote: false`` reads ``\"`` style only
(with an ``escape_char``). A UTF-8 byte-order mark is stripped. A multi-character separator
(``"::"``) needs ``quoting: none`` and no ``escape_char``.

An input file without any data row (empty, header only, or only empty lines) is an error unless
its file spec says ``allow_empty: true``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

#: The repository root is the parent of the ``features/`` folder that holds this module.
REPO_ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = Path(__file__).resolve().parent / "specs"

Column = str | int
FileFormat = Literal["csv", "tsv", "parquet", "jsonl", "arrow"]
Quoting = Literal["minimal", "none"]
_DEFAULT_SEPARATOR = {"csv": ",", "tsv": "\t"}


class SpecError(ValueError):
    """A dataset spec is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    """One raw input file and how to split it into fields."""

    path: str = Field(
        min_length=1,
        description="The file. A relative path resolves against the spec file's folder (bundled "
        "specs: against the data directory, $KGREC_DATA_DIR).",
        examples=["ratings.csv"],
    )
    format: FileFormat = Field(
        default="tsv",
        description="csv, tsv, jsonl (one JSON object per line), parquet, or arrow (Arrow IPC "
        "file or stream, Feather v2).",
    )
    separator: str | None = Field(
        default=None,
        description='Field separator of a csv/tsv file; default "," (csv) or a tab (tsv). Several '
        "characters (\"::\") need quoting: none.",
        examples=[";", "::"],
    )
    has_header: bool = Field(
        default=True,
        description="Whether the first line of a text file names the columns. Without one, "
        "columns are referenced by 0-based position.",
    )
    n_fields: int | None = Field(
        default=None,
        ge=1,
        description="Expected number of fields per row in a headerless text file; default: the "
        "most common count in the file (a header, when present, always defines it).",
    )
    quoting: Quoting | None = Field(
        default=None,
        description="Text dialect. minimal: RFC 4180 quoting with quote_char (a quoted field may "
        "hold separators and line breaks); none: quotes are ordinary characters and a record is "
        "one line. Default: minimal for csv, none for tsv.",
    )
    quote_char: str = Field(default='"', min_length=1, max_length=1, description="Quote character (quoting: minimal).")
    escape_char: str | None = Field(
        default=None,
        min_length=1,
        max_length=1,
        description="Escapes the next character (separator, quote, line break); none by default.",
    )
    double_quote: bool = Field(
        default=True, description="Inside a quoted field, a doubled quote stands for one quote (RFC 4180)."
    )
    allow_empty: bool = Field(
        default=False,
        description="Accept a file with no data row (empty or header only) instead of failing: "
        "an empty link or KG file then means no KG.",
    )

    @field_validator("separator")
    @classmethod
    def _separator_not_empty(cls, value: str | None) -> str | None:
        if value is not None and (value == "" or "\n" in value or "\r" in value):
            raise ValueError("separator must be a non-empty string without line breaks")
        return value

    @model_validator(mode="after")
    def _check_dialect(self) -> FileSpec:
        if not self.is_text:
            return self
        specials = {"separator": self.sep, "quote_char": self.quote_char, "escape_char": self.escape_char}
        for name, char in specials.items():
            if char is not None and char in "\r\n":
                raise ValueError(f"{name} must not be a line break")
        if self.uses_csv_module:
            if len(self.sep) != 1:
                raise ValueError(
                    f"separator {self.sep!r} has several characters: that needs quoting: none "
                    "and no escape_char"
                )
            if self.sep in (self.quote_char if self.effective_quoting == "minimal" else "", self.escape_char):
                raise ValueError("separator, quote_char and escape_char must differ")
        if self.effective_quoting == "minimal" and not self.double_quote and self.escape_char is None:
            raise ValueError("double_quote: false needs an escape_char")
        return self

    @property
    def effective_quoting(self) -> Quoting:
        """The quoting rule in force: the declared one, else ``minimal`` (csv) / ``none`` (tsv)."""
        return self.quoting or ("minimal" if self.format == "csv" else "none")

    @property
    def uses_csv_module(self) -> bool:
        """Whether rows are tokenised by :mod:`csv` (quoting or escapes); otherwise a record is
        one line split on the separator."""
        return self.effective_quoting == "minimal" or self.escape_char is not None

    @property
    def sep(self) -> str:
        """The effective field separator (text formats only)."""
        return self.separator or _DEFAULT_SEPARATOR.get(self.format, "\t")

    @property
    def is_text(self) -> bool:
        return self.format in ("csv", "tsv")

    @property
    def is_columnar(self) -> bool:
        return self.format in ("parquet", "arrow")

    def columns(self) -> dict[str, Column]:
        """Role -> column reference, for every mapped column (subclasses define the roles)."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _check_column_refs(self) -> FileSpec:
        refs = self.columns()
        for role, ref in refs.items():
            if isinstance(ref, int):
                if ref < 0:
                    raise ValueError(f"column '{role}' position must be >= 0, got {ref}")
                if self.has_header or not self.is_text:
                    raise ValueError(
                        f"column '{role}' is given by position ({ref}) but {self.path!r} has a "
                        "header or is not a text file: reference columns by name"
                    )
            elif not self.has_header and self.is_text:
                raise ValueError(
                    f"column '{role}' is given by name ({ref!r}) but {self.path!r} has no header: "
                    "reference columns by 0-based position"
                )
        if len(set(refs.values())) != len(refs):
            raise ValueError(f"two roles map to the same column in {self.path!r}: {refs}")
        return self


class InteractionsSpec(FileSpec):
    """The interaction log: one row per (user, item) event."""

    user: Column = Field(description="The user id column (a column: its header name, or its 0-based position in a headerless text file).", examples=["user_id", 0])
    item: Column = Field(description="The item id column (a column: its header name, or its 0-based position in a headerless text file).", examples=["item_id", 1])
    timestamp: Column | None = Field(
        default=None,
        description="Optional event time column: integer epoch seconds in text files; timestamp "
        "or date columns in parquet/arrow. Needed by the temporal and sequential splits.",
    )
    weight: Column | None = Field(
        default=None,
        description="Optional weight or rating column (a number); positive.min_weight filters on it.",
    )

    def columns(self) -> dict[str, Column]:
        refs = {"user": self.user, "item": self.item}
        if self.timestamp is not None:
            refs["timestamp"] = self.timestamp
        if self.weight is not None:
            refs["weight"] = self.weight
        return refs


class ItemLinksSpec(FileSpec):
    """Which KG entity each item is (one to one: a second link of an item or entity is
    quarantined as duplicate_link)."""

    item: Column = Field(description="The item id column, as in the interaction log (a column: its header name, or its 0-based position in a headerless text file).")
    entity: Column = Field(description="The KG entity id column, as in the KG file (a column: its header name, or its 0-based position in a headerless text file).")

    def columns(self) -> dict[str, Column]:
        return {"item": self.item, "entity": self.entity}


class KGSpec(FileSpec):
    """The knowledge graph: one (head, relation, tail) triple per row. Triples that no path joins
    to a linked item are quarantined as disconnected."""

    head: Column = Field(description="The head entity column (a column: its header name, or its 0-based position in a headerless text file).")
    relation: Column = Field(description="The relation column (a column: its header name, or its 0-based position in a headerless text file).")
    tail: Column = Field(description="The tail entity column (a column: its header name, or its 0-based position in a headerless text file).")

    def columns(self) -> dict[str, Column]:
        return {"head": self.head, "relation": self.relation, "tail": self.tail}


class ItemNamesSpec(FileSpec):
    """Item metadata: a display name and, optionally, a list of categories (e.g. genres).

    ``categories`` names a column holding the item's categories as one string split on
    ``category_separator`` (default: any run of whitespace), e.g. RecBole's ``class:token_seq``
    (``"Animation Children's Comedy"``). Without it snapshots have no ``categories`` column.
    """

    item: Column = Field(description="The item id column (a column: its header name, or its 0-based position in a headerless text file).")
    name: Column = Field(description="The display name column (a column: its header name, or its 0-based position in a headerless text file).")
    categories: Column | None = Field(
        default=None,
        description="Optional column of separator-joined categories (e.g. genres, for "
        "diversity@K); empty or missing: no category.",
    )
    category_separator: str | None = Field(
        default=None, description="Separator of the categories column; default: any run of whitespace."
    )

    @field_validator("category_separator")
    @classmethod
    def _category_separator_not_empty(cls, value: str | None) -> str | None:
        if value is not None and (value == "" or "\n" in value):
            raise ValueError("category_separator must be a non-empty string without newlines")
        return value

    def columns(self) -> dict[str, Column]:
        refs = {"item": self.item, "name": self.name}
        if self.categories is not None:
            refs["categories"] = self.categories
        return refs


class MinWeight(_Strict):
    """An interaction is a positive when its weight is at least ``min_weight``."""

    min_weight: float = Field(description="The smallest weight that makes an interaction a positive.", examples=[4])


class DatasetSpec(_Strict):
    """Everything ingestion needs to know about one dataset."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The dataset's name: it names the snapshot directory (<name>-<hash>) and the "
        "registered model (kgrec-<name>).",
        examples=["my-shop"],
    )
    interactions: InteractionsSpec = Field(description="The interaction log (required).")
    positive: Literal["any"] | MinWeight = Field(
        default="any",
        description='Which interactions are positives: "any" (every one), or {min_weight: x} '
        "(weight at least x; needs interactions.weight). The others are excluded as not_positive.",
    )
    item_links: ItemLinksSpec | None = Field(
        default=None, description="Which KG entity each item is. Optional: without it there is no KG."
    )
    kg: KGSpec | None = Field(default=None, description="The knowledge graph's triples. Optional; needs item_links.")
    item_names: ItemNamesSpec | None = Field(
        default=None, description="Display names (and optional categories) of the items. Optional."
    )
    restrict_to_linked_items: bool | None = Field(
        default=None,
        description="Keep only the items linked to the KG (the benchmark protocol); the other "
        "interactions are excluded as item_not_linked. Default: true when item_links is given, "
        "false otherwise.",
    )

    #: Folder that relative data paths resolve against (set by :func:`load_spec` for a spec file).
    _base_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _positive_needs_weight(self) -> DatasetSpec:
        if isinstance(self.positive, MinWeight) and self.interactions.weight is None:
            raise ValueError("positive.min_weight needs a weight column in 'interactions'")
        return self

    @model_validator(mode="after")
    def _kg_needs_links(self) -> DatasetSpec:
        if self.kg is not None and self.item_links is None:
            raise ValueError("'kg' needs 'item_links': which KG entity each item is")
        if self.restrict_to_linked_items and self.item_links is None:
            raise ValueError("restrict_to_linked_items: true needs 'item_links'")
        return self

    @property
    def restricts_to_linked_items(self) -> bool:
        """The effective ``restrict_to_linked_items`` (its default depends on ``item_links``)."""
        if self.restrict_to_linked_items is None:
            return self.item_links is not None
        return self.restrict_to_linked_items

    @property
    def declares_kg(self) -> bool:
        return self.kg is not None

    @property
    def base_dir(self) -> Path | None:
        return self._base_dir

    def with_base_dir(self, base_dir: Path | None) -> DatasetSpec:
        """This spec with relative paths resolving against ``base_dir``."""
        out = self.model_copy()
        out._base_dir = None if base_dir is None else Path(base_dir).resolve()
        return out

    def resolve(self, path: str, data_root: Path | None = None) -> Path:
        """Absolute path of a data file: absolute paths as given; else under ``data_root`` when
        given, else under the spec file's folder, else under the data directory."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        return (data_root or self._base_dir or data_dir()) / p


def data_dir() -> Path:
    """The data directory: ``$KGREC_DATA_DIR``, else the first existing of
    ``<repo>/../shared/data``, ``<cwd>/../shared/data``, ``<cwd>/shared/data``."""
    env = os.environ.get("KGREC_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cwd = Path.cwd()
    candidates = [REPO_ROOT.parent / "shared" / "data", cwd.parent / "shared" / "data", cwd / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "no data directory: set KGREC_DATA_DIR or create one of "
        + ", ".join(str(c) for c in candidates)
    )


def bundled_specs() -> list[str]:
    """Names of the specs shipped in ``features/specs/``."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | os.PathLike[str]) -> DatasetSpec:
    """Load a spec by bundled name (``music``) or from a YAML file path.

    Raises :class:`SpecError` with a readable message listing every problem.
    """
    text = str(name_or_path)
    bundled = SPECS_DIR / f"{text}.yaml"
    if bundled.is_file() and os.sep not in text and "/" not in text:
        path = bundled
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise SpecError(
                f"no dataset spec {text!r}: not a bundled spec ({', '.join(bundled_specs())}) "
                "and not an existing file"
            )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a dataset spec must be a YAML mapping, got {type(raw).__name__}")
    spec = parse_spec(raw, source=str(path))
    # Bundled specs name files under the shared data directory; a user's spec, its own folder.
    return spec if path.parent.resolve() == SPECS_DIR else spec.with_base_dir(path.parent)


def parse_spec(raw: dict, source: str = "<dict>") -> DatasetSpec:
    """Validate a spec given as a mapping; errors name the offending key."""
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SpecError(f"invalid dataset spec {source}:\n{problems}") from exc
