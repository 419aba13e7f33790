"""KGAT: knowledge graph attention network over the collaborative knowledge graph."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from kgrec.features.graph import CollaborativeKG, ckg_relation_names
from kgrec.models.base import EpochHook, Recommender
from kgrec.models.config import BPR_SEARCH_SPACE, TrainConfig
from kgrec.models.layers.kgat_conv import Aggregator, AttentiveAdjacency, KGATConv
from kgrec.models.layers.transr import TailCorruptor, grouped_project, relation_groups, transr_loss
from kgrec.models.retrievers.bprmf import BPRMF
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.losses import bpr_loss, l2_reg
from kgrec.models.training.pairwise import fit
from optuna.distributions import FloatDistribution
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor
from torch_geometric.utils import softmax

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData

TransRRelations = Literal["kg", "all"]
ATTENTION_CHUNK = 1 << 18  # edges per block of the attention update


class KGAT(Recommender):
    r"""KGAT from `"KGAT: Knowledge Graph Attention Network for Recommendation"
    <https://arxiv.org/abs/1905.07854>`_ (Wang et al., KDD 2019).

    Nodes of the collaborative knowledge graph (CKG: users, items, entities; the interaction
    relation and every KG relation, each with its inverse) share one embedding table
    :math:`\mathbf{E}^{(0)}`. Three parts (§3):

    * **Embedding layer** -- TransR (Eq. 1-2): :math:`g(h,r,t) = \lVert \mathbf{W}_r\mathbf{e}_h
      + \mathbf{e}_r - \mathbf{W}_r\mathbf{e}_t \rVert_2^2` and
      :math:`\mathcal{L}_{KG} = \sum -\ln\sigma(g(h,r,t') - g(h,r,t))` over triples with a uniformly
      corrupted tail :math:`t'`, plus L2 on the batch's embeddings.
    * **Attentive propagation** -- knowledge-aware attention (Eq. 4-5)
      :math:`\pi(h,r,t) = (\mathbf{W}_r\mathbf{e}_t)^\top \tanh(\mathbf{W}_r\mathbf{e}_h + \mathbf{e}_r)`,
      softmax-normalised over each head's outgoing edges, and :math:`L` layers of
      :class:`~kgrec.models.layers.kgat_conv.KGATConv` (Eq. 3, 6-9) with message dropout.
    * **Prediction** (Eq. 11-12) -- :math:`\mathbf{e}^*_u = \mathbf{e}^{(0)}_u \| \cdots \|
      \mathbf{e}^{(L)}_u` (each propagated layer L2-normalised, as in the authors' code) and
      :math:`\hat{y}(u,i) = \mathbf{e}^{*\top}_u \mathbf{e}^*_i`, trained with BPR (Eq. 13) plus
      :math:`\lambda` times the L2 norm of the batch's final embeddings.

    Optimisation alternates (§3.4.1, Eq. 14) as in the authors' code: the trainer's BPR pass
    (its Adam) updates everything but the TransR-only parameters; the epoch hook (:meth:`epoch_hooks`)
    then runs one pass of :math:`\mathcal{L}_{KG}` over the KG triples with a second Adam
    (the authors' code keeps two optimisers: moment estimates of two losses of different scale
    are not mixed, and the KG step gets its own learning rate), and finally recomputes the
    attention of every CKG edge once, without gradient (the authors' ``update_attentive_A``).
    The attention is a persistent buffer aligned with :attr:`edge_index` (the CKG's edge order),
    so a saved ``state_dict`` reproduces the scores exactly.

    The attention-weighted adjacency is a sparse CSR matrix with a precomputed transpose for the
    backward (:class:`~kgrec.models.layers.kgat_conv.AttentiveAdjacency`); TransR projections are grouped
    by relation (:func:`~kgrec.models.layers.transr.relation_project`). Nothing loops over users, nodes or
    edges.

    Args:
        num_users: number of users :math:`U`.
        num_items: number of items :math:`I`.
        ckg: the collaborative KG built from the *training* interactions (``data.ckg``).
        embedding_dim: dimension :math:`d_0` of node embeddings (and TransR's entity space).
        layer_sizes: output dimension of each propagation layer (paper: 64, 32, 16).
        aggregator: ``"bi"`` (bi-interaction, default), ``"gcn"`` or ``"graphsage"``.
        mess_dropout: message dropout of every layer.
        relation_dim: dimension :math:`k` of relation embeddings (TransR's relation space).
        reg_weight: L2 weight :math:`\lambda` on the CF batch's final embeddings.
        kg_reg_weight: L2 weight on the KG batch's embeddings (heads, relations, both tails).
        kg_batch_size: triples per TransR mini-batch.
        max_kg_batches_per_epoch: the TransR pass takes at most this many steps; on a larger KG
            its batch grows to ``ceil(triples / max_kg_batches_per_epoch)`` (``None``: never), so
            that an epoch's optimiser steps over the whole node table stay bounded (issue 16).
        kg_learning_rate: learning rate of the KG step's Adam.
        transr_relations: ``"kg"`` trains TransR on the KG relations (and inverses) only;
            ``"all"`` also on interact / rev_interact, as the authors' code does.
        use_attention: ``False`` keeps the uniform :math:`1/|\mathcal{N}_h|` weights (the paper's
            "w/o Att" ablation); the KG step still runs.
        kg_step: ``False`` skips the TransR step (the "w/o KGE" ablation).
        pretrained: optional ``(user_emb [U, d0], item_emb [I, d0])`` (e.g. from BPR-MF, see
            :func:`pretrain_from_bprmf`): kept as non-persistent buffers and copied into the
            embedding table by every :meth:`reset_parameters`, so they survive ``fit(reset=True)``.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        ckg: CollaborativeKG,
        embedding_dim: int = 64,
        layer_sizes: Sequence[int] = (64, 32, 16),
        aggregator: Aggregator = "bi",
        mess_dropout: float = 0.1,
        relation_dim: int = 64,
        reg_weight: float = 1e-5,
        kg_reg_weight: float = 1e-5,
        kg_batch_size: int = 8192,
        max_kg_batches_per_epoch: int | None = 40,
        kg_learning_rate: float = 1e-3,
        transr_relations: TransRRelations = "kg",
        use_attention: bool = True,
        kg_step: bool = True,
        pretrained: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__(num_users, num_items)
        if (ckg.num_users, ckg.num_items) != (num_users, num_items):
            raise ValueError(
                f"CKG has {ckg.num_users} users / {ckg.num_items} items, expected {num_users} / {num_items}"
            )
        if transr_relations not in ("kg", "all"):
            raise ValueError(f"transr_relations must be 'kg' or 'all', got {transr_relations!r}")
        self.num_nodes = ckg.num_nodes
        self.num_relations = ckg.num_relations
        self.embedding_dim = embedding_dim
        self.layer_sizes = tuple(int(s) for s in layer_sizes)
        self.aggregator = aggregator
        self.relation_dim = relation_dim
        self.reg_weight = reg_weight
        self.kg_reg_weight = kg_reg_weight
        self.kg_batch_size = kg_batch_size
        self.max_kg_batches_per_epoch = max_kg_batches_per_epoch
        self.kg_learning_rate = kg_learning_rate
        self.transr_relations = transr_relations
        self.use_attention = use_attention
        self.kg_step = kg_step

        self.node_embedding = torch.nn.Embedding(self.num_nodes, embedding_dim)
        self.relation_embedding = torch.nn.Embedding(self.num_relations, relation_dim)
        self.relation_weight = torch.nn.Parameter(
            torch.empty(self.num_relations, embedding_dim, relation_dim)
        )
        dims = (embedding_dim, *self.layer_sizes)
        self.convs = torch.nn.ModuleList(
            KGATConv(dims[k], dims[k + 1], aggregator, mess_dropout) for k in range(len(dims) - 1)
        )

        # The graph (derived from the data; moved by .to(), not saved) ...
        edge_index = ckg.edge_index.to(torch.int64)
        edge_type = ckg.edge_type.to(torch.int64)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self.register_buffer("edge_type", edge_type, persistent=False)
        # The attention needs W_r e for every (relation, node) pair at an end of an edge; many edges
        # share one (a user's interact edges, an entity's many items): project each pair once.
        n = self.num_nodes
        pair_keys = torch.cat([edge_type * n + edge_index[0], edge_type * n + edge_index[1]])
        pairs, pair_of_end = torch.unique(pair_keys, return_inverse=True)  # sorted by relation
        num_edges = edge_index.size(1)
        self.register_buffer("_att_nodes", pairs % n, persistent=False)
        self.register_buffer("_att_head", pair_of_end[:num_edges], persistent=False)
        self.register_buffer("_att_tail", pair_of_end[num_edges:], persistent=False)
        self._att_counts = torch.bincount(pairs // n, minlength=self.num_relations).tolist()
        self.adjacency = AttentiveAdjacency(edge_index, self.num_nodes)
        # ... and the learned attention (saved).
        self.register_buffer("attention_weights", torch.zeros(edge_index.size(1)))

        # TransR triples and their corrupted-tail ranges (CPU: sampled there, moved per batch).
        keep = edge_type >= 2 if transr_relations == "kg" else torch.ones_like(edge_type, dtype=torch.bool)
        self._kg_triples = torch.stack([edge_index[0], edge_type, edge_index[1]])[:, keep]
        low = torch.full((self.num_relations,), num_users, dtype=torch.int64)  # items + entities
        high = torch.full((self.num_relations,), self.num_nodes, dtype=torch.int64)
        low[0], high[0] = num_users, num_users + num_items  # interact: user -> item
        low[1], high[1] = 0, num_users  # rev_interact: item -> user
        self._corruptor = TailCorruptor(self._kg_triples, self.num_nodes, self.num_relations, low, high)

        if pretrained is not None:
            user_emb, item_emb = (t.detach().to(torch.float32).cpu() for t in pretrained)
            if user_emb.shape != (num_users, embedding_dim) or item_emb.shape != (
                num_items,
                embedding_dim,
            ):
                raise ValueError(
                    f"pretrained embeddings have shapes {tuple(user_emb.shape)}, "
                    f"{tuple(item_emb.shape)}; expected ({num_users}, {embedding_dim}), "
                    f"({num_items}, {embedding_dim})"
                )
            self.register_buffer("pretrained_user", user_emb, persistent=False)
            self.register_buffer("pretrained_item", item_emb, persistent=False)
        else:
            self.pretrained_user: Tensor | None = None
            self.pretrained_item: Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_adjacency())
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters and attention
    def reset_parameters(self) -> None:
        """Xavier initialisation (as the authors' code), then the pretrained user/item embeddings
        if any; the attention restarts uniform (the random-walk normalised adjacency)."""
        torch.nn.init.xavier_uniform_(self.node_embedding.weight)
        torch.nn.init.xavier_uniform_(self.relation_embedding.weight)
        torch.nn.init.xavier_uniform_(self.relation_weight)
        if self.pretrained_user is not None and self.pretrained_item is not None:
            with torch.no_grad():
                u, i = self.num_users, self.num_items
                self.node_embedding.weight[:u] = self.pretrained_user
                self.node_embedding.weight[u : u + i] = self.pretrained_item
        for conv in self.convs:
            conv.reset_parameters()
        with torch.no_grad():
            self.attention_weights.copy_(self._uniform_attention())
        self._sync_adjacency()

    def _uniform_attention(self) -> Tensor:
        head = self.edge_index[0]
        deg = torch.bincount(head, minlength=self.num_nodes).clamp(min=1)
        return 1.0 / deg[head].to(torch.float32)

    def _sync_adjacency(self) -> None:
        self.adjacency.set_values(self.attention_weights)

    @torch.no_grad()
    def attention_scores(self) -> Tensor:
        r"""Unnormalised :math:`\pi(h,r,t) = (\mathbf{W}_r\mathbf{e}_t)^\top
        \tanh(\mathbf{W}_r\mathbf{e}_h + \mathbf{e}_r)` of every CKG edge ``[E]`` (Eq. 4)."""
        emb = self.node_embedding.weight[self._att_nodes]
        proj = grouped_project(emb, self._att_counts, self.relation_weight)  # one row per pair
        rel = self.relation_embedding.weight
        # In chunks of edges: gathering [E, d] heads and tails at once peaked at several GB at 2M
        # interactions, more than the whole CF step.
        scores = torch.empty(self.edge_type.numel(), device=proj.device)
        for start in range(0, scores.numel(), ATTENTION_CHUNK):
            end = start + ATTENTION_CHUNK
            head = proj[self._att_head[start:end]].add_(rel[self.edge_type[start:end]]).tanh_()
            scores[start:end] = (proj[self._att_tail[start:end]] * head).sum(-1)
        return scores

    @torch.no_grad()
    def update_attention(self) -> None:
        """Recompute the attention of every edge (softmax over each head's outgoing edges, Eq. 5)."""
        if self.use_attention:
            att = softmax(self.attention_scores(), self.edge_index[0], num_nodes=self.num_nodes)
        else:
            att = self._uniform_attention().to(self.attention_weights.device)
        self.attention_weights.copy_(att)
        self._sync_adjacency()

    def attention(self) -> Tensor:
        """Current attention ``[E]`` aligned with :attr:`edge_index` / :attr:`edge_type` (the order
        of ``data.ckg``); for every head node its outgoing weights sum to one."""
        return self.attention_weights.detach().clone()

    # ------------------------------------------------------------------ propagation and CF loss
    def propagate(self, nodes: Tensor | None = None) -> Tensor:
        """Final representations ``[N, d0 + sum(layer_sizes)]`` of every CKG node (Eq. 11), or
        ``[len(nodes), ...]`` of the given nodes only: all layers but the last need every node, the
        last one, the L2 normalisation and the concatenation only the requested rows (a CF
        mini-batch touches a few thousand users and items, not the entities)."""
        x = self.node_embedding.weight
        outs = [x if nodes is None else x[nodes]]
        last = len(self.convs) - 1
        for k, conv in enumerate(self.convs):
            x = conv(x, self.adjacency, rows=nodes if k == last else None)
            outs.append(F.normalize(x if nodes is None or k == last else x[nodes], p=2, dim=1))
        return torch.cat(outs, dim=1)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        out = self.propagate()
        u, i = self.num_users, self.num_items
        return out[:u], out[u : u + i]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        nodes = torch.cat([users, self.num_users + pos_items, self.num_users + neg_items])
        unique, inverse = torch.unique(nodes, return_inverse=True)
        u_e, p_e, n_e = self.propagate(unique)[inverse].split(users.numel())
        bpr = bpr_loss((u_e * p_e).sum(-1), (u_e * n_e).sum(-1))
        return bpr + self.reg_weight * l2_reg(u_e, p_e, n_e)

    # ------------------------------------------------------------------ KG step
    def kg_loss(self, head: Tensor, relation: Tensor, pos_tail: Tensor, neg_tail: Tensor) -> Tensor:
        """TransR loss (Eq. 2) of a batch plus ``kg_reg_weight`` times L2 of its embeddings."""
        order, counts = relation_groups(relation, self.num_relations)  # sort ids, not embeddings
        return self._sorted_kg_loss(head[order], relation[order], pos_tail[order], neg_tail[order], counts)

    def _sorted_kg_loss(
        self, head: Tensor, relation: Tensor, pos_tail: Tensor, neg_tail: Tensor, counts: list[int]
    ) -> Tensor:
        """:meth:`kg_loss` of a batch already sorted by relation, ``counts[r]`` rows of each."""
        nodes = self.node_embedding(torch.cat([head, pos_tail, neg_tail]))
        e_h, e_t, e_n = nodes.split(head.numel())
        e_r = self.relation_embedding(relation)
        loss = transr_loss(e_h, e_t, e_n, e_r, relation, self.relation_weight, counts)
        return loss + self.kg_reg_weight * l2_reg(e_h, e_r, e_t, e_n)

    def kg_parameters(self) -> tuple[torch.nn.Parameter, ...]:
        """What the TransR step trains: node and relation embeddings, relation projections."""
        return (self.node_embedding.weight, self.relation_embedding.weight, self.relation_weight)

    def kg_epoch(self, optimizer: torch.optim.Optimizer, max_triples: int | None = None) -> float:
        """One shuffled pass of the TransR loss over the KG triples (at most ``max_triples`` of
        them, drawn uniformly) with ``optimizer``; returns the mean loss."""
        triples = self._kg_triples
        device = self.node_embedding.weight.device
        pinned = device.type == "cuda"
        perm = torch.randperm(triples.size(1))[:max_triples]
        batch_size = self.kg_step_batch_size(perm.numel())
        # Nothing in the loop waits for the device: the batch is sorted by relation on the CPU,
        # where it is sampled (the grouped projection needs the rows per relation as Python ints,
        # which from device ids would cost a copy back and a sync per batch), goes over in one
        # pinned asynchronous copy, and the loss is summed on the device (float64, as the Python
        # float it replaces) -- so the CPU samples the next batch while the GPU runs this one.
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, perm.numel(), batch_size):
            h, r, t = triples[:, perm[start : start + batch_size]]
            t_neg = self._corruptor.sample(h, r)
            order, counts = relation_groups(r, self.num_relations)
            batch = torch.stack([h, r, t, t_neg])[:, order]
            if pinned:
                batch = batch.pin_memory()
            h, r, t, t_neg = batch.to(device, non_blocking=pinned)
            loss = self._sorted_kg_loss(h, r, t, t_neg, counts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().to(torch.float64) * h.numel()
        return total.item() / max(perm.numel(), 1)

    def kg_step_batch_size(self, num_triples: int) -> int:
        """Triples per TransR step in a pass over ``num_triples`` (see ``max_kg_batches_per_epoch``)."""
        if self.max_kg_batches_per_epoch is None:
            return self.kg_batch_size
        return max(self.kg_batch_size, math.ceil(num_triples / self.max_kg_batches_per_epoch))

    def has_kg_step(self) -> bool:
        return self.kg_step and self._kg_triples.size(1) > 0

    def epoch_hooks(self) -> list[EpochHook]:
        """The alternating schedule: after the trainer's BPR pass, one TransR pass with its own
        Adam (owned by the trainer), then the attention update. Stats ``kg_loss``, ``kg_seconds``,
        ``attention_seconds``; without KG triples (no knowledge graph) only the attention."""

        def step(optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
            stats: dict[str, float] = {}
            t0 = time.perf_counter()
            if optimizer is not None:
                stats["kg_loss"] = self.kg_epoch(optimizer)
            t1 = time.perf_counter()
            self.update_attention()
            if self.attention_weights.is_cuda:  # the attention update is asynchronous: time it whole
                torch.cuda.synchronize(self.attention_weights.device)
            if stats:
                stats["kg_seconds"] = t1 - t0
                stats["attention_seconds"] = time.perf_counter() - t1
            return stats

        params = self.kg_parameters() if self.has_kg_step() else ()
        return [EpochHook("transr", step, params, self.kg_learning_rate)]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_nodes={self.num_nodes}, "
            f"num_relations={self.num_relations}, num_edges={self.edge_index.size(1)}, "
            f"embedding_dim={self.embedding_dim}, layer_sizes={self.layer_sizes}, "
            f"transr_relations={self.transr_relations!r}"
        )


def interaction_ckg(data: InteractionData) -> CollaborativeKG:
    """The CKG of ``data``: ``data.ckg`` when it has a snapshot (KG), else the interaction-only
    graph (interact / rev_interact edges of the training matrix, no entities)."""
    if data.snapshot is not None and data.split is not None:
        return data.ckg
    coo = data.train.tocoo()
    users = torch.from_numpy(coo.row.astype(np.int64))
    items = torch.from_numpy(coo.col.astype(np.int64)) + data.num_users
    n = users.numel()
    return CollaborativeKG(
        edge_index=torch.stack([torch.cat([users, items]), torch.cat([items, users])]),
        edge_type=torch.cat([torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64)]),
        num_users=data.num_users,
        num_items=data.num_items,
        num_entities=0,
        relation_names=ckg_relation_names([]),
    )


def pretrain_from_bprmf(data: InteractionData, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """Train BPR-MF with its recommended defaults (same seed, device and ``embedding_dim`` as
    ``config``; early stopping on validation) and return its ``(user_emb, item_emb)`` on CPU --
    the initialisation the KGAT authors recommend (``--pretrain 1``)."""
    bpr_config = TrainConfig.for_model(
        "bprmf",
        seed=config.seed,
        device=config.device,
        embedding_dim=config.embedding_dim,
        eval_batch_size=config.eval_batch_size,
    )
    model = BPRMF(data.num_users, data.num_items, bpr_config.embedding_dim, bpr_config.reg_weight)
    fit(model, data, bpr_config)
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    return user_emb.detach().cpu().clone(), item_emb.detach().cpu().clone()


def build_kgat(config: TrainConfig, data: InteractionData) -> KGAT:
    """KGAT on ``data``'s training CKG; with ``params.pretrain == "bprmf"`` a BPR-MF is trained here
    first (its own recommended config, same seed) and initialises KGAT's users and items, also
    after a reset."""
    params = KGATParams.model_validate(config.params)
    pretrained = pretrain_from_bprmf(data, config) if params.pretrain == "bprmf" else None
    return KGAT(
        data.num_users,
        data.num_items,
        interaction_ckg(data),
        embedding_dim=config.embedding_dim,
        layer_sizes=params.layer_sizes,
        aggregator=params.aggregator,
        mess_dropout=params.mess_dropout,
        relation_dim=params.relation_dim,
        reg_weight=config.reg_weight,
        kg_reg_weight=params.kg_reg_weight,
        kg_batch_size=params.kg_batch_size,
        max_kg_batches_per_epoch=params.max_kg_batches_per_epoch,
        kg_learning_rate=params.kg_learning_rate,
        transr_relations=params.transr_relations,
        use_attention=params.use_attention,
        kg_step=params.kg_step,
        pretrained=pretrained,
    )


class KGATParams(BaseModel):
    """KGAT-specific hyper-parameters (``TrainConfig.params`` when ``model="kgat"``).

    The shared fields keep their meaning: ``embedding_dim`` is the layer-0 (and TransR entity)
    dimension, ``learning_rate``/``batch_size``/``reg_weight`` drive the CF (BPR) pass;
    ``num_layers`` (LightGCN's) is not used -- the depth is ``len(layer_sizes)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer_sizes: tuple[int, ...] = Field((64, 32, 16), min_length=1, max_length=8)
    aggregator: Literal["bi", "gcn", "graphsage"] = "bi"
    mess_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    relation_dim: int = Field(64, ge=1, le=4096, description="TransR relation space dimension")
    kg_batch_size: int = Field(8192, ge=1, description="triples per TransR mini-batch")
    max_kg_batches_per_epoch: int | None = Field(
        40, ge=1, description="TransR steps per epoch at most; beyond, the KG batch grows (None: never)"
    )
    kg_learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam lr of the KG step")
    kg_reg_weight: float = Field(1e-5, ge=0.0, le=10.0)
    transr_relations: Literal["kg", "all"] = Field(
        "kg", description='"kg": TransR on KG relations only; "all": also on interactions'
    )
    use_attention: bool = True
    kg_step: bool = True
    pretrain: Literal["bprmf"] | None = Field(
        None, description='"bprmf": initialise user/item embeddings from a BPR-MF trained first'
    )

    @field_validator("layer_sizes")
    @classmethod
    def _check_layer_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 1 for s in sizes):
            raise ValueError("layer_sizes must be positive")
        return sizes


# KGAT on music, validation recall@20 (best epoch), no pretraining: lr 5e-3 / batch 4096 /
# KG batch 8192 0.368 (145), the same with 2048 / 4096 0.366 (138) at twice the epoch time;
# lr 1e-2 / 4096 / 8192 0.343 (83); lr 1e-3 / 2048 0.309 (58); reg 1e-3 or 1e-2 no better;
# BPR-MF pretraining 0.322 at epoch 1, then declining (the BPR-MF embeddings already fit the
# training pairs, BPR loss ~0.01, so the propagation layers get almost no gradient).
# KGAT climbs slowly from its tiny Xavier initialisation: patience 20.
# Second sweep (lr 5e-3 / 4096 / 8192), valid recall@20: message dropout 0.1 0.368, 0.0 0.378
# (kept); with dropout 0: layers 64/64/64 0.375, GCN aggregator 0.377 (dropout 0.1), L2 1e-4
# 0.367. Ablations with dropout 0 (not defaults: they are no longer KGAT): without the TransR
# step 0.381, without attention (uniform weights) 0.381 -- the music KG adds nothing here.
SPEC = register(
    ModelSpec(
        name="kgat",
        family="retriever",
        build=build_kgat,
        needs_kg=True,
        summary="KGAT: attentive propagation over the collaborative KG + TransR (Wang et al., KDD 2019)",
        params=KGATParams,
        defaults={
            "learning_rate": 5e-3,
            "batch_size": 4096,
            # 20 batches is ml-100k's epoch at 4096: beyond it the batch grows with the data.
            "max_batches_per_epoch": 20,
            "reg_weight": 1e-5,
            "epochs": 400,
            "patience": 20,
            "params": {"mess_dropout": 0.0},
        },
        search_space={
            **BPR_SEARCH_SPACE,
            "params.mess_dropout": FloatDistribution(0.0, 0.3),
            "params.kg_learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
        },
    )
)
