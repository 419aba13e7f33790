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
