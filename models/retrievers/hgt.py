"""HGT: heterogeneous graph transformer over the user/item/entity graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from kgrec.models.base import Recommender
from kgrec.models.layers.grouped_hgt_conv import GroupedHGTConv
from kgrec.models.layers.relational_adjacency import RelationalAdjacency
from kgrec.models.retrievers.rgcn import (
    RELATIONAL_DEFAULTS,
    RELATIONAL_SEARCH_SPACE,
    LayerCombination,
    combine_layers,
    combined_dim,
)
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.losses import bpr_loss, l2_reg
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.nn import HGTConv

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig
    from torch_geometric.typing import EdgeType

HGTConvImpl = Literal["auto", "grouped", "einsum", "standard"]


class RelationGroupedHGTConv(HGTConv):
    """:class:`~torch_geometric.nn.conv.HGTConv` with the same parameters and outputs, whose
    relation-specific key/value projections :math:`W^{ATT}_{\\phi(e)}`, :math:`W^{MSG}_{\\phi(e)}`
    run as one batched matmul per edge type.

    PyG's version stacks the source features of every edge type and applies
    :class:`~torch_geometric.nn.dense.HeteroLinear`; without pyg-lib that falls back to a loop of
    in-place slice assignments whose backward copies the whole stacked gradient once per
    ``(head, edge type)`` -- about 40 s per layer on ``music`` (128 edge types) on one CPU core.
    Here each edge type's block is an ``einsum`` over its heads and the blocks are concatenated,
    which gives the identical tensor in the identical layout.
    """

    def _construct_src_node_feat(
        self,
        k_dict: dict[str, Tensor],
        v_dict: dict[str, Tensor],
        edge_index_dict: dict[EdgeType, Tensor],
    ) -> tuple[Tensor, Tensor, dict[EdgeType, int]]:
        heads, dim = self.heads, self.out_channels // self.heads
        num_edge_types = len(self.edge_types)
        # HeteroLinear weight [heads * T, D, D], type id = head * T + edge type (see HGTConv).
        w_k = self.k_rel.weight.view(heads, num_edge_types, dim, dim)
        w_v = self.v_rel.weight.view(heads, num_edge_types, dim, dim)
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        offset: dict[EdgeType, int] = {}
        cumsum = 0
        for edge_type in edge_index_dict:
            src = edge_type[0]
            t = self.edge_types_map[edge_type]
            offset[edge_type] = cumsum
            cumsum += k_dict[src].size(0)
            ks.append(torch.einsum("nhd,hde->nhe", k_dict[src], w_k[:, t]))
            vs.append(torch.einsum("nhd,hde->nhe", v_dict[src], w_v[:, t]))
        return torch.cat(ks, dim=0), torch.cat(vs, dim=0), offset


class HGT(Recommender):
    r"""HGT from `"Heterogeneous Graph Transformer" <https://arxiv.org/abs/2003.01332>`_
    (Hu et al., WWW 2020) as a retriever over the heterogeneous graph of users, items and KG
    entities (``data.hetero``: training interactions both ways, every KG relation and its
    inverse as its own edge type).

    Each node type has its own learnable input embedding table. A layer (PyG's
    :class:`~torch_geometric.nn.conv.HGTConv`) computes, per head, heterogeneous mutual attention
    (Eq. 3) :math:`\text{ATT-head}^i(s,e,t) = \big(K^i(s) W^{ATT}_{\phi(e)} Q^i(t)^\top\big)
    \mu_{\langle\tau(s),\phi(e),\tau(t)\rangle} / \sqrt{d}`, softmax-normalised over each target's
    incoming edges, heterogeneous messages (Eq. 4) :math:`V^i(s) W^{MSG}_{\phi(e)}` with
    type-specific K/Q/V projections, and target-specific aggregation (Eq. 5)
    :math:`H^{(l)}[t] = \alpha\,\text{A-Linear}_{\tau(t)}(\text{GELU}(\tilde{H}^{(l)}[t]))
    + (1 - \alpha) H^{(l-1)}[t]` with a learned gate :math:`\alpha = \sigma(\text{skip}_{\tau(t)})`.
    Dropout is applied to each layer's input (the paper's dropout before A-Linear).

    Implementation (same parameters, state dict and outputs): ``conv_impl="grouped"``, the
    default (``"auto"``), is :class:`~kgrec.models.layers.grouped_hgt_conv.GroupedHGTConv`: the
    relation projections once per distinct (source, edge type) pair, over a
    :class:`~kgrec.models.layers.relational_adjacency.RelationalAdjacency` built once here;
    ``"einsum"`` is :class:`RelationGroupedHGTConv` (every source-type node projected per edge
    type), ``"standard"`` PyG's :class:`HGTConv`. Node representations combine the layers
    (concatenation, mean, or last); the score is the inner product of the user and item
    representations, trained with BPR plus :math:`\lambda` times the L2 norm of the batch's ego
    embeddings. Each batch runs the full-graph propagation once.

    Args:
        num_users: number of users :math:`U` (``hetero["user"].num_nodes``).
        num_items: number of items :math:`I` (``hetero["item"].num_nodes``).
        hetero: heterogeneous graph of the *training* interactions (``data.hetero``).
        embedding_dim: dimension of input embeddings and of every layer.
        num_layers: number of HGT layers.
        heads: attention heads (must divide ``embedding_dim``).
        dropout: dropout on each layer's input.
        layer_combination: ``"concat"``, ``"mean"`` or ``"last"``.
        reg_weight: L2 weight :math:`\lambda` on the batch's ego embeddings.
        conv_impl: ``"auto"`` (= ``"grouped"``), ``"grouped"``, ``"einsum"`` or ``"standard"``.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        hetero: HeteroData,
        embedding_dim: int = 64,
        num_layers: int = 2,
        heads: int = 2,
        dropout: float = 0.1,
        layer_combination: LayerCombination = "mean",
        reg_weight: float = 1e-4,
        conv_impl: HGTConvImpl = "auto",
    ) -> None:
        super().__init__(num_users, num_items)
        if conv_impl not in ("auto", "grouped", "einsum", "standard"):
            raise ValueError(f"unknown conv_impl {conv_impl!r}")
        if (hetero["user"].num_nodes, hetero["item"].num_nodes) != (num_users, num_items):
            raise ValueError(
                f"graph has {hetero['user'].num_nodes} users / {hetero['item'].num_nodes} items, "
                f"expected {num_users} / {num_items}"
            )
        if embedding_dim % heads != 0:
            raise ValueError(f"heads={heads} must divide embedding_dim={embedding_dim}")
        if layer_combination not in ("concat", "mean", "last"):
            raise ValueError(f"unknown layer combination {layer_combination!r}")
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.heads = heads
        self.dropout = dropout
        self.layer_combination = layer_combination
        self.reg_weight = reg_weight
        self.conv_impl = "grouped" if conv_impl == "auto" else conv_impl
        self.node_types: list[str] = list(hetero.node_types)
        self.edge_types: list[EdgeType] = list(hetero.edge_types)
        self.num_nodes_per_type = {t: int(hetero[t].num_nodes) for t in self.node_types}
        # Node type names are plain identifiers (user/item/entity); relation names may contain
        # dots, which HGTConv's own ParameterDict escapes.
        self.node_embedding = torch.nn.ModuleDict(
            {t: torch.nn.Embedding(n, embedding_dim) for t, n in self.num_nodes_per_type.items()}
        )
        metadata = (self.node_types, self.edge_types)
        conv_cls = {"grouped": GroupedHGTConv, "einsum": RelationGroupedHGTConv, "standard": HGTConv}[
            self.conv_impl
        ]
        self.convs = torch.nn.ModuleList(
            conv_cls(embedding_dim, embedding_dim, metadata, heads=heads) for _ in range(num_layers)
        )
        # The graph: derived from the training data, moved by .to(), not saved. Buffer names are
        # positional because relation names are not valid attribute names.
        for k, edge_type in enumerate(self.edge_types):
            self.register_buffer(
                f"_edge_index_{k}", hetero[edge_type].edge_index.to(torch.int64), persistent=False
            )
        # Grouped by edge type once; its tensors are non-persistent buffers (not in the state dict).
        self.adjacency = (
            RelationalAdjacency.from_hetero(
                {et: hetero[et].edge_index for et in self.edge_types},
                self.num_nodes_per_type,
                self.edge_types,
            )
            if self.conv_impl == "grouped"
            else None
        )
        self.reset_parameters()

    @property
    def output_dim(self) -> int:
        """Dimension of the user/item representations."""
        return combined_dim(self.embedding_dim, self.num_layers, self.layer_combination)

    def edge_index_dict(self) -> dict[EdgeType, Tensor]:
        return {et: getattr(self, f"_edge_index_{k}") for k, et in enumerate(self.edge_types)}

    def reset_parameters(self) -> None:
        for emb in self.node_embedding.values():
            torch.nn.init.xavier_normal_(emb.weight)
        for conv in self.convs:
            conv.reset_parameters()

    def propagate_all(self, dropout: bool = False) -> dict[str, Tensor]:
        """Layer-combined representations ``{node_type: [n, output_dim]}``; input dropout only
        with ``dropout=True`` (:meth:`loss` in training mode), so :meth:`embeddings` is
        deterministic."""
        graph = self.adjacency if self.adjacency is not None else self.edge_index_dict()
        x = {t: emb.weight for t, emb in self.node_embedding.items()}
        layers = {t: [v] for t, v in x.items()}
        for conv in self.convs:
            h = {t: F.dropout(v, p=self.dropout, training=dropout) for t, v in x.items()}
            out = conv(h, graph)
            x = {t: out[t] if out.get(t) is not None else x[t] for t in x}
            for t, v in x.items():
                layers[t].append(v)
        return {t: combine_layers(v, self.layer_combination) for t, v in layers.items()}

    def embeddings(self) -> tuple[Tensor, Tensor]:
        out = self.propagate_all()
        return out["user"], out["item"]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        out = self.propagate_all(dropout=self.training)
        u, p, n = out["user"][users], out["item"][pos_items], out["item"][neg_items]
        bpr = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        items = self.node_embedding["item"]
        reg = l2_reg(self.node_embedding["user"](users), items(pos_items), items(neg_items))
        return bpr + self.reg_weight * reg

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, node_types={self.node_types}, "
            f"num_edge_types={len(self.edge_types)}, embedding_dim={self.embedding_dim}, "
            f"num_layers={self.num_layers}, heads={self.heads}, "
            f"layer_combination={self.layer_combination!r}, conv_impl={self.conv_impl!r}"
        )


def interaction_hetero(data: InteractionData) -> HeteroData:
    """The heterogeneous graph of ``data``: ``data.hetero`` when it has a snapshot (KG), else the
    interaction-only graph (node types user/item, training interactions both ways)."""
    if data.snapshot is not None and data.split is not None:
        return data.hetero
    coo = data.train.tocoo()
    users = torch.from_numpy(coo.row.astype("int64"))
    items = torch.from_numpy(coo.col.astype("int64"))
    graph = HeteroData()
    graph["user"].num_nodes = data.num_users
    graph["item"].num_nodes = data.num_items
    graph["user", "interacts", "item"].edge_index = torch.stack([users, items])
    graph["item", "rev_interacts", "user"].edge_index = torch.stack([items, users])
    return graph


class HGTParams(BaseModel):
    """HGT hyper-parameters (``TrainConfig.params`` when ``model="hgt"``); the depth is the
    shared ``num_layers``, ``embedding_dim`` the width of every layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: int = Field(2, ge=1, le=64)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_combination: Literal["concat", "mean", "last"] = "mean"
    conv_impl: Literal["auto", "grouped", "einsum", "standard"] = Field(
        "auto", description='"auto" = "grouped" (GroupedHGTConv); "einsum", "standard" (HGTConv)'
    )


def build_hgt(config: TrainConfig, data: InteractionData) -> HGT:
    params = HGTParams.model_validate(config.params)
    return HGT(
        data.num_users,
        data.num_items,
        interaction_hetero(data),  # train interactions only (+ KG with a snapshot)
        embedding_dim=config.embedding_dim,
        num_layers=config.num_layers,
        heads=params.heads,
        dropout=params.dropout,
        layer_combination=params.layer_combination,
        reg_weight=config.reg_weight,
        conv_impl=params.conv_impl,
    )


SPEC = register(
    ModelSpec(
        name="hgt",
        family="retriever",
        build=build_hgt,
        needs_kg=True,
        summary="HGT: type-specific attention over the heterogeneous graph (Hu et al., WWW 2020)",
        params=HGTParams,
        defaults=RELATIONAL_DEFAULTS,  # tuned with R-GCN's (comment there)
        search_space=RELATIONAL_SEARCH_SPACE,
    )
)
