r"""KCAN's knowledge distillation: target-specific subgraphs of the top-attention neighbours.

Pure tensor operations, no Python loop over nodes, users or pairs:

* :func:`topk_neighbour_table` -- once per attention update: sort the CKG edges by
  ``(head, -attention, edge position)`` (two stable sorts), rank every edge inside its head's
  row and scatter the first ``k`` of each row into a dense ``[N, k]`` table (padded, with a mask).
* :func:`gather_subgraph` -- for a batch of roots ``[B]`` follow the table hop by hop with tensor
  indexing: hop ``h`` holds ``k**h`` slots per root, slot ``j`` of hop ``h`` is a child of slot
  ``j // k`` of hop ``h - 1`` (of the root for ``h = 1``). Optionally drops the target edge
  (``(u -> i)`` and ``(i -> u)``): at hop 1 the slot is refilled from the row's reserve (a table
  wider than the cap), deeper it is only masked, so that a training positive looks like a candidate at serving
  time (its own interaction edge is not in its subgraph).

A neighbour is an *edge* ``(h, r, t)``: a node linked to ``h`` by two relations can take two
slots (one per relation), as KGAT's attention is per edge.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class NeighbourTable(NamedTuple):
    """Per node, its kept out-neighbours by decreasing attention (``[N, W]`` each)."""

    node: Tensor  # LongTensor, tail node id (0 where padded)
    relation: Tensor  # LongTensor, CKG relation id of the edge (0 where padded)
    weight: Tensor  # float, the edge's attention (0 where padded)
    mask: Tensor  # bool, True where a real edge sits

    @property
    def width(self) -> int:
        return int(self.node.size(1))


class Hop(NamedTuple):
    """The slots of one hop for a batch of roots: ``[B, k**h]`` each; the parent of slot ``j`` is
    slot ``j // k`` of the previous hop. ``slot`` indexes the flattened table (``node * W + col``),
    so any per-slot tensor precomputed as ``[N * W, ...]`` is gathered with it."""

    slot: Tensor
    node: Tensor
    relation: Tensor
    weight: Tensor
    mask: Tensor


def topk_neighbour_table(
    head: Tensor,
    tail: Tensor,
    score: Tensor,
    num_nodes: int,
    k: int,
    relation: Tensor | None = None,
) -> NeighbourTable:
    """The ``k`` out-edges of highest ``score`` of every node (ties: earlier edge first).

    Args:
        head, tail: ``[E]`` node ids of the edges.
        score: ``[E]`` attention (any monotone transform of it gives the same table).
        num_nodes: ``N``.
        k: table width (kept neighbours per node, at most).
        relation: ``[E]`` relation ids (zeros when ``None``).
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    head = head.to(torch.int64)
    tail = tail.to(torch.int64)
    device = head.device
    num_edges = head.numel()
    if relation is None:
        relation = torch.zeros_like(head)
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(head[order], stable=True)]  # by head, then -score, then position
    h_sorted = head[order]
    counts = torch.bincount(head, minlength=num_nodes)
    row_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_edges, device=device) - row_start[h_sorted]
    keep = rank < k
    rows, cols, edges = h_sorted[keep], rank[keep], order[keep]
    node = torch.zeros(num_nodes, k, dtype=torch.int64, device=device)
    rel = torch.zeros(num_nodes, k, dtype=torch.int64, device=device)
    weight = torch.zeros(num_nodes, k, dtype=score.dtype, device=device)
    mask = torch.zeros(num_nodes, k, dtype=torch.bool, device=device)
    node[rows, cols] = tail[edges]
    rel[rows, cols] = relation[edges].to(torch.int64)
    weight[rows, cols] = score[edges]
    mask[rows, cols] = True
    return NeighbourTable(node, rel, weight, mask)


def gather_subgraph(
    table: NeighbourTable,
    roots: Tensor,
    hops: int,
    k: int | None = None,
    exclude: tuple[Tensor, Tensor] | None = None,
) -> list[Hop]:
    """The ``hops`` hops of the subgraph of every root ``[B]``: ``[Hop(...)]`` of ``[B, k**h]``.

    Hop 1 takes the first ``k`` kept columns of the root's row; hop ``h > 1`` the first ``k``
    columns of the row of every hop ``h - 1`` slot (masked where the parent slot is masked).

    Args:
        table: :func:`topk_neighbour_table` output of width ``W >= k``.
        roots: ``[B]`` node ids.
        hops: number of hops ``H >= 1``.
        k: neighbours kept per node (default: the table width).
        exclude: ``(a [B], b [B])``: the edges ``a -> b`` and ``b -> a`` are dropped from root
            ``k``'s subgraph -- the target interaction of a training pair. At hop 1 the dropped
            slot is refilled by the root's next best neighbour (hence a table wider than ``k``);
            at deeper hops an occurrence is only masked.
    """
    width = table.width
    k = width if k is None else int(k)
    if not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}], got {k}")
    if hops < 1:
        raise ValueError(f"hops must be positive, got {hops}")
    batch = roots.numel()
    roots = roots.to(torch.int64).view(batch)
    flat_node, flat_rel = table.node.view(-1), table.relation.view(-1)
    flat_weight, flat_mask = table.weight.view(-1), table.mask.view(-1)
    cols = torch.arange(width, device=roots.device)
    # hop 1: the root's row, target edge removed, first k kept columns
    mask = table.mask[roots]  # [B, W]
    if exclude is not None:
        a, b = (t.to(torch.int64).view(batch, 1) for t in exclude)
        r = roots.view(batch, 1)
        node = table.node[roots]
        mask = mask & ~(((r == a) & (node == b)) | ((r == b) & (node == a)))
    if k < width or exclude is not None:
        col = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :k]
        mask = mask.gather(1, col)
    else:
        col = cols.expand(batch, width)
    slot = roots.view(batch, 1) * width + col
    out = [Hop(slot, flat_node[slot], flat_rel[slot], flat_weight[slot], mask)]
    for _ in range(hops - 1):
        prev = out[-1]
        parents = prev.node.unsqueeze(-1)  # [B, P, 1]
        slot = (parents * width + cols[:k]).reshape(batch, -1)
        node = flat_node[slot]
        mask = (flat_mask[slot].view(batch, -1, k) & prev.mask.unsqueeze(-1)).reshape(batch, -1)
        if exclude is not None:
            p = parents.expand(-1, -1, k).reshape(batch, -1)
            mask = mask & ~(((p == a) & (node == b)) | ((p == b) & (node == a)))
        out.append(Hop(slot, node, flat_rel[slot], flat_weight[slot], mask))
    return out
