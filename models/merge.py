"""Merge per-interest retrieval results into one top-k candidate list (pure numpy).

A multi-interest model gives each user ``K`` query vectors (interests). Each interest is searched
separately (faiss or exact inner product, :func:`search_interests`) and the ``K`` result lists are
merged here by ONE rule, the same in offline evaluation (``kgrec.models.sequential_evaluation``)
and in the service, so that the model selected offline is the model served.

Rules (``rule=``):

* ``"max"`` (default) -- max inner product with de-duplication: an item's score is the maximum of
  its scores over the interests that returned it, and it remembers the interest that gave that
  maximum (ties: the lowest interest index). Items are ranked by that score (ties: lower item id).
  This equals the exact top-k of :math:`\\max_j \\langle v_j, e_i\\rangle` whenever every interest
  list holds at least ``k`` non-excluded items (search ``k + len(history)`` per interest).
* ``"weighted"`` -- weighted round-robin by interest weight (diversity-aware): interest ``j`` with
  weight :math:`w_j` gets its ``t``-th pick (t = 0, 1, ...) at virtual time :math:`(t + 1/2) / w_j`;
  picks are served in virtual-time order (ties: lower interest index); a pick takes the interest's
  best remaining candidate that is neither excluded nor already taken, and is skipped when the
  interest's list is exhausted. So each interest contributes about :math:`k\\,w_j / \\sum w` items
  and no interest can crowd the others out. The final order is the pick order; the score is the
  candidate's score in the list it came from. Without weights every active interest weighs 1.
* ``"mixture"`` -- the mixture of softmaxes of a model trained with the ``"mixture"`` readout
  (:mod:`kgrec.models.sequential.multi_interest`): an item's score is
  :math:`\log \sum_j \exp(\langle v_j, e_i\rangle / \tau + \ell_j)` over the interests whose list
  holds it, with ``log_weights`` :math:`\ell_j = \log \pi_j - \log Z_j` (mixture weight over the
  interest's softmax normaliser) and temperature :math:`\tau`; the source interest is the largest
  term. It is the model's own log-probability of the item when every list holds every candidate:
  callers first re-score the union of the interests' lists under every interest
  (:func:`score_union`), so the only approximation is that an item outside every interest's
  top-``n`` list is not a candidate.

* ``"controllable"`` -- the controllable aggregation of ComiRec (Cen et al., KDD 2020, Sec. 3.4),
  diversity-aware: the candidate pool is the ``CONTROLLABLE_POOL x k`` best items of the ``"max"``
  merge, each scored by its max inner product :math:`f(i)`; the ``k`` items are then chosen
  greedily, step ``t`` taking the pool item with the largest

  .. math:: \hat f(i) + \lambda \frac{1}{t} \sum_{j \in S_t} g(i, j)

  where :math:`S_t` are the ``t`` items already chosen, :math:`g(i, j) = 1` when the category sets
  of ``i`` and ``j`` are disjoint (the ``categories`` multi-hot; an item without categories is
  disjoint from every item) and :math:`\hat f` is :math:`f` standardised over the user's pool. The
  paper adds :math:`\lambda \sum_{j} g(i, j)`; we standardise and average so that one
  ``diversity`` :math:`\lambda` means the same for every model and every position of the list.
  :math:`\lambda = 0` is exactly the ``"max"`` list. ComiRec pools the union of the interests'
  top-``k`` lists; we pool the top ``CONTROLLABLE_POOL x k`` of their max instead, so that the pool
  has the same size for a single vector and for ``K`` interests however much those overlap (so
  callers search that many per interest, :func:`pool_per_interest`). The score is :math:`f(i)` and
  the order is the pick order.

Always: items in ``exclude`` (the user's history) are never returned, no item is returned twice,
entries with id ``< 0`` (faiss's "no result") and interests masked out by ``interest_mask`` are
ignored. Rows with fewer than ``k`` valid candidates are padded with item ``-1``, score ``-inf``,
interest ``-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

MergeRule = Literal["max", "weighted", "mixture", "controllable"]
MERGE_RULES: tuple[str, ...] = ("max", "weighted", "mixture", "controllable")
#: ``"controllable"`` chooses ``k`` items from a pool of this many times ``k`` candidates.
CONTROLLABLE_POOL = 4


def pool_per_interest(k: int, rule: str) -> int:
    """How many non-history candidates each interest must supply for ``rule`` to be exact: ``k``,
    or ``CONTROLLABLE_POOL x k`` for ``"controllable"`` (its pool)."""
    return CONTROLLABLE_POOL * k if rule == "controllable" else k


@dataclass(frozen=True)
class MergedCandidates:
    """Top-k candidates per user: ``items``/``scores``/``interest`` are ``[B, k]`` arrays; ``interest``
    is the index of the interest each candidate came from; padding is ``-1`` / ``-inf`` / ``-1``."""

    items: np.ndarray
    scores: np.ndarray
    interest: np.ndarray

    def row(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unpadded ``(items, scores, interest)`` of row ``b``."""
        keep = self.items[b] >= 0
        return self.items[b][keep], self.scores[b][keep], self.interest[b][keep]


def _exclusion_mask(ids: np.ndarray, exclude: Sequence[Sequence[int]] | None) -> np.ndarray:
    """Boolean ``ids.shape`` mask: ``ids[b, ...]`` is in ``exclude[b]`` (one vectorised isin)."""
    if exclude is None:
        return np.zeros(ids.shape, dtype=bool)
    if len(exclude) != ids.shape[0]:
        raise ValueError(f"exclude has {len(exclude)} rows, expected {ids.shape[0]}")
    lengths = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=len(exclude))
    if lengths.sum() == 0:
        return np.zeros(ids.shape, dtype=bool)
    flat = np.concatenate([np.asarray(e, dtype=np.int64).ravel() for e in exclude])
    span = int(max(ids.max(initial=0), flat.max(initial=0))) + 2
    rows = np.repeat(np.arange(len(exclude), dtype=np.int64), lengths)
    row_of_id = np.arange(ids.shape[0], dtype=np.int64).reshape((-1,) + (1,) * (ids.ndim - 1))
    return np.isin(row_of_id * span + (ids + 1), rows * span + (flat + 1))


def _prepare(
    ids: np.ndarray, scores: np.ndarray, interest_mask: np.ndarray | None, exclude
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if ids.ndim != 3 or ids.shape != scores.shape:
        raise ValueError(f"ids and scores must both be [B, K, n], got {ids.shape} and {scores.shape}")
    valid = (ids >= 0) & ~np.isnan(scores) & ~_exclusion_mask(ids, exclude)
    if interest_mask is not None:
        interest_mask = np.asarray(interest_mask, dtype=bool)
        if interest_mask.shape != ids.shape[:2]:
            raise ValueError(f"interest_mask must be [B, K] = {ids.shape[:2]}, got {interest_mask.shape}")
        valid &= interest_mask[:, :, None]
    return ids, scores, valid


def merge_interest_results(
    ids: np.ndarray,
    scores: np.ndarray,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    interest_mask: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    rule: MergeRule = "max",
    log_weights: np.ndarray | None = None,
    temperature: float = 1.0,
    categories: np.ndarray | None = None,
    diversity: float = 0.0,
) -> MergedCandidates:
    """Merge ``K`` per-interest result lists into the top-``k`` candidates per user.

    Args:
        ids: ``[B, K, n]`` item ids per user and interest, best first (``-1`` = no result).
        scores: ``[B, K, n]`` matching inner-product scores.
        k: number of candidates to return per user.
        exclude: per user, the item ids never to return (the history).
        interest_mask: ``[B, K]`` bool, False for interests the user does not have.
        weights: ``[B, K]`` non-negative interest weights (``"weighted"`` rule only; default 1).
        rule: ``"max"``, ``"weighted"`` or ``"mixture"`` (module docstring).
        log_weights: ``[B, K]`` per-interest log mixture weights over normalisers (``"mixture"``
            only; default 0).
        temperature: softmax temperature :math:`\tau` (``"mixture"`` only).
        categories: ``[I, G]`` bool item categories (``"controllable"`` only; required there).
        diversity: :math:`\lambda \ge 0` (``"controllable"`` only).

    Returns:
        :class:`MergedCandidates` with ``[B, k]`` arrays.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ids, scores, valid = _prepare(ids, scores, interest_mask, exclude)
    if rule == "max":
        return _merge_max(ids, scores, valid, k)
    if rule == "weighted":
        return _merge_weighted(ids, scores, valid, k, weights)
    if rule == "mixture":
        return _merge_mixture(ids, scores, valid, k, log_weights, temperature)
    if rule == "controllable":
        return _merge_controllable(ids, scores, valid, k, categories, diversity)
    raise ValueError(f"unknown merge rule {rule!r}; known: {MERGE_RULES}")


def _merge_max(ids: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int) -> MergedCandidates:
    b, n_interests, n = ids.shape
    flat_ids = ids.reshape(b, -1)
    flat_scores = np.where(valid, scores, -np.inf).reshape(b, -1)
    flat_interest = np.broadcast_to(np.arange(n_interests)[None, :, None], ids.shape).reshape(b, -1)
    flat_valid = valid.reshape(b, -1)
    # Group equal ids (invalid ones last), best score first, then the lowest interest: the first
    # entry of each group is the item's max and its source interest.
    sort_ids = np.where(flat_valid, flat_ids, np.iinfo(np.int64).max)
    order = np.lexsort((flat_interest, -flat_scores, sort_ids), axis=-1)
    s_ids = np.take_along_axis(sort_ids, order, -1)
    s_scores = np.take_along_axis(flat_scores, order, -1)
    s_interest = np.take_along_axis(flat_interest, order, -1)
    s_valid = np.take_along_axis(flat_valid, order, -1)
    first = np.ones_like(s_valid)
    first[:, 1:] = s_ids[:, 1:] != s_ids[:, :-1]
    keep = first & s_valid
    # Rank the kept entries by score desc, then item id asc (deterministic).
    rank = np.lexsort((s_ids, -np.where(keep, s_scores, -np.inf), ~keep), axis=-1)[:, :k]
    out_keep = np.take_along_axis(keep, rank, -1)
    items = np.where(out_keep, np.take_along_axis(s_ids, rank, -1), -1)
    out_scores = np.where(out_keep, np.take_along_axis(s_scores, rank, -1), -np.inf).astype(np.float32)
    interest = np.where(out_keep, np.take_along_axis(s_interest, rank, -1), -1)
    return _pad(items, out_scores, interest, k)


def _pad(items: np.ndarray, scores: np.ndarray, interest: np.ndarray, k: int) -> MergedCandidates:
    missing = k - items.shape[1]
    if missing > 0:
        b = items.shape[0]
        items = np.concatenate([items, np.full((b, missing), -1, np.int64)], 1)
        scores = np.concatenate([scores, np.full((b, missing), -np.inf, np.float32)], 1)
        interest = np.concatenate([interest, np.full((b, missing), -1, np.int64)], 1)
    return MergedCandidates(items.astype(np.int64), scores.astype(np.float32), interest.astype(np.int64))


def _merge_weighted(
    ids: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int, weights: np.ndarray | None
) -> MergedCandidates:
    b, n_interests, n = ids.shape
    if weights is None:
        weights = np.ones((b, n_interests), dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (b, n_interests) or (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"weights must be finite, non-negative and [B, K] = {(b, n_interests)}")
    items = np.full((b, k), -1, np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    interest = np.full((b, k), -1, np.int64)
    # Pick schedule: interest j's t-th pick at (t + 0.5) / w_j. Each interest can fill at most n
    # picks, so n slots per interest are enough; zero-weight interests are never scheduled.
    t = np.arange(n, dtype=np.float64)
    for row in range(b):
        w = np.where(valid[row].any(axis=1), weights[row], 0.0)
        active = np.flatnonzero(w > 0)
        if active.size == 0:
            continue
        times = (t[None, :] + 0.5) / w[active, None]  # [A, n]
        slot_interest = np.repeat(active, n)
        schedule = slot_interest[np.lexsort((slot_interest, times.ravel()))]
        cursor = np.zeros(n_interests, dtype=np.int64)
        taken: set[int] = set()
        filled = 0
        row_ids, row_scores, row_valid = ids[row], scores[row], valid[row]
        for j in schedule:
            c = cursor[j]
            while c < n and (not row_valid[j, c] or int(row_ids[j, c]) in taken):
                c += 1
            if c >= n:
                cursor[j] = c
                continue
            item = int(row_ids[j, c])
            taken.add(item)
            items[row, filled], out_scores[row, filled], interest[row, filled] = item, row_scores[j, c], j
            cursor[j] = c + 1
            filled += 1
            if filled == k:
                break
    return MergedCandidates(items, out_scores, interest)


def _merge_mixture(
    ids: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int, log_weights: np.ndarray | None,
    temperature: float,
) -> MergedCandidates:
    b, n_interests, n = ids.shape
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if log_weights is None:
        log_weights = np.zeros((b, n_interests), dtype=np.float64)
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.shape != (b, n_interests) or np.isnan(log_weights).any() or np.isposinf(log_weights).any():
        raise ValueError(f"log_weights must be [B, K] = {(b, n_interests)} without NaN or +inf")
    terms = np.where(valid, scores.astype(np.float64) / temperature + log_weights[:, :, None], -np.inf)
    items = np.full((b, k), -1, np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    interest = np.full((b, k), -1, np.int64)
    source = np.broadcast_to(np.arange(n_interests)[:, None], (n_interests, n)).ravel()
    for row in range(b):
        keep = np.isfinite(terms[row]).ravel()
        if not keep.any():
            continue
        row_ids, row_terms, row_source = ids[row].ravel()[keep], terms[row].ravel()[keep], source[keep]
        # Group by item (largest term first, so each group's first entry is its source interest).
        order = np.lexsort((row_source, -row_terms, row_ids))
        row_ids, row_terms, row_source = row_ids[order], row_terms[order], row_source[order]
        starts = np.flatnonzero(np.r_[True, row_ids[1:] != row_ids[:-1]])
        # log-sum-exp per group, shifted by the group's largest term (its first entry)
        shift = np.repeat(row_terms[starts], np.diff(np.r_[starts, len(row_ids)]))
        merged = row_terms[starts] + np.log(np.add.reduceat(np.exp(row_terms - shift), starts))
        rank = np.lexsort((row_ids[starts], -merged))[:k]
        m = len(rank)
        items[row, :m] = row_ids[starts][rank]
        out_scores[row, :m] = merged[rank]
        interest[row, :m] = row_source[starts][rank]
    return MergedCandidates(items, out_scores, interest)


def _merge_controllable(
    ids: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int, categories: np.ndarray | None,
    diversity: float,
) -> MergedCandidates:
    if categories is None:
        raise ValueError("the controllable merge needs item categories")
    if not (np.isfinite(diversity) and diversity >= 0):
        raise ValueError(f"diversity must be finite and >= 0, got {diversity}")
    categories = np.asarray(categories, dtype=bool)
    valid_ids = ids[valid]
    if valid_ids.size and valid_ids.max() >= categories.shape[0]:
        raise ValueError(f"categories cover {categories.shape[0]} items, got item id {valid_ids.max()}")
    b = ids.shape[0]
    # The pool: the max merge's best CONTROLLABLE_POOL x k, with their max scores, best first.
    pool = _merge_max(ids, scores, valid, CONTROLLABLE_POOL * k)
    if diversity == 0:
        return _pad(pool.items[:, :k], pool.scores[:, :k], pool.interest[:, :k], k)
    items = np.full((b, k), -1, np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    interest = np.full((b, k), -1, np.int64)
    for row in range(b):
        cand, f, src = pool.row(row)
        if cand.size == 0:
            continue
        f64 = f.astype(np.float64)
        spread = f64.std()
        relevance = (f64 - f64.mean()) / spread if spread > 0 else np.zeros_like(f64)
        cats = categories[cand].astype(np.float32)
        distinct = np.zeros(cand.size)  # number of chosen items each candidate is disjoint from
        free = np.ones(cand.size, dtype=bool)
        for t in range(min(k, cand.size)):
            gain = relevance + (diversity / t) * distinct if t else relevance.copy()
            j = int(np.argmax(np.where(free, gain, -np.inf)))  # ties: the better-scored candidate
            free[j] = False
            # one column per pick, not the [P, P] overlap matrix: k = 1,000 makes P = 4,000
            distinct += (cats @ cats[j]) == 0
            items[row, t], out_scores[row, t], interest[row, t] = cand[j], f[j], src[j]
    return MergedCandidates(items, out_scores, interest)


def score_union(
    ids: np.ndarray, interests: np.ndarray, item_embeddings: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every user's candidates (the union of the valid ids of its ``K`` lists) scored exactly under
    every interest: ``(ids [B, K, U], scores [B, K, U])``, each interest's row holding the same union
    (padded with ``-1`` / ``-inf``). Needed by the ``"mixture"`` rule, whose score sums over ALL
    interests; cost ``K x U x d`` per user."""
    ids = np.asarray(ids, dtype=np.int64)
    interests = np.asarray(interests, dtype=np.float32)
    item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
    b, n_interests, _ = ids.shape
    unions = [np.unique(row[row >= 0]) for row in ids.reshape(b, -1)]
    width = max(1, max((len(u) for u in unions), default=0))
    out_ids = np.full((b, n_interests, width), -1, np.int64)
    out_scores = np.full((b, n_interests, width), -np.inf, np.float32)
    for row, union in enumerate(unions):
        out_ids[row, :, : len(union)] = union
        out_scores[row, :, : len(union)] = interests[row] @ item_embeddings[union].T
    return out_ids, out_scores


def search_interests(
    interests: np.ndarray,
    item_embeddings: np.ndarray,
    n: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    interest_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search of every interest: ``(ids [B, K, n], scores [B, K, n])``.

    Excluded items are masked *before* the top-``n`` cut (so ``n = k`` suffices for an exact
    merge); masked interests return ``-1`` ids. A faiss index searched with ``k + len(history)``
    results per interest gives the same merged top-k (up to ANN error). ``n`` is capped at the
    number of items.
    """
    interests = np.asarray(interests, dtype=np.float32)
    item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
    b, n_interests, _ = interests.shape
    n_items = item_embeddings.shape[0]
    n = min(n, n_items)
    scores = interests @ item_embeddings.T  # [B, K, I]
    if exclude is not None:
        rows = np.repeat(np.arange(b), [len(e) for e in exclude])
        cols = np.concatenate([np.asarray(e, dtype=np.int64).ravel() for e in exclude]) if b else np.zeros(0, np.int64)
        scores[rows, :, cols] = -np.inf
    top = np.argpartition(-scores, n - 1, axis=-1)[..., :n] if n < n_items else np.broadcast_to(
        np.arange(n_items), scores.shape
    ).copy()
    top_scores = np.take_along_axis(scores, top, -1)
    order = np.lexsort((top, -top_scores), axis=-1)
    ids = np.take_along_axis(top, order, -1).astype(np.int64)
    top_scores = np.take_along_axis(top_scores, order, -1)
    ids = np.where(np.isfinite(top_scores), ids, -1)
    if interest_mask is not None:
        ids = np.where(np.asarray(interest_mask, dtype=bool)[:, :, None], ids, -1)
    return ids, top_scores
