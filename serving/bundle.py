"""Retrieval bundle: the portable artefact of one trained retrieval model.

Directory layout (all files required unless noted)::

    user_embeddings.npy   float32 [U, d]
    item_embeddings.npy   float32 [I, d]
    seen.npz              scipy CSR users x items of every known positive (excluded at serving time)
    users.parquet         user_id: str, user_idx: int32   (row order free; idx in [0, U))
    items.parquet         item_id: str, item_idx: int32, name: str|null
    meta.json             model, dataset, snapshot_hash, dim, n_users, n_items, ...
                          (``kind`` absent or "embedding"; multi-interest bundles: serving/multi_interest.py)
    index/                optional faiss index (see ``kgrec.serving.index``)

``write`` is atomic: everything goes to a sibling temp directory that is renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from kgrec.models.explain import AttentionGraph
from kgrec.serving.files import atomic_directory

BUNDLE_FILES = (
    "user_embeddings.npy",
    "item_embeddings.npy",
    "seen.npz",
    "users.parquet",
    "items.parquet",
    "meta.json",
)
INDEX_DIRNAME = "index"
EXPLAIN_DIRNAME = "explain"  # optional: attention-weighted CKG of models that can explain


class BundleError(ValueError):
    """A bundle directory is missing files or its files disagree with each other."""


EMBEDDING_KIND = "embedding"


def bundle_kind(directory: str | os.PathLike[str]) -> str:
    """``meta.json``'s ``kind`` of a bundle directory: ``"embedding"`` (a :class:`RetrievalBundle`,
    also when absent) or ``"multi_interest"`` (:class:`kgrec.serving.multi_interest.MultiInterestBundle`)."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise BundleError(f"bundle {directory} has no meta.json")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"bundle {directory}: unreadable meta.json: {exc}") from exc
    return str(meta.get("kind") or EMBEDDING_KIND)


def _as_users(users: pl.DataFrame) -> pl.DataFrame:
    missing = {"user_id", "user_idx"} - set(users.columns)
    if missing:
        raise BundleError(f"users frame lacks columns {sorted(missing)}")
    return users.select(
        pl.col("user_id").cast(pl.Utf8), pl.col("user_idx").cast(pl.Int32)
    )


def _as_items(items: pl.DataFrame) -> pl.DataFrame:
    missing = {"item_id", "item_idx"} - set(items.columns)
    if missing:
        raise BundleError(f"items frame lacks columns {sorted(missing)}")
    name = pl.col("name").cast(pl.Utf8) if "name" in items.columns else pl.lit(None, pl.Utf8).alias("name")
    return items.select(pl.col("item_id").cast(pl.Utf8), pl.col("item_idx").cast(pl.Int32), name)


def _check_ids(frame: pl.DataFrame, id_col: str, idx_col: str, n: int, what: str) -> None:
    if frame.height != n:
        raise BundleError(f"{what}: {frame.height} rows but embeddings have {n} rows")
    if frame[id_col].null_count():
        raise BundleError(f"{what}: null {id_col}")
    if frame[id_col].n_unique() != n:
        raise BundleError(f"{what}: duplicate {id_col} values")
    idx = frame[idx_col].to_numpy()
    if n and (idx.min() < 0 or idx.max() >= n or np.unique(idx).size != n):
        raise BundleError(f"{what}: {idx_col} must be a permutation of [0, {n})")


@dataclass
class RetrievalBundle:
    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    seen: sp.csr_matrix
    users: pl.DataFrame
    items: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    attention_graph: AttentionGraph | None = None

    def __post_init__(self) -> None:
        self.user_embeddings = np.ascontiguousarray(self.user_embeddings, dtype=np.float32)
        self.item_embeddings = np.ascontiguousarray(self.item_embeddings, dtype=np.float32)
        self.users = _as_users(self.users)
        self.items = _as_items(self.items)
        self.seen = sp.csr_matrix(self.seen)
        self.meta = dict(self.meta)
        self.validate()
        self.meta.setdefault("dim", self.dim)
        self.meta.setdefault("n_users", self.n_users)
        self.meta.setdefault("n_items", self.n_items)

    # ------------------------------------------------------------------ properties
    @property
    def n_users(self) -> int:
        return int(self.user_embeddings.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        ue, ie = self.user_embeddings, self.item_embeddings
        if ue.ndim != 2 or ie.ndim != 2:
            raise BundleError(f"embeddings must be 2-D, got user {ue.shape} and item {ie.shape}")
        if ue.shape[1] != ie.shape[1]:
            raise BundleError(f"embedding dims differ: user {ue.shape} vs item {ie.shape}")
        if self.seen.shape != (ue.shape[0], ie.shape[0]):
            raise BundleError(
                f"seen matrix shape {self.seen.shape} != (n_users, n_items) {(ue.shape[0], ie.shape[0])}"
            )
        if "dim" in self.meta and int(self.meta["dim"]) != ie.shape[1]:
            raise BundleError(f"meta dim {self.meta['dim']} != embedding dim {ie.shape[1]}")
        for key, n in (("n_users", ue.shape[0]), ("n_items", ie.shape[0])):
            if key in self.meta and int(self.meta[key]) != n:
                raise BundleError(f"meta {key} {self.meta[key]} != {n}")
        _check_ids(self.users, "user_id", "user_idx", ue.shape[0], "users.parquet")
        _check_ids(self.items, "item_id", "item_idx", ie.shape[0], "items.parquet")
        graph = self.attention_graph
        if graph is not None and (graph.num_users, graph.num_items) != (ue.shape[0], ie.shape[0]):
            raise BundleError(
                f"attention graph covers {graph.num_users} users x {graph.num_items} items, "
                f"embeddings {ue.shape[0]} x {ie.shape[0]}"
            )

    # ------------------------------------------------------------------ io
    def write(self, directory: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """Write the bundle atomically to ``directory`` (temp dir + rename) and return it.

        An existing ``index/`` subdirectory of a previous bundle at the same place is *not* kept.
        """
        target = Path(directory)
        if target.exists() and not overwrite:
            raise FileExistsError(f"bundle directory {target} exists")
        with atomic_directory(target) as tmp:
            np.save(tmp / "user_embeddings.npy", self.user_embeddings)
            np.save(tmp / "item_embeddings.npy", self.item_embeddings)
            sp.save_npz(tmp / "seen.npz", self.seen.tocsr(), compressed=True)
            self.users.write_parquet(tmp / "users.parquet")
            self.items.write_parquet(tmp / "items.parquet")
            write_meta(tmp, self.meta)
            if self.attention_graph is not None:
                self.attention_graph.save(tmp / EXPLAIN_DIRNAME)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = False) -> RetrievalBundle:
        src = Path(directory)
        if not src.is_dir():
            raise BundleError(f"bundle directory {src} does not exist")
        missing = [f for f in BUNDLE_FILES if not (src / f).is_file()]
        if missing:
            raise BundleError(f"bundle {src} is missing {', '.join(missing)}")
        try:
            mode = "r" if mmap else None
            ue = np.load(src / "user_embeddings.npy", mmap_mode=mode, allow_pickle=False)
            ie = np.load(src / "item_embeddings.npy", mmap_mode=mode, allow_pickle=False)
            seen = sp.load_npz(src / "seen.npz").tocsr()
            users = pl.read_parquet(src / "users.parquet")
            items = pl.read_parquet(src / "items.parquet")
            meta = json.loads((src / "meta.json").read_text())
            graph = (
                AttentionGraph.load(src / EXPLAIN_DIRNAME)
                if (src / EXPLAIN_DIRNAME).is_dir()
                else None
            )
        except Exception as exc:  # corrupt file
            raise BundleError(f"bundle {src}: cannot read files: {exc}") from exc
        try:
            return cls(ue, ie, seen, users, items, meta, attention_graph=graph)
        except BundleError as exc:
            raise BundleError(f"bundle {src}: {exc}") from exc


def id_lookup(frame: pl.DataFrame, id_col: str, idx_col: str) -> dict[str, int]:
    """Raw id -> index of an id map (``users.parquet`` / ``items.parquet`` of any bundle kind)."""
    return dict(zip(frame[id_col].to_list(), frame[idx_col].to_list()))


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """``meta.json`` of a bundle directory (every kind)."""
    (directory / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
