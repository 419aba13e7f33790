"""Training loop of the multi-interest candidate generators on time-ordered sequences.

Samples: for every training user's sequence :math:`s_1 \\dots s_n` and every position
``t = min_history .. n-1`` (0-based), the history :math:`s_{\\max(0, t-L)} \\dots s_{t-1}` (the last
``L = model.max_length`` items before ``t``) predicts the next item :math:`s_t` -- or, with
``target_window = W > 1``, an item drawn anew each epoch uniformly from :math:`s_t \dots s_{t+W-1}`
(evaluation asks for the next 20% of a sequence, not the next item). With ``mask_seen`` the
user's items before ``t`` (the whole prefix, not only the window) are left out of the negatives,
as evaluation and serving never return them (:meth:`MultiInterestModel.loss`). Each epoch shuffles
all samples into mini-batches. The softmax is exact (every item scored) up to
``exact_softmax_max_items`` items (default 5,000; e.g. ml-100k's 1,682) and sampled above it
(``SequentialModelConfig.softmax``): each batch draws ``sampled_negatives`` negatives shared by the
batch from the item popularity in the training sequences, :math:`Q(j) \propto (c_j + 1)^{0.75}`
(word2vec's smoothing), and every logit has :math:`\log Q(j)` subtracted (log-Q correction), or
uniformly (REMI's hard negatives, or ``negative_sampler: uniform``); Adam. After every epoch the model is
evaluated on the validation users with :func:`evaluate_sequential` -- i.e. through
:func:`kgrec.models.sequential.multi_interest.recommend` with the model's own merge rule, the exact path the
service uses (train/serve-mismatch guard) -- and training stops after ``patience`` epochs without a
better validation ``selection_metric``; the best epoch's weights are restored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kgrec.features.sequences import SequenceSplit
from kgrec.models.sequential.multi_interest import MultiInterestModel
from kgrec.models.sequential_evaluation import evaluate_sequential
from kgrec.models.training.trainer import EpochCallback, FitResult, Trainer
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.models.sequential.config import SequentialModelConfig

LOG = logging.getLogger("kgrec.models")
#: Smoothing exponent of the popularity proposal (word2vec's 3/4: popular items are drawn more
#: often than uniform, less than in proportion).
POPULARITY_EXPONENT = 0.75


def training_samples(
    sequences: list[np.ndarray], max_length: int, min_history: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All sliding samples: ``(histories [N, L] left-aligned, lengths [N], targets [N])`` (vectorised)."""
    hist, length, flat, target_pos, _, _ = sliding_windows(sequences, max_length, min_history)
    return hist, length, flat[target_pos]


def sliding_windows(
    sequences: list[np.ndarray], max_length: int, min_history: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every sliding window: ``(histories [N, L], lengths [N], flat [T], target_pos [N], ahead [N],
    seq_start [N])`` where ``flat`` is the concatenated sequences, ``flat[target_pos]`` the next item
    after each history, ``ahead`` how many items of the sequence remain from there (>= 1) and
    ``flat[seq_start:target_pos]`` everything the user had before it."""
    if min_history < 1:
        raise ValueError("min_history must be >= 1")
    lens = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.concatenate(sequences).astype(np.int64) if len(sequences) else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else np.zeros(0, np.int64)
    per_seq = np.maximum(lens - min_history, 0)
    seq_of = np.repeat(np.arange(len(lens)), per_seq)
    # position t of each sample inside its sequence
    t = np.arange(per_seq.sum()) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq) + min_history
    target_pos = starts[seq_of] + t
    length = np.minimum(t, max_length)
    first = target_pos - length
    offsets = np.arange(max_length)[None, :]
    valid = offsets < length[:, None]
    hist = np.where(valid, flat[np.where(valid, first[:, None] + offsets, 0)], 0)
    ahead = (starts + lens)[seq_of] - target_pos
    return hist, length, flat, target_pos, ahead, starts[seq_of]


def window_targets(
    flat: torch.Tensor, target_pos: torch.Tensor, reach: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """One target per sample: ``flat[target_pos + j]`` with ``j`` uniform in ``[0, reach)``
    (``reach`` = how many of the next items are eligible; all ones = the next item, no draw)."""
    if bool((reach <= 1).all()):
        return flat[target_pos]
    offset = (torch.rand(len(reach), generator=generator, dtype=torch.float64) * reach).long()
    return flat[target_pos + offset]


def seen_mask(flat: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, num_items: int) -> torch.Tensor:
    """``[B, I]`` bool: row ``b`` marks the items ``flat[starts[b]:ends[b]]``."""
    counts = ends - starts
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    mask = torch.zeros(len(counts), num_items, dtype=torch.bool)
    mask[rows, flat[torch.repeat_interleave(starts, counts) + offsets]] = True
    return mask


class SequentialTask:
    """Next-item softmax over sliding windows of the training sequences (module docstring),
    selected on ``config.selection_metric`` of the validation users' merged lists."""

    also_improving: str | None = None

    def __init__(
        self, split: SequenceSplit, config: SequentialModelConfig, max_length: int, categories: np.ndarray | None = None
    ) -> None:
        self.split, self.config, self.categories = split, config, categories
        self.selection_metric = config.selection_metric
        hist, lengths, flat, target_pos, ahead, seq_start = sliding_windows(
            split.train_sequences, max_length, config.min_history
        )
        self.hist, self.lengths = torch.from_numpy(hist), torch.from_numpy(lengths)
        self.flat, self.target_pos = torch.from_numpy(flat), torch.from_numpy(target_pos)
        self.reach = torch.from_numpy(np.minimum(ahead, config.target_window))
        self.seq_start = torch.from_numpy(seq_start)
        self.num_samples = len(self.target_pos)
        if self.num_samples == 0:
            raise ValueError("no training samples")
        self.num_negatives, self.sampler = config.softmax(split.num_items)
        self.proposal: Tensor | None = None  # popularity sampler: Q(j) over the catalogue
        self.log_q: Tensor | None = None
        if self.sampler == "popularity":
            counts = np.bincount(self.flat.numpy(), minlength=split.num_items).astype(np.float64)
            proposal = (counts + 1.0) ** POPULARITY_EXPONENT
            self.proposal = torch.from_numpy(proposal / proposal.sum()).float()
            self.log_q = self.proposal.log()
        LOG.info(
            "%s: %s softmax over %d items (%s)", config.model,
            "exact" if self.sampler == "exact" else f"{self.sampler}-sampled ({self.num_negatives} negatives per batch"
            + (", log-Q corrected)" if self.log_q is not None else ")"),
            split.num_items,
            "num_negatives" if config.num_negatives is not None else f"exact_softmax_max_items={config.exact_softmax_max_items}",
        )

    def settings(self) -> dict[str, Any]:
        """What the run logs beside its config: the softmax the catalogue size chose."""
        return {"softmax": self.sampler, "softmax_negatives": self.num_negatives}

    def prepare(self, model: MultiInterestModel) -> None:
        if not model.trainable:
            raise ValueError(f"{type(model).__name__} is not trained by gradient descent")

    def train_epoch(
        self, model: MultiInterestModel, optimizer: torch.optim.Optimizer, generator: torch.Generator, device: torch.device
    ) -> float:
        config, n = self.config, self.num_samples
        perm = torch.randperm(n, generator=generator)
        targets = window_targets(self.flat, self.target_pos, self.reach, generator)
        all_items = torch.arange(model.num_items)
        log_q = None if self.log_q is None else self.log_q.to(device)  # once per epoch, not per batch
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = perm[start : start + config.batch_size]
            width = max(1, int(self.lengths[idx].max()))
            if self.proposal is not None:
                negatives = torch.multinomial(self.proposal, self.num_negatives, replacement=True, generator=generator)
            elif self.num_negatives:
                negatives = torch.randint(model.num_items, (self.num_negatives,), generator=generator)
            else:
                negatives = all_items
            seen = (
                seen_mask(self.flat, self.seq_start[idx], self.target_pos[idx], model.num_items).to(device)
                if config.mask_seen
                else None
            )
            loss = model.loss(
                self.hist[idx, :width].to(device), self.lengths[idx].to(device), targets[idx].to(device),
                negatives.to(device), config.decorrelation, seen,
                log_q=log_q,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        return total / n

    def validate(self, model: MultiInterestModel) -> dict[str, float]:
        split = self.split
        return evaluate_sequential(model, split.valid_inputs, split.valid_targets, self.categories, ks=self.config.ks)

    def finish(self, model: MultiInterestModel, result: FitResult) -> None:
        result.settings = self.settings()


def fit_sequential(
    model: MultiInterestModel,
    split: SequenceSplit,
    config: SequentialModelConfig,
    categories: np.ndarray | None = None,
    reset: bool = True,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` on ``split.train_sequences`` (:class:`SequentialTask` through the
    :class:`Trainer`). ``categories`` only add ``diversity@50`` to the validation log."""
    task = SequentialTask(split, config, model.max_length, categories)
    callbacks = () if on_epoch is None else (on_epoch,)
    return Trainer(config, callbacks).fit(model, task, reset=reset)
