r"""Evaluation of candidate generators on the sequential split (Recall/HitRate/NDCG, diversity,
interest similarity), through the SAME retrieval path as serving (:func:`multi_interest.recommend`).

This module only builds the ranked lists; the metrics are computed by the project's one metric
core, :func:`kgrec.models.evaluation.ranked_list_metrics` and
:func:`kgrec.models.evaluation.diversity_at_k` (definitions there). For a held-out user with input
sequence :math:`X_u` (masked when ranking) and targets :math:`T_u`, with :math:`R_u^K` the first
``K`` items of the merged candidate list:

* ``recall@K`` :math:`= |R_u^K \cap T_u| / |T_u|`; ``hit@K`` (HitRate) :math:`= [|R_u^K \cap T_u| > 0]`;
* ``ndcg@K`` :math:`= \sum_{r \le K} [R_u^K(r) \in T_u] / \log_2(r + 1)` over the ideal DCG of
  :math:`\min(|T_u|, K)` hits (the standard definition);
* ``diversity@K`` -- the share of the :math:`\binom{K}{2}` item pairs of :math:`R_u^K` that are
  *category-distinct*, i.e. whose genre sets are DISJOINT (share no genre; an item without genres
  is disjoint from every item); so 0 = every pair shares a genre, 1 = no pair does;
* ``interest_similarity`` -- the mean pairwise cosine similarity between a user's ACTIVE interest
  vectors (users with at least two), averaged over those users; NaN for single-vector models.

:math:`|T_u|` is the length of the target sequence (a repeated target counts twice, and can be
hit once). Each metric is averaged over the users with at least one target (no precision here).
Every merged list is computed at the largest K and cut, so ``@20`` is the prefix of ``@50`` (true
for both merge rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from kgrec.models.evaluation import diversity_at_k, ranked_list_metrics_per_user
from kgrec.models.merge import MergeRule
from kgrec.models.sequential.multi_interest import MultiInterestModel, pad_histories, recommend
from torch import Tensor

SEQUENTIAL_METRICS = ("recall", "hit", "ndcg")


def category_matrix(categories: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """Multi-hot ``[I, G]`` bool matrix of item categories (indexed by ``item_idx``) and the names."""
    names = sorted({c for cats in categories for c in cats})
    col = {c: j for j, c in enumerate(names)}
    out = np.zeros((len(categories), max(1, len(names))), dtype=bool)
    for i, cats in enumerate(categories):
        for c in cats:
            out[i, col[c]] = True
    return out, names


def diversity(top_items: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Per-row share of category-distinct pairs (disjoint genre sets) among the valid items
    (``>= 0``) of ``top_items [B, K]``; NaN for rows with fewer than two items
    (:func:`kgrec.models.evaluation.diversity_at_k` over the whole row)."""
    top_items = np.asarray(top_items, dtype=np.int64)
    return diversity_at_k(top_items, categories, top_items.shape[1])


def interest_similarity(interests: Tensor | np.ndarray, mask: Tensor | np.ndarray) -> np.ndarray:
    """Per-user mean pairwise cosine between active interests ``[B]`` (NaN with fewer than two)."""
    v = torch.as_tensor(np.asarray(interests), dtype=torch.float64)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    unit = torch.nn.functional.normalize(v, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    pair = m[:, :, None] & m[:, None, :] & ~torch.eye(v.shape[1], dtype=torch.bool)[None]
    n = pair.sum((1, 2)).double()
    total = (cos * pair).sum((1, 2))
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan"))).numpy()


def target_hits(top_items: np.ndarray, targets: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``(hits [B, W] bool, num_truth [B])`` of ranked ``top_items [B, W]`` (ids < 0: padding)
    against per-user ``targets``; ``num_truth`` is ``len(targets[u])`` (repeats counted)."""
    top_items = np.asarray(top_items, dtype=np.int64)
    b = top_items.shape[0]
    lengths = np.fromiter((len(t) for t in targets), dtype=np.int64, count=b)
    rows = np.repeat(np.arange(b), lengths)
    flat = np.concatenate([np.asarray(t, np.int64) for t in targets]) if b else np.zeros(0, np.int64)
    span = int(max(top_items.max(initial=0), flat.max(initial=0))) + 2
    hits = np.isin(np.arange(b)[:, None] * span + top_items + 1, rows * span + flat + 1) & (top_items >= 0)
    return torch.from_numpy(hits), torch.from_numpy(lengths)


def ranking_metrics(top_items: np.ndarray, targets: Sequence[Sequence[int]], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-user ``recall@K``, ``hit@K``, ``ndcg@K`` arrays for ranked ``top_items [B, >= max K]``
    (:func:`kgrec.models.evaluation.ranked_list_metrics_per_user`; 0 for a user without targets)."""
    hits, lengths = target_hits(top_items, targets)
    per_user = ranked_list_metrics_per_user(hits, lengths, ks, SEQUENTIAL_METRICS)
    return {name: values.numpy() for name, values in per_user.items()}


@torch.no_grad()
def evaluate_sequential(
    model: MultiInterestModel,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    categories: np.ndarray | None = None,
    ks: Sequence[int] = (20, 50),
    rule: MergeRule | None = None,
    diversity_k: int = 50,
    diversity_weight: float | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on held-out users (module docstring).

    Args:
        model: any :class:`MultiInterestModel` (popularity, YouTube-DNN, MIND, ComiRec, mixture).
        inputs: per user, the time-ordered input items (all masked when ranking; the last
            ``model.max_length`` feed the model).
        targets: per user, the target items.
        categories: ``[I, G]`` bool multi-hot (:func:`category_matrix`) for ``diversity@K``.
        ks: cut-offs for recall / hit / NDCG.
        rule: merge rule (default ``model.merge_rule``, as in serving).
        diversity_k: the K of ``diversity@K``.
        diversity_weight: :math:`\lambda` of the ``"controllable"`` rule (default: the model's);
            that rule chooses by ``categories``, so it needs them.

    Returns:
        ``{"recall@K", "hit@K", "ndcg@K", "diversity@K", "interest_similarity", "num_users"}``.
    """
    keep = [i for i, t in enumerate(targets) if len(t) > 0]
    inputs = [np.asarray(inputs[i], np.int64) for i in keep]
    targets = [np.asarray(targets[i], np.int64) for i in keep]
    if not keep:
        return {"num_users": 0}
    max_k = max(max(ks), diversity_k)
    merged = recommend(model, inputs, max_k, rule=rule, categories=categories, diversity=diversity_weight)
    hits, lengths = target_hits(merged.items, targets)
    per_user = ranked_list_metrics_per_user(hits, lengths, ks, SEQUENTIAL_METRICS)
    # np.mean as before this protocol used the core: recall@K (the default selection metric) and
    # hit@K stay bit-identical; ranked_list_metrics' torch sum can differ from it in the last bit.
    result: dict[str, Any] = {name: float(values.numpy().mean()) for name, values in per_user.items()}
    if categories is not None:
        div = diversity_at_k(merged.items, categories, diversity_k)
        result[f"diversity@{diversity_k}"] = float(np.nanmean(div)) if np.isfinite(div).any() else float("nan")
    model.eval()
    h, n = pad_histories(inputs, model.max_length, model.item_embeddings().device)
    v, mask = model.interests(h, n)
    sim = interest_similarity(v.cpu(), mask.cpu())
    result["interest_similarity"] = float(np.nanmean(sim)) if np.isfinite(sim).any() else float("nan")
    result["num_users"] = len(keep)
    return result


class Popularity(MultiInterestModel):
    """Most-popular-items baseline as a one-interest model: item "embedding" ``[I, 1]`` = the item's
    training count, the single interest = ``[1.0]`` (score = count; ties: lower ``item_idx``).

    Args:
        num_items: item count.
        counts: ``[I]`` training interaction counts (:meth:`from_sequences`).
    """

    trainable = False

    def __init__(self, num_items: int, counts: Sequence[float] | None = None) -> None:
        super().__init__(num_items, 1, 1, 1, 1.0, "max")
        self.hparams = dict(num_items=num_items)
        self.register_buffer("counts", torch.zeros(num_items, 1))
        if counts is not None:
            self.counts.copy_(torch.as_tensor(np.asarray(counts, np.float32)).reshape(-1, 1))

    @classmethod
    def from_sequences(cls, sequences: Sequence[np.ndarray], num_items: int) -> Popularity:
        flat = np.concatenate(sequences) if len(sequences) else np.zeros(0, np.int64)
        return cls(num_items, np.bincount(flat, minlength=num_items).astype(np.float32))

    def reset_parameters(self) -> None:
        """Nothing to learn."""

    def item_embeddings(self) -> Tensor:
        return self.counts

    def interests(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        b = histories.shape[0]
        return torch.ones(b, 1, 1, device=histories.device), torch.ones(b, 1, dtype=torch.bool, device=histories.device)
