"""Training and test evaluation of any registered model as one tracked MLflow run.

The library steps the flow wires together; each works without Prefect, and none branches on a
family or a model name: the spec's family (:mod:`kgrec.models.families`) supplies the config,
task, test protocol and data identity.

* :func:`train_and_log` -- one MLflow run: the validated config (flat), the data's identity
  (snapshot hash, split, sizes) and ``model`` / ``family`` as params; its lineage
  (:mod:`kgrec.models.tracking.lineage`: the snapshot as the ``training`` dataset input, the git
  commit / dirty flag and the kgrec version as tags); per-epoch ``train_loss``,
  ``epoch_seconds`` and ``valid_*`` as metrics (step = epoch); then ``best_valid_*`` (the promotion
  gate reads the family's selection metric), ``best_epoch``, ``seconds_per_epoch``,
  ``train_seconds``.
* :func:`evaluate_and_log` -- test metrics of the best-validation weights, logged as ``test_*``;
  families that evaluate at several K (a config with ``ks``) also report the :data:`CURVE_KS` up
  to their largest K (the Recall/NDCG@K plot), at no extra ranking cost.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import torch
from kgrec.features.dataset import InteractionData
from kgrec.models.families import ModelFamily, RankerInputs, family_of
from kgrec.models.retrievers.kgat import KGAT
from kgrec.models.spec import ModelSpec
from kgrec.models.tracking.lineage import lineage_tags, log_snapshot_input
from kgrec.models.tracking.registry import prefixed_metrics, tracked_run
from kgrec.models.training.trainer import EpochCallback, EpochLog, FitResult

logger = logging.getLogger("kgrec.models")

#: Cut-offs the test evaluation adds (up to the config's largest K) for the metrics-at-K curves.
CURVE_KS = (1, 5, 10, 20, 50, 100)


@dataclass
class Trained:
    """A trained model, its run, its configuration and the inputs it was trained on."""

    run_id: str | None  # None: trained untracked (``kgrec train --no-track``)
    spec: ModelSpec
    config: Any
    model: torch.nn.Module
    fit: FitResult
    inputs: Any
    test_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def family(self) -> ModelFamily:
        return family_of(self.spec)

    @property
    def kind(self) -> str:
        """The artefact kind (``embedding``, ``multi_interest``, ``ranker``)."""
        return self.family.artifact

    @property
    def selection_metric(self) -> str:
        """MLflow metric the promotion gate compares (``best_valid_recall_at_20``, ...)."""
        return self.family.selection_metric(self.config)

    @property
    def selection_value(self) -> float | None:
        return self.fit.best_valid.get(self.config.selection_metric)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "kind": self.kind,
            "family": self.spec.family,
            "run_id": self.run_id,
            "best_epoch": self.fit.best_epoch,
            "epochs_run": len(self.fit.history),
            "stop_reason": self.fit.stop_reason,
            "seconds_per_epoch": round(self.fit.seconds_per_epoch, 4),
            "selection_metric": self.config.selection_metric,
            "valid": _rounded(self.fit.best_valid),
            "test": _rounded(self.test_metrics),
            **self.family.summary(self.config, self.inputs, self.fit),
        }


def _rounded(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        k: (round(float(v), 5) if math.isfinite(v) else None)
        for k, v in metrics.items()
        if isinstance(v, int | float) and ("@" in k or k in ("interest_similarity", "alpha"))
    }


def log_epoch(log: EpochLog) -> None:
    """MLflow callback: one step per epoch."""
    metrics = {"train_loss": log.loss, "epoch_seconds": log.seconds, **log.extra}
    if log.valid is not None:
        metrics |= prefixed_metrics("valid", log.valid)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=log.epoch)


def train_and_log(
    spec: ModelSpec,
    config: Any,
    inputs: Any,
    *,
    extra_params: dict[str, Any] | None = None,
    extra_tags: Mapping[str, str] | None = None,
    callbacks: Sequence[EpochCallback] = (),
    run_name: str | None = None,
    nested: bool = False,
    stopped_on_purpose: tuple[type[BaseException], ...] = (),
    progress: bool = False,
    cancel: threading.Event | None = None,
) -> Trained:
    """Train ``spec`` with ``config`` on ``inputs`` as one MLflow run (module docstring).

    ``callbacks`` run after the MLflow logging of each epoch (a tuning trial's pruner);
    ``nested`` and ``stopped_on_purpose`` as in :func:`~kgrec.models.tracking.registry.tracked_run`.
    """
    family = family_of(spec)
    data_params = family.data_params(inputs)
    params = {**config.to_dict(), **data_params, "family": spec.family, **(extra_params or {})}
    dataset = str(data_params.get("dataset", "unknown"))
    tags = {
        "kgrec.model": spec.name, "kgrec.dataset": dataset, "kgrec.bundle_kind": family.artifact,
        **lineage_tags(), **(extra_tags or {}),
    }
    with tracked_run(
        run_name or f"{spec.name}-{dataset}", params, tags, nested=nested, stopped_on_purpose=stopped_on_purpose
    ) as run_id:
        log_snapshot_input(family.snapshot(inputs))
        model, result = family.fit(
            spec, config, inputs, (log_epoch, *callbacks), progress=progress, cancel=cancel
        )
        if not result.best_valid:
            raise RuntimeError(f"{spec.name}: no validation result (no validation users?)")
        if result.settings:
            mlflow.log_params(result.settings)
        # "time_budget": the best epoch before a time cap, not a converged one
        mlflow.set_tag("kgrec.stop_reason", result.stop_reason)
        mlflow.log_metrics(
            {
                **prefixed_metrics("best_valid", result.best_valid),
                "best_epoch": result.best_epoch,
                "seconds_per_epoch": result.seconds_per_epoch,
                "train_seconds": result.train_seconds,
            }
        )
    logger.info(
        "%s: best epoch %d, valid %s %.4f, %.3f s/epoch",
        spec.name, result.best_epoch, config.selection_metric,
        result.best_valid.get(config.selection_metric, float("nan")), result.seconds_per_epoch,
    )
    return Trained(run_id=run_id, spec=spec, config=config, model=model, fit=result, inputs=inputs)


def evaluate_and_log(trained: Trained) -> dict[str, float]:
    """Test metrics of the best-validation weights through the family's protocol (at the
    config's ``ks`` and the :data:`CURVE_KS` below its largest), logged to the model's run as
    ``test_*``."""
    metrics = trained.family.evaluate(trained.model, curve_config(trained.config), trained.inputs)
    trained.test_metrics = metrics
    with mlflow.start_run(run_id=trained.run_id):
        mlflow.log_metrics(prefixed_metrics("test", metrics))
    return metrics


def curve_config(config: Any) -> Any:
    """``config`` evaluating also at the :data:`CURVE_KS` up to its largest K (the same config when
    it has no ``ks``: such a family evaluates at its own fixed K)."""
    ks = getattr(config, "ks", None)
    if not ks or not hasattr(config, "model_copy"):
        return config
    extended = tuple(sorted(set(ks) | {k for k in CURVE_KS if k <= max(ks)}))
    return config if extended == tuple(ks) else config.model_copy(update={"ks": extended})


def ranker_inputs(data: InteractionData, trained: Iterable[Trained]) -> RankerInputs:
    """A ranker learns from the run's retriever with the best validation Recall@20 (hard negatives
    among its candidates) and starts its global layer from the run's KGAT, if it trained one (on
    `music` test NDCG@20 of KCAN alone 0.086 -> 0.137, fused -0.002 -> +0.003 vs retrieval alone)."""
    retrievers = [t for t in trained if t.spec.family == "retriever"]
    if not retrievers:
        raise ValueError("the ranking stage needs an embedding retriever trained in the same run")
    best = max(retrievers, key=lambda t: t.fit.best_valid.get("recall@20", float("-inf")))
    kgat = next((t.model for t in retrievers if isinstance(t.model, KGAT)), None)
    return RankerInputs(data, best.model, best.name, best.run_id, kgat)
