"""Pairwise BPR: the training task of the retriever family (and, with hard negatives, the ranker's).

One epoch is one pass over all training interactions in shuffled mini-batches, each interaction
with one uniformly sampled negative redrawn every epoch; validation ranks every item for the
validation users with their training items masked (:func:`kgrec.models.evaluation.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.models.base import Recommender
from kgrec.models.evaluation import evaluate
from kgrec.models.training import distributed
from kgrec.models.training.sampling import NegativeSampler
from kgrec.models.training.trainer import EpochCallback, FitResult, Trainer
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig


def train_pairs(train: sp.spmatrix) -> tuple[Tensor, Tensor]:
    """``(users, items)`` of every training interaction (COO order)."""
    coo = sp.csr_matrix(train).tocoo()
    return torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))


class BPRTask:
    """BPR over ``data.train``, selected on ``selection_metric`` of the validation ranking."""

    also_improving: str | None = None

    def __init__(
        self,
        data: InteractionData,
        batch_size: int,
        selection_metric: str = "recall@20",
        ks: Sequence[int] = (20,),
        eval_batch_size: int = 4096,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.selection_metric = selection_metric
        self.ks = tuple(ks)
        self.eval_batch_size = eval_batch_size
        self.users, self.items = train_pairs(data.train)
        if self.users.numel() == 0:
            raise ValueError("no training interactions")
        self.sampler = NegativeSampler(data.train)

    def prepare(self, model: Recommender) -> None:
        return None

    def negatives(self, generator: torch.Generator) -> Tensor:
        return self.sampler.sample(self.users, generator)

    def train_epoch(
        self, model: Recommender, optimizer: torch.optim.Optimizer, generator: torch.Generator, device: torch.device
    ) -> float:
        n = self.users.numel()
        # Every rank draws the same permutation and negatives (same seed) and takes its shard.
        perm = torch.randperm(n, generator=generator)
        negs = self.negatives(generator)
        # The epoch's (user, item, negative) triples in batch order, copied to the device at once
        # (pinned, asynchronous on CUDA) and the loss summed there: no host round trip per step.
        ordered = torch.stack([self.users[perm], self.items[perm], negs[perm]], 1)
        pinned = device.type == "cuda"
        ordered = (ordered.pin_memory() if pinned else ordered).to(device, non_blocking=pinned)
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for start in range(0, n, self.batch_size):
            batch = ordered[start : start + self.batch_size]
            shard = distributed.shard(batch)
            optimizer.zero_grad(set_to_none=True)
            if shard.size(0) == 0:  # a last batch smaller than the world: join the all-reduce
                sum(p.sum() for p in model.parameters()).mul(0.0).backward()
            else:
                users, items, negatives = shard.unbind(1)
                loss = model.loss(users, items, negatives)
                weight = distributed.shard_weight(shard.size(0), batch.size(0))
                (loss if weight == 1.0 else loss * weight).backward()
                total += loss.detach().to(torch.float64) * shard.size(0)
                count += shard.size(0)
            optimizer.step()
        total, count = distributed.sum_over_ranks(total.item(), count)
        return total / count

    def validate(self, model: Recommender) -> dict[str, float]:
        return evaluate(model, self.data.valid, self.data.train, ks=self.ks, batch_size=self.eval_batch_size)

    def finish(self, model: Recommender, result: FitResult) -> None:
        return None


def fit(
    model: Recommender,
    data: InteractionData,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
    progress: bool = False,
    reset: bool = True,
) -> FitResult:
    """Train a retriever with BPR on ``data.train`` (:class:`BPRTask` through the :class:`Trainer`),
    with the batch grown for the data's size (:meth:`~kgrec.models.config.TrainConfig.for_data`)."""
    config = config.for_data(int(data.train.nnz))
    task = BPRTask(data, config.batch_size, config.selection_metric, config.ks, config.eval_batch_size)
    callbacks = () if on_epoch is None else (on_epoch,)
    result = Trainer(config, callbacks, progress=progress).fit(model, task, reset=reset)
    result.settings = batch_settings(config, int(data.train.nnz))
    return result


def batch_settings(config: TrainConfig, num_pairs: int) -> dict[str, float]:
    """What an epoch ran with (``config`` after :meth:`~kgrec.models.config.TrainConfig.for_data`),
    logged beside the requested configuration."""
    return {
        "effective_batch_size": config.batch_size,
        "effective_learning_rate": config.learning_rate,
        "batches_per_epoch": -(-num_pairs // config.batch_size),
    }
