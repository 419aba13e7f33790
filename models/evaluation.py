r"""The project's one implementation of the top-K metrics, and the random-split full-ranking protocol.

Core -- every evaluation protocol calls it; nothing else in the project computes these numbers:

* :func:`ranked_list_metrics` (averaged) / :func:`ranked_list_metrics_per_user` -- Recall, NDCG,
  Hit and Precision@K of ranked lists given as ``hits [B, L]`` (``hits[u, r]``: the item at
  0-based rank ``r`` of user ``u``'s list is a truth item of ``u``) and ``num_truth [B]``
  (:math:`|T_u|`: ALL the user's truth items, also those that are not in the list);
* :func:`diversity_at_k` -- the share of category-distinct item pairs of a top-K list.

For a user :math:`u` with truth items :math:`T_u` and top-K list :math:`R_u^K`:

* ``recall@K`` :math:`= |R_u^K \cap T_u| / |T_u|`
* ``precision@K`` :math:`= |R_u^K \cap T_u| / K` (over ``K`` also when the list is shorter)
* ``hit@K`` :math:`= [\,|R_u^K \cap T_u| > 0\,]` (the "HitRate@K" of the sequential protocol)
* ``ndcg@K`` :math:`= \mathrm{DCG}/\mathrm{IDCG}` with
  :math:`\mathrm{DCG} = \sum_{r=1}^{K} [R_u^K(r) \in T_u] / \log_2(r + 1)` and the ideal DCG over
  :math:`\min(|T_u|, K)` positions (the standard definition, not KGAT's); ``K`` is the nominal
  cut-off also where the list is shorter, so truth items outside the list still lower the NDCG.

All in float64; DCG and ideal DCG are left-to-right prefix sums (``cumsum``), so a figure does not
depend on the SIMD width of the machine it was computed on.

The protocols differ only in how they build the lists and which users they count:

* :func:`evaluate` (random split): full ranking of all items with ``exclude`` masked (a masked
  item that still reaches the top-K -- fewer than K items left -- is never a hit); only users
  with at least one truth item are scored and averaged over (0.0 for every metric if none);
  :math:`|T_u|` = stored entries of the user's ``truth`` row; ``ks`` sorted and de-duplicated;
  all four metrics; sums accumulated per batch of users (float64 within a batch, a Python float
  across batches) -- ``empty_users="skip"``.
* :func:`kgrec.models.sequential_evaluation.evaluate_sequential` (sequential split): lists from
  ``multi_interest.recommend``, ids < 0 are padding; only users with a target (``{"num_users": 0}``
  if none); :math:`|T_u|` = the LENGTH of the target sequence (a repeated target counts twice but
  can be hit once); ``recall``, ``hit``, ``ndcg`` only; ``ks`` in the given order; per-user values
  from :func:`ranked_list_metrics_per_user`, averaged with ``np.mean`` as before (NumPy's pairwise
  sum, which can differ from :func:`ranked_list_metrics`' torch sum in the last bit).
* :func:`kgrec.models.reranking.list_metrics` (re-ranked candidates): ids < 0 are padding; EVERY
  user passed is averaged over, one without truth items counting 0 for every metric
  (``empty_users="zero"``); :math:`|T_u|` = stored entries of the ``truth`` row; ``recall`` and
  ``ndcg`` only; ``ks`` in the given order.

Against the three implementations this module replaces: :func:`evaluate` is unchanged bit for
bit; so are recall and hit of the other two (per user and averaged). ``list_metrics`` summed the
DCG with ``Tensor.sum`` and the sequential protocol with NumPy's pairwise ``sum``, so their NDCG
can move in the last bit (~1e-16 relative; one summation order for all protocols is the price of
one implementation). ``list_metrics`` gave a NaN recall for a user without truth items (0/0), now
0 (as ``torchmetrics`` does); the sequential protocol raised ``IndexError`` for a ``K`` above the
list width with more targets than that width, now it follows the definitions above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.models.base import Recommender
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData

ScoreSource = Callable[[Tensor], Tensor] | tuple[Tensor, Tensor] | Recommender
METRICS = ("recall", "ndcg", "hit", "precision")
EmptyUsers = Literal["skip", "zero"]


# ---------------------------------------------------------------------------- core
def metric_key(prefix: str, name: str) -> str:
    """MLflow-safe metric name: ``("valid", "recall@20") -> "valid_recall_at_20"``."""
    return f"{prefix}_{name.replace('@', '_at_')}"


def dcg_discount(n: int, device: torch.device | str | None = None) -> Tensor:
    """``[n]`` float64 discounts ``1 / log2(r + 2)`` of the 0-based ranks ``r < n``."""
    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=torch.float64, device=device))


def _check_inputs(hits: Tensor, num_truth: Tensor | np.ndarray | Sequence[int], ks: Sequence[int],
                  metrics: Sequence[str]) -> tuple[Tensor, Tensor, list[int]]:
    hits = torch.as_tensor(hits)
    if hits.dim() != 2:
        raise ValueError(f"hits must be [B, L], got shape {tuple(hits.shape)}")
    n_truth = torch.as_tensor(np.asarray(num_truth) if not isinstance(num_truth, Tensor) else num_truth)
    n_truth = n_truth.to(device=hits.device, dtype=torch.float64).reshape(-1)
    if n_truth.numel() != hits.shape[0]:
        raise ValueError(f"num_truth has {n_truth.numel()} entries for {hits.shape[0]} lists")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    return hits, n_truth, ks


def ranked_list_metrics_per_user(
    hits: Tensor,
    num_truth: Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int],
    metrics: Sequence[str] = METRICS,
) -> dict[str, Tensor]:
    """Per-user float64 ``[B]`` values of ``{metric}@{K}`` (module docstring for the definitions).

    Args:
        hits: ``[B, L]`` bool (or 0/1): whether the item at each ranked position is a truth item.
        num_truth: ``[B]`` :math:`|T_u|` (recall's denominator, with ``K`` the ideal DCG's length).
        ks: cut-offs, any order (keys follow it: ``for K in ks: for metric in metrics``).
        metrics: which of ``recall``, ``ndcg``, ``hit``, ``precision``, in output order.

    A user with ``num_truth == 0`` gets 0 for every metric.
    """
    hits, n_truth, ks = _check_inputs(hits, num_truth, ks, metrics)
    b, width = hits.shape
    device = hits.device
    hits_f = hits.to(torch.float64)
    cum_hits = torch.cumsum(hits_f, 1)
    cum_dcg = torch.cumsum(hits_f * dcg_discount(width, device), 1)
    # ideal[j] = DCG of j + 1 hits at the top; only min(|T_u|, K) <= min(max |T_u|, max K) is read
    longest = int(n_truth.max().item()) if b else 1
    ideal = torch.cumsum(dcg_discount(max(1, min(max(ks), longest)), device), 0)
    has_truth = n_truth > 0
    zeros = torch.zeros(b, dtype=torch.float64, device=device)
    out: dict[str, Tensor] = {}
    for k in ks:
        kk = min(k, width)
        hits_k = cum_hits[:, kk - 1] if kk else zeros
        for m in metrics:
            if m == "recall":
                value = hits_k / n_truth
            elif m == "precision":
                value = hits_k / k
            elif m == "hit":
                value = (hits_k > 0).double()
            else:
                dcg_k = cum_dcg[:, kk - 1] if kk else zeros
                value = dcg_k / ideal[n_truth.long().clamp(min=1, max=k) - 1]
            out[f"{m}@{k}"] = torch.where(has_truth, value, zeros)
    return out


def ranked_list_metrics(
    hits: Tensor,
    num_truth: Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int],
    metrics: Sequence[str] = METRICS,
    *,
    empty_users: EmptyUsers = "skip",
    reduction: Literal["mean", "sum"] = "mean",
) -> dict[str, float]:
    """``{metric}@{K}`` of ranked lists averaged over users -- the one metric implementation.

    Args:
        hits: ``[B, L]`` bool: ``hits[u, r]`` = the item at 0-based rank ``r`` of ``u``'s list is a
            truth item of ``u`` (padding and masked positions: ``False``).
        num_truth: ``[B]`` :math:`|T_u|`, all of the user's truth items (not only those in the list).
        ks: cut-offs (a ``K`` above ``L`` uses the whole list; precision still divides by ``K``).
        metrics: subset of :data:`METRICS` to return, in this order within each ``K``.
        empty_users: users with ``num_truth == 0``: ``"skip"`` -- left out of the average
            (random-split and sequential protocols); ``"zero"`` -- averaged in with 0 for every
            metric (re-ranking's ``list_metrics``, which averages over every user it is given).
        reduction: ``"mean"`` (float64 sum / number of users counted; NaN when none) or ``"sum"``
            (the float64 sum, for callers that accumulate over batches of users).

    Returns:
        ``{"recall@K", "ndcg@K", "hit@K", "precision@K"}`` (those in ``metrics``) for each ``K``.
    """
    if empty_users not in ("skip", "zero"):
        raise ValueError(f"empty_users must be 'skip' or 'zero', got {empty_users!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hits, n_truth, ks = _check_inputs(hits, num_truth, ks, metrics)
    per_user = ranked_list_metrics_per_user(hits, n_truth, ks, metrics)
    keep = None
    n = hits.shape[0]
    if empty_users == "skip":
        has_truth = n_truth > 0
        n = int(has_truth.sum().item())
        if n < hits.shape[0]:
            keep = has_truth
    out: dict[str, float] = {}
    for name, values in per_user.items():
        total = (values if keep is None else values[keep]).sum().item()
        out[name] = total if reduction == "sum" else (total / n if n else float("nan"))
    return out


def diversity_at_k(ranked: np.ndarray | Tensor, categories: np.ndarray, k: int) -> np.ndarray:
    """Per-row share of category-distinct pairs among the valid items (``>= 0``) of the first ``k``
    entries of ``ranked [B, >= k]``: of the item pairs, the share whose genre sets (rows of the
    ``[I, G]`` bool ``categories``) are DISJOINT -- share no genre; an item without genres is
    disjoint from every item. 0 = every pair shares a genre, 1 = no pair does; NaN for rows with
    fewer than two valid items."""
    top_items = np.asarray(ranked, dtype=np.int64)[:, :k]
    valid = top_items >= 0
    g = categories[np.where(valid, top_items, 0)].astype(np.float32) * valid[..., None]  # [B, K, G]
    shared = np.einsum("bkg,blg->bkl", g, g) > 0
    pair = valid[:, :, None] & valid[:, None, :]
    k = top_items.shape[1]
    off_diag = ~np.eye(k, dtype=bool)[None]
    n_pairs = (pair & off_diag).sum((1, 2))
    distinct = (pair & off_diag & ~shared).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pairs > 0, distinct / np.maximum(n_pairs, 1), np.nan)


# ---------------------------------------------------------------------------- random split
# CPU: scores are computed and ranked in one reused block of about this many bytes. Allocating a
# fresh ``batch × I`` tensor per batch costs a page fault per 4 KiB (as much CPU as the top-K at
# 50k items); a block of a few hundred users keeps the GEMM efficient (measured: 64-640 rows at 50k
# items within noise, 8-20 rows up to 2x slower) at a fraction of the batch's memory.
_BLOCK_BYTES = 64 << 20
# At least this many rows per block: fewer users per matmul fall onto the GEMV kernels, which are
# slower and round differently from the batched GEMM.
_MIN_BLOCK_ROWS = 8


def _rows_to_dense(matrix: sp.csr_matrix, rows: np.ndarray, device: torch.device) -> Tensor:
    """Boolean dense ``[len(rows), I]`` tensor of the given CSR rows (built with one index_put)."""
    sub = matrix[rows].tocoo()
    dense = torch.zeros(sub.shape, dtype=torch.bool, device=device)
    if sub.nnz:
        r = torch.from_numpy(sub.row.astype(np.int64)).to(device)
        c = torch.from_numpy(sub.col.astype(np.int64)).to(device)
        dense[r, c] = True
    return dense


def _row_keys(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, keys)`` of the given CSR rows: ``keys = position * I + column`` of every stored
    entry, row by row (``indptr`` delimits the rows), without building a sub-matrix."""
    starts, stops = matrix.indptr[rows], matrix.indptr[rows + 1]
    counts = (stops - starts).astype(np.int64)
    indptr = np.concatenate(([0], np.cumsum(counts)))
    # gather the rows' index ranges with one arange: offset of each entry inside its row + start
    within = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], counts)
    cols = matrix.indices[np.repeat(starts.astype(np.int64), counts) + within].astype(np.int64)
    keys = np.repeat(np.arange(len(rows), dtype=np.int64), counts) * matrix.shape[1] + cols
    return indptr, keys


def _as_score_fn(source: ScoreSource) -> tuple[Callable[[Tensor], Tensor], torch.device]:
    if isinstance(source, Recommender):
        param = next(iter(source.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        return source.scorer(), device
    if isinstance(source, tuple):
        user_emb, item_emb = source
        item_t = item_emb.t()
        return (lambda users: user_emb[users] @ item_t), user_emb.device
    if callable(source):
        return source, torch.device("cpu")
    raise TypeError(f"cannot score with {type(source).__name__}")


def _embeddings_of(source: ScoreSource) -> tuple[Tensor, Tensor] | None:
    """The ``(user_emb, item_emb)`` behind an inner-product source, so that blocks of scores can be
    computed straight into the evaluator's buffer; ``None`` for any other score function."""
    if isinstance(source, tuple):
        return source
    if isinstance(source, Recommender) and type(source).scorer is Recommender.scorer:
        return source.embeddings()  # what the default scorer() multiplies
    return None


@torch.no_grad()
def evaluate(
    model_or_embeddings: ScoreSource,
    truth: sp.spmatrix,
    exclude: sp.spmatrix | Iterable[sp.spmatrix] | None = None,
    ks: Sequence[int] = (10, 20, 50, 100),
    batch_size: int = 4096,
) -> dict[str, float]:
    r"""Rank all items for every user with at least one ``truth`` item and average the metrics.

    The metrics are those of :func:`ranked_list_metrics` (module docstring) on each user's top-K
    list after the items in ``exclude`` are masked to :math:`-\infty` (a masked item is never a
    hit, even where fewer than K items remain); :math:`|T_u|` = the user's stored ``truth``
    entries; users without one are not scored (``empty_users="skip"``).

    Args:
        model_or_embeddings: a :class:`Recommender`, a ``(user_emb, item_emb)`` tuple (score = inner
            product) or a function ``users [B] -> scores [B, I]``.
        truth: users × items matrix of the held-out positives.
        exclude: matrix (or matrices) of items not to rank per user, e.g. the training positives.
        ks: cut-offs.
        batch_size: users per batch: a score function gets ``batch_size`` users per call, and the
            metrics are summed per batch. Memory is at most ``batch_size × I`` float32 scores: the
            inner-product sources (a tuple, a :class:`Recommender` with the default ``scorer``) are
            scored and ranked in cache-sized blocks of users and never hold a whole batch.

    Returns:
        ``{"recall@K", "ndcg@K", "hit@K", "precision@K" for each K, "num_users_evaluated"}``.
    """
    embeddings = _embeddings_of(model_or_embeddings)
    if embeddings is None:
        score_fn, device = _as_score_fn(model_or_embeddings)
    else:  # not _as_score_fn: a Recommender's scorer() would compute its embeddings a second time
        score_fn, device = None, embeddings[0].device
    truth = sp.csr_matrix(truth)
    if exclude is None:
        exclude_csr = None
    elif isinstance(exclude, sp.spmatrix | sp.sparray):
        exclude_csr = sp.csr_matrix(exclude)
    else:
        mats = list(exclude)
        exclude_csr = sp.csr_matrix(sum(mats[1:], mats[0])) if mats else None
    ks = sorted(set(int(k) for k in ks))
    num_items = truth.shape[1]
    max_k = min(ks[-1], num_items)

    n_truth_all = np.diff(truth.indptr)
    users = np.flatnonzero(n_truth_all > 0)
    batch_size = max(1, int(batch_size))
    if device.type == "cpu":
        block = max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (4 * max(num_items, 1)))
    else:  # an accelerator wants few large kernels, not cache-sized ones
        block = batch_size
    block = min(block, batch_size, max(len(users), 1))
    buffer = torch.empty(block, num_items, dtype=torch.float32, device=device)
    flat = buffer.view(-1)
    if embeddings is not None:
        user_emb, item_emb = embeddings
        item_t = item_emb.t()
        # matmul straight into the block where dtype and device allow, else cast through a copy
        direct = user_emb.dtype == item_emb.dtype == torch.float32 and user_emb.device == item_emb.device == device
    totals = {f"{m}@{k}": 0.0 for k in ks for m in METRICS}
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        b = len(batch)
        batch_t = torch.from_numpy(batch.astype(np.int64)).to(device)
        scores = score_fn(batch_t) if embeddings is None else None
        if exclude_csr is not None:
            ex_ptr, ex_keys = _row_keys(exclude_csr, batch)
        top_scores = torch.empty(b, max_k, dtype=torch.float32, device=device)
        top_items = torch.empty(b, max_k, dtype=torch.int64, device=device)
        for lo in range(0, b, block):
            hi = min(lo + block, b)
            rows = buffer[: hi - lo]
            # the block is ours: mask it in place (a score function's output is never written to)
            if scores is not None:
                rows.copy_(scores[lo:hi])
            elif direct:
                torch.matmul(user_emb[batch_t[lo:hi]], item_t, out=rows)
            else:
                rows.copy_(user_emb[batch_t[lo:hi].to(user_emb.device)] @ item_t)
            if exclude_csr is not None and ex_ptr[hi] > ex_ptr[lo]:
                # keys are position-in-batch * I + item: shifting by the block's start makes them
                # flat offsets into the block
                masked = torch.from_numpy(ex_keys[ex_ptr[lo] : ex_ptr[hi]] - lo * num_items)
                flat.index_fill_(0, masked.to(device), float("-inf"))
            # torch.topk of the whole row, as before: its tie order is the evaluator's
            torch.topk(rows, max_k, dim=1, out=(top_scores[lo:hi], top_items[lo:hi]))
        scores = None  # free the score function's batch before the next call
        # hits: is (position, item) a stored truth entry? -- one searchsorted on the sorted keys
        _, truth_keys = _row_keys(truth, batch)
        truth_keys = torch.from_numpy(np.sort(truth_keys)).to(device)
        query = torch.arange(b, device=device).unsqueeze(1) * num_items + top_items
        pos = torch.searchsorted(truth_keys, query).clamp_(max=truth_keys.numel() - 1)
        # A masked item can only enter the top-K when fewer than K items remain; never count it.
        hits = (truth_keys[pos] == query) & torch.isfinite(top_scores)
        n_truth = torch.from_numpy(n_truth_all[batch]).to(device=device, dtype=torch.float64)
        for name, value in ranked_list_metrics(hits, n_truth, ks, METRICS, reduction="sum").items():
            totals[name] += value
    n = len(users)
    result = {name: (value / n if n else 0.0) for name, value in totals.items()}
    result["num_users_evaluated"] = n
    return result


def evaluate_split(
    model: ScoreSource,
    data: InteractionData,
    part: Literal["valid", "test"] = "valid",
    ks: Sequence[int] = (10, 20, 50, 100),
    batch_size: int = 4096,
) -> dict[str, float]:
    """Evaluate on ``data.valid`` (train masked) or ``data.test`` (train and valid masked)."""
    if part == "valid":
        return evaluate(model, data.valid, [data.train], ks=ks, batch_size=batch_size)
    if part == "test":
        return evaluate(model, data.test, [data.train, data.valid], ks=ks, batch_size=batch_size)
    raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
