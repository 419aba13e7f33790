"""Hyper-parameter search: one Optuna study per model, one MLflow parent run per study, one nested
child run per trial, and the best trial's configuration stored as the snapshot's recommendation.

* The search space is the spec's (:attr:`~kgrec.models.spec.ModelSpec.search_space`, declared in
  the model's file): config field names (``"params.<name>"`` for a model parameter) to Optuna
  distributions. A trial asks the study for one point (Optuna's ask-and-tell interface), trains
  the model's family config with it through :func:`~kgrec.models.tracking.experiment.train_and_log`
  as a child run, and tells the study its best validation value of the family's selection metric.
  Trials see the training and validation splits only; nothing here evaluates the test split.
* Sampler: TPE, seeded. Pruner: Optuna's median rule (default) or Hyperband on the per-epoch
  validation metric, reported at every validation. A pruned trial's run ends FINISHED with the
  ``kgrec.stopped`` tag saying why (its value against the median of the earlier trials at that
  epoch); a trial that fails (a diverging configuration) ends FAILED and the study goes on; a
  cancellation ends the study.
* Budget: ``trials`` and ``timeout_s`` (wall clock for the whole study, checked before each trial
  and passed to the trial as its training-time budget, so a study ends within about one
  validation of its timeout).
* The parent run holds the study: its settings and the data's identity as params, the best
  value, the trial counts and the parameter importances (fANOVA) as metrics, the trials table
  (``optuna/trials.csv``) and the plots (optimisation history, parameter importances,
  intermediate values) as artefacts, and ``recommended_config.json``: the best trial's overrides
  and full config. It is tagged ``kgrec.kind=tune`` with the model and the snapshot hash, which is
  how :func:`recommended_config` finds it (``kgrec pipeline --tuned``), on any tracking store.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import mlflow
import optuna
from kgrec.models.families import family_of
from kgrec.models.spec import ModelSpec
from kgrec.models.tracking.experiment import train_and_log
from kgrec.models.tracking.lineage import lineage_tags, log_snapshot_input
from kgrec.models.tracking.registry import tracked_run
from kgrec.models.training.trainer import EpochLog, TrainingCancelled
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("kgrec.models")

KIND_TAG = "kgrec.kind"
TUNE_KIND = "tune"
TRIAL_KIND = "trial"
SNAPSHOT_TAG = "kgrec.snapshot_hash"
#: A run trained with a recommended config names the study (parent run) it came from.
TUNED_FROM_TAG = "kgrec.tuned_from"
RECOMMENDATION_FILE = "recommended_config.json"


class TuneSettings(BaseModel):
    """The budget and the search of one study (``kgrec tune``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trials: int = Field(20, ge=1, le=10_000, description="trials per model at most")
    timeout_s: float | None = Field(None, gt=0.0, description="wall-clock seconds per model's study")
    pruner: Literal["median", "hyperband", "none"] = "median"
    #: Median rule: no pruning before this many trials have finished, nor before this epoch.
    startup_trials: int = Field(3, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    epochs: int | None = Field(None, ge=1, le=10_000, description="maximum epochs per trial (None: the model's)")
    seed: int = Field(2020, ge=0, description="sampler seed and every trial's model seed")

    def make_pruner(self, max_epochs: int) -> optuna.pruners.BasePruner:
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs
            )
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=max(1, self.warmup_epochs), max_resource=max_epochs)
        return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class Recommendation:
    """The best trial of a study: the overrides to apply to the model's defaults."""

    model: str
    snapshot_hash: str
    overrides: dict[str, Any]  # search-space keys -> values ("params.<name>" for model params)
    config: dict[str, Any]  # the whole trial config, for reference
    metric: str
    value: float
    run_id: str  # the study's parent run

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "snapshot_hash": self.snapshot_hash, "overrides": self.overrides,
            "config": self.config, "metric": self.metric, "value": self.value, "run_id": self.run_id,
        }

    def config_overrides(self) -> dict[str, Any]:
        """``overrides`` as keyword arguments of the family's ``config``."""
        return config_overrides(self.overrides)


@dataclass
class TuneResult:
    spec: ModelSpec
    run_id: str
    recommendation: Recommendation
    counts: dict[str, int]  # complete / pruned / failed
    stop_reason: str  # "trials" | "timeout"
    seconds: float
    importances: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.spec.name, "study_run_id": self.run_id, "trials": self.counts,
            "stop_reason": self.stop_reason, "seconds": round(self.seconds, 1),
            "best": {"metric": self.recommendation.metric, "value": round(self.recommendation.value, 5),
                     "params": self.recommendation.overrides},
            "importances": {k: round(v, 4) for k, v in self.importances.items()},
        }


def config_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """Search-space keys to family-config keyword arguments: ``params.<name>`` keys nest under
    ``params`` (merged key by key into the model's default params by ``for_model``)."""
    top: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("params."):
            nested[key.removeprefix("params.")] = value
        else:
            top[key] = value
    return top | ({"params": nested} if nested else {})


def trial_config(spec: ModelSpec, values: Mapping[str, Any], **fixed: Any) -> Any:
    """The family config of ``spec`` with a trial's ``values`` and the ``fixed`` settings."""
    return family_of(spec).config(spec, **config_overrides(values), **fixed)


class Pruning:
    """Trainer callback of one trial: report every validation to the study, prune when it says."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, metric: str) -> None:
        self.study, self.trial, self.metric = study, trial, metric

    def __call__(self, log: EpochLog) -> None:
        if log.valid is None:
            return
        value = float(log.valid[self.metric])
        self.trial.report(value, log.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(self.reason(log.epoch, value))

    def reason(self, epoch: int, value: float) -> str:
        earlier = [
            t.intermediate_values[epoch]
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if epoch in t.intermediate_values
        ]
        pruner = type(self.study.pruner).__name__
        if not earlier:
            return f"pruned by {pruner} at epoch {epoch}: valid {self.metric} {value:.4f}"
        return (
            f"pruned by {pruner} at epoch {epoch}: valid {self.metric} {value:.4f} against the median "
            f"{statistics.median(earlier):.4f} (best {max(earlier):.4f}) of {len(earlier)} earlier "
            "trial(s) at that epoch"
        )


def tune(
    spec: ModelSpec,
    inputs: Any,
    settings: TuneSettings,
    *,
    cancel: threading.Event | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneResult:
    """One study of ``spec`` on ``inputs`` (module docstring); ``pruner`` overrides the settings'."""
    if not spec.search_space:
        raise ValueError(f"model {spec.name!r} declares no search space: it cannot be tuned")
    family = family_of(spec)
    fixed = {"seed": settings.seed, "epochs": settings.epochs}
    default = family.config(spec, **fixed)
    metric, max_epochs = default.selection_metric, default.epochs
    data_params = family.data_params(inputs)
    snapshot = family.snapshot(inputs)
    snapshot_hash = snapshot.hash if snapshot is not None else str(data_params.get("snapshot_hash", "unknown"))
    dataset = str(data_params.get("dataset", "unknown"))
    with warnings.catch_warnings():  # Optuna's "experimental" notes on its own options
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            study_name=f"{spec.name}-{dataset}-{snapshot_hash[:12]}",
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=settings.seed),
            pruner=pruner or settings.make_pruner(max_epochs),
        )
    params = {
        **{f"tune.{k}": v for k, v in settings.model_dump().items()},
        "tune.selection_metric": metric,
        "tune.search_space": "; ".join(f"{k}={d!r}" for k, d in spec.search_space.items()),
        "model": spec.name, "family": spec.family, **data_params,
    }
    tags = {
        KIND_TAG: TUNE_KIND, "kgrec.model": spec.name, "kgrec.dataset": dataset, SNAPSHOT_TAG: snapshot_hash,
        **lineage_tags(),
    }
    started = time.monotonic()
    deadline = None if settings.timeout_s is None else started + settings.timeout_s
    stop_reason = "trials"
    with tracked_run(f"tune-{spec.name}-{dataset}", params, tags) as parent_id:
        log_snapshot_input(snapshot)
        for _ in range(settings.trials):
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled(f"{spec.name}: study cancelled")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                stop_reason = "timeout"
                break
            _run_trial(spec, inputs, study, metric, fixed, remaining, parent_id, snapshot_hash, cancel)
        result = _finish_study(spec, study, metric, parent_id, snapshot_hash, stop_reason, started)
    logger.info(
        "%s: study done, %s; best valid %s %.4f with %s",
        spec.name, result.counts, metric, result.recommendation.value, result.recommendation.overrides,
    )
    return result


def _run_trial(
    spec: ModelSpec, inputs: Any, study: optuna.Study, metric: str, fixed: dict[str, Any],
    remaining: float | None, parent_id: str, snapshot_hash: str, cancel: threading.Event | None,
) -> None:
    trial = study.ask(dict(spec.search_space))
    try:
        config = trial_config(spec, trial.params, **fixed, time_budget_s=remaining)
    except ValueError as exc:  # a combination the model rejects: not a point of the space
        study.tell(trial, state=TrialState.FAIL)
        logger.warning("%s trial %d: invalid configuration %s: %s", spec.name, trial.number, trial.params, exc)
        return
    tags = {KIND_TAG: TRIAL_KIND, "optuna.trial": str(trial.number), SNAPSHOT_TAG: snapshot_hash}
    try:
        trained = train_and_log(
            spec, config, inputs,
            extra_params={"tune.trial": trial.number, "tune.study_run_id": parent_id},
            extra_tags=tags, callbacks=(Pruning(study, trial, metric),),
            run_name=f"{spec.name}-trial-{trial.number}", nested=True,
            stopped_on_purpose=(optuna.TrialPruned,), cancel=cancel,
        )
    except optuna.TrialPruned as exc:
        study.tell(trial, state=TrialState.PRUNED)
        logger.info("%s trial %d: %s", spec.name, trial.number, exc)
        return
    except (TrainingCancelled, KeyboardInterrupt):
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # e.g. a learning rate that diverges; its run ended FAILED with the error
        study.tell(trial, state=TrialState.FAIL)
        logger.warning("%s trial %d failed: %s: %s", spec.name, trial.number, type(exc).__name__, exc)
        return
    value = trained.fit.best_valid.get(metric, float("nan"))
    if not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, value)


def _finish_study(
    spec: ModelSpec, study: optuna.Study, metric: str, parent_id: str, snapshot_hash: str,
    stop_reason: str, started: float,
) -> TuneResult:
    counts = {
        state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    if counts["complete"] == 0:
        raise RuntimeError(
            f"{spec.name}: no trial completed ({counts}); raise --trials or --timeout, or see the "
            "failed trials' runs for their errors"
        )
    best = study.best_trial
    recommendation = Recommendation(
        model=spec.name, snapshot_hash=snapshot_hash, overrides=dict(best.params),
        config=trial_config(spec, best.params).model_dump(mode="json"), metric=metric,
        value=float(best.value), run_id=parent_id,
    )
    importances = _importances(study)
    mlflow.log_metrics({
        "best_value": float(best.value), "best_trial": best.number,
        **{f"trials_{name}": n for name, n in counts.items()},
        **{f"importance.{k}": v for k, v in importances.items()},
    })
    mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
    mlflow.set_tags({"kgrec.stop_reason": stop_reason, "kgrec.best_trial": str(best.number)})
    mlflow.log_dict(recommendation.to_dict(), RECOMMENDATION_FILE)
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), "optuna/trials.csv")
    _log_plots(study)
    return TuneResult(
        spec=spec, run_id=parent_id, recommendation=recommendation, counts=counts, stop_reason=stop_reason,
        seconds=time.monotonic() - started, importances=importances,
    )


def _importance_evaluator() -> optuna.importance.BaseImportanceEvaluator:
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def _importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances of the parameters (empty below two finished trials or without spread)."""
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=_importance_evaluator()))
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        logger.info("no parameter importances: %s", exc)
        return {}


def _log_plots(study: optuna.Study) -> None:
    """Optuna's own plots as run artefacts; a plot it cannot draw (too few trials) is left out."""
    import matplotlib.pyplot as plt  # optuna's matplotlib plots draw through pyplot
    from optuna.visualization import matplotlib as plots

    for name, draw in (
        ("optimization_history", plots.plot_optimization_history),
        ("param_importances", functools.partial(plots.plot_param_importances, evaluator=_importance_evaluator())),
        ("intermediate_values", plots.plot_intermediate_values),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(study)
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:
            logger.info("no %s plot: %s", name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        mlflow.log_figure(figure, f"optuna/{name}.png")
        plt.close(figure)


def recommended_config(model: str, snapshot_hash: str, experiment: str) -> Recommendation | None:
    """The newest finished study of ``model`` on the snapshot ``snapshot_hash`` in ``experiment``
    of the current tracking store, as its recommendation; ``None`` when there is none."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.`{KIND_TAG}` = '{TUNE_KIND}' and tags.`kgrec.model` = '{model}' "
            f"and tags.`{SNAPSHOT_TAG}` = '{snapshot_hash}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    stored = mlflow.artifacts.load_dict(f"runs:/{runs[0].info.run_id}/{RECOMMENDATION_FILE}")
    return Recommendation(**stored)


def configured(
    spec: ModelSpec, snapshot_hash: str, experiment: str, tuned: bool, **fixed: Any
) -> tuple[Any, Recommendation | None]:
    """The family config a pipeline trains ``spec`` with: with ``tuned``, the snapshot's
    recommended overrides (when a study exists) on the model's defaults; ``fixed`` (epochs, seed)
    apply either way."""
    recommendation = recommended_config(spec.name, snapshot_hash, experiment) if tuned else None
    overrides = recommendation.config_overrides() if recommendation is not None else {}
    return family_of(spec).config(spec, **{**overrides, **fixed}), recommendation
