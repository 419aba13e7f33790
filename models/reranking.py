r"""Two-stage recommendation: a retriever's top-N candidates re-ranked by KCAN.

* :func:`retrieval_candidates` -- full-ranking top-N of a retriever with the protocol's masking
  (``"train"``/``"valid"``: training items masked; ``"test"``: training and validation items).
* :func:`train_kcan` -- trains :class:`~kgrec.models.rankers.kcan.KCAN` on the *train* split with BPR on
  ``(user, train positive, negative)``; each negative is, with probability
  ``hard_negative_ratio``, a uniformly drawn item of the user's retrieval top-N (training items
  masked, so never a training positive; a validation/test positive can be drawn, about 1 in 200)
  and otherwise a uniform non-positive item (so KCAN still learns the coarse preference).
  After every epoch: KGAT's TransR step + attention update + re-distillation; then the validation
  retrieval top-N is re-ranked; the epoch with the best fused validation NDCG@20 is kept, and
  training stops after ``patience`` evaluations in which neither that figure nor KCAN's own
  validation NDCG@20 improved (best weights restored).
* **Score fusion.** The final list orders the candidates by
  :math:`(1-\alpha)\,\tilde s_{ret} + \alpha\,\tilde s_{KCAN}`, each score standardised over the
  user's N candidates; :math:`\alpha` is picked on the validation split from ``fusion_grid``
  (``alpha = 1``: KCAN alone; ``0``: retrieval alone). Model selection uses the best-:math:`\alpha`
  validation NDCG@20; the KCAN-only figure is reported as well.
* :func:`rerank` -- re-rank a batch of users' candidates (one batched KCAN forward per chunk).
* :func:`evaluate_reranking` -- Recall/NDCG@K of retrieval alone, KCAN alone and the fused list,
  and the candidate recall@N (upper bound of any re-ranker), with the masking of
  :mod:`kgrec.models.evaluation` (same metric definitions; users without a truth item skipped).

Configuration: :class:`~kgrec.models.rankers.kcan.KCANConfig`. KCAN is the registry's ``ranker``
family: :class:`RerankTask` is its training task for the one
:class:`~kgrec.models.training.trainer.Trainer` (hard negatives from the retriever's candidates,
selection on the re-ranked list).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.models.evaluation import ScoreSource, _as_score_fn, _rows_to_dense, ranked_list_metrics
from kgrec.models.rankers.kcan import KCAN, KCANConfig, build_kcan
from kgrec.models.retrievers.kgat import KGAT
from kgrec.models.training.pairwise import train_pairs
from kgrec.models.training.sampling import NegativeSampler
from kgrec.models.training.trainer import EpochCallback, FitResult, Trainer
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData

logger = logging.getLogger(__name__)
Part = Literal["train", "valid", "test"]


# ---------------------------------------------------------------------------- candidates
def _masks(data: InteractionData, part: Part) -> tuple[sp.csr_matrix | None, sp.csr_matrix]:
    """``(truth, exclude)`` of a split part."""
    if part == "train":
        return None, data.train
    if part == "valid":
        return data.valid, data.train
    if part == "test":
        return data.test, (data.train + data.valid).tocsr()
    raise ValueError(f"part must be 'train', 'valid' or 'test', got {part!r}")


@torch.no_grad()
def retrieval_candidates(
    retriever: ScoreSource,
    data: InteractionData,
    part: Part,
    n: int = 200,
    users: np.ndarray | None = None,
    batch_size: int = 4096,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(users [B], candidates [B, N], scores [B, N])``: the retriever's top-N items per user
    with the part's exclusions masked (rows sorted by decreasing score). ``users`` defaults to the
    users with a truth item in ``part`` (``"train"``: every user)."""
    if isinstance(retriever, torch.nn.Module):
        retriever.eval()
    score_fn, device = _as_score_fn(retriever)
    truth, exclude = _masks(data, part)
    if users is None:
        users = (
            np.arange(data.num_users)
            if truth is None
            else np.flatnonzero(np.diff(sp.csr_matrix(truth).indptr) > 0)
        )
    n = min(n, data.num_items)
    exclude = sp.csr_matrix(exclude)
    cands, scores = [], []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        s = score_fn(torch.from_numpy(batch.astype(np.int64)).to(device)).to(device, torch.float32).clone()
        s.masked_fill_(_rows_to_dense(exclude, batch, device), float("-inf"))
        top_s, top_i = torch.topk(s, n, dim=1)
        cands.append(top_i.cpu())
        scores.append(top_s.cpu())
    return torch.from_numpy(users.astype(np.int64)), torch.cat(cands), torch.cat(scores)


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def kcan_scores(kcan: KCAN, users: Tensor, candidates: Tensor, chunk: int = 16384) -> Tensor:
    """KCAN scores ``[B, N]`` of ``candidates [B, N]`` for ``users [B]`` (eval mode, batched over
    pairs; a 200-candidate request is one forward)."""
    kcan.eval()
    device = kcan.kgat.node_embedding.weight.device
    b, n = candidates.shape
    u = users.view(-1, 1).expand(b, n).reshape(-1).to(device)
    i = candidates.reshape(-1).to(device)
    out = torch.empty(b * n, device=device)
    for start in range(0, b * n, chunk):
        out[start : start + chunk] = kcan.score_pairs(u[start : start + chunk], i[start : start + chunk])
    return out.view(b, n).cpu()


def _standardise(scores: Tensor) -> Tensor:
    finite = torch.isfinite(scores)
    s = torch.where(finite, scores, torch.zeros_like(scores))
    cnt = finite.sum(1, keepdim=True).clamp(min=1)
    mean = s.sum(1, keepdim=True) / cnt
    var = (((s - mean) * finite) ** 2).sum(1, keepdim=True) / cnt
    z = (s - mean) / var.sqrt().clamp(min=1e-8)
    return z.masked_fill(~finite, float("-inf"))


def fuse(retrieval_scores: Tensor | None, kcan_scores_: Tensor, alpha: float) -> Tensor:
    """Fused scores ``[B, N]``: ``(1 - alpha) z(retrieval) + alpha z(kcan)`` (per-row z-scores)."""
    if retrieval_scores is None or alpha >= 1.0:
        return kcan_scores_
    z_k = _standardise(kcan_scores_)
    z_r = _standardise(retrieval_scores)
    if alpha <= 0.0:
        return z_r
    return (1.0 - alpha) * z_r + alpha * z_k


def rerank(
    kcan: KCAN,
    retrieval_scores_or_candidates: Tensor | tuple[Tensor, Tensor],
    users: Tensor,
    n: int = 200,
    alpha: float = 1.0,
) -> Tensor:
    """Re-ranked candidate lists ``[B, N]`` (item indices, best first), each a permutation of the
    user's candidates.

    Args:
        kcan: trained model.
        retrieval_scores_or_candidates: either full retrieval scores ``[B, I]`` (float; masked items
            at ``-inf`` -- the top ``n`` are the candidates), or candidates ``[B, N]`` (int; KCAN
            alone decides), or a tuple ``(candidates [B, N], retrieval scores [B, N])``.
        users: ``[B]`` user indices.
        n: number of candidates taken from full scores.
        alpha: fusion weight (1 = KCAN alone; needs retrieval scores otherwise).
    """
    if isinstance(retrieval_scores_or_candidates, tuple):
        candidates, r_scores = retrieval_scores_or_candidates
    elif retrieval_scores_or_candidates.is_floating_point():
        full = retrieval_scores_or_candidates
        r_scores, candidates = torch.topk(full, min(n, full.size(1)), dim=1)
    else:
        candidates, r_scores = retrieval_scores_or_candidates, None
    candidates = candidates.to(torch.int64)
    k_scores = kcan_scores(kcan, users.to(torch.int64), candidates)
    final = fuse(None if r_scores is None else r_scores.cpu().float(), k_scores, alpha)
    order = torch.argsort(final, dim=1, descending=True, stable=True)
    return candidates.cpu().gather(1, order)


# ---------------------------------------------------------------------------- metrics
def list_metrics(
    ranked: Tensor, users: Tensor, truth: sp.csr_matrix, ks: Sequence[int] = (20,)
) -> dict[str, float]:
    """Recall@K / NDCG@K of ranked lists ``[B, L]`` against ``truth``, computed by the project's one
    metric core :func:`kgrec.models.evaluation.ranked_list_metrics` (recall over all the user's
    truth items, ideal DCG over ``min(|T_u|, K)`` positions), averaged over ALL ``B`` users given: a
    user without truth items counts 0 (``empty_users="zero"``; :func:`evaluate` skips such users).
    Entries < 0 are padding."""

    truth = sp.csr_matrix(truth)
    rows = users.numpy()
    dense = _rows_to_dense(truth, rows, torch.device("cpu"))
    n_truth = torch.from_numpy(np.diff(truth.indptr)[rows])
    hits = dense.gather(1, ranked.clamp(min=0)) & (ranked >= 0)
    return ranked_list_metrics(hits, n_truth, ks, ("recall", "ndcg"), empty_users="zero")


def _fused_metrics(
    cands: Tensor, r_scores: Tensor, k_scores: Tensor, users: Tensor, truth, alpha: float, ks
) -> dict[str, float]:
    final = fuse(r_scores, k_scores, alpha)
    order = torch.argsort(final, dim=1, descending=True, stable=True)
    return list_metrics(cands.gather(1, order), users, truth, ks)


@torch.no_grad()
def evaluate_reranking(
    retriever: ScoreSource,
    ranker: KCAN,
    data: InteractionData,
    part: Literal["valid", "test"] = "test",
    N: int = 200,  # noqa: N803 (the brief's name)
    ks: Sequence[int] = (20,),
    alpha: float | None = None,
) -> dict[str, Any]:
    """Metrics of the final list versus retrieval alone on ``part``.

    Returns ``{"retrieval": {recall@K, ndcg@K}, "kcan": {...} (KCAN alone),
    "fused": {...} (with ``alpha``, default ``ranker.meta["extra"]["alpha"]`` or 1),
    "alpha", "candidate_recall@N", "num_users_evaluated"}``.
    """
    if alpha is None:
        alpha = float(getattr(ranker, "meta", {}).get("extra", {}).get("alpha", 1.0))
    truth, _ = _masks(data, part)
    users, cands, r_scores = retrieval_candidates(retriever, data, part, N)
    k_scores = kcan_scores(ranker, users, cands)
    result: dict[str, Any] = {
        "retrieval": list_metrics(cands, users, truth, ks),
        "kcan": _fused_metrics(cands, r_scores, k_scores, users, truth, 1.0, ks),
        "fused": _fused_metrics(cands, r_scores, k_scores, users, truth, alpha, ks),
        "alpha": alpha,
        f"candidate_recall@{cands.size(1)}": list_metrics(cands, users, truth, (cands.size(1),))[
            f"recall@{cands.size(1)}"
        ],
        "num_users_evaluated": int(users.numel()),
    }
    return result


# ---------------------------------------------------------------------------- training
class RerankTask:
    """KCAN as the re-ranker of ``retriever`` (module docstring): BPR on training pairs with hard
    negatives from the retriever's top-N, selected on the fused validation NDCG@20 at the best
    fusion weight, and kept training while KCAN alone still improves (``also_improving``): the
    alpha = 0 candidate (retrieval alone) is a floor the fused figure cannot go below, so while
    KCAN is weak the fused figure is flat even though the ranker is learning."""

    selection_metric = "ndcg@20"
    also_improving = "ndcg@20_kcan"

    def __init__(
        self,
        data: InteractionData,
        retriever: ScoreSource,
        config: KCANConfig,
        global_init: KGAT | None = None,
    ) -> None:
        self.data, self.retriever, self.config, self.global_init = data, retriever, config, global_init
        self.users, self.items = train_pairs(data.train)
        self.sampler = NegativeSampler(data.train)

    def prepare(self, model: KCAN) -> None:
        config, data, n = self.config, self.data, self.config.num_candidates
        if self.global_init is not None:
            model.init_global(self.global_init)
        # training negatives come from the retrieval top-N with training items masked (= the
        # validation candidates of every user)
        _, self.train_candidates, _ = retrieval_candidates(self.retriever, data, "train", n)
        valid_users = np.flatnonzero(np.diff(data.valid.indptr) > 0)
        if config.max_valid_users is not None and len(valid_users) > config.max_valid_users:
            rng = np.random.default_rng(config.seed)
            valid_users = np.sort(rng.choice(valid_users, config.max_valid_users, replace=False))
        self.valid = retrieval_candidates(self.retriever, data, "valid", n, users=valid_users)

    def train_epoch(
        self, model: KCAN, optimizer: torch.optim.Optimizer, generator: torch.Generator, device: torch.device
    ) -> float:
        m = self.users.numel()
        perm = torch.randperm(m, generator=generator)
        uniform = self.sampler.sample(self.users, generator)
        cols = torch.randint(0, self.train_candidates.size(1), (m,), generator=generator)
        hard = self.train_candidates[self.users, cols]
        use_hard = torch.rand(m, generator=generator) < self.config.hard_negative_ratio
        negs = torch.where(use_hard, hard, uniform)
        total = 0.0
        for start in range(0, m, self.config.batch_size):
            idx = perm[start : start + self.config.batch_size]
            loss = model.loss(self.users[idx].to(device), self.items[idx].to(device), negs[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
        return total / m

    def validate(self, model: KCAN) -> dict[str, float]:
        v_users, v_cands, v_scores = self.valid
        truth = self.data.valid
        k_scores = kcan_scores(model, v_users, v_cands, self.config.pair_chunk)
        per_alpha = {
            a: _fused_metrics(v_cands, v_scores, k_scores, v_users, truth, a, (20,))["ndcg@20"]
            for a in self.config.fusion_grid
        }
        alpha = max(per_alpha, key=lambda a: (per_alpha[a], a))
        alone = _fused_metrics(v_cands, v_scores, k_scores, v_users, truth, 1.0, (20,))["ndcg@20"]
        return {"ndcg@20": per_alpha[alpha], "ndcg@20_kcan": alone, "alpha": alpha}

    def finish(self, model: KCAN, result: FitResult) -> None:
        model.meta = {"extra": {"alpha": result.best_valid.get("alpha", 1.0), "num_candidates": self.config.num_candidates}}


def train_kcan(
    data: InteractionData,
    retriever: ScoreSource,
    config: KCANConfig | None = None,
    model: KCAN | None = None,
    on_epoch: EpochCallback | None = None,
    global_init: KGAT | None = None,
) -> tuple[KCAN, FitResult]:
    """Train KCAN as the re-ranker of ``retriever`` (:class:`RerankTask` through the
    :class:`Trainer`); returns the model (best epoch, eval mode, ``model.meta["extra"]["alpha"]``
    set) and the fit, whose ``best_valid`` holds ``ndcg@20`` (fused), ``ndcg@20_kcan`` and ``alpha``.

    ``global_init``: a KGAT trained on the same CKG whose weights start KCAN's global layer (same
    embedding, layer and relation sizes required). KGAT needs ~150 cheap epochs to converge; KCAN's
    epochs are far more expensive, so without it the global representations stay under-trained.
    """
    config = config or KCANConfig()
    model = model or build_kcan(config, data)
    callbacks = () if on_epoch is None else (on_epoch,)
    result = Trainer(config, callbacks).fit(model, RerankTask(data, retriever, config, global_init))
    return model, result
