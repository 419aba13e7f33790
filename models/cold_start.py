r"""The KG cold-start protocol: evaluation, baselines, and an inductive KGAT item embedding.

Protocol (``../shared/data/README.md``, "Cold-start split"; the split is
:func:`kgrec.features.cold_start.cold_start_split`): models train on the warm split; the users with
a cold test item rank (a) all items and (b) the cold items only, with their training and validation
items masked, and Recall / NDCG@K are computed over their cold test interactions by the project's
one metric core (:func:`kgrec.models.evaluation.evaluate`). The "cold only" ranking masks every warm
item with :math:`-\infty` before the core ranks (a masked item is never a hit there).

Baselines (score functions ``users -> [B, I]``):

* :func:`popularity_scores` -- training counts. Cold items have count 0, so among all items they
  share the bottom with the warm items never seen in training, and among the cold items only every
  item ties: ties are broken by a seeded random order per user, so the cold-only figure of
  popularity IS the random baseline's (in expectation; the orders are those of ``seed``).
* :func:`random_scores` -- a seeded uniform score per (user, item).
* :func:`kg_item_knn_scores` -- content item-kNN over the KG: an item's features are its KG
  neighbours (the KG nodes it shares a triple with, either direction, relation ignored),
  IDF-weighted (:math:`\log(I / \mathrm{df})`) and L2-normalised; the similarity of two items is the
  cosine of these vectors, and a user's score for an item is the SUM of its similarities to the
  user's training items (``aggregate="max"`` takes the largest instead). Sum is the default: it is
  classic item-kNN scoring (Sarwar et al. 2001; Deshpande & Karypis 2004), it counts how much of
  the history supports an item, and on a sparse KG (``music``: median one triple per item) the max
  saturates -- every candidate that shares the user's best-matching entity ties at the same value,
  and the rest of the history never breaks the tie. Remaining ties (e.g. a user without training
  items, or items sharing no neighbour) are broken by the same seeded random order.

Inductive KGAT (:class:`InductiveKGAT`): the final retrieval vector of an item that is NOT a node of
the trained model's graph, from its KG facts alone, through the trained layers. An item's facts are
its outgoing CKG edges ``(relation, node)`` (CKG ids: KG relation ``r`` as head is ``2 + 2r``, as
tail ``3 + 2r``; nodes in the CKG node space; :func:`facts_from_triples` converts KG triples). With
:math:`\mathbf{X}^{(l)}` the cached layer outputs of every node of the trained graph
(:math:`\mathbf{X}^{(0)}` the ego embeddings):

1. layer 0: an ego estimate :math:`\mathbf{e}_h` from the facts (:data:`EGO_ESTIMATES`; default
   ``"transr"``, below) or a supplied one;
2. attention as the model's (Eq. 4-5): :math:`\pi_f = \mathrm{softmax}_f\big((\mathbf{e}_{t_f}
   \mathbf{W}_{r_f})^\top \tanh(\mathbf{e}_h \mathbf{W}_{r_f} + \mathbf{e}_{r_f})\big)` over the
   item's facts (uniform :math:`1/|F|` when the model has ``use_attention=False``);
3. layer :math:`l`: the model's own :class:`~kgrec.models.layers.kgat_conv.KGATConv` on the item's
   state :math:`\mathbf{x}^{(l-1)}_h` and :math:`\sum_f \pi_f \mathbf{X}^{(l-1)}_{t_f}`;
4. KGAT's readout for items: :math:`\mathbf{e}_h \,\|\, \hat{\mathbf{x}}^{(1)} \,\|\, \cdots \,\|\,
   \hat{\mathbf{x}}^{(L)}` (layer 0 raw, propagated layers L2-normalised; the user vectors are the
   model's own), so ``user_vec @ item_vec`` is KGAT's score.

This is exactly the model's propagation for a node with those edges and no interaction, with the
graph's other nodes frozen at their cached states: the neighbours do not get the new item as an
extra neighbour (adding one node changes their states by a term in :math:`1/\deg`, and never
the users' vectors, which only aggregate over interactions). For an item that IS in the graph with
KG edges only, given its own ego, the result equals the model's vector of that node (tested).

Ego estimates (``ego=``):

* ``"transr"`` -- the embedding that minimises the TransR energies the model was trained on for
  these facts, both directions (the KG step trains ``(h, r, t)`` and ``(t, r^{-1}, h)``):
  :math:`\min_{\mathbf{e}} \sum_f \lVert \mathbf{e}\mathbf{W}_{r} + \mathbf{e}_{r} -
  \mathbf{e}_t\mathbf{W}_{r}\rVert^2 + \lVert \mathbf{e}_t\mathbf{W}_{\bar r} + \mathbf{e}_{\bar r}
  - \mathbf{e}\mathbf{W}_{\bar r}\rVert^2 + \lambda\lVert \mathbf{e} - \boldsymbol{\mu}\rVert^2`,
  a ``d × d`` linear solve per item (:math:`\boldsymbol\mu`: the mean ego of the graph's
  interacted items, :math:`\lambda` = ``ridge`` times the mean eigenvalue of the normal matrix).
  This is the TransR-consistent version of "mean over facts of e_t - r": with TransR the relation
  acts in the projected space, so ``e_t - e_r`` is not in the entity space at all.
* ``"mean"`` -- the mean ego of the fact neighbours (a GCN-style guess, no relation).
* ``"regress"`` -- a ridge regression, fitted on the graph's interacted items that have KG edges,
  from the mean neighbour ego to the trained ego (the ego the CF loss would have given).
* ``"zero"`` -- no guess: layer 0 contributes nothing to the score.

The transductive figure needs nothing here: KGAT trained on the warm split already holds every
cold item as a CKG node with its KG edges only (``build_ckg`` keeps every triple), so its own
``embeddings()`` score the cold items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from kgrec.models.base import Recommender
from kgrec.models.evaluation import evaluate
from kgrec.models.layers.kgat_conv import KGATConv
from kgrec.models.layers.transr import relation_project
from kgrec.models.retrievers.kgat import KGAT
from torch import Tensor
from torch_geometric.utils import softmax

if TYPE_CHECKING:
    import polars as pl
    from kgrec.features.cold_start import ColdStartSplit
    from kgrec.features.dataset import InteractionData

ScoreFn = Callable[[Tensor], Tensor]
Source = ScoreFn | tuple[Tensor, Tensor] | Recommender
EgoEstimate = Literal["transr", "mean", "regress", "zero"]
EGO_ESTIMATES: tuple[str, ...] = ("transr", "mean", "regress", "zero")
Facts = Sequence[tuple[int, int]]


# ---------------------------------------------------------------------------- evaluation
def _score_fn(source: Source) -> ScoreFn:
    if isinstance(source, Recommender):
        return source.scorer()
    if isinstance(source, tuple):
        user_emb, item_emb = source
        item_t = item_emb.t()
        return lambda users: user_emb[users.to(user_emb.device)] @ item_t
    if callable(source):
        return source
    raise TypeError(f"cannot score with {type(source).__name__}")


def cold_only(source: Source, cold_mask: np.ndarray | Tensor) -> ScoreFn:
    """``source``'s scores with every warm item (``cold_mask`` False) at :math:`-\\infty`."""
    score = _score_fn(source)
    warm = ~torch.as_tensor(np.asarray(cold_mask, dtype=bool))

    def masked(users: Tensor) -> Tensor:
        scores = score(users).clone()
        scores[:, warm.to(scores.device)] = float("-inf")
        return scores

    return masked


def _check(data: InteractionData, split: ColdStartSplit) -> None:
    if data.split is not None and data.split is not split.retrieval:
        raise ValueError("data was not built from this cold-start split (data.split is not split.retrieval)")
    for name in ("train", "valid", "test"):
        if getattr(data, name)[:, split.cold_items].nnz:
            raise ValueError(f"data.{name} holds interactions of cold items: not a cold-start split's data")


def evaluate_cold(
    source: Source,
    data: InteractionData,
    split: ColdStartSplit,
    ks: Sequence[int] = (20,),
    mask_valid: bool = True,
    batch_size: int = 4096,
) -> dict:
    """The protocol's two figures for the users with a cold test item.

    ``data``: the :class:`~kgrec.features.dataset.InteractionData` of ``split.retrieval`` (what the
    model trained on). Truth: the user's cold test interactions. Masked: the user's training items,
    and (``mask_valid``, default) validation items, as the retrieval protocol masks them at test
    time; the warm test items are not masked (the model has not seen them).

    Returns ``{"all": {...}, "cold": {...}, "num_users": n, "num_cold_items": c}`` with the
    metrics of :func:`~kgrec.models.evaluation.evaluate` (``recall@K``, ``ndcg@K``, ``hit@K``,
    ``precision@K``) ranking all items (``"all"``) and ranking the cold items only (``"cold"``).
    """
    _check(data, split)
    truth = split.cold_truth(data.num_users, data.num_items)
    exclude = [data.train, data.valid] if mask_valid else [data.train]
    everything = evaluate(source, truth, exclude, ks=ks, batch_size=batch_size)
    cold = evaluate(cold_only(source, split.cold_mask(data.num_items)), truth, exclude, ks=ks,
                    batch_size=batch_size)
    n = everything.pop("num_users_evaluated")
    cold.pop("num_users_evaluated")
    return {"all": everything, "cold": cold, "num_users": n, "num_cold_items": int(len(split.cold_items))}


@torch.no_grad()
def cold_top_k(
    source: Source, data: InteractionData, split: ColdStartSplit, k: int = 20, mask_valid: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(users, items [B, k])``: the cold-only top-``k`` of every user with a cold test item, as
    :func:`evaluate_cold` ranks them (masked items removed: ``-1`` where fewer than ``k`` remain)."""
    truth = split.cold_truth(data.num_users, data.num_items)
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    scores = cold_only(source, split.cold_mask(data.num_items))(torch.from_numpy(users)).float().cpu()
    seen = data.train + data.valid if mask_valid else data.train
    seen = sp.csr_matrix(seen)[users].tocoo()
    rows, cols = (torch.from_numpy(a.astype(np.int64)) for a in (seen.row, seen.col))
    scores[rows, cols] = float("-inf")
    top_scores, top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    top[~torch.isfinite(top_scores)] = -1
    return users, top.numpy()


# ---------------------------------------------------------------------------- baselines
def _user_noise(num_users: int, num_items: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(num_users, num_items, generator=generator)


def tie_broken(scores: Tensor, noise: Tensor) -> Tensor:
    """Scores replaced by ranks (float32, higher = better) of the lexicographic order ``(score,
    noise)``: equal scores are ordered by ``noise``; :math:`-\\infty` stays :math:`-\\infty`."""
    by_noise = torch.argsort(noise, dim=1)
    order = torch.argsort(torch.gather(scores, 1, by_noise), dim=1, stable=True)
    items = torch.gather(by_noise, 1, order)  # worst to best
    ranks = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    positions = torch.arange(scores.shape[1], dtype=torch.float32, device=scores.device)
    ranks.scatter_(1, items, positions.expand_as(ranks).contiguous())
    ranks[scores == float("-inf")] = float("-inf")
    return ranks


def random_scores(num_users: int, num_items: int, seed: int = 2020) -> ScoreFn:
    """Seeded uniform scores (the same for a user whatever batch it is in)."""
    noise = _user_noise(num_users, num_items, seed)
    return lambda users: noise[users.cpu()]


def popularity_scores(train: sp.spmatrix, seed: int = 2020) -> ScoreFn:
    """Training interaction counts per item, ties broken by a seeded random order per user (cold
    items all have count 0: among cold items only this is a random ranking)."""
    counts = torch.from_numpy(np.asarray(sp.csr_matrix(train).sum(axis=0)).ravel().astype(np.float32))
    noise = _user_noise(train.shape[0], train.shape[1], seed)
    return lambda users: tie_broken(counts.expand(len(users), -1), noise[users.cpu()])


def kg_item_features(
    kg: pl.DataFrame, num_items: int, num_kg_nodes: int, normalize: bool = True
) -> sp.csr_matrix:
    """Items × KG nodes: IDF-weighted indicator of each item's KG neighbours, L2-normalised rows
    unless ``normalize=False`` (``kg`` in KG node space, both directions, relation ignored; an item
    without triples has a zero row)."""
    head = kg["head"].to_numpy().astype(np.int64)
    tail = kg["tail"].to_numpy().astype(np.int64)
    rows = np.concatenate([head[head < num_items], tail[tail < num_items]])
    cols = np.concatenate([tail[head < num_items], head[tail < num_items]])
    x = sp.csr_matrix((np.ones(len(rows), np.float64), (rows, cols)), shape=(num_items, num_kg_nodes))
    x.sum_duplicates()
    x.data[:] = 1.0
    df = np.asarray((x > 0).sum(axis=0)).ravel()
    idf = np.log(num_items / np.maximum(df, 1))
    x = sp.csr_matrix(x @ sp.diags(idf))
    if not normalize:
        return x
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.csr_matrix(sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x)


def kg_item_knn_scores(
    kg: pl.DataFrame,
    train: sp.spmatrix,
    num_kg_nodes: int,
    aggregate: Literal["sum", "max"] = "sum",
    seed: int = 2020,
    normalize: bool = True,
) -> ScoreFn:
    """Item-kNN over KG neighbours (module docstring): ``score(u, j) = sum`` (or ``max``) over the
    user's training items ``i`` of ``cos(i, j)`` (``normalize=False``: the IDF-weighted dot product,
    which favours items with many facts); ties broken by a seeded random order per user."""
    if aggregate not in ("sum", "max"):
        raise ValueError(f"aggregate must be 'sum' or 'max', got {aggregate!r}")
    train = sp.csr_matrix(train)
    num_users, num_items = train.shape
    feats = kg_item_features(kg, num_items, num_kg_nodes, normalize)
    sim = (feats @ feats.T).toarray().astype(np.float32)
    np.fill_diagonal(sim, 0.0)
    sim_t = torch.from_numpy(sim)
    noise = _user_noise(num_users, num_items, seed)

    def score(users: Tensor) -> Tensor:
        rows = train[users.cpu().numpy()]
        if aggregate == "sum":
            raw = torch.from_numpy(np.asarray(rows @ sim, dtype=np.float32))
        else:
            raw = torch.zeros(len(users), num_items)
            for b in range(len(users)):
                items = rows.indices[rows.indptr[b] : rows.indptr[b + 1]]
                if len(items):
                    raw[b] = sim_t[torch.from_numpy(items.astype(np.int64))].max(0).values
        return tie_broken(raw, noise[users.cpu()])

    return score


# ---------------------------------------------------------------------------- inductive KGAT
def facts_from_triples(
    triples: pl.DataFrame | np.ndarray, item: int, num_users: int, skip_nodes: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """The CKG facts ``(relation, node)`` of the item at KG node ``item`` from KG triples
    ``(head, relation, tail)`` (KG node and relation ids): as head, ``(2 + 2r, U + tail)``; as
    tail, ``(3 + 2r, U + head)``. ``skip_nodes`` (KG node ids): facts towards these are left out
    (e.g. other items that are not in the graph either)."""
    if not isinstance(triples, np.ndarray):
        triples = triples.select("head", "relation", "tail").to_numpy()
    triples = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
    h, r, t = triples.T
    out = [(2 + 2 * int(rr), num_users + int(tt)) for hh, rr, tt in zip(h, r, t) if hh == item]
    out += [(3 + 2 * int(rr), num_users + int(hh)) for hh, rr, tt in zip(h, r, t) if tt == item]
    if skip_nodes is not None and len(skip_nodes):
        skip = set((np.asarray(skip_nodes, dtype=np.int64) + num_users).tolist())
        out = [(rel, node) for rel, node in out if node not in skip]
    return out


def facts_by_item(
    triples: pl.DataFrame, items: np.ndarray, num_users: int, skip_nodes: np.ndarray | None = None
) -> list[list[tuple[int, int]]]:
    """:func:`facts_from_triples` of each of ``items`` (KG node ids), vectorised over triples."""
    arr = triples.select("head", "relation", "tail").to_numpy().astype(np.int64)
    items = np.asarray(items, dtype=np.int64)
    position = {int(i): k for k, i in enumerate(items)}
    out: list[list[tuple[int, int]]] = [[] for _ in items]
    skip = set() if skip_nodes is None else set((np.asarray(skip_nodes, np.int64) + num_users).tolist())
    for (h, r, t) in arr[np.isin(arr[:, 0], items)]:
        if num_users + t not in skip:
            out[position[int(h)]].append((2 + 2 * int(r), num_users + int(t)))
    for (h, r, t) in arr[np.isin(arr[:, 2], items)]:
        if num_users + h not in skip:
            out[position[int(t)]].append((3 + 2 * int(r), num_users + int(h)))
    return out


class _Fixed(torch.nn.Module):
    """Stands in for the adjacency inside :class:`KGATConv`: returns the precomputed neighbour sum."""

    def __init__(self, neigh: Tensor) -> None:
        super().__init__()
        self.neigh = neigh

    def forward(self, x: Tensor) -> Tensor:
        return self.neigh


class InductiveKGAT:
    """A trained KGAT's cached node states and the inductive item embedding (module docstring).

    ``model`` is put in eval mode (no message dropout). The caches are taken once, here: build a
    new instance after further training. The model's attention must be current (as after
    training, which updates it every epoch, or :meth:`KGAT.update_attention`): the new item's
    attention is computed from the embeddings, the cached states use the stored one.

    Attributes: ``layer_inputs`` -- ``[X^(0), ..., X^(L-1)]``, every node's input to each layer
    ``[N, d_l]``; ``user_vectors`` / ``item_vectors`` -- the model's ``embeddings()``.

    Without the model (a serving bundle, :meth:`from_parts` / :meth:`load`): the instance holds only
    what :meth:`embed` needs -- the layer inputs of the item and entity nodes (rows from
    ``node_offset`` = the number of users: facts never point at users), the relation embeddings and
    projections, the layers, ``use_attention``, and the ego estimates' parameters (the prior mean
    and the ``regress`` map, fitted on the training graph at :meth:`state_dict` time). Its
    ``model``, ``user_vectors`` and ``item_vectors`` are None (:func:`choose_ego` needs a model).
    """

    def __init__(self, model: KGAT, ridge: float = 0.1) -> None:
        model.eval()
        self.model: KGAT | None = model
        self.ridge = float(ridge)
        with torch.no_grad():
            x = model.node_embedding.weight.detach()
            self.layer_inputs = [x]
            for conv in list(model.convs)[:-1]:
                x = conv(x, model.adjacency)
                self.layer_inputs.append(x)
            self.user_vectors, self.item_vectors = (t.detach() for t in model.embeddings())
        self.num_users, self.num_items = int(model.num_users), int(model.num_items)
        self.num_nodes, self.num_relations = int(model.num_nodes), int(model.num_relations)
        self.node_offset = 0  # layer_inputs rows are CKG node ids
        self.relation_weight = model.relation_weight.detach()
        self.relation_embedding = model.relation_embedding.weight.detach()
        self.convs = model.convs
        self.use_attention = bool(model.use_attention)
        self._mean: Tensor | None = None
        self._regression: Tensor | None = None

    @classmethod
    def from_parts(
        cls,
        *,
        num_users: int,
        num_items: int,
        num_nodes: int,
        relation_weight: Tensor,
        relation_embedding: Tensor,
        convs: Sequence[torch.nn.Module],
        layer_inputs: Sequence[Tensor],
        use_attention: bool,
        item_mean: Tensor,
        regression: Tensor | None = None,
        node_offset: int | None = None,
        ridge: float = 0.1,
    ) -> InductiveKGAT:
        """An instance without the KGAT module or its graph: ``layer_inputs[l]`` holds the layer-``l``
        inputs of CKG nodes ``node_offset ..< num_nodes`` (default offset: ``num_users``), ``convs``
        the trained :class:`~kgrec.models.layers.kgat_conv.KGATConv` layers (put in eval mode),
        ``item_mean`` the prior mean ego and ``regression`` the ``regress`` map (both as
        :meth:`state_dict` stores them; without ``regression`` the ``regress`` estimate raises)."""
        self = cls.__new__(cls)
        self.model = None
        self.ridge = float(ridge)
        self.num_users, self.num_items, self.num_nodes = int(num_users), int(num_items), int(num_nodes)
        self.num_relations = int(relation_weight.shape[0])
        self.node_offset = self.num_users if node_offset is None else int(node_offset)
        self.layer_inputs = [t.detach() for t in layer_inputs]
        rows = self.num_nodes - self.node_offset
        if len(self.layer_inputs) != len(convs) or any(t.shape[0] != rows for t in self.layer_inputs):
            raise ValueError(f"expected {len(convs)} layer inputs of {rows} rows (nodes {self.node_offset}.."
                             f"{self.num_nodes - 1}), got {[tuple(t.shape) for t in self.layer_inputs]}")
        self.relation_weight = relation_weight.detach()
        self.relation_embedding = relation_embedding.detach()
        self.convs = torch.nn.ModuleList(convs).eval()
        self.use_attention = bool(use_attention)
        self.user_vectors = self.item_vectors = None
        self._mean = item_mean.detach().reshape(-1)
        self._regression = None if regression is None else regression.detach()
        return self

    # -------------------------------------------------------------- save / load
    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """``(tensors, config)``: everything :meth:`from_state_dict` needs to embed items without the
        model (CPU tensors: the item and entity rows of the layer inputs, relation embeddings and
        projections, the layers' weights, the prior mean and the ``regress`` map, fitted here if
        it was not yet; ``config``: JSON-able sizes and settings)."""
        start = self.num_users - self.node_offset  # row of the first item node
        tensors: dict[str, Tensor] = {
            "relation_weight": self.relation_weight,
            "relation_embedding": self.relation_embedding,
            "item_mean": self._item_mean(),
            "regression": self._regression_map(),
        }
        for layer, x in enumerate(self.layer_inputs):
            tensors[f"layer_input.{layer}"] = x[start:]
        for layer, conv in enumerate(self.convs):
            for key, value in conv.state_dict().items():
                tensors[f"conv.{layer}.{key}"] = value
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        first = self.convs[0]
        config = {
            "class": type(self).__name__,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_nodes": self.num_nodes,
            "num_relations": self.num_relations,
            "dims": [int(c.in_channels) for c in self.convs] + [int(self.convs[-1].out_channels)],
            "aggregator": str(first.aggregator),
            "negative_slope": float(first.negative_slope),
            "use_attention": self.use_attention,
            "ridge": self.ridge,
        }
        return tensors, config

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], config: dict) -> InductiveKGAT:
        """The inverse of :meth:`state_dict` (layers rebuilt with the saved sizes, no dropout)."""
        dims = [int(d) for d in config["dims"]]
        convs = []
        for layer in range(len(dims) - 1):
            conv = KGATConv(dims[layer], dims[layer + 1], config["aggregator"], dropout=0.0,
                            negative_slope=float(config.get("negative_slope", 0.2)))
            prefix = f"conv.{layer}."
            conv.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            convs.append(conv)
        return cls.from_parts(
            num_users=int(config["num_users"]), num_items=int(config["num_items"]),
            num_nodes=int(config["num_nodes"]), relation_weight=tensors["relation_weight"],
            relation_embedding=tensors["relation_embedding"], convs=convs,
            layer_inputs=[tensors[f"layer_input.{layer}"] for layer in range(len(convs))],
            use_attention=bool(config["use_attention"]), item_mean=tensors["item_mean"],
            regression=tensors.get("regression"), ridge=float(config.get("ridge", 0.1)),
        )

    @property
    def device(self) -> torch.device:
        return self.relation_weight.device

    @property
    def dim(self) -> int:
        """Size of the retrieval vectors :meth:`embed` returns."""
        return int(self.convs[0].in_channels) + sum(int(c.out_channels) for c in self.convs)

    # -------------------------------------------------------------- facts
    def _pack(self, facts_per_item: Sequence[Facts]) -> tuple[Tensor, Tensor, Tensor]:
        """``(owner, relation, row)`` of every fact; ``row`` is the fact node's row of the layer
        inputs (its CKG id minus ``node_offset``)."""
        owner, rel, node = [], [], []
        for b, facts in enumerate(facts_per_item):
            for r, t in facts:
                if not 2 <= int(r) < self.num_relations:
                    raise ValueError(
                        f"fact relation {r} is not a KG relation id of the CKG (2..{self.num_relations - 1})"
                    )
                if not self.num_users <= int(t) < self.num_nodes:
                    raise ValueError(f"fact node {t} is not an item or entity node of the CKG")
                owner.append(b)
                rel.append(int(r))
                node.append(int(t) - self.node_offset)
        as_t = lambda v: torch.tensor(v, dtype=torch.int64, device=self.device)  # noqa: E731
        return as_t(owner), as_t(rel), as_t(node)

    # -------------------------------------------------------------- ego estimates
    def _item_mean(self) -> Tensor:
        """Mean ego of the graph's items with at least one interaction edge (the prior mean)."""
        if self._mean is None:
            m = self.model
            head, etype = m.edge_index[0], m.edge_type
            items = torch.unique(head[etype == 1])  # rev_interact: item -> user, heads are items
            ego = self.layer_inputs[0]
            if items.numel() == 0:
                self._mean = ego[m.num_users : m.num_users + m.num_items].mean(0)
            else:
                self._mean = ego[items].mean(0)
        return self._mean

    def _neighbour_mean(self, owner: Tensor, node: Tensor, n: int) -> tuple[Tensor, Tensor]:
        ego = self.layer_inputs[0]
        total = torch.zeros(n, ego.size(1), device=ego.device).index_add_(0, owner, ego[node])
        count = torch.bincount(owner, minlength=n).to(ego.dtype)
        return total / count.clamp(min=1).unsqueeze(1), count

    def _transr_ego(self, owner: Tensor, rel: Tensor, node: Tensor, n: int) -> Tensor:
        w, e_r, ego = self.relation_weight, self.relation_embedding, self.layer_inputs[0]
        num_relations = self.num_relations
        d = ego.size(1)
        inv = torch.arange(num_relations, device=w.device) ^ 1  # 2 + 2r <-> 3 + 2r
        # Per relation: G_r = W_r W_r^T + W_rbar W_rbar^T [R, d, d] and c_r = -e_r W_r^T + e_rbar W_rbar^T;
        # a fact (r, t) adds G_r to the normal matrix and e_t G_r + c_r to the right-hand side.
        w_t = w.transpose(1, 2)
        gram = w @ w_t + w[inv] @ w_t[inv]
        const = -torch.einsum("rk,rdk->rd", e_r, w) + torch.einsum("rk,rdk->rd", e_r[inv], w[inv])
        rhs = relation_project(ego[node], rel, gram) + const[rel]  # [F, d], grouped by relation
        per_item = torch.zeros(n, num_relations, dtype=torch.float64, device=ego.device)
        per_item.index_put_((owner, rel), torch.ones_like(owner, dtype=torch.float64), accumulate=True)
        a = (per_item @ gram.reshape(num_relations, d * d).double()).view(n, d, d)
        b = torch.zeros(n, d, dtype=torch.float64, device=ego.device).index_add_(0, owner, rhs.double())
        # ridge: `ridge` times the mean eigenvalue of the normal matrix, towards the prior mean
        lam = self.ridge * torch.diagonal(a, dim1=1, dim2=2).sum(1) / d
        lam = torch.where(lam > 0, lam, torch.full_like(lam, max(self.ridge, 1e-6)))
        eye = torch.eye(d, dtype=torch.float64, device=ego.device)
        a = a + lam.view(-1, 1, 1) * eye
        b = b + lam.unsqueeze(1) * self._item_mean().double()
        # e A = b with A symmetric: A e^T = b^T
        return torch.linalg.solve(a, b.unsqueeze(2)).squeeze(2).to(ego.dtype)

    def _fit_regression(self) -> Tensor:
        """Ridge map ``[mean neighbour ego, 1] -> ego`` over the interacted items with KG edges."""
        m = self.model
        if m is None:
            raise ValueError("this InductiveKGAT has no model to fit the 'regress' estimate on, and "
                             "none was stored with it")
        head, tail, etype = m.edge_index[0], m.edge_index[1], m.edge_type
        u, i = m.num_users, m.num_items
        interacted = torch.zeros(m.num_nodes, dtype=torch.bool, device=head.device)
        interacted[head[etype == 1]] = True
        kg_edge = (etype >= 2) & (head >= u) & (head < u + i) & interacted[head]
        owner_nodes, owner = torch.unique(head[kg_edge], return_inverse=True)
        x, _ = self._neighbour_mean(owner, tail[kg_edge], owner_nodes.numel())
        x = torch.cat([x, torch.ones(x.size(0), 1, device=x.device)], 1).double()
        y = self.layer_inputs[0][owner_nodes].double()
        gram = x.T @ x
        lam = self.ridge * torch.diagonal(gram).mean()
        reg = lam * torch.eye(gram.size(0), dtype=gram.dtype, device=gram.device)
        reg[-1, -1] = 0.0  # no penalty on the bias
        return torch.linalg.solve(gram + reg, x.T @ y)

    def _regression_map(self) -> Tensor:
        if self._regression is None:
            self._regression = self._fit_regression()
        return self._regression

    def ego_estimate(self, facts_per_item: Sequence[Facts], ego: EgoEstimate = "transr") -> Tensor:
        """Layer-0 estimates ``[B, d0]`` of items from their facts (module docstring)."""
        owner, rel, node = self._pack(facts_per_item)
        return self._ego(owner, rel, node, len(facts_per_item), ego)

    def _ego(self, owner: Tensor, rel: Tensor, node: Tensor, n: int, ego: EgoEstimate) -> Tensor:
        d = self.layer_inputs[0].size(1)
        if ego == "zero":
            return torch.zeros(n, d, device=self.device)
        if ego == "mean":
            mean, count = self._neighbour_mean(owner, node, n)
            return torch.where(count.unsqueeze(1) > 0, mean, self._item_mean().expand(n, -1))
        if ego == "regress":
            regression = self._regression_map()
            mean, count = self._neighbour_mean(owner, node, n)
            x = torch.cat([mean, torch.ones(n, 1, device=mean.device)], 1).double()
            out = (x @ regression).to(mean.dtype)
            return torch.where(count.unsqueeze(1) > 0, out, self._item_mean().expand(n, -1))
        if ego == "transr":
            return self._transr_ego(owner, rel, node, n)
        raise ValueError(f"unknown ego estimate {ego!r}; choose from {EGO_ESTIMATES} or pass a tensor")

    # -------------------------------------------------------------- propagation
    @torch.no_grad()
    def embed(self, facts_per_item: Sequence[Facts], ego: EgoEstimate | Tensor = "transr") -> Tensor:
        """Final retrieval vectors ``[B, d0 + sum(layer_sizes)]`` of ``B`` items from their facts
        (each a sequence of ``(CKG relation, CKG node)``; an item may have none: it then gets its
        ego and the layers' output for an empty neighbourhood). ``ego``: an estimate name or the
        layer-0 embeddings ``[B, d0]`` themselves."""
        n = len(facts_per_item)
        owner, rel, node = self._pack(facts_per_item)
        if isinstance(ego, Tensor):
            e_h = ego.to(self.device, self.layer_inputs[0].dtype).reshape(n, -1)
        else:
            e_h = self._ego(owner, rel, node, n, ego)
        # attention (Eq. 4-5) from the ego embeddings, softmax over each item's facts
        if self.use_attention and owner.numel():
            w, e_r = self.relation_weight, self.relation_embedding
            proj_t = relation_project(self.layer_inputs[0][node], rel, w)
            proj_h = relation_project(e_h[owner], rel, w)
            scores = (proj_t * torch.tanh(proj_h + e_r[rel])).sum(-1)
            att = softmax(scores, owner, num_nodes=n)
        else:
            deg = torch.bincount(owner, minlength=n).clamp(min=1).to(e_h.dtype)
            att = 1.0 / deg[owner]
        x = e_h
        outs = [e_h]
        for conv, layer_input in zip(self.convs, self.layer_inputs):
            neigh = torch.zeros(n, layer_input.size(1), device=x.device, dtype=x.dtype)
            neigh.index_add_(0, owner, att.unsqueeze(1) * layer_input[node])
            x = conv(x, _Fixed(neigh))
            outs.append(F.normalize(x, p=2, dim=1))
        return torch.cat(outs, dim=1)

    def item_matrix(
        self, items: np.ndarray, facts_per_item: Sequence[Facts], ego: EgoEstimate | Tensor = "transr"
    ) -> Tensor:
        """The model's item vectors with the rows of ``items`` replaced by their inductive vectors."""
        if self.item_vectors is None:
            raise ValueError("item_matrix needs the model's item vectors: build InductiveKGAT(model)")
        out = self.item_vectors.clone()
        if len(items):
            out[torch.as_tensor(np.asarray(items, dtype=np.int64), device=out.device)] = self.embed(
                facts_per_item, ego
            )
        return out


def inductive_item_embedding(model: KGAT, facts: Facts, ego: EgoEstimate | Tensor = "transr") -> Tensor:
    """The retrieval vector ``[d0 + sum(layer_sizes)]`` of one item that is not in ``model``'s
    graph, from its facts ``[(CKG relation, CKG node), ...]`` (see :class:`InductiveKGAT`; build one
    instance to embed many items: the caches are computed per instance)."""
    if isinstance(ego, Tensor):
        ego = ego.reshape(1, -1)
    return InductiveKGAT(model).embed([list(facts)], ego)[0]


@torch.no_grad()
def choose_ego(
    inductive: InductiveKGAT,
    data: InteractionData,
    candidates: Sequence[str] = EGO_ESTIMATES,
    kg: pl.DataFrame | None = None,
    k: int = 20,
) -> tuple[str, dict[str, float]]:
    """Pick the ego estimate on VALIDATION data only: re-embed every warm item that has KG facts
    from its facts alone (as if it were cold), rank the validation items with training items
    masked, and keep the estimate with the best ``recall@k``. Returns ``(best, {name: recall})``.
    (A proxy: the re-embedded warm items are still nodes of the graph, so their neighbours' cached
    states carry a little of their interactions.)
    ``kg``: the triples to take the facts from (default ``data.snapshot.kg``)."""
    if inductive.model is None:
        raise ValueError("choose_ego needs an InductiveKGAT built from the model (its user and item vectors)")
    kg = data.snapshot.kg if kg is None else kg
    warm = np.flatnonzero(np.diff(sp.csc_matrix(data.train).indptr) > 0)
    facts = facts_by_item(kg, warm, inductive.num_users)
    keep = np.array([len(f) > 0 for f in facts], dtype=bool)
    items, facts = warm[keep], [f for f, k_ in zip(facts, keep) if k_]
    figures = {}
    for name in candidates:
        matrix = inductive.item_matrix(items, facts, name)  # type: ignore[arg-type]
        valid = evaluate((inductive.user_vectors, matrix), data.valid, data.train, ks=(k,))
        figures[name] = valid[f"recall@{k}"]
    return max(figures, key=figures.get), figures
