"""Training loop of the multi-interest candidate generators on time-ordered sequences.

Samples: for every training user's sequence :math:`s_1 \\dots s_n` and every position
``t = min_history .. n-1`` (0-based), the history :math:`s_{\\max(0, t-L)} \\dots s_{t-1}` (the last
``L = model.max_length`` items before ``t``) predicts the next item :math:`s_t` -- or, with
``target_window = W > 1``, an item drawn anew each epoch uniformly from :math:`s_t \dots s_{t+W-1}`
(evaluation asks for the next 20% of a sequence, not the next item). With ``mask_seen`` the
user's items before ``t`` (the whole prefix, not only the window) are left out of the negatives,
as evaluation and serving never return them (:meth:`MultiInterestModel.loss`). Each epoch shuffles
all samples into mini-batches; each batch draws ``num_negatives`` uniform negatives shared by the
batch (sampled softmax, :meth:`MultiInterestModel.loss`), or with ``num_negatives = 0`` scores every
item (exact softmax: affordable while ``batch x K x items`` fits in memory, e.g. ml-100k's 1,682
items); Adam. After every epoch the model is
evaluated on the validation users with :func:`evaluate_sequential` -- i.e. through
:func:`kgrec.models.sequential.multi_interest.recommend` with the model's own merge rule, the exact path the
service uses (train/serve-mismatch guard) -- and training stops after ``patience`` epochs without a
better validation ``selection_metric``; the best epoch's weights are restored.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from kgrec.features.sequences import SequenceSplit
from kgrec.models.sequential.multi_interest import MultiInterestModel
from kgrec.models.sequential_evaluation import evaluate_sequential

logger = logging.getLogger("kgrec.models")


@dataclass(frozen=True)
class SequentialTrainConfig:
    """Hyper-parameters of :func:`fit_sequential` (defaults: fast on ml-100k on 2 CPU cores)."""

    learning_rate: float = 3e-3
    batch_size: int = 256
    #: Uniform negatives per batch; 0 = every item (exact softmax).
    num_negatives: int = 256
    epochs: int = 30
    patience: int = 3
    min_history: int = 1
    seed: int = 2020
    selection_metric: str = "recall@50"
    ks: tuple[int, ...] = (20, 50)
    weight_decay: float = 0.0
    #: Weight of the interest decorrelation penalty (:meth:`MultiInterestModel.loss`); 0 = off.
    decorrelation: float = 0.0
    #: Each epoch, every history predicts an item drawn uniformly from the next ``target_window``
    #: items of its sequence (1 = the next item).
    target_window: int = 1
    #: Drop every item the user had before the target (the whole prefix, not only the window)
    #: from the softmax's negatives, as evaluation and serving never return them.
    mask_seen: bool = False
    #: Stop after this many seconds of training (None: no limit); the best epoch is still restored.
    time_budget_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SequentialFitResult:
    """Outcome of :func:`fit_sequential`; the model holds the best epoch's weights."""

    best_epoch: int
    best_valid: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # training only (evaluation excluded)
    total_seconds: float = 0.0
    num_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def fit_sequential(
    model: MultiInterestModel,
    split: SequenceSplit,
    config: SequentialTrainConfig = SequentialTrainConfig(),
    categories: np.ndarray | None = None,
    reset: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> SequentialFitResult:
    """Train ``model`` on ``split.train_sequences``, early-stopping on validation (module docstring).

    Reproducibility: the global torch RNG is seeded with ``config.seed`` (and the model re-initialised
    with ``reset``); shuffling and negatives use generators seeded the same way. ``categories`` only
    adds ``diversity@50`` to the validation log. ``on_epoch`` is called after every epoch with its
    log entry ``{"epoch", "loss", "seconds", "valid"}`` (e.g. to log it to MLflow as it happens).
    """
    if not model.trainable:
        raise ValueError(f"{type(model).__name__} is not trained by gradient descent")
    if config.num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {config.num_negatives}")
    torch.manual_seed(config.seed)
    if reset:
        model.reset_parameters()
    if config.target_window < 1:
        raise ValueError(f"target_window must be >= 1, got {config.target_window}")
    hist, lengths, flat, target_pos, ahead, seq_start = sliding_windows(
        split.train_sequences, model.max_length, config.min_history
    )
    hist_t, len_t = torch.from_numpy(hist), torch.from_numpy(lengths)
    flat_t, pos_t = torch.from_numpy(flat), torch.from_numpy(target_pos)
    reach_t = torch.from_numpy(np.minimum(ahead, config.target_window))
    start_t = torch.from_numpy(seq_start)
    n = len(pos_t)
    if n == 0:
        raise ValueError("no training samples")
    generator = torch.Generator().manual_seed(config.seed)
    all_items = torch.arange(model.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best_epoch, best_value, best_valid, best_state = 0, float("-inf"), {}, None
    history: list[dict[str, Any]] = []
    bad, train_seconds = 0, 0.0
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=generator)
        tgt_t = window_targets(flat_t, pos_t, reach_t, generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = perm[start : start + config.batch_size]
            width = max(1, int(len_t[idx].max()))
            negatives = (
                torch.randint(model.num_items, (config.num_negatives,), generator=generator)
                if config.num_negatives
                else all_items
            )
            seen = seen_mask(flat_t, start_t[idx], pos_t[idx], model.num_items) if config.mask_seen else None
            loss = model.loss(hist_t[idx, :width], len_t[idx], tgt_t[idx], negatives, config.decorrelation, seen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        train_seconds += time.perf_counter() - t0
        valid = evaluate_sequential(model, split.valid_inputs, split.valid_targets, categories, ks=config.ks)
        value = valid[config.selection_metric]
        history.append({"epoch": epoch, "loss": total / n, "seconds": time.perf_counter() - t0, "valid": valid})
        if on_epoch is not None:
            on_epoch(history[-1])
        logger.info("epoch %d loss=%.4f valid %s=%.4f", epoch, total / n, config.selection_metric, value)
        if value > best_value:
            best_epoch, best_value, best_valid = epoch, value, valid
            best_state = copy.deepcopy(model.state_dict())
            bad = 0
        else:
            bad += 1
        if bad >= config.patience:
            break
        if config.time_budget_s is not None and train_seconds >= config.time_budget_s:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return SequentialFitResult(
        best_epoch=best_epoch,
        best_valid=best_valid,
        history=history,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        num_samples=n,
    )
