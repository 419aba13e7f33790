"""The one training loop: every model family, through a :class:`TrainingTask`.

The :class:`Trainer` owns what every family shares -- seeding, re-initialisation, device placement,
the optimisers (the main Adam and one per :class:`~kgrec.models.base.EpochHook` a model declares),
epochs, validation, early stopping on the selection metric, restoring the best weights, progress,
per-epoch callbacks (MLflow) and cancellation. A task holds what differs: how one epoch walks the
training data (pairwise BPR, next-item softmax, hard-negative re-ranking: :mod:`.tasks`) and how
the model is validated.

Contract of a task::

    selection_metric: str            # key of validate()'s dict the best epoch is chosen on
    also_improving: str | None       # a second key whose improvement also resets the patience
    prepare(model) -> None           # after seeding and reset (e.g. KCAN's global start)
    train_epoch(model, optimizer, generator, device) -> float   # mean training loss
    validate(model) -> dict[str, float]
    finish(model, result) -> None    # after the best weights are back (e.g. KCAN's fusion weight)

Reproducibility: the global torch RNG is seeded with ``config.seed`` and, with ``reset``, the model
is re-initialised from it; shuffling and negatives draw from a dedicated generator seeded the same
way; deterministic algorithms are on during the fit. On CPU the same seed gives the same history.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from kgrec.models.base import EpochHook
from kgrec.models.training import distributed
from tqdm.auto import tqdm

logger = logging.getLogger("kgrec.models")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it). Small per-batch tensors
    (the sequential models') lose far more to OpenMP fan-out than they gain on a busy machine."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TrainingCancelled(RuntimeError):
    """The fit was asked to stop (``cancel`` event set); nothing of it should be published."""


class LoopSettings(Protocol):
    """What the trainer reads from a family's configuration."""

    epochs: int
    patience: int
    learning_rate: float
    weight_decay: float
    eval_every: int
    seed: int
    time_budget_s: float | None

    def resolved_device(self) -> torch.device: ...


class TrainingTask(Protocol):
    selection_metric: str
    also_improving: str | None

    def prepare(self, model: torch.nn.Module) -> None: ...

    def train_epoch(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        device: torch.device,
    ) -> float: ...

    def validate(self, model: torch.nn.Module) -> dict[str, float]: ...

    def finish(self, model: torch.nn.Module, result: FitResult) -> None: ...


@dataclass
class EpochLog:
    """One epoch; ``seconds`` is training time only (validation excluded)."""

    epoch: int
    loss: float
    seconds: float
    valid: dict[str, float] | None = None
    extra: dict[str, float] = field(default_factory=dict)  # from the model's epoch hooks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """Outcome of :meth:`Trainer.fit`; the model holds the best epoch's weights."""

    best_epoch: int
    best_valid: dict[str, float]
    history: list[EpochLog]
    seconds_per_epoch: float  # median training seconds per epoch
    train_seconds: float  # training only (validation excluded)
    total_seconds: float  # the whole fit
    stopped_early: bool = False
    stop_reason: str = "epochs"  # "epochs" | "patience" | "time_budget"
    settings: dict[str, Any] = field(default_factory=dict)  # resolved from the data by the family

    @property
    def capped(self) -> bool:
        """Stopped by the time budget: the best epoch so far, not a converged one."""
        return self.stop_reason == "time_budget"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EpochCallback = Callable[[EpochLog], None]


def hook_optimizer(hook: EpochHook) -> torch.optim.Optimizer | None:
    """The optimiser the trainer owns for an epoch hook (``None`` for a hook without parameters)."""
    return torch.optim.Adam(hook.parameters, lr=hook.learning_rate) if hook.parameters else None


class Trainer:
    """Runs any :class:`TrainingTask` (module docstring).

    Args:
        config: the family's configuration (:class:`LoopSettings` fields).
        callbacks: called with every :class:`EpochLog`, in order (e.g. MLflow logging).
        progress: a tqdm bar when stderr is a terminal, else one log line per epoch.
        cancel: when set, the fit raises :class:`TrainingCancelled` before the next optimiser step
            (so within one batch, not one epoch, of a signal).
    """

    def __init__(
        self,
        config: LoopSettings,
        callbacks: Sequence[EpochCallback] = (),
        progress: bool = False,
        cancel: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.callbacks = tuple(callbacks)
        self.progress = progress
        self.cancel = cancel

    def fit(self, model: torch.nn.Module, task: TrainingTask, reset: bool = True) -> FitResult:
        config = self.config
        device = distributed.device_for(config.resolved_device())
        torch.manual_seed(config.seed)
        if reset:
            model.reset_parameters()
        model.to(device)
        task.prepare(model)
        generator = torch.Generator().manual_seed(config.seed)  # sampling stays on the CPU
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        hooks = list(model.epoch_hooks())
        hook_optimizers = [hook_optimizer(h) for h in hooks]
        name = type(model).__name__
        if self.cancel is not None:
            # Every task steps an optimiser per batch: checking there needs no change to the tasks.
            for opt in (optimizer, *filter(None, hook_optimizers)):
                opt.register_step_pre_hook(self._stop_if_cancelled(name))
        if distributed.world_size() > 1:  # data parallel: gradients averaged before each step
            for opt in (optimizer, *filter(None, hook_optimizers)):
                opt.register_step_pre_hook(distributed.average_gradients)
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        metric, second = task.selection_metric, task.also_improving
        history: list[EpochLog] = []
        best_epoch, best_value, best_second, best_valid = 0, float("-inf"), float("-inf"), {}
        best_state: dict[str, torch.Tensor] | None = None
        bad, stop_reason, train_seconds = 0, "epochs", 0.0
        bar = (
            tqdm(total=config.epochs, desc=f"fit {name}", unit="epoch")
            if self.progress and sys.stderr.isatty()
            else None
        )
        started = time.perf_counter()
        try:
            for epoch in range(1, config.epochs + 1):
                if self.cancel is not None and self.cancel.is_set():
                    raise TrainingCancelled(f"{name}: cancelled before epoch {epoch}")
                t0 = time.perf_counter()
                model.train()
                loss = task.train_epoch(model, optimizer, generator, device)
                extra: dict[str, float] = {}
                for hook, optimizer_of_hook in zip(hooks, hook_optimizers):
                    extra |= hook.run(optimizer_of_hook)
                if device.type == "cuda":  # kernels run asynchronously: time the epoch's end
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                train_seconds += seconds
                log = EpochLog(epoch=epoch, loss=loss, seconds=seconds, extra=extra)
                if epoch % config.eval_every == 0 or epoch == config.epochs:
                    model.eval()
                    # The ranks hold the same weights: rank 0 validates and its figures decide.
                    log.valid = distributed.broadcast(task.validate(model) if distributed.rank() == 0 else None)
                    value = log.valid[metric]
                    improved_second = second is not None and log.valid[second] > best_second
                    if second is not None:
                        best_second = max(best_second, log.valid[second])
                    if value > best_value:
                        best_epoch, best_value, best_valid = epoch, value, log.valid
                        best_state = copy.deepcopy(model.state_dict())
                        bad = 0
                    elif improved_second:
                        bad = 0
                    else:
                        bad += 1
                history.append(log)
                for callback in self.callbacks:
                    callback(log)
                self._report(bar, log, metric, best_value)
                if bad >= config.patience:
                    stop_reason = "patience"
                    logger.info(
                        "%s: early stop at epoch %d; best epoch %d %s=%.4f",
                        name, epoch, best_epoch, metric, best_value,
                    )
                    break
                if config.time_budget_s is not None and distributed.broadcast(
                    train_seconds >= config.time_budget_s
                ):
                    stop_reason = "time_budget"
                    break
        finally:
            if bar is not None:
                bar.close()
            torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        result = FitResult(
            best_epoch=best_epoch,
            best_valid=best_valid,
            history=history,
            seconds_per_epoch=statistics.median(h.seconds for h in history),
            train_seconds=train_seconds,
            total_seconds=time.perf_counter() - started,
            stopped_early=stop_reason != "epochs",
            stop_reason=stop_reason,
        )
        task.finish(model, result)
        return result

    def _stop_if_cancelled(self, name: str) -> Callable[..., None]:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self.cancel is not None and self.cancel.is_set():
                raise TrainingCancelled(f"{name}: cancelled during training")

        return hook

    @staticmethod
    def _report(bar: Any, log: EpochLog, metric: str, best: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{log.loss:.4f}", best=f"{best:.4f}")
            return
        valid = f" valid {metric}={log.valid[metric]:.4f}" if log.valid else ""
        logger.info("epoch %d loss=%.5f %.2fs%s", log.epoch, log.loss, log.seconds, valid)
