"""The diagnostic plots of a run: what they draw, the popularity-bias figures, and that every
registered model's run gets them as artefacts."""

from __future__ import annotations

import dataclasses
import math

import mlflow
import numpy as np
import pytest
from kgrec.features.dataset import InteractionData
from kgrec.features.split import random_split
from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot
from kgrec.models.families import family_of
from kgrec.models.spec import get_spec
from kgrec.models.tracking import plots
from kgrec.models.tracking.experiment import evaluate_and_log, train_and_log
from kgrec.models.training.trainer import EpochLog
from kgrec.serving.export import POPULARITY_K, register_trained
from mlflow import MlflowClient

PNG = b"\x89PNG\r\n\x1a\n"


def _lines(ax) -> dict[str, list[tuple[float, float]]]:
    return {line.get_label(): [tuple(p) for p in line.get_xydata()] for line in ax.get_lines()}


# ---------------------------------------------------------------------------- metrics at K
def test_metrics_at_k_reads_every_ranked_list_in_k_order():
    metrics = {
        "recall@20": 0.2, "recall@5": 0.1, "ndcg@20": 0.3, "kcan_recall@20": 0.25, "hit@20": 1.0,
        "diversity@50": 0.5, "recall@10": float("nan"), "alpha": 0.5, "num_users": 7,
    }
    assert plots.metrics_at_k(metrics) == {
        "recall": {"": [(5, 0.1), (20, 0.2)], "kcan": [(20, 0.25)]},
        "ndcg": {"": [(20, 0.3)]},
    }


def test_the_metrics_at_k_figure_draws_recall_and_ndcg_over_k():
    metrics = {"recall@5": 0.1, "recall@20": 0.2, "recall@50": 0.4, "ndcg@5": 0.05, "ndcg@20": 0.08,
               "retrieval_ndcg@20": 0.07}
    figure = plots.metrics_at_k_figure(metrics, title="bprmf")
    recall_ax, ndcg_ax = figure.axes
    assert _lines(recall_ax) == {"bprmf": [(5, 0.1), (20, 0.2), (50, 0.4)]}
    assert _lines(ndcg_ax) == {"bprmf": [(5, 0.05), (20, 0.08)], "retrieval": [(20, 0.07)]}
    assert "Recall" in recall_ax.get_ylabel() and "NDCG" in ndcg_ax.get_ylabel()
    assert plots.metrics_at_k_figure({"alpha": 1.0}) is None


# ---------------------------------------------------------------------------- training curves
def test_the_training_curves_draw_the_loss_and_the_validation_metric_per_epoch():
    history = [
        EpochLog(1, 0.9, 0.1, None, {"kg_loss": 2.0}),
        EpochLog(2, 0.7, 0.1, {"recall@20": 0.1}, {"kg_loss": 1.5}),
        EpochLog(3, 0.6, 0.1, None, {"kg_loss": 1.2}),
        EpochLog(4, 0.5, 0.1, {"recall@20": 0.15}, {"kg_loss": 1.1}),
    ]
    figure = plots.training_curves_figure(history, "recall@20", best_epoch=4, title="kgat")
    loss_ax, valid_ax = figure.axes
    loss = _lines(loss_ax)
    assert loss["train_loss"] == [(1, 0.9), (2, 0.7), (3, 0.6), (4, 0.5)]
    assert loss["kg_loss"] == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.1)]
    valid = _lines(valid_ax)
    assert valid["valid recall@20"] == [(2, 0.1), (4, 0.15)]
    assert {x for x, _ in valid["best epoch 4"]} == {4}
    assert plots.training_curves_figure([], "recall@20") is None


# ---------------------------------------------------------------------------- popularity bias
def test_popularity_percentiles_rank_the_catalogue():
    assert plots.popularity_percentiles(np.array([10, 5, 1, 0])).tolist() == [100.0, 75.0, 50.0, 25.0]
    assert plots.popularity_percentiles(np.array([3, 3])).tolist() == [75.0, 75.0]  # ties share


def test_popularity_bias_compares_the_lists_with_the_interactions():
    counts = np.array([10, 5, 1, 0])  # percentiles 100, 75, 50, 25
    bias = plots.popularity_bias([np.array([0, 1]), np.array([0, 2])], counts, k=2, title="m")
    m = bias.metrics
    assert m["popularity_bias_mean_pct"] == pytest.approx((100 + 75 + 100 + 50) / 4)
    assert m["popularity_interactions_mean_pct"] == pytest.approx((10 * 100 + 5 * 75 + 1 * 50) / 16)
    assert m["popularity_bias_top10_share"] == pytest.approx(0.5)
    assert m["top_k_coverage"] == pytest.approx(3 / 4)
    assert (m["popularity_bias_users"], m["popularity_bias_k"]) == (2, 2)
    hist_ax, cdf_ax = bias.figure.axes
    cdf = _lines(cdf_ax)
    # the cumulative share of recommendations over the catalogue from the most popular item
    assert [y for _, y in cdf["recommended (top-2)"]] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    assert [y for _, y in cdf["interactions"]] == pytest.approx([10 / 16, 15 / 16, 1.0, 1.0])


def test_popularity_bias_without_lists_has_no_figure():
    bias = plots.popularity_bias([], np.array([1, 2, 3]), k=5)
    assert bias.figure is None and math.isnan(bias.metrics["popularity_bias_mean_pct"])
    assert bias.metrics["top_k_coverage"] == 0.0


def test_plots_and_metrics_are_logged_to_the_run(tracking):
    with mlflow.start_run() as run:
        pass
    history = [EpochLog(1, 0.9, 0.1, {"recall@20": 0.1}), EpochLog(2, 0.8, 0.1, {"recall@20": 0.2})]
    logged = plots.log_model_plots(run.info.run_id, {"recall@10": 0.1, "recall@20": 0.2, "ndcg@20": 0.1},
                                   history, "recall@20", 2)
    bias = plots.popularity_bias([np.array([0, 1])], np.array([3, 2, 1]), k=2)
    assert plots.log_popularity_bias(run.info.run_id, bias) == plots.POPULARITY_BIAS_PLOT
    assert logged == [plots.METRICS_AT_K_PLOT, plots.TRAINING_CURVES_PLOT]
    client = MlflowClient()
    stored = sorted(a.path for a in client.list_artifacts(run.info.run_id, plots.PLOTS_DIR))
    assert stored == sorted([plots.METRICS_AT_K_PLOT, plots.TRAINING_CURVES_PLOT, plots.POPULARITY_BIAS_PLOT])
    for path in stored:
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path)
        with open(local, "rb") as fh:
            assert fh.read(8) == PNG
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["top_k_coverage"] == pytest.approx(2 / 3)
    assert metrics["popularity_bias_mean_pct"] == pytest.approx(bias.metrics["popularity_bias_mean_pct"])


# ---------------------------------------------------------------------------- wired into registration
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> InteractionData:
    snapshot = powerlaw_snapshot(PowerLawConfig(
        num_users=150, num_items=90, num_interactions=2_000, num_entities=40, num_triples=150,
        num_relations=3, seed=3,
    ))
    snapshot = dataclasses.replace(snapshot, path=tmp_path_factory.mktemp("snapshot"))
    return InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=1))


def test_every_registered_model_gets_its_plots(tracking, tiny_data):
    spec = get_spec("bprmf")
    config = family_of(spec).config(spec, epochs=2, seed=1, embedding_dim=8)
    trained = train_and_log(spec, config, tiny_data)
    evaluate_and_log(trained)
    version, bundle_dir = register_trained(trained, tracking.workdir / "bundles", "kgrec-test")

    client = MlflowClient()
    stored = {a.path for a in client.list_artifacts(trained.run_id, plots.PLOTS_DIR)}
    assert stored == {plots.METRICS_AT_K_PLOT, plots.TRAINING_CURVES_PLOT, plots.POPULARITY_BIAS_PLOT}
    metrics = client.get_run(trained.run_id).data.metrics
    # the test metrics are evaluated at the curve's cut-offs below the config's largest K too
    assert {"test_recall_at_1", "test_recall_at_5", "test_ndcg_at_5", "test_recall_at_100"} <= set(metrics)
    assert 0 < metrics["top_k_coverage"] <= 1 and 0 < metrics["popularity_bias_mean_pct"] <= 100
    assert metrics["popularity_bias_k"] == POPULARITY_K
    assert metrics["popularity_bias_users"] == tiny_data.num_users  # fewer users than the sample size
    # the version's logged model is named after the model
    assert client.get_logged_model(version.source.removeprefix("models:/")).name == "bprmf"
