"""Typed configuration of a pipeline run, validated at the edge (CLI, flow parameters).

Every field is logged to MLflow with each training run, so a run can be reproduced from its params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from kgrec.models.spec import get_spec, model_names
from kgrec.models.tracking.settings import TrackingSettings, registered_model_name
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PipelineConfig(BaseModel):
    """Parameters of ``kgrec pipeline`` / the Prefect ``pipeline`` flow."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "music"
    models: list[str] = Field(default_factory=lambda: ["bprmf", "lightgcn"], min_length=1)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    # The split of the embedding retrievers (bprmf, lightgcn, kgat); sequential models always use
    # the sequential split (features.sequences) with ``seed``.
    split: Literal["random", "temporal"] = "random"
    seed: int = 2020
    registered_model: str | None = None
    # The ranking stage: trained on the candidates of this run's best embedding retriever
    # (validation Recall@20) and registered as ``<registered model>-ranker``.
    ranker: str | None = None
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    progress: bool = False
    # Models trained at once. Two cores are best spent on one model at a time; parallel training
    # is not bitwise reproducible (models draw their initial weights from torch's global RNG).
    parallel_training: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 1) // 4), ge=1)

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        known = set(model_names("retriever")) | set(model_names("sequential"))
        cleaned = [m.strip().lower() for m in models if m.strip()]
        unknown = sorted(set(cleaned) - known)
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(known)}")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"a model is listed twice: {cleaned}")
        return cleaned

    @field_validator("ranker")
    @classmethod
    def _known_ranker(cls, ranker: str | None) -> str | None:
        if ranker is not None:
            get_spec(ranker, "ranker")
        return ranker

    @model_validator(mode="after")
    def _ranker_needs_a_retriever(self) -> PipelineConfig:
        retrievers = model_names("retriever")
        if self.ranker is not None and not any(m in retrievers for m in self.models):
            raise ValueError(
                f"ranker {self.ranker!r} re-ranks an embedding retriever's candidates: list one of "
                f"{list(retrievers)} in models"
            )
        return self

    @property
    def model_name(self) -> str:
        return self.registered_model or registered_model_name(self.dataset_name)

    @property
    def dataset_name(self) -> str:
        """Name of a bundled spec, or the stem of a spec file path."""
        return Path(self.dataset).stem if self.dataset.endswith((".yaml", ".yml")) else self.dataset
