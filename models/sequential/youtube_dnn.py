r"""YouTube-DNN-style single-vector candidate generator (the baseline of the multi-interest models)."""

from __future__ import annotations

import torch
from kgrec.models.sequential.config import (
    SEQUENTIAL_SEARCH_SPACE,
    SequentialModelConfig,
    hard_readout_only,
    no_routing_matrix,
    served_as_configured,
)
from kgrec.models.sequential.multi_interest import MultiInterestModel, init_normal_
from kgrec.models.spec import ModelSpec, register
from torch import Tensor


class YouTubeDNN(MultiInterestModel):
    r"""Single-vector retrieval from `"Deep Neural Networks for YouTube Recommendations"
    <https://dl.acm.org/doi/10.1145/2959100.2959190>`_ (Covington et al., RecSys 2016), history
    features only.

    The user vector is an MLP of the mean-pooled embeddings of the last ``L`` history items,

    .. math:: u = \mathrm{MLP}\Big(\frac{1}{|H|} \sum_{i \in H} e_i\Big),
              \quad \mathrm{MLP}(x) = W_2\,\mathrm{ReLU}(W_1 x + b_1) + b_2 \ (\text{or } x),

    scored against the item embeddings by inner product (candidate generation as extreme
    classification, trained with sampled softmax). It is a :class:`MultiInterestModel` with
    ``K = 1``, so it is trained, evaluated and served by exactly the same code as the
    multi-interest models.

    Args:
        num_items: item count.
        embedding_dim: ``d``.
        hidden_dim: width of the MLP's hidden layer; 0 makes the MLP the identity (pure mean pooling).
        max_length: history items used (the most recent ``L``).
        temperature: sampled-softmax temperature.
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        hidden_dim: int = 0,
        max_length: int = 20,
        temperature: float = 0.1,
    ) -> None:
        super().__init__(num_items, embedding_dim, 1, max_length, temperature, "max")
        self.hparams = dict(
            num_items=num_items, embedding_dim=embedding_dim, hidden_dim=hidden_dim,
            max_length=max_length, temperature=temperature,
        )
        self.hidden_dim = hidden_dim
        self.item_embedding = torch.nn.Embedding(num_items, embedding_dim)
        self.mlp = (
            torch.nn.Sequential(
                torch.nn.Linear(embedding_dim, hidden_dim),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden_dim, embedding_dim),
            )
            if hidden_dim > 0
            else torch.nn.Identity()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_(self.item_embedding.weight, self.embedding_dim)
        for module in self.mlp.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()

    def interests(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        mask = torch.arange(histories.shape[1], device=histories.device)[None, :] < lengths[:, None]
        emb = self.item_embedding(histories) * mask.unsqueeze(-1)
        pooled = emb.sum(1) / lengths.clamp(min=1).unsqueeze(-1).to(emb.dtype)
        user = self.mlp(pooled)
        return user.unsqueeze(1), torch.ones(len(lengths), 1, dtype=torch.bool, device=histories.device)


def _check_youtube_dnn(config: SequentialModelConfig) -> None:
    hard_readout_only(config)
    no_routing_matrix(config)  # mean pooling / an MLP: nothing routes items to interests


def build_youtube_dnn(config: SequentialModelConfig, num_items: int) -> YouTubeDNN:
    model = YouTubeDNN(
        num_items, embedding_dim=config.embedding_dim, max_length=config.max_length,
        hidden_dim=config.hidden_dim, temperature=config.temperature,
    )
    return served_as_configured(model, config)


SPEC = register(
    ModelSpec(
        name="youtube_dnn",
        family="sequential",
        build=build_youtube_dnn,
        summary="YouTube-DNN: one user vector from the pooled history (Covington et al., RecSys 2016)",
        check=_check_youtube_dnn,
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
