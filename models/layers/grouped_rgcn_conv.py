"""R-GCN convolution with edges grouped by relation: one matmul per relation, one sparse matmul."""

from __future__ import annotations

import torch
from kgrec.models.layers.relational_adjacency import RelationalAdjacency
from torch import Tensor
from torch_geometric.nn import RGCNConv


class GroupedRGCNConv(RGCNConv):
    r"""The relational graph convolution from `"Modeling Relational Data with Graph Convolutional
    Networks" <https://arxiv.org/abs/1703.06103>`_ (Schlichtkrull et al., ESWC 2018), Eq. 2,

    .. math:: \mathbf{x}^{\prime}_i = \mathbf{\Theta}_{\textrm{root}} \mathbf{x}_i
        + \sum_{r \in \mathcal{R}} \sum_{j \in \mathcal{N}_r(i)}
        \frac{1}{|\mathcal{N}_r(i)|} \mathbf{\Theta}_r \mathbf{x}_j + \mathbf{b},

    with basis decomposition (Eq. 3, :math:`\mathbf{\Theta}_r = \sum_b a_{rb} \mathbf{V}_b`,
    ``num_bases``) or block-diagonal decomposition (Eq. 4, :math:`\mathbf{\Theta}_r =
    \bigoplus_b \mathbf{Q}_{br}`, ``num_blocks``) -- the parameters, initialisation, outputs and
    gradients of PyG's :class:`~torch_geometric.nn.conv.RGCNConv` (a subclass: its state dict
    loads as is), computed differently.

    Without pyg-lib, ``RGCNConv`` runs one message pass over all nodes per relation and
    ``FastRGCNConv`` gathers a weight matrix per edge. Here, since :math:`\mathbf{\Theta}_r
    \mathbf{x}_j` depends only on the pair :math:`(j, r)`, each distinct pair is transformed once
    (one matmul per relation over that relation's sources, :class:`RelationalAdjacency`), and the
    normalised sum over relations and neighbours is one CSR matmul ``[N, P] @ [P, F]``.

    Args:
        in_channels: size of each input node feature (feature matrices only: no featureless
            index input, no bipartite pair).
        out_channels: size of each output node feature.
        num_relations: number of relations :math:`|\mathcal{R}|`.
        num_bases: basis decomposition with this many bases.
        num_blocks: block-diagonal decomposition with this many blocks.
        aggr: ``"mean"`` (the paper's :math:`1/|\mathcal{N}_r(i)|`) or ``"add"``/``"sum"``.
        root_weight: add the self-connection :math:`\mathbf{\Theta}_{\textrm{root}}\mathbf{x}_i`.
        bias: add the bias :math:`\mathbf{b}`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_relations: int,
        num_bases: int | None = None,
        num_blocks: int | None = None,
        aggr: str = "mean",
        root_weight: bool = True,
        bias: bool = True,
    ) -> None:
        if not isinstance(in_channels, int):
            raise TypeError("GroupedRGCNConv takes an int in_channels (node feature matrices only)")
        if aggr not in ("mean", "add", "sum"):
            raise ValueError(f"aggr must be 'mean', 'add' or 'sum', got {aggr!r}")
        super().__init__(
            in_channels,
            out_channels,
            num_relations,
            num_bases=num_bases,
            num_blocks=num_blocks,
            aggr=aggr,
            root_weight=root_weight,
            bias=bias,
        )
        self.adjacency_aggr = "mean" if aggr == "mean" else "sum"

    def relation_weights(self) -> Tensor:
        """``[R, in, out]`` (no decomposition, bases) or ``[R, blocks, in/b, out/b]`` (blocks)."""
        if self.num_bases is not None:
            return (self.comp @ self.weight.view(self.num_bases, -1)).view(
                self.num_relations, self.in_channels_l, self.out_channels
            )
        return self.weight

    def forward(  # type: ignore[override]
        self, x: Tensor, edge_index: Tensor | RelationalAdjacency, edge_type: Tensor | None = None
    ) -> Tensor:
        """``x`` ``[N, in_channels]``; ``edge_index`` either ``[2, E]`` with ``edge_type`` ``[E]``
        (grouped on every call) or a :class:`RelationalAdjacency` built once for the graph."""
        if not torch.is_floating_point(x):
            raise TypeError("GroupedRGCNConv needs a floating-point feature matrix x")
        adjacency = self._adjacency(x, edge_index, edge_type)
        weight = self.relation_weights()
        # split/unbind, not slicing: the backward of a slice materialises a zero gradient of the
        # whole tensor per relation, that of split/unbind one concatenation.
        pair_x = x[adjacency.pair_source].split(adjacency.relation_sizes)
        blocks: list[Tensor] = []
        for h, w in zip(pair_x, weight.unbind(0)):
            if h.size(0) == 0:  # no edges: its weight gets no gradient, as in RGCNConv
                continue
            if self.num_blocks is not None:
                h = h.view(h.size(0), self.num_blocks, -1)
                blocks.append(torch.einsum("abc,bcd->abd", h, w).reshape(h.size(0), -1))
            else:
                blocks.append(h @ w)
        messages = torch.cat(blocks) if blocks else x.new_zeros(0, self.out_channels)
        out = adjacency.aggregate(messages)
        if self.root is not None:
            out = out + x @ self.root
        if self.bias is not None:
            out = out + self.bias
        return out

    def _adjacency(
        self, x: Tensor, edge_index: Tensor | RelationalAdjacency, edge_type: Tensor | None
    ) -> RelationalAdjacency:
        if isinstance(edge_index, RelationalAdjacency):
            adjacency = edge_index
            if adjacency.aggr != self.adjacency_aggr:
                raise ValueError(f"adjacency built for aggr={adjacency.aggr!r}, layer uses {self.aggr!r}")
            if adjacency.num_relations != self.num_relations or adjacency.num_nodes != x.size(0):
                raise ValueError("adjacency does not match the layer's relations or x's nodes")
            return adjacency
        if edge_type is None:
            raise ValueError("edge_type is required with an edge_index tensor")
        return RelationalAdjacency(
            edge_index, edge_type, x.size(0), self.num_relations, aggr=self.adjacency_aggr
        ).to(x.device)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"num_relations={self.num_relations})"
        )
