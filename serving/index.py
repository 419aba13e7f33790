"""faiss retrieval index over item embeddings (inner-product metric throughout).

Row ``i`` of the index is ``item_idx`` ``i`` (no IndexIDMap). Kinds: ``flat`` (exact
``IndexFlatIP``), ``ivf`` (``IndexIVFFlat`` with a flat coarse quantizer), ``ivf_hnsw`` (the same
inverted lists with an HNSW graph over the centroids as the coarse quantizer) and ``hnsw``
(``IndexHNSWFlat``).

``kind="auto"`` keeps the exact ``IndexFlatIP`` up to ``exact_threshold`` items. Above it the kind
and its parameters come from measurements (:func:`build_and_measure`), not from a rule:

1. ground truth: the exact top-``k`` of a tuning sample of ``tune_queries`` query vectors (the
   given queries, else a seeded sample of the items themselves), by brute force;
2. candidates, cheapest first: exact search (its latency is measured, its recall is 1), IVF at
   nlist ~ sqrt(n), 2 sqrt(n), 4 sqrt(n) (powers of two), for nlist >= 1024 the same inverted
   lists behind an HNSW quantizer (no second k-means or add), then HNSW (M ``hnsw_m``,
   efConstruction 40). Larger nlists are not tried once one failed to beat a smaller one
   (latency at the target is about unimodal in nlist);
3. a candidate whose estimated build time exceeds what is left of ``build_budget_s`` (counted
   from the start, ground truth and tuning included) is skipped. IVF estimates come from a
   calibration on this machine and data: a k=1 inner-product assignment of <= 20k items to <= 1024
   others gives seconds per multiply-add; an IVF costs ``d * nlist * (1.1 * niter * train + n)``
   of them, corrected by the rate the previous IVF's add actually ran at (x0.5-4); after its
   k-means an IVF's add is re-estimated at the rate the k-means ran at and abandoned if it no
   longer fits. HNSW is built in chunks and projected from the latest chunk after 10k items, so a
   skipped HNSW costs at most 10k insertions;
4. each built candidate's search parameter (nprobe / efSearch) is swept upward on a grid
   (:data:`NPROBE_GRID`, :data:`EF_SEARCH_GRID`) with batched searches; the first value that
   meets the target is kept: the sample's mean recall@k minus ``recall_margin_se`` standard
   errors >= ``target_recall``. A sweep stops short once a query computes a larger fraction of
   the exact scan's n distances (faiss' ndis counters) than the best candidate so far takes of
   exact search's latency: such a scan cannot beat it (this keeps large nprobe / efSearch from
   eating the budget);
5. of the candidates that meet the target the one with the lowest measured p50 latency (single
   query, one thread, the way the services search) wins. Exact search always meets it.

Every candidate -- measured or skipped, with its estimate, sweep, recall, p50/p99 latency, build
seconds and memory -- and the choice go to ``index.json`` under ``auto``. ``ann_recall`` is the
chosen setting's recall on the tuning sample (the first grid value to meet the target: slightly
optimistic for other queries, which the margin offsets); ``build_seconds`` is the whole
:func:`build_and_measure` (ground truth, every candidate, tuning), ``index_build_seconds`` the
chosen index's own construction.

IVF training: k-means (``kmeans_niter`` iterations, seed ``seed``) on a seeded sample of at most
``kmeans_max_points_per_centroid * nlist`` items, inner-product assignment to un-normalised
centroids (``ivf_spherical=False``). faiss' default for inner-product IVF is spherical k-means; on
clustered data it gave balanced lists but needed 2-3x the nprobe, i.e. ~1.5-2x the latency at
recall@100 0.95, on normalised and un-normalised vectors alike.

Threads: builds, ground truth and batched sweeps use ``build_threads`` OpenMP threads (default: the
CPU quota -- affinity mask capped by the cgroup ``cpu.max``, :func:`kgrec.serving.settings.cpu_quota`
-- not ``os.cpu_count()``) and restore the previous setting afterwards. Latencies are measured, and
single-query serving should run, with one thread (``faiss_threads(1)``, set by the services): OpenMP
fan-out costs more than it saves for one query.

Stored layout (``save_index``)::

    items.faiss   faiss.write_index output
    index.json    kind, metric, ntotal, dim, ann_recall, ann_recall_k, build_seconds, config, auto, ...
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from kgrec.serving.files import atomic_directory
from kgrec.serving.integrity import IntegrityError, verify_manifest, write_manifest
from kgrec.serving.settings import cpu_quota
from pydantic import BaseModel, ConfigDict, Field

INDEX_FILE = "items.faiss"
INFO_FILE = "index.json"
IP = faiss.METRIC_INNER_PRODUCT

#: nprobe values swept upward (about x1.2 a step).
NPROBE_GRID: tuple[int, ...] = tuple(
    sorted({int(round(b * 2**e)) for e in range(17) for b in (1, 1.25, 1.5, 1.75)})
)
#: efSearch values swept upward (x1.5 a step).
EF_SEARCH_GRID: tuple[int, ...] = (
    16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096
)
#: efConstruction of the auto HNSW candidate (an explicit ``kind="hnsw"`` uses ``hnsw_ef_construction``).
AUTO_HNSW_EF_CONSTRUCTION = 40
#: An HNSW quantizer is tried over IVFs with at least this many lists (below, a flat scan of the
#: centroids costs next to nothing).
IVF_HNSW_MIN_NLIST = 1024
#: HNSW first chunks (the build-time projection starts after two); k=1 assignment calibration sizes.
HNSW_CALIBRATION_ITEMS = 5_000
ASSIGN_CALIBRATION = (20_000, 1024)
#: Seconds of single-query timing per candidate (at least 20 queries, at most ``latency_queries``).
LATENCY_SECONDS = 2.0


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "flat", "ivf", "ivf_hnsw", "hnsw"] = "auto"
    exact_threshold: int = Field(50_000, ge=0)
    # auto above exact_threshold: "any" measures every family; "ivf" / "ivf_hnsw" / "hnsw" only
    # that family (beside exact search).
    auto_ann: Literal["any", "ivf", "ivf_hnsw", "hnsw"] = "any"
    # explicit ivf / ivf_hnsw: nlist None -> ~4*sqrt(n) (bounded so every list gets >= 39 training
    # points); nprobe None -> nlist/8 (at least 16).
    ivf_nlist: int | None = Field(None, ge=1)
    ivf_nprobe: int | None = Field(None, ge=1)
    ivf_spherical: bool = False
    kmeans_max_points_per_centroid: int = Field(40, ge=1)
    kmeans_niter: int = Field(10, ge=1)
    quantizer_hnsw_m: int = Field(32, ge=4)
    # explicit hnsw
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(256, ge=1)
    hnsw_ef_construction: int = Field(80, ge=8)
    # build_and_measure sweeps nprobe / efSearch upward until the measured recall@k reaches this
    # (None: keep the configured values; kind="auto" then aims at 0.95).
    target_recall: float | None = Field(0.95, gt=0.0, le=1.0)
    # auto: candidates whose estimated build time exceeds what is left of this are skipped (None: no limit)
    build_budget_s: float | None = Field(60.0, gt=0.0)
    tune_queries: int = Field(256, ge=1)
    # a setting meets target_recall when the sample's mean recall minus this many standard errors
    # (of the per-query mean) reaches it: 1.0 keeps the sweep from stopping on a lucky sample
    recall_margin_se: float = Field(1.0, ge=0.0)
    latency_queries: int = Field(200, ge=1)
    seed: int = 2020
    build_threads: int | None = Field(None, ge=1)


def default_threads(n: int | None = None) -> int:
    """``n``, else the CPUs this process may use (affinity mask capped by the cgroup quota)."""
    return int(n or cpu_quota())


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Temporarily set the faiss OpenMP thread count (None = the CPU quota, :func:`default_threads`)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(default_threads(n))
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
    """The kind built for ``n_items``: ``config.kind`` unless it is ``"auto"``, then ``"flat"`` up to
    ``exact_threshold`` and above it ``config.auto_ann`` when that names a family, else ``"auto"``
    (chosen by measurement, :func:`build_and_measure`)."""
    if config.kind != "auto":
        return config.kind
    if n_items <= config.exact_threshold:
        return "flat"
    return "auto" if config.auto_ann == "any" else config.auto_ann


def _ivf_params(n: int, config: IndexConfig) -> tuple[int, int]:
    nlist = config.ivf_nlist or max(1, int(4 * math.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 or 1))
    nprobe = config.ivf_nprobe or max(16, nlist // 8)
    return nlist, min(nprobe, nlist)


def kmeans_sample(x: np.ndarray, nlist: int, config: IndexConfig) -> np.ndarray:
    """The k-means training set of an IVF with ``nlist`` lists: a seeded sample of at most
    ``kmeans_max_points_per_centroid * nlist`` rows of ``x`` (all of them when fewer)."""
    n = x.shape[0]
    m = min(n, config.kmeans_max_points_per_centroid * nlist)
    if m >= n:
        return x
    rng = np.random.default_rng(config.seed)
    return x[np.sort(rng.choice(n, m, replace=False))]


def _trained_ivf(x: np.ndarray, nlist: int, config: IndexConfig) -> tuple[faiss.IndexIVFFlat, int]:
    """An empty, trained IVF (flat IP quantizer) and the number of k-means training points."""
    d = x.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, IP)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
    index.cp.seed = config.seed
    index.cp.niter = config.kmeans_niter
    index.cp.spherical = config.ivf_spherical
    index.cp.max_points_per_centroid = config.kmeans_max_points_per_centroid
    sample = kmeans_sample(x, nlist, config)
    index.train(sample)
    return index, int(sample.shape[0])


def _hnsw_quantized(ivf: faiss.Index, config: IndexConfig) -> faiss.IndexIVFFlat:
    """An empty IVF over the centroids of ``ivf`` whose coarse quantizer is an HNSW graph."""
    base = faiss.downcast_index(ivf)
    centroids = base.quantizer.reconstruct_n(0, base.nlist)
    quantizer = faiss.IndexHNSWFlat(base.d, config.quantizer_hnsw_m, IP)
    quantizer.hnsw.efConstruction = 80
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, base.d, base.nlist, IP)
    index.own_fields = True
    quantizer.this.disown()
    return index


def _share_lists(parent: faiss.Index, child: faiss.IndexIVFFlat) -> None:
    """Let ``child`` (same centroids) search ``parent``'s inverted lists without owning them."""
    base = faiss.downcast_index(parent)
    child.replace_invlists(base.invlists, False)
    child.ntotal = base.ntotal


def _take_lists(parent: faiss.Index, child: faiss.IndexIVFFlat) -> None:
    """Move ownership of the shared inverted lists from ``parent`` to ``child``."""
    faiss.downcast_index(parent).own_invlists = False
    child.own_invlists = True


def _hnsw(d: int, m: int, ef_construction: int, ef_search: int) -> faiss.IndexHNSWFlat:
    index = faiss.IndexHNSWFlat(d, m, IP)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    return index


def set_search_param(index: faiss.Index, value: int) -> None:
    """nprobe of an IVF (and efSearch >= nprobe of an HNSW quantizer), efSearch of an HNSW."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIVF):
        base.nprobe = int(min(value, base.nlist))
        quantizer = faiss.downcast_index(base.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(int(value), 16)
    elif isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = int(value)


def search_param(index: faiss.Index) -> int | None:
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIVF):
        return int(base.nprobe)
    if isinstance(base, faiss.IndexHNSW):
        return int(base.hnsw.efSearch)
    return None


def _build_explicit(x: np.ndarray, kind: str, config: IndexConfig) -> faiss.Index:
    n, d = x.shape
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = _hnsw(d, config.hnsw_m, config.hnsw_ef_construction, config.hnsw_ef_search)
    elif kind in ("ivf", "ivf_hnsw"):
        nlist, nprobe = _ivf_params(n, config)
        index, _ = _trained_ivf(x, nlist, config)
        if kind == "ivf_hnsw":
            index = _hnsw_quantized(index, config)
        set_search_param(index, nprobe)
    else:  # pragma: no cover - guarded by the pydantic Literal
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(x)
    return index


def build_index(item_embeddings: np.ndarray, config: IndexConfig | None = None) -> faiss.Index:
    """Build an inner-product index whose row i is item_idx i (``kind="auto"`` above
    ``exact_threshold``: the measured choice of :func:`build_and_measure`, queries sampled from the
    items)."""
    config = config or IndexConfig()
    x = _as_matrix(item_embeddings)
    if x.shape[0] == 0:
        raise ValueError("cannot build an index over an empty catalogue")
    kind = resolve_kind(x.shape[0], config)
    if config.kind == "auto" and kind != "flat":
        return build_and_measure(x, config)[0]
    with faiss_threads(config.build_threads):
        return _build_explicit(x, kind, config)


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
        return "ivf_hnsw" if isinstance(faiss.downcast_index(base.quantizer), faiss.IndexHNSW) else "ivf"
    if isinstance(base, faiss.IndexFlat):
        return "flat"
    return type(base).__name__


def index_memory_bytes(index: faiss.Index) -> int:
    """Bytes the index's arrays take in memory (vectors, ids, graph links, centroids)."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexFlat):
        return int(base.ntotal * base.code_size)
    if isinstance(base, faiss.IndexHNSW):
        h = base.hnsw
        links = h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
        return int(index_memory_bytes(base.storage) + links)
    if isinstance(base, faiss.IndexIVF):
        return int(base.ntotal * (base.code_size + 8) + index_memory_bytes(base.quantizer))
    return len(faiss.serialize_index(index))


def _per_query_recall(truth: np.ndarray, got: np.ndarray) -> np.ndarray:
    hits = [np.intersect1d(t, g[g >= 0], assume_unique=True).size for t, g in zip(truth, got)]
    return np.asarray(hits, dtype=np.float64) / truth.shape[1]


def _recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(_per_query_recall(truth, got).mean())


def exact_top_k(
    item_embeddings: np.ndarray, queries: np.ndarray, k: int, threads: int | None = None
) -> np.ndarray:
    """Row ids of the exact inner-product top-``k`` of each query (brute force, no index copy)."""
    with faiss_threads(threads):
        return faiss.knn(_as_matrix(queries), _as_matrix(item_embeddings), int(k), metric=IP)[1]


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
    truth = exact_top_k(x, q, k, threads)
    with faiss_threads(threads):
        _, got = index.search(q, k)
    return _recall(truth, got)


def search_latency_ms(
    search: Callable[[np.ndarray, int], Any], queries: np.ndarray, k: int, n_max: int = 200,
    seconds: float = LATENCY_SECONDS,
) -> tuple[float, float, int]:
    """p50 and p99 milliseconds of ``search(one_query, k)``, one query at a time on one thread
    (5 warm-up queries; then up to ``n_max`` queries, at least 20, stopping after ``seconds``)."""
    q = _as_matrix(queries)
    times: list[float] = []
    with faiss_threads(1):
        for i in range(min(5, q.shape[0])):
            search(q[i : i + 1], k)
        stop = time.perf_counter() + seconds
        for i in range(max(1, n_max)):
            j = i % q.shape[0]
            t = time.perf_counter()
            search(q[j : j + 1], k)
            times.append(time.perf_counter() - t)
            if len(times) >= 20 and time.perf_counter() > stop:
                break
    ms = np.asarray(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(times)


class _Tuning:
    """The tuning sample, its exact top-k and the measurements made against it."""

    def __init__(self, x: np.ndarray, q: np.ndarray, k: int, threads: int, config: IndexConfig):
        self.x, self.q, self.k, self.threads, self.config = x, q, k, threads, config
        t = time.perf_counter()
        self.truth = exact_top_k(x, q, k, threads)
        self.truth_seconds = time.perf_counter() - t
        self.last_se = 0.0

    def recall(self, index: faiss.Index) -> tuple[float, float]:
        """Mean recall@k over the sample (one batched search) and its standard error."""
        with faiss_threads(self.threads):
            _, got = index.search(self.q, self.k)
        per_query = _per_query_recall(self.truth, got)
        se = float(per_query.std(ddof=1) / math.sqrt(per_query.size)) if per_query.size > 1 else 0.0
        return float(per_query.mean()), se

    def latency(self, index: faiss.Index | None) -> tuple[float, float, int]:
        if index is None:  # exact search, without copying the vectors into an index
            x = self.x
            return search_latency_ms(lambda q, k: faiss.knn(q, x, k, metric=IP), self.q, self.k,
                                     self.config.latency_queries)
        return search_latency_ms(index.search, self.q, self.k, self.config.latency_queries)

    def sweep(
        self, index: faiss.Index, grid: tuple[int, ...], start: int, stop_fraction: float | None = None,
    ) -> tuple[int, float, list[list[float]], str | None]:
        """Raise the search parameter from ``start`` along ``grid`` until recall@k meets the target
        (the sample's mean minus ``recall_margin_se`` standard errors >= ``target_recall``).

        Stops short once a query computes more than ``stop_fraction`` of the ``n`` distances exact
        search does (faiss' own ndis counters): a scan that long cannot beat the incumbent, whose
        latency is that fraction of exact search's. Returns (value, mean recall, [[value, recall,
        its standard error, distances a query], ...], why it stopped short or None); ``last_se``
        holds the last standard error."""
        target = self.config.target_recall or 0.95
        base = faiss.downcast_index(index)
        top = int(base.nlist) if isinstance(base, faiss.IndexIVF) else grid[-1]
        values = [start] + [v for v in grid if start < v <= top]
        n, nq = self.x.shape[0], self.q.shape[0]
        points: list[list[float]] = []
        value, recall, why = start, 0.0, "the grid ends below the target"
        margin = self.config.recall_margin_se
        for value in values:
            set_search_param(index, value)
            faiss.cvar.indexIVF_stats.reset()
            faiss.cvar.hnsw_stats.reset()
            recall, se = self.recall(index)
            ndis = (faiss.cvar.indexIVF_stats.ndis + faiss.cvar.hnsw_stats.ndis) / nq
            points.append([value, round(recall, 4), round(se, 4), int(ndis)])
            self.last_se = se
            if recall - margin * se >= target:
                return value, recall, points, None
            if stop_fraction is not None and ndis > stop_fraction * n:
                why = (f"{ndis / n:.1%} of the exact scan's distances a query at recall {recall:.4f}: "
                       f"cannot beat the best so far ({stop_fraction:.1%} of exact search's latency)")
                break
        return value, recall, points, why


def auto_nlists(n: int) -> list[int]:
    """IVF sizes the auto choice tries: powers of two near sqrt(n), 2 sqrt(n), 4 sqrt(n), at most
    the largest power of two with >= 39 items a list."""
    cap = 2 ** int(math.log2(max(1, n // 39)))
    return sorted({min(cap, 2 ** max(0, round(math.log2(f * math.sqrt(n))))) for f in (1, 2, 4)})


def calibrate_assign(x: np.ndarray, threads: int, seed: int) -> float:
    """Seconds per multiply-add of a k=1 inner-product assignment on this machine and thread count
    (<= 20k rows of ``x`` against <= 1024 others, the k-means / IVF-add inner loop)."""
    n, d = x.shape
    rows, cols = min(n, ASSIGN_CALIBRATION[0]), min(n, ASSIGN_CALIBRATION[1])
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, rows, replace=False))]
    centres = x[rng.choice(n, cols, replace=False)]
    with faiss_threads(threads):
        t = time.perf_counter()
        faiss.knn(sample, centres, 1, metric=IP)
        seconds = time.perf_counter() - t
    return seconds / (rows * cols * d)


def estimate_ivf_seconds(n: int, d: int, nlist: int, config: IndexConfig, seconds_per_madd: float) -> float:
    """k-means (``kmeans_niter`` assignments of the bounded sample, +10% for the updates) plus the
    assignment of all ``n`` items to their lists."""
    train = min(n, config.kmeans_max_points_per_centroid * nlist)
    madds = d * nlist * (1.1 * config.kmeans_niter * train + n)
    return madds * seconds_per_madd


def _budgeted_hnsw(
    x: np.ndarray, m: int, efc: int, threads: int, left: Callable[[], float], record: dict[str, Any],
    calibration: dict[str, Any],
) -> tuple[faiss.Index | None, str | None, float]:
    """An HNSW over ``x`` built in chunks, or None with the reason when the budget cannot cover it.

    Chunks of ``HNSW_CALIBRATION_ITEMS``, ``HNSW_CALIBRATION_ITEMS``, then doubling. From the second
    chunk on, the rest is projected from the latest chunk's seconds per item (times log n / log
    items-so-far: insertion slows as the graph grows) -- not from the first chunk, which carries a
    fixed start-up cost (~1 s measured under load); the build goes on only while the projection
    fits in what is left of the budget, so a wrong estimate costs at most one chunk and a skipped
    HNSW at most ``2 * HNSW_CALIBRATION_ITEMS`` insertions."""
    n, d = x.shape
    if left() <= 0:
        return None, "no time left of the budget", 0.0
    index = _hnsw(d, m, efc, EF_SEARCH_GRID[0])
    spent, added, chunk = 0.0, 0, HNSW_CALIBRATION_ITEMS
    with faiss_threads(threads):
        while added < n:
            stop = min(n, added + chunk)
            t = time.perf_counter()
            index.add(x[added:stop])
            seconds = time.perf_counter() - t
            spent, chunk_items, added = spent + seconds, stop - added, stop
            if added == n or added < 2 * HNSW_CALIBRATION_ITEMS:
                continue
            rest = seconds / chunk_items * (n - added) * math.log(n) / math.log(added)
            record["estimated_build_s"] = round(spent + rest, 2)
            calibration.update(hnsw_projected_from_items=added, hnsw_seconds_so_far=round(spent, 3))
            if rest > left():
                return None, (f"estimated build {spent + rest:.1f} s (projected after {added} items in "
                              f"{spent:.1f} s) > {max(left(), 0.0) + spent:.1f} s left of the budget"), spent
            chunk = added  # doubling chunks: few budget checks, bounded overshoot
    record.setdefault("estimated_build_s", round(spent, 2))
    return index, None, spent


def _record(kind: str, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "params": params, **fields}


def _measured(
    tuning: _Tuning, index: faiss.Index, record: dict[str, Any], grid: tuple[int, ...], start: int,
    stop_fraction: float,
) -> bool:
    """Sweep ``index``'s search parameter, then time it if it meets the target. Fills ``record``."""
    value, recall, points, why = tuning.sweep(index, grid, start, stop_fraction)
    record["params"]["nprobe" if "nlist" in record["params"] else "ef_search"] = int(value)
    record.update(sweep=points, recall=round(recall, 4), recall_se=round(tuning.last_se, 4),
                  memory_bytes=index_memory_bytes(index))
    if why is not None:
        record.update(status="below target", reason=why)
        return False
    p50, p99, timed = tuning.latency(index)
    record.update(status="measured", p50_ms=round(p50, 4), p99_ms=round(p99, 4), latency_queries=timed)
    return True


def _auto_choice(
    x: np.ndarray, tuning: _Tuning, config: IndexConfig, started: float
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build, measure and pick (module docstring); returns the chosen index and the ``auto`` record."""
    n, d = x.shape
    threads = tuning.threads
    budget = config.build_budget_s if config.build_budget_s is not None else math.inf
    families = ("ivf", "ivf_hnsw", "hnsw") if config.auto_ann == "any" else (config.auto_ann,)

    def left() -> float:
        return budget - (time.perf_counter() - started)

    def over(estimate: float) -> str | None:
        rest = left()
        if estimate > rest:
            return (f"estimated build {estimate:.1f} s > {max(rest, 0.0):.1f} s left of the "
                    f"{budget:g} s budget")
        return None

    records: list[dict[str, Any]] = []
    calibration: dict[str, Any] = {"ground_truth_s": round(tuning.truth_seconds, 3)}
    p50, p99, timed = tuning.latency(None)
    flat = _record("flat", {}, status="measured", recall=1.0, recall_se=0.0, p50_ms=round(p50, 4),
                   p99_ms=round(p99, 4), latency_queries=timed, memory_bytes=n * d * 4,
                   estimated_build_s=0.0)
    records.append(flat)
    best: tuple[faiss.Index | None, dict[str, Any]] = (None, flat)

    def stop_fraction() -> float:
        return min(1.0, best[1]["p50_ms"] / flat["p50_ms"])

    def consider(index: faiss.Index, record: dict[str, Any]) -> bool:
        nonlocal best
        if record.get("status") == "measured" and record["p50_ms"] < best[1]["p50_ms"]:
            best = (index, record)
            return True
        return False

    if "ivf" in families or "ivf_hnsw" in families:
        t = time.perf_counter()
        per_madd = calibrate_assign(x, threads, config.seed)
        calibration.update(assign_s_per_madd=per_madd, assign_calibration_s=round(time.perf_counter() - t, 3))
        stopped: str | None = None
        nlists = auto_nlists(n)
        if "ivf" not in families:
            nlists = [v for v in nlists if v >= IVF_HNSW_MIN_NLIST] or nlists[-1:]
        correction = 1.0  # measured / calibrated seconds per multiply-add of the last IVF add
        for nlist in nlists:
            estimate = correction * estimate_ivf_seconds(n, d, nlist, config, per_madd)
            record = _record("ivf", {"nlist": nlist}, estimated_build_s=round(estimate, 2))
            records.append(record)
            why = stopped or over(estimate)
            if why:
                record.update(status="skipped", reason=why)
                continue
            t = time.perf_counter()
            with faiss_threads(threads):
                index, train_points = _trained_ivf(x, nlist, config)
                train_s = time.perf_counter() - t
                record.update(train_seconds=round(train_s, 3), train_points=train_points,
                              niter=config.kmeans_niter)
                # re-estimate the add (the same flat-quantizer assignment) at the rate k-means just ran at
                observed = train_s / max(1.0, 1.1 * config.kmeans_niter * train_points * nlist * d)
                why = over(n * nlist * d * observed)
                if why is None:
                    t_add = time.perf_counter()
                    index.add(x)
                    rate = (time.perf_counter() - t_add) / (n * nlist * d)
                    correction = min(4.0, max(0.5, rate / per_madd))
            if why is not None:
                record.update(status="skipped", reason=f"after {train_s:.1f} s of k-means the add: {why}")
                del index
                continue
            record["build_s"] = round(time.perf_counter() - t, 3)
            if "ivf" in families:
                _measured(tuning, index, record, NPROBE_GRID, 1, stop_fraction())
            else:
                record.update(status="built for its lists", reason="auto_ann='ivf_hnsw'")
            chosen = consider(index, record)
            won = chosen
            if "ivf_hnsw" in families and (nlist >= IVF_HNSW_MIN_NLIST or "ivf" not in families):
                t = time.perf_counter()
                child = _hnsw_quantized(index, config)
                _share_lists(index, child)
                hrecord = _record("ivf_hnsw", {"nlist": nlist, "quantizer_m": config.quantizer_hnsw_m},
                                  build_s=round(time.perf_counter() - t, 3),
                                  shares_lists_of=f"ivf nlist {nlist}", estimated_build_s=0.0)
                records.append(hrecord)
                met = _measured(tuning, child, hrecord, NPROBE_GRID, 1, stop_fraction())
                if met and consider(child, hrecord):
                    _take_lists(index, child)  # the lists now belong to the winner
                    chosen, won = False, True
                del child
            if not chosen:
                del index
            incumbent = best[1]
            if not won and incumbent["kind"] in ("ivf", "ivf_hnsw"):
                # latency at the target is ~unimodal in nlist: past the best, larger is slower
                stopped = (f"nlist {nlist} did not beat {incumbent['kind']} nlist "
                           f"{incumbent['params']['nlist']}: larger ones not tried")
    if "hnsw" in families:
        m, efc = config.hnsw_m, AUTO_HNSW_EF_CONSTRUCTION
        record = _record("hnsw", {"m": m, "ef_construction": efc})
        records.append(record)
        index, why, built_s = _budgeted_hnsw(x, m, efc, threads, left, record, calibration)
        if index is None:
            record.update(status="skipped", reason=why)
        else:
            record["build_s"] = round(built_s, 3)
            _measured(tuning, index, record, EF_SEARCH_GRID, EF_SEARCH_GRID[0], stop_fraction())
            if not consider(index, record):
                del index
    index, choice = best
    if index is None:
        t = time.perf_counter()
        index = faiss.IndexFlatIP(d)
        index.add(x)
        choice["build_s"] = round(time.perf_counter() - t, 3)
    else:
        value = choice["params"].get("nprobe", choice["params"].get("ef_search"))
        set_search_param(index, value)
    choice["status"] = "chosen"
    auto = {
        "target_recall": config.target_recall or 0.95,
        "recall_k": tuning.k,
        "tune_queries": int(tuning.q.shape[0]),
        "threads": threads,
        "latency": "single query, 1 thread, p50/p99 over the tuning queries",
        "budget_s": config.build_budget_s,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "calibration": calibration,
        "candidates": records,
        "choice": {key: choice.get(key) for key in
                   ("kind", "params", "recall", "recall_se", "p50_ms", "p99_ms", "build_s", "memory_bytes")},
    }
    return index, auto


def build_and_measure(
    item_embeddings: np.ndarray,
    config: IndexConfig | None = None,
    queries: np.ndarray | None = None,
    k: int = 100,
    max_queries: int = 1000,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build the index and return it with the ``index.json`` info: recall@k against exact search
    and single-query latency measured on a sample of ``min(tune_queries, max_queries)`` of
    ``queries`` (default: a seeded sample of the item vectors themselves). ``kind="auto"`` above
    ``exact_threshold`` chooses kind and parameters by measurement (module docstring) and records
    why under ``auto``; explicit ANN kinds sweep their search parameter upward from the configured
    one to ``target_recall``."""
    config = config or IndexConfig()
    started = time.perf_counter()
    x = _as_matrix(item_embeddings)
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty catalogue")
    threads = default_threads(config.build_threads)
    rng = np.random.default_rng(config.seed)
    q = x if queries is None else _as_matrix(queries)
    m = min(config.tune_queries, max_queries)
    if q.shape[0] > m:
        q = q[np.sort(rng.choice(q.shape[0], m, replace=False))]
    if q.shape[0] == 0:
        raise ValueError("no queries")
    k = int(min(k, n))
    kind = resolve_kind(n, config)
    info: dict[str, Any] = {"metric": "inner_product", "ann_recall_k": k, "threads": threads}
    if config.kind == "auto" and kind != "flat":
        tuning = _Tuning(x, q, k, threads, config)
        index, auto = _auto_choice(x, tuning, config, started)
        choice = auto["choice"]
        recall, p50, p99 = choice["recall"], choice["p50_ms"], choice["p99_ms"]
        info["auto"] = auto
        info["index_build_seconds"] = choice["build_s"]
        info["ann_recall_se"] = choice.get("recall_se", 0.0)
    else:
        with faiss_threads(threads):
            index = _build_explicit(x, kind, config)
        info["index_build_seconds"] = round(time.perf_counter() - started, 4)
        if kind == "flat":
            recall = 1.0
            p50, p99, _ = search_latency_ms(index.search, q, k, config.latency_queries)
        else:
            tuning = _Tuning(x, q, k, threads, config)
            if config.target_recall is None:
                recall, info["ann_recall_se"] = tuning.recall(index)
            else:
                grid = EF_SEARCH_GRID if kind == "hnsw" else NPROBE_GRID
                _, recall, points, _ = tuning.sweep(index, grid, search_param(index) or 1)
                info["sweep"], info["ann_recall_se"] = points, tuning.last_se
            p50, p99, _ = tuning.latency(index)
    base = faiss.downcast_index(index)
    info.update(
        kind=index_kind(index),
        ntotal=int(index.ntotal),
        dim=int(index.d),
        ann_recall=float(recall),
        build_seconds=round(time.perf_counter() - started, 4),
        latency_p50_ms=round(p50, 4),
        latency_p99_ms=round(p99, 4),
        memory_bytes=index_memory_bytes(index),
        config=config.model_dump(),
    )
    if isinstance(base, faiss.IndexIVF):
        info["nlist"], info["nprobe"] = int(base.nlist), int(base.nprobe)
        quantizer = faiss.downcast_index(base.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            info["quantizer_ef_search"] = int(quantizer.hnsw.efSearch)
    elif isinstance(base, faiss.IndexHNSW):
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
        set_search_param(base, int(info["nprobe"]))
        quantizer = faiss.downcast_index(base.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW) and info.get("quantizer_ef_search"):
            quantizer.hnsw.efSearch = int(info["quantizer_ef_search"])
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
