r"""kNN-Embed-style mixture retriever: item clusters as interests, users as smoothed mixtures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from kgrec.models.sequential.config import (
    SequentialModelConfig,
    hard_readout_only,
    no_routing_matrix,
    served_as_configured,
)
from kgrec.models.sequential.multi_interest import MultiInterestModel
from kgrec.models.sequential.youtube_dnn import build_youtube_dnn
from kgrec.models.sequential_evaluation import evaluate_sequential
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.sequential import SequentialTask
from kgrec.models.training.trainer import EpochCallback, FitResult, Trainer
from torch import Tensor


class InterestMixture(MultiInterestModel):
    r"""Mixture-of-interests retrieval after `"kNN-Embed: Locally Smoothed Embedding Mixtures For
    Multi-interest Candidate Retrieval" <https://arxiv.org/abs/2205.06205>`_ (El-Kishky et al., 2022).

    Item embeddings :math:`e_i` (frozen; from a trained single-vector model or given KG-aware
    vectors) are clustered into ``C`` interests by spherical k-means (faiss, seeded) on the
    L2-normalised vectors, with centroids :math:`\mu_c`. A user with history :math:`H` (last ``L``
    items) is a Dirichlet-smoothed mixture over the clusters,

    .. math:: \pi_c = \frac{n_c + \alpha}{|H| + C \alpha}, \qquad n_c = |\{i \in H : c(i) = c\}|,

    and component ``c`` is queried with the user's local embedding in that cluster blended with the
    centroid,

    .. math:: q_c = \frac{n_c\, \bar e_c + \beta\, \|\bar e\|\, \hat\mu_c}{n_c + \beta},
              \qquad \bar e_c = \frac{1}{n_c}\sum_{i \in H, c(i)=c} e_i,

    (:math:`\bar e` the user's mean item vector, :math:`\hat\mu_c` the unit centroid; a cluster the
    user never touched is queried by its scaled centroid). ``locality`` :math:`\lambda` anchors every
    component on the user's global vector, :math:`q_c \leftarrow (1-\lambda)\,\bar e + \lambda\, q_c`:
    :math:`\lambda = 1` queries each cluster with its local vector alone, :math:`\lambda = 0` gives
    every component the single-vector (mean-pooling) query, so the components only differ by budget. Only the ``top_components`` components
    with the largest :math:`\pi_c` are kept (the interest mask); the ``"weighted"`` merge then gives
    component ``c`` a budget proportional to :math:`\pi_c` (weighted round-robin,
    :mod:`kgrec.models.merge`), as kNN-Embed samples ``k \pi_c`` neighbours per component.

    Not trained by gradient descent: build it with :meth:`fit` (k-means) and use it like any
    :class:`MultiInterestModel`.

    Args:
        num_items: item count.
        embedding_dim: ``d``.
        num_clusters: ``C``.
        top_components: interests kept per user (the ``K`` of the retriever; ``<= C``).
        alpha: Dirichlet smoothing :math:`\alpha`.
        beta: centroid blending :math:`\beta` (pseudo-count).
        locality: :math:`\lambda \in [0, 1]`, weight of the local query against the global one.
        max_length: history items used.
        seed: k-means seed.
    """

    trainable = False

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        num_clusters: int = 8,
        top_components: int = 4,
        alpha: float = 1.0,
        beta: float = 1.0,
        max_length: int = 20,
        seed: int = 2020,
        locality: float = 1.0,
    ) -> None:
        if not 1 <= top_components <= num_clusters:
            raise ValueError(f"need 1 <= top_components <= num_clusters, got {top_components}, {num_clusters}")
        if not 0.0 <= locality <= 1.0:
            raise ValueError(f"locality must be in [0, 1], got {locality}")
        super().__init__(num_items, embedding_dim, num_clusters, max_length, 1.0, "weighted")
        self.hparams = dict(
            num_items=num_items, embedding_dim=embedding_dim, num_clusters=num_clusters,
            top_components=top_components, alpha=alpha, beta=beta, max_length=max_length, seed=seed,
            locality=locality,
        )
        self.locality = locality
        self.num_clusters = num_clusters
        self.top_components = top_components
        self.alpha = alpha
        self.beta = beta
        self.seed = seed
        self.register_buffer("item_vectors", torch.zeros(num_items, embedding_dim))
        self.register_buffer("assignment", torch.zeros(num_items, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(num_clusters, embedding_dim))

    def reset_parameters(self) -> None:
        """Nothing is learned by gradient descent; :meth:`fit` sets the buffers."""

    def item_embeddings(self) -> Tensor:
        return self.item_vectors

    @torch.no_grad()
    def fit(self, item_vectors: Tensor | np.ndarray, niter: int = 25) -> InterestMixture:
        """Store the item vectors and cluster them (faiss spherical k-means, ``seed``)."""
        import faiss

        x = np.ascontiguousarray(np.asarray(item_vectors, dtype=np.float32))
        if x.shape != (self.num_items, self.embedding_dim):
            raise ValueError(f"item vectors must be {(self.num_items, self.embedding_dim)}, got {x.shape}")
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        kmeans = faiss.Kmeans(
            self.embedding_dim, self.num_clusters, niter=niter, seed=self.seed, spherical=True, verbose=False
        )
        kmeans.train(unit)
        _, assign = kmeans.index.search(unit, 1)
        self.item_vectors.copy_(torch.from_numpy(x))
        self.assignment.copy_(torch.from_numpy(assign[:, 0].astype(np.int64)))
        self.centroids.copy_(torch.from_numpy(np.ascontiguousarray(kmeans.centroids)))
        return self

    def _components(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts [B, C], sums [B, C, d], mean [B, d])`` of the history per cluster."""
        width = histories.shape[1]
        mask = (torch.arange(width, device=histories.device)[None, :] < lengths[:, None]).float()
        onehot = torch.nn.functional.one_hot(self.assignment[histories], self.num_clusters).float()
        onehot = onehot * mask.unsqueeze(-1)  # [B, L, C]
        emb = self.item_vectors[histories]  # [B, L, d]
        counts = onehot.sum(1)
        sums = torch.einsum("blc,bld->bcd", onehot, emb)
        mean = sums.sum(1) / lengths.clamp(min=1).unsqueeze(-1).float()
        return counts, sums, mean

    def mixture_weights(self, histories: Tensor, lengths: Tensor) -> Tensor:
        """Smoothed mixture :math:`\\pi` ``[B, C]`` (sums to 1 per user)."""
        counts, _, _ = self._components(histories, lengths)
        return (counts + self.alpha) / (lengths.unsqueeze(-1).float() + self.num_clusters * self.alpha)

    def interests(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        counts, sums, mean = self._components(histories, lengths)
        unit_centroids = torch.nn.functional.normalize(self.centroids, dim=-1)
        prior = mean.norm(dim=-1, keepdim=True).clamp(min=1e-6)[:, None, :] * unit_centroids[None]
        queries = (sums + self.beta * prior) / (counts.unsqueeze(-1) + self.beta)
        queries = (1.0 - self.locality) * mean[:, None, :] + self.locality * queries
        pi = (counts + self.alpha) / (lengths.unsqueeze(-1).float() + self.num_clusters * self.alpha)
        # Keep the top components by weight (ties: lower cluster index).
        order = torch.sort(pi, dim=1, descending=True, stable=True).indices[:, : self.top_components]
        mask = torch.zeros_like(pi, dtype=torch.bool).scatter_(1, order, True)
        return queries * mask.unsqueeze(-1), mask

    def interest_weights(self, histories: Tensor, lengths: Tensor, mask: Tensor) -> Tensor:
        return self.mixture_weights(histories, lengths) * mask

    def loss(self, *args, **kwargs) -> Tensor:  # pragma: no cover - not trainable
        raise NotImplementedError("InterestMixture is fitted with .fit(item_vectors), not trained")


def build_mixture(config: SequentialModelConfig, num_items: int) -> InterestMixture:
    model = InterestMixture(
        num_items, embedding_dim=config.embedding_dim, max_length=config.max_length,
        num_clusters=config.num_clusters, top_components=config.num_interests, seed=config.seed,
        locality=config.locality,
    )
    return served_as_configured(model, config)


def fit_mixture(
    spec: ModelSpec, config: SequentialModelConfig, inputs: Any, callbacks: Sequence[EpochCallback] = (), **trainer: Any
) -> tuple[InterestMixture, FitResult]:
    """Train a YouTube-DNN with the same configuration (its epochs are the history and reach the
    callbacks), then cluster its item vectors; ``best_valid`` is the mixture's own validation."""
    split = inputs.split
    torch.manual_seed(config.seed)
    base = build_youtube_dnn(config, split.num_items)
    base_fit = Trainer(config, callbacks, **trainer).fit(base, SequentialTask(split, config, base.max_length, inputs.categories))
    t0 = time.perf_counter()
    model = spec.build(config, split.num_items)
    model.fit(base.item_embeddings().detach().cpu().numpy())
    valid = evaluate_sequential(model, split.valid_inputs, split.valid_targets, inputs.categories, ks=config.ks)
    seconds = time.perf_counter() - t0
    base_fit.best_valid = valid
    base_fit.train_seconds += seconds
    base_fit.total_seconds += seconds
    return model, base_fit


def _check_mixture(config: SequentialModelConfig) -> None:
    hard_readout_only(config)
    no_routing_matrix(config)  # the mixture's base is a YouTube-DNN
    if config.num_interests > config.num_clusters:
        raise ValueError(f"mixture: num_interests ({config.num_interests}) must be <= num_clusters ({config.num_clusters})")


SPEC = register(
    ModelSpec(
        name="mixture",
        family="sequential",
        build=build_mixture,
        summary="kNN-Embed-style interest mixture over a YouTube-DNN's item vectors "
        "(Moreira et al., 2022; not trained by gradient descent)",
        check=_check_mixture,
        fit=fit_mixture,
    )
)
