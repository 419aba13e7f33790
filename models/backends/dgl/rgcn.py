"""R-GCN on DGL's message passing (``dgl.nn.RelGraphConv``): the DGL variant of ``rgcn``."""

from __future__ import annotations

import math
from typing import Literal

import dgl
import torch
import torch.nn.functional as F
from dgl.nn.pytorch import RelGraphConv
from kgrec.features.graph import CollaborativeKG
from kgrec.models.base import Recommender
from kgrec.models.retrievers.rgcn import CKGNodeReadout, combine_layers
from torch import Tensor

Activation = Literal["tanh", "relu", "leaky_relu", "none"]
LayerCombination = Literal["concat", "mean", "last"]

_ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "none": lambda x: x,
}


def relation_mean_graph(ckg: CollaborativeKG) -> dgl.DGLGraph:
    """The CKG as a ``DGLGraph`` with its edges sorted by relation (``RelGraphConv``'s
    ``presorted`` path: with bases, one matmul per relation segment instead of a weight gathered
    per edge; DGL 2.1's block decomposition gathers a weight per edge either way) and
    ``edata["norm"] = 1 / |N^r_i|`` (R-GCN's per-relation mean, Eq. 2)."""
    src, dst = ckg.edge_index.to(torch.int64)
    etype = ckg.edge_type.to(torch.int64)
    order = torch.argsort(etype, stable=True)
    src, dst, etype = src[order], dst[order], etype[order]
    key = dst * ckg.num_relations + etype
    counts = torch.bincount(key, minlength=ckg.num_nodes * ckg.num_relations)
    graph = dgl.graph((src, dst), num_nodes=ckg.num_nodes, idtype=torch.int64)
    graph.edata["etype"] = etype
    graph.edata["norm"] = (1.0 / counts[key].to(torch.float32)).unsqueeze(-1)
    return graph


class DGLRGCN(CKGNodeReadout, Recommender):
    r"""R-GCN from `"Modeling Relational Data with Graph Convolutional Networks"
    <https://arxiv.org/abs/1703.06103>`_ (Schlichtkrull et al., ESWC 2018) over the collaborative
    KG, with DGL's :class:`~dgl.nn.pytorch.RelGraphConv` as the layer: the same model as
    :class:`kgrec.models.retrievers.rgcn.RGCN` (PyG), for parity and for users of DGL.

    Every CKG node has a learnable input embedding :math:`\mathbf{h}^{(0)}_i`; layer :math:`l` is

    .. math:: \mathbf{h}^{(l+1)}_i = \sigma\Big(\mathbf{W}^{(l)}_0 \mathbf{h}^{(l)}_i + \mathbf{b}^{(l)}
        + \sum_{r} \sum_{j \in \mathcal{N}^r_i} \frac{1}{|\mathcal{N}^r_i|}
        \mathbf{W}^{(l)}_r \mathbf{h}^{(l)}_j\Big)

    (Eq. 2; the :math:`1/|\mathcal{N}^r_i|` is ``edata["norm"]``, summed by DGL's reduce), with
    :math:`\mathbf{W}_r` regularised by basis decomposition (Eq. 3, ``regularizer="basis"``) or
    block-diagonal decomposition (Eq. 4, ``"bdd"``). Message dropout on each layer's input;
    :math:`\sigma` after every layer but the last. Layers are combined (concat / mean / last),
    :math:`\hat{y}_{ui} = \mathbf{h}_u^\top \mathbf{h}_i`, trained with BPR plus :math:`\lambda`
    times the L2 norm of the batch's ego embeddings; one full-graph propagation per batch.

    Args:
        num_users: number of users :math:`U`.
        num_items: number of items :math:`I`.
        ckg: collaborative KG of the *training* interactions (``data.ckg``).
        embedding_dim: dimension of input embeddings and of every layer.
        num_layers: number of layers :math:`L` (0 = the input embeddings, i.e. MF).
        num_bases: basis decomposition with this many bases (exclusive with ``num_blocks``).
        num_blocks: block-diagonal decomposition with this many blocks (divides ``embedding_dim``).
        activation: :math:`\sigma` between layers.
        dropout: message dropout on each layer's input.
        layer_combination: ``"concat"``, ``"mean"`` or ``"last"``.
        root_weight: keep the self-loop weight :math:`\mathbf{W}_0`.
        reg_weight: L2 weight :math:`\lambda` on the batch's ego embeddings.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        ckg: CollaborativeKG,
        embedding_dim: int = 64,
        num_layers: int = 1,
        num_bases: int | None = None,
        num_blocks: int | None = 8,
        activation: Activation = "tanh",
        dropout: float = 0.1,
        layer_combination: LayerCombination = "mean",
        root_weight: bool = True,
        reg_weight: float = 1e-4,
    ) -> None:
        super().__init__(num_users, num_items)
        if (ckg.num_users, ckg.num_items) != (num_users, num_items):
            raise ValueError(
                f"CKG has {ckg.num_users} users / {ckg.num_items} items, expected {num_users} / {num_items}"
            )
        if (num_bases is None) == (num_blocks is None):
            raise ValueError("choose exactly one of basis (num_bases) or block (num_blocks) decomposition")
        if num_blocks is not None and embedding_dim % num_blocks != 0:
            raise ValueError(f"num_blocks={num_blocks} must divide embedding_dim={embedding_dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        if layer_combination not in ("concat", "mean", "last"):
            raise ValueError(f"unknown layer combination {layer_combination!r}")
        self.num_nodes = ckg.num_nodes
        self.num_relations = ckg.num_relations
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.num_bases = num_bases
        self.num_blocks = num_blocks
        self.activation = activation
        self.dropout = dropout
        self.layer_combination = layer_combination
        self.reg_weight = reg_weight

        self.node_embedding = torch.nn.Embedding(self.num_nodes, embedding_dim)
        regularizer, bases = ("bdd", num_blocks) if num_blocks is not None else ("basis", num_bases)
        self.convs = torch.nn.ModuleList(
            RelGraphConv(
                embedding_dim,
                embedding_dim,
                self.num_relations,
                regularizer=regularizer,
                num_bases=bases,
                self_loop=root_weight,
                dropout=0.0,  # ours is on the layer's input, as in the PyG model
            )
            for _ in range(num_layers)
        )
        # Derived from the training data, never saved; moved to the parameters' device on use.
        self._graph = relation_mean_graph(ckg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal node embeddings, and each layer initialised as PyG's ``RGCNConv`` is
        (Glorot-uniform over each relation's, basis' or block's ``in x out`` matrix, the
        coefficients and the self-loop weight; zero bias), not as ``RelGraphConv.__init__`` is
        (``1/sqrt(in)`` bounds, ReLU gain): with DGL's own scales the same model trained to a
        lower recall on music (0.190 +- 0.015 against 0.225 +- 0.015, 3 seeds)."""
        torch.nn.init.xavier_normal_(self.node_embedding.weight)
        for conv in self.convs:
            linear = conv.linear_r
            if linear.regularizer == "bdd":  # [R, blocks * sub_in * sub_out]: glorot per block
                bound = math.sqrt(6.0 / (linear.submat_in + linear.submat_out))
                torch.nn.init.uniform_(linear.W, -bound, bound)
            else:  # basis: W [B, in, out], coeff [R, B]
                bound = math.sqrt(6.0 / (linear.W.size(-2) + linear.W.size(-1)))
                torch.nn.init.uniform_(linear.W, -bound, bound)
                torch.nn.init.xavier_uniform_(linear.coeff)
            if conv.self_loop:
                torch.nn.init.xavier_uniform_(conv.loop_weight)
            if conv.bias:
                torch.nn.init.zeros_(conv.h_bias)

    def graph(self) -> dgl.DGLGraph:
        device = self.node_embedding.weight.device
        if self._graph.device != device:
            self._graph = self._graph.to(device)
        return self._graph

    def propagate_all(self, dropout: bool = False) -> Tensor:
        """Layer-combined representations ``[N, output_dim]`` of every CKG node (message dropout
        only with ``dropout=True``, so :meth:`embeddings` is deterministic)."""
        act = _ACTIVATIONS[self.activation]
        graph = self.graph()
        etype, norm = graph.edata["etype"], graph.edata["norm"]
        x = self.node_embedding.weight
        layers = [x]
        for k, conv in enumerate(self.convs):
            h = F.dropout(x, p=self.dropout, training=dropout)
            x = conv(graph, h, etype, norm, presorted=True)
            if k < self.num_layers - 1:
                x = act(x)
            layers.append(x)
        return combine_layers(layers, self.layer_combination)

    def extra_repr(self) -> str:
        decomposition = (
            f"num_bases={self.num_bases}" if self.num_bases is not None else f"num_blocks={self.num_blocks}"
        )
        return (
            f"{super().extra_repr()}, num_nodes={self.num_nodes}, num_relations={self.num_relations}, "
            f"num_edges={self._graph.num_edges()}, embedding_dim={self.embedding_dim}, "
            f"num_layers={self.num_layers}, {decomposition}, layer_combination={self.layer_combination!r}"
        )
