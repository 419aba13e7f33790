"""HGT convolution with edges grouped by relation: relation transforms once per (source, type)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from kgrec.models.layers.relational_adjacency import RelationalAdjacency
from torch import Tensor
from torch_geometric.nn import HGTConv
from torch_geometric.typing import EdgeType, Metadata, NodeType
from torch_geometric.utils import softmax


class GroupedHGTConv(HGTConv):
    r"""The Heterogeneous Graph Transformer layer from `"Heterogeneous Graph Transformer"
    <https://arxiv.org/abs/2003.01332>`_ (Hu et al., WWW 2020). For an edge :math:`e = (s, t)` of
    type :math:`\phi(e)` and head :math:`i`, with type-specific projections :math:`K^i, Q^i,
    V^i` of the source and target types:

    .. math::
        \text{ATT-head}^i(s, e, t) &= \big(K^i(s)\, W^{ATT}_{\phi(e)}\, Q^i(t)^\top\big)\,
            \mu_{\phi(e)} / \sqrt{d} \quad \text{(Eq. 3, softmax over } t\text{'s in-edges)}

        \text{MSG-head}^i(s, e, t) &= V^i(s)\, W^{MSG}_{\phi(e)} \quad \text{(Eq. 4)}

        H[t] &= \alpha_{\tau(t)}\, \text{A-Linear}_{\tau(t)}\Big(\text{GELU}\big(
            \textstyle\sum_{s} \text{Attention}(s, e, t) \cdot \text{MSG}(s, e, t)\big)\Big)
            + (1 - \alpha_{\tau(t)})\, H^{(l-1)}[t] \quad \text{(Eq. 5)}

    with :math:`\alpha = \sigma(\text{skip}_{\tau(t)})`. The parameters, initialisation, outputs
    and gradients are those of PyG's :class:`~torch_geometric.nn.conv.HGTConv` (a subclass: its
    state dict loads as is).

    Computed differently: :math:`K^i(s) W^{ATT}_{\phi(e)}` and :math:`V^i(s) W^{MSG}_{\phi(e)}`
    depend only on the pair :math:`(s, \phi(e))`, so each distinct pair is transformed once, one
    batched matmul per edge type over its sources (:class:`RelationalAdjacency`). PyG's version
    transforms every node of the source type once per edge type and, without pyg-lib, through
    :class:`~torch_geometric.nn.dense.HeteroLinear`'s per-type loop of slice assignments. The
    attention of every edge is then one vectorised gather-dot, its softmax a segment reduction
    over the target-sorted edges, the aggregation one ``index_add``.

    Args:
        in_channels: size of every node type's input feature (one size for all types).
        out_channels: size of each output feature.
        metadata: ``(node_types, edge_types)``; an edge type's relation id is its position.
        heads: number of attention heads (must divide ``out_channels``).
    """

    def __init__(self, in_channels: int, out_channels: int, metadata: Metadata, heads: int = 1) -> None:
        super().__init__(in_channels, out_channels, metadata, heads=heads)

    def relation_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``W^ATT`` and ``W^MSG`` as ``[heads, T, d, d]`` and the prior :math:`\\mu` ``[T, heads]``
        (``HeteroLinear`` type id = head * T + edge type, as ``HGTConv`` lays them out)."""
        heads, dim, num_types = self.heads, self.out_channels // self.heads, len(self.edge_types)
        w_att = self.k_rel.weight.view(heads, num_types, dim, dim)
        w_msg = self.v_rel.weight.view(heads, num_types, dim, dim)
        prior = torch.cat([self.p_rel["__".join(edge_type)] for edge_type in self.edge_types])
        return w_att, w_msg, prior

    def forward(  # type: ignore[override]
        self,
        x_dict: dict[NodeType, Tensor],
        edge_index_dict: Mapping[EdgeType, Tensor] | RelationalAdjacency,
    ) -> dict[NodeType, Tensor]:
        """``x_dict`` ``{type: [n, in_channels]}``; ``edge_index_dict`` either PyG's dict (grouped on
        every call) or a :class:`RelationalAdjacency` built once by
        :meth:`RelationalAdjacency.from_hetero` with this layer's edge types. Returns the
        outputs of the node types that are the target of some edge type in the metadata."""
        heads, dim, width = self.heads, self.out_channels // self.heads, self.out_channels
        adjacency = self._adjacency(x_dict, edge_index_dict)
        node_types = list(adjacency.node_slices)
        kqv_dict = self.kqv_lin({t: x_dict[t] for t in node_types})
        kqv = torch.cat([kqv_dict[t] for t in node_types])
        key, query, value = torch.tensor_split(kqv, 3, dim=1)

        w_att, w_msg, prior = self.relation_weights()
        # split/unbind, not slicing: the backward of a slice materialises a zero gradient of the
        # whole tensor per edge type, that of split/unbind one concatenation.
        sizes = adjacency.relation_sizes
        pair_keys = key[adjacency.pair_source].view(-1, heads, dim).split(sizes)
        pair_values = value[adjacency.pair_source].view(-1, heads, dim).split(sizes)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        for k, v, wk, wv in zip(pair_keys, pair_values, w_att.unbind(1), w_msg.unbind(1)):
            if k.size(0) == 0:
                continue
            keys.append(torch.einsum("nhd,hde->nhe", k, wk))
            values.append(torch.einsum("nhd,hde->nhe", v, wv))

        target = adjacency.edge_target
        num_nodes = adjacency.num_nodes
        if keys:
            dot = adjacency.edge_dot(query.reshape(-1, heads, dim), torch.cat(keys))
            score = dot * prior[adjacency.edge_relation] / math.sqrt(dim)
            attention = softmax(score, target, adjacency.target_ptr, num_nodes)
            aggregated = adjacency.weighted_aggregate(attention, torch.cat(values)).view(num_nodes, width)
        else:
            aggregated = kqv.new_zeros(num_nodes, width)

        out_dict: dict[NodeType, Tensor] = {}
        for node_type in node_types:
            if node_type in self.dst_node_types:
                start, count = adjacency.node_slices[node_type]
                out_dict[node_type] = F.gelu(aggregated[start : start + count])
        out_dict = self.out_lin(out_dict)
        for node_type, out in out_dict.items():
            if out.size(-1) == x_dict[node_type].size(-1):
                alpha = self.skip[node_type].sigmoid()
                out_dict[node_type] = alpha * out + (1 - alpha) * x_dict[node_type]
        return out_dict

    def _adjacency(
        self,
        x_dict: dict[NodeType, Tensor],
        edge_index_dict: Mapping[EdgeType, Tensor] | RelationalAdjacency,
    ) -> RelationalAdjacency:
        if isinstance(edge_index_dict, RelationalAdjacency):
            adjacency = edge_index_dict
            sizes = {t: x.size(0) for t, x in x_dict.items()}
            if {t: n for t, (_, n) in adjacency.node_slices.items()} != sizes:
                raise ValueError("adjacency's node types / sizes differ from x_dict's")
            if adjacency.num_relations != len(self.edge_types):
                raise ValueError("adjacency was not built with this layer's edge types")
            return adjacency
        sizes = {t: x.size(0) for t, x in x_dict.items()}
        device = next(iter(x_dict.values())).device
        return RelationalAdjacency.from_hetero(edge_index_dict, sizes, self.edge_types).to(device)
