"""KGCL: knowledge graph contrastive learning over a LightGCN encoder."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from kgrec.features.graph import CollaborativeKG
from kgrec.models.base import EpochHook, Recommender
from kgrec.models.config import BPR_SEARCH_SPACE
from kgrec.models.layers.kgcl_aggregation import RelationAwareAggregation
from kgrec.models.retrievers.kgat import interaction_ckg
from kgrec.models.retrievers.lightgcn import _SymmetricSpMM, normalized_adjacency
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.losses import bpr_loss, l2_reg
from optuna.distributions import FloatDistribution
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig


def info_nce(view1: Tensor, view2: Tensor, index: Tensor, temperature: float) -> Tensor:
    r"""InfoNCE between two views (KGCL's cross-view contrastive loss, as SGL's): for the batch's nodes ``index [B]``, anchor
    :math:`\mathbf{z}'_{n}` = row :math:`n` of ``view1 [N, d]``, positive :math:`\mathbf{z}''_{n}`
    = the same node in ``view2 [N, d]``, negatives every node of ``view2``:

    .. math:: \mathcal{L} = \frac{1}{B}\sum_{b} -\log
        \frac{\exp(s(\mathbf{z}'_{n_b}, \mathbf{z}''_{n_b}) / \tau)}
             {\sum_{j=1}^{N} \exp(s(\mathbf{z}'_{n_b}, \mathbf{z}''_{j}) / \tau)},

    :math:`s` the cosine similarity; the denominator includes the positive, as in the authors'
    ``info_nce_loss_overall``. Averaged over the batch (the authors sum it and sum BPR too: the same
    ratio to our batch-mean BPR). A node repeated in the batch keeps one term per occurrence,
    computed once and weighted by its count (same value and gradient, fewer logits).
    """
    nodes, counts = torch.unique(index, return_counts=True)
    anchors = F.normalize(view1[nodes], dim=-1) / temperature
    logits = anchors @ F.normalize(view2, dim=-1).t()
    per_node = F.cross_entropy(logits, nodes, reduction="none")
    return (per_node * counts).sum() / index.numel()


def consistency_keep_probability(
    consistency: Tensor, mean_keep: float, min_keep: float = 0.3, max_keep: float = 0.95
) -> Tensor:
    r"""Probability that an item's interaction edges survive the knowledge-guided augmentation
    (KGCL's knowledge-guided augmentation, in the authors' ``get_ui_views_weighted``): with :math:`s_i` the item's KG
    structure consistency,

    .. math::
        w_i = \exp(s_i), \quad
        p'_i = \max\Big(\frac{w_i - w_{\min}}{w_{\max} - w_{\min}},\, p_\tau\Big), \quad
        p_i = \min\Big(p_a \frac{p'_i}{\bar{p}'},\, p_{\max}\Big),

    :math:`p_a` = ``mean_keep`` (one minus the interaction dropout ratio), :math:`p_\tau` =
    ``min_keep`` (0.3), :math:`p_{\max}` = ``max_keep`` (0.95). Items whose KG representation is
    *consistent* under KG dropout (little KG noise) keep *more* of their interactions; the noisy
    ones lose more. When every item is equally consistent (no KG) every edge keeps ``mean_keep``.
    """
    w = consistency.exp()
    span = w.max() - w.min()
    if not bool(span > 1e-12):
        return torch.full_like(w, min(mean_keep, max_keep))
    p = ((w - w.min()) / span).clamp(min=min_keep)
    return (mean_keep * p / p.mean()).clamp(max=max_keep)


class KGCL(Recommender):
    r"""KGCL from `"Knowledge Graph Contrastive Learning for Recommendation"
    <https://arxiv.org/abs/2205.00976>`_ (Yang, Huang, Xia, Li, SIGIR 2022).

    A LightGCN encoder whose item inputs come from the knowledge graph, plus a contrastive task
    whose augmentation the KG guides. The formulas follow the paper's method section and the
    authors' code (``yuh-yang/KGCL-SIGIR22``: ``GAT.forward_relation``, ``contrast.py``,
    ``Procedure.BPR_train_contrast``); where they differ the code's choice is noted.

    * **Relation-aware knowledge aggregation** (
      :class:`~kgrec.models.layers.kgcl_aggregation.RelationAwareAggregation`):
      :math:`\mathbf{x}_i = \mathbf{e}_i + \sum_{(i,r,e)} \alpha(i,r,e)\,\mathbf{x}_e` over the item's
      KG edges, attentive over relations; the result is the item's layer-0 input of LightGCN.
    * **KG augmentation and structure consistency**: two views :math:`\eta_1(\mathcal{G}_k),
      \eta_2(\mathcal{G}_k)` of the KG, each KG edge kept with probability :math:`1 - p_k`; the
      consistency of item :math:`i` is :math:`s_i = \cos(f_k(\mathbf{x}_i, \eta_1),
      f_k(\mathbf{x}_i, \eta_2))` (no gradient).
    * **Knowledge-guided interaction augmentation** (:func:`consistency_keep_probability`):
      every training interaction :math:`(u, i)` survives in each of two interaction views with
      probability :math:`p_i`, higher for consistent (less noisy) items. One Bernoulli draw per
      interaction edge; the authors' code draws one per *item* and drops all of its interactions
      together. View :math:`k` propagates
      LightGCN over the kept interactions from the items of KG view :math:`k` (the authors'
      ``view_computer_all``).
    * **Objective**: BPR on the full graph and the full KG + :math:`\lambda` times InfoNCE
      (:func:`info_nce`, temperature :math:`\tau`) between the two views' users of the batch and
      between their positive items, + L2 on the batch's ego embeddings; and, per epoch, the
      authors' KG loss (TransE, :math:`-\ln\sigma(\lVert h+r-t'\rVert^2 - \lVert h+r-t\rVert^2)`,
      corrupted tail :math:`t'`) with its own Adam (:meth:`epoch_hooks`).

    The four views (two KG masks, two interaction adjacencies) are drawn once per epoch, as in
    the authors' code: at :meth:`reset_parameters` for the first epoch, then by the
    ``kgcl_views`` epoch hook after each epoch, from the global torch RNG. Each training batch
    propagates three graphs (full, view 1, view 2); the per-epoch cost stays linear in the data
    through ``max_batches_per_epoch``, as for LightGCN. Scores (:meth:`embeddings`) use the full
    graph and the full KG.

    With ``ssl_weight=0``, ``kg_aggregation=False`` the model *is* LightGCN (same parameters, same
    scores); ``kg_augmentation=False`` keeps the KG out of the augmentation (uniform edge dropout:
    SGL-ED's views).

    Args:
        num_users, num_items: :math:`U`, :math:`I`.
        ckg: the collaborative KG of the training data (``data.ckg``; its KG edges leaving items and
            its forward KG triples are used, the interaction edges are not).
        train: users × items training matrix (the interaction graph).
        embedding_dim: :math:`d`.
        num_layers: LightGCN layers.
        reg_weight: L2 weight on the batch's ego embeddings.
        ssl_weight: :math:`\lambda` of the InfoNCE terms (paper: 0.1).
        temperature: :math:`\tau` (paper: 0.2).
        kg_drop: KG edge dropout of each KG view, :math:`p_k` (paper: 0.5).
        ui_drop: mean interaction dropout of each interaction view, :math:`1 - p_a`.
        min_keep, max_keep: :math:`p_\tau` (0.3) and the cap (0.95) of the keep probability.
        kg_aggregation: ``False``: item inputs are the item embeddings alone (no KG encoder).
        kg_augmentation: ``False``: the KG views are the full KG, so every item is equally
            consistent and the interaction dropout is uniform.
        kg_dropout: dropout of the attention coefficients in training.
        kg_loss: run the per-epoch TransE step.
        kg_learning_rate, kg_reg_weight, kg_batch_size, max_kg_batches_per_epoch: the TransE step's
            Adam learning rate, its L2 weight (authors: 1e-3), triples per step, steps per epoch
            at most (beyond, the batch grows).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        ckg: CollaborativeKG,
        train: sp.spmatrix,
        embedding_dim: int = 64,
        num_layers: int = 2,
        reg_weight: float = 1e-4,
        ssl_weight: float = 0.1,
        temperature: float = 0.2,
        kg_drop: float = 0.5,
        ui_drop: float = 0.1,
        min_keep: float = 0.3,
        max_keep: float = 0.95,
        kg_aggregation: bool = True,
        kg_augmentation: bool = True,
        kg_dropout: float = 0.0,
        kg_loss: bool = True,
        kg_learning_rate: float = 1e-3,
        kg_reg_weight: float = 1e-3,
        kg_batch_size: int = 4096,
        max_kg_batches_per_epoch: int | None = 40,
    ) -> None:
        super().__init__(num_users, num_items)
        if train.shape != (num_users, num_items):
            raise ValueError(f"train has shape {train.shape}, expected {(num_users, num_items)}")
        if (ckg.num_users, ckg.num_items) != (num_users, num_items):
            raise ValueError(
                f"CKG has {ckg.num_users} users / {ckg.num_items} items, expected {num_users} / {num_items}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for name, value in (("kg_drop", kg_drop), ("ui_drop", ui_drop)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.reg_weight = reg_weight
        self.ssl_weight = ssl_weight
        self.temperature = temperature
        self.kg_drop = kg_drop
        self.ui_drop = ui_drop
        self.min_keep = min_keep
        self.max_keep = max_keep
        self.kg_aggregation = kg_aggregation
        self.kg_augmentation = kg_augmentation
        self.kg_loss = kg_loss
        self.kg_learning_rate = kg_learning_rate
        self.kg_reg_weight = kg_reg_weight
        self.kg_batch_size = kg_batch_size
        self.max_kg_batches_per_epoch = max_kg_batches_per_epoch
        self.num_entities = ckg.num_entities
        self.num_kg_nodes = num_items + ckg.num_entities
        self.num_relations = ckg.num_relations

        self.user_embedding = torch.nn.Embedding(num_users, embedding_dim)
        self.item_embedding = torch.nn.Embedding(num_items, embedding_dim)
        self.entity_embedding = torch.nn.Embedding(ckg.num_entities, embedding_dim)
        self.relation_embedding = torch.nn.Embedding(ckg.num_relations, embedding_dim)
        self.aggregator = RelationAwareAggregation(embedding_dim, dropout=kg_dropout)

        # Derived from the data (moved by .to(), not saved).
        self.register_buffer(
            "adj_t", normalized_adjacency(train, num_users, num_items), persistent=False
        )
        coo = sp.csr_matrix(train).tocoo()
        self._train_users = coo.row.astype(np.int64)
        self._train_items = coo.col.astype(np.int64)
        head, tail = ckg.edge_index[0].to(torch.int64), ckg.edge_index[1].to(torch.int64)
        rel = ckg.edge_type.to(torch.int64)
        from_item = (rel >= 2) & (head >= num_users) & (head < num_users + num_items)
        self.register_buffer("kg_head", head[from_item] - num_users, persistent=False)  # item idx
        self.register_buffer("kg_tail", tail[from_item] - num_users, persistent=False)  # KG node idx
        self.register_buffer("kg_relation", rel[from_item], persistent=False)
        forward = (rel >= 2) & (rel % 2 == 0)  # each KG triple once (h, r, t), KG node space
        self._triples = torch.stack([head[forward] - num_users, rel[forward], tail[forward] - num_users])
        self._views: list[tuple[Tensor, Tensor]] = []
        self.item_consistency: Tensor = torch.ones(num_items)
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters and views
    def reset_parameters(self) -> None:
        """Xavier-normal embeddings (as LightGCN here), a fresh attention layer, and the first
        epoch's views."""
        torch.nn.init.xavier_normal_(self.user_embedding.weight)
        torch.nn.init.xavier_normal_(self.item_embedding.weight)
        if self.entity_embedding.weight.numel():
            torch.nn.init.xavier_normal_(self.entity_embedding.weight)
        torch.nn.init.xavier_normal_(self.relation_embedding.weight)
        self.aggregator.reset_parameters()
        self.refresh_views()

    def kg_nodes(self) -> Tensor:
        """Embeddings of the KG node space ``[I + E, d]`` (items, then entities)."""
        return torch.cat([self.item_embedding.weight, self.entity_embedding.weight], dim=0)

    def uses_kg(self) -> bool:
        return self.kg_aggregation and self.kg_head.numel() > 0

    def logit_tables(self) -> tuple[Tensor, Tensor] | None:
        """The attention's per-(node, relation) logit terms, shared by the full KG and its views
        within one loss (``None`` without the KG encoder)."""
        if not self.uses_kg():
            return None
        return self.aggregator.logit_tables(
            self.item_embedding.weight, self.kg_nodes(), self.relation_embedding.weight
        )

    def item_inputs(self, kg_mask: Tensor | None = None, tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Layer-0 item representations ``[I, d]``: the knowledge aggregation over the KG edges
        kept by ``kg_mask`` (all of them when ``None``), or the item embeddings alone;
        ``tables``: :meth:`logit_tables` of the current parameters, when already computed."""
        if not self.uses_kg():
            return self.item_embedding.weight
        head, tail, rel = self.kg_head, self.kg_tail, self.kg_relation
        if kg_mask is not None:
            head, tail, rel = head[kg_mask], tail[kg_mask], rel[kg_mask]
        return self.aggregator(
            self.item_embedding.weight, self.kg_nodes(), self.relation_embedding.weight, head, tail, rel, tables
        )

    def kg_view_masks(self) -> tuple[Tensor, Tensor]:
        """Two independent KG edge masks, each edge kept with probability ``1 - kg_drop``."""
        n = self.kg_head.numel()
        device = self.kg_head.device
        if not self.kg_augmentation:
            keep = torch.ones(n, dtype=torch.bool, device=device)
            return keep, keep
        return tuple(torch.rand(n, device=device) >= self.kg_drop for _ in range(2))  # type: ignore[return-value]

    @torch.no_grad()
    def structure_consistency(self, mask1: Tensor, mask2: Tensor) -> Tensor:
        r""":math:`s_i = \cos(f_k(\mathbf{x}_i, \eta_1), f_k(\mathbf{x}_i, \eta_2))` for every item ``[I]``
        (attention dropout off)."""
        was_training = self.aggregator.training
        self.aggregator.eval()
        try:
            return F.cosine_similarity(self.item_inputs(mask1), self.item_inputs(mask2), dim=-1)
        finally:
            self.aggregator.train(was_training)

    def interaction_view(self, keep_probability: Tensor) -> tuple[np.ndarray, Tensor]:
        """One knowledge-guided interaction view: every training pair ``(u, i)`` kept with
        probability ``keep_probability[i]``; returns the kept mask over the training pairs (COO
        order) and the view's normalised adjacency (on the model's device)."""
        p = keep_probability.detach().cpu()[torch.from_numpy(self._train_items)]
        kept = (torch.rand(p.numel()) < p).numpy()
        view = sp.csr_matrix(
            (np.ones(int(kept.sum()), np.float32), (self._train_users[kept], self._train_items[kept])),
            shape=(self.num_users, self.num_items),
        )
        adj = normalized_adjacency(view, self.num_users, self.num_items).to(self.adj_t.device)
        return kept, adj

    @torch.no_grad()
    def refresh_views(self) -> dict[str, float]:
        """Draw this epoch's two KG views, the items' consistency and the two interaction views."""
        mask1, mask2 = self.kg_view_masks()
        self.item_consistency = self.structure_consistency(mask1, mask2)
        keep = consistency_keep_probability(
            self.item_consistency, 1.0 - self.ui_drop, self.min_keep, self.max_keep
        )
        views, kept_ratio = [], 0.0
        for mask in (mask1, mask2):
            kept, adj = self.interaction_view(keep)
            views.append((mask, adj))
            kept_ratio += float(kept.mean()) / 2 if kept.size else 0.0
        self._views = views
        return {"consistency_mean": float(self.item_consistency.mean()), "ui_keep_ratio": kept_ratio}

    # ------------------------------------------------------------------ propagation and losses
    def propagate(self, adj: Tensor, item_x: Tensor) -> Tensor:
        """LightGCN over ``adj`` from the user embeddings and ``item_x``: ``[U + I, d]``."""
        x = torch.cat([self.user_embedding.weight, item_x], dim=0)
        out = x
        for _ in range(self.num_layers):
            x = _SymmetricSpMM.apply(adj, x)
            out = out + x
        return out / (self.num_layers + 1)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        out = self.propagate(self.adj_t, self.item_inputs())
        return out[: self.num_users], out[self.num_users :]

    def contrastive_loss(
        self, users: Tensor, items: Tensor, tables: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """InfoNCE of the batch's users and items between the epoch's two views."""
        device = self.user_embedding.weight.device
        if self._views[0][1].device != device:  # drawn before the model moved
            self._views = [(m.to(device), a.to(device)) for m, a in self._views]
        (mask1, adj1), (mask2, adj2) = self._views
        u = self.num_users
        if tables is None:
            tables = self.logit_tables()
        v1 = self.propagate(adj1, self.item_inputs(mask1, tables))
        v2 = self.propagate(adj2, self.item_inputs(mask2, tables))
        users1, items1, users2, items2 = v1[:u], v1[u:], v2[:u], v2[u:]
        return info_nce(users1, users2, users, self.temperature) + info_nce(
            items1, items2, items, self.temperature
        )

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        tables = self.logit_tables()
        out = self.propagate(self.adj_t, self.item_inputs(None, tables))
        user_emb, item_emb = out[: self.num_users], out[self.num_users :]
        u, p, n = user_emb[users], item_emb[pos_items], item_emb[neg_items]
        loss = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        loss = loss + self.reg_weight * l2_reg(
            self.user_embedding(users), self.item_embedding(pos_items), self.item_embedding(neg_items)
        )
        if self.ssl_weight > 0:
            loss = loss + self.ssl_weight * self.contrastive_loss(users, pos_items, tables)
        return loss

    # ------------------------------------------------------------------ KG loss (TransE)
    def transe_loss(self, head: Tensor, relation: Tensor, tail: Tensor, neg_tail: Tensor) -> Tensor:
        """The authors' KG loss (``calc_kg_loss_transE``) on KG-node-space triples."""
        nodes = self.kg_nodes()
        h, t, t_neg = nodes[head], nodes[tail], nodes[neg_tail]
        r = self.relation_embedding(relation)
        pos = (h + r - t).pow(2).sum(-1)
        neg = (h + r - t_neg).pow(2).sum(-1)
        return -F.logsigmoid(neg - pos).mean() + self.kg_reg_weight * l2_reg(h, r, t, t_neg)

    def kg_epoch(self, optimizer: torch.optim.Optimizer) -> float:
        """One shuffled pass of :meth:`transe_loss` over the KG triples (tails corrupted
        uniformly over the KG nodes); returns the mean loss."""
        triples = self._triples
        n = triples.size(1)
        batch = self.kg_batch_size
        if self.max_kg_batches_per_epoch is not None:
            batch = max(batch, math.ceil(n / self.max_kg_batches_per_epoch))
        device = self.item_embedding.weight.device
        perm = torch.randperm(n)
        total = 0.0
        for start in range(0, n, batch):
            h, r, t = triples[:, perm[start : start + batch]].to(device)
            t_neg = torch.randint(self.num_kg_nodes, t.shape, device=device)
            loss = self.transe_loss(h, r, t, t_neg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * h.numel()
        return total / max(n, 1)

    def epoch_hooks(self) -> list[EpochHook]:
        """After the trainer's BPR + InfoNCE pass: the TransE step (its own Adam over the item,
        entity and relation embeddings; skipped without KG triples or with ``kg_loss=False``),
        then the next epoch's views. Stats ``kg_loss``, ``kg_seconds``, ``consistency_mean``,
        ``ui_keep_ratio``, ``view_seconds``."""
        hooks: list[EpochHook] = []
        if self.kg_loss and self._triples.size(1) > 0:

            def transe(optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
                t0 = time.perf_counter()
                loss = self.kg_epoch(optimizer) if optimizer is not None else float("nan")
                return {"kg_loss": loss, "kg_seconds": time.perf_counter() - t0}

            params = (self.item_embedding.weight, self.entity_embedding.weight, self.relation_embedding.weight)
            hooks.append(EpochHook("transe", transe, params, self.kg_learning_rate))

        def views(_optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
            t0 = time.perf_counter()
            stats = self.refresh_views()
            return {**stats, "view_seconds": time.perf_counter() - t0}

        hooks.append(EpochHook("kgcl_views", views))
        return hooks

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_entities={self.num_entities}, "
            f"kg_edges={self.kg_head.numel()}, embedding_dim={self.embedding_dim}, "
            f"num_layers={self.num_layers}, ssl_weight={self.ssl_weight}, "
            f"temperature={self.temperature}, kg_drop={self.kg_drop}, ui_drop={self.ui_drop}"
        )


class KGCLParams(BaseModel):
    """KGCL-specific hyper-parameters (``TrainConfig.params`` when ``model="kgcl"``); the shared
    fields (``embedding_dim``, ``num_layers``, ``learning_rate``, ``batch_size``, ``reg_weight``)
    keep their LightGCN meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ssl_weight: float = Field(0.1, ge=0.0, le=10.0, description="lambda of the InfoNCE terms")
    temperature: float = Field(0.2, gt=0.0, le=10.0, description="InfoNCE temperature tau")
    kg_drop: float = Field(0.5, ge=0.0, lt=1.0, description="KG edge dropout of each KG view")
    ui_drop: float = Field(0.1, ge=0.0, lt=1.0, description="mean interaction dropout of each view")
    min_keep: float = Field(0.3, ge=0.0, le=1.0, description="p_tau: floor of the normalised keep weight")
    max_keep: float = Field(0.95, gt=0.0, le=1.0, description="cap of an edge's keep probability")
    kg_aggregation: bool = True
    kg_augmentation: bool = True
    kg_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="attention dropout of the KG encoder")
    kg_loss: bool = True
    kg_learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam lr of the TransE step")
    kg_reg_weight: float = Field(1e-3, ge=0.0, le=10.0)
    kg_batch_size: int = Field(4096, ge=1)
    max_kg_batches_per_epoch: int | None = Field(40, ge=1)


def build_kgcl(config: TrainConfig, data: InteractionData) -> KGCL:
    """KGCL on ``data``'s training CKG (the interaction graph alone when ``data`` has no KG)."""
    params = KGCLParams.model_validate(config.params)
    return KGCL(
        data.num_users,
        data.num_items,
        interaction_ckg(data),
        data.train,
        embedding_dim=config.embedding_dim,
        num_layers=config.num_layers,
        reg_weight=config.reg_weight,
        **params.model_dump(),
    )


# Defaults: the paper's (lambda 0.1, KG dropout 0.5, p_tau 0.3, cap 0.95, the TransE step; ui_drop
# 0.1 its Yelp2018 setting) on our LightGCN's training settings (lr 5e-3, batch 2048, 2 layers, L2
# 1e-4, 40 batches per epoch at most), so that kgcl vs lightgcn isolates what KGCL adds. Only tau
# differs from the paper (0.2): validation Recall@20 on music, seed 2020, one run each (<= 175 s;
# LightGCN 0.385): tau 0.2 0.371, tau 0.5 0.393 (kept), tau 1.0 0.389; at tau 0.5 ui_drop 0.3
# 0.390, lambda 0.3 0.381; lambda 0 (KG encoder + TransE alone) 0.389. Differences of ~0.005
# are within one seed's noise.
SPEC = register(
    ModelSpec(
        name="kgcl",
        family="retriever",
        build=build_kgcl,
        needs_kg=True,
        summary="KGCL: KG-guided contrastive LightGCN (Yang et al., SIGIR 2022)",
        params=KGCLParams,
        defaults={"max_batches_per_epoch": 40, "params": {"temperature": 0.5}},
        search_space={
            **BPR_SEARCH_SPACE,
            "params.ssl_weight": FloatDistribution(0.01, 1.0, log=True),
            "params.temperature": FloatDistribution(0.1, 1.0, log=True),
            "params.kg_drop": FloatDistribution(0.1, 0.7),
            "params.ui_drop": FloatDistribution(0.0, 0.5),
        },
    )
)
