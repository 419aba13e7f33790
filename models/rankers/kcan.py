r"""KCAN: conditional graph attention over distilled, target-specific KG subgraphs (ranking stage).

From `"Conditional Graph Attention Networks for Distilling and Refining Knowledge Graphs in
Recommendation" <https://arxiv.org/abs/2111.02100>`_ (Tu et al., CIKM 2021). Here it is the
*ranking* stage: it scores ``(user, item)`` pairs -- the top-N candidates of a retriever -- in one
batched forward (:meth:`KCAN.score_pairs`); the training loop, re-ranking and evaluation are in
:mod:`kgrec.models.reranking`.

Three parts:

1. **Global representations** (knowledge-aware attention propagation): a
   :class:`~kgrec.models.retrievers.kgat.KGAT` sub-module over the CKG (users, items, entities, train
   interactions only) -- attention :math:`\pi(h,r,t) = (\mathbf{W}_r\mathbf{e}_t)^\top
   \tanh(\mathbf{W}_r\mathbf{e}_h + \mathbf{e}_r)`, softmax over each head's out-edges, attentive
   sparse propagation, layer outputs concatenated: :math:`\mathbf{g}_v` (dim
   ``d0 + sum(layer_sizes)``). Its TransR step (on a random subset of ``kg_max_triples`` KG
   triples per epoch, for speed) and attention refresh run once per epoch
   (:meth:`epoch_hooks`, KGAT's alternating schedule).
2. **Knowledge distillation** (:mod:`kgrec.models.layers.kcan_subgraph`): after every attention update
   the ``neighbours_per_node`` out-edges of highest :math:`\pi` of every node are tabulated once;
   for a target pair ``(u, i)`` the subgraph is ``hops`` hops of that table from ``u`` and from
   ``i`` (``k + k^2 + ...`` slots per side, fixed shape, so a batch is dense tensors).
3. **Knowledge refinement** (conditional attention) on each subgraph, bottom-up, conditioned on
   the target: :math:`\mathbf{z}_v = \mathbf{P}\mathbf{g}_v` (dim ``local_dim``), target query
   :math:`\mathbf{q}_{ui} = \tanh(\mathbf{W}_q[\mathbf{z}_u \| \mathbf{z}_i])`, for a kept edge
   ``(p, r, c)``

   .. math:: \alpha_{ui}(p,r,c) = \operatorname{softmax}_{c \in \mathcal{S}(p)}
             \Big(\log\pi(p,r,c) + \mathbf{q}_{ui}^\top \tanh(\mathbf{W}_k\mathbf{z}_c + \mathbf{k}_r)
             / \sqrt{d}\Big),

   i.e. the distilled knowledge-aware attention re-weighted by the target;
   :math:`\mathbf{h}_p = \mathrm{LeakyReLU}(\mathbf{W}_\ell(\mathbf{h}^{0}_p + \sum_c \alpha\,
   (\mathbf{h}_c + \mathbf{v}_r)))` from the leaves (:math:`\mathbf{h}_c = \mathbf{z}_c`) to the
   root, one :math:`\mathbf{W}_\ell` per depth. The roots give local :math:`\mathbf{l}_u, \mathbf{l}_i`.
4. **Two-tower prediction**: :math:`\hat y_{ui} = f_U([\mathbf{g}_u \| \mathbf{l}_u])^\top
   f_I([\mathbf{g}_i \| \mathbf{l}_i])`, each tower ``Linear -> LeakyReLU -> Linear``
   (inner product of the towers, not an MLP on the concatenation: cheaper and it keeps the
   KGAT inner-product structure reachable).

Choices where the paper leaves room (or where this ranking-stage version departs from it):

* Global layer = KGAT exactly (bi-interaction aggregator, 64/32/16, TransR on KG relations,
  attention refreshed once per epoch without gradient), reused, not re-implemented.
* Distillation keeps the top-``k`` edges by :math:`\pi` **per node** (deterministic top-k, ties by
  CKG edge order) rather than sampling; the same ``k`` at every hop; a neighbour is an edge (a node
  linked by two relations can fill two slots). Defaults ``k = 6``, ``hops = 2`` (42 slots a side)
  keep a 200-candidate forward at a few ms on CPU (one thread).
* The target edge ``u <-> i`` is removed from the pair's subgraph (at hop 1 the slot is refilled by
  the next best neighbour, the table keeps ``k + 1`` per node; deeper it is only masked): a training positive is always
  a neighbour of its user in the train CKG, a serving candidate never, so keeping it would leak
  the label into the subgraph.
* The conditional attention adds the log of the distilled KGAT attention as a prior to a
  target-conditioned bilinear term (query from the target user and item), instead of the paper's
  exact parametrisation; relation embeddings enter keys (``k_r``) and messages (``v_r``).
* Representations fed to the subgraph are projected *global* representations (not raw ego
  embeddings), so the local refinement starts from propagated knowledge.
* The training objective is BPR only (plus L2 of the batch's tower outputs) with the KGAT TransR
  step per epoch; negatives are chosen in :mod:`kgrec.models.reranking` (hard negatives from the
  retriever's top-N mixed with uniform ones).

In ``eval()`` mode the per-node tensors (global representations, their projections, keys) are
computed once and cached, so :meth:`score_pairs` only gathers subgraph slots and runs a few small
matmuls; the cache is dropped by ``train()``, :meth:`refresh_subgraphs` and ``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from kgrec.features.graph import CollaborativeKG
from kgrec.models.base import EpochHook, Recommender
from kgrec.models.layers.kcan_subgraph import NeighbourTable, gather_subgraph, topk_neighbour_table
from kgrec.models.persistence import load_state, save_module
from kgrec.models.retrievers.kgat import KGAT, interaction_ckg
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.config import LoopConfig
from kgrec.models.training.losses import bpr_loss, l2_reg
from pydantic import Field
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData

DEFAULT_FUSION_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class KCAN(Recommender):
    """KCAN pair scorer (see the module docstring).

    Args:
        num_users, num_items: sizes of the index spaces.
        ckg: the training CKG (``data.ckg`` or :func:`~kgrec.models.retrievers.kgat.interaction_ckg`).
        embedding_dim, layer_sizes, relation_dim, mess_dropout, kg_step, kg_learning_rate,
            kg_batch_size: the global KGAT layer's settings.
        kg_max_triples: KG triples per TransR step (a random subset each epoch).
        neighbours_per_node: ``k``, kept neighbours per node in the distilled subgraph.
        hops: subgraph depth.
        local_dim: width of the conditional attention layer.
        tower_dim: output width of the two towers.
        dropout: dropout on the tower inputs.
        reg_weight: L2 weight on the batch's tower outputs.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        ckg: CollaborativeKG,
        embedding_dim: int = 64,
        layer_sizes: Sequence[int] = (64, 32, 16),
        relation_dim: int = 64,
        mess_dropout: float = 0.1,
        kg_step: bool = True,
        kg_learning_rate: float = 1e-3,
        kg_batch_size: int = 8192,
        kg_max_triples: int = 32768,
        neighbours_per_node: int = 6,
        hops: int = 2,
        local_dim: int = 32,
        tower_dim: int = 64,
        dropout: float = 0.1,
        reg_weight: float = 1e-5,
    ) -> None:
        super().__init__(num_users, num_items)
        if neighbours_per_node < 1 or hops < 1:
            raise ValueError("neighbours_per_node and hops must be positive")
        self.ckg = ckg
        self.hparams: dict[str, Any] = {
            "embedding_dim": embedding_dim,
            "layer_sizes": list(layer_sizes),
            "relation_dim": relation_dim,
            "mess_dropout": mess_dropout,
            "kg_step": kg_step,
            "kg_learning_rate": kg_learning_rate,
            "kg_batch_size": kg_batch_size,
            "kg_max_triples": kg_max_triples,
            "neighbours_per_node": neighbours_per_node,
            "hops": hops,
            "local_dim": local_dim,
            "tower_dim": tower_dim,
            "dropout": dropout,
            "reg_weight": reg_weight,
        }
        self.kg_max_triples = int(kg_max_triples)
        self.k = int(neighbours_per_node)
        self.hops = int(hops)
        self.local_dim = int(local_dim)
        self.dropout = float(dropout)
        self.reg_weight = float(reg_weight)
        self.kgat = KGAT(
            num_users,
            num_items,
            ckg,
            embedding_dim=embedding_dim,
            layer_sizes=layer_sizes,
            mess_dropout=mess_dropout,
            relation_dim=relation_dim,
            kg_batch_size=kg_batch_size,
            kg_learning_rate=kg_learning_rate,
            kg_step=kg_step,
        )
        global_dim = embedding_dim + sum(int(s) for s in layer_sizes)
        num_rel = ckg.num_relations
        d = self.local_dim
        self.project = torch.nn.Linear(global_dim, d)
        self.query = torch.nn.Linear(2 * d, d)
        self.key = torch.nn.Linear(d, d, bias=False)
        self.rel_key = torch.nn.Embedding(num_rel, d)
        self.rel_value = torch.nn.Embedding(num_rel, d)
        self.levels = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(self.hops))
        self.user_tower = torch.nn.Sequential(
            torch.nn.Linear(global_dim + d, tower_dim), torch.nn.LeakyReLU(0.2),
            torch.nn.Linear(tower_dim, tower_dim),
        )
        self.item_tower = torch.nn.Sequential(
            torch.nn.Linear(global_dim + d, tower_dim), torch.nn.LeakyReLU(0.2),
            torch.nn.Linear(tower_dim, tower_dim),
        )
        self._table: NeighbourTable | None = None
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_subgraphs())
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters and subgraphs
    def reset_parameters(self) -> None:
        self.kgat.reset_parameters()
        for module in [self.project, self.query, self.key, *self.levels, *self.user_tower, *self.item_tower]:
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        torch.nn.init.normal_(self.rel_key.weight, std=0.1)
        torch.nn.init.normal_(self.rel_value.weight, std=0.1)
        # distil from the (random-initialised) knowledge-aware attention, not the uniform one
        self.kgat.update_attention()
        self.refresh_subgraphs()

    def init_global(self, kgat: KGAT) -> None:
        """Start the global layer from a trained KGAT over the same CKG (its weights, its attention,
        and the subgraphs distilled from that attention)."""
        if kgat.edge_index.shape != self.kgat.edge_index.shape or not torch.equal(
            kgat.edge_index.cpu(), self.kgat.edge_index.cpu()
        ):
            raise ValueError("the KGAT was trained on another CKG")
        self.kgat.load_state_dict(kgat.state_dict())
        self.kgat.update_attention()
        self.refresh_subgraphs()

    def refresh_subgraphs(self) -> None:
        """Re-tabulate the top-attention neighbours (``k + 1`` per node: one in reserve for the
        excluded target edge) from the KGAT attention, and drop the eval cache."""
        kgat = self.kgat
        self._table = topk_neighbour_table(
            kgat.edge_index[0], kgat.edge_index[1], kgat.attention_weights.detach(),
            kgat.num_nodes, self.k + 1, relation=kgat.edge_type,
        )
        self._cache = None

    def train(self, mode: bool = True) -> KCAN:
        if mode:
            self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to() / .cuda(): move the table and drop the cache
        out = super()._apply(fn, recurse)
        if self._table is not None:
            self._table = NeighbourTable(*(fn(t) for t in self._table))
        self._cache = None
        return out

    def node_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(g [N, Dg], z [N, d], slot_key [N*W, d], slot_value [N*W, d], slot_prior [N*W])``:
        global and projected node representations, and per distilled-table slot ``(p, j)`` (edge
        ``p -> c`` by ``r``) the attention key :math:`\tanh(\mathbf{W}_k\mathbf{z}_c + \mathbf{k}_r)`,
        the leaf message :math:`\mathbf{z}_c + \mathbf{v}_r` and :math:`\log\pi`. Computed once
        per batch in training (all ``N * W`` slots: cheaper than per pair) and cached in eval."""
        if self._cache is not None and not self.training:
            return self._cache
        assert self._table is not None
        table = self._table
        g = self.kgat.propagate()
        z = self.project(g)
        d = self.local_dim
        slot_key = torch.tanh(self.key(z)[table.node] + self.rel_key(table.relation)).view(-1, d)
        slot_value = (z[table.node] + self.rel_value(table.relation)).view(-1, d)
        slot_prior = torch.log(table.weight.clamp(min=1e-12)).view(-1)
        out = (g, z, slot_key, slot_value, slot_prior)
        if not self.training:
            self._cache = out
        return out

    # ------------------------------------------------------------------ forward
    def _refine(self, roots: Tensor, q: Tensor, tensors, exclude) -> Tensor:
        assert self._table is not None
        _, z, slot_key, slot_value, slot_prior = tensors
        hops = gather_subgraph(self._table, roots, self.hops, k=self.k, exclude=exclude)
        batch, d, k = roots.numel(), self.local_dim, self.k
        scale = 1.0 / math.sqrt(d)
        h = slot_value[hops[-1].slot]  # leaves: z_c + v_r, [B, k^H, d]
        for level in range(self.hops - 1, -1, -1):
            hop = hops[level]
            logit = torch.bmm(slot_key[hop.slot], q.unsqueeze(-1)).squeeze(-1) * scale
            logit = (logit + slot_prior[hop.slot]).masked_fill(~hop.mask, -1e30).view(batch, -1, k)
            alpha = torch.softmax(logit, -1) * hop.mask.view(batch, -1, k)  # all-masked row -> 0
            msg = (alpha.unsqueeze(-1) * h.view(batch, -1, k, d)).sum(2)
            parent = hops[level - 1] if level > 0 else None
            parent_z = z[parent.node] if parent is not None else z[roots].unsqueeze(1)
            h = F.leaky_relu(self.levels[level](parent_z + msg), 0.2)
            if parent is not None:
                h = h + self.rel_value(parent.relation)
        return h[:, 0]

    def _towers(self, users: Tensor, items: Tensor, exclude_target: bool) -> tuple[Tensor, Tensor]:
        tensors = self.node_tensors()
        g, z = tensors[0], tensors[1]
        u_node = users.to(torch.int64)
        i_node = items.to(torch.int64) + self.num_users
        q = torch.tanh(self.query(torch.cat([z[u_node], z[i_node]], -1)))
        exclude = (u_node, i_node) if exclude_target else None
        local_u = self._refine(u_node, q, tensors, exclude)
        local_i = self._refine(i_node, q, tensors, exclude)
        x_u = F.dropout(torch.cat([g[u_node], local_u], -1), self.dropout, self.training)
        x_i = F.dropout(torch.cat([g[i_node], local_i], -1), self.dropout, self.training)
        return self.user_tower(x_u), self.item_tower(x_i)

    def score_pairs(self, users: Tensor, items: Tensor, exclude_target: bool = True) -> Tensor:
        """Scores ``[B]`` of the pairs ``(users[b], items[b])`` (user and item indices), one batched
        forward. ``exclude_target`` drops the pair's own interaction edge from its subgraph
        (always on in training; a no-op for unseen pairs)."""
        t_u, t_i = self._towers(users, items, exclude_target)
        return (t_u * t_i).sum(-1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.score_pairs(users, items)

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        """BPR over ``(user, pos, neg)`` plus ``reg_weight`` times L2 of the tower outputs."""
        b = users.numel()
        t_u, t_i = self._towers(users.repeat(2), torch.cat([pos_items, neg_items]), True)
        scores = (t_u * t_i).sum(-1)
        return bpr_loss(scores[:b], scores[b:]) + self.reg_weight * l2_reg(t_u, t_i)

    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        """``[B, I]`` scores of every item (pairwise; for small catalogues and tests only)."""
        items = torch.arange(self.num_items, device=users.device)
        u = users.repeat_interleave(self.num_items)
        return self.score_pairs(u, items.repeat(users.numel())).view(users.numel(), -1)

    def epoch_hooks(self) -> list[EpochHook]:
        """KGAT's alternating step on the global layer: a TransR pass over at most
        ``kg_max_triples`` uniformly drawn triples (the full pass on ml-100k's KG costs more than a
        CF epoch) with its own Adam, the attention update, then re-distilled subgraphs."""
        kgat = self.kgat

        def step(optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
            stats = {} if optimizer is None else {"kg_loss": kgat.kg_epoch(optimizer, self.kg_max_triples)}
            kgat.update_attention()
            self.refresh_subgraphs()
            return stats

        params = kgat.kg_parameters() if kgat.has_kg_step() else ()
        return [EpochHook("transr", step, params, kgat.kg_learning_rate)]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write a self-contained artefact directory with
        :func:`kgrec.models.persistence.save_module`: ``kcan.pt`` (state dict + the CKG tensors)
        and ``kcan.json`` (class, sizes, hyper-parameters, relation names, ``extra`` e.g. fusion
        weight)."""

        meta = {
            "kind": "kcan_ranker",
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_entities": self.ckg.num_entities,
            "relation_names": list(self.ckg.relation_names),
            "extra": extra or {},
        }
        tensors = {"edge_index": self.ckg.edge_index, "edge_type": self.ckg.edge_type}
        save_module(self, path, self.hparams, name="kcan", tensors=tensors, meta=meta)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> KCAN:
        """Rebuild a model written by :meth:`save` (in eval mode; weights read with
        ``weights_only=True``); ``model.meta`` holds ``kcan.json``."""

        blob, meta = load_state(path, "kcan", map_location="cpu", expected_class=cls.__name__)
        ckg = CollaborativeKG(
            edge_index=blob["edge_index"],
            edge_type=blob["edge_type"],
            num_users=meta["num_users"],
            num_items=meta["num_items"],
            num_entities=meta["num_entities"],
            relation_names=meta["relation_names"],
        )
        model = cls(meta["num_users"], meta["num_items"], ckg, **meta["hparams"])
        model.load_state_dict(blob["state_dict"])
        model.meta = meta
        return model.to(map_location).eval()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, hops={self.hops}, local_dim={self.local_dim}"


class KCANConfig(LoopConfig):
    """Hyper-parameters of KCAN and of its re-ranking training."""

    # model
    embedding_dim: int = Field(64, ge=1, le=1024)
    layer_sizes: tuple[int, ...] = Field((64, 32, 16), min_length=1, max_length=6)
    relation_dim: int = Field(64, ge=1, le=1024)
    mess_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    kg_step: bool = True
    kg_learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    kg_max_triples: int = Field(32768, ge=1, description="TransR triples per epoch (random subset)")
    neighbours_per_node: int = Field(6, ge=1, le=64)
    hops: int = Field(2, ge=1, le=4)
    local_dim: int = Field(32, ge=1, le=512)
    tower_dim: int = Field(64, ge=1, le=1024)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    reg_weight: float = Field(1e-5, ge=0.0, le=10.0)
    # training
    learning_rate: float = Field(5e-3, gt=0.0, le=1.0)
    batch_size: int = Field(4096, ge=1)
    epochs: int = Field(30, ge=1)
    patience: int = Field(3, ge=1)
    seed: int = Field(2020, ge=0)
    num_candidates: int = Field(200, ge=1, description="N: retrieval candidates re-ranked")
    hard_negative_ratio: float = Field(0.5, ge=0.0, le=1.0)
    fusion_grid: tuple[float, ...] = DEFAULT_FUSION_GRID
    max_valid_users: int | None = Field(None, ge=1, description="subsample for early stopping")
    pair_chunk: int = Field(16384, ge=1, description="pairs per forward in evaluation")
    device: str = Field("cpu", description="KCAN's subgraph tables live on the CPU")
    selection_metric: Literal["ndcg@20"] = Field("ndcg@20", description="of the fused re-ranked list")

    def model_kwargs(self) -> dict[str, Any]:
        keys = (
            "embedding_dim", "layer_sizes", "relation_dim", "mess_dropout", "kg_step",
            "kg_learning_rate", "kg_max_triples", "neighbours_per_node", "hops", "local_dim", "tower_dim",
            "dropout", "reg_weight",
        )
        return {k: getattr(self, k) for k in keys}


def build_kcan(config: KCANConfig, data: InteractionData) -> KCAN:
    """A fresh KCAN on ``data``'s training CKG."""
    return KCAN(data.num_users, data.num_items, interaction_ckg(data), **config.model_kwargs())


SPEC = register(
    ModelSpec(
        name="kcan",
        family="ranker",
        build=build_kcan,
        needs_kg=True,
        summary="KCAN: knowledge-aware conditional attention re-ranking a retriever's top-N "
        "(Tu et al., WWW 2021)",
    )
)
