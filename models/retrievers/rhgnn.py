"""R-HGNN: relation-aware node representations over the collaborative knowledge graph."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from kgrec.features.graph import CollaborativeKG
from kgrec.models.base import Recommender
from kgrec.models.layers.relational_adjacency import RelationalAdjacency
from kgrec.models.retrievers.kgat import interaction_ckg
from kgrec.models.retrievers.rgcn import RELATIONAL_DEFAULTS, RELATIONAL_SEARCH_SPACE, CKGNodeReadout
from kgrec.models.spec import ModelSpec, register
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch_geometric.utils import softmax

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig


def _weighted_sum(adjacency: RelationalAdjacency, edge_weight: Tensor, x: Tensor) -> Tensor:
    """``out[i] = sum_e w_e x[j_e]`` over the edges ``e = (j_e -> i)`` of a one-relation
    ``adjacency`` over ``x``'s rows (``edge_weight`` in its edge order)."""
    messages = x[adjacency.pair_source].unsqueeze(1)  # [P, 1, d]: each distinct source once
    return adjacency.weighted_aggregate(edge_weight.unsqueeze(1), messages).squeeze(1)


class RHGNN(CKGNodeReadout, Recommender):
    r"""R-HGNN from `"Heterogeneous Graph Representation Learning with Relation Awareness"
    <https://arxiv.org/abs/2105.11122>`_ (Yu et al., IEEE TKDE 2022) as a retriever over the
    collaborative KG (users, items, entities; interact / rev_interact and every KG relation with
    its inverse, from the training interactions only).

    A node :math:`t` has one representation :math:`\mathbf{h}^{r}_t` per relation :math:`r` it is
    the target of (a *slot*; the CKG gives every relation its inverse :math:`\bar r`, so a source
    :math:`s` of an :math:`r`-edge :math:`s \to t` has the slot :math:`\mathbf{h}^{\bar r}_s`),
    all starting from the node's embedding, and every relation a representation
    :math:`\boldsymbol{\rho}_r`. Layer :math:`l` has three steps:

    * **relation-specific convolution** (Eq. 2-4), attention over :math:`t`'s :math:`r`-neighbours
      driven by the relation's representation, with a residual:

      .. math:: \mathbf{c}^{r}_t = \mathbf{h}^{r,(l-1)}_t + \sum_{s \in \mathcal{N}^r_t}
          \alpha^r_{ts}\, \mathbf{W}^{(l)} \mathbf{h}^{\bar r,(l-1)}_s, \qquad
          \alpha^r_{ts} = \operatorname{softmax}_{s}\Big(\mathrm{LeakyReLU}\big(
          (\mathbf{A}^{(l)} \boldsymbol{\rho}^{(l-1)}_r)^\top
          [\mathbf{W}^{(l)} \mathbf{h}^{r,(l-1)}_t \,\|\, \mathbf{W}^{(l)} \mathbf{h}^{\bar r,(l-1)}_s]\big)\Big)

    * **cross-relation message passing** (Eq. 5-6): each slot of :math:`t` attends over all of
      :math:`t`'s slots, with a query per target relation,

      .. math:: \mathbf{h}^{r,(l)}_t = \sigma\Big(\sum_{r' \in \mathcal{R}_t} \beta^{r}_{t r'}
          \mathbf{c}^{r'}_t\Big), \qquad \beta^{r}_{t r'} = \operatorname{softmax}_{r'}
          \big(\mathrm{LeakyReLU}(\mathbf{q}^{(l)\top}_r \mathbf{c}^{r'}_t)\big)

    * **relation representation learning** (Eq. 7): :math:`\boldsymbol{\rho}^{(l)}_r =
      \mathbf{W}^{(l)}_\rho \boldsymbol{\rho}^{(l-1)}_r`.

    **Semantic fusion** (Eq. 8-9) then combines a node's slots with relation-aware weights:

    .. math:: \mathbf{z}_t = \sum_{r \in \mathcal{R}_t} \gamma_{tr}\, \mathbf{W}_f \mathbf{h}^{r,(L)}_t,
        \qquad \gamma_{tr} = \operatorname{softmax}_{r}\big((\mathbf{W}_f \mathbf{h}^{r,(L)}_t)^\top
        \mathbf{U} \boldsymbol{\rho}^{(L)}_r / \sqrt{d}\big)

    and a node's representation is the mean of its embedding and :math:`\mathbf{z}_t` (a node that
    is no relation's target keeps its embedding); :math:`\gamma` is the relation-level attention
    that :meth:`relation_attention` exposes. Scores are :math:`\mathbf{h}_u^\top \mathbf{h}_i` with
    BPR plus :math:`\lambda \|\cdot\|^2` of the batch's embeddings (:class:`CKGNodeReadout`).

    Departures from the paper, for a KG with many relations: slots exist only where a node has an
    in-edge of that relation (sparse, at most one per edge), one attention head, and one
    transformation :math:`\mathbf{W}^{(l)}` shared by all node types (the CKG has no node features
    to tell types apart). Everything is vectorised over edges, slots and slot pairs: each slot is
    transformed once, the attention logits split into per-slot terms, the softmaxes are segment
    reductions and both weighted sums are CSR matmuls over the slot graphs
    (:class:`~kgrec.models.layers.relational_adjacency.RelationalAdjacency`); no per-relation loop.
    On ``ml-100k`` (70k slots, 341k edges, 583k slot pairs) a training step at batch 4,096 takes
    about 0.4 s on one thread, against 4.2 s with per-edge gathers.

    Args:
        num_users, num_items: sizes of the user and item index spaces (the first CKG nodes).
        ckg: the collaborative KG (every relation with its inverse, ids ``2k`` / ``2k + 1``).
        embedding_dim: node, slot and relation representation width :math:`d`.
        num_layers: R-HGNN layers :math:`L`.
        dropout: dropout on each layer's slot representations (training only).
        negative_slope: of the attention LeakyReLUs.
        reg_weight: :math:`\lambda` of the L2 term.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        ckg: CollaborativeKG,
        embedding_dim: int = 64,
        num_layers: int = 1,
        dropout: float = 0.1,
        negative_slope: float = 0.2,
        reg_weight: float = 1e-3,
    ) -> None:
        super().__init__(num_users, num_items)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_nodes, self.num_relations = ckg.num_nodes, ckg.num_relations
        self.embedding_dim, self.num_layers = embedding_dim, num_layers
        self.dropout, self.negative_slope, self.reg_weight = dropout, negative_slope, reg_weight
        self.layer_combination = "mean"  # of the embedding and the fused representation

        self.node_embedding = torch.nn.Embedding(self.num_nodes, embedding_dim)
        self.relation_embedding = torch.nn.Parameter(torch.empty(self.num_relations, embedding_dim))
        d = embedding_dim
        self.weight = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(d, d)) for _ in range(num_layers))
        self.neighbour_attention = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(d, 2 * d)) for _ in range(num_layers))
        self.crossing = torch.nn.ParameterList(
            torch.nn.Parameter(torch.empty(self.num_relations, d)) for _ in range(num_layers)
        )
        self.relation_weight = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(d, d)) for _ in range(num_layers))
        self.fusion = torch.nn.Parameter(torch.empty(d, d))
        self.fusion_relation = torch.nn.Parameter(torch.empty(d, d))
        self._index(ckg)
        self.reset_parameters()

    def _index(self, ckg: CollaborativeKG) -> None:
        """Slots, each edge's source and target slot, and the slot pairs of cross-relation
        attention: derived from the graph, non-persistent buffers (moved by ``.to()``, not saved)."""
        source, target = ckg.edge_index.to("cpu", torch.int64)
        relation = ckg.edge_type.to("cpu", torch.int64)
        r_count = self.num_relations
        if relation.numel() and bool(((relation ^ 1) >= r_count).any()):
            raise ValueError("every CKG relation needs its inverse (ids 2k / 2k + 1)")
        # Slots: distinct (target node, relation), sorted by node then relation.
        keys, edge_slot = torch.unique(target * r_count + relation, return_inverse=True)
        source_keys = source * r_count + (relation ^ 1)
        source_slot = torch.searchsorted(keys, source_keys).clamp(max=keys.numel() - 1)
        if not bool((keys[source_slot] == source_keys).all()):  # a key past the end lands on the last
            raise ValueError("an edge's source has no slot for the inverse relation: the CKG lacks an inverse edge")
        slot_node, slot_relation = keys // r_count, keys % r_count
        num_slots = keys.numel()
        # Cross-relation pairs (b -> a): slots of the same node, a attending over every b.
        per_node = torch.bincount(slot_node, minlength=self.num_nodes)
        node_ptr = torch.cat([per_node.new_zeros(1), per_node.cumsum(0)])
        fan = per_node[slot_node]
        pair_query = torch.repeat_interleave(torch.arange(num_slots), fan)
        start = torch.repeat_interleave(fan.cumsum(0) - fan, fan)
        pair_key = node_ptr[slot_node[pair_query]] + torch.arange(pair_query.numel()) - start
        # Both message passes as slot graphs grouped once (target-sorted CSR): weighted sums are
        # then one CSR matmul with an SDDMM backward, not [E, d] gathers (RelationalAdjacency).
        self.messages = RelationalAdjacency(
            torch.stack([source_slot, edge_slot]), torch.zeros_like(edge_slot), num_slots, 1, aggr=None
        )
        self.cross = RelationalAdjacency(
            torch.stack([pair_key, pair_query]), torch.zeros_like(pair_query), num_slots, 1, aggr=None
        )
        edge_slot = self.messages.edge_target  # the edges in the adjacency's (target-sorted) order
        for name, value in (
            ("edge_slot", edge_slot),
            ("edge_source_slot", self.messages.pair_source[self.messages.edge_pair]),
            ("edge_relation", slot_relation[edge_slot]),
            ("slot_node", slot_node), ("slot_relation", slot_relation),
            ("has_slot", per_node > 0),
            ("pair_query", self.cross.edge_target), ("pair_key", self.cross.pair_source[self.cross.edge_pair]),
        ):
            self.register_buffer(name, value, persistent=False)

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_normal_(self.node_embedding.weight)
        torch.nn.init.xavier_uniform_(self.relation_embedding)
        for group in (self.weight, self.neighbour_attention, self.crossing, self.relation_weight):
            for p in group:
                torch.nn.init.xavier_uniform_(p)
        torch.nn.init.xavier_uniform_(self.fusion)
        torch.nn.init.xavier_uniform_(self.fusion_relation)

    @property
    def num_slots(self) -> int:
        return self.slot_node.numel()

    def _layers(self, dropout: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Slot representations ``[S, d]``, relation representations ``[R, d]`` after the layers,
        and the last layer's neighbour attention :math:`\alpha` ``[E]``."""
        h = self.node_embedding.weight[self.slot_node]
        rho = self.relation_embedding
        num_slots = self.num_slots
        for k in range(self.num_layers):
            hw = h @ self.weight[k]  # [S, d]: each slot transformed once, not once per edge
            # The attention logit splits into a target and a source term, and each depends on one
            # slot only (a slot fixes its relation; an edge's relation is its source slot's inverse).
            att = rho @ self.neighbour_attention[k]  # [R, 2d]
            d = self.embedding_dim
            target_term = (hw * att[self.slot_relation, :d]).sum(-1)
            source_term = (hw * att[self.slot_relation ^ 1, d:]).sum(-1)
            score = F.leaky_relu(target_term[self.edge_slot] + source_term[self.edge_source_slot], self.negative_slope)
            alpha = softmax(score, self.edge_slot, self.messages.target_ptr, num_nodes=num_slots)
            c = h + _weighted_sum(self.messages, alpha, hw)  # residual + messages
            # cross-relation message passing: slot a's relation queries every slot b of its node
            query_scores = c @ self.crossing[k].t()  # [S, R]: every slot against every relation's query
            beta = softmax(
                F.leaky_relu(query_scores[self.pair_key, self.slot_relation[self.pair_query]], self.negative_slope),
                self.pair_query, self.cross.target_ptr, num_nodes=num_slots,
            )
            h = _weighted_sum(self.cross, beta, c)
            if k < self.num_layers - 1:
                h = F.elu(h)
            h = F.dropout(h, p=self.dropout, training=dropout)
            rho = rho @ self.relation_weight[k]
        return h, rho, alpha

    def _fuse(self, h: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
        """(fused node representations ``[N, d]``, relation-level weights :math:`\\gamma` ``[S]``)."""
        projected = h @ self.fusion
        keys = (rho @ self.fusion_relation)[self.slot_relation]
        gamma = softmax((projected * keys).sum(-1) / math.sqrt(self.embedding_dim), self.slot_node,
                        num_nodes=self.num_nodes)
        fused = projected.new_zeros(self.num_nodes, self.embedding_dim)
        return fused.index_add(0, self.slot_node, gamma.unsqueeze(-1) * projected), gamma

    def propagate_all(self, dropout: bool = False) -> Tensor:
        """Mean of each node's embedding and its fused relation-aware representation ``[N, d]``."""
        x = self.node_embedding.weight
        h, rho, _ = self._layers(dropout)
        fused, _ = self._fuse(h, rho)
        return torch.where(self.has_slot[:, None], (x + fused) / 2, x)

    @torch.no_grad()
    def relation_attention(self, nodes: Tensor) -> list[dict[int, float]]:
        """The semantic-fusion weights :math:`\\gamma_{tr}` of each of ``nodes`` (CKG node ids):
        relation id -> weight, summing to 1 per node with any slot (empty for none)."""
        h, rho, _ = self._layers(dropout=False)
        _, gamma = self._fuse(h, rho)
        out: list[dict[int, float]] = []
        for node in nodes.tolist():
            mine = (self.slot_node == node).nonzero().flatten()
            out.append({int(self.slot_relation[s]): float(gamma[s]) for s in mine})
        return out

    @property
    def edge_index(self) -> Tensor:
        """``[2, E]`` (receiver, neighbour) of every edge, the orientation of KGAT's attention
        (head :math:`h` aggregates from tail :math:`t`), for :mod:`kgrec.models.explain`."""
        return torch.stack([self.slot_node[self.edge_slot], self.slot_node[self.edge_source_slot]])

    @property
    def edge_type(self) -> Tensor:
        """The relation of each :attr:`edge_index` edge read from its head (receiver): the inverse
        of the relation the message travels along (``interact`` for a user hearing from an item)."""
        return self.edge_relation ^ 1

    @torch.no_grad()
    def attention(self) -> Tensor:
        """Per edge of :attr:`edge_index`: the last layer's neighbour attention
        :math:`\alpha^r_{ts}` times the relation-level fusion weight :math:`\gamma_{tr}` of the
        receiver's slot, i.e. the share of the receiver's fused representation that flows from
        that neighbour through that relation; a receiver's weights sum to one. With it the service
        explains a candidate by its highest-weighted user -> item paths, as for KGAT."""
        h, rho, alpha = self._layers(dropout=False)
        _, gamma = self._fuse(h, rho)
        return (alpha * gamma[self.edge_slot]).detach().clone()

    def extra_repr(self) -> str:
        return (
            f"num_nodes={self.num_nodes}, num_relations={self.num_relations}, "
            f"num_edges={self.edge_slot.numel()}, num_slots={self.num_slots}, "
            f"num_slot_pairs={self.pair_query.numel()}, embedding_dim={self.embedding_dim}, "
            f"num_layers={self.num_layers}"
        )


class RHGNNParams(BaseModel):
    """R-HGNN hyper-parameters (``TrainConfig.params`` when ``model="rhgnn"``); the depth is the
    shared ``num_layers``, ``embedding_dim`` the width of nodes, slots and relations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    negative_slope: float = Field(0.2, ge=0.0, lt=1.0)


def build_rhgnn(config: TrainConfig, data: InteractionData) -> RHGNN:
    params = RHGNNParams.model_validate(config.params)
    return RHGNN(
        data.num_users,
        data.num_items,
        interaction_ckg(data),
        embedding_dim=config.embedding_dim,
        num_layers=config.num_layers,
        dropout=params.dropout,
        negative_slope=params.negative_slope,
        reg_weight=config.reg_weight,
    )


SPEC = register(
    ModelSpec(
        name="rhgnn",
        family="retriever",
        build=build_rhgnn,
        needs_kg=True,
        summary="R-HGNN: relation-aware node representations, cross-relation attention, semantic fusion "
        "(Yu et al., TKDE 2022)",
        params=RHGNNParams,
        # R-GCN's and HGT's: full-graph propagation per batch, 1 layer (not yet tuned for R-HGNN)
        defaults=RELATIONAL_DEFAULTS,
        search_space=RELATIONAL_SEARCH_SPACE,
    )
)
