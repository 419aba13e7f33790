"""faiss retrieval index over item embeddings (inner-product metric throughout).

Row ``i`` of the index is ``item_idx`` ``i`` (no IndexIDMap). ``kind="auto"`` builds an exact
``IndexFlatIP`` up to ``exact_threshold`` items (a 50k x 64 float32 brute-force scan is ~1 ms)
and an approximate index (``auto_ann``: HNSW by default, or IVF) above it.

Threads: builds and batched recall measurements use ``build_threads`` OpenMP threads
(default: all cores) and restore the previous setting afterwards; single-query serving should run
with one thread (``faiss_threads(1)``, set by the services) because OpenMP fan-out
costs more than it saves for one query.

Stored layout (``save_index``)::

    items.faiss   faiss.write_index output
    index.json    kind, metric, ntotal, dim, ann_recall, ann_recall_k, build_seconds, config, ...
    MANIFEST.json sha256 + size of both (``kgrec.serving.integrity``), written last

``load_index`` verifies the manifest before faiss reads a byte: vectors overwritten in place (NaNs at
the same size) or an edited ``index.json`` raise :class:`~kgrec.serving.integrity.IntegrityError`
naming the file. An index published before manifests existed loads, unverified, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from kgrec.serving.files import atomic_directory
from kgrec.serving.integrity import IntegrityError, verify_manifest, write_manifest
from pydantic import BaseModel, ConfigDict, Field

INDEX_FILE = "items.faiss"
INFO_FILE = "index.json"


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_threshold: int = Field(50_000, ge=0)
    auto_ann: Literal["ivf", "hnsw"] = "hnsw"
    # IVF: nlist None -> ~4*sqrt(n) (bounded so every list gets >= 39 training points);
    # nprobe None -> nlist/8 (at least 16).
    ivf_nlist: int | None = Field(None, ge=1)
    ivf_nprobe: int | None = Field(None, ge=1)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(256, ge=1)
    hnsw_ef_construction: int = Field(80, ge=8)
    # build_and_measure doubles nprobe / efSearch until the measured recall@k reaches this
    # (None: keep the configured values).
    target_recall: float | None = Field(0.95, gt=0.0, le=1.0)
    seed: int = 2020
    build_threads: int | None = Field(None, ge=1)


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Temporarily set the faiss OpenMP thread count (None = all cores)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n or os.cpu_count() or 1))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {x.shape}")
    return x


def resolve_kind(n_items: int, config: IndexConfig) -> str:
    if config.kind != "auto":
        return config.kind
    return "flat" if n_items <= config.exact_threshold else config.auto_ann


def _ivf_params(n: int, config: IndexConfig) -> tuple[int, int]:
    nlist = config.ivf_nlist or max(1, int(4 * math.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 or 1))
    nprobe = config.ivf_nprobe or max(16, nlist // 8)
    return nlist, min(nprobe, nlist)


def build_index(item_embeddings: np.ndarray, config: IndexConfig | None = None) -> faiss.Index:
    """Build an inner-product index whose row i is item_idx i."""
    config = config or IndexConfig()
    x = _as_matrix(item_embeddings)
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty catalogue")
    kind = resolve_kind(n, config)
    with faiss_threads(config.build_threads):
        if kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.hnsw_ef_construction
            index.hnsw.efSearch = config.hnsw_ef_search
        elif kind == "ivf":
            nlist, nprobe = _ivf_params(n, config)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.own_fields = True
            quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
            index.cp.seed = config.seed
            index.train(x)
            index.nprobe = nprobe
        else:  # pragma: no cover - guarded by the pydantic Literal
            raise ValueError(f"unknown index kind {kind!r}")
        index.add(x)
    return index


def index_over(item_embeddings: np.ndarray, index: faiss.Index | None = None) -> faiss.Index:
    """``index`` checked against the items it must cover, or a default one built over them."""
    if index is None:
        return build_index(item_embeddings, IndexConfig())
    n, d = item_embeddings.shape
    if index.ntotal != n or index.d != d:
        raise ValueError(f"index ({index.ntotal} x {index.d}) does not match the bundle's items ({n} x {d})")
    return index


def index_kind(index: faiss.Index) -> str:
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(base, faiss.IndexIVF):
        return "ivf"
    if isinstance(base, faiss.IndexFlat):
        return "flat"
    return type(base).__name__


def ann_recall(
    index: faiss.Index,
    item_embeddings: np.ndarray,
    queries: np.ndarray,
    k: int = 100,
    threads: int | None = None,
) -> float:
    """Mean recall@k of ``index`` against exact inner-product search over ``item_embeddings``."""
    x = _as_matrix(item_embeddings)
    q = _as_matrix(queries)
    if q.shape[0] == 0:
        raise ValueError("no queries")
    k = min(int(k), x.shape[0])
    with faiss_threads(threads):
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        _, truth = exact.search(q, k)
        _, got = index.search(q, k)
    hits = 0
    for t, g in zip(truth, got):
        hits += np.intersect1d(t, g[g >= 0], assume_unique=True).size
    return float(hits / (q.shape[0] * k))


def build_and_measure(
    item_embeddings: np.ndarray,
    config: IndexConfig | None = None,
    queries: np.ndarray | None = None,
    k: int = 100,
    max_queries: int = 1000,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build the index and return it with the ``index.json`` info (recall measured on ``queries``,
    default: a seeded sample of the item vectors themselves)."""
    config = config or IndexConfig()
    x = _as_matrix(item_embeddings)
    t0 = time.perf_counter()
    index = build_index(x, config)
    seconds = time.perf_counter() - t0
    rng = np.random.default_rng(config.seed)
    q = x if queries is None else _as_matrix(queries)
    if q.shape[0] > max_queries:
        q = q[np.sort(rng.choice(q.shape[0], max_queries, replace=False))]
    kind = index_kind(index)
    recall = 1.0 if kind == "flat" else ann_recall(index, x, q, k, config.build_threads)
    base = faiss.downcast_index(index)
    if config.target_recall is not None and kind in ("ivf", "hnsw"):
        while recall < config.target_recall:
            if kind == "ivf":
                if base.nprobe >= base.nlist:
                    break
                base.nprobe = min(base.nlist, base.nprobe * 2)
            else:
                if base.hnsw.efSearch >= 4096:
                    break
                base.hnsw.efSearch = base.hnsw.efSearch * 2
            recall = ann_recall(index, x, q, k, config.build_threads)
    info = {
        "kind": kind,
        "metric": "inner_product",
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "ann_recall": recall,
        "ann_recall_k": int(min(k, x.shape[0])),
        "build_seconds": round(seconds, 4),
        "config": config.model_dump(),
    }
    if kind == "ivf":
        info["nlist"], info["nprobe"] = int(base.nlist), int(base.nprobe)
    elif kind == "hnsw":
        info["ef_search"] = int(base.hnsw.efSearch)
    return index, info


def save_index(index: faiss.Index, directory: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``items.faiss`` + ``index.json`` and, last, ``MANIFEST.json`` atomically (temp dir, then
    rename) to ``directory``."""
    target = Path(directory)
    full = {"kind": index_kind(index), "metric": "inner_product", **info}
    full["ntotal"], full["dim"] = int(index.ntotal), int(index.d)
    with atomic_directory(target) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / INFO_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
        write_manifest(tmp)
    return target


def load_index(directory: str | os.PathLike[str]) -> tuple[faiss.Index, dict[str, Any]]:
    """Verify (manifest, then ``index.json`` against the stored index) and read a saved index.

    Raises :class:`IntegrityError` when the manifest fails or ``index.json`` disagrees with the
    stored index, ``FileNotFoundError`` when a file is missing (no manifest to name it)."""
    src = Path(directory)
    verify_manifest(src, "index")
    for name in (INDEX_FILE, INFO_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"index directory {src} is missing {name}")
    try:
        info = json.loads((src / INFO_FILE).read_text())
    except ValueError as exc:
        raise _mismatch(src, INFO_FILE, f"unreadable {INFO_FILE}: {exc}") from exc
    try:
        index = faiss.read_index(str(src / INDEX_FILE))
    except RuntimeError as exc:  # a corrupt file of an unverified index
        raise _mismatch(src, INDEX_FILE, f"faiss cannot read {INDEX_FILE}: {exc}") from exc
    if "ntotal" in info and int(info["ntotal"]) != index.ntotal:
        raise _mismatch(src, INFO_FILE, f"{INFO_FILE} ntotal {info['ntotal']} != stored {index.ntotal}")
    if "dim" in info and int(info["dim"]) != index.d:
        raise _mismatch(src, INFO_FILE, f"{INFO_FILE} dim {info['dim']} != stored {index.d}")
    # search-time parameters travel in index.json too (explicit beats serialisation details)
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIVF) and "nprobe" in info:
        base.nprobe = int(info["nprobe"])
    if isinstance(base, faiss.IndexHNSW):
        ef = info.get("ef_search") or (info.get("config") or {}).get("hnsw_ef_search")
        if ef:
            base.hnsw.efSearch = int(ef)
    return index, info


def _mismatch(directory: Path, file: str, reason: str) -> IntegrityError:
    return IntegrityError(f"index {directory}: {reason}", directory=directory, file=file, reason=reason)


def check_index_matches(index: faiss.Index, n_items: int, dim: int, what: str = "index") -> None:
    """Raise :class:`IntegrityError` unless ``index`` holds ``n_items`` vectors of ``dim`` (the
    bundle it is served with): an index of another version or model would return wrong items."""
    if int(index.ntotal) != int(n_items) or int(index.d) != int(dim):
        reason = (f"{what} holds {int(index.ntotal)} vectors of dim {int(index.d)}, "
                  f"the bundle {int(n_items)} items of dim {int(dim)}")
        raise IntegrityError(reason, file=INDEX_FILE, reason=reason)
