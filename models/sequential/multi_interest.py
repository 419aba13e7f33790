r"""Shared pieces of the multi-interest candidate generators (MIND, ComiRec-DR/SA, YouTube-DNN,
the interest mixture): the base class, the training loss, routing helpers, history padding,
retrieval (interests -> search -> :mod:`kgrec.models.merge`) and save/load.

Conventions:

* A *history* is a time-ordered list of ``item_idx`` (oldest first). Batches are left-aligned
  ``histories [B, L]`` (int64, padding value 0, ignored) with ``lengths [B]``; only the last
  ``max_length`` items of a longer history are used (:func:`pad_histories`).
* ``interests(histories, lengths) -> (V [B, K, d], mask [B, K])``: ``mask[b, j]`` is False for an
  interest user ``b`` does not have (e.g. MIND's dynamic interest count); masked rows are zero.
* The score of item ``i`` under interest ``j`` is :math:`\langle v_j, e_i\rangle` with
  ``e = item_embeddings()``; a user's candidates are the merge of the per-interest top lists
  (:func:`recommend`, the same path in evaluation and serving).

Training loss (:meth:`MultiInterestModel.loss`, as in ComiRec): for a (history, next item ``t``)
sample the user vector is the *readout* of the interests for ``t`` -- by default the hard readout
:math:`u = v_{j^*}`, :math:`j^* = \arg\max_j \langle v_j, e_t\rangle` over the active interests
(MIND overrides it with label-aware attention) -- and the loss is the sampled softmax over ``t`` and
``N`` uniformly sampled negatives shared by the batch, with temperature :math:`\tau`:

.. math:: \mathcal{L} = -\log \frac{\exp(\langle u, e_t\rangle / \tau)}
          {\exp(\langle u, e_t\rangle / \tau) + \sum_{n} \exp(\langle u, e_n\rangle / \tau)}

(a negative equal to the target is dropped from the denominator). With ``negatives`` = every item
(``num_negatives = 0`` in the trainer) this is the exact softmax over the catalogue.

``readout="mixture"`` replaces the hard readout by a mixture of softmaxes (Yang et al., ICLR 2018,
"Breaking the Softmax Bottleneck"): each active interest ``j`` of the ``K'`` is its own softmax over
the same candidates and the target's likelihood is their uniform mixture,

.. math:: \mathcal{L} = -\log \frac{1}{K'} \sum_j \frac{\exp(\langle v_j, e_t\rangle / \tau)}
          {\exp(\langle v_j, e_t\rangle / \tau) + \sum_n \exp(\langle v_j, e_n\rangle / \tau)}

so every interest gets gradient in proportion to its responsibility for the target (the hard
readout gives it only to the winner). Such a model must be served with the ``"mixture"`` merge rule
(:mod:`kgrec.models.merge`), which ranks by the same mixture; served with ``"max"`` it ranks by
something it was not trained for (``comirec_sa_mos`` on ml-100k, seeds 2025-2029: Recall@50
0.407 -> 0.370, BENCHMARKS.md).

``readout="max"`` trains exactly the score the ``"max"`` merge serves,
:math:`s(i) = \max_j \langle v_j, e_i\rangle` over the active interests, with one softmax over the
candidates:

.. math:: \mathcal{L} = -\log \frac{\exp(s(t) / \tau)}{\exp(s(t) / \tau) + \sum_n \exp(s(n) / \tau)}

so an interest is also pushed down on every negative it ranks highest (the hard readout scores the
negatives with the target's interest only, so the other interests never see them).

``seen`` (``[B, I]`` bool, :func:`kgrec.models.training.sequential.seen_mask`) drops the items a user
already had from the negatives: retrieval never returns them, and as negatives they pull every
interest away from the very items that define it.

REMI (Xie et al., "Rethinking Multi-Interest Learning for Candidate Matching in Recommender
Systems", RecSys 2023, arXiv 2302.14532) adds two training-only terms, both off by default
(``hard_negative_beta = routing_reg = 0`` is the loss above, bit for bit):

* **Interest-aware hard negatives (IHN)**, :func:`hard_negative_log_partition`. The ideal negative
  distribution of a routed user vector :math:`u` (the readout's: the routed interest for the hard
  readout, each interest for the mixture, the max score for ``"max"``) is
  :math:`q(j) \propto \exp(\beta\, s_j)` over the negatives, :math:`s_j = \langle u, e_j\rangle / \tau`
  the softmax logit, and the loss is
  :math:`-\log \frac{e^{s_t}}{e^{s_t} + N\, \mathbb{E}_{j \sim q}[e^{s_j}]}`. The expectation is
  estimated by importance weighting the ``N`` uniformly drawn negatives,
  :math:`N\, \mathbb{E}_q[e^{s_j}] \approx \sum_n w_n e^{s_n}` with
  :math:`w_n = e^{\beta s_n} / (\frac{1}{N}\sum_m e^{\beta s_m})` (weights of mean 1 over the
  batch's negatives; not detached, as in the authors' code). :math:`\beta = 0` gives
  :math:`w_n = 1`: the plain sampled softmax. With the exact softmax (``negatives`` = every item,
  ``num_negatives = 0``) the "sample" is the whole catalogue and the estimate is exact: the loss is
  then the paper's ideal objective with :math:`N = I - 1` -- not a no-op, since :math:`q` puts more
  mass than uniform on high-scoring items (the denominator grows and its gradient concentrates on
  the hardest negatives; :math:`\beta \to \infty` keeps only the hardest one, times ``N``).
* **Routing regularisation (RR)**, :func:`routing_regularisation`, against *routing collapse* -- an
  interest that expresses a single history item. With :math:`A \in \mathbb{R}^{K \times n}` a user's
  routing matrix (row ``k``: interest ``k``'s distribution over the ``n`` real history items),
  :math:`C = \frac{1}{d} (A - \bar A)(A - \bar A)^\top` (:math:`\bar A` the row means) and the
  penalty is :math:`\lVert \mathrm{diag}(C) \rVert_2^2`, i.e. the squared per-interest variance of
  the routing weights: 0 when every interest spreads evenly over the items, largest when each sits
  on one item. Models with a routing matrix return it from :meth:`MultiInterestModel.routing`
  (ComiRec-SA: its attention; ComiRec-DR and MIND: the last routing iteration's coupling
  coefficients, renormalised over the items). The loss adds ``routing_reg`` times its mean over
  the batch's users (the authors sum over the batch: their ``rlambda`` x batch size = ours).

The two weights are attributes of the model (``hard_negative_beta``, ``routing_reg``), set by the
build from :class:`~kgrec.models.sequential.config.SequentialModelConfig`; they are not saved with
it (serving does not use them).
"""

from __future__ import annotations

import inspect
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from kgrec.models.base import EpochHook
from kgrec.models.merge import (
    MergedCandidates,
    MergeRule,
    merge_interest_results,
    pool_per_interest,
    score_union,
    search_interests,
)
from kgrec.models.persistence import load_state, load_tensors, save_module
from kgrec.models.spec import model_specs
from torch import Tensor

#: ``class name -> module`` of every savable model (for :func:`load_model`).
#: Every concrete subclass by class name (filled by ``__init_subclass__``), for :func:`load_model`.
MODEL_CLASSES: dict[str, type[MultiInterestModel]] = {}

#: Training readouts (module docstring): ComiRec's argmax interest, the mixture of softmaxes, or
#: the softmax of the max merge's score.
Readout = Literal["hard", "mixture", "max"]
READOUTS: tuple[str, ...] = ("hard", "mixture", "max")


def squash(x: Tensor, dim: int = -1, eps: float = 1e-9) -> Tensor:
    r"""Capsule squash (Sabour et al. 2017, MIND Eq. 5):
    :math:`\mathrm{squash}(z) = \frac{\|z\|^2}{1 + \|z\|^2} \frac{z}{\|z\|}`."""
    norm2 = (x * x).sum(dim, keepdim=True)
    return norm2 / (1.0 + norm2) * x / torch.sqrt(norm2 + eps)


def dynamic_interest_count(lengths: Tensor, max_interests: int) -> Tensor:
    r"""MIND's per-user interest count (Li et al. 2019, Sec. 3.3, Eq. 9):
    :math:`K'_u = \max(1, \min(K, \lfloor \log_2 |\mathcal{I}_u| \rfloor))`, ``|I_u|`` = history length
    (the paper writes :math:`\log_2(|\mathcal{I}_u|)`; we take the floor to get an integer).
    A zero-length history gets 1."""
    logs = torch.floor(torch.log2(lengths.clamp(min=1).double())).long()
    return logs.clamp(min=1, max=max_interests)


def capsule_routing(
    predictions: Tensor,
    behaviour_mask: Tensor,
    interest_mask: Tensor,
    logits: Tensor,
    iterations: int = 3,
    coupling: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Dynamic routing (Sabour et al. 2017) from ``L`` behaviour capsules to ``K`` interest capsules.

    Args:
        predictions: ``[B, K, L, d]`` prediction vectors :math:`\hat e_{j|i}` (behaviour ``i``'s vote
            for interest ``j``; MIND: :math:`S e_i` for every ``j``, ComiRec-DR: :math:`W_j e_i`).
        behaviour_mask: ``[B, L]`` bool, real (non-padding) behaviours.
        interest_mask: ``[B, K]`` bool, active interests.
        logits: ``[B, K, L]`` initial routing logits :math:`b_{ji}` (random for MIND, zeros for
            ComiRec-DR); never learned.
        iterations: routing iterations ``r``.
        coupling: also return the last iteration's coupling coefficients ``w [B, K, L]``, with
            gradient (for :func:`routing_regularisation`).

    Each iteration: :math:`w_{ji} = \mathrm{softmax}_j(b_{ji})` over the active interests,
    :math:`z_j = \sum_i w_{ji} \hat e_{j|i}` over real behaviours, :math:`v_j = \mathrm{squash}(z_j)`,
    :math:`b_{ji} \mathrel{+}= \langle v_j, \hat e_{j|i}\rangle`. As in the reference implementations,
    the logit updates use detached predictions (gradients flow through the last iteration only), so
    the coupling coefficients have no gradient. With ``coupling`` the logit updates are
    differentiated (same values) and the capsules use the detached coefficients, so the capsules'
    gradient is unchanged and only a penalty on the returned ``w`` reaches the predictions through
    the routing.

    Returns:
        ``[B, K, d]`` interest capsules, zero where ``interest_mask`` is False (and ``w`` with
        ``coupling``).
    """
    neg = torch.finfo(predictions.dtype).min
    detached = predictions.detach()
    b = logits
    for it in range(iterations):
        w = torch.softmax(b.masked_fill(~interest_mask[:, :, None], neg), dim=1)
        w = w * behaviour_mask[:, None, :] * interest_mask[:, :, None]
        last = it == iterations - 1
        if coupling:
            if last:
                v = squash((w.detach().unsqueeze(-1) * predictions).sum(2))
            else:
                v = squash((w.unsqueeze(-1) * predictions).sum(2))
                b = b + (predictions * v.unsqueeze(2)).sum(-1)
            continue
        votes = predictions if last else detached
        v = squash((w.unsqueeze(-1) * votes).sum(2))  # [B, K, d]
        if not last:
            b = b + (detached * v.unsqueeze(2)).sum(-1)
    v = v * interest_mask[:, :, None]
    return (v, w) if coupling else v


def hard_negative_log_partition(neg_logits: Tensor, valid: Tensor, beta: float) -> Tensor:
    r"""REMI's interest-aware hard-negative term (module docstring): the log of
    :math:`\sum_n w_n e^{s_n}` over the valid negatives of each row (last dimension), with
    :math:`w_n = e^{\beta s_n} / (\frac{1}{N}\sum_m e^{\beta s_m})`, :math:`N` = the row's valid
    negatives, i.e. :math:`\log N + \mathrm{lse}((1 + \beta) s) - \mathrm{lse}(\beta s)`.
    ``beta = 0`` is :math:`\mathrm{lse}(s)`, the plain sampled softmax's. A row without a valid
    negative gives ``-inf``.

    Args:
        neg_logits: ``[..., N]`` negative logits (already divided by the temperature).
        valid: bool, broadcastable to ``neg_logits``; False drops a negative (the target, a seen item).
        beta: hardness :math:`\beta \ge 0`.
    """
    valid = valid.expand_as(neg_logits)
    ninf = torch.tensor(float("-inf"), dtype=neg_logits.dtype, device=neg_logits.device)
    if beta == 0:
        return torch.logsumexp(torch.where(valid, neg_logits, ninf), dim=-1)
    count = valid.sum(-1)
    # a row without a valid negative is computed over all of them (finite, so no NaN gradient)
    # and then replaced by -inf
    s = torch.where(valid | (count == 0)[..., None], neg_logits, ninf)
    hard = torch.logsumexp((1.0 + beta) * s, dim=-1) - torch.logsumexp(beta * s, dim=-1)
    out = torch.log(count.clamp(min=1).to(s.dtype)) + hard
    return torch.where(count > 0, out, ninf)


def hard_negative_weights(neg_logits: Tensor, valid: Tensor, beta: float) -> Tensor:
    r"""The importance weights :math:`w_n` of :func:`hard_negative_log_partition` (mean 1 over each
    row's valid negatives, 0 elsewhere); for inspection and tests."""
    valid = valid.expand_as(neg_logits)
    q = torch.softmax((beta * neg_logits).masked_fill(~valid, float("-inf")), dim=-1)
    return torch.nan_to_num(q, nan=0.0) * valid.sum(-1, keepdim=True).to(q.dtype)


def item_shares(coupling: Tensor, eps: float = 1e-12) -> Tensor:
    """Capsule coupling coefficients ``w [B, K, L]`` (each item's distribution over the interests,
    0 on padding) as routing rows: each interest's share of every item, summing to 1 over the items."""
    return coupling / coupling.sum(-1, keepdim=True).clamp(min=eps)


def routing_regularisation(
    routing: Tensor, behaviour_mask: Tensor, interest_mask: Tensor | None = None, dim: int | None = None
) -> Tensor:
    r"""REMI's routing regularisation per user (module docstring):
    :math:`\lVert \mathrm{diag}(C) \rVert_2^2` with :math:`C = \frac{1}{d}(A - \bar A)(A - \bar A)^\top`,
    i.e. :math:`\sum_k \big(\frac{1}{d} \sum_i (A_{ki} - \bar A_k)^2\big)^2` over the real history items
    ``i`` and the active interests ``k`` (:math:`\bar A_k` = the mean over the real items).

    Zero when every interest spreads evenly over the items (every row of ``A`` constant); for a
    row concentrated on one of ``n`` items the inner sum is :math:`1 - 1/n`. The authors' code takes
    the mean and the sum over every padded position (so an even spread over a short history is
    penalised there); here padding is left out.

    Args:
        routing: ``[B, K, L]``, row ``k`` interest ``k``'s weights over the history positions.
        behaviour_mask: ``[B, L]`` bool, real history positions.
        interest_mask: ``[B, K]`` bool, active interests (default all).
        dim: the :math:`d` of :math:`C` (default 1).

    Returns:
        ``[B]`` penalty of each user.
    """
    real = behaviour_mask[:, None, :].to(routing.dtype)
    n = real.sum(-1, keepdim=True).clamp(min=1)
    a = routing * real
    centred = (a - a.sum(-1, keepdim=True) / n) * real
    diag = centred.pow(2).sum(-1) / (dim or 1)  # [B, K]
    if interest_mask is not None:
        diag = diag * interest_mask.to(diag.dtype)
    return diag.pow(2).sum(-1)


def pad_histories(
    histories: Sequence[Sequence[int]], max_length: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-aligned ``[B, L]`` int64 batch of the last ``max_length`` items of each history, padded
    with 0, and the ``[B]`` lengths (``L = max(1, longest kept history)``)."""
    kept = [np.asarray(h, dtype=np.int64)[-max_length:] if len(h) else np.zeros(0, np.int64) for h in histories]
    lengths = np.fromiter((len(h) for h in kept), dtype=np.int64, count=len(kept))
    width = max(1, int(lengths.max(initial=0)))
    out = np.zeros((len(kept), width), dtype=np.int64)
    if len(kept):
        mask = np.arange(width)[None, :] < lengths[:, None]
        out[mask] = np.concatenate(kept) if lengths.sum() else np.zeros(0, np.int64)
    return torch.from_numpy(out).to(device), torch.from_numpy(lengths).to(device)



def _corrected(logits: Tensor, shift_pos: Tensor | None, shift_neg: Tensor | None) -> Tensor:
    """``logits [B, ..., 1 + N]`` (the target's first) minus the log-Q shifts; unchanged when None."""
    if shift_pos is None or shift_neg is None:
        return logits
    shape = (-1,) + (1,) * (logits.dim() - 1)
    return torch.cat([logits[..., :1] - shift_pos.view(shape), logits[..., 1:] - shift_neg], dim=-1)

class MultiInterestModel(torch.nn.Module, ABC):
    """Base class of a candidate generator mapping an item history to ``K`` interest vectors.

    Subclasses implement :meth:`interests` and :meth:`reset_parameters`, keep their constructor
    arguments in ``self.hparams`` (JSON-serialisable; :func:`save_model` / :func:`load_model` rebuild
    the model from them) and own ``self.item_embedding`` (``torch.nn.Embedding [I, d]``) unless
    they override :meth:`item_embeddings`.

    Args:
        num_items: item count ``I``.
        embedding_dim: ``d``.
        num_interests: ``K`` (the maximum per user).
        max_length: ``L``, the number of most recent history items used.
        temperature: :math:`\\tau` of the sampled softmax.
        merge_rule: how :func:`recommend` merges the interests' lists (:mod:`kgrec.models.merge`).
        readout: ``"hard"`` or ``"mixture"`` (module docstring).
    """

    #: Whether :class:`~kgrec.models.training.sequential.SequentialTask` trains it by gradient descent.
    trainable: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls):
            MODEL_CLASSES[cls.__name__] = cls

    def __init__(
        self,
        num_items: int,
        embedding_dim: int,
        num_interests: int,
        max_length: int = 20,
        temperature: float = 1.0,
        merge_rule: MergeRule = "max",
        readout: Readout = "hard",
    ) -> None:
        super().__init__()
        if num_items < 1 or embedding_dim < 1 or num_interests < 1 or max_length < 1:
            raise ValueError("num_items, embedding_dim, num_interests and max_length must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; known: {READOUTS}")
        self.readout_kind: Readout = readout
        self.num_items = int(num_items)
        self.embedding_dim = int(embedding_dim)
        self.num_interests = int(num_interests)
        self.max_length = int(max_length)
        self.temperature = float(temperature)
        self.merge_rule: MergeRule = merge_rule
        #: lambda of the ``"controllable"`` merge (saved with the model, like ``merge_rule``)
        self.diversity_weight = 0.0
        self.hparams: dict[str, Any] = {}
        #: REMI's training-only weights (module docstring): IHN hardness beta, RR weight
        self.hard_negative_beta = 0.0
        self.routing_reg = 0.0
        # Optional L2 pull of the item embeddings toward given prior vectors (KG-aware init).
        self.prior_weight = 0.0
        self.register_buffer("item_prior", None, persistent=False)
        self.register_buffer("item_prior_mask", None, persistent=False)

    # ------------------------------------------------------------------ the model contract
    def epoch_hooks(self) -> list[EpochHook]:
        """Extra per-epoch steps for the trainer: none."""
        return []

    @abstractmethod
    def reset_parameters(self) -> None:
        """Re-initialise every learnable parameter (from the global torch RNG)."""

    @abstractmethod
    def interests(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``(V [B, K, d], mask [B, K])`` for left-aligned ``histories [B, L]`` and ``lengths [B]``."""

    def item_embeddings(self) -> Tensor:
        """``[I, d]`` item vectors; score = inner product with an interest."""
        return self.item_embedding.weight

    #: Whether :meth:`routing` returns a routing matrix (REMI's routing regularisation applies).
    has_routing: bool = False

    def routing(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(V, mask, A)``: :meth:`interests` and the item-to-interest routing matrix
        ``A [B, K, L]`` (row ``k``: interest ``k``'s weights over the history positions, summing to
        1 over the real ones; with gradient), or ``None`` for a model without one (the default)."""
        v, mask = self.interests(histories, lengths)
        return v, mask, None

    def interest_weights(self, histories: Tensor, lengths: Tensor, mask: Tensor) -> Tensor:
        """``[B, K]`` non-negative weights for the ``"weighted"`` merge (default: 1 per active
        interest)."""
        return mask.float()

    def readout(self, interests: Tensor, mask: Tensor, target_emb: Tensor) -> Tensor:
        """Training user vector ``[B, d]`` for the target items: hard readout (argmax of the inner
        product over the active interests)."""
        logits = (interests * target_emb[:, None, :]).sum(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        best = logits.argmax(1)
        return interests[torch.arange(len(best), device=best.device), best]

    def mixture_log_weights(self, interests: Tensor, mask: Tensor) -> Tensor:
        """``[B, K]`` log-weights of the ``"mixture"`` merge: :math:`-\log K' - \log Z_j` with
        :math:`Z_j = \sum_i \exp(\langle v_j, e_i\rangle / \tau)` over the whole catalogue (exact;
        ``K x I x d`` per user), ``-inf`` for inactive interests."""
        logits = torch.einsum("bkd,id->bki", interests, self.item_embeddings()) / self.temperature
        log_z = torch.logsumexp(logits, dim=-1)
        active = mask.sum(1, keepdim=True).clamp(min=1).to(log_z.dtype)
        return (-torch.log(active) - log_z).masked_fill(~mask, float("-inf"))

    def loss(
        self, histories: Tensor, lengths: Tensor, targets: Tensor, negatives: Tensor, decorrelation: float = 0.0,
        seen: Tensor | None = None, hard_negative_beta: float | None = None, routing_reg: float | None = None,
        log_q: Tensor | None = None,
    ) -> Tensor:
        """Sampled-softmax loss (module docstring) of a batch; ``negatives [N]`` shared by the batch
        (every item for the exact softmax). ``decorrelation`` :math:`\lambda` adds
        :math:`\lambda \cdot \mathrm{mean}_{j \ne k} \cos^2(v_j, v_k)` over each user's active
        interest pairs (averaged over users with two or more), which keeps the mixture readout's
        interests from collapsing onto one direction. ``seen [B, I]``: items left out of each row's
        negatives (module docstring). ``hard_negative_beta`` / ``routing_reg``: REMI's IHN hardness
        and RR weight (module docstring; default: the model's attributes, 0 unless configured).
        ``log_q [I]``: log-probabilities of the proposal the negatives were drawn from; each logit
        (target's and negatives') then has :math:`\log Q(j)` subtracted (the log-Q correction of a
        non-uniform sampled softmax, Bengio & Senecal 2008; Yi et al., RecSys 2019)."""
        beta = self.hard_negative_beta if hard_negative_beta is None else float(hard_negative_beta)
        rr = self.routing_reg if routing_reg is None else float(routing_reg)
        if beta < 0 or rr < 0:
            raise ValueError(f"hard_negative_beta and routing_reg must be >= 0, got {beta}, {rr}")
        if rr > 0:
            if not self.has_routing:
                raise ValueError(f"{type(self).__name__} has no routing matrix for routing_reg")
            v, mask, routing = self.routing(histories, lengths)
        else:
            v, mask = self.interests(histories, lengths)
        items = self.item_embeddings()
        target_emb = items[targets]
        is_target = negatives[None, :] == targets[:, None]  # [B, N]
        if seen is not None:  # items the user already had: never candidates, so never negatives
            is_target = is_target | seen[:, negatives]
        if log_q is not None and beta > 0:
            raise ValueError("REMI's hard-negative weights assume uniform negatives: no log_q with hard_negative_beta")
        if log_q is not None:  # shifts of the target's logit [B] and of each negative's [N]
            shift_pos, shift_neg = log_q[targets], log_q[negatives]
        else:
            shift_pos = shift_neg = None
        if beta > 0:
            loss = self._hard_negative_loss(v, mask, target_emb, items[negatives], ~is_target, beta)
        elif self.readout_kind == "mixture":
            pos = (v * target_emb[:, None, :]).sum(-1, keepdim=True)  # [B, K, 1]
            neg = torch.einsum("bkd,nd->bkn", v, items[negatives]).masked_fill(is_target[:, None, :], float("-inf"))
            logits = _corrected(torch.cat([pos, neg], 2) / self.temperature, shift_pos, shift_neg)
            log_p = (logits[..., 0] - torch.logsumexp(logits, dim=2)).masked_fill(~mask, float("-inf"))
            active = mask.sum(1).clamp(min=1).to(log_p.dtype)
            loss = -(torch.logsumexp(log_p, dim=1) - torch.log(active)).mean()
        elif self.readout_kind == "max":
            # The softmax of the score the max merge serves: every interest is scored on every
            # candidate, so an interest that ranks a negative high is pushed down too.
            pos = (v * target_emb[:, None, :]).sum(-1).masked_fill(~mask, float("-inf")).amax(1, keepdim=True)
            neg = torch.einsum("bkd,nd->bkn", v, items[negatives]).masked_fill(~mask[:, :, None], float("-inf"))
            neg = neg.amax(1).masked_fill(is_target, float("-inf"))
            logits = _corrected(torch.cat([pos, neg], 1) / self.temperature, shift_pos, shift_neg)
            loss = torch.nn.functional.cross_entropy(
                logits, torch.zeros(len(targets), dtype=torch.long, device=logits.device)
            )
        else:
            user = self.readout(v, mask, target_emb)
            pos = (user * target_emb).sum(-1, keepdim=True)
            neg = (user @ items[negatives].t()).masked_fill(is_target, float("-inf"))
            logits = _corrected(torch.cat([pos, neg], 1) / self.temperature, shift_pos, shift_neg)
            loss = torch.nn.functional.cross_entropy(
                logits, torch.zeros(len(targets), dtype=torch.long, device=logits.device)
            )
        if rr > 0:
            behaviour_mask = torch.arange(routing.shape[-1], device=lengths.device)[None, :] < lengths[:, None]
            loss = loss + rr * routing_regularisation(routing, behaviour_mask, mask, self.embedding_dim).mean()
        if self.prior_weight > 0 and self.item_prior is not None:
            diff = (items - self.item_prior)[self.item_prior_mask]
            loss = loss + self.prior_weight * (diff * diff).sum(-1).mean()
        if decorrelation > 0 and v.shape[1] > 1:
            unit = torch.nn.functional.normalize(v, dim=-1)
            pairs = mask[:, :, None] & mask[:, None, :] & ~torch.eye(v.shape[1], dtype=torch.bool, device=v.device)
            n_pairs = pairs.sum((1, 2))
            cos2 = ((unit @ unit.transpose(1, 2)).pow(2) * pairs).sum((1, 2))
            has_pairs = n_pairs > 0
            if has_pairs.any():
                loss = loss + decorrelation * (cos2[has_pairs] / n_pairs[has_pairs]).mean()
        return loss

    def _hard_negative_loss(
        self, v: Tensor, mask: Tensor, target_emb: Tensor, neg_emb: Tensor, valid: Tensor, beta: float
    ) -> Tensor:
        """The readout's loss with REMI's IHN denominator (:func:`hard_negative_log_partition`):
        ``log(e^pos + sum_n w_n e^neg_n) - pos`` per sample; ``valid [B, N]``."""
        tau = self.temperature
        if self.readout_kind == "mixture":  # each interest's softmax with its own hard negatives
            pos = (v * target_emb[:, None, :]).sum(-1) / tau  # [B, K]
            neg = torch.einsum("bkd,nd->bkn", v, neg_emb) / tau
            log_z = torch.logaddexp(pos, hard_negative_log_partition(neg, valid[:, None, :], beta))
            log_p = (pos - log_z).masked_fill(~mask, float("-inf"))
            active = mask.sum(1).clamp(min=1).to(log_p.dtype)
            return -(torch.logsumexp(log_p, dim=1) - torch.log(active)).mean()
        if self.readout_kind == "max":  # hardness of the served (max) score
            pos = (v * target_emb[:, None, :]).sum(-1).masked_fill(~mask, float("-inf")).amax(1) / tau
            neg = torch.einsum("bkd,nd->bkn", v, neg_emb).masked_fill(~mask[:, :, None], float("-inf")).amax(1) / tau
        else:  # hardness under the routed interest (MIND: the label-aware attention's vector)
            user = self.readout(v, mask, target_emb)
            pos = (user * target_emb).sum(-1) / tau
            neg = (user @ neg_emb.t()) / tau
        log_z = torch.logaddexp(pos, hard_negative_log_partition(neg, valid, beta))
        return (log_z - pos).mean()

    # ------------------------------------------------------------------ KG-aware initialisation
    @torch.no_grad()
    def set_item_prior(
        self, vectors: Tensor | np.ndarray, present: Tensor | np.ndarray, reg_weight: float = 0.0,
        rescale: bool = True,
    ) -> int:
        """Initialise item embeddings from given vectors (e.g. LightGCN/KGAT item embeddings).

        Rows where ``present`` is True are copied into the item embedding table (others keep their
        random init). With ``rescale`` the vectors are scaled by one factor so that their RMS equals
        the RMS of the current random init (keeps the softmax temperature meaningful). With
        ``reg_weight > 0`` the loss also gets ``reg_weight * mean_i ||e_i - prior_i||^2`` over the
        present items (L2 pull toward the prior). Returns the number of items initialised.
        """
        vectors = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        present = torch.as_tensor(np.asarray(present), dtype=torch.bool)
        weight = self.item_embedding.weight
        if vectors.shape != weight.shape or present.shape != (weight.shape[0],):
            raise ValueError(
                f"prior must be [I, d] = {tuple(weight.shape)} with a [I] mask, got "
                f"{tuple(vectors.shape)} / {tuple(present.shape)}"
            )
        vectors = vectors.to(weight.device)
        present = present.to(weight.device)
        if rescale and present.any():
            scale = weight.pow(2).mean().sqrt() / vectors[present].pow(2).mean().sqrt().clamp(min=1e-12)
            vectors = vectors * scale
        weight[present] = vectors[present]
        self.prior_weight = float(reg_weight)
        self.item_prior = vectors if reg_weight > 0 else None
        self.item_prior_mask = present if reg_weight > 0 else None
        return int(present.sum())

    # ------------------------------------------------------------------ convenience for serving
    @torch.no_grad()
    def interests_for(self, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Interests of one time-ordered ``item_idx`` history: ``(V [K, d] float32, mask [K] bool)``."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.buffers(), next(self.parameters(), torch.empty(0))).device
            h, n = pad_histories([history], self.max_length, device)
            v, m = self.interests(h, n)
        finally:
            self.train(was_training)
        return v[0].float().cpu().numpy(), m[0].cpu().numpy()

    def extra_repr(self) -> str:
        return (
            f"num_items={self.num_items}, embedding_dim={self.embedding_dim}, "
            f"num_interests={self.num_interests}, max_length={self.max_length}"
        )


@torch.no_grad()
def recommend(
    model: MultiInterestModel,
    histories: Sequence[Sequence[int]],
    k: int,
    *,
    rule: MergeRule | None = None,
    exclude: Sequence[Sequence[int]] | None = None,
    batch_size: int = 1024,
    categories: np.ndarray | None = None,
    diversity: float | None = None,
) -> MergedCandidates:
    """Top-``k`` candidates for time-ordered ``item_idx`` histories -- the evaluation AND serving path.

    Interests come from the last ``model.max_length`` items; every interest is searched exactly
    (:func:`kgrec.models.merge.search_interests`, ``k`` per interest after masking -- more for the
    ``"controllable"`` rule's pool) and the lists are merged with ``rule`` (default
    ``model.merge_rule``) by :func:`kgrec.models.merge.merge_interest_results`. ``exclude``
    defaults to the FULL histories (every history item is masked, not only the last
    ``max_length``). ``categories`` (``[I, G]`` bool) and ``diversity`` (default
    ``model.diversity_weight``) feed the ``"controllable"`` rule.
    """
    rule = rule or model.merge_rule
    per_interest = pool_per_interest(k, rule)
    exclude = histories if exclude is None else exclude
    was_training = model.training
    model.eval()
    try:
        item_emb = model.item_embeddings().float().cpu().numpy()
        device = model.item_embeddings().device
        parts = []
        for start in range(0, len(histories), batch_size):
            chunk = histories[start : start + batch_size]
            excl = exclude[start : start + batch_size]
            h, n = pad_histories(chunk, model.max_length, device)
            v, mask = model.interests(h, n)
            v_np, mask_np = v.float().cpu().numpy(), mask.cpu().numpy()
            ids, scores = search_interests(v_np, item_emb, per_interest, exclude=excl, interest_mask=mask_np)
            parts.append(
                merge_for_model(
                    model, h, n, v, mask, ids, scores, k, rule, excl, item_emb,
                    categories=categories, diversity=diversity,
                )
            )
    finally:
        model.train(was_training)
    if not parts:
        empty = np.zeros((0, k))
        return MergedCandidates(empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.int64))
    return MergedCandidates(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("items", "scores", "interest")))


def merge_for_model(
    model: MultiInterestModel,
    histories: Tensor,
    lengths: Tensor,
    interests: Tensor,
    mask: Tensor,
    ids: np.ndarray,
    scores: np.ndarray,
    k: int,
    rule: MergeRule,
    exclude: Sequence[Sequence[int]],
    item_embeddings: np.ndarray,
    weights: np.ndarray | None = None,
    categories: np.ndarray | None = None,
    diversity: float | None = None,
) -> MergedCandidates:
    """Merge searched per-interest lists ``ids/scores [B, K, n]`` with ``rule``, feeding the rule
    what the model says about its interests (round-robin weights, or mixture log-weights and the
    exact re-scoring of the union for ``"mixture"``). Shared by :func:`recommend` and the service.
    ``weights [B, K]``: round-robin weights the caller already has (default: the model's).
    ``"controllable"`` needs ``categories``; ``diversity`` defaults to ``model.diversity_weight``."""
    v_np, mask_np = interests.float().cpu().numpy(), mask.cpu().numpy()
    if rule == "controllable":  # merge_interest_results rejects a missing ``categories``
        return merge_interest_results(
            ids, scores, k, exclude=exclude, interest_mask=mask_np, rule=rule, categories=categories,
            diversity=model.diversity_weight if diversity is None else diversity,
        )
    if rule == "mixture":
        ids, scores = score_union(ids, v_np, item_embeddings)
        log_weights = model.mixture_log_weights(interests, mask).double().cpu().numpy()
        return merge_interest_results(
            ids, scores, k, exclude=exclude, interest_mask=mask_np, rule=rule,
            log_weights=log_weights, temperature=model.temperature,
        )
    if weights is None:
        weights = model.interest_weights(histories, lengths, mask).double().cpu().numpy()
    return merge_interest_results(ids, scores, k, exclude=exclude, interest_mask=mask_np, weights=weights, rule=rule)


def save_model(model: MultiInterestModel, directory: str | Path) -> Path:
    """Write ``model.json`` (class, hyper-parameters, merge rule, diversity weight) and ``model.pt``
    (state dict, buffers included) into ``directory`` with :func:`kgrec.models.persistence.save_module`;
    :func:`load_model` restores it."""

    name = type(model).__name__
    if MODEL_CLASSES.get(name) is not type(model):
        raise ValueError(f"{name} is not a loadable multi-interest model ({sorted(MODEL_CLASSES)})")
    meta = {"merge_rule": model.merge_rule, "diversity_weight": model.diversity_weight}
    return save_module(model, directory, model.hparams, name="model", meta=meta)


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> MultiInterestModel:
    """Rebuild a model written by :func:`save_model` (in eval mode). Directories written before
    :mod:`kgrec.models.persistence` (``model.json`` + a bare state dict in ``state.pt``) still load;
    either way the weights are read with ``torch.load(..., weights_only=True)``."""

    directory = Path(directory)
    if (directory / "model.pt").is_file():
        tensors, meta = load_state(directory, "model", map_location)
        state = tensors["state_dict"]
    else:  # legacy layout
        meta = json.loads((directory / "model.json").read_text(encoding="utf-8"))
        state = load_tensors(directory / "state.pt", map_location)
    model_specs()  # imports every model file, so every class is known
    if meta["class"] not in MODEL_CLASSES:
        raise ValueError(f"unknown multi-interest model class {meta['class']!r} ({sorted(MODEL_CLASSES)})")
    model = MODEL_CLASSES[meta["class"]](**meta["hparams"])
    model.load_state_dict(state)
    model.merge_rule = meta.get("merge_rule", model.merge_rule)
    model.diversity_weight = float(meta.get("diversity_weight", 0.0))
    return model.eval()


def init_normal_(weight: Tensor, dim: int) -> None:
    """``N(0, 1/d)`` init of an embedding table (unit expected squared norm per row)."""
    torch.nn.init.normal_(weight, std=1.0 / math.sqrt(dim))
