"""Full-ranking top-K evaluation (recall, NDCG, hit rate, precision), batched over users."""

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


def _rows_to_dense(matrix: sp.csr_matrix, rows: np.ndarray, device: torch.device) -> Tensor:
    """Boolean dense ``[len(rows), I]`` tensor of the given CSR rows (built with one index_put)."""
    sub = matrix[rows].tocoo()
    dense = torch.zeros(sub.shape, dtype=torch.bool, device=device)
    if sub.nnz:
        r = torch.from_numpy(sub.row.astype(np.int64)).to(device)
        c = torch.from_numpy(sub.col.astype(np.int64)).to(device)
        dense[r, c] = True
    return dense


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


@torch.no_grad()
def evaluate(
    model_or_embeddings: ScoreSource,
    truth: sp.spmatrix,
    exclude: sp.spmatrix | Iterable[sp.spmatrix] | None = None,
    ks: Sequence[int] = (10, 20, 50, 100),
    batch_size: int = 4096,
) -> dict[str, float]:
    r"""Rank all items for every user with at least one ``truth`` item and average the metrics.

    For a user :math:`u` with test items :math:`T_u` and top-K list :math:`R_u^K` (items in
    ``exclude`` masked to :math:`-\infty` first):

    * ``recall@K`` :math:`= |R_u^K \cap T_u| / |T_u|`
    * ``precision@K`` :math:`= |R_u^K \cap T_u| / K`
    * ``hit@K`` :math:`= [\,|R_u^K \cap T_u| > 0\,]`
    * ``ndcg@K`` :math:`= \mathrm{DCG}/\mathrm{IDCG}` with
      :math:`\mathrm{DCG} = \sum_{r=1}^{K} [R_u^K(r) \in T_u] / \log_2(r + 1)` and the ideal DCG
      over :math:`\min(|T_u|, K)` positions (the standard definition, not KGAT's).

    Args:
        model_or_embeddings: a :class:`Recommender`, a ``(user_emb, item_emb)`` tuple (score = inner
            product) or a function ``users [B] -> scores [B, I]``.
        truth: users × items matrix of the held-out positives.
        exclude: matrix (or matrices) of items not to rank per user, e.g. the training positives.
        ks: cut-offs.
        batch_size: users scored per batch (memory is ``batch_size × I`` floats).

    Returns:
        ``{"recall@K", "ndcg@K", "hit@K", "precision@K" for each K, "num_users_evaluated"}``.
    """
    score_fn, device = _as_score_fn(model_or_embeddings)
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
    totals = {f"{m}@{k}": 0.0 for k in ks for m in METRICS}
    # discount[r] = 1 / log2(r + 2) for 0-based rank r; its prefix sums give every ideal DCG.
    discount = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64, device=device))
    ideal = torch.cumsum(discount, 0)
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        batch_t = torch.from_numpy(batch.astype(np.int64)).to(device)
        scores = score_fn(batch_t).to(device=device, dtype=torch.float32).clone()
        if exclude_csr is not None:
            scores.masked_fill_(_rows_to_dense(exclude_csr, batch, device), float("-inf"))
        top_scores, top_items = torch.topk(scores, max_k, dim=1)
        truth_dense = _rows_to_dense(truth, batch, device)
        # A masked item can only enter the top-K when fewer than K items remain; never count it.
        hits = (truth_dense.gather(1, top_items) & torch.isfinite(top_scores)).double()
        n_truth = torch.from_numpy(n_truth_all[batch]).to(device=device, dtype=torch.float64)
        cum_hits = torch.cumsum(hits, 1)
        cum_dcg = torch.cumsum(hits * discount, 1)
        for k in ks:
            kk = min(k, max_k)
            hits_k = cum_hits[:, kk - 1]
            idcg = ideal[(n_truth.long().clamp(max=kk) - 1)]
            totals[f"recall@{k}"] += (hits_k / n_truth).sum().item()
            totals[f"precision@{k}"] += (hits_k / k).sum().item()
            totals[f"hit@{k}"] += (hits_k > 0).double().sum().item()
            totals[f"ndcg@{k}"] += (cum_dcg[:, kk - 1] / idcg).sum().item()
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
