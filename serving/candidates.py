"""Candidate retrieval over a :class:`RetrievalBundle` and a faiss inner-product index.

Two entry points:

* ``for_user(user_id, k)`` — a user the model was trained on: query the index with the user's
  embedding for ``k + |seen|`` items (bounded by the catalogue), drop every seen item, and widen the
  search (then fall back to an exact scan) if the filter left fewer than ``k``.
* ``for_history(item_ids, k)`` — a user the model has not seen, described by raw item ids.
  The query vector is the mean of the history's item embeddings. For factorisation / LightGCN-style
  models, where score(u, i) = <e_u, e_i>, ranking by <mean(e_h), e_i> is the item-based fold-in
  (equivalently: the sum of item-item inner-product similarities to the history). History items are
  excluded from the result; unknown ids are reported back and ignored if at least one is known.

Per-request work is one index search plus O(k + |seen|) Python/numpy work: ids are resolved through
dicts and lists built once at construction, never through polars.

Posted items (``POST /v1/items``, :meth:`CandidateService.add_items`): items added after training
live in a second, exact segment of the live index -- their vectors, ids and names in one immutable
:class:`_Posted` object that an addition replaces whole (copy-on-write, one attribute assignment), at
``item_idx`` ``n_catalogue ..``. A search takes the segment once, asks the catalogue's faiss index
for its top items exactly as before, scores every posted item exactly (``vectors @ q``: a few
thousand items cost microseconds) and merges the two lists; no user has seen a posted item, so the
seen-item filter never removes one. The published faiss index is never modified in memory: a faiss
``add`` is not safe against a concurrent search, and the service may search from several threads
(a reload's smoke queries, the fast lane, the pyfunc) while an item is added, whereas the segment
swap is. Without posted items the search path is the one it always was.

Fresh slots (``fresh=N``): the cold-start benchmarks show that a posted item's vector orders the new
items well among themselves but rarely lifts one above the whole warm catalogue (warm items have
trained vectors; a posted one only its facts). So a request may reserve up to ``N`` of its ``k`` slots
for posted items: the answer holds at least ``min(N, k, unseen posted items)`` of them, the best-scored
posted items taking the places of the lowest-scored catalogue items; the list stays ordered by score.
"""

from __future__ import annotations

import os
import threading
from collections import ChainMap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import faiss
import numpy as np
from kgrec.serving.bundle import RetrievalBundle, id_lookup
from kgrec.serving.errors import QUOTE_LIMIT as QUOTE_LIMIT  # re-exported: request errors live in errors.py
from kgrec.serving.errors import CandidateError as CandidateError
from kgrec.serving.errors import quote_input as quote_input
from kgrec.serving.index import index_kind, index_over

# Larger searches than this go straight to an exact numpy scan (cheaper than a huge ANN k).
_MAX_INDEX_K = 4096
_NONE = np.zeros(0, dtype=np.int64)


class InvalidRequestError(CandidateError):
    status_code = 422


class UnknownUserError(CandidateError):
    status_code = 404

    def __init__(self, user_id: str):
        super().__init__(f"unknown user {quote_input(user_id)}")
        self.user_id = user_id


class UnknownItemsError(CandidateError):
    """None of the posted item ids is in the catalogue."""

    status_code = 422

    def __init__(self, item_ids: Sequence[str]):
        shown = ", ".join(quote_input(i, 40) for i in list(item_ids)[:5])
        more = f" (+{len(item_ids) - 5} more)" if len(item_ids) > 5 else ""
        super().__init__(f"none of the item ids is known: {shown}{more}")
        self.item_ids = list(item_ids)


class UnknownItemError(CandidateError):
    status_code = 404

    def __init__(self, item_id: str):
        super().__init__(f"unknown item {quote_input(item_id)}")
        self.item_id = item_id


class ExplanationUnavailableError(CandidateError):
    """The served model has no attention graph (only KGAT-style models can explain)."""

    status_code = 404


def resolve_history(
    item_ids: Iterable[str | int], lookup: dict[str, int]
) -> tuple[np.ndarray, list[str]]:
    """Map raw item ids to indices, keeping order: (known indices, unknown raw ids).

    Raises when the history is empty or none of its ids is known.
    """
    ids = [str(i) for i in item_ids]
    if not ids:
        raise InvalidRequestError("item_ids must contain at least one item id")
    known: list[int] = []
    unknown: list[str] = []
    for iid in ids:
        j = lookup.get(iid)
        if j is None:
            unknown.append(iid)
        else:
            known.append(j)
    if not known:
        raise UnknownItemsError(unknown)
    return np.asarray(known, dtype=np.int64), unknown


class Candidate(NamedTuple):
    item_id: str
    item_idx: int
    score: float
    name: str | None


@dataclass(slots=True)
class CandidateResult:
    item_idx: np.ndarray  # int64 [n], best first
    scores: np.ndarray  # float32 [n], non-increasing
    item_ids: list[str]
    names: list[str | None]
    user_id: str | None = None
    unknown_item_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.item_idx.shape[0])

    @property
    def candidates(self) -> list[Candidate]:
        return [
            Candidate(iid, int(i), float(s), name)
            for iid, i, s, name in zip(self.item_ids, self.item_idx.tolist(), self.scores.tolist(), self.names)
        ]

    def records(self) -> list[dict[str, Any]]:
        """``[{"item_id", "score", "name"}]`` — the HTTP payload, built without numpy scalars."""
        return [
            {"item_id": iid, "score": s, "name": name}
            for iid, s, name in zip(self.item_ids, self.scores.tolist(), self.names)
        ]

    def response_fields(self) -> dict[str, Any]:
        """Extra top-level fields of the HTTP answer (none here; multi-interest results add some)."""
        return {}


@dataclass(frozen=True, slots=True)
class _Posted:
    """The posted-items segment: rows ``n_catalogue + j``; replaced whole by every addition."""

    vectors: np.ndarray  # float32 [m, d]
    ids: list[str]
    names: list[str | None]
    index: dict[str, int]  # raw id -> item_idx (n_catalogue + j)


class DuplicateItemError(CandidateError):
    """The item id is in the catalogue or was posted already: 409."""

    status_code = 409


class CandidateService:
    supports_merge = False  # one query vector per user: no per-interest lists to merge
    supports_fresh = True  # takes posted items, so it can reserve slots for them (``fresh``)

    def __init__(
        self,
        bundle: RetrievalBundle,
        index: faiss.Index | None = None,
        search_threads: int = 1,
    ):
        self.bundle = bundle
        index = index_over(bundle.item_embeddings, index)
        self.index = index
        self.index_kind = index_kind(index)
        self.search_threads = int(search_threads)
        self._tls = threading.local()

        self._user_emb = bundle.user_embeddings
        self._item_emb = bundle.item_embeddings
        seen = bundle.seen.tocsr()
        seen.sort_indices()
        self._seen_indptr = seen.indptr.astype(np.int64)
        self._seen_indices = seen.indices.astype(np.int64)

        users = bundle.users
        self._user_index = id_lookup(users, "user_id", "user_idx")
        self._user_ids: list[str] = users.sort("user_idx")["user_id"].to_list()
        items = bundle.items.sort("item_idx")
        self._item_ids: list[str] = items["item_id"].to_list()
        self._item_names: list[str | None] = items["name"].to_list()
        self._item_index: dict[str, int] = dict(zip(self._item_ids, range(len(self._item_ids))))
        self._n_base = bundle.n_items  # the trained catalogue; posted items follow it
        self._posted: _Posted | None = None
        self._add_lock = threading.Lock()

    # ------------------------------------------------------------------ introspection
    @property
    def n_items(self) -> int:
        """Items served: the trained catalogue plus the posted items."""
        posted = self._posted
        return self._n_base + (0 if posted is None else len(posted.ids))

    @property
    def n_posted(self) -> int:
        posted = self._posted
        return 0 if posted is None else len(posted.ids)

    @property
    def item_embedder(self) -> Any:
        """The bundle's :class:`~kgrec.serving.inductive.ItemEmbedder` (KGAT), else None: the model
        cannot embed items posted after training."""
        return getattr(self.bundle, "inductive", None)

    def in_catalogue(self, item_id: str) -> bool:
        """Whether ``item_id`` is an item of the trained catalogue (not a posted one)."""
        return item_id in self._item_index

    def has_item(self, item_id: str) -> bool:
        """Whether ``item_id`` is in the catalogue or was posted."""
        posted = self._posted
        return item_id in self._item_index or (posted is not None and item_id in posted.index)

    def add_items(self, item_ids: Sequence[str], names: Sequence[str | None], vectors: np.ndarray) -> list[int]:
        """Add items to the live index (the posted segment, module docstring); returns their
        ``item_idx``. Searches running meanwhile see the segment before or after, whole. Raises
        :class:`DuplicateItemError` when an id is known (nothing is added then)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(item_ids), -1)
        if vectors.shape[1] != self._item_emb.shape[1]:
            raise ValueError(f"posted vectors have dim {vectors.shape[1]}, the index {self._item_emb.shape[1]}")
        ids = [str(i) for i in item_ids]
        with self._add_lock:
            known = [i for i in ids if self.has_item(i)]
            if known or len(set(ids)) != len(ids):
                raise DuplicateItemError(f"item {quote_input(known[0] if known else ids[0], 80)} is already "
                                         "in the catalogue or was posted already")
            posted = self._posted
            start = self.n_items
            if posted is None:
                posted = _Posted(vectors, ids, list(names), {})
            else:
                posted = _Posted(np.concatenate([posted.vectors, vectors]), posted.ids + ids,
                                 posted.names + list(names), dict(posted.index))
            posted.index.update(zip(ids, range(start, start + len(ids))))
            self._posted = posted  # one assignment: searches see the old or the new segment
        return list(range(start, start + len(ids)))

    @property
    def n_users(self) -> int:
        return self.bundle.n_users

    def has_user(self, user_id: str) -> bool:
        return user_id in self._user_index

    def info(self) -> dict[str, Any]:
        return {"kind": "embedding"}

    def seen_items(self, user_id: str) -> np.ndarray:
        u = self._resolve_user(user_id)
        return self._seen_indices[self._seen_indptr[u] : self._seen_indptr[u + 1]]

    # ------------------------------------------------------------------ public API
    def for_user(self, user_id: str, k: int = 100, fresh: int = 0) -> CandidateResult:
        """Top-``k`` unseen items for a known user (raw id); ``fresh``: slots reserved for posted
        items (module docstring)."""
        k = self._check_k(k)
        u = self._resolve_user(user_id)
        seen = self._seen_indices[self._seen_indptr[u] : self._seen_indptr[u + 1]]
        posted = self._posted
        idx, scores = self._top_k(self._user_emb[u : u + 1], k, seen, posted, fresh)
        return self._result(idx, scores, user_id=user_id, posted=posted)

    def for_history(self, item_ids: Iterable[str | int], k: int = 100, fresh: int = 0) -> CandidateResult:
        """Top-``k`` items for an unseen user given raw item ids (mean-vector fold-in); ``fresh`` as
        in :meth:`for_user`."""
        k = self._check_k(k)
        posted = self._posted
        lookup = self._item_index if posted is None else ChainMap(self._item_index, posted.index)
        ordered, unknown = resolve_history(item_ids, lookup)  # type: ignore[arg-type]
        history = np.unique(ordered)
        query = self._vectors(history, posted).mean(axis=0, keepdims=True)
        idx, scores = self._top_k(query, k, history, posted, fresh)
        return self._result(idx, scores, unknown_item_ids=list(dict.fromkeys(unknown)), posted=posted)

    def for_users(
        self, user_ids: Sequence[str], k: int = 20, batch_size: int = 1024
    ) -> list[CandidateResult | None]:
        """Batched ``for_user``; unknown users give ``None`` (used by the pyfunc model)."""
        k = self._check_k(k)
        user_ids = [str(u) for u in user_ids]
        out: list[CandidateResult | None] = []
        for start in range(0, len(user_ids), batch_size):
            out.extend(self._for_users_batch(user_ids[start : start + batch_size], k))
        return out

    def _for_users_batch(self, user_ids: list[str], k: int) -> list[CandidateResult | None]:
        rows = [self._user_index.get(u) for u in user_ids]
        known = [i for i, r in enumerate(rows) if r is not None]
        out: list[CandidateResult | None] = [None] * len(rows)
        if not known:
            return out
        us = np.asarray([rows[i] for i in known], dtype=np.int64)
        n_seen = self._seen_indptr[us + 1] - self._seen_indptr[us]
        posted = self._posted
        k_search = int(min(self._n_base, k + int(n_seen.max())))
        batch_ok = k_search <= _MAX_INDEX_K
        if batch_ok:
            self._ensure_threads(None)  # batch: let faiss use its threads
            D, I = self.index.search(self._user_emb[us], k_search)
        for pos, (i, u) in enumerate(zip(known, us.tolist())):
            seen = self._seen_indices[self._seen_indptr[u] : self._seen_indptr[u + 1]]
            if batch_ok:
                idx, scores = self._filter(I[pos], D[pos], seen, k)
                if idx.shape[0] < min(k, self._n_base - seen.shape[0]):
                    idx, scores = self._top_k_catalogue(self._user_emb[u : u + 1], k, seen)
            else:
                idx, scores = self._top_k_catalogue(self._user_emb[u : u + 1], k, seen)
            if posted is not None:
                idx, scores = self._merge_posted(posted, self._user_emb[u], idx, scores, k, _NONE)
            out[i] = self._result(idx, scores, user_id=user_ids[i], posted=posted)
        return out

    def explain(self, user_id: str, item_id: str, max_paths: int = 5) -> dict[str, Any]:
        """The highest-attention CKG paths from a known user to an item, with readable names."""
        graph = self.bundle.attention_graph
        if graph is None:
            raise ExplanationUnavailableError(
                f"the served model ({self.bundle.meta.get('model')}) has no attention graph to "
                "explain with; serve a KGAT model"
            )
        user = self._resolve_user(user_id)
        item = self._item_index.get(str(item_id))
        if item is None:
            posted = self._posted
            if posted is not None and str(item_id) in posted.index:
                raise ExplanationUnavailableError(
                    f"item {quote_input(item_id, 80)} was posted after training: the trained graph has no "
                    "paths to it")
            raise UnknownItemError(str(item_id))
        paths = graph.explain(user, item, max_paths=max_paths)
        return {
            "user_id": str(user_id),
            "item": self._describe("item", item),
            "score": float(self._user_emb[user] @ self._item_emb[item]),
            "already_seen": bool(item in self.seen_items(user_id)),
            "paths": [
                {
                    "score": path.score,
                    "steps": [
                        {"relation": step.relation, "attention": step.attention,
                         **self._describe(step.node_type, step.node)}
                        for step in path.steps
                    ],
                }
                for path in paths
            ],
        }

    def _describe(self, node_type: str, index: int) -> dict[str, Any]:
        if node_type == "item":
            return {"type": "item", "id": self._item_ids[index], "name": self._item_names[index]}
        if node_type == "user":
            return {"type": "user", "id": self._user_ids[index]}
        return {"type": "entity", "id": self.bundle.attention_graph.entity_ids[index]}

    # ------------------------------------------------------------------ internals
    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InvalidRequestError(f"k must be an integer, got {k!r}")
        k = int(k)
        if k < 1 or k > self.n_items:
            raise InvalidRequestError(f"k must be between 1 and the catalogue size {self.n_items}, got {k}")
        return k

    def _resolve_user(self, user_id: str) -> int:
        u = self._user_index.get(str(user_id))
        if u is None:
            raise UnknownUserError(str(user_id))
        return u

    def _ensure_threads(self, n: int | None) -> None:
        # OpenMP thread counts are per calling thread (libgomp keeps an ICV per thread), and web
        # servers search from worker threads, so set it in the thread that searches
        # (one thread for single queries, all cores for batches).
        want = int(n or os.cpu_count() or 1)
        if getattr(self._tls, "threads", None) != want:
            faiss.omp_set_num_threads(want)
            self._tls.threads = want

    def _top_k(
        self, query: np.ndarray, k: int, exclude: np.ndarray, posted: _Posted | None = None, fresh: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of the catalogue and the posted segment, ``exclude`` (sorted) left out, at
        least ``fresh`` of them posted where there are that many."""
        if posted is None:
            return self._top_k_catalogue(query, k, exclude)
        cut = int(np.searchsorted(exclude, self._n_base))
        idx, scores = self._top_k_catalogue(query, k, exclude[:cut])
        return self._merge_posted(posted, query[0], idx, scores, k, exclude[cut:] - self._n_base, fresh)

    def _merge_posted(
        self, posted: _Posted, q: np.ndarray, idx: np.ndarray, scores: np.ndarray, k: int, exclude: np.ndarray,
        fresh: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The catalogue's best (``idx``, ``scores``: its top unseen items, at least ``k`` of them or
        all there are) merged with every posted item scored exactly, best ``k``; ties keep the
        catalogue item first. With ``fresh``, the best posted items beyond the top ``k`` replace its
        lowest catalogue items until ``fresh`` posted items are in (or none is left)."""
        p_scores = posted.vectors @ np.asarray(q, dtype=np.float32)
        p_idx = np.arange(self._n_base, self._n_base + p_scores.shape[0], dtype=np.int64)
        if exclude.shape[0]:
            keep = np.ones(p_scores.shape[0], dtype=bool)
            keep[exclude] = False
            p_idx, p_scores = p_idx[keep], p_scores[keep]
        all_idx = np.concatenate([idx.astype(np.int64, copy=False), p_idx])
        all_scores = np.concatenate([scores.astype(np.float32, copy=False), p_scores.astype(np.float32)])
        order = np.argsort(-all_scores, kind="stable")
        top = order[:k]
        if fresh > 0:
            is_posted = all_idx[order] >= self._n_base
            missing = min(fresh, k, p_idx.shape[0]) - int(is_posted[:k].sum())
            if missing > 0:  # the next posted items take the places of the last catalogue items
                chosen = np.zeros(order.shape[0], dtype=bool)
                chosen[:k] = True
                chosen[np.flatnonzero(~is_posted[:k])[-missing:]] = False
                chosen[k + np.flatnonzero(is_posted[k:])[:missing]] = True
                top = order[chosen]  # still in score order
        return all_idx[top], all_scores[top]

    def _vectors(self, idx: np.ndarray, posted: _Posted | None) -> np.ndarray:
        if posted is None or not idx.shape[0] or idx[-1] < self._n_base:  # idx sorted
            return self._item_emb[idx]
        cut = int(np.searchsorted(idx, self._n_base))
        return np.concatenate([self._item_emb[idx[:cut]], posted.vectors[idx[cut:] - self._n_base]])

    def _top_k_catalogue(self, query: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` items of the trained catalogue (its faiss index), ``exclude`` left out."""
        n = self._n_base
        target = min(k, n - exclude.shape[0])
        if target <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        k_search = min(n, k + exclude.shape[0])
        if k_search <= _MAX_INDEX_K and k_search < n:
            self._ensure_threads(self.search_threads)
            while True:
                D, I = self.index.search(query, k_search)
                idx, scores = self._filter(I[0], D[0], exclude, k)
                if idx.shape[0] >= target:
                    return idx, scores
                if k_search >= min(n, _MAX_INDEX_K):
                    break
                k_search = min(n, _MAX_INDEX_K, k_search * 2)  # widen the search
        return self._exact(query[0], k, exclude)

    @staticmethod
    def _filter(I: np.ndarray, D: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` hits of one search (``I``, ``D``: row 0 of faiss' answer) that are real
        (``I >= 0``) and not in ``exclude`` -- which must be SORTED ascending (a CSR row with sorted
        indices, ``np.unique``'s output): every caller's is. One binary search per hit instead of
        ``np.isin``'s sort of both arrays (same result: tests/serving/test_service_scale.py)."""
        valid = I >= 0
        n_exclude = exclude.shape[0]
        if n_exclude:
            pos = np.searchsorted(exclude, I)
            np.minimum(pos, n_exclude - 1, out=pos)
            valid &= exclude[pos] != I
        keep = np.flatnonzero(valid)[:k]
        return I[keep].astype(np.int64, copy=False), D[keep]

    def _exact(self, q: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self._item_emb @ q
        if exclude.shape[0]:
            scores[exclude] = -np.inf
        n_ok = self._n_base - exclude.shape[0]
        k = min(k, n_ok)
        if k < scores.shape[0]:
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(scores.shape[0])
        top = top[np.argsort(-scores[top], kind="stable")]
        return top.astype(np.int64), scores[top].astype(np.float32)

    def _result(
        self,
        idx: np.ndarray,
        scores: np.ndarray,
        user_id: str | None = None,
        unknown_item_ids: list[str] | None = None,
        posted: _Posted | None = None,
    ) -> CandidateResult:
        ids, names = self._item_ids, self._item_names
        il = idx.tolist()
        n = self._n_base
        if posted is None or not il or max(il) < n:
            item_ids, item_names = [ids[i] for i in il], [names[i] for i in il]
        else:
            p_ids, p_names = posted.ids, posted.names
            item_ids = [ids[i] if i < n else p_ids[i - n] for i in il]
            item_names = [names[i] if i < n else p_names[i - n] for i in il]
        return CandidateResult(
            item_idx=idx,
            scores=scores,
            item_ids=item_ids,
            names=item_names,
            user_id=user_id,
            unknown_item_ids=unknown_item_ids or [],
        )
