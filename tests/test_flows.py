"""The flow's parameters survive the JSON round trip a Prefect deployment makes."""

from __future__ import annotations

from kgrec.flows.config import PipelineConfig
from kgrec.flows.pipeline import pipeline_flow


def test_deployment_parameters_validate_back_into_a_pipeline_config():
    config = PipelineConfig(dataset="ml-100k", models=["lightgcn"], epochs=3)
    # This is what a deployment run sends: plain JSON, validated against the flow signature.
    validated = pipeline_flow.validate_parameters({"config": config.model_dump(mode="json")})
    assert isinstance(validated["config"], PipelineConfig)
    assert validated["config"] == config


def test_pipeline_config_rejects_unknown_models_with_the_choices():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown model.*choose from"):
        PipelineConfig(models=["bprmf", "no-such-model"])


def test_a_ranker_needs_an_embedding_retriever_in_the_same_run():
    import pytest
    from pydantic import ValidationError

    assert PipelineConfig(models=["comirec_sa", "lightgcn"], ranker="kcan").ranker == "kcan"
    with pytest.raises(ValidationError, match="re-ranks an embedding retriever"):
        PipelineConfig(dataset="ml-100k-seq", models=["comirec_sa"], ranker="kcan")
    with pytest.raises(ValidationError):
        PipelineConfig(ranker="xgboost")


def test_a_flow_run_shows_library_logs_and_leaves_summary_artifacts_in_prefect(tmp_path, monkeypatch, shared_data):
    """What a Prefect UI user sees: epochs and the promotion among the flow run's logs, a Markdown
    summary and the registered version among its artifacts."""
    from kgrec.flows.pipeline import run_pipeline
    from kgrec.models.tracking.settings import TrackingSettings
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KGREC_TRACKING_URI", raising=False)
    config = PipelineConfig(dataset="music", models=["bprmf"], epochs=2,
                            tracking=TrackingSettings(workdir=tmp_path / "work"))
    with prefect_test_harness(server_startup_timeout=120):
        result = run_pipeline(config)
        APILogHandler().flush()  # logs go to the API in batches
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs()
            logs = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert any(m.startswith("epoch 2 loss=") for m in logs), logs
    assert any("-> champion" in m for m in logs)
    (summary,) = [a for a in artifacts if a.type == "markdown"]
    assert summary.key == "kgrec-summary-music"
    version = result["models"][0]["registered"]["version"]
    assert "| bprmf | 2 |" in summary.data and f"kgrec-music v{version} | champion" in summary.data


def test_the_time_cap_reaches_every_model_s_config_and_is_reported(monkeypatch, shared_data, tmp_path, capsys):
    """``--time-cap`` becomes each model's (and the ranker's) training budget; a capped run tests
    its best epoch so far and the CLI says it was capped."""
    from types import SimpleNamespace

    from kgrec.flows.pipeline import model_config_of
    from kgrec.models.spec import get_spec

    from kgrec.cli import _pipeline_fields, build_parser, main

    args = build_parser().parse_args(["pipeline", "--models", "lightgcn,comirec_sa", "--time-cap", "90"])
    config = PipelineConfig(**_pipeline_fields(args))
    assert config.time_cap_s == 90.0
    inputs = SimpleNamespace(snapshot=SimpleNamespace(manifest={}, hash="0" * 64))
    for name in ("lightgcn", "comirec_sa", "kgat"):
        model_config, _ = model_config_of(get_spec(name), config, inputs)
        assert model_config.time_budget_s == 90.0
    uncapped, _ = model_config_of(get_spec("lightgcn"), PipelineConfig(), inputs)
    assert uncapped.time_budget_s is None

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KGREC_TRACKING_URI", raising=False)
    # bprmf on music runs well over a millisecond per epoch: one epoch, then the cap
    rc = main(["train", "--dataset", "music", "--model", "bprmf", "--epochs", "50", "--time-cap", "0.001",
               "--no-track", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert rc == 0 and "best epoch 1 of 1 (time cap)" in out, out
