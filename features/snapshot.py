"""Content-addressed dataset snapshots (the output of ingestion).

CONTRACT (owned by features/): a snapshot directory holds
  interactions.parquet  user_idx:int32, item_idx:int32, [timestamp:int64], [weight:float64]  (positives only)
  kg.parquet            head:int32, relation:int32, tail:int32   in *KG node space*:
                        [0, n_items) are items, [n_items, n_items + n_entities) are non-item entities
  users.parquet         user_id:str, user_idx:int32
  items.parquet         item_id:str, item_idx:int32, entity_id:str|null, name:str|null,
                        [categories:list[str]]  (only when the spec declares item categories;
                        an item without categories has an empty list)
  entities.parquet      entity_id:str, entity_idx:int32   (non-item entities; KG node id = n_items + entity_idx)
  relations.parquet     relation:str, relation_idx:int32
  quarantine.parquet    rejected (malformed) rows: source:str, line:int64, raw:str, reason:str
  excluded.parquet      valid rows left out by policy (not a positive, item not linked to the KG): same columns
  manifest.json         {"name", "hash", "spec": {...}, "has_kg", "counts": {...}, "created_at", "kgrec_version"}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

#: The accepted tables, in the order they enter the content hash.
HASHED_TABLES: tuple[str, ...] = ("interactions", "kg", "users", "items", "entities", "relations")
AUDIT_TABLES: tuple[str, ...] = ("quarantine", "excluded")
MANIFEST = "manifest.json"

#: Schema of the quarantine and excluded tables.
AUDIT_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "line": pl.Int64(),
    "raw": pl.String(),
    "reason": pl.String(),
}


class SnapshotError(RuntimeError):
    """A snapshot directory is incomplete or does not match its manifest."""


def content_hash(tables: dict[str, pl.DataFrame]) -> str:
    """sha256 over the canonical CSV form of the accepted tables.

    Each table is sorted by all its columns (in its fixed column order) so that the hash depends
    on the content only, not on row order; the table name and column names are hashed too.
    """
    digest = hashlib.sha256()
    for name in HASHED_TABLES:
        # List columns (item categories) enter as their "\x1f"-joined text: CSV has no nested
        # types. Tables without list columns hash exactly as before.
        frame = tables[name].with_columns(
            pl.col(c).list.join("\x1f") for c, t in tables[name].schema.items() if isinstance(t, pl.List)
        )
        canonical = frame.sort(frame.columns, nulls_last=True, maintain_order=True)
        digest.update(f"\x00{name}\x00".encode())
        digest.update(canonical.write_csv(null_value="\\N").encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """An ingested dataset, loaded in memory (see the module docstring for the layout)."""

    path: Path
    manifest: dict[str, Any]
    interactions: pl.DataFrame
    kg: pl.DataFrame
    users: pl.DataFrame
    items: pl.DataFrame
    entities: pl.DataFrame
    relations: pl.DataFrame

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def n_users(self) -> int:
        return self.users.height

    @property
    def n_items(self) -> int:
        return self.items.height

    @property
    def n_entities(self) -> int:
        return self.entities.height

    @property
    def n_relations(self) -> int:
        return self.relations.height

    @property
    def has_kg(self) -> bool:
        """Whether the dataset has a knowledge graph: its spec declared one and ingestion accepted
        at least one triple (``manifest["has_kg"]``; snapshots written before the flag had one).
        A KG-ablation variant keeps its base's flag: it removes the KG on purpose."""
        return bool(self.manifest.get("has_kg", True))

    def item_names(self) -> list[str | None]:
        """Item display names indexed by ``item_idx`` (None where unknown)."""
        return self.items.sort("item_idx")["name"].to_list()

    @property
    def has_categories(self) -> bool:
        """Whether the snapshot carries item categories (``items.categories``)."""
        return "categories" in self.items.columns

    def item_categories(self) -> list[list[str]]:
        """Item categories (e.g. genres) indexed by ``item_idx``; empty lists when the snapshot
        has none (see :attr:`has_categories`)."""
        if not self.has_categories:
            return [[] for _ in range(self.n_items)]
        return self.items.sort("item_idx")["categories"].to_list()

    def relation_names(self) -> list[str]:
        """KG relation names indexed by ``relation_idx``."""
        return self.relations.sort("relation_idx")["relation"].to_list()

    def quarantine(self) -> pl.DataFrame:
        """Rows rejected at ingestion (read on demand: only audits need them)."""
        return pl.read_parquet(self.path / "quarantine.parquet")

    def excluded(self) -> pl.DataFrame:
        """Valid rows left out by policy (read on demand)."""
        return pl.read_parquet(self.path / "excluded.parquet")


def load_snapshot(path: str | Path, verify: bool = True) -> Snapshot:
    """Load a snapshot directory.

    Every file of the layout must exist. With ``verify`` (the default; a few ms on the bundled
    datasets) the content hash is recomputed and must equal the manifest's.
    """
    root = Path(path)
    if not root.is_dir():
        raise SnapshotError(f"snapshot directory {root} does not exist")
    expected = [f"{t}.parquet" for t in HASHED_TABLES + AUDIT_TABLES] + [MANIFEST]
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        raise SnapshotError(f"snapshot {root} is incomplete: missing {', '.join(missing)}")
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    tables = {name: pl.read_parquet(root / f"{name}.parquet") for name in HASHED_TABLES}
    if verify:
        actual = content_hash(tables)
        if actual != manifest.get("hash"):
            raise SnapshotError(
                f"snapshot {root} is corrupt: content hash {actual[:12]} != manifest hash "
                f"{str(manifest.get('hash'))[:12]}"
            )
    return Snapshot(path=root, manifest=manifest, **tables)
