"""R-GCN: relational graph convolution over the collaborative knowledge graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from kgrec.features.graph import CollaborativeKG
from kgrec.models.base import Recommender
from kgrec.models.config import BPR_SEARCH_SPACE
from kgrec.models.layers.grouped_rgcn_conv import GroupedRGCNConv
from kgrec.models.layers.relational_adjacency import RelationalAdjacency
from kgrec.models.retrievers.kgat import interaction_ckg
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.losses import bpr_loss, l2_reg
from optuna.distributions import FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch_geometric.nn import FastRGCNConv, RGCNConv

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig

Activation = Literal["tanh", "relu", "leaky_relu", "none"]
LayerCombination = Literal["concat", "mean", "last"]
ConvImpl = Literal["auto", "grouped", "standard", "fast"]

_ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "none": lambda x: x,
}


def combined_dim(embedding_dim: int, num_layers: int, how: LayerCombination) -> int:
    """Width of :func:`combine_layers`'s output for ``num_layers`` layers of ``embedding_dim``."""
    return embedding_dim * (num_layers + 1) if how == "concat" else embedding_dim


def combine_layers(layers: list[Tensor], how: LayerCombination) -> Tensor:
    """Layer combination of ``[E^(0), ..., E^(L)]``: concatenation, mean, or the last layer only."""
    if how == "concat":
        return torch.cat(layers, dim=-1)
    if how == "mean":
        return torch.stack(layers, dim=0).mean(dim=0)
    if how == "last":
        return layers[-1]
    raise ValueError(f"unknown layer combination {how!r}")


class CKGNodeReadout:
    """Readout and BPR loss shared by the R-GCN backends (PyG here, DGL in
    ``kgrec.models.backends.dgl``): users and items are the first CKG nodes of
    :meth:`propagate_all`'s layer-combined output; the L2 term is on the batch's ego embeddings."""

    num_users: int
    num_items: int
    embedding_dim: int
    num_layers: int
    layer_combination: LayerCombination
    reg_weight: float
    node_embedding: torch.nn.Embedding

    def propagate_all(self, dropout: bool = False) -> Tensor:
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        """Dimension of the user/item representations."""
        return combined_dim(self.embedding_dim, self.num_layers, self.layer_combination)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        out = self.propagate_all()
        u, i = self.num_users, self.num_items
        return out[:u], out[u : u + i]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        out = self.propagate_all(dropout=self.training)
        user_emb, item_emb = out[: self.num_users], out[self.num_users : self.num_users + self.num_items]
        u, p, n = user_emb[users], item_emb[pos_items], item_emb[neg_items]
        bpr = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        offset = self.num_users
        reg = l2_reg(
            self.node_embedding(users),
            self.node_embedding(pos_items + offset),
            self.node_embedding(neg_items + offset),
        )
        return bpr + self.reg_weight * reg


class RGCN(CKGNodeReadout, Recommender):
    r"""R-GCN from `"Modeling Relational Data with Graph Convolutional Networks"
    <https://arxiv.org/abs/1703.06103>`_ (Schlichtkrull et al., ESWC 2018) as a retriever over the
    collaborative KG (users, items, entities; interact/rev_interact and every KG relation with its
    inverse, ``data.ckg`` -- built from the *training* interactions only).

    Every CKG node has a learnable input embedding :math:`\mathbf{h}^{(0)}_i`. Layer :math:`l`
    (Eq. 2) is

    .. math:: \mathbf{h}^{(l+1)}_i = \sigma\Big(\mathbf{W}^{(l)}_0 \mathbf{h}^{(l)}_i
        + \sum_{r} \sum_{j \in \mathcal{N}^r_i} \frac{1}{|\mathcal{N}^r_i|}
        \mathbf{W}^{(l)}_r \mathbf{h}^{(l)}_j\Big)

    with the self-loop ("root") weight :math:`\mathbf{W}_0` and the relation weights regularised
    by basis decomposition (Eq. 3, :math:`\mathbf{W}_r = \sum_b a_{rb} \mathbf{V}_b`) or
    block-diagonal decomposition (Eq. 4, :math:`\mathbf{W}_r = \oplus_b \mathbf{Q}_{br}`), as
    PyG's :class:`~torch_geometric.nn.conv.RGCNConv` implements them. Message dropout is applied
    to each layer's input; :math:`\sigma` follows every layer but the last.

    The representation of a node combines its layers (concatenation, mean, or the last one);
    the score is :math:`\hat{y}_{ui} = \mathbf{h}_u^\top \mathbf{h}_i`, trained with BPR plus
    :math:`\lambda` times the L2 norm of the batch's ego (layer-0) embeddings. Each batch runs the
    full-graph propagation once.

    Implementation (same parameters, state dict and outputs): ``conv_impl="grouped"``, the
    default (``"auto"``), uses :class:`~kgrec.models.layers.grouped_rgcn_conv.GroupedRGCNConv`:
    each distinct (source, relation) pair transformed once, one matmul per relation, and one CSR
    matmul for the normalised aggregation, over a
    :class:`~kgrec.models.layers.relational_adjacency.RelationalAdjacency` built once here.
    ``"standard"`` is PyG's :class:`RGCNConv` (one message pass per relation), ``"fast"``
    :class:`~torch_geometric.nn.conv.FastRGCNConv` (a weight matrix gathered per edge); without
    pyg-lib both are 10-30x slower than ``"grouped"`` on CPU (``benchmarks/relational_speed.py``).

    Args:
        num_users: number of users :math:`U`.
        num_items: number of items :math:`I`.
        ckg: collaborative KG of the *training* interactions (``data.ckg``).
        embedding_dim: dimension of input embeddings and of every layer.
        num_layers: number of R-GCN layers :math:`L` (0 = the input embeddings, i.e. MF).
        num_bases: basis decomposition with this many bases (exclusive with ``num_blocks``).
        num_blocks: block-diagonal decomposition with this many blocks (must divide
            ``embedding_dim``).
        activation: :math:`\sigma` between layers.
        dropout: message dropout on each layer's input.
        layer_combination: ``"concat"``, ``"mean"`` or ``"last"``.
        root_weight: keep the self-loop weight :math:`\mathbf{W}_0`.
        conv_impl: ``"auto"`` (= ``"grouped"``), ``"grouped"``, ``"standard"`` or ``"fast"``.
        reg_weight: L2 weight :math:`\lambda` on the batch's ego embeddings.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        ckg: CollaborativeKG,
        embedding_dim: int = 64,
        num_layers: int = 2,
        num_bases: int | None = None,
        num_blocks: int | None = 8,
        activation: Activation = "tanh",
        dropout: float = 0.1,
        layer_combination: LayerCombination = "concat",
        root_weight: bool = True,
        conv_impl: ConvImpl = "auto",
        reg_weight: float = 1e-4,
    ) -> None:
        super().__init__(num_users, num_items)
        if (ckg.num_users, ckg.num_items) != (num_users, num_items):
            raise ValueError(
                f"CKG has {ckg.num_users} users / {ckg.num_items} items, "
                f"expected {num_users} / {num_items}"
            )
        if num_bases is not None and num_blocks is not None:
            raise ValueError("choose basis (num_bases) or block (num_blocks) decomposition, not both")
        if num_blocks is not None and embedding_dim % num_blocks != 0:
            raise ValueError(f"num_blocks={num_blocks} must divide embedding_dim={embedding_dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        if layer_combination not in ("concat", "mean", "last"):
            raise ValueError(f"unknown layer combination {layer_combination!r}")
        if conv_impl not in ("auto", "grouped", "standard", "fast"):
            raise ValueError(f"unknown conv_impl {conv_impl!r}")
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
        self.conv_impl = "grouped" if conv_impl == "auto" else conv_impl
        conv_cls = {"grouped": GroupedRGCNConv, "standard": RGCNConv, "fast": FastRGCNConv}[self.conv_impl]

        self.node_embedding = torch.nn.Embedding(self.num_nodes, embedding_dim)
        self.convs = torch.nn.ModuleList(
            conv_cls(
                embedding_dim,
                embedding_dim,
                self.num_relations,
                num_bases=num_bases,
                num_blocks=num_blocks,
                aggr="mean",
                root_weight=root_weight,
            )
            for _ in range(num_layers)
        )
        # The graph: derived from the training data, moved by .to(), not saved.
        self.register_buffer("edge_index", ckg.edge_index.to(torch.int64), persistent=False)
        self.register_buffer("edge_type", ckg.edge_type.to(torch.int64), persistent=False)
        # Grouped by relation once; its tensors are non-persistent buffers (not in the state dict).
        self.adjacency = (
            RelationalAdjacency(ckg.edge_index, ckg.edge_type, self.num_nodes, self.num_relations, aggr="mean")
            if self.conv_impl == "grouped"
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_normal_(self.node_embedding.weight)
        for conv in self.convs:
            conv.reset_parameters()

    def propagate_all(self, dropout: bool = False) -> Tensor:
        """Layer-combined representations ``[N, output_dim]`` of every CKG node; message dropout
        only with ``dropout=True`` (:meth:`loss` in training mode), so :meth:`embeddings` is
        deterministic."""
        act = _ACTIVATIONS[self.activation]
        x = self.node_embedding.weight
        layers = [x]
        for k, conv in enumerate(self.convs):
            h = F.dropout(x, p=self.dropout, training=dropout)
            if self.adjacency is not None:
                x = conv(h, self.adjacency)
            else:
                x = conv(h, self.edge_index, self.edge_type)
            if k < self.num_layers - 1:
                x = act(x)
            layers.append(x)
        return combine_layers(layers, self.layer_combination)

    def extra_repr(self) -> str:
        decomposition = (
            f"num_bases={self.num_bases}" if self.num_bases is not None else f"num_blocks={self.num_blocks}"
        )
        return (
            f"{super().extra_repr()}, num_nodes={self.num_nodes}, "
            f"num_relations={self.num_relations}, num_edges={self.edge_index.size(1)}, "
            f"embedding_dim={self.embedding_dim}, num_layers={self.num_layers}, {decomposition}, "
            f"layer_combination={self.layer_combination!r}, conv_impl={self.conv_impl!r}"
        )


class RGCNParams(BaseModel):
    """R-GCN hyper-parameters (``TrainConfig.params`` when ``model="rgcn"``); the depth is the
    shared ``num_layers``, ``embedding_dim`` the width of every layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bases: int | None = Field(None, ge=1, description="basis decomposition (exclusive with blocks)")
    num_blocks: int | None = Field(8, ge=1, description="block-diagonal decomposition")
    activation: Literal["tanh", "relu", "leaky_relu", "none"] = "tanh"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_combination: Literal["concat", "mean", "last"] = "mean"
    root_weight: bool = True
    conv_impl: Literal["auto", "grouped", "standard", "fast"] = Field(
        "auto", description='"auto" = "grouped" (GroupedRGCNConv); "standard" RGCNConv, "fast" FastRGCNConv'
    )

    @model_validator(mode="after")
    def _check_decomposition(self) -> RGCNParams:
        if self.num_bases is not None and self.num_blocks is not None:
            raise ValueError("set num_bases or num_blocks, not both (the other to None)")
        return self


def build_rgcn(config: TrainConfig, data: InteractionData) -> RGCN:
    params = RGCNParams.model_validate(config.params)
    return RGCN(
        data.num_users,
        data.num_items,
        interaction_ckg(data),
        embedding_dim=config.embedding_dim,
        num_layers=config.num_layers,
        num_bases=params.num_bases,
        num_blocks=params.num_blocks,
        activation=params.activation,
        dropout=params.dropout,
        layer_combination=params.layer_combination,
        root_weight=params.root_weight,
        conv_impl=params.conv_impl,
        reg_weight=config.reg_weight,
    )


# Defaults (rgcn, hgt): full-graph propagation per batch, so large batches. Music, validation
# recall@20 (best epoch): R-GCN blocks=8, mean, lr 5e-3 / 4096 / reg 1e-3: 1 layer 0.238 (31),
# 2 layers 0.183 (6); lr 1e-2 / 8192 / reg 1e-4, 2 layers, concat ~0.17. HGT heads 2, mean, same
# lr / batch / reg: 1 layer 0.190 (18), 2 layers 0.185 (13). Deeper relational transforms overfit
# these small graphs; 1 layer is also 3-5x faster.
RELATIONAL_DEFAULTS = {
    "learning_rate": 5e-3,
    "batch_size": 4096,
    "max_batches_per_epoch": 20,  # ml-100k's epoch at 4096; the batch grows beyond
    "reg_weight": 1e-3,
    "num_layers": 1,
    "epochs": 100,
    "patience": 5,
}
#: R-GCN's and HGT's search: the BPR space, depth and dropout.
RELATIONAL_SEARCH_SPACE = {
    **BPR_SEARCH_SPACE,
    "num_layers": IntDistribution(1, 2),
    "params.dropout": FloatDistribution(0.0, 0.3),
}
SPEC = register(
    ModelSpec(
        name="rgcn",
        family="retriever",
        build=build_rgcn,
        needs_kg=True,
        summary="R-GCN: relation-specific transforms over the CKG (Schlichtkrull et al., ESWC 2018)",
        params=RGCNParams,
        defaults=RELATIONAL_DEFAULTS,
        search_space=RELATIONAL_SEARCH_SPACE,
    )
)
