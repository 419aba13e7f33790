"""BPR training loop with periodic validation, early stopping and best-weight restoration."""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.models.base import Recommender
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.training.sampling import NegativeSampler

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData

logger = logging.getLogger("kgrec.models")


@dataclass
class EpochLog:
    """What happened in one epoch; ``seconds`` is training time only (evaluation excluded)."""

    epoch: int
    loss: float
    seconds: float
    valid: dict[str, float] | None = None
    extra: dict[str, float] = field(default_factory=dict)  # from Recommender.extra_epoch_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """Outcome of :func:`fit`; the model holds the best epoch's weights when it returns."""

    best_epoch: int
    best_valid: dict[str, float]
    history: list[EpochLog]
    seconds_per_epoch: float  # median training seconds per epoch
    total_seconds: float  # wall time of the whole fit, evaluation included
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _train_triples(train: sp.spmatrix) -> tuple[torch.Tensor, torch.Tensor]:
    coo = sp.csr_matrix(train).tocoo()
    return (
        torch.from_numpy(coo.row.astype(np.int64)),
        torch.from_numpy(coo.col.astype(np.int64)),
    )


def fit(
    model: Recommender,
    data: InteractionData,
    config: TrainConfig,
    on_epoch: Callable[[EpochLog], None] | None = None,
    progress: bool = False,
    reset: bool = True,
) -> FitResult:
    """Train ``model`` with BPR on ``data.train`` and select the epoch by ``config.selection_metric``.

    Each epoch is one pass over all training interactions in shuffled mini-batches of
    ``config.batch_size``, with one uniformly sampled negative per interaction (redrawn every epoch),
    optimised with Adam; then :meth:`Recommender.extra_epoch_step` runs. Every ``eval_every``
    epochs (and after the last) the model is ranked on ``data.valid`` with the training items
    masked; ``patience`` evaluations without improvement stop training. The best weights are
    restored before returning. Test metrics are not computed here (see ``evaluate_split``).

    Reproducibility: the global torch RNG is seeded with ``config.seed`` and, with ``reset=True``,
    the model is re-initialised from it; shuffling and negatives use a dedicated generator seeded
    the same way; deterministic algorithms are enabled during the fit and restored afterwards.
    On CPU the same seed gives the same loss history.

    Args:
        on_epoch: called with the :class:`EpochLog` of every epoch (e.g. to log to MLflow).
        progress: show a tqdm bar (only when stderr is a TTY); otherwise log lines.
        reset: re-initialise the parameters after seeding (set False to warm-start).
    """
    device = config.resolved_device()
    torch.manual_seed(config.seed)
    if reset:
        model.reset_parameters()
    model.to(device)
    generator = torch.Generator().manual_seed(config.seed)  # CPU: sampling is cheap here
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)

    users_all, pos_all = _train_triples(data.train)
    n_train = users_all.numel()
    if n_train == 0:
        raise ValueError("no training interactions")
    sampler = NegativeSampler(data.train)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    metric = config.selection_metric

    history: list[EpochLog] = []
    best_epoch, best_value, best_valid = 0, float("-inf"), {}
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals, stopped_early = 0, False
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, desc=f"fit {config.model}", unit="epoch")

    start_fit = time.perf_counter()
    try:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n_train, generator=generator)
            negs = sampler.sample(users_all, generator)
            total_loss = 0.0
            for start in range(0, n_train, config.batch_size):
                idx = perm[start : start + config.batch_size]
                loss = model.loss(
                    users_all[idx].to(device), pos_all[idx].to(device), negs[idx].to(device)
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * idx.numel()
            extra = model.extra_epoch_step(optimizer)
            seconds = time.perf_counter() - t0
            log = EpochLog(epoch=epoch, loss=total_loss / n_train, seconds=seconds, extra=extra)

            if epoch % config.eval_every == 0 or epoch == config.epochs:
                model.eval()
                log.valid = evaluate(
                    model, data.valid, data.train, ks=config.ks, batch_size=config.eval_batch_size
                )
                value = log.valid[metric]
                if value > best_value:
                    best_epoch, best_value, best_valid = epoch, value, log.valid
                    best_state = copy.deepcopy(model.state_dict())
                    bad_evals = 0
                else:
                    bad_evals += 1
            history.append(log)
            if on_epoch is not None:
                on_epoch(log)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{log.loss:.4f}", best=f"{best_value:.4f}")
            else:
                valid_txt = f" valid {metric}={log.valid[metric]:.4f}" if log.valid else ""
                logger.info(
                    "epoch %d loss=%.5f %.2fs%s", epoch, log.loss, seconds, valid_txt
                )
            if bad_evals >= config.patience:
                stopped_early = True
                logger.info(
                    "early stop at epoch %d; best epoch %d %s=%.4f",
                    epoch, best_epoch, metric, best_value,
                )
                break
    finally:
        if bar is not None:
            bar.close()
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(
        best_epoch=best_epoch,
        best_valid=best_valid,
        history=history,
        seconds_per_epoch=statistics.median(h.seconds for h in history),
        total_seconds=time.perf_counter() - start_fit,
        stopped_early=stopped_early,
    )
