"""TransR knowledge-graph embedding: relation-grouped projections, the pairwise loss, tail corruption."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kgrec.models.training.sampling import redraw_rejected
from torch import Tensor


def relation_groups(relation: Tensor, num_relations: int) -> tuple[Tensor, list[int]]:
    """``(order, counts)``: the stable sorting permutation of ``relation`` and the number of rows
    of each relation id (a Python list, as :func:`torch.split` wants it)."""
    order = torch.argsort(relation, stable=True)
    counts = torch.bincount(relation, minlength=num_relations).tolist()
    return order, counts


def grouped_project(x_sorted: Tensor, counts: list[int], weight: Tensor) -> Tensor:
    r"""Relation projection of rows already grouped by relation: ``x_sorted [B, ..., d]`` holds
    ``counts[r]`` consecutive rows of relation ``r`` (in relation order); row ``k`` of relation
    ``r`` becomes ``x_sorted[k] @ weight[r]`` (``weight [R, d, k]``), shape ``[B, ..., k]``.

    One dense matmul per relation present -- a loop over the (at most a few hundred) relations,
    never over rows -- instead of gathering a ``d × k`` matrix per row for ``torch.bmm``, which
    moves ``B·d·k`` floats forward and again in the backward scatter. Differentiable in ``x`` and
    ``weight``; extra middle dimensions (e.g. ``[B, 2, d]`` for a head and a tail) share the
    relation of their row.
    """
    if x_sorted.size(0) == 0:
        return x_sorted.new_zeros(*x_sorted.shape[:-1], weight.size(2))
    chunks = torch.split(x_sorted, counts)
    # unbind, not weight[r]: its backward stacks the per-relation gradients into one tensor,
    # where R separate selects would each materialise a full [R, d, k] zero gradient.
    weights = weight.unbind(0)
    return torch.cat([chunk @ weights[r] for r, chunk in enumerate(chunks) if counts[r] > 0])


def relation_project(x: Tensor, relation: Tensor, weight: Tensor) -> Tensor:
    r"""Per-row relation projection :math:`\mathbf{W}_{r_k} \mathbf{x}_k` (``x [B, d]``,
    ``relation [B]``, ``weight [R, d, k]``) in the original row order, ``[B, k]``
    (sorts, :func:`grouped_project`, unsorts)."""
    order, counts = relation_groups(relation, weight.size(0))
    out = torch.empty(*x.shape[:-1], weight.size(2), dtype=x.dtype, device=x.device)
    projected = grouped_project(x[order], counts, weight)
    if not projected.requires_grad:
        out[order] = projected
        return out
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return projected[inverse]


def transr_loss(
    head: Tensor,
    pos_tail: Tensor,
    neg_tail: Tensor,
    relation_emb: Tensor,
    relation: Tensor,
    weight: Tensor,
    counts: list[int] | None = None,
) -> Tensor:
    r"""KGAT's pairwise TransR loss (Eq. 2), averaged over the batch:

    .. math:: \mathcal{L}_{KG} = \frac{1}{B} \sum_{(h,r,t,t')} -\ln \sigma\big(g(h,r,t') - g(h,r,t)\big).

    The positive and the corrupted triple share the relation, so both differences are projected
    in one grouped pass. The mean does not depend on the row order, so the rows are sorted by
    relation rather than the projections unsorted; pass ``counts`` (rows per relation) when the
    batch is already sorted by relation (cheapest: sort the ids before the embedding lookup).
    Regularisation is left to the caller.
    """
    if counts is None:
        order, counts = relation_groups(relation, weight.size(0))
        head, pos_tail, neg_tail = head[order], pos_tail[order], neg_tail[order]
        relation_emb = relation_emb[order]
    diff = torch.stack([head - pos_tail, head - neg_tail], dim=1)  # [B, 2, d]
    proj = grouped_project(diff, counts, weight) + relation_emb.unsqueeze(1)
    dist = proj.pow(2).sum(-1)  # [B, 2]
    return -F.logsigmoid(dist[:, 1] - dist[:, 0]).mean()


class TailCorruptor:
    r"""Vectorised uniform tail corruption :math:`(h, r, t) \to (h, r, t')` with rejection of true
    triples.

    Each relation draws its corrupted tails uniformly from a node range ``[low[r], high[r])``
    (e.g. the items and entities for KG relations, the users for ``rev_interact``); candidates that
    form a known triple are redrawn in a few vectorised rounds (test: one ``searchsorted`` over the
    sorted keys ``(h·R + r)·N + t``), as in KGAT's sampler, which never returns a true tail.

    Args:
        triples: ``[3, T]`` LongTensor of ``(head, relation, tail)`` node / relation ids.
        num_nodes: size ``N`` of the node id space.
        num_relations: number ``R`` of relation ids.
        low, high: ``[R]`` LongTensors, the node range of each relation's corrupted tails.
        max_rounds: rejection rounds; an entry still colliding afterwards is kept.
    """

    def __init__(
        self,
        triples: Tensor,
        num_nodes: int,
        num_relations: int,
        low: Tensor,
        high: Tensor,
        max_rounds: int = 10,
    ) -> None:
        self.num_nodes, self.num_relations = int(num_nodes), int(num_relations)
        h, r, t = triples.to(torch.int64).cpu()
        self.keys = torch.unique(self._key(h, r, t))  # sorted
        self.low, self.high = low.to(torch.int64).cpu(), high.to(torch.int64).cpu()
        self.max_rounds = max_rounds

    def _key(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return (h * self.num_relations + r) * self.num_nodes + t

    def _draw(self, r: Tensor, generator: torch.Generator | None) -> Tensor:
        low, span = self.low[r], (self.high[r] - self.low[r]).clamp(min=1)
        u = torch.rand(r.shape, generator=generator, dtype=torch.float64)
        return low + (u * span).to(torch.int64).clamp(max=span - 1)

    def is_true(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """Boolean mask: is ``(h[k], r[k], t[k])`` a known triple?"""
        if self.keys.numel() == 0:
            return torch.zeros_like(h, dtype=torch.bool)
        keys = self._key(h, r, t)
        pos = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        return self.keys[pos] == keys

    def sample(self, h: Tensor, r: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One corrupted tail per ``(h, r)`` (CPU LongTensors)."""
        return redraw_rejected(
            self._draw(r, generator),
            lambda at, tails: self.is_true(h[at], r[at], tails),
            lambda at: self._draw(r[at], generator),
            self.max_rounds,
        )
