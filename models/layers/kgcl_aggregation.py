"""KGCL's relation-aware knowledge aggregation: an item's representation from its KG neighbours."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import softmax


class RelationAwareAggregation(torch.nn.Module):
    r"""Relation-aware knowledge aggregation of `"Knowledge Graph Contrastive Learning for
    Recommendation" <https://arxiv.org/abs/2205.00976>`_ (Yang et al., SIGIR 2022: its
    relation-aware knowledge aggregation, the authors' ``GAT.forward_relation``):

    .. math::
        \mathbf{x}_i' = \mathbf{x}_i + \sum_{(i, r, e) \in \mathcal{N}_i} \alpha(i, r, e)\,
        \mathbf{x}_e, \qquad
        \alpha(i, r, e) = \operatorname{softmax}_{(r, e) \in \mathcal{N}_i}\Big(
        \operatorname{LeakyReLU}\big(\mathbf{e}_r^\top (\mathbf{W}[\mathbf{x}_i \,\|\, \mathbf{x}_e]
        + \mathbf{b})\big)\Big),

    where :math:`\mathcal{N}_i` are the KG edges leaving item :math:`i` (its facts, in both
    directions), :math:`\mathbf{x}_e` the neighbour's embedding and :math:`\mathbf{e}_r` the
    relation's: the attention of a neighbour depends on the relation that links it. As in the
    authors' code (``GAT.forward_relation``) the residual keeps the item's own embedding and the
    attention is softmax-normalised over the item's neighbours; an item without KG edges keeps
    :math:`\mathbf{x}_i`.

    With :math:`\mathbf{W}[\mathbf{x}_i \| \mathbf{x}_e] = \mathbf{W}_1\mathbf{x}_i +
    \mathbf{W}_2\mathbf{x}_e` the logit splits into an item term and a neighbour term, each computed
    for every (node, relation) pair by one matrix product (:meth:`logit_tables`) and gathered as a
    scalar per edge: no ``[E, 2d]`` concatenation, and views of the KG share the tables.

    Args:
        embedding_dim: dimension :math:`d` of item, entity and relation embeddings.
        negative_slope: slope of the LeakyReLU (authors' code: 0.2).
        dropout: dropout on the attention coefficients during training.
    """

    def __init__(self, embedding_dim: int, negative_slope: float = 0.2, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embedding_dim = embedding_dim
        self.negative_slope = negative_slope
        self.dropout = dropout
        self.lin = torch.nn.Linear(2 * embedding_dim, embedding_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.lin.weight)
        torch.nn.init.zeros_(self.lin.bias)

    def logit_tables(self, item_x: Tensor, node_x: Tensor, relation_x: Tensor) -> tuple[Tensor, Tensor]:
        r"""The two terms of every attention logit, for every (node, relation) pair:
        :math:`\mathbf{e}_r^\top(\mathbf{W}_1\mathbf{x}_i + \mathbf{b})` ``[I, R]`` and
        :math:`\mathbf{e}_r^\top\mathbf{W}_2\mathbf{x}_e` ``[N, R]``, as two matrix products with
        :math:`\mathbf{e}_r^\top\mathbf{W}` folded first; an edge then gathers two scalars.
        They depend on the parameters only, so views of one KG (other edge masks) share them."""
        d = self.embedding_dim
        w = self.lin.weight
        folded_item = relation_x @ w[:, :d]  # [R, d]
        folded_node = relation_x @ w[:, d:]  # [R, d]
        item_rel = item_x @ folded_item.t() + relation_x @ self.lin.bias  # [I, R]
        node_rel = node_x @ folded_node.t()  # [N, R]
        return item_rel, node_rel

    def attention(
        self,
        item_x: Tensor,
        node_x: Tensor,
        relation_x: Tensor,
        head: Tensor,
        tail: Tensor,
        relation: Tensor,
        tables: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        r""":math:`\alpha(i, r, e)` of every edge ``[E]`` (softmax over each head item's edges);
        ``tables``: :meth:`logit_tables` when already computed."""
        item_rel, node_rel = self.logit_tables(item_x, node_x, relation_x) if tables is None else tables
        num_relations = relation_x.size(0)
        score = item_rel.reshape(-1).index_select(0, head * num_relations + relation)
        score = score + node_rel.reshape(-1).index_select(0, tail * num_relations + relation)
        return softmax(F.leaky_relu(score, self.negative_slope), head, num_nodes=item_x.size(0))

    def forward(
        self,
        item_x: Tensor,
        node_x: Tensor,
        relation_x: Tensor,
        head: Tensor,
        tail: Tensor,
        relation: Tensor,
        tables: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Knowledge-aware item representations ``[I, d]``.

        Args:
            item_x: item embeddings ``[I, d]`` (the heads).
            node_x: KG node embeddings ``[N, d]`` (items first, then entities: the KG node space).
            relation_x: relation embeddings ``[R, d]``.
            head: item index of every edge ``[E]``; tail: KG node index ``[E]``; relation: ``[E]``.
            tables: :meth:`logit_tables` of these embeddings, to share between calls.
        """
        if head.numel() == 0:
            return item_x
        alpha = self.attention(item_x, node_x, relation_x, head, tail, relation, tables)
        alpha = F.dropout(alpha, self.dropout, training=self.training)
        messages = node_x.index_select(0, tail) * alpha.unsqueeze(-1)
        return item_x + torch.zeros_like(item_x).index_add_(0, head, messages)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, dropout={self.dropout}"
