"""The interface every recommender implements, so the trainer, evaluation and serving stay generic."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class EpochHook:
    """A step the trainer runs once per epoch after the main pass, e.g. an alternating objective.

    ``run(optimizer)`` returns ``{name: value}`` stats for the epoch log. When ``parameters`` is
    non-empty the trainer gives ``run`` its own Adam over them at ``learning_rate`` (moments of
    two losses of different scale are not mixed, as in the KGAT authors' code); otherwise ``None``.
    """

    name: str
    run: Callable[[torch.optim.Optimizer | None], dict[str, float]]
    parameters: tuple[torch.nn.Parameter, ...] = ()
    learning_rate: float = 1e-3


class Recommender(torch.nn.Module, ABC):
    r"""Abstract base class of a top-K recommender over ``num_users`` users and ``num_items`` items.

    Contract (see ``ARCHITECTURE.md``):

    * :meth:`loss` -- the scalar training objective of one batch of ``(user, positive, negative)``
      triples: BPR plus L2 regularisation of the batch's ego (layer-0) embeddings for the
      embedding models here.
    * :meth:`embeddings` -- ``(user_emb [U, d], item_emb [I, d])`` whose inner product is the score;
      graph models run their propagation once per call. The serving bundle exports these.
    * :meth:`score` -- ``[B, I]`` scores of every item for a batch of users.
    * :meth:`scorer` -- a ``users -> [B, I]`` function for full-ranking evaluation; the default
      computes :meth:`embeddings` once and reuses them for every batch.
    * :meth:`epoch_hooks` -- extra per-epoch steps the trainer runs after the main pass
      (:class:`EpochHook`): an additional objective with its own optimiser (KGAT's TransR loss),
      which the trainer creates and owns, or a refresh without gradient (attention, subgraphs).

    Models that are not embedding-based override :meth:`score` (and :meth:`scorer`) and leave
    :meth:`embeddings` raising :class:`NotImplementedError`.
    """

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1:
            raise ValueError(f"need at least one user and one item, got {num_users}, {num_items}")
        self.num_users = int(num_users)
        self.num_items = int(num_items)

    @abstractmethod
    def reset_parameters(self) -> None:
        """Re-initialise every learnable parameter (from the global torch RNG)."""

    @abstractmethod
    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        """Scalar training loss of a batch of ``(user, positive item, negative item)`` triples."""

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """Final ``(user_emb [U, d], item_emb [I, d])``; score = inner product."""
        raise NotImplementedError(f"{type(self).__name__} is not an embedding model")

    def score(self, users: Tensor) -> Tensor:
        """Scores ``[B, I]`` of every item for the users ``[B]``."""
        user_emb, item_emb = self.embeddings()
        return user_emb[users] @ item_emb.t()

    def scorer(self) -> ScoreFn:
        """A ``users -> [B, I]`` score function for evaluation, computing embeddings only once."""
        user_emb, item_emb = self.embeddings()

        def score_fn(users: Tensor) -> Tensor:
            return user_emb[users.to(user_emb.device)] @ item_emb.t()

        return score_fn

    def epoch_hooks(self) -> list[EpochHook]:
        """Extra per-epoch steps (an auxiliary objective, a refresh); default none."""
        return []

    def extra_repr(self) -> str:
        return f"num_users={self.num_users}, num_items={self.num_items}"
