"""Serving bundles: the portable artefact of one trained model, one contract for every kind.

Every bundle is a directory holding its id maps, ``meta.json``, its kind's payload and a checksum
manifest::

    users.parquet         user_id: str, user_idx: int32   (row order free; idx in [0, n_users))
    items.parquet         item_id: str, item_idx: int32, the kind's columns (default: name: str|null)
    meta.json             kind, model, dataset, snapshot_hash, n_users, n_items, ... (the kind's keys)
    <payload>             the kind's files (below)
    MANIFEST.json         {"version": 1, "algorithm": "sha256",
                           "files": {relative path: {"sha256": hex, "size": bytes}}} of every file
                          above (recursively), written last

:class:`Bundle` is the base: :meth:`Bundle.write` writes atomically (sibling temp directory renamed
into place, :func:`kgrec.serving.files.atomic_directory`) and finishes with the manifest;
:meth:`Bundle.load` (or :func:`load_bundle`, which picks the class from ``meta.json``'s ``kind``)
verifies the manifest (:mod:`kgrec.serving.integrity`) -- a listed file missing, or its size or
sha256 changed, raises :class:`BundleIntegrityError` (a :class:`BundleError` and an
``IntegrityError``) naming it; unlisted files (a later ``index/``) are ignored -- and then reads the
id maps and the payload. A bundle written before manifests existed (no ``MANIFEST.json``) still
loads, unverified, with a warning. Subclasses register their ``kind`` by subclassing and implement
only ``_write_payload``, ``_read_payload`` and their checks:

* ``"embedding"`` (:class:`RetrievalBundle`, also when ``kind`` is absent)::

    user_embeddings.npy   float32 [U, d]
    item_embeddings.npy   float32 [I, d]
    seen.npz              scipy CSR users x items of every known positive (excluded at serving time)
    explain/              optional attention-weighted CKG (:class:`kgrec.models.explain.AttentionGraph`)
    inductive/            optional (KGAT): what embeds an item posted after training
                          (:class:`kgrec.serving.inductive.ItemEmbedder`, ``POST /v1/items``)
    index/                optional faiss index (``kgrec.serving.index``), added after writing

* ``"multi_interest"``: :class:`kgrec.serving.multi_interest.MultiInterestBundle`;
* ``"ranker"``: :class:`kgrec.serving.ranking.RankerBundle`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import polars as pl
import scipy.sparse as sp
from kgrec.models.explain import AttentionGraph
from kgrec.serving import integrity
from kgrec.serving.files import atomic_directory
from kgrec.serving.inductive import INDUCTIVE_DIRNAME, ItemEmbedder
from kgrec.serving.integrity import MANIFEST_FILE as MANIFEST_FILE  # re-exported: bundle names kept
from kgrec.serving.integrity import MANIFEST_VERSION as MANIFEST_VERSION
from kgrec.serving.integrity import IntegrityError
from kgrec.serving.integrity import write_manifest as write_manifest

logger = logging.getLogger("kgrec.serving")

META_FILE = "meta.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
BUNDLE_FILES = (  # the required files of an embedding bundle (MANIFEST.json aside)
    "user_embeddings.npy",
    "item_embeddings.npy",
    "seen.npz",
    USERS_FILE,
    ITEMS_FILE,
    META_FILE,
)
INDEX_DIRNAME = "index"
EXPLAIN_DIRNAME = "explain"  # optional: attention-weighted CKG of models that can explain
EMBEDDING_KIND = "embedding"
#: modules whose import registers the other bundle kinds (imported on first need: they import this one)
BUNDLE_MODULES = ("kgrec.serving.multi_interest", "kgrec.serving.ranking")


class BundleError(ValueError):
    """A bundle directory is missing files, fails its manifest or its files disagree with each other."""


# ---------------------------------------------------------------------------- meta / ids helpers
def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a bundle directory (every kind)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise BundleError(f"bundle {directory} has no {META_FILE}")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"bundle {directory}: unreadable {META_FILE}: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"bundle {directory}: {META_FILE} is not a JSON object")
    return meta


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """``meta.json`` of a bundle directory (every kind)."""
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def bundle_kind(directory: str | os.PathLike[str]) -> str:
    """``meta.json``'s ``kind`` of a bundle directory: ``"embedding"`` (a :class:`RetrievalBundle`,
    also when absent), ``"multi_interest"`` or ``"ranker"``."""
    return str(read_meta(directory).get("kind") or EMBEDDING_KIND)


def id_lookup(frame: pl.DataFrame, id_col: str, idx_col: str) -> dict[str, int]:
    """Raw id -> index of an id map (``users.parquet`` / ``items.parquet`` of any bundle kind)."""
    return dict(zip(frame[id_col].to_list(), frame[idx_col].to_list()))


def _as_users(users: pl.DataFrame) -> pl.DataFrame:
    missing = {"user_id", "user_idx"} - set(users.columns)
    if missing:
        raise BundleError(f"users frame lacks columns {sorted(missing)}")
    return users.select(pl.col("user_id").cast(pl.Utf8), pl.col("user_idx").cast(pl.Int32))


def _name_column(items: pl.DataFrame) -> pl.Expr:
    return pl.col("name").cast(pl.Utf8) if "name" in items.columns else pl.lit(None, pl.Utf8).alias("name")


def _as_items(items: pl.DataFrame, extra: list[pl.Expr] | None = None) -> pl.DataFrame:
    """``item_id`` (str), ``item_idx`` (int32), then the ``extra`` columns (default: ``name``)."""
    missing = {"item_id", "item_idx"} - set(items.columns)
    if missing:
        raise BundleError(f"items frame lacks columns {sorted(missing)}")
    extra = [_name_column(items)] if extra is None else extra
    return items.select(pl.col("item_id").cast(pl.Utf8), pl.col("item_idx").cast(pl.Int32), *extra)


def _check_ids(frame: pl.DataFrame, id_col: str, idx_col: str, n: int, what: str) -> None:
    if frame.height != n:
        raise BundleError(f"{what}: {frame.height} rows but the bundle's payload has {n}")
    if frame[id_col].null_count():
        raise BundleError(f"{what}: null {id_col}")
    if frame[id_col].n_unique() != n:
        raise BundleError(f"{what}: duplicate {id_col} values")
    idx = frame[idx_col].to_numpy()
    if n and (idx.min() < 0 or idx.max() >= n or np.unique(idx).size != n):
        raise BundleError(f"{what}: {idx_col} must be a permutation of [0, {n})")


# ---------------------------------------------------------------------------- manifest
class BundleIntegrityError(BundleError, IntegrityError):
    """A bundle fails its manifest: both a :class:`BundleError` (bundle loading) and an
    :class:`~kgrec.serving.integrity.IntegrityError` (what a service reports as not ready)."""


def verify_manifest(directory: str | os.PathLike[str]) -> bool:
    """Check a bundle directory against its ``MANIFEST.json``; False (and a warning) when it has none
    (a bundle written before manifests). Raises :class:`BundleIntegrityError` naming the first listed
    file that is missing or whose size or sha256 differs; unlisted files are ignored (logged; quietly
    for an ``index/`` added after writing). The generic code is :mod:`kgrec.serving.integrity`."""
    return integrity.verify_manifest(directory, "bundle", later=(INDEX_DIRNAME,), error=BundleIntegrityError)


# ---------------------------------------------------------------------------- base class
_KINDS: dict[str, type[Bundle]] = {}


def bundle_class(kind: str) -> type[Bundle]:
    """The :class:`Bundle` subclass registered for ``kind`` (importing :data:`BUNDLE_MODULES` first
    if it is not registered yet)."""
    if kind not in _KINDS:
        for module in BUNDLE_MODULES:
            importlib.import_module(module)
    try:
        return _KINDS[kind]
    except KeyError:
        raise BundleError(f"unknown bundle kind {kind!r} (known: {sorted(_KINDS)})") from None


class Bundle:
    """Base of every bundle kind (module docstring).

    A subclass sets ``kind`` (which registers it for :func:`load_bundle`), ``payload_files`` (its
    required files besides the id maps and ``meta.json``), and implements ``_write_payload``,
    ``_read_payload`` and ``validate`` (its own checks, then ``super().validate()``); its
    ``__post_init__`` converts its payload and calls :meth:`_setup`.

    Attributes every bundle has: ``users`` (``user_id``, ``user_idx``), ``items`` (``item_id``,
    ``item_idx`` + :meth:`_item_columns`, by default ``name``), ``meta`` (``meta.json``, always with
    ``kind``).
    """

    kind: ClassVar[str]
    payload_files: ClassVar[tuple[str, ...]] = ()
    users: pl.DataFrame
    items: pl.DataFrame
    meta: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        known = _KINDS.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"bundle kind {kind!r} is already registered by {known.__qualname__}")
        _KINDS[kind] = cls

    # ------------------------------------------------------------------ ids, meta, checks
    @property
    def n_users(self) -> int:
        return self.users.height

    @property
    def n_items(self) -> int:
        return self.items.height

    @classmethod
    def required_files(cls) -> tuple[str, ...]:
        return (*cls.payload_files, USERS_FILE, ITEMS_FILE, META_FILE)

    @classmethod
    def _item_columns(cls, items: pl.DataFrame) -> list[pl.Expr]:
        """Columns of ``items`` a kind keeps besides ``item_id`` and ``item_idx`` (default: ``name``,
        str, null where absent)."""
        return [_name_column(items)]

    def _meta_counts(self) -> dict[str, int]:
        """``meta`` keys that must equal the payload's sizes (checked, then filled in)."""
        return {"n_users": self.n_users, "n_items": self.n_items}

    def _setup(self) -> None:
        """Normalise the id maps and ``meta``, validate, fill in ``meta``'s kind and sizes."""
        self.users = _as_users(self.users)
        self.items = _as_items(self.items, self._item_columns(self.items))
        self.meta = {**dict(self.meta), "kind": self.kind}
        self.validate()
        for key, value in self._meta_counts().items():
            self.meta.setdefault(key, value)

    def validate(self) -> None:
        """``meta``'s sizes and the id maps against the payload (subclasses check theirs first)."""
        for key, n in self._meta_counts().items():
            if key in self.meta and int(self.meta[key]) != n:
                raise BundleError(f"meta {key} {self.meta[key]} != {n}")
        _check_ids(self.users, "user_id", "user_idx", self.n_users, USERS_FILE)
        _check_ids(self.items, "item_id", "item_idx", self.n_items, ITEMS_FILE)

    # ------------------------------------------------------------------ io
    def _write_payload(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def _read_payload(
        cls, directory: Path, meta: dict[str, Any], users: pl.DataFrame, items: pl.DataFrame, **options: Any
    ) -> Self:
        """Read the payload files and build the bundle (``users``/``items``/``meta`` already read)."""
        raise NotImplementedError

    def write(self, directory: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """Write the bundle atomically to ``directory`` (temp dir + rename), manifest last, and return it.

        Whatever was at ``directory`` before (an ``index/`` of a previous bundle included) is replaced.
        """
        target = Path(directory)
        if target.exists() and not overwrite:
            raise FileExistsError(f"bundle directory {target} exists")
        with atomic_directory(target) as tmp:
            self._write_payload(tmp)
            self.users.write_parquet(tmp / USERS_FILE)
            self.items.write_parquet(tmp / ITEMS_FILE)
            write_meta(tmp, self.meta)
            write_manifest(tmp)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str], **options: Any) -> Self:
        """Verify and read a bundle directory. On :class:`Bundle` itself the class comes from
        ``meta.json``'s kind; on a subclass the directory must be of that kind. ``options`` go to the
        kind's reader (``mmap`` for :class:`RetrievalBundle`)."""
        src = Path(directory)
        if not src.is_dir():
            raise BundleError(f"bundle directory {src} does not exist")
        verify_manifest(src)
        meta = read_meta(src)
        kind = str(meta.get("kind") or EMBEDDING_KIND)
        impl = bundle_class(kind)
        if not issubclass(impl, cls):
            raise BundleError(f"bundle {src} is a {kind!r} bundle, not {getattr(cls, 'kind', cls.__name__)!r}")
        missing = [f for f in impl.required_files() if not (src / f).is_file()]
        if missing:
            raise BundleError(f"{kind} bundle {src} is missing {', '.join(missing)}")
        try:
            users = pl.read_parquet(src / USERS_FILE)
            items = pl.read_parquet(src / ITEMS_FILE)
            return impl._read_payload(src, meta, users, items, **options)
        except BundleError as exc:
            raise BundleError(f"bundle {src}: {exc}") from exc
        except Exception as exc:  # a corrupt file of an unverified bundle
            raise BundleError(f"bundle {src}: cannot read files: {exc}") from exc


def load_bundle(directory: str | os.PathLike[str], **options: Any) -> Bundle:
    """The bundle at ``directory``, as the subclass its ``meta.json`` kind names (manifest verified)."""
    return Bundle.load(directory, **options)


# ---------------------------------------------------------------------------- embedding retrievers
@dataclass
class RetrievalBundle(Bundle):
    kind = EMBEDDING_KIND
    payload_files = ("user_embeddings.npy", "item_embeddings.npy", "seen.npz")

    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    seen: sp.csr_matrix
    users: pl.DataFrame
    items: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    attention_graph: AttentionGraph | None = None
    #: KGAT bundles: the inductive embedding of items posted after training (None: cannot embed new items)
    inductive: ItemEmbedder | None = None

    def __post_init__(self) -> None:
        self.user_embeddings = np.ascontiguousarray(self.user_embeddings, dtype=np.float32)
        self.item_embeddings = np.ascontiguousarray(self.item_embeddings, dtype=np.float32)
        self.seen = sp.csr_matrix(self.seen)
        self._setup()

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

    def _meta_counts(self) -> dict[str, int]:
        return {"dim": self.dim, **super()._meta_counts()}

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
        super().validate()
        graph = self.attention_graph
        if graph is not None and (graph.num_users, graph.num_items) != (ue.shape[0], ie.shape[0]):
            raise BundleError(
                f"attention graph covers {graph.num_users} users x {graph.num_items} items, "
                f"embeddings {ue.shape[0]} x {ie.shape[0]}"
            )
        embedder = self.inductive
        if embedder is not None and (embedder.num_users, embedder.num_items, embedder.dim) != (
                ue.shape[0], ie.shape[0], ie.shape[1]):
            raise BundleError(
                f"inductive embedder covers {embedder.num_users} users x {embedder.num_items} items with "
                f"vectors of dim {embedder.dim}, the embeddings {ue.shape[0]} x {ie.shape[0]} of dim {ie.shape[1]}"
            )

    # ------------------------------------------------------------------ io
    def _write_payload(self, directory: Path) -> None:
        np.save(directory / "user_embeddings.npy", self.user_embeddings)
        np.save(directory / "item_embeddings.npy", self.item_embeddings)
        sp.save_npz(directory / "seen.npz", self.seen.tocsr(), compressed=True)
        if self.attention_graph is not None:
            self.attention_graph.save(directory / EXPLAIN_DIRNAME)
        if self.inductive is not None:
            self.inductive.save(directory / INDUCTIVE_DIRNAME)

    @classmethod
    def _read_payload(
        cls, directory: Path, meta: dict[str, Any], users: pl.DataFrame, items: pl.DataFrame,
        mmap: bool = False,
    ) -> RetrievalBundle:
        mode = "r" if mmap else None
        ue = np.load(directory / "user_embeddings.npy", mmap_mode=mode, allow_pickle=False)
        ie = np.load(directory / "item_embeddings.npy", mmap_mode=mode, allow_pickle=False)
        seen = sp.load_npz(directory / "seen.npz").tocsr()
        explain = directory / EXPLAIN_DIRNAME
        graph = AttentionGraph.load(explain) if explain.is_dir() else None
        inductive = directory / INDUCTIVE_DIRNAME
        embedder = ItemEmbedder.load(inductive) if inductive.is_dir() else None
        return cls(ue, ie, seen, users, items, meta, attention_graph=graph, inductive=embedder)
