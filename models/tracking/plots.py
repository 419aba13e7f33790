"""Diagnostic plots logged as artefacts of a model's MLflow run (under ``plots/``).

* :func:`metrics_at_k_figure` -- Recall@K and NDCG@K over K on test, one line per ranked list
  (the model's; a ranker's ``kcan_`` and ``retrieval_`` stages beside its fused list);
* :func:`training_curves_figure` -- ``train_loss`` and the validation selection metric per epoch
  (best epoch marked), from :class:`~kgrec.models.training.trainer.EpochLog` history;
* :func:`popularity_bias` -- the popularity of recommended items against the catalogue's: where
  the recommended items sit among the catalogue ranked by interaction count (percentile, 100 = the
  most popular item), against the same for the interactions themselves; coverage of the catalogue.
  The top-k lists come from the serving path (``kgrec.serving.export.log_popularity_bias``).

Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot: no global
figure registry, safe from the flow's worker threads) and dropped once logged.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient
from mlflow.entities import Metric
from scipy.stats import rankdata

PLOTS_DIR = "plots"
METRICS_AT_K_PLOT = f"{PLOTS_DIR}/test_metrics_at_k.png"
TRAINING_CURVES_PLOT = f"{PLOTS_DIR}/training_curves.png"
POPULARITY_BIAS_PLOT = f"{PLOTS_DIR}/popularity_bias.png"
CURVE_METRICS = ("recall", "ndcg")
_METRIC_AT_K = re.compile(r"^(?:(?P<stage>[a-z0-9]+)_)?(?P<metric>[a-z]+)@(?P<k>\d+)$")
_DPI = 100


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def log_figure(run_id: str, figure: Figure, artifact_file: str) -> str:
    """Log ``figure`` as ``artifact_file`` of ``run_id`` and release it; returns the path."""
    try:
        MlflowClient().log_figure(run_id, figure, artifact_file)
    finally:
        figure.clear()
    return artifact_file


# ---------------------------------------------------------------------------- metrics at K
def metrics_at_k(
    metrics: Mapping[str, float], names: Sequence[str] = CURVE_METRICS
) -> dict[str, dict[str, list]]:
    """``{metric: {stage: [(K, value), ...] sorted by K}}`` of ``metrics`` keyed ``[stage_]metric@K``
    (stage ``""``: the model's own list), finite values only."""
    out: dict[str, dict[str, list]] = {name: {} for name in names}
    for key, value in metrics.items():
        match = _METRIC_AT_K.match(key)
        if not match or match["metric"] not in out:
            continue
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[match["metric"]].setdefault(match["stage"] or "", []).append((int(match["k"]), float(value)))
    return {name: {stage: sorted(points) for stage, points in stages.items()} for name, stages in out.items()}


def metrics_at_k_figure(metrics: Mapping[str, float], title: str = "") -> Figure | None:
    """Recall@K and NDCG@K over K (one panel each); None without any such metric."""
    curves = metrics_at_k(metrics)
    if not any(curves.values()):
        return None
    figure = _figure(10, 4)
    axes = figure.subplots(1, len(curves))
    stage_names = sorted({stage for stages in curves.values() for stage in stages})
    colours = {stage: f"C{i}" for i, stage in enumerate(stage_names)}  # one colour per list, every panel
    own = title or "model"
    own = f"{own} (final list)" if own in stage_names else own  # a ranker's fused list beside its stages
    for ax, (name, stages) in zip(np.atleast_1d(axes), curves.items()):
        for stage, points in sorted(stages.items()):
            ks, values = zip(*points)
            ax.plot(ks, values, marker="o", color=colours[stage], label=stage or own)
        ax.set_xscale("log")
        ks_all = sorted({k for points in stages.values() for k, _ in points})
        ax.set_xticks(ks_all, [str(k) for k in ks_all])
        ax.minorticks_off()
        ax.set_xlabel("K")
        ax.set_ylabel(f"{'Recall' if name == 'recall' else name.upper()}@K")
        ax.grid(alpha=0.3)
        if len(stages) > 1:
            ax.legend()
    figure.suptitle(f"{title} test metrics at K".strip())
    return figure


# ---------------------------------------------------------------------------- training curves
def training_curves_figure(history: Iterable, selection_metric: str, best_epoch: int | None = None,
                           title: str = "") -> Figure | None:
    """``train_loss`` (and epoch-hook losses) and the validation ``selection_metric`` per epoch;
    None for an empty history. ``history``: :class:`EpochLog` items (``epoch``, ``loss``,
    ``valid``, ``extra``)."""
    history = list(history)
    if not history:
        return None
    figure = _figure(10, 4)
    loss_ax, valid_ax = figure.subplots(1, 2)
    epochs = [log.epoch for log in history]
    loss_ax.plot(epochs, [log.loss for log in history], marker="o", label="train_loss")
    extra_keys = sorted({k for log in history for k in (log.extra or {})})
    for key in extra_keys:
        points = [(log.epoch, log.extra[key]) for log in history if key in (log.extra or {})]
        loss_ax.plot(*zip(*points), marker=".", linestyle="--", label=key)
    for ax in (loss_ax, valid_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    valid = [(log.epoch, log.valid[selection_metric]) for log in history
             if log.valid and selection_metric in log.valid]
    if valid:
        valid_ax.plot(*zip(*valid), marker="o", color="tab:green", label=f"valid {selection_metric}")
        if best_epoch is not None and best_epoch in dict(valid):
            valid_ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
        valid_ax.legend()
    valid_ax.set_xlabel("epoch")
    valid_ax.set_ylabel(selection_metric)
    valid_ax.grid(alpha=0.3)
    figure.suptitle(f"{title} training".strip())
    return figure


def log_model_plots(run_id: str, test_metrics: Mapping[str, float], history: Iterable, selection_metric: str,
                    best_epoch: int | None = None, title: str = "") -> list[str]:
    """Log :data:`METRICS_AT_K_PLOT` and :data:`TRAINING_CURVES_PLOT` (those there is data for) to
    ``run_id``; returns the artefact paths logged."""
    logged = []
    figure = metrics_at_k_figure(test_metrics, title)
    if figure is not None:
        logged.append(log_figure(run_id, figure, METRICS_AT_K_PLOT))
    figure = training_curves_figure(history, selection_metric, best_epoch, title)
    if figure is not None:
        logged.append(log_figure(run_id, figure, TRAINING_CURVES_PLOT))
    return logged


# ---------------------------------------------------------------------------- popularity bias
def popularity_percentiles(counts: np.ndarray) -> np.ndarray:
    """Each item's place in the catalogue ranked by interaction count, in percent (100 = the most
    popular item, ties share their mean rank; ~50 on average over the catalogue)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0:
        return counts
    return 100.0 * rankdata(counts, method="average") / counts.size


@dataclass
class PopularityBias:
    """What :func:`popularity_bias` measured: ``metrics`` (logged) and the figure."""

    metrics: dict[str, float]
    figure: Figure | None = field(default=None, repr=False)


def popularity_bias(
    recommended: Sequence[np.ndarray], counts: np.ndarray, k: int, title: str = ""
) -> PopularityBias:
    """Popularity of the top-``k`` lists ``recommended`` (``item_idx`` arrays, one per sampled user)
    against the catalogue's interaction ``counts`` (``[n_items]``).

    Metrics: ``popularity_bias_mean_pct`` (mean popularity percentile of the recommended items),
    ``popularity_interactions_mean_pct`` (the same over the interactions: what users consume),
    ``popularity_bias_top10_share`` (share of recommendations among the 10% most popular items),
    ``top_k_coverage`` (share of the catalogue recommended at least once), ``popularity_bias_users``
    and ``popularity_bias_k``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_items = counts.size
    pct = popularity_percentiles(counts)
    lists = [np.asarray(r, dtype=np.int64) for r in recommended]
    flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    rec_pct = pct[flat]
    total = counts.sum()
    interaction_weights = counts / total if total > 0 else np.full(n_items, 1.0 / max(n_items, 1))
    metrics = {
        "popularity_bias_mean_pct": float(rec_pct.mean()) if flat.size else float("nan"),
        "popularity_interactions_mean_pct": (
            float((pct * interaction_weights).sum()) if n_items else float("nan")
        ),
        "popularity_bias_top10_share": float((rec_pct > 90.0).mean()) if flat.size else float("nan"),
        "top_k_coverage": float(np.unique(flat).size / n_items) if n_items else float("nan"),
        "popularity_bias_users": float(len(lists)),
        "popularity_bias_k": float(k),
    }
    if not flat.size or not n_items:
        return PopularityBias(metrics)
    figure = _figure(11, 4)
    hist_ax, cdf_ax = figure.subplots(1, 2)
    bins = np.linspace(0, 100, 21)
    hist_ax.hist(rec_pct, bins=bins, density=True, alpha=0.6, label=f"recommended (top-{k})")
    hist_ax.hist(pct, bins=bins, weights=interaction_weights, density=True, alpha=0.6, label="interactions")
    hist_ax.axhline(1 / 100, color="grey", linestyle=":", label="catalogue (uniform)")
    hist_ax.set_xlabel("item popularity percentile (100 = most popular)")
    hist_ax.set_ylabel("density")
    hist_ax.legend()
    # share of recommendations / interactions going to the x% most popular items
    order = np.argsort(-counts, kind="stable")
    top_share = np.arange(1, n_items + 1) / n_items * 100
    rec_counts = np.bincount(flat, minlength=n_items)[order]
    cdf_ax.plot(top_share, np.cumsum(rec_counts) / rec_counts.sum(), label=f"recommended (top-{k})")
    cdf_ax.plot(top_share, np.cumsum(interaction_weights[order]), label="interactions")
    cdf_ax.plot([0, 100], [0, 1], color="grey", linestyle=":", label="uniform")
    cdf_ax.set_xlabel("most popular items (% of catalogue)")
    cdf_ax.set_ylabel("cumulative share")
    cdf_ax.grid(alpha=0.3)
    cdf_ax.legend()
    figure.suptitle(
        f"{title} popularity of top-{k} lists ({len(lists)} users): mean percentile "
        f"{metrics['popularity_bias_mean_pct']:.1f} vs interactions "
        f"{metrics['popularity_interactions_mean_pct']:.1f}, "
        f"coverage {metrics['top_k_coverage']:.1%}".strip()
    )
    return PopularityBias(metrics, figure)


def log_popularity_bias(run_id: str, bias: PopularityBias) -> str | None:
    """Log ``bias``'s metrics and figure (:data:`POPULARITY_BIAS_PLOT`) to ``run_id``."""
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in bias.metrics.items() if math.isfinite(value)]
    MlflowClient().log_batch(run_id, metrics=metrics)
    return None if bias.figure is None else log_figure(run_id, bias.figure, POPULARITY_BIAS_PLOT)
