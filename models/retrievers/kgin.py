"""KGIN: user intents over KG relations and relational path-aware aggregation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from kgrec.features.graph import CollaborativeKG
from kgrec.models.base import Recommender
from kgrec.models.config import BPR_SEARCH_SPACE
from kgrec.models.retrievers.kgat import interaction_ckg
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.losses import bpr_loss, l2_reg
from optuna.distributions import FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig

Independence = Literal["distance", "cosine"]

_EPS = 1e-8  # inside the square roots of the distance correlation, as in the authors' code


def relational_aggregation(
    x: Tensor, relation_emb: Tensor, head: Tensor, tail: Tensor, relation: Tensor, num_nodes: int
) -> Tensor:
    r"""One relational path-aware aggregation over KG edges ``head <-(relation)- tail`` (Eq. 9):

    .. math:: \mathbf{e}^{(l+1)}_h = \frac{1}{|\mathcal{N}_h|} \sum_{(r,t) \in \mathcal{N}_h}
        \mathbf{e}_r \odot \mathbf{e}^{(l)}_t

    ``x`` is ``[N, d]`` (KG node space), ``relation_emb`` ``[R, d]``; returns ``[num_nodes, d]``
    (the heads ``[0, num_nodes)``; a node without an edge gets zeros). One gather and one
    ``index_add_`` over the edges.
    """
    messages = relation_emb[relation] * x[tail]
    out = x.new_zeros(num_nodes, x.size(1)).index_add_(0, head, messages)
    deg = torch.bincount(head, minlength=num_nodes).clamp(min=1).to(x.dtype)
    return out / deg.unsqueeze(1)


def independence_loss(intents: Tensor, kind: Independence = "distance") -> Tensor:
    r"""Sum over the unordered pairs :math:`p < p'` of intents ``[P, n]`` of their dependence
    (Eq. 4 of the paper, over pairs as in the authors' code):

    * ``"distance"`` -- the distance correlation
      :math:`\mathrm{dCor}(\mathbf{e}_p, \mathbf{e}_{p'}) = \mathrm{dCov}(\mathbf{e}_p,
      \mathbf{e}_{p'}) / \sqrt{\mathrm{dVar}(\mathbf{e}_p) \mathrm{dVar}(\mathbf{e}_{p'})}`, each
      vector read as ``n`` samples of a scalar (double-centred distance matrices; a small epsilon
      inside the square roots keeps the gradient finite, so identical intents give just under 1);
      zero when the empirical joint distribution of two intents is the product of its marginals.
    * ``"cosine"`` -- the squared cosine similarity; zero for orthogonal intents.

    Every pair at once: ``P`` distance matrices ``[n, n]`` and one ``[P, P]`` Gram matrix.
    """
    num = intents.size(0)
    if num < 2:
        return intents.new_zeros(())
    i, j = torch.triu_indices(num, num, offset=1, device=intents.device)
    if kind == "cosine":
        unit = F.normalize(intents, dim=1)
        return ((unit @ unit.t())[i, j] ** 2).sum()
    if kind != "distance":
        raise ValueError(f"independence must be 'distance' or 'cosine', got {kind!r}")
    n = intents.size(1)
    sq = intents.unsqueeze(2) - intents.unsqueeze(1)  # [P, n, n] pairwise differences
    dist = torch.sqrt(sq.pow(2) + _EPS)
    centred = dist - dist.mean(1, keepdim=True) - dist.mean(2, keepdim=True) + dist.mean((1, 2), keepdim=True)
    flat = centred.reshape(num, -1)
    dcov = torch.sqrt((flat @ flat.t() / n**2).clamp(min=0.0) + _EPS)  # [P, P]; diagonal: dVar
    var = dcov.diagonal()
    return (dcov[i, j] / torch.sqrt(var[i] * var[j] + _EPS)).sum()


class KGIN(Recommender):
    r"""KGIN from `"Learning Intents behind Interactions with Knowledge Graph for Recommendation"
    <https://arxiv.org/abs/2102.07057>`_ (Wang et al., WWW 2021).

    Users :math:`\mathbf{e}^{(0)}_u`, items and KG entities :math:`\mathbf{e}^{(0)}_v` (one table
    in KG node space: items first, as in the CKG), and one embedding :math:`\mathbf{e}_r` per KG
    relation and per inverse relation (``2R`` of them; the interaction relation has none).

    * **User intents** (Eq. 1-2) -- :math:`P` intents, each an attentive combination of relations,

      .. math:: \mathbf{e}_p = \sum_{r} \alpha(r,p)\, \mathbf{e}_r, \qquad
          \alpha(r,p) = \frac{\exp(w_{rp})}{\sum_{r'} \exp(w_{r'p})}

      with learnable logits :math:`w_{rp}` (:meth:`intent_weights`, :meth:`intents`).
    * **Independence** (Eq. 4) -- :math:`\mathcal{L}_{IND} = \sum_{p<p'} \mathrm{dCor}(\mathbf{e}_p,
      \mathbf{e}_{p'})` (or the squared cosine similarity), see :func:`independence_loss`.
    * **Intent graph aggregation** (Eq. 7-8) -- over the user's training items,

      .. math:: \mathbf{e}^{(l+1)}_u = \Big(\sum_p \beta(u,p)\, \mathbf{e}_p\Big) \odot
          \mathbf{m}^{(l)}_u + \mathbf{m}^{(l)}_u, \qquad
          \mathbf{m}^{(l)}_u = \frac{1}{|\mathcal{N}_u|} \sum_{i \in \mathcal{N}_u} \mathbf{e}^{(l)}_i,
          \qquad \beta(u,p) = \operatorname{softmax}_p\big(\mathbf{e}_p^\top \mathbf{e}^{(l)}_u\big),

      where the residual :math:`+\mathbf{m}^{(l)}_u` is the authors' code's (``user_residual``).
    * **Relational path-aware aggregation** (Eq. 9) -- for items and entities,
      :math:`\mathbf{e}^{(l+1)}_v = \frac{1}{|\mathcal{N}_v|} \sum_{(r,t) \in \mathcal{N}_v}
      \mathbf{e}_r \odot \mathbf{e}^{(l)}_t` over the KG triples and their inverses
      (:func:`relational_aggregation`); items do not aggregate from users.
    * **Prediction** (Eq. 13-14) -- :math:`\mathbf{e}^*_u = \sum_{l=0}^{L} \mathbf{e}^{(l)}_u`,
      :math:`\mathbf{e}^*_i = \sum_{l=0}^{L} \mathbf{e}^{(l)}_i`, each propagated layer
      L2-normalised (authors' code), :math:`\hat{y}(u,i) = \mathbf{e}^{*\top}_u \mathbf{e}^*_i`;
      trained with BPR plus :math:`\lambda` times the L2 norm of the batch's ego embeddings plus
      ``independence_weight`` :math:`\cdot\, \mathcal{L}_{IND}` (Eq. 15).

    As in the authors' code, training drops KG edges and interactions with probability
    ``node_dropout`` (kept interactions scaled by :math:`1/(1-p)`, the KG mean taken over the kept
    edges) and applies dropout ``mess_dropout`` to every layer's output before normalisation; both
    are off in ``eval()`` mode. One forward is a gather and an ``index_add_`` over the KG edges and
    the interactions per layer; nothing loops over users, items, edges or relations. The last layer
    aggregates only edges whose head is an item (entities' last layer is never read).

    Args:
        num_users: number of users :math:`U`.
        num_items: number of items :math:`I`.
        ckg: the collaborative KG (``interaction_ckg(data)``); its KG edges (``edge_type >= 2``,
            both directions) are the relational graph. Without KG edges the intents are zero and
            the model reduces to mean aggregation of the users' items.
        train: users × items matrix of the *training* interactions (the intent graph).
        embedding_dim: embedding dimension :math:`d`.
        num_layers: propagation layers :math:`L` (context hops).
        num_intents: number of intents :math:`P`.
        independence: ``"distance"`` (distance correlation) or ``"cosine"``.
        independence_weight: weight of :math:`\mathcal{L}_{IND}`.
        node_dropout: probability of dropping a KG edge or an interaction per training forward.
        mess_dropout: dropout on every propagated layer (training only).
        reg_weight: L2 weight :math:`\lambda` on the batch's ego embeddings.
        user_residual: keep the authors' ``+ m_u`` residual in the user aggregation.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        ckg: CollaborativeKG,
        train: sp.spmatrix,
        embedding_dim: int = 64,
        num_layers: int = 2,
        num_intents: int = 4,
        independence: Independence = "distance",
        independence_weight: float = 1e-4,
        node_dropout: float = 0.5,
        mess_dropout: float = 0.1,
        reg_weight: float = 1e-5,
        user_residual: bool = True,
    ) -> None:
        super().__init__(num_users, num_items)
        if (ckg.num_users, ckg.num_items) != (num_users, num_items):
            raise ValueError(
                f"CKG has {ckg.num_users} users / {ckg.num_items} items, expected {num_users} / {num_items}"
            )
        if train.shape != (num_users, num_items):
            raise ValueError(f"train has shape {train.shape}, expected {(num_users, num_items)}")
        if independence not in ("distance", "cosine"):
            raise ValueError(f"independence must be 'distance' or 'cosine', got {independence!r}")
        if not (0.0 <= node_dropout < 1.0 and 0.0 <= mess_dropout < 1.0):
            raise ValueError("dropout rates must be in [0, 1)")
        if num_intents < 1 or num_layers < 0:
            raise ValueError("need at least one intent and a non-negative number of layers")
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.num_intents = num_intents
        self.independence = independence
        self.independence_weight = independence_weight
        self.node_dropout = node_dropout
        self.mess_dropout = mess_dropout
        self.reg_weight = reg_weight
        self.user_residual = user_residual
        self.num_kg_nodes = num_items + ckg.num_entities  # items first, then entities
        self.num_kg_relations = max(ckg.num_relations - 2, 0)  # KG relations and their inverses

        self.user_embedding = torch.nn.Embedding(num_users, embedding_dim)
        self.entity_embedding = torch.nn.Embedding(self.num_kg_nodes, embedding_dim)
        self.relation_embedding = torch.nn.Parameter(torch.empty(self.num_kg_relations, embedding_dim))
        self.intent_logits = torch.nn.Parameter(torch.empty(num_intents, self.num_kg_relations))

        # Graph buffers: derived from the data, not learned, so not persistent.
        keep = ckg.edge_type >= 2
        head = ckg.edge_index[0, keep] - num_users  # CKG -> KG node space
        tail = ckg.edge_index[1, keep] - num_users
        rel = ckg.edge_type[keep] - 2
        order = torch.argsort(head, stable=True)  # item heads first: the last layer's prefix
        self.register_buffer("kg_head", head[order].contiguous(), persistent=False)
        self.register_buffer("kg_tail", tail[order].contiguous(), persistent=False)
        self.register_buffer("kg_relation", rel[order].contiguous(), persistent=False)
        r = sp.csr_matrix(train, dtype=np.float32)
        r.sum_duplicates()
        coo = r.tocoo()
        deg = np.maximum(np.asarray((r > 0).sum(axis=1)).ravel(), 1).astype(np.float32)
        self.register_buffer("ui_user", torch.from_numpy(coo.row.astype(np.int64)), persistent=False)
        self.register_buffer("ui_item", torch.from_numpy(coo.col.astype(np.int64)), persistent=False)
        self.register_buffer(
            "ui_weight", torch.from_numpy(1.0 / deg[coo.row]).to(torch.float32), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform initialisation of every table, as in the authors' code."""
        torch.nn.init.xavier_uniform_(self.user_embedding.weight)
        torch.nn.init.xavier_uniform_(self.entity_embedding.weight)
        if self.num_kg_relations > 0:
            torch.nn.init.xavier_uniform_(self.relation_embedding)
            torch.nn.init.xavier_uniform_(self.intent_logits)

    # ------------------------------------------------------------------ intents
    def intent_weights(self) -> Tensor:
        r""":math:`\alpha(r,p)` ``[P, 2R]``: for every intent a distribution over relations (Eq. 2)."""
        return torch.softmax(self.intent_logits, dim=1)

    def intents(self) -> Tensor:
        r""":math:`\mathbf{e}_p = \sum_r \alpha(r,p)\,\mathbf{e}_r` ``[P, d]`` (Eq. 1)."""
        return self.intent_weights() @ self.relation_embedding

    def intent_attention(self, user_x: Tensor, intents: Tensor | None = None) -> Tensor:
        r""":math:`\beta(u,p) = \operatorname{softmax}_p(\mathbf{e}_p^\top \mathbf{e}_u)` ``[U, P]``
        for user representations ``user_x`` ``[U, d]`` (Eq. 8)."""
        intents = self.intents() if intents is None else intents
        return torch.softmax(user_x @ intents.t(), dim=1)

    def independence_loss(self) -> Tensor:
        """:func:`independence_loss` of the intents (zero without KG relations)."""
        if self.num_kg_relations == 0:
            return self.relation_embedding.new_zeros(())
        return independence_loss(self.intents(), self.independence)

    # ------------------------------------------------------------------ propagation
    def user_aggregation(
        self,
        user_x: Tensor,
        item_x: Tensor,
        intents: Tensor,
        edges: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        r"""One intent graph aggregation (Eq. 7): :math:`(\sum_p \beta(u,p)\mathbf{e}_p) \odot
        \mathbf{m}_u\ (+\ \mathbf{m}_u)` for every user, :math:`\mathbf{m}_u` the (weighted) mean of
        ``item_x`` over the interactions ``edges = (users, items, weights)`` (default: all)."""
        users, items, weight = (self.ui_user, self.ui_item, self.ui_weight) if edges is None else edges
        mean = user_x.new_zeros(self.num_users, item_x.size(1))
        mean = mean.index_add_(0, users, item_x[items] * weight.unsqueeze(1))
        out = (self.intent_attention(user_x, intents) @ intents) * mean
        return out + mean if self.user_residual else out

    def _graph(self) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """KG edges and interactions of this forward (node dropout in training mode)."""
        kg = (self.kg_head, self.kg_tail, self.kg_relation)
        ui = (self.ui_user, self.ui_item, self.ui_weight)
        p = self.node_dropout
        if not self.training or p == 0.0:
            return kg, ui
        keep_kg = torch.rand(self.kg_head.numel(), device=self.kg_head.device) >= p
        keep_ui = torch.rand(self.ui_user.numel(), device=self.ui_user.device) >= p
        kg = tuple(t[keep_kg] for t in kg)
        users, items, weight = (t[keep_ui] for t in ui)
        return kg, (users, items, weight / (1.0 - p))  # type: ignore[return-value]

    def propagate(self) -> tuple[Tensor, Tensor]:
        """Final ``(user [U, d], item [I, d])`` representations: the sum of the ego embeddings
        and of every normalised propagated layer (Eq. 13)."""
        (head, tail, rel), ui = self._graph()
        user_x, ent_x = self.user_embedding.weight, self.entity_embedding.weight
        user_out, item_out = user_x, ent_x[: self.num_items]
        intents = self.intents() if self.num_layers > 0 else None
        num_item_edges = int((head < self.num_items).sum()) if self.num_layers > 0 else 0
        for layer in range(self.num_layers):
            if layer == self.num_layers - 1:  # only the items' last layer is read
                h, t, r = head[:num_item_edges], tail[:num_item_edges], rel[:num_item_edges]
                ent_next = relational_aggregation(ent_x, self.relation_embedding, h, t, r, self.num_items)
            else:
                ent_next = relational_aggregation(
                    ent_x, self.relation_embedding, head, tail, rel, self.num_kg_nodes
                )
            user_next = self.user_aggregation(user_x, ent_x[: self.num_items], intents, ui)  # type: ignore[arg-type]
            if self.training and self.mess_dropout > 0.0:
                ent_next = F.dropout(ent_next, self.mess_dropout)
                user_next = F.dropout(user_next, self.mess_dropout)
            ent_x, user_x = F.normalize(ent_next, dim=1), F.normalize(user_next, dim=1)
            user_out = user_out + user_x
            item_out = item_out + ent_x[: self.num_items]
        return user_out, item_out

    def embeddings(self) -> tuple[Tensor, Tensor]:
        return self.propagate()

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        user_emb, item_emb = self.propagate()
        u, p, n = user_emb[users], item_emb[pos_items], item_emb[neg_items]
        bpr = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        reg = l2_reg(
            self.user_embedding(users), self.entity_embedding(pos_items), self.entity_embedding(neg_items)
        )
        loss = bpr + self.reg_weight * reg
        if self.independence_weight > 0.0:
            loss = loss + self.independence_weight * self.independence_loss()
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_kg_nodes={self.num_kg_nodes}, "
            f"num_kg_relations={self.num_kg_relations}, num_kg_edges={self.kg_head.numel()}, "
            f"embedding_dim={self.embedding_dim}, num_layers={self.num_layers}, "
            f"num_intents={self.num_intents}, independence={self.independence!r}"
        )


class KGINParams(BaseModel):
    """KGIN-specific hyper-parameters (``TrainConfig.params`` when ``model="kgin"``).

    The shared fields keep their meaning: ``embedding_dim``, ``num_layers`` (context hops),
    ``learning_rate``, ``batch_size`` and ``reg_weight`` (L2 on the batch's ego embeddings).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_intents: int = Field(4, ge=1, le=64, description="number of user intents P")
    independence: Independence = Field("distance", description='"distance" correlation or "cosine"')
    independence_weight: float = Field(1e-4, ge=0.0, le=10.0, description="weight of the independence loss")
    node_dropout: float = Field(0.5, ge=0.0, lt=1.0, description="drop rate of KG edges and interactions")
    mess_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on every propagated layer")
    user_residual: bool = Field(True, description="the authors' residual + m_u in the user aggregation")


def build_kgin(config: TrainConfig, data: InteractionData) -> KGIN:
    """KGIN on ``data``'s training interactions and KG (``interaction_ckg``)."""
    params = KGINParams.model_validate(config.params)
    return KGIN(
        data.num_users,
        data.num_items,
        interaction_ckg(data),
        data.train,
        embedding_dim=config.embedding_dim,
        num_layers=config.num_layers,
        num_intents=params.num_intents,
        independence=params.independence,
        independence_weight=params.independence_weight,
        node_dropout=params.node_dropout,
        mess_dropout=params.mess_dropout,
        reg_weight=config.reg_weight,
        user_residual=params.user_residual,
    )


# Defaults: RecBole's KGIN (d 64, 2 hops, 4 intents, distance correlation 1e-4, L2 1e-5, node
# dropout 0.5, message dropout 0.1) with the project's lr 5e-3 / batch 2048, patience 20.
# Chosen on music, validation recall@20 (seed 2020, best epoch): these defaults with patience 10
# 0.359 (40), patience 20 0.371 (64; 30: same); node dropout 0 0.324, 0.7 0.366; message dropout 0
# 0.354; lr 1e-3 0.339 (82); L2 1e-4 0.359; cosine independence 0.359; 3 hops 0.358; without the
# user residual 0.360. ml-100k (seed 2020): patience 10 0.348 (10).
SPEC = register(
    ModelSpec(
        name="kgin",
        family="retriever",
        build=build_kgin,
        needs_kg=True,
        summary="KGIN: user intents over KG relations, relational path-aware aggregation (Wang et al., WWW 2021)",
        params=KGINParams,
        defaults={
            "max_batches_per_epoch": 40,  # as LightGCN's: whole-graph propagation per batch
            "reg_weight": 1e-5,
            "patience": 20,
            "params": {},
        },
        search_space={
            **BPR_SEARCH_SPACE,
            "num_layers": IntDistribution(1, 3),
            "params.node_dropout": FloatDistribution(0.0, 0.6),
            "params.mess_dropout": FloatDistribution(0.0, 0.3),
        },
    )
)
